"""GRAPE's rows of the peers table: the default of `grape run` and the best uniform plan, as
benchmarks/default_quality.py measured them (seed 0), and per-window test NLLs of GRAPE's
default plan so that every peer can be compared with it paired by document.

default_quality.json keeps each cell's numbers (increase, SE by document, the default minus the
best uniform plan, paired) and the kept *counts* per layer, but not which experts were kept nor
the per-window NLLs. So the default plan is rebuilt here by default_quality's own functions
(calibrated, default_plan: `grape run`'s parser, settings, calibration and loss-verified search,
seed 0) and measured by its own test_nll on its own test windows. Whether the rebuilt plan
reproduces the cell (same increase) is recorded next to it: a pairing against a different plan
would be wrong, and the table says so.

Rebuilt plans and their per-window NLLs are cached in benchmarks/results/cache/peers/<model>/
(keyed by the test windows' digest), so the expensive search runs once per model and budget.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

SEED = 0  # default_quality's reference seed
REPRODUCED_TOL = 1e-5  # nats: the rebuilt default's increase against the cell's (float noise ~2e-6)


def windows_digest(test: dict) -> str:
    """Digest of the test windows (ids and documents): caches made on other windows are stale."""
    h = hashlib.sha256()
    for domain in sorted(test):
        h.update(domain.encode())
        h.update(test[domain].ids.numpy().tobytes())
        h.update(np.asarray(test[domain].groups, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def cells(results: Path) -> dict[tuple[str, float], dict]:
    """(model, budget) -> default_quality.json's seed-0 cell."""
    path = results / "default_quality.json"
    if not path.is_file():
        return {}
    return {(c["model"], float(c["budget"])): c
            for c in json.loads(path.read_text(encoding="utf-8"))["cells"] if c["seed"] == SEED}


def _cache_path(cache: Path, name: str, budget: float) -> Path:
    return cache / name / f"grape-default-s{SEED}-{round(budget * 100)}.json"


def cached_default(cache: Path, name: str, budget: float, digest: str) -> dict | None:
    """The rebuilt default plan and its per-window NLLs, if measured on these windows."""
    path = _cache_path(cache, name, budget)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return record if record.get("windows_digest") == digest else None


class Rebuilder:
    """Rebuilds GRAPE's default plans of one model with default_quality's own functions; the
    calibration (budget-independent, minutes) runs once, on first need."""

    def __init__(self, dq, name: str, test: dict, digest: str, cache: Path, work: Path):
        self.dq, self.name, self.test, self.digest = dq, name, test, digest
        self.cache, self.work = cache, work
        self.loaded = None
        self.calibration_seconds = None

    def _loaded(self):
        if self.loaded is None:
            start = time.perf_counter()
            self.loaded = self.dq.calibrated(self.name, SEED, self.work / f"{self.name}-{SEED}")
            self.calibration_seconds = time.perf_counter() - start
        return self.loaded

    def default(self, budget: float, log) -> dict:
        """Cached or rebuilt: {"kept_experts", "nll" (domain -> per-window list), ...}."""
        found = cached_default(self.cache, self.name, budget, self.digest)
        if found is not None:
            return found
        loaded = self._loaded()
        log(f"  GRAPE {budget:.0%}: rebuilding `grape run`'s plan (default_quality.default_plan, seed {SEED})")
        start = time.perf_counter()
        plan, search, _, argv = self.dq.default_plan(self.name, budget, SEED, loaded,
                                                     self.work / f"{self.name}-{SEED}-{budget}")
        seconds = time.perf_counter() - start
        nll = self.dq.test_nll(loaded.model, plan, self.test)
        record = {"windows_digest": self.digest, "model": self.name, "seed": SEED, "budget": budget,
                  "argv": self.dq.relative(argv[1:]), "chosen": search.best.name,
                  "kept_experts": {str(k): sorted(int(e) for e in v) for k, v in plan.kept.items()},
                  "search_seconds": round(seconds, 1),
                  "calibration_seconds": round(self.calibration_seconds or 0.0, 1),
                  "nll": {d: [round(float(x), 6) for x in v] for d, v in nll.items()}}
        path = _cache_path(self.cache, self.name, budget)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record) + "\n", encoding="utf-8")
        return record


def rows(cell: dict | None, rebuilt: dict | None, name: str, budget: float, increase_of) -> list[dict]:
    """The two GRAPE rows of one (model, budget): numbers from the cell; per-window NLLs of the
    default from the rebuilt plan. `increase_of(nll)` -> (increase, se) against the unpruned model
    on the peers' windows (the same function default_quality uses)."""
    if cell is None and rebuilt is None:
        return []
    out = []
    default = {"model": name, "budget": budget, "tool": "GRAPE default (`grape run`)", "peer": None,
               "ok": True, "peak_mib": None, "from": "default_quality.json" if cell else None}
    if rebuilt is not None:
        inc, se = increase_of(rebuilt["nll"])
        default.update(windows=rebuilt["nll"], kept_experts=rebuilt["kept_experts"],
                       kept={k: len(v) for k, v in rebuilt["kept_experts"].items()},
                       rebuilt={"increase": inc, "se": se, "chosen": rebuilt["chosen"],
                                "search_seconds": rebuilt["search_seconds"]})
    if cell is not None:
        d = cell["rows"]["default"]
        default.update(increase=d["increase"], se=d["se"], chosen=cell["chosen"],
                       kept=cell["kept_per_layer"], seconds=cell.get("search_seconds"))
        if rebuilt is not None:
            default["rebuilt"]["reproduced"] = abs(default["rebuilt"]["increase"] - d["increase"]) <= REPRODUCED_TOL
    else:  # the cell is not in default_quality.json yet: the rebuilt plan is the default
        default.update(increase=default["rebuilt"]["increase"], se=default["rebuilt"]["se"],
                       chosen=rebuilt["chosen"], seconds=rebuilt["search_seconds"],
                       **{"from": "rebuilt here (no default_quality.json cell yet)"})
        default["rebuilt"]["reproduced"] = None
    out.append(default)
    if cell is not None:
        best = cell["rows"][cell["best_uniform"]]
        layers = cell["kept_per_layer"]
        each = sum(layers.values()) // len(layers)  # a uniform plan keeps the same count everywhere
        out.append({"model": name, "budget": budget, "tool": f"GRAPE best uniform ({cell['best_uniform'][8:]})",
                    "peer": None, "ok": True, "increase": best["increase"], "se": best["se"],
                    "kept": {k: each for k in layers}, "seconds": None, "peak_mib": None,
                    "from": "default_quality.json",
                    # the cell's own paired difference (default - best uniform, by document)
                    "vs_default": {"diff": 0.0 - cell["default_minus_best"], "se": cell["default_minus_best_se"]}})
    return out
