"""The integer program of a problem, in one of two sizes.

* ``count`` level: per layer one-hot indicators ``y[p, n]`` over the allowed kept counts n, with
  a cost per indicator given by per-layer curves (the best value of keeping n experts). Exact
  whenever the curves are exact and no constraint depends on *which* experts are kept.
* ``expert`` level: adds keep variables ``x[p, e]`` linked by ``sum_e x[p, e] = sum_n n y[p, n]``,
  must-keep/must-remove as bounds, equal counts per routing group as rows, and the objective
  terms' own linearisations.

Constraints add their rows through the helpers here (``total_count_terms``, ``kept_bytes_terms``,
``y``/``x``), so one constraint class serves both levels and the relaxation.
"""

from __future__ import annotations

import numpy as np

from solvers.constraints.base import Constraint
from solvers.constraints.precheck import conflict_message
from solvers.errors import InfeasibleError
from solvers.knapsack import KnapsackCache
from solvers.milp import MipModel, MipResult


class Formulation:
    def __init__(
        self,
        problem,
        level: str = "expert",
        relax: bool = False,
        curves: list[np.ndarray] | None = None,
        objective: bool = True,
        skip_expert_constraints: bool = False,
    ):
        """`curves[p]` (count level): cost of each allowed count, aligned with `counts[p]`.

        `skip_expert_constraints` drops constraints that need expert variables, which turns a
        count-level model into a relaxation (used for lower bounds only).
        """
        assert level in ("count", "expert")
        self.problem, self.level, self.relax = problem, level, relax
        self.mip = MipModel()
        self.counts = [np.flatnonzero(a) for a in problem.allowed_counts()]
        self.y = []
        for p, counts in enumerate(self.counts):
            y = self.mip.add_vars(counts.size, 0.0, 1.0, integral=not relax)
            self.mip.add_row(y, 1.0, 1.0, 1.0)
            self.y.append(y)
        self.x: list[np.ndarray] = []
        if level == "expert":
            for p, (layer, rule) in enumerate(zip(problem.layers, problem.layer_rules())):
                x = self.mip.add_vars(
                    layer.num_experts,
                    rule.keep.astype(float),
                    (~rule.remove).astype(float),
                    integral=not relax,
                )
                self.x.append(x)
                self.mip.add_row(
                    np.concatenate([x, self.y[p]]),
                    np.concatenate([np.ones(x.size), -self.counts[p].astype(float)]),
                    0.0,
                    0.0,
                )
                if rule.groups is not None:
                    g = rule.num_groups
                    for label in range(g):
                        members = x[rule.groups == label]
                        self.mip.add_row(
                            np.concatenate([members, self.y[p]]),
                            np.concatenate([np.ones(members.size), -self.counts[p] / g]),
                            0.0,
                            0.0,
                        )
        for c in problem.all_constraints:
            if level == "count" and c.needs_expert_level(problem):
                if skip_expert_constraints and c.count_relaxation:
                    c.add_to_model(self)  # its count-level rows relax it: fine for a bound
                    continue
                if skip_expert_constraints:
                    continue
                raise ValueError(f"constraint {c.name} needs the expert-level formulation")
            c.add_to_model(self)
        if objective:
            if level == "count":
                for p, cost in enumerate(curves):
                    self.mip.add_cost(self.y[p], cost)
            else:
                problem.objective.add_to_model(self)

    # -- helpers for constraints ----------------------------------------------------------------
    def total_count_terms(self):
        return np.concatenate(self.y), np.concatenate(self.counts).astype(float)

    def kept_bytes_terms(self, positions, masks: dict | None = None):
        """Linear expression of the kept bytes of the given layers (optionally only the experts
        in `masks[p]`). At count level a layer's bytes are n times its smallest expert (exact for
        the equal-size experts of real models; a relaxation otherwise)."""
        cols, vals = [], []
        for p in positions:
            layer = self.problem.layers[p]
            mask = None if masks is None else masks.get(p)
            if self.level == "expert":
                sel = np.ones(layer.num_experts, bool) if mask is None else mask
                cols.append(self.x[p][sel])
                vals.append(layer.expert_bytes[sel].astype(float))
            else:
                cols.append(self.y[p])
                vals.append(self.counts[p] * float(layer.expert_bytes.min()))
        if not cols:
            return np.zeros(0, np.int64), np.zeros(0)
        return np.concatenate(cols), np.concatenate(vals)

    # -- reading a solution ---------------------------------------------------------------------
    def kept_counts(self, v: np.ndarray) -> np.ndarray:
        return np.array([int(self.counts[p][np.argmax(v[self.y[p]])]) for p in range(len(self.y))])

    def kept_masks(self, v: np.ndarray) -> list[np.ndarray]:
        return [v[x] > 0.5 for x in self.x]


def _rows_free(problem, skip_expert: bool) -> bool:
    """Whether the count program has no rows beyond a count budget's: every other constraint is
    per-layer (allowed counts and rules, which the options already obey), so the program is a
    plain multiple-choice knapsack."""
    if problem.budget.kept_total(problem) is None:
        return False
    for c in problem.constraints:
        skipped = skip_expert and c.needs_expert_level(problem) and not c.count_relaxation
        if not skipped and type(c).add_to_model is not Constraint.add_to_model:
            return False
    return True


def solve_count_program(
    problem,
    costs: list[np.ndarray],
    time_limit: float,
    skip_expert: bool = False,
    cache: KnapsackCache | None = None,
) -> tuple[np.ndarray | None, MipResult]:
    """The count-level program with per-count costs (aligned with each layer's allowed counts;
    +inf: that count may not be chosen); returns (kept counts or None, result).

    `skip_expert` drops the constraints that need expert variables: the program is then a
    relaxation, fit for lower bounds only. A program with no rows beyond the count budget is
    solved exactly by dynamic programming (faster than HiGHS; `cache` keeps the tables of layers
    whose costs did not change since its last call); any other by HiGHS."""
    counts = [np.flatnonzero(a) for a in problem.allowed_counts()]
    if _rows_free(problem, skip_expert):
        k = problem.budget.kept_total(problem)
        value, picks = (cache or KnapsackCache()).solve(costs, counts, k, k)
        if picks is None:
            raise InfeasibleError(conflict_message(problem))
        chosen = np.array([int(c[i]) for c, i in zip(counts, picks)])
        return chosen, MipResult("optimal", None, value, value, 0.0)
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
        raise InfeasibleError(conflict_message(problem))
    return (form.kept_counts(res.x) if res.x is not None else None), res
