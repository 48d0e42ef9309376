"""The architecture adapter contract: everything the pruning code needs to know about a family.

Pruning, calibration and checkpoint code call only these methods; no other module branches on
`model_type`. A new family is one subclass in grape/adapters/<family>.py, decorated with
@register_adapter, plus its tests.

Conventions: a "layer" is the decoder-layer index (model.model.layers[i]); expert indices are
the model's current numbering; `hidden` arguments are 2-D (tokens, hidden_size).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from grape.errors import ArchitectureError
from solvers.scores import ModelIdentity

_REGISTRY: dict[str, type["MoEAdapter"]] = {}


def register_adapter(cls: type["MoEAdapter"]) -> type["MoEAdapter"]:
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model: nn.Module) -> "MoEAdapter":
    """The adapter for `model`, or an ArchitectureError listing the supported model types."""
    import grape.adapters  # noqa: F401 - importing the package registers every family

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _REGISTRY:
        raise ArchitectureError(
            f"model type {model_type!r} is not supported; GRAPE supports "
            f"{', '.join(supported_model_types())}. Adding a family is one adapter class in "
            "grape/adapters/ (see docs/extending.md)."
        )
    return _REGISTRY[model_type](model)


class MoEAdapter(ABC):
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- structure ------------------------------------------------------------------------
    @abstractmethod
    def moe_blocks(self) -> dict[int, nn.Module]:
        """Decoder-layer index -> sparse MoE block, for every layer with routed experts."""

    @abstractmethod
    def router(self, layer: int) -> nn.Module:
        """The module holding the router weight [E, H] (and bias / correction bias if any)."""

    @abstractmethod
    def experts(self, layer: int) -> nn.Module:
        """The fused experts module (`XExperts`), called as experts(hidden, top_k_index, top_k_weights)."""

    @abstractmethod
    def num_experts(self, layer: int) -> int: ...

    @abstractmethod
    def top_k(self, layer: int) -> int: ...

    # -- computation ----------------------------------------------------------------------
    @abstractmethod
    def route(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing the model really applies: (top_k_index [T,k], top_k_weights [T,k])."""

    @abstractmethod
    def expert_forward(self, layer: int, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert `expert`'s output f_e(x) for every row of `hidden`, before gate weighting."""

    @abstractmethod
    def expert_bytes(self, layer: int) -> list[int]:
        """Bytes of each routed expert's parameters (weights and biases) in this layer."""

    # -- identity -------------------------------------------------------------------------
    @abstractmethod
    def identity(self) -> ModelIdentity:
        """Model type, experts and top_k per MoE layer, and a hash of the router weights."""

    # -- surgery --------------------------------------------------------------------------
    @abstractmethod
    def keep_experts(self, layer: int, keep: list[int]) -> None:
        """Slice the layer down to `keep` (sorted, original order): expert params, router rows,
        router bias / e_score_correction_bias; update num_experts and top_k = min(top_k, kept)."""

    @abstractmethod
    def mask_experts(self, layer: int, removed: list[int]) -> None:
        """Keep the weights but make the router unable to select `removed`."""

    @abstractmethod
    def merge_experts(self, layer: int, groups: dict[int, list[int]], weights: dict[int, float]) -> None:
        """For each kept expert k, replace its weights by the `weights`-weighted average of
        experts [k, *groups[k]] (in place; removal of the merged-away experts is separate)."""

    def check_plan_counts(self, kept_counts: dict[int, int]) -> None:
        """Raise ArchitectureError if per-layer kept counts break a family rule (e.g. DeepSeek
        routing groups, or fewer experts than top_k where the family cannot shrink top_k)."""
