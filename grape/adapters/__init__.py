"""Architecture adapters, one module per family. Importing this package registers them all."""

from grape.adapters.base import MoEAdapter, get_adapter, register_adapter, supported_model_types

__all__ = ["MoEAdapter", "get_adapter", "register_adapter", "supported_model_types"]
