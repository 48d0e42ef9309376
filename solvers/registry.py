"""The solver contract and registry: one class per solver, found by name in :data:`SOLVERS`.

A solver declares what it accepts as class attributes (objective terms, constraint names, and
whether it handles constraints on *which* experts are kept); :func:`solvers.solve.solve` refuses
the rest in one place, through :func:`refusal`, naming a solver that accepts it. The solver
modules import this one, so it imports none of them: the list with the built-in solvers
registered is :func:`solvers.solve.solver_names`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

SOLVERS: dict[str, type["Solver"]] = {}
# the solver a refusal points to first, when it accepts the problem
PREFERRED = ("exact", "greedy", "relaxation", "uniform", "dp")


def register_solver(cls):
    SOLVERS[cls.name] = cls
    return cls


def objective_names() -> list[str]:
    """Every registered objective term, in registration order."""
    from solvers.objectives import TERMS

    return list(TERMS)


def constraint_names() -> list[str]:
    """Every registered constraint, in registration order."""
    from solvers.constraints import CONSTRAINTS

    return list(CONSTRAINTS)


@dataclass
class Outcome:
    """What a solver returns; :func:`solvers.solve.solve` turns it into a checked Plan."""

    masks: list[np.ndarray]  # per layer position, bool kept mask
    status: str  # optimal | feasible | time_limit
    bound: float | None = None  # proven lower bound on the objective
    merge_map: dict[int, dict[int, int]] | None = None  # by decoder-layer index
    info: dict = field(default_factory=dict)  # method details for provenance


class Solver:
    name: ClassVar[str] = ""
    guarantee: ClassVar[str] = ""  # one line, shown in `grape solve --help` and docs
    # what the solver accepts: None means every registered term / constraint
    accepts_terms: ClassVar[frozenset[str] | None] = None
    accepts_constraints: ClassVar[frozenset[str] | None] = None
    # whether it handles constraints that depend on which experts are kept (not only how many)
    expert_level: ClassVar[bool] = True
    # whether it also accepts, beyond `accepts_constraints`, every constraint that acts on each
    # layer alone (allowed counts, layer rules) and adds no rows to the count program
    accepts_per_layer: ClassVar[bool] = False

    def __init__(self, time_limit: float = 60.0, **options):
        self.time_limit = float(time_limit)
        self.options = options
        self.start = time.perf_counter()

    @property
    def deadline(self) -> float:
        return self.start + self.time_limit

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.perf_counter())

    @classmethod
    def unsupported(cls, problem) -> list[str]:
        """What in `problem` this solver does not accept, in words ([] when it accepts it all)."""
        out = []
        if cls.accepts_terms is not None:
            out += [f"objective {n}" for n in problem.objective.names if n not in cls.accepts_terms]
        for c in problem.all_constraints:
            if not cls.expert_level and c.needs_expert_level(problem):
                out.append(f"{c.describe(problem)} (it depends on which experts are kept)")
            elif not cls._accepts(c):
                out.append(c.describe(problem))
        return out

    @classmethod
    def _accepts(cls, constraint) -> bool:
        from solvers.constraints import Constraint

        if cls.accepts_constraints is None or constraint.name in cls.accepts_constraints:
            return True
        per_layer = type(constraint).add_to_model is Constraint.add_to_model
        return cls.accepts_per_layer and per_layer

    def run(self, problem) -> Outcome:
        raise NotImplementedError


def refusal(name: str, problem) -> str | None:
    """One line saying why solver `name` cannot take `problem` and which solver can, or None."""
    missing = SOLVERS[name].unsupported(problem)
    if not missing:
        return None
    able = [s for s in SOLVERS if s != name and not SOLVERS[s].unsupported(problem)]
    able.sort(key=lambda s: (PREFERRED.index(s) if s in PREFERRED else len(PREFERRED), s))
    hint = f"use --solver {able[0]}" if able else "no registered solver accepts it"
    return f"{name} does not handle {', '.join(missing)}; {hint}"
