"""Turning a heuristic's tentative plan into a feasible one, changing as little as possible.

Heuristics (greedy, GRAPE's Algorithm 1, uniform, relaxation rounding) respect the budget, the
per-layer floors and the layer rules on their own. Whatever they cannot see (multiples,
uniformity, the entropy guard, memory caps) is repaired here, in up to three steps:

1. counts: the allowed kept counts nearest (L1) to the tentative ones under every count-level
   constraint, by a small integer program over the count indicators;
2. layers: each layer whose count or rule is off is moved greedily to its new count, by the
   objective's own marginal values (:func:`solvers.layer_search.adjust`);
3. experts: if a constraint on *which* experts (an expert-parallel memory cap, a byte budget with
   unequal experts) still fails, an expert-level program keeps as many tentative decisions as
   it can, preferring to keep important experts.
"""

from __future__ import annotations

import numpy as np

from solvers.constraints.precheck import conflict_message as _conflict_message
from solvers.errors import InfeasibleError, SolverError
from solvers.formulation import Formulation
from solvers.layer_search import adjust


def count_violations(problem, counts: np.ndarray) -> list[str]:
    out = []
    for p, allowed in enumerate(problem.allowed_counts()):
        if not allowed[counts[p]]:
            out.append(f"layer {problem.layers[p].index}: count {counts[p]} is not allowed")
    for c in problem.all_constraints:
        out.extend(c.count_violations(problem, counts))
    return out


def nearest_feasible_counts(problem, counts: np.ndarray, time_limit: float = 30.0) -> np.ndarray:
    form = Formulation(problem, "count", objective=False, skip_expert_constraints=True)
    for p in range(len(problem.layers)):
        # L1 distance, ties broken towards keeping more (the safer side for quality)
        dist = np.abs(form.counts[p] - counts[p]).astype(float)
        form.mip.add_cost(form.y[p], dist - 1e-3 * (form.counts[p] > counts[p]))
    res = form.mip.solve(time_limit)
    if res.status == "infeasible":
        raise InfeasibleError(_conflict_message(problem))
    if res.x is None:
        raise SolverError(
            f"could not repair the kept counts within {time_limit:.0f} s; use --solver exact"
        )
    return form.kept_counts(res.x)


def expert_violations(problem, masks) -> list[str]:
    from solvers.plan import Plan

    plan = Plan(
        kept={layer.index: np.flatnonzero(m).tolist() for layer, m in zip(problem.layers, masks)},
        removed={
            layer.index: np.flatnonzero(~m).tolist() for layer, m in zip(problem.layers, masks)
        },
    )
    out = []
    for c in problem.all_constraints:
        out.extend(c.check(plan, problem))
    return out


def repair_experts(problem, masks, time_limit: float = 30.0) -> list[np.ndarray]:
    form = Formulation(problem, "expert", objective=False)
    for p, layer in enumerate(problem.layers):
        s = layer.importance
        tie = 1e-3 * s / max(float(s.max()), 1e-30)
        # cost of x = 1: -1 for a tentatively kept expert (keep it), +1 otherwise (don't add it)
        form.mip.add_cost(form.x[p], np.where(masks[p], -1.0, 1.0) - tie)
    res = form.mip.solve(time_limit)
    if res.status == "infeasible":
        raise InfeasibleError(_conflict_message(problem))
    if res.x is None:
        raise SolverError(
            f"could not repair the plan within {time_limit:.0f} s; use --solver exact"
        )
    return form.kept_masks(res.x)


def finalize(problem, masks: list[np.ndarray], info: dict | None = None) -> list[np.ndarray]:
    """A feasible plan close to `masks`; records what was repaired in `info['repaired']`."""
    masks = [m.copy() for m in masks]
    counts = np.array([int(m.sum()) for m in masks])
    rules = problem.layer_rules()
    repaired = []
    bad_counts = count_violations(problem, counts)
    if bad_counts:
        repaired.append(f"counts ({bad_counts[0]}{'...' if len(bad_counts) > 1 else ''})")
        counts = nearest_feasible_counts(problem, counts)
    for p, mask in enumerate(masks):
        if int(mask.sum()) != counts[p] or not rules[p].mask_ok(mask):
            masks[p] = adjust(problem, p, mask, int(counts[p]))
    remaining = expert_violations(problem, masks)
    if remaining:
        repaired.append(f"experts ({remaining[0]})")
        masks = repair_experts(problem, masks)
        left = expert_violations(problem, masks)
        if left:
            raise SolverError(f"repair left violations: {left[:3]}")
    if info is not None and repaired:
        info["repaired"] = repaired
    return masks
