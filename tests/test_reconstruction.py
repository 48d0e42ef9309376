"""The `reconstruction` criterion: greedy elimination on a layer's output error with the tokens
re-routed around each removal. Checked against a slow reference that computes every trial from
the experts' outputs directly, for every family; stored, reloaded and refused where absent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grape.adapters import get_adapter
from grape.calibration import CalibrationConfig, all_expert_outputs, calibrate
from grape.errors import DataError
from grape.scoring import reconstruction_importance, reconstruction_order, token_grams
from solvers.errors import ScoresError
from solvers.scores import Scores
from tests.test_calibrate import QUICK, _subsample
from tests.tiny_models import FAMILIES, make_tiny, tiny_input_ids


def _routed_output(outputs: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k w_k f_{i_k}(x) per token, float64, straight from the (E, T, H) expert outputs."""
    rows = torch.arange(outputs.shape[1])[:, None]
    return (outputs[index, rows].double() * weights.double()[..., None]).sum(1)


def _reference_order(adapter, layer, hidden) -> tuple[list[int], list[float]]:
    """The greedy elimination written the slow way: every trial's pruned output is built from
    the experts' outputs and compared with the full output token by token."""
    n = adapter.num_experts(layer)
    with torch.no_grad():
        outputs = all_expert_outputs(adapter, layer, hidden)
        full = _routed_output(outputs, *adapter.route(layer, hidden))
        removed, errors = [], []
        for _ in range(n - 1):
            trial = {}
            for e in range(n):
                if e in removed:
                    continue
                pruned = _routed_output(outputs, *adapter.route_masked(layer, hidden, removed + [e]))
                trial[e] = (full - pruned).square().sum(1).mean().item()
            best = min(trial, key=lambda e: (trial[e], e))
            removed.append(best)
            errors.append(trial[best])
    return removed + [e for e in range(n) if e not in removed], errors


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_order_equals_the_slow_reference(family):
    overrides = dict(n_group=2, topk_group=1) if family == "deepseek_v3" else {}
    model = make_tiny(family, **overrides)
    adapter = get_adapter(model)
    config = CalibrationConfig(**QUICK)
    scores = calibrate(model, tiny_input_ids(6, 16), config)
    importance = scores.importance("reconstruction")
    for layer in scores.layers:
        hidden = _subsample(model, adapter, layer, config, every=True)
        assert hidden.shape[0] > config.subsample  # more rows than the similarity's
        want, want_errors = _reference_order(adapter, layer, hidden)
        with torch.no_grad():
            grams = token_grams(all_expert_outputs(adapter, layer, hidden))
            order, errors = reconstruction_order(adapter, layer, hidden, grams)
        assert order.tolist() == want, layer
        assert errors[:-1] == pytest.approx(want_errors, rel=1e-6, abs=1e-12)
        # the stored criterion orders the experts exactly as the elimination removed them
        assert np.argsort(importance[layer], kind="stable").tolist() == want
        assert np.all(importance[layer] > 0)


def test_importance_follows_the_order_even_where_the_error_dips():
    order = np.array([2, 0, 3, 1])
    errors = np.array([0.5, 0.4, 0.9, 2.0])  # removing more can lower the error on a subsample
    value = reconstruction_importance(order, errors)
    assert np.argsort(value, kind="stable").tolist() == order.tolist()
    assert value[2] < value[0] < value[3] < value[1]


def test_the_criterion_survives_a_round_trip_and_is_refused_where_absent(tmp_path):
    model = make_tiny("qwen3_moe")
    ids = tiny_input_ids(4, 16)
    scores = calibrate(model, ids, CalibrationConfig(**QUICK))
    assert scores.has_criterion("reconstruction")
    scores.save(tmp_path / "s.npz")
    again = Scores.load(tmp_path / "s.npz")
    for layer, ls in scores.layers.items():
        assert np.array_equal(again.layers[layer].stats["reconstruction"], ls.stats["reconstruction"])

    without = calibrate(model, ids, CalibrationConfig(**QUICK, reconstruction=False))
    assert not without.has_criterion("reconstruction")
    without.save(tmp_path / "old.npz")
    assert "reconstruction" not in Scores.load(tmp_path / "old.npz").layers[0].stats
    with pytest.raises(ScoresError, match="re-run `grape calibrate`"):
        without.importance("reconstruction")
    # the other statistics do not depend on it
    for layer, ls in without.layers.items():
        for name, value in ls.stats.items():
            assert np.array_equal(value, scores.layers[layer].stats[name])


def test_a_bad_stored_criterion_is_refused():
    model = make_tiny("qwen3_moe")
    scores = calibrate(model, tiny_input_ids(4, 16), CalibrationConfig(**QUICK))
    ls = scores.layers[0]
    ls.stats["reconstruction"] = ls.stats["reconstruction"][:-1]
    with pytest.raises(ScoresError, match="reconstruction has shape"):
        scores.validate()


def test_asking_for_it_without_a_subsample_names_the_fix():
    model = make_tiny("qwen3_moe")
    with pytest.raises(DataError, match="measured on the subsample"):
        calibrate(model, tiny_input_ids(2, 8),
                  CalibrationConfig(criterion="reconstruction", reconstruction=False, progress=False))
    # --subsample 0 with router similarity only turns it off quietly
    scores = calibrate(model, tiny_input_ids(2, 8), CalibrationConfig(
        subsample=0, similarity=("router",), cost_curves=False, progress=False))
    assert not scores.has_criterion("reconstruction")


def test_cost_curves_can_follow_the_reconstruction_order():
    model = make_tiny("mixtral")
    scores = calibrate(model, tiny_input_ids(6, 16), CalibrationConfig(**QUICK, criterion="reconstruction"))
    for ls in scores.layers.values():
        # the greedy keeps the cheapest removals first, so its curve starts low and ends at 0
        assert ls.cost_curve[-1] == 0.0 and np.all(np.isfinite(ls.cost_curve))


def test_solve_with_the_criterion_missing_is_a_one_line_error(tmp_path, capsys):
    from grape.cli import main

    model = make_tiny("qwen3_moe")
    scores = calibrate(model, tiny_input_ids(4, 16), CalibrationConfig(**QUICK, reconstruction=False))
    scores.save(tmp_path / "s.npz")
    code = main(["solve", "--scores", str(tmp_path / "s.npz"), "--budget", "0.25",
                 "--criterion", "reconstruction", "--out", str(tmp_path / "plan.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "reconstruction" in err
    assert not (tmp_path / "plan.json").exists()
