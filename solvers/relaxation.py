"""Convex relaxation with CVXPY: a lower bound, then rounding and repair to a feasible plan.

The expert-level program of :mod:`solvers.formulation` with every variable in [0, 1]:

* linear terms (additive, curves) and the coverage assignment stay linear: an LP;
* redundancy's x'Dx is convexified: for binary x, x'Dx = x'(D + mu I)x - mu sum(x), and with
  mu = max(0, -lambda_min(D)) the right side is convex, so the relaxed minimum is a valid lower
  bound (it equals the true objective on every binary point).

Rounding: each layer keeps round(sum_n n y[l, n]) experts, those with the largest relaxed x
(importance breaks ties); :func:`solvers.repair.finalize` then restores feasibility.
The bound is the solver's optimal value less a small tolerance (1e-6 relative), since interior
point solvers stop at a tiny duality gap.
"""

from __future__ import annotations

import warnings

import numpy as np

from solvers._io import quiet_stdout
from solvers.errors import InfeasibleError, SolverError
from solvers.formulation import Formulation
from solvers.registry import Outcome, Solver, register_solver
from solvers.repair import _conflict_message, finalize

BOUND_SLACK = 1e-6


_quiet_stdout = quiet_stdout  # the name this module used to define


def solve_relaxation(form: Formulation, time_limit: float):
    import cvxpy as cp

    lb, ub, _, cost, a, lo, hi = form.mip.arrays()
    v = cp.Variable(form.mip.num_vars)
    cons = [v >= lb, v <= ub]
    eq = np.isfinite(lo) & np.isfinite(hi) & (lo == hi)
    if eq.any():
        cons.append(a[eq] @ v == lo[eq])
    up = ~eq & np.isfinite(hi)
    if up.any():
        cons.append(a[up] @ v <= hi[up])
    down = ~eq & np.isfinite(lo)
    if down.any():
        cons.append(a[down] @ v >= lo[down])
    expr = cost @ v + form.mip.offset
    for block in form.mip.quad:
        xb = v[block.index]
        expr = expr + block.weight * (cp.sum_squares(block.factor.T @ xb) + block.linear @ xb)
    prob = cp.Problem(cp.Minimize(expr), cons)
    with warnings.catch_warnings():  # an inaccurate solve is reported through the status instead
        warnings.simplefilter("ignore")
        _solve(prob, cp, bool(form.mip.quad), time_limit)
    return prob.status, prob.value, (None if v.value is None else np.asarray(v.value))


def _solve(prob, cp, quadratic: bool, time_limit: float) -> None:
    if quadratic:
        prob.solve(solver=cp.CLARABEL, time_limit=max(time_limit, 1.0))
    else:
        with _quiet_stdout():
            prob.solve(solver=cp.HIGHS, time_limit=max(time_limit, 1.0))


@register_solver
class RelaxationSolver(Solver):
    name = "relaxation"
    guarantee = "lower bound from a convex relaxation (CVXPY); rounded plan with no guarantee"

    def run(self, problem) -> Outcome:
        import cvxpy as cp

        form = Formulation(problem, "expert", relax=True)
        status, value, v = solve_relaxation(form, self.remaining())
        if status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
            raise InfeasibleError(_conflict_message(problem))
        if v is None or status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            raise SolverError(f"the relaxation did not solve (status {status}); try --solver exact")
        bound = relaxation_bound(status, value)
        masks = rounded_masks(problem, form, v)
        info = {
            "method": "convex relaxation (CVXPY "
            + ("CLARABEL" if form.mip.quad else "HiGHS")
            + ") + rounding + repair",
            "relaxation_value": float(value),
        }
        return Outcome(finalize(problem, masks, info), "feasible", bound, info=info)


def relaxation_bound(status, value) -> float | None:
    import cvxpy as cp

    if status != cp.OPTIMAL or value is None:
        return None
    return float(value) - BOUND_SLACK * max(1.0, abs(float(value)))


def rounded_masks(problem, form, v) -> list[np.ndarray]:
    """Each layer keeps its rounded relaxed count, the experts with the largest relaxed x."""
    masks = []
    for p, (layer, n) in enumerate(zip(problem.layers, _rounded_counts(problem, form, v))):
        x = v[form.x[p]]
        order = np.lexsort((np.arange(layer.num_experts), -layer.importance, -np.round(x, 6)))
        mask = np.zeros(layer.num_experts, bool)
        mask[order[:n]] = True
        masks.append(mask)
    return masks


def _rounded_counts(problem, form, v) -> np.ndarray:
    """Relaxed kept counts rounded down, then the budget's remainder to the largest fractions."""
    expected = np.array([float(v[form.y[p]] @ form.counts[p]) for p in range(len(problem.layers))])
    counts = np.floor(expected + 1e-6).astype(int)
    k = problem.budget.kept_total(problem)
    if k is not None:
        sizes = np.array([layer.num_experts for layer in problem.layers])
        for p in np.argsort(-(expected - counts), kind="stable"):
            if counts.sum() >= k:
                break
            if counts[p] < sizes[p]:
                counts[p] += 1
    return counts
