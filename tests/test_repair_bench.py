"""benchmarks/repair_bench.py's section on `grape run`'s own plans: the runs of each seed merged
into the results, one row per model, budget and seed, with the ratio and the paired gain."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import repair_bench  # noqa: E402

SETTINGS = {"split": "test", "max_docs": None, "fit_rows": 128, "seq_len": 256, "threads": 1,
            "machine": "x86_64, torch test"}


def _row(increase: float, seconds: float) -> dict:
    domains = {d: {"increase": increase, "se": 0.001} for d in repair_bench.DOMAINS}
    return {"nll_increase": {"mean": {"increase": increase, "se": 0.001}, **domains}, "fit_seconds": seconds,
            "fit_peak_extra_mb": 1.0, "repair": {"layers": []}}


def _run(seed: int, none: float, lstsq: float, vs: tuple[float, float]) -> dict:
    rows = {"none": _row(none, 0.0), "lstsq": {**_row(lstsq, 12.0), "vs_none": list(vs)}}
    return {"settings": {**SETTINGS, "plans": f"default:{seed}", "methods": ["none", "lstsq"]},
            "models": [{"model": "olmoe-32x4", "budgets": {"0.5": {"kept_per_layer": {}, "rows": rows}}}]}


def test_merge_defaults_writes_one_row_per_seed_and_keeps_the_rest(tmp_path):
    (tmp_path / "repair.json").write_text(json.dumps({"settings": SETTINGS, "models": [], "ridge_sweeps": []}))
    files = []
    for seed, (none, fixed) in enumerate([(0.15, 0.09), (0.16, 0.12)]):
        files.append(tmp_path / f"s{seed}.json")
        files[-1].write_text(json.dumps(_run(seed, none, fixed, (fixed - none, 0.004))))
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({**_run(0, 0.15, 0.1, (-0.05, 0.01)), "settings": {**SETTINGS, "split": "validation"}}))
    assert repair_bench.merge_defaults(files, tmp_path, [sweep, sweep]) == 0
    text = (tmp_path / "repair.md").read_text()
    assert "# The default: `grape run`'s plans, repaired" in text
    assert "| olmoe-32x4 | 50.0% | 0 | +0.1500 ± 0.0010 | +0.0900 ± 0.0010 | 0.60 | -0.0600 ± 0.0040 | 12 |" in text
    assert "| olmoe-32x4 | 50.0% | 1 | +0.1600 ± 0.0010 | +0.1200 ± 0.0010 | 0.75 |" in text
    assert "# Choosing the ridge and the rows (validation split)" in text
    data = json.loads((tmp_path / "repair.json").read_text())
    assert len(data["default_plans"]) == 2 and len(data["ridge_sweeps"]) == 1  # a repeated sweep counts once
