"""Dynamic programming over layers for count-separable problems (the layer-curves knapsack).

State: the number of experts kept so far; each layer adds one allowed count n at cost
``curve_l(n)``. Exact when the per-layer curves are exact (additive, curves, small layers); for
redundancy or coverage on larger layers it optimises the heuristic curves and reports the bound
of the same program on the per-count lower bounds. It handles the per-layer constraints, a count
budget (or a byte budget when every expert has the same size) and ``uniform``; anything else
raises a SolverError that points to ``--solver exact``.
"""

from __future__ import annotations

import numpy as np

from solvers.constraints import (
    Budget,
    MaxRemovedFraction,
    MinKept,
    MultipleOf,
    MustKeep,
    MustRemove,
    RoutingGroups,
    Uniform,
)
from solvers.errors import SolverError
from solvers.layer_search import build_curves
from solvers.registry import Outcome, Solver, register_solver

PER_LAYER = (MinKept, MaxRemovedFraction, MultipleOf, MustKeep, MustRemove, RoutingGroups)


def knapsack(costs: list[np.ndarray], counts: list[np.ndarray], lo_total: int, hi_total: int):
    """min sum_l costs[l][i_l] with lo_total <= sum counts[l][i_l] <= hi_total; (value, choice indices)."""
    top = int(min(hi_total, sum(int(c.max()) for c in counts)))
    best = np.full(top + 1, np.inf)
    best[0] = 0.0
    choices = []
    for cost, cnt in zip(costs, counts):
        new = np.full(top + 1, np.inf)
        pick = np.full(top + 1, -1, dtype=np.int32)
        for i, (n, c) in enumerate(zip(cnt.tolist(), cost.tolist())):
            if not np.isfinite(c) or n > top:
                continue
            cand = best[: top + 1 - n] + c
            better = cand < new[n:]
            new[n:][better] = cand[better]
            pick[n:][better] = i
        best = new
        choices.append(pick)
    window = best[lo_total : top + 1] if lo_total <= top else np.array([])
    if window.size == 0 or not np.isfinite(window).any():
        return np.inf, None
    total = lo_total + int(np.argmin(window))
    value = float(best[total])
    picks = []
    for cnt, pick in zip(reversed(counts), reversed(choices)):
        i = int(pick[total])
        picks.append(i)
        total -= int(cnt[i])
    return value, picks[::-1]


@register_solver
class DPSolver(Solver):
    name = "dp"
    guarantee = (
        "exact dynamic program over per-layer curves: optimal when the curves are exact "
        "(additive, curves, layers <= 12 experts); otherwise heuristic curves with a bound"
    )

    def _total_range(self, problem) -> tuple[int, int]:
        k = problem.budget.kept_total(problem)
        if k is not None:
            return k, k
        sizes = {int(b) for layer in problem.layers for b in np.unique(layer.expert_bytes)}
        if len(sizes) != 1:
            raise SolverError(
                "dp handles a byte budget only when every expert has the same size; "
                "use --solver exact"
            )
        return 0, int(problem.budget.kept_bytes_cap(problem) // sizes.pop())

    def run(self, problem) -> Outcome:
        unsupported = [
            c.describe(problem)
            for c in problem.constraints
            if not isinstance(c, PER_LAYER + (Uniform, Budget))
        ]
        if unsupported:
            raise SolverError(f"dp does not handle {', '.join(unsupported)}; use --solver exact")
        lo, hi = self._total_range(problem)
        curves = build_curves(problem)
        uniform = any(isinstance(c, Uniform) for c in problem.constraints)

        def best_of(attr):
            costs = [getattr(c, attr) for c in curves]
            counts = [c.counts for c in curves]
            if not uniform:
                return knapsack(costs, counts, lo, hi)
            best = (np.inf, None)  # uniform: try every count allowed in all layers
            common = set(counts[0].tolist()).intersection(*[set(c.tolist()) for c in counts[1:]])
            for n in sorted(common):
                if lo <= n * len(curves) <= hi:
                    idx = [int(np.searchsorted(c, n)) for c in counts]
                    value = float(sum(cost[i] for cost, i in zip(costs, idx)))
                    if value < best[0]:
                        best = (value, idx)
            return best

        value, picks = best_of("value")
        if picks is None:
            from solvers.errors import InfeasibleError
            from solvers.repair import _conflict_message

            raise InfeasibleError(_conflict_message(problem))
        masks = [c.masks[int(c.counts[i])] for c, i in zip(curves, picks)]
        exact = all(c.exact for c in curves)
        bound = value if exact else best_of("bound")[0]
        info = {
            "method": "dynamic program over "
            + ("exact" if exact else "heuristic (greedy)")
            + " per-layer curves"
        }
        return Outcome(masks, "optimal" if exact else "feasible", bound, info=info)
