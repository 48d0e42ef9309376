"""Architecture adapters, one module per family. Importing this package registers them all,
so the lookups by model type live here: they answer for every family, and no module of the
package has to import the package back to be sure of it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from grape.models.adapters import deepseek, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401
from grape.models.adapters import deepseek_like, lfm2_moe, minimax_m2, qwen3_next, refused, standard  # noqa: F401
from grape.models.adapters import deepseek_v3_copies, ernie4_5_moe, fused_families, llama4  # noqa: F401
from grape.models.adapters.base import _REFUSED, _REGISTRY, MoEAdapter, register_adapter
from grape.errors import ArchitectureError

if TYPE_CHECKING:
    from torch import nn


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def refusal_reason(model_type) -> str | None:
    """The one line get_adapter raises for `model_type`; None when it is supported."""
    if model_type in _REGISTRY:
        return None
    why = _REFUSED.get(model_type)
    if why is not None:
        return f"model type {model_type!r} is not supported: {why}"
    return (f"model type {model_type!r} is not supported; GRAPE supports "
            f"{', '.join(supported_model_types())}. Adding a family is one adapter class in "
            "grape/models/adapters/ (see docs/extending.md).")


def check_model_config(config: dict, where: str) -> bool:
    """Validate a config.json (a dict) with its family's adapter before any model is built;
    False when no adapter handles its model_type (nothing checked)."""
    adapter = _REGISTRY.get(config.get("model_type"))
    if adapter is None:
        return False
    adapter.check_config(config, where)
    return True


def adapter_class(model_type) -> type["MoEAdapter"] | None:
    """The adapter class registered for `model_type`, or None when it is not supported: what a
    caller holding only a config.json asks for the family's declarations."""
    return _REGISTRY.get(model_type)


def get_adapter(model: nn.Module) -> "MoEAdapter":
    """The adapter for `model`, or an ArchitectureError listing the supported model types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _REGISTRY:
        raise ArchitectureError(refusal_reason(model_type))
    return _REGISTRY[model_type](model)


__all__ = ["MoEAdapter", "adapter_class", "check_model_config", "get_adapter", "refusal_reason",
           "register_adapter", "supported_model_types"]
