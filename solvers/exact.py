"""The exact solver: an integer program solved by OR-Tools (HiGHS), with a proof or a gap.

Which program depends on what the problem allows, always the smallest one that is still exact:

1. **count level, exact curves** - when every constraint is about counts (and the layer rules)
   and each layer's best kept set of size n is known exactly (additive and curve objectives:
   keep the most important; any objective on layers of <= 12 experts: enumeration), the whole
   problem is a multiple-choice knapsack over one-hot count indicators. Optimal with proof; the
   Kimi-K2 shape (23,040 experts) solves in about a second.
2. **count level, heuristic curves + bound** - redundancy or coverage on larger layers: the best
   *known* kept set for each n (removal greedy, then swap local search around the chosen counts)
   gives the plan; each term's proven per-count lower bound, through the same count program,
   gives the bound. The gap is reported; it is a heuristic plan with a certificate, not a proof.
3. **expert level** - then, if time remains and the objective has a strong linear program
   (coverage: the facility-location relaxation is nearly always tight), or whenever a constraint
   depends on *which* experts are kept (expert-parallel memory caps, byte budgets with unequal
   experts), the full program over keep variables runs with the remaining time; its incumbent
   replaces the plan if better and its bound tightens the bound.
"""

from __future__ import annotations

import time

import numpy as np

from solvers.errors import InfeasibleError, SolverError
from solvers.formulation import Formulation
from solvers.layer_search import build_curves, improve_curves
from solvers.registry import Outcome, Solver, register_solver
from solvers.repair import _conflict_message

OPTIMAL_GAP = 1e-6
MIN_COUNT_SECONDS = 30.0  # the count program is small: finish it even past the time limit
# above this many pair variables the linearised redundancy program is not worth building
MAX_PAIR_VARIABLES = 200_000
# ...and when a constraint forces the expert level: its LP bound is weak, so only small ones, and
# the convexified relaxation provides the bound above that
MAX_PAIRS_WHEN_FORCED = 20_000


def relative_gap(value: float, bound: float | None) -> float | None:
    if bound is None:
        return None
    return max(0.0, (value - bound) / max(abs(value), 1e-12))


def solve_counts(problem, costs: list[np.ndarray], time_limit: float, skip_expert: bool = False):
    """The count-level program with per-count costs; returns (kept counts, MipResult)."""
    form = Formulation(
        problem,
        "count",
        curves=[np.where(np.isfinite(c), c, 0.0) for c in costs],
        skip_expert_constraints=skip_expert,
    )
    for p, c in enumerate(costs):
        missing = ~np.isfinite(c)
        if missing.any():  # counts with no known kept set cannot be chosen
            form.mip.set_bounds(form.y[p][missing], ub=0.0)
    res = form.mip.solve(time_limit)
    if res.status == "infeasible":
        raise InfeasibleError(_conflict_message(problem))
    return (form.kept_counts(res.x) if res.x is not None else None), res


def expert_program_size(problem) -> int:
    """Rough number of variables of the expert-level program."""
    size = problem.total_experts
    for _, term in problem.objective.terms:
        for layer in problem.layers:
            if term.name == "redundancy":
                size += int(np.count_nonzero(np.triu(layer.similarity, 1)))
            elif term.name == "coverage":
                size += layer.num_experts * (min(term.candidates, layer.num_experts - 1) + 2)
    return size


def qp_seconds(problem) -> float:
    """Rough CVXPY + Clarabel time of the convexified relaxation on this 2-core CPU: it grows
    with the dense per-layer factors, sum_l N_l^2 (Qwen3-30B ~ 10 s, Kimi-K2 ~ 75 s)."""
    return 3.0 + 8e-6 * sum(layer.num_experts**2 for layer in problem.layers)


def _close(value: float, bound: float | None) -> bool:
    gap = relative_gap(value, bound)
    return gap is not None and gap <= OPTIMAL_GAP


def _pairs_ok(problem, limit: int | None = None) -> bool:
    """Whether the linearised redundancy program (one variable per similar pair) is worth building."""
    if "redundancy" not in problem.objective.names:
        return True
    pairs = sum(int(np.count_nonzero(np.triu(layer.similarity, 1))) for layer in problem.layers)
    return pairs <= (limit or MAX_PAIR_VARIABLES)


@register_solver
class ExactSolver(Solver):
    name = "exact"
    guarantee = (
        "optimal with proof when it says so; otherwise the best plan found with a proven "
        "lower bound and gap (heuristic curves, or the time limit)"
    )

    def run(self, problem) -> Outcome:
        if problem.needs_expert_level():
            return self._expert_level(problem)
        curves = build_curves(problem)
        if all(c.exact for c in curves):
            return self._exact_curves(problem, curves)
        return self._heuristic_curves(problem, curves)

    def _mip_fits(self, problem) -> bool:
        """About 2,500 variables per second of limit: Qwen3-30B's coverage program (110k) fits a
        60 s limit, Qwen3-235B's (216k) and Kimi-K2's (415k) do not (HiGHS would overrun)."""
        return expert_program_size(problem) <= 2500 * self.time_limit

    def _mip_seconds(self) -> float:
        """HiGHS overruns its limit while loading and in the root LP of large programs: keep a margin."""
        return max(1.0, 0.8 * self.remaining() - 2.0)

    # 1. exact curves ------------------------------------------------------------------------------
    def _exact_curves(self, problem, curves) -> Outcome:
        counts, res = solve_counts(
            problem, [c.value for c in curves], max(self.remaining(), MIN_COUNT_SECONDS)
        )
        if counts is None:
            raise SolverError(
                f"the count program found no plan within {self.time_limit:.0f} s; raise --time-limit"
            )
        masks = [c.masks[int(n)] for c, n in zip(curves, counts)]
        return Outcome(
            masks,
            "optimal" if res.status == "optimal" else "time_limit",
            res.bound,
            info={"method": "exact per-layer curves + count-level integer program (HiGHS)"},
        )

    # 2. heuristic curves, then 3. the expert-level program ----------------------------------------
    def _heuristic_curves(self, problem, curves) -> Outcome:
        names = problem.objective.names
        qp = "redundancy" in names and qp_seconds(problem) <= 0.7 * self.time_limit
        follow_up = qp or "coverage" in names
        search_until = self.start + (0.2 if follow_up else 0.6) * self.time_limit
        # the expert-level coverage program only pays off where HiGHS can finish its root LP
        mip = "coverage" in names and _pairs_ok(problem) and self._mip_fits(problem)
        counts, _ = solve_counts(
            problem, [c.value for c in curves], max(self.remaining(), MIN_COUNT_SECONDS)
        )
        if counts is None:
            raise SolverError("the count program found no plan; raise --time-limit")
        for width in (2, 4, 8, 16):
            if time.perf_counter() > search_until:
                break
            changed = improve_curves(problem, curves, counts, width, search_until)
            new, _ = solve_counts(
                problem, [c.value for c in curves], max(self.remaining(), MIN_COUNT_SECONDS)
            )
            if new is None:
                break
            if not changed and np.array_equal(new, counts):
                break
            counts = new
        masks = [c.masks[int(n)] for c, n in zip(curves, counts)]
        value = sum(c.value[c.at(int(n))] for c, n in zip(curves, counts))
        if "coverage" in names:  # LP tangents near the chosen counts first, until the gap closes
            self._tighten_coverage_bounds(
                problem, curves, counts, value, self.start + (0.6 if mip else 0.8) * self.time_limit
            )
        _, lb = solve_counts(
            problem, [c.bound for c in curves], max(self.remaining(), MIN_COUNT_SECONDS)
        )
        bound = lb.bound
        info = {
            "method": "heuristic per-layer curves (greedy + swap local search) + count-level program; "
            "bound from per-count lower bounds"
            + (" (with per-layer LP tangents)" if "coverage" in names else "")
        }
        status = "feasible"
        if "redundancy" in names and not _close(value, bound):
            if qp_seconds(problem) <= self.remaining():
                masks, value, bound, status = self._improve_with_relaxation(
                    problem, masks, value, bound, info
                )
            else:
                info["method"] += (
                    f"; convex relaxation bound skipped (needs about {qp_seconds(problem):.0f} s, "
                    f"{self.remaining():.0f} s left)"
                )
        if mip and not _close(value, bound) and self.remaining() > 1.0:
            masks, value, bound, status = self._improve_with_expert_program(
                problem, masks, value, bound, info
            )
        gap = relative_gap(value, bound)
        if gap is not None and gap <= OPTIMAL_GAP:
            status = "optimal"
        return Outcome(masks, status, bound, info=info)

    def _tighten_coverage_bounds(self, problem, curves, counts, value, until: float) -> None:
        """Raise the coverage part of the per-count bounds to tangents of each layer's
        facility-location LP, solved at the chosen count, then further away, until the count
        program's bound meets `value` or time runs out."""
        for weight, term in problem.objective.terms:
            if term.name != "coverage":
                continue
            best = {p: term.lower_bounds(layer) for p, layer in enumerate(problem.layers)}
            rules = problem.layer_rules()
            for offset in (0, 1, -1, 2, -2, 4, -4, 8, -8, 16, -16):
                for p, (layer, curve) in enumerate(zip(problem.layers, curves)):
                    n0 = int(counts[p]) + offset
                    if curve.exact or not 0 <= n0 <= layer.num_experts:
                        continue
                    if time.perf_counter() > until:
                        return
                    raised = np.maximum(best[p], term.lp_lower_bounds(layer, [n0], rules[p]))
                    # the bound is a weighted sum of term bounds: add only what this term gained
                    curve.bound = curve.bound + weight * (raised - best[p])[curve.counts]
                    best[p] = raised
                _, lb = solve_counts(problem, [c.bound for c in curves], MIN_COUNT_SECONDS)
                if _close(value, lb.bound):
                    return

    def _improve_with_relaxation(self, problem, masks, value, bound, info):
        """The convexified relaxation (x'(D + mu I)x - mu sum x): a far stronger bound than the
        per-count bounds when D is nearly positive semidefinite, as similarity matrices are."""
        from solvers.relaxation import relaxation_bound, rounded_masks, solve_relaxation
        from solvers.repair import finalize

        form = Formulation(problem, "expert", relax=True)
        status, relaxed, v = solve_relaxation(form, self.remaining())
        info["method"] += "; convex relaxation bound (CVXPY CLARABEL)"
        qp_bound = relaxation_bound(status, relaxed)
        if qp_bound is not None:
            bound = qp_bound if bound is None else max(bound, qp_bound)
        if v is not None:
            rounded = finalize(problem, rounded_masks(problem, form, v))
            rounded_value = _value(problem, rounded)
            if rounded_value < value:
                masks, value = rounded, rounded_value
        return masks, value, bound, "feasible" if self.remaining() > 0 else "time_limit"

    def _improve_with_expert_program(self, problem, masks, value, bound, info):
        form = Formulation(problem, "expert")
        res = form.mip.solve(self._mip_seconds())
        info["method"] += "; then expert-level program (HiGHS)"
        status = "time_limit" if res.status != "optimal" else "feasible"
        if res.bound is not None:
            bound = res.bound if bound is None else max(bound, res.bound)
        if res.x is not None:
            mip_masks = form.kept_masks(res.x)
            mip_value = _value(problem, mip_masks)
            if mip_value < value:
                masks, value = mip_masks, mip_value
        return masks, value, bound, status

    # 3. constraints on which experts: the expert-level program from the start ---------------------
    def _expert_level(self, problem) -> Outcome:
        from solvers.greedy import heuristic_plan

        names = problem.objective.names
        info = {"method": "greedy + repair as the starting plan"}
        masks = heuristic_plan(problem)
        value = _value(problem, masks)
        bound, status = None, "feasible"
        if _pairs_ok(problem, MAX_PAIRS_WHEN_FORCED if "redundancy" in names else None):
            form = Formulation(problem, "expert")
            res = form.mip.solve(self._mip_seconds())
            if res.status == "infeasible":
                raise InfeasibleError(_conflict_message(problem))
            info["method"] += "; expert-level integer program (HiGHS)"
            bound = res.bound
            status = "optimal" if res.status == "optimal" else "time_limit"
            if res.x is not None:
                mip_masks = form.kept_masks(res.x)
                mip_value = _value(problem, mip_masks)
                if mip_value <= value:
                    masks, value = mip_masks, mip_value
        if "redundancy" in names and not _close(value, bound) and self.remaining() > 1.0:
            if qp_seconds(problem) <= self.remaining():
                masks, value, bound, status = self._improve_with_relaxation(
                    problem, masks, value, bound, info
                )
        gap = relative_gap(value, bound)
        if gap is not None and gap <= OPTIMAL_GAP:
            status = "optimal"
        elif status == "optimal":  # the program's optimum is not proved for the true objective
            status = "feasible" if self.remaining() > 0 else "time_limit"
        return Outcome(masks, status, bound, info=info)


def _value(problem, masks) -> float:
    layers = problem.layers
    return float(sum(problem.objective.layer_value(layer, m) for layer, m in zip(layers, masks)))
