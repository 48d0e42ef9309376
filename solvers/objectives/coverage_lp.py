"""One layer's facility-location LP, kept between solves so that a new kept count is a warm start.

Variables: keep x (N), assignment a[e, k] over each expert's candidates, fallback u (N); rows:
``sum_k a[e, k] + u[e] = 1`` (one per expert, whose duals are the Lagrangian prices), ``a[e, k]
<= x[k]``, and one count row per routing group. Changing the count only moves the count rows'
bounds, so HiGHS's dual simplex restarts from the last basis (highspy); without highspy each
count is solved from scratch by SciPy.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from solvers._io import quiet_stdout


class LayerLP:
    def __init__(self, e, k, cost_a, cost_u, rule):
        n, na = cost_u.size, e.size
        self.n, self.groups = n, rule.num_groups
        labels = rule.labels()
        self.cost = np.concatenate([np.zeros(n), cost_a, cost_u])
        r = np.arange(na)
        rows = np.concatenate([e, np.arange(n), n + r, n + r, n + na + labels])
        cols = np.concatenate(
            [n + r, n + na + np.arange(n), n + r, k, np.arange(n)]
        )
        vals = np.concatenate([np.ones(na + n), np.ones(na), -np.ones(na), np.ones(n)])
        self.matrix = sp.csc_matrix((vals, (rows, cols)), shape=(n + na + self.groups, 2 * n + na))
        self.col_lo, self.col_hi = np.zeros(2 * n + na), np.ones(2 * n + na)
        self.col_lo[:n], self.col_hi[:n] = rule.keep, ~rule.remove
        self.row_lo = np.concatenate([np.ones(n), np.full(na, -np.inf), np.zeros(self.groups)])
        self.row_hi = np.concatenate([np.ones(n), np.zeros(na), np.zeros(self.groups)])
        self._highs = None
        self.keep = None  # the relaxed keep vector x of the last solve
        self.value = None  # and its optimal value

    def prices(self, count: int) -> np.ndarray | None:
        """Duals of the assignment rows at kept count `count` (None if the LP has no optimum)."""
        per = count / self.groups
        self.row_lo[-self.groups :] = per
        self.row_hi[-self.groups :] = per
        try:
            import highspy
        except ImportError:  # pragma: no cover - highspy comes with the pinned SciPy/CVXPY stack
            return self._prices_scipy()
        return self._prices_highs(highspy)

    def _prices_highs(self, highspy) -> np.ndarray | None:
        if self._highs is None:
            with quiet_stdout():  # the banner is printed on construction
                h = highspy.Highs()
            # not `threads`: HiGHS's thread pool is global, and once another user in this
            # process (CVXPY's HiGHS interface) has started it, asking for another size fails
            for name, value in (("output_flag", False), ("random_seed", 0)):
                h.setOptionValue(name, value)
            lp = highspy.HighsLp()
            lp.num_col_, lp.num_row_ = self.matrix.shape[1], self.matrix.shape[0]
            lp.col_cost_, lp.col_lower_, lp.col_upper_ = self.cost, self.col_lo, self.col_hi
            lp.row_lower_, lp.row_upper_ = self.row_lo, self.row_hi
            lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
            lp.a_matrix_.start_ = self.matrix.indptr
            lp.a_matrix_.index_ = self.matrix.indices
            lp.a_matrix_.value_ = self.matrix.data
            h.passModel(lp)
            self._highs = h
        else:
            rows = np.arange(self.matrix.shape[0] - self.groups, self.matrix.shape[0])
            self._highs.changeRowsBounds(
                rows.size, rows, self.row_lo[rows], self.row_hi[rows]
            )
        self._highs.run()
        if self._highs.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return self._prices_scipy()  # a second opinion from SciPy's own HiGHS
        solution = self._highs.getSolution()
        self.keep = np.asarray(solution.col_value, float)[: self.n]
        self.value = float(self._highs.getInfo().objective_function_value)
        return np.asarray(solution.row_dual, float)[: self.n]

    def _prices_scipy(self) -> np.ndarray | None:
        from scipy.optimize import linprog

        n, g = self.n, self.groups
        eq = np.r_[np.arange(n), np.arange(self.matrix.shape[0] - g, self.matrix.shape[0])]
        ub = np.arange(n, self.matrix.shape[0] - g)
        csr = self.matrix.tocsr()
        res = linprog(
            self.cost,
            A_ub=csr[ub],
            b_ub=self.row_hi[ub],
            A_eq=csr[eq],
            b_eq=self.row_lo[eq],
            bounds=np.stack([self.col_lo, self.col_hi], axis=1),
            method="highs",
        )
        if res.status != 0:
            return None
        self.keep, self.value = np.asarray(res.x[:n], float), float(res.fun)
        return np.asarray(res.eqlin.marginals[:n], float)
