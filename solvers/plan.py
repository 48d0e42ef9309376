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
* ``provenance``: free-form — scores fingerprint, objective, budget, constraints;
* ``placement``: only under a memory cap (``--memory-cap`` / ``--fit``): one entry per device,
  ``{"device": i, "layers": [decoder layers], "bytes": kept bytes, "cap": bytes}``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from solvers._io import atomic_write_text
from solvers.errors import PlanError
from solvers.inputfiles import read_input

FORMAT = "grape.plan"
VERSION = 1
STATUSES = ("optimal", "feasible", "time_limit")


def _index(value, where: str) -> int:
    """A layer or expert index: an int, or a string of one (JSON object keys are strings)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PlanError(f"plan `{where}`: {value!r} is not a whole-number index")
    return int(value)


def _indices(values, where: str) -> list[int]:
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise PlanError(f"plan `{where}` must be a list of expert indices, got {type(values).__name__}")
    return sorted(_index(v, where) for v in values)


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
    placement: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("kept", "removed", "merge_map", "model", "provenance"):
            if not isinstance(getattr(self, name), dict):
                raise PlanError(f"plan `{name}` must be an object, got {type(getattr(self, name)).__name__}")
        for name in ("objective", "bound", "gap", "seconds"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))):
                raise PlanError(f"plan `{name}` must be a number, got {value!r}")
        self.kept = {_index(k, "kept"): _indices(v, f"kept[{k}]") for k, v in self.kept.items()}
        self.removed = {_index(k, "removed"): _indices(v, f"removed[{k}]") for k, v in self.removed.items()}
        self.merge_map = {
            _index(k, "merge_map"): {_index(a, "merge_map"): _index(b, "merge_map") for a, b in v.items()}
            for k, v in self.merge_map.items()
        }
        if not isinstance(self.placement, list) or any(
            not isinstance(row, dict) or not {"device", "layers", "bytes", "cap"} <= set(row)
            for row in self.placement
        ):
            raise PlanError('plan `placement` must be a list of {"device", "layers", "bytes", "cap"}')
        self.placement = [
            {**row, "device": _index(row["device"], "placement"),
             "layers": _indices(row["layers"], "placement"),
             "bytes": int(row["bytes"]), "cap": int(row["cap"])}
            for row in self.placement
        ]
        if self.status not in STATUSES:
            raise PlanError(f"plan status {self.status!r} is not one of {STATUSES}")
        if sorted(self.kept) != sorted(self.removed):
            raise PlanError("plan `kept` and `removed` must list the same layers")
        for layer in self.kept:
            if any(e < 0 for e in self.kept[layer] + self.removed[layer]):
                raise PlanError(f"layer {layer}: expert indices must not be negative")
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

    def below_top_k(self, top_k: dict[int, int]) -> dict[int, tuple[int, int]]:
        """Layers keeping fewer experts than the router picks per token: {layer: (kept, top_k)}.
        Applying such a plan lowers top_k there, which changes the model's routing."""
        return {layer: (len(self.kept[layer]), int(top_k[layer])) for layer in self.layers
                if layer in top_k and len(self.kept[layer]) < int(top_k[layer])}

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
            **({"placement": self.placement} if self.placement else {}),
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
            placement=data.get("placement") or [],
        )

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        if not os.path.exists(path):
            raise PlanError(f"plan file {str(path)!r} does not exist; create one with `grape solve`")
        if os.path.isdir(path):
            raise PlanError(f"{str(path)!r} is a directory, not a plan file (JSON)")
        # /dev/zero would be read forever; a pipe is read once, with a size limit
        raw = read_input(path, "plan file (JSON)", PlanError)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"plan file {str(path)!r} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise PlanError(f"plan file {str(path)!r} holds a JSON {type(data).__name__}, not a plan object")
        try:
            return cls.from_json(data)
        except PlanError as exc:
            raise PlanError(f"plan file {str(path)!r}: {exc}") from exc
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
            raise PlanError(f"plan file {str(path)!r} is damaged ({type(exc).__name__}: {exc}); "
                            "re-create it with `grape solve`") from exc


def format_placement(rows: list[dict], sizes: str = "") -> str:
    """The plan's per-device memory table: what each device holds against its cap. `sizes`: the
    plan's ``provenance["sizes"]`` (where the byte counts come from)."""
    from solvers.constraints.units import format_bytes

    parts = all("other" in row for row in rows) and not sizes.startswith("routed experts only")
    if parts:
        head = ("  per device (kept routed experts + other parts + KV cache"
                + (f"; sizes {sizes}" if sizes else "") + "):")
        lines = [head, f"    {'device':>6}  {'layers':<14} {'experts':>11} {'other':>11} {'kv':>11}"
                       f" {'total':>11}  {'cap':>11}  {'used':>6}"]
    else:
        lines = ["  per device (kept routed-expert bytes; attention, embeddings, shared experts and KV "
                 "cache are not in the scores file, so --kv-reserve must cover them):",
                 f"    {'device':>6}  {'layers':<14} {'kept':>11}  {'cap':>11}  {'used':>6}"]
    for row in rows:
        layers = row["layers"]
        span = (f"{layers[0]}-{layers[-1]}" if layers else "-") + f" ({len(layers)})"
        used = 100 * row["bytes"] / row["cap"] if row["cap"] else float("inf")
        middle = (f"{format_bytes(row['experts']):>11} {format_bytes(row['other']):>11} "
                  f"{format_bytes(row['kv']):>11} " if parts else "")
        lines.append(f"    {row['device']:>6}  {span:<14} {middle}{format_bytes(row['bytes']):>11}  "
                     f"{format_bytes(row['cap']):>11}  {used:5.1f}%")
    return "\n".join(lines)
