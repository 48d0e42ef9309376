"""benchmarks/reconstruction_cost.py (what the `reconstruction` criterion costs) and the --cost
flag of benchmarks/calibration_bench.py, which runs it: the stored results are the report of the
stored numbers, and both commands rewrite them from the json (seconds, no model)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import calibration_bench  # noqa: E402
import reconstruction_cost  # noqa: E402

STORED = reconstruction_cost.RESULTS


def test_the_stored_results_are_the_report_of_the_stored_numbers():
    result = json.loads((STORED / "calibration_cost.json").read_text())
    result["projection"] = reconstruction_cost.cost_projection(result["rounds"], result["greedy"])
    assert (STORED / "calibration_cost.md").read_text() == reconstruction_cost.cost_report(result)


@pytest.mark.parametrize("argv", [["reconstruction_cost.py", "--report-only"],
                                  ["calibration_bench.py", "--cost", "--report-only"]])
def test_both_commands_write_the_cost_results(tmp_path, monkeypatch, argv):
    shutil.copy(STORED / "calibration_cost.json", tmp_path)
    monkeypatch.setattr(reconstruction_cost, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", argv)
    (calibration_bench if argv[0] == "calibration_bench.py" else reconstruction_cost).main()
    assert (tmp_path / "calibration_cost.md").read_text() == (STORED / "calibration_cost.md").read_text()
    assert not (tmp_path / "calibration.md").exists()  # the calibration benchmark's own report is untouched
