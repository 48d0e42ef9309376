"""benchmarks/peers/: --dry-run lists every step without a peer's virtual environment,
--report-only regenerates the committed table from the committed JSON (one command, no rerun),
and GRAPE's rows come from default_quality.json's cells, paired only where the plan was rebuilt."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS_DIR = REPO / "benchmarks" / "peers"
RUN = PEERS_DIR / "run.py"
sys.path.insert(0, str(PEERS_DIR))

import grape_side  # noqa: E402
import peers_report as report  # noqa: E402


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN), *argv], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_dry_run_lists_each_model_budget_and_peer_and_needs_no_venv():
    done = _run("--dry-run", "--models", "olmoe-32x4", "mixtral-8x2", "--budgets", "0.25", "0.5")
    assert done.returncode == 0, done.stderr
    steps = [line for line in done.stdout.splitlines() if "prune.py" in line]
    assert len(steps) == 2 * 2 * 2  # models x budgets x peers (reap, magnitude)
    assert any("olmoe-32x4 50% reap" in s for s in steps) and any("mixtral-8x2 25% magnitude" in s for s in steps)
    grape = [line for line in done.stdout.splitlines() if "default_plan" in line]
    assert len(grape) == 2 * 2  # GRAPE's default rebuilt per model x budget


def test_only_splits_the_work_between_peers_and_grape():
    peers = _run("--dry-run", "--only", "peers", "--models", "olmoe-32x4", "--budgets", "0.5")
    grape = _run("--dry-run", "--only", "grape", "--models", "olmoe-32x4", "--budgets", "0.5")
    assert peers.returncode == 0 and grape.returncode == 0, peers.stderr + grape.stderr
    assert "prune.py" in peers.stdout and "default_plan" not in peers.stdout
    assert "default_plan" in grape.stdout and "prune.py" not in grape.stdout
    cached = _run("--dry-run", "--no-rebuild", "--models", "olmoe-32x4", "--budgets", "0.5")
    assert cached.returncode == 0, cached.stderr
    assert "cached rebuild only" in cached.stdout and "default_plan" not in cached.stdout


def test_report_only_regenerates_the_committed_table(tmp_path):
    results = REPO / "benchmarks" / "results"
    shutil.copy(results / "peers.json", tmp_path / "peers.json")
    done = _run("--report-only", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "peers.md").read_text() == (results / "peers.md").read_text()


def _cell(budget=0.5):
    return {"model": "m", "seed": 0, "budget": budget, "chosen": "exact curves",
            "rows": {"default": {"increase": 0.10, "se": 0.01}, "uniform reap_mass": {"increase": 0.14, "se": 0.02}},
            "best_uniform": "uniform reap_mass", "default_minus_best": -0.04, "default_minus_best_se": 0.005,
            "kept_per_layer": {"0": 6, "1": 2}, "search_seconds": 12.5}


def _rebuilt():
    return {"chosen": "exact curves", "kept_experts": {"0": [0, 1, 2, 3, 4, 5], "1": [1, 7]},
            "search_seconds": 11.0, "nll": {"prose": [1.0, 2.0]}}


def test_grape_rows_take_the_cell_and_check_the_rebuilt_plan_reproduces_it():
    rows = grape_side.rows(_cell(), _rebuilt(), "m", 0.5, lambda nll: (0.10, 0.01))
    default, uniform = rows
    assert default["increase"] == 0.10 and default["seconds"] == 12.5 and default["rebuilt"]["reproduced"]
    assert default["windows"] == {"prose": [1.0, 2.0]}
    assert uniform["tool"] == "GRAPE best uniform (reap_mass)" and uniform["kept"] == {"0": 4, "1": 4}
    assert uniform["vs_default"] == {"diff": 0.04, "se": 0.005}  # the cell's own paired difference
    drifted = grape_side.rows(_cell(), _rebuilt(), "m", 0.5, lambda nll: (0.12, 0.01))[0]
    assert drifted["rebuilt"]["reproduced"] is False and drifted["increase"] == 0.10


def test_grape_rows_without_a_cell_use_the_rebuilt_plan_alone():
    rows = grape_side.rows(None, _rebuilt(), "m", 0.25, lambda nll: (0.03, 0.002))
    assert len(rows) == 1 and rows[0]["increase"] == 0.03 and rows[0]["rebuilt"]["reproduced"] is None
    assert grape_side.rows(None, None, "m", 0.25, lambda nll: (0, 0)) == []


def test_report_marks_unpaired_differences_failures_and_tools_not_run():
    peer = {"model": "m", "budget": 0.5, "tool": "llm-compressor REAP", "peer": "reap", "ok": True,
            "increase": 0.2, "se": 0.01, "kept": {"0": 4, "1": 4}, "seconds": 3.0, "peak_mib": 500.0,
            "vs_default": {"diff": 0.1, "se": 0.014, "paired": False}}
    failed = {"model": "m", "budget": 0.5, "tool": "compressed-tensors magnitude", "peer": "magnitude",
              "ok": False, "error": "ValueError: no | patterns"}
    grape = grape_side.rows(_cell(), None, "m", 0.5, lambda nll: (0, 0))
    data = {"command": "python benchmarks/peers/run.py", "date": "d", "machine": "x", "budgets": [0.5],
            "threads": 1, "calibration": {"file": "f", "samples": 64, "seq_len": 256},
            "not_run": [{"tool": "EvoESAP", "repo": "o/r", "commit": "a" * 40, "reason": "needs CUDA"}],
            "models": [{"name": "m", "rows": [peer, failed, *grape]}]}
    text = report.render(data, {"reap": {"label": "llm-compressor REAP", "types": "t"}})
    assert "+0.1000 ± 0.0140 †" in text and "not paired" in text
    assert "| `m` | 50% | compressed-tensors magnitude | cannot run (below)" in text
    assert "ValueError: no \\| patterns" in text  # a pipe in an error does not break the table
    assert "| EvoESAP | `o/r@aaaaaaaaaaaa` | needs CUDA |" in text
    assert "| `m` | 50% | GRAPE default (`grape run`) | +0.1000 ± 0.0100 |  | 6/2 | 12.5 | not recorded |" in text
    json.dumps(data)  # what run.py writes is plain JSON
