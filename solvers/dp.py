"""Dynamic programming over layers for count-separable problems (the layer-curves knapsack).

State: the kept total so far (experts, or byte units for a byte budget); each layer adds one
allowed count n at cost ``curve_l(n)``. Exact when the per-layer curves are exact (additive,
curves, small layers); for redundancy or coverage on larger layers it optimises the heuristic
curves and reports the bound of the same program on the per-count lower bounds. What it accepts
is declared below; :func:`solvers.solve.solve` refuses the rest, pointing to a solver that
takes it.
"""

from __future__ import annotations

import math
from functools import reduce

import numpy as np

from solvers.errors import InfeasibleError, SolverError
from solvers.knapsack import knapsack  # noqa: F401  (also this module's public name)
from solvers.layer_search import build_curves
from solvers.registry import Outcome, Solver, register_solver
from solvers.repair import _conflict_message

MAX_STATES = 5_000_000  # kept totals the table may have (a byte budget over odd sizes is large)


@register_solver
class DPSolver(Solver):
    name = "dp"
    guarantee = (
        "exact dynamic program over per-layer curves: optimal when the curves are exact "
        "(additive, curves, small layers); otherwise heuristic curves with a bound"
    )
    # the budget and uniform (every common count is tried), and any per-layer constraint: the
    # curves only offer allowed counts and kept sets that obey the layer rules
    accepts_constraints = frozenset({"budget", "uniform"})
    accepts_per_layer = True
    expert_level = False

    def _units(self, problem) -> tuple[list[int], int, int]:
        """(weight of one kept expert per layer, lowest and highest kept total) in table units."""
        k = problem.budget.kept_total(problem)
        if k is not None:
            return [1] * len(problem.layers), k, k
        sizes = [int(layer.expert_bytes[0]) for layer in problem.layers]  # equal within a layer
        unit = reduce(math.gcd, sizes) or 1
        top = int(problem.budget.kept_bytes_cap(problem) // unit)
        if top > MAX_STATES:
            raise SolverError(
                f"dp: this byte budget needs a table of {top:,} kept-byte states; "
                "use --solver exact"
            )
        return [s // unit for s in sizes], 0, top

    def run(self, problem) -> Outcome:
        per, lo, hi = self._units(problem)
        curves = build_curves(problem)
        weights = [c.counts * w for c, w in zip(curves, per)]
        uniform = any(c.name == "uniform" for c in problem.constraints)

        def best_of(attr):
            costs = [getattr(c, attr) for c in curves]
            if not uniform:
                return knapsack(costs, weights, lo, hi)
            best = (np.inf, None)  # uniform: try every count allowed in all layers
            common = set(curves[0].counts.tolist()).intersection(
                *[set(c.counts.tolist()) for c in curves[1:]]
            )
            for n in sorted(common):
                idx = [c.at(n) for c in curves]
                if lo <= sum(int(w[i]) for w, i in zip(weights, idx)) <= hi:
                    value = float(sum(cost[i] for cost, i in zip(costs, idx)))
                    if value < best[0]:
                        best = (value, idx)
            return best

        value, picks = best_of("value")
        if picks is None:
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
