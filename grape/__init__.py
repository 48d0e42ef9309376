"""GRAPE: global expert pruning for sparse Mixture-of-Experts language models."""

__version__ = "0.1.0"
