"""GRAPE: global expert pruning for sparse Mixture-of-Experts language models."""

__version__ = "0.1.0"

# the model-side entry points, imported on first use so `import grape` stays free of torch
_LAZY = {
    "apply_plan": "grape.apply",
    "ApplyConfig": "grape.apply",
    "save_pruned": "grape.checkpoint",
    "load_pruned": "grape.checkpoint",
    "get_adapter": "grape.adapters",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'grape' has no attribute {name!r}")
