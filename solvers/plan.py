"""The plan file: which experts each MoE layer keeps, and how that choice was made.

JSON keys (version 1), readable by any tool:

* ``kept`` / ``removed``: objects mapping the decoder-layer index (a string) to a sorted list
  of expert indices (original numbering);
* ``merge_map``: optional, ``{layer: {removed_expert: kept_expert}}`` (strings as keys) — where
  each removed expert is folded when the plan is applied with ``merge``;
* ``status`` (``optimal`` / ``feasible`` / ``time_limit``), ``objective``, ``bound`` (a proven
  lower bound on the objective, ``null`` if the solver gives none), ``gap`` (relative, ``null``
  when unknown), ``solver``, ``seconds``;
* ``model``: the identity of the model the scores came from (see :mod:`solvers.scores`);
* ``provenance``: free-form — scores fingerprint, objective, budget, constraints.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from solvers._io import atomic_write_text
from solvers.errors import PlanError

FORMAT = "grape.plan"
VERSION = 1
STATUSES = ("optimal", "feasible", "time_limit")


@dataclass
class Plan:
    kept: dict[int, list[int]]
    removed: dict[int, list[int]]
    status: str = "feasible"
    objective: float = float("nan")
    bound: float | None = None
    gap: float | None = None
    solver: str = ""
    seconds: float = 0.0
    merge_map: dict[int, dict[int, int]] = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kept = {int(k): sorted(int(e) for e in v) for k, v in self.kept.items()}
        self.removed = {int(k): sorted(int(e) for e in v) for k, v in self.removed.items()}
        self.merge_map = {
            int(k): {int(a): int(b) for a, b in v.items()} for k, v in self.merge_map.items()
        }
        if self.status not in STATUSES:
            raise PlanError(f"plan status {self.status!r} is not one of {STATUSES}")
        if sorted(self.kept) != sorted(self.removed):
            raise PlanError("plan `kept` and `removed` must list the same layers")
        for layer in self.kept:
            overlap = set(self.kept[layer]) & set(self.removed[layer])
            if overlap:
                raise PlanError(f"layer {layer}: experts {sorted(overlap)} are both kept and removed")

    # -- summaries ----------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted(self.kept)

    def kept_counts(self) -> dict[int, int]:
        return {layer: len(self.kept[layer]) for layer in self.layers}

    @property
    def num_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())

    @property
    def num_kept(self) -> int:
        return sum(len(v) for v in self.kept.values())

    @property
    def is_uniform(self) -> bool:
        """Every layer keeps the same count: the checkpoint loads in vanilla transformers/vLLM."""
        return len(set(self.kept_counts().values())) <= 1

    # -- JSON round trip ----------------------------------------------------------------
    def to_json(self) -> dict:
        def num(x):
            return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)

        return {
            "format": FORMAT,
            "version": VERSION,
            "kept": {str(k): v for k, v in sorted(self.kept.items())},
            "removed": {str(k): v for k, v in sorted(self.removed.items())},
            "merge_map": {
                str(k): {str(a): b for a, b in sorted(v.items())}
                for k, v in sorted(self.merge_map.items())
            },
            "status": self.status,
            "objective": num(self.objective),
            "bound": num(self.bound),
            "gap": num(self.gap),
            "solver": self.solver,
            "seconds": float(self.seconds),
            "model": self.model,
            "provenance": self.provenance,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        for key in ("kept", "removed", "status", "solver"):
            if key not in data:
                raise PlanError(f"plan is missing the key {key!r}")
        if data.get("version", 1) > VERSION:
            raise PlanError(f"plan format version {data['version']} is newer than this GRAPE reads")
        objective = data.get("objective")
        return cls(
            kept=data["kept"],
            removed=data["removed"],
            status=data["status"],
            objective=float("nan") if objective is None else float(objective),
            bound=data.get("bound"),
            gap=data.get("gap"),
            solver=data["solver"],
            seconds=float(data.get("seconds", 0.0)),
            merge_map=data.get("merge_map") or {},
            model=data.get("model") or {},
            provenance=data.get("provenance") or {},
        )

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        if not os.path.exists(path):
            raise PlanError(f"plan file {str(path)!r} does not exist; create one with `grape solve`")
        try:
            with open(path) as handle:
                data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan file {str(path)!r} is not valid JSON: {exc}") from exc
        return cls.from_json(data)
