"""The `reconstruction` criterion: greedy elimination on a layer's output error with the tokens
re-routed around each removal. Checked against a slow reference that computes every trial from
the experts' outputs directly, for every family; the incremental evaluation against the full one
(every row re-routed for every trial, the implementation before it) on every family, several
seeds and sizes, with exact ties (duplicated and unused experts) and router near-ties; the
adapters' RemovalEffect against route_masked itself; stored, reloaded and refused where absent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grape.models.adapters import get_adapter
from grape.calibration.calibrate import CalibrationConfig, all_expert_outputs, calibrate
from grape.errors import DataError
from grape.calibration.scoring import (
    expert_grams,
    full_reconstruction_order,
    reconstruction_importance,
    reconstruction_order,
    token_grams,
)
from solvers.errors import ScoresError
from solvers.scores import Scores
from tests.test_calibrate import QUICK, _subsample
from tests.tiny_models import FAMILIES, make_tiny, tiny_input_ids
from tests.tiny_families import NEW_FAMILIES, make_family


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
            order, errors = reconstruction_order(adapter, layer, hidden)
            grams = token_grams(all_expert_outputs(adapter, layer, hidden))
            slow, _ = full_reconstruction_order(adapter, layer, hidden, grams, exact_ties=True)
        assert order.tolist() == want == slow.tolist(), layer
        assert errors[:-1] == pytest.approx(want_errors, rel=1e-6, abs=1e-12)
        # the stored criterion orders the experts exactly as the elimination removed them
        assert np.argsort(importance[layer], kind="stable").tolist() == want
        assert np.all(importance[layer] > 0)


# -- the incremental evaluation against the full one -----------------------------------------------
# the routed-expert count's config key where it is not `num_experts`
_COUNT_KEY = {"mixtral": "num_local_experts", "gpt_oss": "num_local_experts",
              "deepseek_v3": "n_routed_experts", "deepseek_v2": "n_routed_experts"}
# every family, and the router variants that take the other paths (softmax over every expert,
# groups or none, an expert's own sigmoid score)
VARIANTS = [(family, {}) for family in FAMILIES] + [
    ("deepseek_v2", {}),
    ("deepseek_v2", {"topk_method": "greedy"}),
    ("deepseek_v3", {"n_group": 1, "topk_group": 1}),  # Kimi-K2's routing
    ("deepseek_v3", {"n_group": 1, "topk_group": 1, "norm_topk_prob": False}),
    ("qwen3_moe", {"norm_topk_prob": False}),
    ("olmoe", {"norm_topk_prob": True}),
]
IDS = [f"{family}-{'-'.join(f'{k}={v}' for k, v in o.items())}" if o else family for family, o in VARIANTS]


def _model(family: str, seed: int = 0, experts: int = 8, top_k: int = 2, **overrides):
    key = _COUNT_KEY.get(family, "num_experts")
    model = make_tiny(family, seed=seed, **{key: experts, "num_experts_per_tok": top_k, **overrides})
    adapter = get_adapter(model)
    return model, adapter, min(adapter.moe_blocks())


def _rows(model, count: int, seed: int, lean: torch.Tensor | None = None) -> torch.Tensor:
    """Random layer-input rows (plus `lean`, a direction every row leans along)."""
    rows = torch.randn(count, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    return rows if lean is None else rows + lean


def _orders(adapter, layer, hidden, exact_ties: bool):
    with torch.no_grad():
        fast = reconstruction_order(adapter, layer, hidden)
        grams = expert_grams(adapter, layer, hidden)
        return fast, full_reconstruction_order(adapter, layer, hidden, grams, exact_ties=exact_ties)


def _same(fast, slow) -> None:
    assert fast[0].tolist() == slow[0].tolist()
    # the full evaluation's errors carry the router's float32 rounding of every row's weights
    # (about 1e-7 of each output, so about 1e-7 * sqrt(error * energy) on an error)
    energy = slow[1][-1]
    bound = 1e-6 * np.sqrt(np.abs(slow[1]) * energy) + 1e-12 * energy
    assert np.all(np.abs(fast[1] - slow[1]) <= bound), np.max(np.abs(fast[1] - slow[1]) / bound)


@pytest.mark.parametrize("family, overrides", VARIANTS, ids=IDS)
@pytest.mark.parametrize("seed, experts, top_k, rows", [(0, 8, 2, 160), (1, 16, 4, 96), (2, 16, 3, 200)])
def test_the_incremental_order_equals_the_full_evaluation(family, overrides, seed, experts, top_k, rows):
    model, adapter, layer = _model(family, seed, experts, top_k, **overrides)
    fast, slow = _orders(adapter, layer, _rows(model, rows, seed), exact_ties=True)
    _same(fast, slow)


@pytest.mark.parametrize("family", FAMILIES)
def test_many_experts_and_rows(family):
    model, adapter, layer = _model(family, 3, experts=32, top_k=4)
    fast, slow = _orders(adapter, layer, _rows(model, 300, 3), exact_ties=True)
    _same(fast, slow)


def _copy_expert(adapter, layer, source: int, target: int, router: bool = True, weights: bool = True):
    """Expert `target` becomes a copy of `source`: its router row and biases, its weights."""
    modules = ([adapter.router(layer)] if router else []) + ([adapter.experts(layer)] if weights else [])
    with torch.no_grad():
        for module in modules:
            for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                if tensor.dim() >= 1 and tensor.shape[0] == adapter.num_experts(layer):
                    tensor[target] = tensor[source]


@pytest.mark.parametrize("family, overrides", VARIANTS, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_ties_go_to_the_lower_index_as_in_the_full_evaluation(family, overrides, seed):
    """Duplicated experts tie exactly, and so do unused ones (no row chose them); the full
    evaluation's errors for them differ only by the router's float32 rounding, which the tie
    tolerance absorbs, so both evaluations break each tie by index. (Pairs within one
    routing group: copies in two groups are not interchangeable.)"""
    model, adapter, layer = _model(family, seed, experts=16, top_k=3, **overrides)
    _copy_expert(adapter, layer, 2, 3)
    _copy_expert(adapter, layer, 5, 6)
    lean = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    lean = 4 * lean / lean.norm()
    with torch.no_grad():  # experts 12 and 13 score far below the rest on rows leaning on it
        adapter.router(layer).weight[12] = -8 * lean
        adapter.router(layer).weight[13] = -8 * lean
    hidden = _rows(model, 150, seed, lean)
    fast, slow = _orders(adapter, layer, hidden, exact_ties=False)
    _same(fast, slow)
    order = fast[0].tolist()
    assert order.index(2) < order.index(3) and order.index(5) < order.index(6)
    unused = not bool(torch.isin(adapter.route(layer, hidden)[0], torch.tensor([12, 13])).any())
    assert unused and order.index(12) < order.index(13)


@pytest.mark.parametrize("family, overrides", VARIANTS, ids=IDS)
def test_router_near_ties_are_routed_by_the_router(family, overrides):
    """Two experts with the same router row but different weights tie in every row's
    ranking: torch.topk's choice between them depends on the rest of the row, so those rows
    are evaluated by the router for every trial, and the orders still agree."""
    model, adapter, layer = _model(family, 4, experts=16, top_k=3, **overrides)
    _copy_expert(adapter, layer, 1, 8, weights=False)
    _copy_expert(adapter, layer, 3, 12, weights=False)
    fast, slow = _orders(adapter, layer, _rows(model, 150, 4), exact_ties=True)
    _same(fast, slow)


@pytest.mark.parametrize("family, overrides", [("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": False}),
                                               ("deepseek_v3", {"n_group": 1, "topk_group": 1})])
@pytest.mark.parametrize("ties", [False, True])
def test_many_experts_with_and_without_ties(family, overrides, ties):
    """At 48 experts a row's k + 2 best come from its previous ones and the next of its
    ranking (_Greedy._top), except on rows whose scores tie (copied router rows), which take
    topk: the same orders as the full evaluation either way."""
    model, adapter, layer = _model(family, 8, experts=48, top_k=4, **overrides)
    if ties:
        _copy_expert(adapter, layer, 2, 3)  # exact ties
        _copy_expert(adapter, layer, 7, 30, weights=False)  # router ties, different outputs
    fast, slow = _orders(adapter, layer, _rows(model, 160, 8), exact_ties=not ties)
    _same(fast, slow)


def test_the_expert_cache_grows_when_a_row_needs_more_slots(monkeypatch):
    """No outputs fetched ahead: the cache starts with k + 1 slots a row, and rows routed by
    the router (near-ties) need more; it grows, and the order is the full evaluation's."""
    import grape.calibration.reconstruction_cache as cache
    import grape.calibration.reconstruction_greedy as greedy

    monkeypatch.setattr(greedy, "_AHEAD", 0)
    grown = []
    grow = cache._ExpertCache._grow
    monkeypatch.setattr(cache._ExpertCache, "_grow", lambda self, extra: grown.append(extra) or grow(self, extra))
    model, adapter, layer = _model("qwen3_moe", 4, experts=16, top_k=3)
    _copy_expert(adapter, layer, 1, 8, weights=False)
    _copy_expert(adapter, layer, 3, 12, weights=False)
    fast, slow = _orders(adapter, layer, _rows(model, 150, 4), exact_ties=True)
    assert grown
    _same(fast, slow)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_the_later_families_too(family):
    """The families added since (tests/tiny_families.py): DeepSeek-V3's router copies take the
    incremental evaluation and agree with the full one; the rest take the full one."""
    model = make_family(family)
    adapter = get_adapter(model)
    layer = min(adapter.moe_blocks())
    hidden = _rows(model, 150, 7)
    fast, slow = _orders(adapter, layer, hidden, exact_ties=adapter.removal_effect(layer) is not None)
    _same(fast, slow)


def test_a_family_without_a_removal_effect_takes_the_full_evaluation(monkeypatch):
    model, adapter, layer = _model("mixtral", 5)
    hidden = _rows(model, 120, 5)
    fast = reconstruction_order(adapter, layer, hidden)
    monkeypatch.setattr(adapter, "removal_effect", lambda layer: None)
    calls = []
    monkeypatch.setattr("grape.calibration.reconstruction.full_reconstruction_order",
                        lambda *a, **k: calls.append(1) or full_reconstruction_order(*a, **k))
    slow = reconstruction_order(adapter, layer, hidden)
    assert calls and fast[0].tolist() == slow[0].tolist()


def _best_of_group(adapter, layer, effect, logits, removed):
    """(rows, E) bool: expert among the `group_top` best choice scores of its group."""
    score = (effect.choice(logits) if effect.choice else logits).to(torch.float64).clone()
    score[:, removed] = float("-inf")
    size = score.shape[1] // effect.groups
    grouped = score.view(score.shape[0], effect.groups, size)
    cut = grouped.topk(effect.group_top, dim=2).values[:, :, -1:]
    return (grouped >= cut).view_as(score)


@pytest.mark.parametrize("family, overrides", VARIANTS, ids=IDS)
def test_the_removal_effect_says_which_tokens_a_removal_reroutes(family, overrides):
    """RemovalEffect against route_masked itself: masking one more expert leaves the tokens
    it does not name with the same experts, their weights unchanged or scaled by
    Z / (Z - exp(l_j)); the chosen weights follow `strength`."""
    model, adapter, layer = _model(family, 6, experts=16, top_k=3, **overrides)
    hidden = _rows(model, 200, 6)
    effect = adapter.removal_effect(layer)
    logits = adapter.router_logits(layer, hidden)[0].to(torch.float64)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _ in range(12):
            removed = torch.randperm(16, generator=generator)[:int(torch.randint(0, 10, (1,), generator=generator))]
            removed = removed.tolist()
            j = next(e for e in torch.randperm(16, generator=generator).tolist() if e not in removed)
            index, weight = adapter.route_masked(layer, hidden, removed)
            after_index, after_weight = adapter.route_masked(layer, hidden, removed + [j])
            named = (index == j).any(1)
            if effect.groups > 1:
                named |= _best_of_group(adapter, layer, effect, logits, removed)[:, j]
            order, after_order = index.argsort(1), after_index.argsort(1)
            keep = ~named
            assert torch.equal(index.gather(1, order)[keep], after_index.gather(1, after_order)[keep])
            before, after = weight.gather(1, order)[keep].double(), after_weight.gather(1, after_order)[keep].double()
            if effect.rescale:
                left = torch.ones(16, dtype=torch.bool)
                left[removed] = False
                mass = torch.exp(logits - logits.amax(1, keepdim=True))
                total = (mass * left).sum(1)
                before = before * (total / (total - mass[:, j]))[keep][:, None]
            torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-7)
            if effect.strength is not None:  # weights proportional to the strengths
                ratio = weight.double() / effect.strength(adapter.router_logits(layer, hidden)[0]).gather(1, index)
                live = weight > 0
                spread = torch.where(live, ratio, ratio.amax(1, keepdim=True)).amin(1) / ratio.amax(1)
                assert torch.all(spread[live.any(1)] > 1 - 1e-5)


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
    from grape.cli.main import main

    model = make_tiny("qwen3_moe")
    scores = calibrate(model, tiny_input_ids(4, 16), CalibrationConfig(**QUICK, reconstruction=False))
    scores.save(tmp_path / "s.npz")
    code = main(["solve", "--scores", str(tmp_path / "s.npz"), "--budget", "0.25",
                 "--criterion", "reconstruction", "--out", str(tmp_path / "plan.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "reconstruction" in err
    assert not (tmp_path / "plan.json").exists()
