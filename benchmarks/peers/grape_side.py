"""GRAPE's rows of the peers table, measured the way the peers are: `grape run` with no flag but
--model, --data (the calibration text) and --budget, in a process of its own (wall seconds and
peak RSS of that process, as benchmarks/peers/prune.py measures a peer), its pruned checkpoint
then loaded and measured by the same code as every peer's (run.py's checkpoint_nll: default_quality's
test windows and test_nll), so every peer is compared with it paired by document.

Whether that checkpoint reproduces default_quality.json's seed-0 cell (the same defaults through
the stage functions, measured in memory) is recorded next to it. The best uniform plan's row is
the cell's (every uniform criterion, the lowest on the test split, chosen after the fact).

`grape run` records and their per-window NLLs are cached in benchmarks/results/cache/peers/<model>/
(keyed by the test windows' digest), so each (model, budget) runs once.
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
    return cache / name / f"grape-run-s{SEED}-{round(budget * 100)}.json"


# A small interpreter starts each measured command and reports that child's own peak RSS. The
# measured process must not be forked from this one: on Linux a child's ru_maxrss starts from
# the resident size of the process it was forked from (kept across exec), so a command started
# from a benchmark holding torch and a model reports at least that (`python -c pass`: 1.3 GB
# from a pytest process).
_LAUNCHER = ("import os, subprocess, sys\n"
             "child = subprocess.Popen(sys.argv[2:])\n"
             "_, status, usage = os.wait4(child.pid, 0)\n"
             "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
             "sys.exit(os.waitstatus_to_exitcode(status))\n")


def timed(cmd: list[str], log_path: Path, env: dict) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS MiB) of `cmd`, its output in `log_path`, started by
    _LAUNCHER so that the peak is the command's own."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="grape-timed-") as tmp:
        peak_file = Path(tmp) / "maxrss"
        start = time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as log_file:
            code = subprocess.call([sys.executable, "-c", _LAUNCHER, str(peak_file), *cmd],
                                   stdout=log_file, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - start
        peak = int(peak_file.read_text()) / 1024.0 if peak_file.exists() else float("nan")  # Linux: KiB
    return code, seconds, peak


# `grape run`'s stages (summary.json "seconds") that are not its pruning step: the unpruned model's
# evaluation, the other solvers' plans compared on the same problem, the report
NOT_PRUNING = ("eval_before", "baselines", "report")


def pruning_seconds(stages: dict) -> float:
    """Calibration, solve, search, apply (with the pruned model's evaluation, which `grape run`
    times together with it) and save: what a peer's step does, and a little more."""
    return round(sum(v for k, v in stages.items() if k not in NOT_PRUNING), 1)


def grape_run(argv: list[str], out: Path, threads: int, log) -> dict:
    """`grape run ARGV --out OUT` in a process of its own, timed and measured like a peer's
    pruning step; what it chose and kept from its plan.json and summary.json."""
    import os
    import sys

    cmd = [sys.executable, "-m", "grape", *argv, "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"  GRAPE: grape {' '.join(argv[:1])} ... (log {out.name}.log)")
    code, seconds, peak = timed(cmd, out.with_suffix(".log"), env)
    if code != 0:
        tail = out.with_suffix(".log").read_text(encoding="utf-8").strip().splitlines()[-1:]
        raise RuntimeError(f"grape run exited {code}: {tail}")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    plan = json.loads((out / "plan.json").read_text(encoding="utf-8"))
    stages = {k: round(float(v), 1) for k, v in summary["seconds"].items()}
    return {"argv": argv, "kept_experts": {str(k): sorted(int(e) for e in v) for k, v in plan["kept"].items()},
            "chosen": plan.get("provenance", {}).get("search", {}).get("chosen") or plan.get("solver"),
            "process_seconds": round(seconds, 1),
            "stages": stages, "peak_mib": round(peak, 1), "checkpoint": str(out / "checkpoint")}


def cached_run(cache: Path, name: str, budget: float, digest: str) -> dict | None:
    """A `grape run` record with its per-window NLLs, if measured on these windows."""
    path = _cache_path(cache, name, budget)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return record if record.get("windows_digest") == digest else None


def store_run(cache: Path, name: str, budget: float, record: dict) -> dict:
    path = _cache_path(cache, name, budget)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return record


def rows(cell: dict | None, run: dict | None, name: str, budget: float, increase_of) -> list[dict]:
    """The two GRAPE rows of one (model, budget). The default: the `grape run` process (its
    checkpoint measured like a peer's, its seconds and peak memory), checked against
    default_quality.json's seed-0 cell (which ran the same defaults through the stage functions);
    without a run, the cell's numbers (no memory). The best uniform plan: the cell's.
    `increase_of(nll)` -> (increase, se) against the unpruned model on the peers' windows."""
    if cell is None and run is None:
        return []
    out = []
    default = {"model": name, "budget": budget, "tool": "GRAPE default (`grape run`)", "peer": None,
               "ok": True, "peak_mib": None}
    if run is not None:
        inc, se = increase_of(run["nll"])
        default.update(increase=inc, se=se, windows=run["nll"], kept_experts=run["kept_experts"],
                       kept={k: len(v) for k, v in run["kept_experts"].items()}, chosen=run["chosen"],
                       seconds=pruning_seconds(run["stages"]),
                       process_seconds=run.get("process_seconds"),
                       peak_mib=run.get("peak_mib"), **{"from": "grape run"})
        if cell is not None:
            cell_increase = cell["rows"]["default"]["increase"]
            default["cell"] = {"increase": cell_increase, "chosen": cell["chosen"],
                               "reproduced": abs(inc - cell_increase) <= REPRODUCED_TOL}
    else:
        d = cell["rows"]["default"]
        default.update(increase=d["increase"], se=d["se"], chosen=cell["chosen"], kept=cell["kept_per_layer"],
                       seconds=None, **{"from": "default_quality.json"})
    out.append(default)
    if cell is not None:
        best = cell["rows"][cell["best_uniform"]]
        layers = cell["kept_per_layer"]
        each = sum(layers.values()) // len(layers)  # a uniform plan keeps the same count everywhere
        # the cell's own paired difference (default - best uniform, by document); the default's
        # row is the cell's plan only when the run reproduced it
        same = default.get("cell", {}).get("reproduced", run is None)
        out.append({"model": name, "budget": budget, "tool": f"GRAPE best uniform ({cell['best_uniform'][8:]})",
                    "peer": None, "ok": True, "increase": best["increase"], "se": best["se"],
                    "kept": {k: each for k in layers}, "seconds": None, "peak_mib": None,
                    "from": "default_quality.json",
                    **({"vs_default": {"diff": 0.0 - cell["default_minus_best"],
                                       "se": cell["default_minus_best_se"]}} if same else {})})
    return out
