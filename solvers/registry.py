"""The solver contract and registry: one class per solver, found by name in :data:`SOLVERS`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

SOLVERS: dict[str, type["Solver"]] = {}


def register_solver(cls):
    SOLVERS[cls.name] = cls
    return cls


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

    def __init__(self, time_limit: float = 60.0, **options):
        self.time_limit = float(time_limit)
        self.options = options
        self.start = time.perf_counter()

    @property
    def deadline(self) -> float:
        return self.start + self.time_limit

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.perf_counter())

    def run(self, problem) -> Outcome:
        raise NotImplementedError
