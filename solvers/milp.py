"""A small sparse mixed-integer program, built with numpy and solved by OR-Tools.

Variables and rows are added in bulk (index arrays and coefficient arrays), so a model with a
few hundred thousand variables is assembled in well under a second; OR-Tools' model builder
then hands it to HiGHS (default) or SCIP. The same model, with integrality dropped and optional
convex quadratic blocks, is what the CVXPY relaxation solves (see :mod:`solvers.relaxation`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

INF = math.inf


@dataclass
class QuadBlock:
    """A convex term ``weight * (||factor.T @ v[index]||^2 + linear @ v[index])`` (relaxation only)."""

    index: np.ndarray
    factor: np.ndarray
    linear: np.ndarray
    weight: float


@dataclass
class MipResult:
    status: str  # optimal | feasible | infeasible | no_solution
    x: np.ndarray | None
    objective: float | None
    bound: float | None
    seconds: float


@dataclass
class MipModel:
    lb: list = field(default_factory=list)
    ub: list = field(default_factory=list)
    integral: list = field(default_factory=list)
    cost: list = field(default_factory=list)
    offset: float = 0.0
    _rows: list = field(default_factory=list)  # (row ids, cols, vals) with global row ids
    _lo: list = field(default_factory=list)
    _hi: list = field(default_factory=list)
    num_vars: int = 0
    num_rows: int = 0
    quad: list = field(default_factory=list)  # QuadBlock, ignored by the MIP backends

    # -- building --------------------------------------------------------------------------
    def add_vars(self, count: int, lb=0.0, ub=1.0, integral: bool = False, cost=0.0) -> np.ndarray:
        idx = np.arange(self.num_vars, self.num_vars + count)
        self.lb.append(np.broadcast_to(np.asarray(lb, dtype=float), (count,)).copy())
        self.ub.append(np.broadcast_to(np.asarray(ub, dtype=float), (count,)).copy())
        self.integral.append(np.full(count, integral))
        self.cost.append(np.broadcast_to(np.asarray(cost, dtype=float), (count,)).copy())
        self.num_vars += count
        return idx

    def add_cost(self, cols: np.ndarray, vals) -> None:
        """Add to the objective coefficients of existing variables."""
        self._flush_vars()
        np.add.at(
            self.cost[0], np.asarray(cols), np.broadcast_to(np.asarray(vals, float), np.shape(cols))
        )

    def set_bounds(self, cols: np.ndarray, lb=None, ub=None) -> None:
        self._flush_vars()
        if lb is not None:
            self.lb[0][np.asarray(cols)] = lb
        if ub is not None:
            self.ub[0][np.asarray(cols)] = ub

    def add_row(self, cols, vals, lo: float = -INF, hi: float = INF) -> int:
        cols = np.asarray(cols, dtype=np.int64)
        vals = np.broadcast_to(np.asarray(vals, dtype=float), cols.shape)
        self._rows.append((np.full(cols.shape, self.num_rows), cols, vals))
        self._lo.append(np.array([lo], float))
        self._hi.append(np.array([hi], float))
        self.num_rows += 1
        return self.num_rows - 1

    def add_rows(self, rows, cols, vals, lo, hi, count: int) -> None:
        """Add `count` rows at once; `rows` are local row numbers 0..count-1 of each entry."""
        rows = np.asarray(rows, dtype=np.int64) + self.num_rows
        cols = np.asarray(cols, dtype=np.int64)
        vals = np.broadcast_to(np.asarray(vals, dtype=float), cols.shape)
        self._rows.append((rows, cols, vals))
        self._lo.append(np.broadcast_to(np.asarray(lo, float), (count,)).copy())
        self._hi.append(np.broadcast_to(np.asarray(hi, float), (count,)).copy())
        self.num_rows += count

    def _flush_vars(self) -> None:
        for name in ("lb", "ub", "integral", "cost"):
            parts = getattr(self, name)
            if len(parts) != 1:
                setattr(self, name, [np.concatenate(parts) if parts else np.zeros(0)])

    def arrays(self):
        """(lb, ub, integral, cost, A (csr), row_lo, row_hi)."""
        self._flush_vars()
        if self._rows:
            rows = np.concatenate([r for r, _, _ in self._rows])
            cols = np.concatenate([c for _, c, _ in self._rows])
            vals = np.concatenate([v for _, _, v in self._rows])
        else:
            rows = cols = np.zeros(0, np.int64)
            vals = np.zeros(0)
        a = sp.csr_matrix((vals, (rows, cols)), shape=(self.num_rows, self.num_vars))
        a.sum_duplicates()
        lo = np.concatenate(self._lo) if self._lo else np.zeros(0)
        hi = np.concatenate(self._hi) if self._hi else np.zeros(0)
        return self.lb[0], self.ub[0], self.integral[0].astype(bool), self.cost[0], a, lo, hi

    def evaluate(self, x: np.ndarray) -> float:
        _, _, _, cost, _, _, _ = self.arrays()
        return float(cost @ x + self.offset)

    # -- solving ---------------------------------------------------------------------------
    def solve(
        self,
        time_limit: float = 60.0,
        backend: str = "highs",
        rel_gap: float = 1e-7,
        hint: np.ndarray | None = None,
        max_nodes: int | None = None,
    ) -> MipResult:
        """Solve with OR-Tools (HiGHS or SCIP). `hint` is used by SCIP only (HiGHS crashes on hints).

        HiGHS runs single-threaded with a fixed seed; `max_nodes` bounds its branch and bound by
        work, so that a program stopped early stops at the same place on a busy machine (the
        time limit is then only a safety net)."""
        from ortools.linear_solver.python import model_builder as mb

        start = time.perf_counter()
        lb, ub, integral, cost, a, lo, hi = self.arrays()
        if self.num_vars == 0:
            return MipResult("optimal", np.zeros(0), self.offset, self.offset, 0.0)
        model = mb.Model()
        helper = model.helper
        helper.fill_model_from_sparse_data(lb, ub, cost, lo, hi, a)
        for i in np.flatnonzero(integral):
            helper.set_var_integrality(int(i), True)
        helper.set_objective_offset(float(self.offset))
        solver = mb.Solver(backend)
        solver.set_time_limit_in_seconds(max(float(time_limit), 0.05))
        if backend == "highs":
            nodes = "" if max_nodes is None else f"\nmip_max_nodes={int(max_nodes)}"
            solver.set_solver_specific_parameters(
                f"output_flag=false\nthreads=1\nmip_rel_gap={rel_gap}\nrandom_seed=0{nodes}"
            )
        elif backend == "scip":
            solver.set_solver_specific_parameters(
                f"limits/gap = {rel_gap}\nrandomization/randomseedshift = 0"
            )
            if hint is not None:
                for i in np.flatnonzero(integral):
                    helper.add_hint(int(i), float(hint[i]))
        status = solver.solve(model)
        seconds = time.perf_counter() - start
        name = status.name
        if name == "INFEASIBLE":
            return MipResult("infeasible", None, None, None, seconds)
        if name not in ("OPTIMAL", "FEASIBLE"):
            return MipResult(
                "no_solution", None, None, _finite(solver.best_objective_bound), seconds
            )
        x = np.asarray(solver.values(model.get_variables()).to_numpy(dtype=float))
        obj = float(solver.objective_value)
        bound = _finite(solver.best_objective_bound)
        if name == "OPTIMAL":
            bound = obj if bound is None else min(bound, obj)
        return MipResult("optimal" if name == "OPTIMAL" else "feasible", x, obj, bound, seconds)


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
