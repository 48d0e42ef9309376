"""Measured per-layer NLL curves (grape.searching.sensitivity): measured as the model says, stored in the
scores file, and preferred by the curves objective."""

from __future__ import annotations

import numpy as np
import pytest
from cli_workspace import make_workspace

import grape
from grape.api import build_problem, solve
from grape.cli.problem import SolveConfig
from grape.data.text import load_calibration_data
from grape.searching.sensitivity import (interpolate_curve, masked, mean_nll, measure_nll_curves, single_layer_plan,
                               uniform_plan, with_nll_curves)
from solvers.errors import UserError
from solvers.scores import Scores


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("sensitivity"))
    tokenizer = grape.load_tokenizer(ws.model)
    model = grape.load(ws.model)
    data = load_calibration_data([str(ws.calibration)], tokenizer, seq_len=32, samples=10, seed=0,
                                 progress=False)
    scores = grape.calibrate(model, data.input_ids[:6], grape.CalibrationConfig(subsample=32, progress=False))
    return model, scores, data.input_ids[6:]


def test_each_point_is_the_single_layer_measurement(setup):
    model, scores, ids = setup
    curves = measure_nll_curves(model, scores, ids, "reap", fractions=(0.5,), batch_size=4)
    base = mean_nll(model, ids, 4)
    plan = uniform_plan(scores, 0.5, "reap")
    for point in curves.points:
        with masked(model, single_layer_plan(plan, point["layer"])):
            assert mean_nll(model, ids, 4) - base == pytest.approx(point["nll_increase"], abs=1e-9)
        curve = curves.curves[point["layer"]]
        assert curve[point["kept"]] == pytest.approx(max(point["nll_increase"], 0.0), abs=1e-9) or \
            curve[point["kept"]] >= point["nll_increase"]  # made non-increasing in the kept count
    n = scores.model.experts_per_layer[curves.points[0]["layer"]]
    assert curves.passes == 1 + len(curves.points) and curve[n] == 0.0


def test_interpolation_is_monotone_and_prices_unmeasured_depths_high():
    curve = interpolate_curve({8: 0.0, 4: 0.2, 6: 0.25}, 8)  # a noisy point above its neighbour
    assert curve[8] == 0.0 and np.all(np.diff(curve) <= 0)
    assert curve[3] > 1.0 and curve[4] == pytest.approx(0.25)


def test_curves_are_stored_in_the_scores_file_and_used_by_the_curves_objective(setup, tmp_path):
    model, scores, ids = setup
    with pytest.raises(UserError, match="--curves nll"):
        build_problem(scores, SolveConfig(budget=0.25, objective="curves", curves="nll"))
    curves = measure_nll_curves(model, scores, ids, "reap_mass", batch_size=4)
    stored = with_nll_curves(scores, curves)
    stored.save(tmp_path / "scores.npz")
    back = Scores.load(tmp_path / "scores.npz")
    assert back.fingerprint() == scores.fingerprint()  # plans made before still match
    assert back.calibration["nll_curves"]["criterion"] == "reap_mass"
    for layer, ls in back.layers.items():
        np.testing.assert_allclose(ls.nll_curve, curves.curves[layer])
    auto = build_problem(back, SolveConfig(budget=0.25, objective="curves"))
    assert auto.provenance["curves"] == "nll"
    assert [lay.cost_curve.tolist() for lay in auto.layers] == [back.layers[i].nll_curve.tolist()
                                                                for i in sorted(back.layers)]
    output = build_problem(back, SolveConfig(budget=0.25, objective="curves", curves="output"))
    assert output.provenance["curves"] == "output"
    assert solve(auto, SolveConfig(budget=0.25)).num_removed == solve(output, SolveConfig()).num_removed
