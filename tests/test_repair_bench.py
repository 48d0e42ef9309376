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


def _checked(run: dict, budget: str, difference: float, kept: bool) -> dict:
    for model in run["models"]:
        model["budgets"][budget]["rows"]["lstsq"]["check"] = {
            "tokens": 1000, "documents": 9, "unrepaired": 3.0, "repaired": 3.0 + difference,
            "difference": difference, "se": 0.002, "kept": kept}
    return run


def test_the_check_decides_what_grape_run_keeps():
    kept = _checked(_run(0, 0.15, 0.09, (-0.06, 0.004)), "0.5", -0.01, True)
    undone = _checked(_run(1, 0.16, 0.17, (0.01, 0.004)), "0.5", 0.002, False)
    small = _run(0, 0.0008, 0.0011, (0.0003, 0.0001))  # removal costs < 0.001: the difference is shown
    small["models"][0]["model"] = "mixtral-8x2-upcycled"
    text = repair_bench.render_defaults([kept, undone, _checked(small, "0.5", 0.0001, True)])
    assert "| -0.0100 ± 0.0020 | 0.60 |" in text  # kept: the repair's ratio
    assert "| +0.0020 ± 0.0020 | 1.00 (undone) |" in text  # undone: plain removal
    table = repair_bench.compact_defaults([kept, undone])
    assert "| olmoe-32x4 | 0.60 / 1.00 u |" in table
    # worse than plain removal beyond one SE is bold, where the check kept it
    assert "| mixtral-8x2-upcycled | **+0.0003** |" in repair_bench.compact_defaults([_checked(small, "0.5", 0.0001, True)])


def test_runs_of_one_seed_with_other_methods_are_combined():
    lstsq = _run(0, 0.15, 0.09, (-0.06, 0.004))
    experts = _run(0, 0.15, 0.05, (-0.10, 0.004))
    experts["settings"]["methods"] = ["none", "lstsq+experts"]
    experts["models"][0]["budgets"]["0.5"]["rows"]["lstsq+experts"] = experts["models"][0]["budgets"]["0.5"]["rows"].pop("lstsq")
    other_seed = _run(1, 0.16, 0.12, (-0.04, 0.004))
    runs = repair_bench.combine_methods([lstsq, experts, other_seed])
    assert len(runs) == 2 and runs[0]["settings"]["methods"] == ["none", "lstsq", "lstsq+experts"]
    rows = runs[0]["models"][0]["budgets"]["0.5"]["rows"]
    assert set(rows) == {"none", "lstsq", "lstsq+experts"}
    text = repair_bench.render_defaults(runs)  # the default (lstsq+experts) decides, lstsq alone beside it
    assert "| lstsq alone |" in text and "| olmoe-32x4 | 50.0% | 0 | +0.1500 ± 0.0010 | 0.60 | +0.0500 ± 0.0010 | 0.33 |" in text
