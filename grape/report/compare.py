"""Every solver on every objective for one scores file: the rows of a comparison table.

    rows = compare_solvers(scores, SolveConfig(budget=0.5), ["additive", "coverage"], ["exact", "greedy"])

Used by `grape compare`, `grape run` and the Python API; pure optimisation (no torch).
"""

from __future__ import annotations

import time
from pathlib import Path

from solvers.errors import InfeasibleError, UserError
from solvers.solve import solver_names  # noqa: F401 - the verbs' choice lists read it here

ALL = "all"


def objective_names() -> list[str]:
    """What `--objectives all` runs: every registered objective term, plugins' included (a
    plugin is loaded before the verb's flags are read), in registration order."""
    from solvers.registry import objective_names as registered

    return registered()


def compare_solvers(scores, config, objectives, solvers, progress=None, plan_dir: Path | None = None):
    """Rows of :class:`grape.report.tables.SolverRow`: each solver on each objective.

    An objective the scores cannot support (a UserError while building its problem) is skipped
    with a row saying why, unless it is the only one asked for; an infeasible budget or
    constraint set raises, since no solver could do anything about it. A solver that cannot
    handle the problem gets a row with its message. `plan_dir` receives every plan as
    ``<objective>.<solver>.json``."""
    from dataclasses import replace

    from grape.report.tables import SolverRow, fill_excess
    from solvers.constraints import precheck
    from solvers.solve import solve
    from solvers.spec import BudgetError, build_problem

    rows = []
    for objective in objectives:
        try:
            problem = build_problem(scores, replace(config, objective=objective))
            precheck(problem)
        except (InfeasibleError, BudgetError):
            raise
        except UserError as exc:
            if len(objectives) == 1:
                raise
            rows.append(SolverRow(objective, "(all)", error=f"skipped: {exc}"))
            continue
        for name in solvers:
            if progress:
                progress(f"{objective} / {name}")
            start = time.perf_counter()
            try:
                plan = solve(problem, solver=name, time_limit=config.time_limit)
            except InfeasibleError:
                raise
            except UserError as exc:
                rows.append(SolverRow(objective, name, error=str(exc),
                                      seconds=time.perf_counter() - start))
                continue
            counts = list(plan.kept_counts().values())
            rows.append(SolverRow(objective, name, status=plan.status, value=plan.objective,
                                  bound=plan.bound, gap=plan.gap, seconds=plan.seconds,
                                  kept_min=min(counts), kept_max=max(counts), uniform=plan.is_uniform,
                                  kept_per_layer={str(k): v for k, v in plan.kept_counts().items()}))
            if plan_dir is not None:
                plan.save(Path(plan_dir) / f"{safe_name(objective)}.{name}.json")
    fill_excess(rows)
    return rows


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


__all__ = ["ALL", "compare_solvers", "objective_names", "safe_name", "solver_names"]
