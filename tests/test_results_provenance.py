"""Committed results name the command that regenerates them, without this machine's paths
(issue 21, item 6)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import provenance  # noqa: E402

MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|tmp|home|root|Users|private|var/folders)/")


def _committed(*patterns: str) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    return [ROOT / p for p in listed if p.endswith((".json", ".md"))]


def test_no_committed_result_or_doc_holds_a_machine_path():
    files = _committed("benchmarks/results", "docs", "README.md")
    assert files, "git ls-files found nothing: run from a checkout"
    found = {str(p.relative_to(ROOT)): MACHINE_PATH.findall(p.read_text(encoding="utf-8"))
             for p in files}
    assert {k: v for k, v in found.items() if v} == {}


def test_scrub_makes_checkout_paths_relative_and_scratch_folders_out(tmp_path):
    inside = f"{provenance.ROOT}/benchmarks/results/partB"
    scratch = f"{tmp_path}/run one"
    text = provenance.scrub(f"--out {inside}; --work {tmp_path}/qa; wrote {tmp_path}/x/streamed (ok)")
    assert text == "--out benchmarks/results/partB; --work OUT; wrote OUT (ok)"
    assert MACHINE_PATH.search(provenance.scrub(scratch.replace(" ", ""))) is None


def test_partial_reruns_and_merges_list_commands_flat():
    first = {"command": "python benchmarks/quality.py"}
    rerun = {"commands": provenance.commands(first) + ["python benchmarks/quality.py --only a"]}
    merged = provenance.commands(rerun) + provenance.commands({"command": "python benchmarks/quality.py --models b"})
    assert merged == ["python benchmarks/quality.py", "python benchmarks/quality.py --only a",
                      "python benchmarks/quality.py --models b"]
    text = provenance.describe({"commands": merged})
    assert text.count("`") == 6 and "; then " in text and "`;" not in text.replace("`; then", "")
