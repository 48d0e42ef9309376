"""Scores and plan files round-trip and reject bad input with clear messages."""

import json

import numpy as np
import pytest

from solvers import ModelIdentity, Plan, PlanError, Scores, ScoresError
from solvers.scores import STAT_NAMES, LayerScores


def _scores(n=4, layers=(1, 2), nan=False):
    rng = np.random.default_rng(0)
    ident = ModelIdentity("qwen3_moe", 3, {l: n for l in layers}, {l: 2 for l in layers}, "abc")
    out = {}
    for l in layers:
        stats = {s: rng.random(n) for s in STAT_NAMES}
        if nan:
            stats["gate_sum"][1] = np.nan
        sim = rng.random((n, n))
        out[l] = LayerScores(l, stats, np.full(n, 100, dtype=np.int64), 2.0, {"cka": (sim + sim.T) / 2},
                             np.linspace(1, 0, n + 1))
    return ident, out


def test_scores_round_trip(tmp_path):
    ident, layers = _scores()
    s = Scores(ident, layers, tokens=50)
    s.save(tmp_path / "s.npz")
    t = Scores.load(tmp_path / "s.npz")
    assert t.model == ident and t.tokens == 50
    for l in (1, 2):
        np.testing.assert_array_equal(t.layers[l].stats["count"], layers[l].stats["count"])
        np.testing.assert_array_equal(t.layers[l].similarity["cka"], layers[l].similarity["cka"])
    assert t.fingerprint() == s.fingerprint()
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary left behind


def test_scores_reject_nan_and_other_model():
    ident, layers = _scores(nan=True)
    with pytest.raises(ScoresError, match="gate_sum.*NaN"):
        Scores(ident, layers, tokens=5)
    ident, layers = _scores()
    other = ModelIdentity("qwen3_moe", 3, {1: 4, 2: 8}, {1: 2, 2: 2}, "abc")
    with pytest.raises(ScoresError, match="different model"):
        ident.check_matches(other)


def test_importance_normalisations():
    ident, layers = _scores()
    s = Scores(ident, layers, tokens=50)
    raw = s.importance("reap_mass")
    np.testing.assert_allclose(raw[1], layers[1].stats["gate_norm_sum"] / 50)
    per_layer = s.importance("reap_mass", "layer_sum")
    assert all(abs(v.sum() - 1) < 1e-12 for v in per_layer.values())
    with pytest.raises(ScoresError, match="unknown criterion"):
        s.importance("nope")


def test_plan_round_trip_and_keys(tmp_path):
    plan = Plan(kept={0: [3, 1], 2: [0]}, removed={0: [0, 2], 2: [1]}, status="optimal",
                objective=1.5, bound=1.5, gap=0.0, solver="exact", seconds=0.1,
                merge_map={0: {0: 1, 2: 3}})
    plan.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["kept"] == {"0": [1, 3], "2": [0]} and data["removed"]["0"] == [0, 2]
    for key in ("status", "objective", "bound", "gap", "solver", "seconds"):
        assert key in data
    again = Plan.load(tmp_path / "p.json")
    assert again.kept == plan.kept and again.merge_map == plan.merge_map and not again.is_uniform
    with pytest.raises(PlanError, match="both kept and removed"):
        Plan(kept={0: [1]}, removed={0: [1]})
