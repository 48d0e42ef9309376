"""benchmarks/peers/run.py: --dry-run lists every step without a peer's virtual environment, and
--report-only regenerates the committed table from the committed JSON (one command, no rerun)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "peers" / "run.py"


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN), *argv], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_dry_run_lists_each_model_budget_and_peer_and_needs_no_venv():
    done = _run("--dry-run", "--models", "olmoe-32x4", "mixtral-8x2", "--budgets", "0.25", "0.5")
    assert done.returncode == 0, done.stderr
    steps = [line for line in done.stdout.splitlines() if "prune.py" in line]
    assert len(steps) == 2 * 2 * 2  # models x budgets x peers (reap, magnitude)
    assert any("olmoe-32x4 50% reap" in s for s in steps) and any("mixtral-8x2 25% magnitude" in s for s in steps)


def test_report_only_regenerates_the_committed_table(tmp_path):
    results = REPO / "benchmarks" / "results"
    shutil.copy(results / "peers.json", tmp_path / "peers.json")
    done = _run("--report-only", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "peers.md").read_text() == (results / "peers.md").read_text()
