"""benchmarks/default_quality.py measures exactly `grape run`'s defaults: its configuration is the
CLI's own, and its verdicts follow the acceptance rule (no worse than the best uniform + 1 SE)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import default_quality  # noqa: E402


def test_the_benchmarked_configuration_is_grape_runs(tmp_path):
    from grape.cli.main import build_parser
    from grape.cli.commands.run import resolve_settings, run_config

    config, argv = default_quality.default_config("olmoe-32x4", 0.5, 1, tmp_path / "out")
    args = build_parser().parse_args(argv)
    resolve_settings(args)
    assert run_config(args) == config  # the same RunConfig `grape run` builds from this command line
    # nothing benchmark-only: the search and calibration are the library defaults, as the CLI resolves them
    assert config.search.max_passes == 200 and config.search.tokens == 16384 and config.search.confirm
    assert config.search_data is None and config.calibration.seed == 1
    assert argv[1:] == ["--model", str(default_quality.ZOO / "models" / "olmoe-32x4"), "--data",
                        str(default_quality.CALIBRATION), "--budget", "0.5", "--seed", "1", "--out",
                        str(tmp_path / "out"), "--no-progress"]
    assert default_quality.relative(argv[1:5]) == ["--model", "benchmarks/zoo/models/olmoe-32x4", "--data",
                                                    "grape/assets/heldout/calibration.jsonl"]


def _cell(model, seed, default, best, diff, se):
    rows = {"default": {"increase": default, "se": 0.01}, "uniform reap": {"increase": best * 2, "se": 0.01},
            "uniform reconstruction": {"increase": best, "se": 0.01}}
    return {"model": model, "seed": seed, "budget": 0.5, "rows": rows, "best_uniform": "uniform reconstruction",
            "default_minus_best": diff, "default_minus_best_se": se, "ratio_to_best": default / best,
            "ratio_to_reap": default / (best * 2), "chosen": "x", "passes": 10, "search_tokens": 100,
            "confirmed": 5, "confirm_tokens": 400}


def test_verdicts_follow_the_acceptance_rule():
    within = _cell("olmoe-32x4", 0, 0.105, 0.1, 0.005, 0.006)  # worse, but within one SE
    beyond = _cell("olmoe-32x4", 1, 0.12, 0.1, 0.02, 0.006)
    assert default_quality.verdict(within) and not default_quality.verdict(beyond)
    text = default_quality.table([within, beyond])
    assert text.count("**worse**") == 1
    lines = default_quality.summary([within, beyond])
    assert "**1 of 2** cells" in lines[0] and "**0 of 1** models" in lines[1]
