"""benchmarks/peers/: --dry-run lists every step without a peer's virtual environment,
--report-only regenerates the committed table from the committed JSON (one command, no rerun),
GRAPE's default row is a `grape run` process measured like a peer (checked against default_quality.json's
cell), the best uniform row the cell's, and a Mixtral checkpoint with llm-compressor's tensor names is
renamed, values unchanged, before it is measured."""

from __future__ import annotations

import json
import os
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
    grape = [line for line in done.stdout.splitlines() if "grape run --model" in line]
    assert len(grape) == 2 * 2  # `grape run` per model x budget


def test_only_splits_the_work_between_peers_and_grape():
    peers = _run("--dry-run", "--only", "peers", "--models", "olmoe-32x4", "--budgets", "0.5")
    grape = _run("--dry-run", "--only", "grape", "--models", "olmoe-32x4", "--budgets", "0.5")
    assert peers.returncode == 0 and grape.returncode == 0, peers.stderr + grape.stderr
    assert "prune.py" in peers.stdout and "grape run --model" not in peers.stdout
    assert "grape run --model" in grape.stdout and "prune.py" not in grape.stdout
    cached = _run("--dry-run", "--no-grape-run", "--models", "olmoe-32x4", "--budgets", "0.5")
    assert cached.returncode == 0, cached.stderr
    assert "cached `grape run` only" in cached.stdout and "grape run --model" not in cached.stdout


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


def _run_record():
    return {"chosen": "exact curves", "kept_experts": {"0": [0, 1, 2, 3, 4, 5], "1": [1, 7]},
            "stages": {"calibrate": 2.0, "search": 9.0, "eval_before": 9.0}, "process_seconds": 20.0,
            "peak_mib": 640.0, "nll": {"prose": [1.0, 2.0]}}


def test_grape_default_row_is_the_run_checked_against_the_cell():
    rows = grape_side.rows(_cell(), _run_record(), "m", 0.5, lambda nll: (0.10, 0.01))
    default, uniform = rows
    assert default["increase"] == 0.10 and default["seconds"] == 11.0 and default["peak_mib"] == 640.0
    assert default["cell"]["reproduced"] and default["windows"] == {"prose": [1.0, 2.0]}
    assert default["kept"] == {"0": 6, "1": 2}
    assert uniform["tool"] == "GRAPE best uniform (reap_mass)" and uniform["kept"] == {"0": 4, "1": 4}
    assert uniform["vs_default"] == {"diff": 0.04, "se": 0.005}  # the cell's own paired difference
    drifted = grape_side.rows(_cell(), _run_record(), "m", 0.5, lambda nll: (0.12, 0.01))
    assert drifted[0]["cell"]["reproduced"] is False and drifted[0]["increase"] == 0.12
    assert "vs_default" not in drifted[1]  # another plan than the cell's: run.py compares it unpaired


def test_grape_rows_without_a_run_take_the_cell_and_without_either_are_empty():
    default, uniform = grape_side.rows(_cell(), None, "m", 0.5, lambda nll: (0, 0))
    assert default["increase"] == 0.10 and default["peak_mib"] is None and "windows" not in default
    assert uniform["vs_default"] == {"diff": 0.04, "se": 0.005}
    alone = grape_side.rows(None, _run_record(), "m", 0.25, lambda nll: (0.03, 0.002))
    assert len(alone) == 1 and alone[0]["increase"] == 0.03 and "cell" not in alone[0]
    assert grape_side.rows(None, None, "m", 0.25, lambda nll: (0, 0)) == []


def test_timed_reports_the_commands_own_peak_memory(tmp_path):
    """Not this process's: a child forked from a process holding torch and models would start its
    ru_maxrss at that process's resident size (1.3 GB under the whole suite)."""
    import torch  # noqa: F401 - this process is large, as run.py's is

    ballast = bytearray(300 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])
    grow = "import sys; b = bytearray(200 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); print('ok')"
    code, seconds, peak = grape_side.timed([sys.executable, "-c", grow], tmp_path / "log", dict(os.environ))
    assert code == 0 and seconds > 0 and (tmp_path / "log").read_text().strip() == "ok"
    assert 200 <= peak < 290
    small = grape_side.timed([sys.executable, "-c", "pass"], tmp_path / "log2", dict(os.environ))
    assert small[2] < 100
    failed = grape_side.timed([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "log3", dict(os.environ))
    assert failed[0] == 3
    del ballast


def test_llmcompressor_mixtral_names_are_renamed_values_unchanged(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    import run as peers_run

    tensors = {"model.layers.0.block_sparse_moe.experts.1.gate_proj.weight": torch.ones(2, 3),
               "model.layers.0.mlp.experts.1.up_proj.weight": torch.full((2, 3), 3.0),
               "model.layers.0.mlp.experts.1.down_proj.weight": torch.full((3, 2), 2.0),
               "model.layers.0.mlp.gate.weight": torch.zeros(4, 3), "model.norm.weight": torch.ones(3)}
    ckpt = tmp_path / "reap-50"
    ckpt.mkdir()
    save_file(tensors, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    out = peers_run.released_names(ckpt)
    got = load_file(str(out / "model.safetensors"))
    assert out != ckpt and json.loads((out / "config.json").read_text()) == {"model_type": "mixtral"}
    assert sorted(got) == ["model.layers.0.block_sparse_moe.experts.1.w1.weight",
                           "model.layers.0.block_sparse_moe.experts.1.w2.weight",
                           "model.layers.0.block_sparse_moe.experts.1.w3.weight",
                           "model.layers.0.block_sparse_moe.gate.weight", "model.norm.weight"]
    assert torch.equal(got["model.layers.0.block_sparse_moe.experts.1.w3.weight"], torch.full((2, 3), 3.0))
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    assert peers_run.released_names(ckpt) == ckpt  # another family: as it is


def test_report_marks_unpaired_differences_failures_and_tools_not_run():
    peer = {"model": "m", "budget": 0.5, "tool": "llm-compressor REAP", "peer": "reap", "ok": True,
            "increase": 0.2, "se": 0.01, "kept": {"0": 4, "1": 4}, "seconds": 3.0, "peak_mib": 500.0,
            "vs_default": {"diff": 0.1, "se": 0.014, "paired": False}}
    failed = {"model": "m", "budget": 0.5, "tool": "compressed-tensors magnitude", "peer": "magnitude",
              "ok": False, "error": "ValueError: no | patterns"}
    grape = grape_side.rows(_cell(), _run_record(), "m", 0.5, lambda nll: (0.10, 0.01))
    data = {"command": "python benchmarks/peers/run.py", "date": "d", "machine": "x", "budgets": [0.5],
            "threads": 1, "calibration": {"file": "f"},
            "not_run": [{"tool": "EvoESAP", "repo": "o/r", "commit": "a" * 40, "reason": "needs CUDA"}],
            "models": [{"name": "m", "calibration_rows": [224, 256], "rows": [peer, failed, *grape]}]}
    text = report.render(data, {"reap": {"label": "llm-compressor REAP", "types": "t"}})
    assert "+0.1000 ± 0.0140 †" in text and "not paired" in text
    assert "| `m` | 50% | compressed-tensors magnitude | cannot run (below)" in text
    assert "ValueError: no \\| patterns" in text  # a pipe in an error does not break the table
    assert "| EvoESAP | `o/r@aaaaaaaaaaaa` | needs CUDA |" in text
    assert "| `m` | 50% | GRAPE default (`grape run`) | +0.1000 ± 0.0100 |  | 6/2 | 11.0 | 640 |" in text
    assert "`m` 224 x 256" in text and "reproduces the cell" in text
    json.dumps(data)  # what run.py writes is plain JSON


def test_pruning_seconds_leave_out_the_unpruned_evaluation_baselines_and_report():
    stages = {"calibrate": 12.0, "solve": 2.0, "search": 200.0, "eval_before": 34.5, "apply_and_eval": 24.2,
              "save": 0.1, "baselines": 62.7, "report": 3.8}
    assert grape_side.pruning_seconds(stages) == 238.3
    row = grape_side.rows(None, {**_run_record(), "stages": stages}, "m", 0.5, lambda nll: (0.1, 0.01))[0]
    assert row["seconds"] == 238.3
