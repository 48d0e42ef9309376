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
from torch.overrides import TorchFunctionMode

from grape.errors import ArchitectureError
from grape.templates.grape_pruning import BLOCK_KEY, read_block  # noqa: F401 - re-exported
from solvers.scores import ModelIdentity

_REGISTRY: dict[str, type["MoEAdapter"]] = {}

# the config.json block GRAPE writes for a pruned model: method, per-layer expert counts and top_k
# when layers differ, experts a router is masked from (grape/templates/grape_pruning.py reads it)
PRUNING_KEY = BLOCK_KEY


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
    # attribute of the MoE block holding the router (written into remote-code checkpoints)
    router_attr: ClassVar[str] = "gate"
    # config keys carrying the routed-expert count; checkpoints write all of them
    expert_count_keys: ClassVar[tuple[str, ...]] = ("num_experts", "num_local_experts")

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

    def route_masked(self, layer: int, hidden: torch.Tensor, removed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing the model would apply with experts `removed` masked out: they are never
        chosen (or chosen with weight 0 when fewer than top_k remain) and the other weights are
        renormalised exactly as the model renormalises. Used for calibration's layer cost curves.

        Default: `route` with every [..., E]-wide router linear output, and every sum with a
        per-expert router tensor (a selection bias such as `e_score_correction_bias`), forced
        to -inf at the removed columns. Routing groups keep their original membership. Override
        where a family's router computes its scores another way."""
        if not removed:
            return self.route(layer, hidden)
        with _MaskRouterColumns(self.router(layer), self.num_experts(layer), removed):
            return self.route(layer, hidden)

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

    def masked_experts(self) -> dict[int, list[int]]:
        """Layer -> experts its router is masked from selecting (`mask_experts`); {} if none."""
        return {}

    # -- checkpoints ----------------------------------------------------------------------
    @abstractmethod
    def sync_config(self) -> None:
        """Write the current per-layer expert counts / top_k / masks into model.config (the
        stock keys hold the largest; the `grape_pruning` block the per-layer values)."""

    def sync_runtime(self) -> None:
        """Make model-level state that transformers caches at construction (e.g. the expert
        count the load-balancing loss reads) agree with the current layers. Default: nothing."""

    @abstractmethod
    def shrink_to_config(self) -> None:
        """On a freshly constructed model (possibly on the meta device), shrink each layer to
        the per-layer counts in the config so a non-uniform checkpoint's weights fit."""

    @abstractmethod
    def mask_from_config(self) -> None:
        """Re-install the router masks the config's `grape_pruning` block lists."""

    def expert_weight_cosine(self, layer: int) -> torch.Tensor:
        """[E, E] cosine similarity of the experts' flattened parameters, for weight-similarity
        fallbacks (e.g. `merge` without a merge map). Families without it cannot do that."""
        raise ArchitectureError(f"{type(self).__name__} does not expose expert weight similarity")

    def check_kept(self, kept: dict[int, list[int]]) -> None:
        """Raise ArchitectureError if the experts kept per layer (original numbering) break a
        family rule that depends on which experts are kept, not only how many (DeepSeek groups
        must stay balanced). Default: the count rules only."""
        self.check_plan_counts({layer: len(v) for layer, v in kept.items()})

    def check_plan_counts(self, kept_counts: dict[int, int]) -> None:
        """Raise ArchitectureError if per-layer kept counts break a family rule (e.g. DeepSeek
        routing groups, or fewer experts than top_k where the family cannot shrink top_k)."""


class _MaskRouterColumns(TorchFunctionMode):
    """While active, the removed experts' router scores are -inf: in the output of any E-wide
    linear projection (the router logits, bias included) and of any sum with one of the router's
    own per-expert tensors (a selection-only bias such as DeepSeek's e_score_correction_bias)."""

    _ADDS = (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)

    def __init__(self, router: nn.Module, num_experts: int, removed: list[int]):
        super().__init__()
        self.num_experts = int(num_experts)
        self.removed = sorted({int(e) for e in removed})
        own = list(router.parameters(recurse=False)) + list(router.buffers(recurse=False))
        self.expert_tensors = {id(t) for t in own if t.dim() == 1 and t.shape[0] == self.num_experts}

    def _masks(self, func, args) -> bool:
        if func is nn.functional.linear:
            return True
        return func in self._ADDS and any(id(a) in self.expert_tensors for a in args)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (self._masks(func, args) and isinstance(out, torch.Tensor) and out.is_floating_point()
                and out.dim() >= 1 and out.shape[-1] == self.num_experts):
            index = torch.tensor(self.removed, dtype=torch.long, device=out.device)
            out = out.index_fill(-1, index, float("-inf"))
        return out
