"""Measured per-layer sensitivity: what removing experts from one layer does to the model's loss.

The calibration's layer curves measure the error of one MoE block's *output*; what a user cares
about is the model's next-token loss, and the two disagree across layers (an error early in the
network is amplified or washed out by the layers after it). This module measures the real thing:
each layer alone keeps n experts (its criterion's top n, the others routed around with the
router masked, weights untouched), one forward pass over held-out tokens per (layer, n), and
the NLL increase against the unpruned model. The points are interpolated into a curve per layer
(``nll_curve[n]``), stored in the scores file, and the `curves` objective prefers them
(``--curves auto``), so an integer program can allocate on measured costs without the model.

    curves = measure_nll_curves(model, scores, ids, criterion="reap_mass")
    scores = with_nll_curves(scores, curves)        # save it; `grape solve --objective curves`
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from grape.models.adapters import get_adapter
from solvers.spec import SolveConfig
from grape.errors import DataError
from grape.templates.grape_pruning import install_router_mask
from solvers.errors import UserError
from solvers.plan import Plan

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75)  # removed per layer: kept 75%, 50%, 25% of its experts


# -- measuring ----------------------------------------------------------------------------------
@contextlib.contextmanager
def masked(model: nn.Module, plan: Plan):
    """The model routing only among the plan's kept experts (weights untouched), for the block."""
    adapter = get_adapter(model)
    routers = []
    try:
        for layer in plan.layers:
            router = adapter.router(layer)
            if hasattr(router, "_grape_keep"):
                raise DataError("the model's routers are already masked; measure an unmasked model")
            install_router_mask(router, plan.kept[layer], min(int(router.top_k), len(plan.kept[layer])))
            routers.append(router)
        yield model
    finally:
        for router in routers:
            for name in ("forward", "_grape_keep", "_grape_top_k"):
                router.__dict__.pop(name, None)


@torch.no_grad()
def sequence_nll(model: nn.Module, ids: torch.Tensor, batch_size: int) -> np.ndarray:
    """Mean next-token NLL (nats) of each row of `ids` (samples, seq_len)."""
    device = model.get_input_embeddings().weight.device
    out = []
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        out.append(loss.mean(dim=1).cpu().double().numpy())
    return np.concatenate(out)


def mean_nll(model: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL (nats) over every predicted position of `ids` (equal-length rows)."""
    return float(sequence_nll(model, ids, batch_size).mean())


# -- curves -------------------------------------------------------------------------------------
@dataclass
class NllCurves:
    """Per-layer measured curves and the measurements behind them."""

    curves: dict[int, np.ndarray]  # layer -> (N+1,) NLL increase keeping n experts
    criterion: str
    fractions: tuple[float, ...]
    tokens: int  # tokens per measurement
    passes: int
    points: list[dict] = field(default_factory=list)  # {"layer", "kept", "nll_increase"}

    def to_json(self) -> dict:
        return {"criterion": self.criterion, "fractions": list(self.fractions), "tokens": self.tokens,
                "passes": self.passes, "points": self.points}


def interpolate_curve(points: dict[int, float], n: int) -> np.ndarray:
    """(n+1,) values through `points` (kept count -> cost): linear in between, made
    non-increasing in the kept count (keeping more never costs more). Counts below the smallest
    measured one are not extrapolated: they get a prohibitive price (twice the largest measured
    cost plus one nat), so a solver goes there only when the budget forces it."""
    xs = np.array(sorted(points), dtype=float)
    ys = np.array([points[int(x)] for x in xs])
    grid = np.arange(n + 1, dtype=float)
    curve = np.interp(grid, xs, ys)
    curve[grid < xs[0]] = 2.0 * max(float(ys.max()), 0.0) + 1.0
    return np.maximum.accumulate(curve[::-1])[::-1]


def single_layer_plan(plan: Plan, layer: int) -> Plan:
    """`plan` restricted to one layer: every other layer keeps all its experts."""
    return Plan(kept={i: plan.kept[i] if i == layer else sorted(plan.kept[i] + plan.removed[i])
                      for i in plan.layers},
                removed={i: plan.removed[i] if i == layer else [] for i in plan.layers},
                solver="single-layer", model=plan.model)


def uniform_plan(scores, fraction: float, criterion: str, config: SolveConfig | None = None) -> Plan:
    """The uniform plan removing `fraction` of every layer by `criterion`, under the structural
    count rules of `config` (minimum kept, routing groups, multiples) and nothing else."""
    from solvers.spec import plan_for

    base = config or SolveConfig()
    cfg = SolveConfig(budget=fraction, solver="uniform", objective="additive", criterion=criterion,
                      min_kept=base.min_kept, routing_groups=base.routing_groups,
                      multiple_of=base.multiple_of)
    return plan_for(scores, cfg)


def measure_nll_curves(model: nn.Module, scores, ids: torch.Tensor, criterion: str = "reap_mass",
                       fractions: Sequence[float] = DEFAULT_FRACTIONS, config: SolveConfig | None = None,
                       batch_size: int = 8, unpruned: np.ndarray | None = None,
                       measure: Callable[[str, Plan], np.ndarray] | None = None) -> NllCurves:
    """Each MoE layer alone keeps the top experts of `criterion` at each removed fraction (the
    uniform plan's choice in that layer); one forward pass over `ids` each. `unpruned`: the
    unpruned model's per-sequence NLL if already measured; `measure(name, plan)`: how a plan is
    measured (the search passes its own, which counts and caches passes)."""
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise DataError("NLL curves need a (samples, seq_len >= 2) tensor of held-out input ids")

    def default_measure(name: str, plan: Plan) -> np.ndarray:
        with masked(model, plan):
            return sequence_nll(model, ids, batch_size)

    measure = measure or default_measure
    passes = 0
    if unpruned is None:
        unpruned = sequence_nll(model, ids, batch_size)
        passes += 1
    base = float(np.mean(unpruned))
    points: dict[int, dict[int, float]] = {}
    records = []
    for fraction in fractions:
        try:
            plan = uniform_plan(scores, fraction, criterion, config)
        except UserError:  # e.g. routing groups forbid that many removals: no point there
            continue
        for layer in plan.layers:
            if not plan.removed[layer]:
                continue
            kept = len(plan.kept[layer])
            if kept in points.get(layer, {}):
                continue
            nll = float(np.mean(measure(f"layer {layer} alone keeps {kept}", single_layer_plan(plan, layer))))
            passes += 1
            points.setdefault(layer, {})[kept] = nll - base
            records.append({"layer": layer, "kept": kept, "nll_increase": nll - base})
    curves = {layer: interpolate_curve({n: 0.0, **points.get(layer, {})}, n)
              for layer, n in scores.model.experts_per_layer.items()}
    return NllCurves(curves, criterion, tuple(float(f) for f in fractions), int(ids.numel()), passes, records)


def with_nll_curves(scores, curves: NllCurves | dict[int, np.ndarray]):
    """A copy of `scores` whose layers carry the measured curves; given NllCurves, the
    calibration record also says how they were measured."""
    per_layer = curves.curves if isinstance(curves, NllCurves) else curves
    out = copy.copy(scores)
    out.layers = {i: replace(ls, nll_curve=np.asarray(per_layer[i], dtype=np.float64))
                  for i, ls in scores.layers.items()}
    if isinstance(curves, NllCurves):
        out.calibration = {**scores.calibration, "nll_curves": curves.to_json()}
    return out


def nll_curve_passes(scores, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> int:
    """Forward passes `measure_nll_curves` needs at most (one per layer and fraction)."""
    return len(scores.model.experts_per_layer) * len(fractions)


__all__ = ["DEFAULT_FRACTIONS", "NllCurves", "interpolate_curve", "masked", "mean_nll", "measure_nll_curves",
           "nll_curve_passes", "sequence_nll", "single_layer_plan", "uniform_plan", "with_nll_curves"]
