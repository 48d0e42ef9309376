"""A per-expert convexifying shift from the Shor SDP relaxation of one small layer (CVXPY + SCS).

For binary x, x'Mx + c'x = x'(M + diag(u))x + (c - u)'x for every u; the uniform shift
u = mu 1 (mu = -lambda_min(M)) makes the form convex but loosens it wherever the relaxed x is
fractional. The best u is the dual of the ``diag(X) = x`` rows of the Shor relaxation

    min <M, X> + c'x   s.t.   [[1, x'], [x, X]] >= 0,  diag(X) = x,  the layer's count rows,

(Billionnet-Elloumi's QCR). The solver's duals need not be exact: :func:`solvers.firstorder.
convexify` adds whatever uniform amount keeps M + diag(u) positive semidefinite, so the bound
stays valid; SCS at a modest accuracy is therefore enough, and several times faster than an
interior-point solve. Used only on small layers (the SDP has (N+1)^2 variables). One compiled
problem serves every layer of the same size and rule (CVXPY parameters), and SCS is
deterministic, so the shift is the same on every run.
"""

from __future__ import annotations

import warnings

import numpy as np

ACCURACY = 1e-5  # SCS's relative and absolute tolerance: duals good to ~1e-5 of the scale


class ShorSDP:
    """The relaxation for one layer size and rule, compiled once; :meth:`shift` per layer."""

    def __init__(self, rule):
        import cvxpy as cp

        n = rule.keep.shape[0]
        self.matrix = cp.Parameter((n, n), symmetric=True)
        self.linear = cp.Parameter(n)
        self.per_group = cp.Parameter(nonneg=True)
        big = cp.Variable((n + 1, n + 1), symmetric=True)
        x, xx = big[0, 1:], big[1:, 1:]
        self.diag = cp.diag(xx) == x
        cons = [big >> 0, big[0, 0] == 1, self.diag]
        labels = rule.labels()
        for label in range(rule.num_groups):
            cons.append(cp.sum(x[np.flatnonzero(labels == label)]) == self.per_group)
        if rule.keep.any():
            cons.append(x[np.flatnonzero(rule.keep)] == 1)
        if rule.remove.any():
            cons.append(x[np.flatnonzero(rule.remove)] == 0)
        objective = cp.Minimize(cp.sum(cp.multiply(self.matrix, xx)) + self.linear @ x)
        self.problem = cp.Problem(objective, cons)
        self.groups = rule.num_groups

    def shift(self, matrix: np.ndarray, linear: np.ndarray, count: int) -> np.ndarray | None:
        """The dual u of the relaxation at kept count `count`, or None if SCS gives none."""
        import cvxpy as cp

        self.matrix.value = (matrix + matrix.T) / 2.0
        self.linear.value = linear
        self.per_group.value = count / self.groups
        with warnings.catch_warnings():  # an inaccurate solve is fine: convexify repairs the shift
            warnings.simplefilter("ignore")
            try:
                self.problem.solve(solver=cp.SCS, eps_abs=ACCURACY, eps_rel=ACCURACY)
            except cp.error.SolverError:
                return None
        if self.diag.dual_value is None or self.problem.status not in (
            cp.OPTIMAL,
            cp.OPTIMAL_INACCURATE,
        ):
            return None
        u = np.asarray(self.diag.dual_value, float).ravel()
        return u if u.shape == matrix.shape[:1] and np.all(np.isfinite(u)) else None


def sdp_shift(matrix: np.ndarray, linear: np.ndarray, count: int, rule, cache=None):
    """The Shor relaxation's diagonal shift for one layer (`cache`: compiled problems by rule)."""
    cache = {} if cache is None else cache
    key = (rule.keep.tobytes(), rule.remove.tobytes(), rule.labels().tobytes())
    if key not in cache:
        cache[key] = ShorSDP(rule)
    return cache[key].shift(matrix, linear, count)
