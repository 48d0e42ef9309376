"""One verb: ``solve(problem, solver="exact", time_limit=60) -> Plan``.

Runs the cheap infeasibility checks (so every solver raises the same message), refuses what the
chosen solver does not declare it accepts (one line naming a solver that does), runs the solver
from :data:`solvers.registry.SOLVERS`, recomputes the objective from scratch, and passes
the plan through the independent checker before returning it.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

# importing the solver modules registers them
from solvers import dp, exact, greedy, relaxation, uniform  # noqa: F401
from solvers.check import assert_valid
from solvers.constraints.memory import MemoryCap
from solvers.constraints import precheck
from solvers.errors import SolverError, UserError
from solvers.exact import relative_gap
from solvers.plan import Plan
from solvers.registry import SOLVERS, refusal


def solver_names() -> list[str]:
    """Every registered solver (the built-in ones are, once this module is imported; plugins'
    once loaded), for the command line's choice lists."""
    return sorted(SOLVERS)


@contextlib.contextmanager
def _small_blas():
    """One BLAS thread while solving: the matrices are per-layer (at most a few hundred wide),
    where threads only add overhead, and oversubscribed cores make a 384 x 384 eigh 100x slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional; without it BLAS keeps its own setting
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def plan_from_masks(problem, masks, **fields) -> Plan:
    return Plan(
        kept={layer.index: np.flatnonzero(m).tolist() for layer, m in zip(problem.layers, masks)},
        removed={
            layer.index: np.flatnonzero(~m).tolist() for layer, m in zip(problem.layers, masks)
        },
        **fields,
    )


def solve(
    problem, solver: str = "exact", time_limit: float = 60.0, check: bool = True, **options
) -> Plan:
    if solver not in SOLVERS:
        raise UserError(f"unknown solver {solver!r}; choose one of {', '.join(sorted(SOLVERS))}")
    if not time_limit > 0:
        raise UserError(f"time limit {time_limit} must be positive")
    start = time.perf_counter()
    precheck(problem)
    refused = refusal(solver, problem)  # the one place capabilities are enforced
    if refused:
        raise SolverError(refused)
    with _small_blas():
        outcome = SOLVERS[solver](time_limit=time_limit, **options).run(problem)
    seconds = time.perf_counter() - start
    objective = float(
        sum(
            problem.objective.layer_value(layer, m)
            for layer, m in zip(problem.layers, outcome.masks)
        )
    )
    bound = outcome.bound
    if bound is not None:
        bound = float(bound)
        if objective < bound <= objective + 1e-7 * max(1.0, abs(objective)):
            bound = objective  # solver tolerance; a larger excess is left for the checker to flag
    merge = outcome.merge_map
    if merge is None:
        merge = {}
        for layer, mask in zip(problem.layers, outcome.masks):
            mapping = problem.objective.merge_map(layer, mask)
            if mapping is not None:
                merge[layer.index] = mapping
    plan = plan_from_masks(
        problem,
        outcome.masks,
        status=outcome.status,
        objective=objective,
        bound=bound,
        gap=relative_gap(objective, bound),
        solver=solver,
        seconds=seconds,
        merge_map=merge,
        model=problem.model,
        provenance={
            **problem.provenance,
            **problem.describe(),
            "objective_terms": problem.objective.to_json(),
            "budget_spec": problem.budget.to_json(),
            "constraint_specs": [c.to_json() for c in problem.constraints],
            "time_limit": time_limit,
            **outcome.info,
        },
    )
    caps = [c for c in problem.constraints if isinstance(c, MemoryCap)]
    if caps:  # the first memory cap's placement: what `grape solve` prints as the device table
        plan.placement = caps[0].placement_table(problem, outcome.masks)
    if check:
        assert_valid(plan, problem)
    return plan
