"""benchmarks/search_sequential_bench.py's report of part (b): the capped calibration and search,
and `grape run` in a memory cgroup with the mode lines it printed, or the reason it was skipped;
and the committed record shows the run completing under a limit below the checkpoint's size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import search_sequential_bench as bench  # noqa: E402


def _step(peak: int) -> dict:
    return {"rc": 0, "wall_s": 10.0, "cpu_s": 8.0, "peak_rss_bytes": peak}


def _record(run: dict) -> dict:
    return {"environment": {"machine": "x86_64", "cpus": 2, "python": "3.11", "torch": "2"},
            "random": {"layers": 8, "experts": 64, "hidden": 1024, "checkpoint_bytes": 1_690_000_000,
                       "shards": 9, "whole_fp32_bytes": 3_380_000_000, "rss_cap_bytes": 1_350_000_000,
                       "calibration": _step(1_130_000_000), "search": _step(1_150_000_000), "passes": 12,
                       "computed_passes": 11.0, "chosen": "uniform reap", "candidates": 11, "command": "c",
                       "run": run}}


def test_report_shows_the_cgroup_run_and_its_mode_lines():
    run = {**_step(1_230_000_000), "cgroup_limit_bytes": 1_350_000_000, "pruned_bytes": 1_280_000_000,
           "modes": ["grape calibrate: sequential mode (... (this process's cgroup memory limit))"],
           "chosen": "uniform reap"}
    text = bench.markdown(_record(run))
    assert "| `grape run` | cgroup 1.35 GB | **yes** | 10.0 s | 8.0 s | 1.23 GB |" in text
    assert "| `grape calibrate --mode sequential` | 1.35 GB | **yes** |" in text
    assert "cgroup memory limit" in text and "1.28 GB pruned checkpoint" in text


def test_report_says_why_the_cgroup_run_was_skipped():
    text = bench.markdown(_record({"skipped": "no writable memory cgroup on this machine"}))
    assert "| `grape run` |" not in text and "skipped (no writable memory cgroup" in text


def test_committed_record_ran_under_a_limit_below_the_checkpoint():
    record = json.loads((BENCH / "results" / "search_sequential.json").read_text())["random"]
    limit = record["rss_cap_bytes"]
    assert limit < record["checkpoint_bytes"]
    for step in (record["calibration"], record["search"]):
        assert step["rc"] == 0 and step["peak_rss_bytes"] <= limit
    run = record["run"]
    assert run["rc"] == 0 and run["cgroup_limit_bytes"] == limit and run["peak_rss_bytes"] <= limit
    assert any("sequential" in line and "cgroup" in line for line in run["modes"])
