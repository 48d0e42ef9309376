"""Searching the kept set of one layer: the best known value of keeping n experts, for every n.

Because every objective is a sum over layers, a global plan is "a kept count per layer" plus
"the best kept set of that size in each layer". This module provides the second part:

* :func:`order_curve` - keep the most important experts; exactly optimal when the objective
  depends on the kept set only through importance (additive, curves);
* :func:`enumerate_curve` - all subsets, exactly optimal, wherever the work fits
  (:func:`enumerated_layers`: by the layer's size and the time limit, never above
  ``ENUMERATE_MAX`` experts);
* :func:`greedy_curve` + :func:`local_search` - removal greedy from the full layer, then
  best-improvement swaps; a heuristic, paired with proven per-count lower bounds;
* :func:`seed_curves` - the same swaps started from other plans' kept sets (other solvers, the
  rounded convex relaxation), each improving the curve at its count.

Every search is bounded by work (swaps), never by the clock, so it gives the same curves on a
busy machine.

Every search respects the layer's :class:`~solvers.constraints.LayerRule` (must-keep,
must-remove, equal counts per routing group).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

ENUMERATE_MAX = 20  # 2^20 subsets of a layer: the most the subset matrix may hold in memory
ENUMERATE_SECONDS = 2.5e-8  # per subset x N^2 x term, on the reference 2-core CPU (16 experts ~0.2 s)
ENUMERATE_SHARE = 0.25  # of the time limit that enumeration may take, by that estimate


@dataclass
class LayerCurve:
    counts: np.ndarray  # allowed kept counts, ascending
    value: np.ndarray  # best known objective of the layer at each count (inf: none found)
    bound: np.ndarray  # proven lower bound at each count
    masks: dict = field(default_factory=dict)  # count -> kept mask (bool (N,))
    exact: bool = False
    searched: set = field(default_factory=set)  # counts already improved by local search

    def at(self, n: int) -> int:
        return int(np.searchsorted(self.counts, n))

    def update(self, n: int, mask: np.ndarray, value: float) -> bool:
        i = self.at(n)
        if value < self.value[i] - 1e-12 * max(1.0, abs(value)):
            self.value[i] = value
            self.masks[n] = mask.copy()
            return True
        return False


# -- selection helpers ----------------------------------------------------------------------------
def _pick(deltas: np.ndarray, eligible: np.ndarray, importance: np.ndarray) -> int:
    """The eligible expert with the smallest delta; ties go to the least important, then lowest index."""
    d = np.where(eligible, deltas, np.inf)
    best = d.min() if d.size else np.inf
    if not np.isfinite(best):
        return -1
    tied = np.flatnonzero(d <= best + 1e-12 * max(1.0, abs(best)))
    return int(tied[np.argmin(importance[tied])]) if tied.size > 1 else int(tied[0])


def removable(mask: np.ndarray, rule) -> np.ndarray:
    ok = mask & ~rule.keep
    if rule.groups is not None:
        per = np.bincount(rule.groups[mask], minlength=rule.num_groups)
        biggest = per.max() if per.size else 0
        ok &= per[rule.groups] == biggest
    return ok


def addable(mask: np.ndarray, rule) -> np.ndarray:
    ok = ~mask & ~rule.remove
    if rule.groups is not None:
        per = np.bincount(rule.groups[mask], minlength=rule.num_groups)
        room = np.bincount(rule.groups[~rule.remove], minlength=rule.num_groups) > per
        smallest = per[room].min() if room.any() else -1
        ok &= (per[rule.groups] == smallest) & room[rule.groups]
    return ok


def _balanced(mask, rule) -> bool:
    if rule.groups is None:
        return True
    per = np.bincount(rule.groups[mask], minlength=rule.num_groups)
    return bool(np.all(per == per[0]))


def adjust(problem, p: int, mask: np.ndarray, target: int, state=None) -> np.ndarray:
    """Greedily move a layer's kept set to `target` experts that obey the layer's rule."""
    layer, rule = problem.layers[p], problem.layer_rules()[p]
    s = layer.importance
    mask = mask.copy()
    state = state or problem.objective.state(layer, mask)
    for e in np.flatnonzero(rule.keep & ~mask):
        state.add(int(e))
        mask[e] = True
    for e in np.flatnonzero(rule.remove & mask):
        state.remove(int(e))
        mask[e] = False
    for _ in range(4 * layer.num_experts + 4):
        n = int(mask.sum())
        if n > target or (n == target and not _balanced(mask, rule)):
            e = _pick(state.removal_deltas(), removable(mask, rule), s)
            if e < 0:
                break
            state.remove(e)
            mask[e] = False
        elif n < target:
            e = _pick(state.addition_deltas(), addable(mask, rule), -s)
            if e < 0:
                break
            state.add(e)
            mask[e] = True
        else:
            break
    return mask


def local_search(
    problem, p: int, mask: np.ndarray, deadline: float = np.inf, max_swaps: int | None = None
) -> tuple[np.ndarray, float]:
    """Best-improvement swaps (one kept out, one removed in) until none improves the layer."""
    layer, rule = problem.layers[p], problem.layer_rules()[p]
    objective = problem.objective
    mask = mask.copy()
    state = objective.state(layer, mask)
    value = objective.layer_value(layer, mask)
    swaps = 0
    limit = max_swaps if max_swaps is not None else 4 * layer.num_experts
    while swaps < limit and time.perf_counter() < deadline:
        out = np.flatnonzero(mask & ~rule.keep)
        into = np.flatnonzero(~mask & ~rule.remove)
        if out.size == 0 or into.size == 0:
            break
        delta = state.swap_deltas(out, into)
        if rule.groups is not None:
            delta = np.where(rule.groups[out][:, None] == rule.groups[into][None, :], delta, np.inf)
        i, j = np.unravel_index(int(np.argmin(delta)), delta.shape)
        if not delta[i, j] < -1e-10 * max(abs(value), 1e-12):
            break
        state.remove(int(out[i]))
        state.add(int(into[j]))
        mask[out[i]], mask[into[j]] = False, True
        value += float(delta[i, j])
        swaps += 1
    return mask, objective.layer_value(layer, mask)


# -- per-layer curves ---------------------------------------------------------------------------
def order_curve(problem, p: int, counts: np.ndarray) -> LayerCurve:
    """Keep the most important experts (must-keep first, equal per group): exact for order-exact objectives."""
    layer, rule = problem.layers[p], problem.layer_rules()[p]
    priority = np.where(rule.keep, np.inf, np.where(rule.remove, -np.inf, layer.importance))
    n_all = layer.num_experts
    if rule.groups is None:
        rank = np.empty(n_all, int)
        rank[np.argsort(-priority, kind="stable")] = np.arange(n_all)
        masks = rank[None, :] < counts[:, None]
    else:
        rank = np.empty(n_all, int)
        for label in range(rule.num_groups):
            members = np.flatnonzero(rule.groups == label)
            rank[members[np.argsort(-priority[members], kind="stable")]] = np.arange(members.size)
        masks = rank[None, :] < (counts // rule.num_groups)[:, None]
    values = problem.objective.layer_values(layer, masks)
    return LayerCurve(
        counts, values, values.copy(), {int(n): m for n, m in zip(counts, masks)}, exact=True
    )


def enumerate_curve(problem, p: int, counts: np.ndarray) -> LayerCurve:
    """Every subset of the layer: exact for any objective (layers of up to ENUMERATE_MAX experts)."""
    layer, rule = problem.layers[p], problem.layer_rules()[p]
    n_all = layer.num_experts
    subsets = ((np.arange(1 << n_all)[:, None] >> np.arange(n_all)[None, :]) & 1).astype(bool)
    ok = ~np.any(rule.keep & ~subsets, axis=1) & ~np.any(rule.remove & subsets, axis=1)
    if rule.groups is not None:
        per = np.stack(
            [subsets[:, rule.groups == g].sum(axis=1) for g in range(rule.num_groups)], axis=1
        )
        ok &= np.all(per == per[:, :1], axis=1)
    subsets = subsets[ok]
    size = subsets.sum(axis=1)
    keep = np.isin(size, counts)
    subsets, size = subsets[keep], size[keep]
    values = problem.objective.layer_values(layer, subsets)
    curve = LayerCurve(
        counts, np.full(counts.size, np.inf), np.full(counts.size, np.inf), exact=True
    )
    order = np.lexsort(
        (np.arange(values.size), values)
    )  # by value, then first subset: deterministic
    for i in order:
        n = int(size[i])
        j = curve.at(n)
        if not np.isfinite(curve.value[j]):
            curve.value[j] = values[i]
            curve.masks[n] = subsets[i].copy()
    curve.bound = curve.value.copy()
    return curve


def greedy_curve(problem, p: int, counts: np.ndarray) -> LayerCurve:
    """Removal greedy from the full layer down to the smallest allowed count; bounds from the terms."""
    layer, rule = problem.layers[p], problem.layer_rules()[p]
    objective = problem.objective
    curve = LayerCurve(
        counts,
        np.full(counts.size, np.inf),
        np.asarray(objective.lower_bounds(layer), float)[counts],
    )
    mask = ~rule.remove
    state = objective.state(layer, mask)
    wanted = set(counts.tolist())
    value = objective.layer_value(layer, mask)  # then tracked by the removal deltas
    while True:
        n = int(mask.sum())
        if n in wanted and rule.mask_ok(mask):
            curve.update(n, mask, value)
        if n <= counts[0]:
            break
        deltas = state.removal_deltas()
        e = _pick(deltas, removable(mask, rule), layer.importance)
        if e < 0:
            break
        value += float(deltas[e])
        state.remove(e)
        mask[e] = False
    for n in counts[
        ~np.isfinite(curve.value)
    ]:  # counts the path skipped (rules): reach them directly
        m = adjust(problem, p, ~rule.remove, int(n))
        if int(m.sum()) == n and rule.mask_ok(m):
            curve.update(int(n), m, objective.layer_value(layer, m))
    return curve


def enumeration_seconds(layer, terms: int) -> float:
    """Estimated seconds to enumerate every subset of a layer (a size model, not a clock)."""
    n = layer.num_experts
    return ENUMERATE_SECONDS * (2.0**n) * n * n * max(terms, 1)


def enumerated_layers(problem, time_limit: float) -> set[int]:
    """Positions of the layers to enumerate: the cheapest first, while the estimated total fits
    ENUMERATE_SHARE of the time limit. Chosen from sizes and the limit only: deterministic."""
    if problem.objective.order_exact:
        return set()
    terms = len(problem.objective.terms)
    cost = [
        (enumeration_seconds(layer, terms), p)
        for p, layer in enumerate(problem.layers)
        if layer.num_experts <= ENUMERATE_MAX
    ]
    chosen, total = set(), 0.0
    for seconds, p in sorted(cost):
        if total + seconds > ENUMERATE_SHARE * time_limit:
            break
        chosen.add(p)
        total += seconds
    return chosen


def build_curves(problem, time_limit: float = 60.0) -> list[LayerCurve]:
    """Per-layer curves over the allowed counts: exact where the objective or the size allows."""
    curves = []
    enumerate_these = enumerated_layers(problem, time_limit)
    for p, allowed in enumerate(problem.allowed_counts()):
        counts = np.flatnonzero(allowed)
        if problem.objective.order_exact:
            curves.append(order_curve(problem, p, counts))
        elif p in enumerate_these:
            curves.append(enumerate_curve(problem, p, counts))
        else:
            curves.append(greedy_curve(problem, p, counts))
    return curves


def seed_curves(
    problem, curves: list[LayerCurve], plans, around: np.ndarray | None = None, width: int = 0
) -> bool:
    """Swap local search from every layer's kept set in each plan (lists of per-layer masks);
    True if any curve improved. Sets of a count the layer does not allow are skipped, and with
    `around`, sets more than `width` allowed counts away from `around[p]` (they would not be
    chosen)."""
    rules = problem.layer_rules()
    changed = False
    for masks in plans:
        for p, (curve, mask) in enumerate(zip(curves, masks)):
            n = int(mask.sum())
            if curve.exact or not np.isin(n, curve.counts):
                continue
            if around is not None and abs(curve.at(n) - curve.at(int(around[p]))) > width:
                continue
            if not rules[p].mask_ok(mask):
                continue
            better, value = local_search(problem, p, mask)
            changed |= curve.update(n, better, value)
    return changed


def round_point(problem, p: int, point: np.ndarray, n: int) -> np.ndarray:
    """A kept set of size n from a relaxed keep vector: the largest entries (ties: the more
    important, then the lower index), moved onto the layer's rule by the objective's deltas."""
    layer = problem.layers[p]
    order = np.lexsort((np.arange(layer.num_experts), -layer.importance, -np.round(point, 9)))
    mask = np.zeros(layer.num_experts, bool)
    mask[order[:n]] = True
    if not problem.layer_rules()[p].mask_ok(mask):
        mask = adjust(problem, p, mask, n)
    return mask


def improve_curves(
    problem, curves: list[LayerCurve], around: np.ndarray, width: int, deadline: float = np.inf
) -> bool:
    """Local search at the `width` allowed counts on either side of `around[p]`; True if any
    improved. Bounded by work (each count searched once); `deadline` is only a safety net."""
    changed = False
    for p, curve in enumerate(curves):
        if curve.exact:
            continue
        centre = curve.at(int(around[p]))
        for i in range(max(0, centre - width), min(curve.counts.size, centre + width + 1)):
            if time.perf_counter() > deadline:
                return changed
            n = int(curve.counts[i])
            if n not in curve.masks or n in curve.searched:
                continue
            mask, value = local_search(problem, p, curve.masks[n])
            curve.searched.add(n)
            changed |= curve.update(n, mask, value)
    return changed


def search_seconds(problem, counts_per_layer: int) -> float:
    """Rough seconds of one local search at `counts_per_layer` counts of every layer (a size
    model: swaps x the |kept| x |removed| delta matrix)."""
    return 5e-11 * counts_per_layer * sum(layer.num_experts**3 for layer in problem.layers)
