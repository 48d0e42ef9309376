"""The architecture adapter contract: everything the pruning code needs to know about a family.

Pruning, calibration and checkpoint code call only these methods; no other module branches on
`model_type`. A new family is one subclass in grape/models/adapters/<family>.py, decorated with
@register_adapter, plus its tests.

Conventions: a "layer" is the decoder-layer index (model.model.layers[i]); expert indices are
the model's current numbering; `hidden` arguments are 2-D (tokens, hidden_size).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
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


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def register_adapter(cls: type["MoEAdapter"]) -> type["MoEAdapter"]:
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


# MoE model types GRAPE knows and refuses -> the specific reason (grape/models/adapters/refused.py)
_REFUSED: dict[str, str] = {}


def refuse_model_types(reasons: dict[str, str]) -> None:
    """Record why these model types are refused; get_adapter says it instead of the generic line."""
    _REFUSED.update(reasons)


class MoEAdapter(ABC):
    model_types: ClassVar[tuple[str, ...]] = ()
    # attribute of the MoE block holding the router (written into remote-code checkpoints)
    router_attr: ClassVar[str] = "gate"
    # config keys carrying the routed-expert count; checkpoints write all of them
    expert_count_keys: ClassVar[tuple[str, ...]] = ("num_experts", "num_local_experts")
    # config key of the experts each token is routed to
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    # why streaming apply (grape/pruning/streaming.py) cannot prune this family's checkpoints shard by
    # shard (grape apply then loads the model in memory); None: it can, exactly
    streaming_refusal: ClassVar[str | None] = None
    # why a layer-sequential run (calibration, search, repair: grape/calibration/sequential.py) cannot run
    # this family one decoder layer at a time, e.g. layers that hand the next one more than the
    # hidden states; None: it can (tests/test_sequential.py checks it equals the whole model)
    sequential_refusal: ClassVar[str | None] = None
    # why the lstsq repair (grape/pruning/repair_fit.py) cannot model this family's experts as a
    # linear down projection of gated activations; None: it can (`--repair auto` then uses it)
    lstsq_refusal: ClassVar[str | None] = None
    # per-expert tensors that surgery slices besides the direct ones of the MoE block, its router
    # and its experts module (expert on dim 0): {path under the MoE block: the expert's axis},
    # e.g. ERNIE-4.5's [1, E] correction bias in a router child; streaming apply
    # (grape/pruning/stream_layout.py) slices their stored copies along that axis
    extra_expert_tensors: ClassVar[dict[str, int]] = {}
    # config values the family's adapter cannot prune correctly: {config key: why, one line};
    # a key set to anything but None is refused by check_config (before the model is built)
    # and by the adapter itself (a model handed over already loaded)
    config_refusals: ClassVar[dict[str, str]] = {}
    # the README's architecture table (scripts/moe_families.py --write): the family as people
    # name it, checkpoints of it, what is special about its routing or layout (may be "")
    family: ClassVar[str] = ""
    examples: ClassVar[str] = ""
    special: ClassVar[str] = ""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        refused = self._refusal(lambda key: getattr(self.config, key, None))
        if refused is not None:
            raise ArchitectureError(refused)

    @classmethod
    def _refusal(cls, value_of) -> str | None:
        """The first config_refusals reason whose key is set (`value_of(key)` not None)."""
        return next((why for key, why in cls.config_refusals.items() if value_of(key) is not None), None)

    @classmethod
    def check_config(cls, config: dict, where: str) -> None:
        """Refuse config.json values (a dict; `where` names the file) the family's model cannot
        be built from: an expert count that is missing or not a whole number >= 1, a top_k
        outside 1..experts, a value the family refuses (config_refusals). transformers would
        fail deep inside, or run nonsense."""
        refused = cls._refusal(config.get)
        if refused is not None:
            raise ArchitectureError(f"{where}: {refused}")
        counts = {key: config[key] for key in cls.expert_count_keys if config.get(key) is not None}
        if not counts:
            raise ArchitectureError(f"{where} has no expert count; a {config.get('model_type')} "
                                    f"config needs {' or '.join(cls.expert_count_keys)} (routed "
                                    "experts per MoE layer)")
        for key, value in counts.items():
            if not _whole(value) or value < 1:
                raise ArchitectureError(f"{where}: {key} is {value!r}; it must be a whole number "
                                        "of experts, at least 1")
        key, experts = next(iter(counts.items()))
        top_k = config.get(cls.top_k_key)
        if not _whole(top_k) or not 1 <= top_k <= experts:
            raise ArchitectureError(f"{where}: {cls.top_k_key} is {top_k!r}; it must be a whole "
                                    f"number of experts per token from 1 to {key} ({experts})")

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
        per-expert tensor of `selection_module` (a selection bias such as
        `e_score_correction_bias`), forced to -inf at the removed columns. Routing groups keep
        their original membership. Override where a family's router computes its scores
        another way."""
        if not removed:
            return self.route(layer, hidden)
        with _MaskRouterColumns(self.selection_module(layer), self.num_experts(layer), removed):
            return self.route(layer, hidden)

    def selection_module(self, layer: int) -> nn.Module:
        """The module holding (itself or in a child) the per-expert tensors the router adds to
        its scores to choose experts: the router by default (DeepSeek-V3's correction bias;
        ERNIE-4.5's in the child gate.moe_statics), the MoE block where the block passes its
        own bias to the router (MiniMax-M2, LFM2-MoE)."""
        return self.router(layer)

    def router_logits(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(logits, top_k_index, top_k_weights): `route`, with the output of the router's
        E-wide linear projection kept (None if the router makes none). `route_rows` routes
        rows from these logits without projecting them again."""
        capture = _RouterLogits(self.num_experts(layer))
        with capture:
            index, weight = self.route(layer, hidden)
        return capture.logits, index, weight

    def route_rows(self, layer: int, logits: torch.Tensor, removed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`route_masked` for rows that each mask their own experts: `logits` [n, E] are rows of
        `router_logits`, `removed` [n, E] bool. Row by row the same operations on the same
        values as `route_masked(layer, those rows, that row's removed experts)`, so the same
        routing; many masks of the greedy reconstruction order (grape.calibration.scoring) in one call."""
        router = self.router(layer)
        width = router.weight.shape[-1]
        # the projection is replaced by `logits`: its input only has to have the right shape
        rows = torch.zeros((), dtype=router.weight.dtype, device=logits.device).expand(logits.shape[0], width)
        masks = _MaskRows(self.selection_module(layer), self.num_experts(layer), removed)
        with _RouterLogits(self.num_experts(layer), logits), masks:
            return self.route(layer, rows)

    def removal_effect(self, layer: int) -> "RemovalEffect | None":
        """Which tokens' `route_masked` routing the removal of one expert can change (see
        RemovalEffect), so the reconstruction order re-evaluates only those; None (the
        default): unknown, every removal is evaluated on every token. Families whose
        `route_masked` is overridden must say None or describe the override."""
        return None

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
    linear projection (the router logits, bias included) and of any sum with one of the
    selection module's per-expert tensors or a view of one (a selection-only bias such as
    DeepSeek's e_score_correction_bias [E], or ERNIE's [1, E] one, squeezed before the sum)."""

    _ADDS = (torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)

    def __init__(self, module: nn.Module, num_experts: int, removed: list[int]):
        super().__init__()
        self.num_experts = int(num_experts)
        self.removed = sorted({int(e) for e in removed})
        own = list(module.parameters()) + list(module.buffers())
        self.expert_tensors = {id(t) for t in own if t.numel() == self.num_experts}

    def _masks(self, func, args) -> bool:
        if func is nn.functional.linear:
            return True
        return func in self._ADDS and any(
            id(a) in self.expert_tensors or id(getattr(a, "_base", None)) in self.expert_tensors
            for a in args if isinstance(a, torch.Tensor))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (self._masks(func, args) and isinstance(out, torch.Tensor) and out.is_floating_point()
                and out.dim() >= 1 and out.shape[-1] == self.num_experts):
            index = torch.tensor(self.removed, dtype=torch.long, device=out.device)
            out = out.index_fill(-1, index, float("-inf"))
        return out


@dataclass(frozen=True)
class RemovalEffect:
    """What masking one expert j does to `route_masked`'s routing of a token. Always: a token
    with j among its chosen experts is re-routed. The rest keep their experts, and

    * rescale False: their weights too (top-k then renormalised, or a weight that depends on
      the expert's own score only); rescale True: their weights are multiplied by
      Z / (Z - exp(l_j)), with l the router logits and Z the sum of exp(l) over the remaining
      experts (softmax over every remaining expert, not renormalised over the chosen);
    * groups > 1 (group-limited routing: `groups` contiguous groups, a group scored by the sum
      of its `group_top` best `choice` scores, the best `topk_group` groups eligible): a
      token for which j is among the `group_top` best of its group may also be re-routed.

    `choice` maps the logits to the scores the router ranks experts by (None: the logits, or
    any function increasing in them, such as a softmax). Ties are the caller's concern.

    `strength` (optional) maps the logits to per-expert values the chosen experts' weights are
    proportional to (`softmax_strength`, or a sigmoid), `renormalise` saying whether the
    chosen weights then sum to a constant (top-k renormalisation) or not (a softmax over
    every expert: rescale; or the expert's own score): with them, the weights after removing
    one chosen expert follow from the current weights without running the router."""

    rescale: bool = False
    groups: int = 1
    topk_group: int = 1
    group_top: int = 0
    choice: Callable[[torch.Tensor], torch.Tensor] | None = None
    strength: Callable[[torch.Tensor], torch.Tensor] | None = None
    renormalise: bool = False


def softmax_strength(logits: torch.Tensor) -> torch.Tensor:
    """RemovalEffect.strength of a softmax router: exp(logit), up to a factor per row."""
    return torch.softmax(logits.to(torch.float64), dim=-1)


class _RouterLogits(TorchFunctionMode):
    """While active, the output of the router's E-wide linear projection (the logits) is
    recorded in `logits`, or, when the mode is given logits, replaced by them."""

    def __init__(self, num_experts: int, logits: torch.Tensor | None = None):
        super().__init__()
        self.num_experts = int(num_experts)
        self.replace = logits is not None
        self.logits = logits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not nn.functional.linear:
            return func(*args, **kwargs)
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if self.replace and weight is not None and weight.shape[0] == self.num_experts:
            return self.logits
        out = func(*args, **kwargs)
        if not self.replace and self.logits is None and out.shape[-1] == self.num_experts:
            self.logits = out
        return out


class _MaskRows(_MaskRouterColumns):
    """_MaskRouterColumns with a removed set per row: `removed` [n, E] bool, applied by
    masked_fill (the same -inf at the same places as index_fill for that row's set)."""

    def __init__(self, module: nn.Module, num_experts: int, removed: torch.Tensor):
        super().__init__(module, num_experts, [])
        self.mask = removed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (self._masks(func, args) and isinstance(out, torch.Tensor) and out.is_floating_point()
                and out.shape == self.mask.shape):
            out = out.masked_fill(self.mask, float("-inf"))
        return out
