"""benchmarks/repair_ranking.py's decision rule and table: the search's final rule replayed on
the confirmation windows, plain and after repair, and the table that says whether a repaired
judgement would have picked another plan."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import repair_ranking  # noqa: E402

GROUPS = np.repeat(np.arange(10), 2)  # 20 windows of 10 documents


def _row(plain: np.ndarray, kept: np.ndarray, test: float) -> dict:
    return {"confirm_plain": float(plain.mean()), "confirm_repaired": float(kept.mean()), "kept": True,
            "confirm_kept": float(kept.mean()), "fit_seconds": 1.0,
            "confirm_windows": {"plain": plain.tolist(), "kept": kept.tolist()}, "test_increase": [test, 0.001]}


def _windows(level: float, seed: int) -> np.ndarray:
    return level + 0.01 * np.random.default_rng(seed).standard_normal(20)


def test_the_default_needs_the_margin_to_replace_the_best_uniform_plan():
    base = _windows(4.0, 0)
    # far ahead plain; repaired, a hair ahead on average with window-to-window noise
    rows = {"default": _row(base - 0.05, base + _windows(-0.001, 2), 0.01),
            "uniform reap": _row(base, base, 0.02)}
    assert repair_ranking.seed_rule(rows, "plain", GROUPS, uniform_default=False) == "default"
    assert repair_ranking.seed_rule(rows, "kept", GROUPS, uniform_default=False) == "uniform reap"
    # grape run's rivals: only the best other uniform plans on plain NLL take part
    rows["uniform ean"] = _row(base + 0.1, base - 0.01, 0.005)  # worst plain, best repaired
    assert repair_ranking.seed_rule(rows, "kept", GROUPS, uniform_default=False) == "uniform ean"
    assert repair_ranking.seed_rule(rows, "kept", GROUPS, uniform_default=False, rivals=1) == "uniform reap"
    del rows["uniform ean"]
    # a default that is itself a uniform plan competes as one: the lowest wins, no margin
    assert repair_ranking.seed_rule(rows, "kept", GROUPS, uniform_default=True) == "default"


def test_the_table_counts_the_cells_where_a_repaired_judgement_would_change_the_plan():
    base = _windows(4.0, 1)
    rows = {"default": _row(base - 0.05, base - 0.001, 0.010), "uniform reap": _row(base, base - 0.002, 0.008)}
    rows["uniform reap"]["test_minus_default"] = [-0.002, 0.0005]
    changed = {"model": "olmoe-32x4", "budget": 0.5, "seed": 0, "rows": rows, "uniform_default": False,
               "confirm_groups": GROUPS.tolist()}
    changed.update(repair_ranking.picks(changed))
    assert changed["plain_pick"] == "default" and changed["repaired_pick"] == changed["rivals_pick"] == "uniform reap"
    same = {**changed, "seed": 1, "repaired_pick": "default", "repaired_pick_minus_default": [0.0, 0.0],
            "rivals_pick": "default", "rivals_pick_minus_default": [0.0, 0.0]}
    text = repair_ranking.render([changed, same])
    assert "| olmoe-32x4 | 50.0% | 0 |" in text and "| default | uniform reap | uniform reap |" in text
    assert "another plan than the default in 1 of 2 cells; lower on the test split beyond one SE in 1, " \
           "higher beyond one SE in 0" in text
