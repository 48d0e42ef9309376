"""Turn a plan into a smaller model: one config object and one verb.

    model = apply_plan(model, plan, method="remove")            # slice experts out
    model = apply_plan(model, plan, ApplyConfig("merge", merge_weights=scores))
    model = apply_plan(model, plan, method="mask")              # weights kept, never routed

* ``remove``: slices each layer's expert parameters, router rows, router bias and
  ``e_score_correction_bias`` to the kept experts (original order), and updates
  ``num_experts`` and ``top_k = min(top_k, kept)`` on router, experts and block. The routing
  is then exactly the original model's with the removed experts' router logits at -inf.
* ``merge``: first folds each removed expert into the kept expert the plan's ``merge_map``
  names (a frequency-weighted average of their weights; the kept expert's router row stays),
  then removes. Without a merge map, each removed expert goes to the kept expert whose
  weights are most similar (cosine), and a warning says so.
* ``mask``: no weight changes; each router routes only among the kept experts. Useful to
  evaluate a plan without reshaping; it cannot be saved as a smaller checkpoint.

Everything is validated before the model is touched: plan layers and expert counts against
the model, the plan's model identity (type, expert counts, router fingerprint) if recorded,
and family routing rules (DeepSeek groups).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from grape.models.adapters import MoEAdapter, get_adapter
from grape.errors import PlanError, ScoresError
from grape.flags import flag
from grape.models.shards import DEFAULT_MAX_SHARD_SIZE
from solvers.plan import Plan
from solvers.scores import ModelIdentity, Scores

logger = logging.getLogger("grape.pruning.apply")

# per MoE layer, one non-negative weight per expert (original numbering), e.g. token counts
MergeWeights = Scores | Mapping[int, Sequence[float]]

# attribute set on the model after a plan is applied, so save_pruned can record it
APPLIED_PLAN_ATTR = "grape_applied_plan"
APPLIED_METHOD_ATTR = "grape_applied_method"


APPLY_MODES = ("auto", "streaming", "in-memory")
# repair of the kept experts (closed form) or router rows (a short local re-fit) after removal
# (grape.pruning.repair, docs/repair.md)
REPAIR_METHODS = ("none", "scale", "lstsq", "router", "lstsq+router", "lstsq+experts")
# `auto` (grape run's default): AUTO_REPAIR where it can run, else none, with a line saying why
# (grape.pruning.repair.resolve_repair). lstsq+experts: the closed-form fit, then a short local
# re-fit of the kept experts; measured on the plans grape run chose on the zoo (docs/repair.md)
AUTO_REPAIR = "lstsq+experts"
# ... except layer by layer from the shards: the experts re-fit holds a layer's kept experts in
# float32 four times over (weights, gradients, Adam's moments), past the sequential calibration's
# memory (2.5 GB against 1.6 GB for lstsq on the 1.7 GB random checkpoint, docs/repair.md)
AUTO_REPAIR_LAYERWISE = "lstsq"
REPAIR_CHOICES = ("auto", *REPAIR_METHODS)


@dataclass(frozen=True)
class ApplyConfig:
    """How to apply a plan.

    method: ``remove`` | ``merge`` | ``mask``.
    merge_weights: for ``merge``, the weight of each expert in the average: a Scores object
        (its token counts are used) or ``{layer: [w_0, ..., w_{N-1}]}``. None: equal weights.
    allow_lower_top_k: accept a plan that keeps fewer experts than top_k in some layer, whose
        top_k then drops to the kept count (a different routing); refused by default.
    repair (+ repair_data / repair_samples / repair_seq_len): re-fit the kept experts after
        removal on calibration text (grape.pruning.repair.prune_and_repair; ``apply_plan`` itself refuses
        a repair, having no tokens).
    """

    # the flagged fields are also flags of `grape apply` and `grape run` (grape/flags.py)
    method: str = field(default="remove", metadata=flag(
        "remove: slice experts out; merge: fold removed experts into kept ones (weighted by "
        "calibration counts), then remove; mask: keep weights, the router never selects them",
        choices=("remove", "merge", "mask")))
    merge_weights: MergeWeights | None = None
    allow_lower_top_k: bool = field(default=False, metadata=flag(
        "accept a plan keeping fewer experts than top_k in a layer (top_k there drops to the kept "
        "count); refused by default"))
    # runtime: how a checkpoint is written (grape.pruning.stage), never which weights it holds
    mode: str = field(default="auto", metadata=flag(
        "writing a checkpoint: 'streaming' slices the safetensors shard by shard (memory stays "
        "flat; remove and mask, with a repair one decoder layer at a time; merge always loads "
        "the model); 'in-memory' loads the whole model and saves it; 'auto': streaming where it "
        "can, and with a repair in memory when the model fits (--in-memory is short for "
        "'in-memory')", choices=APPLY_MODES))
    max_shard_size: str = field(default=DEFAULT_MAX_SHARD_SIZE, metadata=flag(
        "largest output shard when streaming (e.g. 5GB, 200MB; transformers' default); a single "
        "larger tensor gets a shard of its own"))
    # repair (grape.pruning.repair): re-fit the kept experts on calibration text after removal
    repair: str = field(default="none", metadata=flag(
        "after removal, re-fit each pruned layer's kept experts toward the original layer's output "
        "on calibration text (docs/repair.md): scale: one output scale per kept expert; lstsq: "
        "ridge least squares of each kept expert's down projection; router: a short local re-fit "
        "(Adam) of the kept router rows; lstsq+router: lstsq, then the router re-fit; none: plain "
        "removal; lstsq+experts: lstsq, then a short local re-fit (Adam) of every kept-expert tensor; "
        "auto (grape run's default): lstsq+experts where it can run (method remove, calibration "
        "text, unquantised experts), else none; kept only if it lowers the NLL of held-out "
        "documents (grape run: its confirmation documents; grape apply in memory: documents held "
        "out of --repair-data)",
        choices=REPAIR_CHOICES))
    repair_data: tuple[str, ...] = field(default=(), metadata=flag(
        "calibration text the repair fits on (files or directories, as `grape calibrate --data`); "
        "`grape run` uses its --data when not given", nargs="+", metavar="PATH"))
    # 128 x 256 tokens: on the zoo's OLMoE at 50% a quarter of that left lstsq at 0.87x of plain
    # removal's NLL increase, 128 rows at 0.72x, 384 at 0.70x (validation split, docs/repair.md)
    repair_samples: int = field(default=128, metadata=flag("packed sequences the repair fits on"))
    repair_seq_len: int = field(default=256, metadata=flag(
        "tokens per repair sequence (capped at the model's context)"))
    # the router re-fit (--repair router / lstsq+router); None: grape.pruning.repair_router's defaults
    repair_router_steps: int | None = field(default=None, metadata=flag(
        "Adam steps per pruned layer of the router re-fit (unset: 300)", type=int))
    repair_router_lr: float | None = field(default=None, metadata=flag(
        "the router re-fit's step size: the largest logit change of a step, relative to the logits' "
        "spread (unset: 0.1)", type=float))
    # the experts re-fit (--repair lstsq+experts); None: grape.pruning.repair_experts's defaults
    repair_experts_steps: int | None = field(default=None, metadata=flag(
        "Adam steps per pruned layer of the experts re-fit, at most (unset: 200; never more than "
        "6.25 passes over the repair's tokens)", type=int))
    repair_experts_lr: float | None = field(default=None, metadata=flag(
        "the experts re-fit's step size, relative to each tensor's RMS value (unset: 0.015)", type=float))

    def __post_init__(self) -> None:
        from grape.models.shards import parse_size

        if self.method not in METHODS:
            raise PlanError(f"unknown apply method {self.method!r}; choose one of {sorted(METHODS)}")
        if self.mode not in APPLY_MODES:
            raise PlanError(f"unknown apply mode {self.mode!r}; choose one of {', '.join(APPLY_MODES)}")
        parse_size(self.max_shard_size)  # a malformed size fails before any weight is read
        if self.repair not in REPAIR_CHOICES:
            raise PlanError(f"unknown repair {self.repair!r}; choose one of {', '.join(REPAIR_CHOICES)}")
        if self.repair not in ("none", "auto") and self.method != "remove":
            raise PlanError(f"--repair {self.repair} re-fits the experts --method remove keeps; it "
                            f"does not combine with --method {self.method} (use --repair none)")
        if (self.repair_router_steps is not None and self.repair_router_steps < 0) or (
                self.repair_router_lr is not None and not 0 < self.repair_router_lr < float("inf")):
            raise PlanError(f"--repair-router-steps ({self.repair_router_steps}) must be at least 0 and "
                            f"--repair-router-lr ({self.repair_router_lr}) a finite number > 0")
        if (self.repair_experts_steps is not None and self.repair_experts_steps < 0) or (
                self.repair_experts_lr is not None and not 0 < self.repair_experts_lr < float("inf")):
            raise PlanError(f"--repair-experts-steps ({self.repair_experts_steps}) must be at least 0 and "
                            f"--repair-experts-lr ({self.repair_experts_lr}) a finite number > 0")
        if self.repair_samples < 1 or self.repair_seq_len < 2:
            raise PlanError(f"--repair-samples ({self.repair_samples}) must be at least 1 and "
                            f"--repair-seq-len ({self.repair_seq_len}) at least 2")


def apply_plan(
    model: nn.Module,
    plan: Plan,
    method: str | ApplyConfig = "remove",
    merge_weights: MergeWeights | None = None,
) -> nn.Module:
    """Apply `plan` to `model` in place and return it (see the module docstring)."""
    config = method if isinstance(method, ApplyConfig) else ApplyConfig(method, merge_weights)
    if config.repair not in ("none", "auto"):  # auto: a repair where it can run; without tokens none can
        raise PlanError(f"repair {config.repair!r} needs calibration tokens: call "
                        "grape.pruning.repair.prune_and_repair(model, plan, config, input_ids) instead")
    adapter = get_adapter(model)
    validate_plan(adapter, plan, allow_lower_top_k=config.allow_lower_top_k)
    METHODS[config.method](adapter, plan, config)
    setattr(model, APPLIED_PLAN_ATTR, plan)
    setattr(model, APPLIED_METHOD_ATTR, config.method)
    return model


# -- validation -----------------------------------------------------------------------------
def validate_plan(adapter: MoEAdapter, plan: Plan, allow_lower_top_k: bool = False) -> None:
    """Raise PlanError / ArchitectureError if `plan` cannot apply to the adapter's model."""
    identity = adapter.identity()
    moe_layers = identity.moe_layers
    if plan.layers != moe_layers:
        raise PlanError(
            f"the plan covers layers {plan.layers} but this {identity.model_type} model has MoE "
            f"layers {moe_layers}; was the plan made for another model, or already applied?"
        )
    for layer in moe_layers:
        n = identity.experts_per_layer[layer]
        listed = sorted(plan.kept[layer] + plan.removed[layer])
        if listed != list(range(n)):
            raise PlanError(
                f"layer {layer}: the plan's kept + removed experts must be exactly 0..{n - 1} (this "
                f"model has {n} experts there); they are {listed}. Was the plan made for another "
                "model, or is the model already pruned?"
            )
        if not plan.kept[layer]:
            raise PlanError(f"layer {layer}: the plan keeps no expert; every MoE layer needs at least one")
    if plan.model:
        _check_plan_identity(plan.model, identity)
    if not allow_lower_top_k:
        check_top_k(plan, identity.top_k)
    adapter.check_kept(plan.kept)


def check_top_k(plan: Plan, top_k: dict[int, int]) -> None:
    """Refuse a plan that would silently lower a layer's top_k (see ApplyConfig)."""
    below = plan.below_top_k(top_k)
    if below:
        layer, (kept, k) = next(iter(sorted(below.items())))
        raise PlanError(
            f"the plan keeps fewer experts than top_k in {len(below)} layer(s) (layer {layer}: "
            f"{kept} kept, top_k {k}); applying it would lower top_k there to the kept count. "
            "Pass --allow-lower-top-k (ApplyConfig(allow_lower_top_k=True)) to accept that, or "
            "re-solve with --min-kept top_k")


def _check_plan_identity(recorded: dict, identity: ModelIdentity) -> None:
    try:
        planned = ModelIdentity.from_json(recorded)
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"the plan's `model` entry is not a model identity ({exc}); fix or remove it") from exc
    try:
        planned.check_matches(identity, what="plan")
    except ScoresError as exc:
        raise PlanError(str(exc).replace("Re-run `grape calibrate` on this model.",
                                         "Make the plan from scores measured on this model.")) from exc


# -- methods ----------------------------------------------------------------------------------
def _remove(adapter: MoEAdapter, plan: Plan, config: ApplyConfig) -> None:
    for layer in plan.layers:
        if plan.removed[layer]:
            adapter.keep_experts(layer, plan.kept[layer])
    sync = getattr(adapter, "sync_config", None)
    if sync is not None:
        sync()


def _mask(adapter: MoEAdapter, plan: Plan, config: ApplyConfig) -> None:
    for layer in plan.layers:
        if plan.removed[layer]:
            adapter.mask_experts(layer, plan.removed[layer])


def _merge(adapter: MoEAdapter, plan: Plan, config: ApplyConfig) -> None:
    weights = _merge_weights(adapter, config.merge_weights)
    merge_map = resolve_merge_map(adapter, plan)
    for layer in plan.layers:
        groups: dict[int, list[int]] = {}
        for removed, target in sorted(merge_map.get(layer, {}).items()):
            groups.setdefault(target, []).append(removed)
        if groups:
            equal = {e: 1.0 for e in range(adapter.num_experts(layer))}
            layer_weights = weights[layer] if weights is not None else equal
            adapter.merge_experts(layer, groups, layer_weights)
    _remove(adapter, plan, config)


METHODS: dict[str, Callable[[MoEAdapter, Plan, ApplyConfig], None]] = {
    "remove": _remove,
    "merge": _merge,
    "mask": _mask,
}


# -- merge helpers ----------------------------------------------------------------------------
def resolve_merge_map(adapter: MoEAdapter, plan: Plan) -> dict[int, dict[int, int]]:
    """The plan's merge map, checked; removed experts it does not place go to the kept expert
    with the most similar weights (cosine of the flattened parameters), with a warning."""
    out: dict[int, dict[int, int]] = {}
    unplaced_layers = []
    for layer in plan.layers:
        kept, removed = set(plan.kept[layer]), set(plan.removed[layer])
        given = plan.merge_map.get(layer, {})
        for source, target in given.items():
            if source not in removed or target not in kept:
                raise PlanError(
                    f"layer {layer}: merge_map sends expert {source} to {target}, but a merge map "
                    "must send a removed expert to a kept expert of the same layer"
                )
        mapping = dict(given)
        missing = sorted(removed - set(given))
        if missing:
            unplaced_layers.append(layer)
            mapping.update(_nearest_by_weights(adapter, layer, missing, sorted(kept)))
        out[layer] = mapping
    if unplaced_layers:
        logger.warning(
            "the plan has no merge map for layers %s: each removed expert there is merged into the "
            "kept expert with the most similar weights (cosine)", unplaced_layers,
        )
    return out


def _nearest_by_weights(adapter: MoEAdapter, layer: int, removed: list[int], kept: list[int]) -> dict[int, int]:
    cosine = adapter.expert_weight_cosine(layer)[removed][:, kept]
    best = cosine.argmax(dim=1).tolist()
    return {source: kept[i] for source, i in zip(removed, best)}


def _merge_weights(adapter: MoEAdapter, source: MergeWeights | None) -> dict[int, dict[int, float]] | None:
    if source is None:
        logger.warning("merge without frequencies: merged experts are averaged with equal weights")
        return None
    if isinstance(source, Scores):
        source.model.check_matches(adapter.identity(), what="scores")
        source = {layer: s.stats["count"] for layer, s in source.layers.items()}
    out = {}
    for layer in sorted(adapter.moe_blocks()):
        n = adapter.num_experts(layer)
        if layer not in source:
            raise PlanError(f"merge weights are missing layer {layer}")
        values = [float(v) for v in torch.as_tensor(source[layer], dtype=torch.float64).flatten().tolist()]
        if len(values) != n:
            raise PlanError(f"merge weights for layer {layer} have {len(values)} entries; the layer has {n} experts")
        out[layer] = dict(enumerate(values))
    return out
