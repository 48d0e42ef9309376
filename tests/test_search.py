"""Loss-verified allocation (grape.searching.algorithm, the search stage): measured candidates, never worse than the best
uniform plan on the search tokens, within its pass budget, deterministic, model left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cli_workspace import make_workspace

import grape
from grape.data.text import load_calibration_data
from grape.searching.algorithm import SearchConfig, masked, mean_nll, search
from grape.searching.config import Candidate, Role
from solvers.plan import Plan
from solvers.spec import SolveConfig
from solvers.errors import UserError


def curve_passes(result) -> int:
    return result.nll_curves.passes if result.nll_curves is not None else 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("search"))
    tokenizer = grape.load_tokenizer(ws.model)
    model = grape.load(ws.model)
    data = load_calibration_data([str(ws.calibration)], tokenizer, seq_len=32, samples=12,
                                            seed=0, progress=False)
    calib, held_out = data.input_ids[:6], data.input_ids[6:]  # the search never sees calibration's
    scores = grape.calibrate(model, calib, grape.CalibrationConfig(subsample=32, progress=False))
    return model, scores, held_out


def test_the_chosen_plan_is_no_worse_than_any_uniform_plan(setup):
    model, scores, ids = setup
    before = model(input_ids=ids[:2]).logits
    result = search(model, scores, SolveConfig(budget=0.5, time_limit=10), ids,
                    SearchConfig(max_passes=10, progress=False))
    uniform = [c for c in result.candidates if c.role is Role.UNIFORM]
    assert len(uniform) >= 2 and result.best.nll <= min(c.nll for c in uniform)
    assert result.passes <= 10 and len(result.candidates) == result.passes - 1 - curve_passes(result)
    assert result.best.plan.num_removed == 12  # the budget holds for every candidate
    assert all(c.plan.num_removed == 12 for c in result.candidates)
    torch.testing.assert_close(model(input_ids=ids[:2]).logits, before, rtol=0, atol=0)  # unmasked again
    with masked(model, result.best.plan):
        assert mean_nll(model, ids, 8) == pytest.approx(result.best.nll)
    assert "chosen" in result.table() and result.to_json()["chosen"] == result.best.name


def test_the_search_is_deterministic_and_improves_by_measurement(setup):
    model, scores, ids = setup
    config = SearchConfig(max_passes=12, moves_per_round=3, progress=False)
    first = search(model, scores, SolveConfig(budget=0.5, time_limit=10), ids, config)
    second = search(model, scores, SolveConfig(budget=0.5, time_limit=10), ids, config)
    assert first.best.plan.kept == second.best.plan.kept and first.best.nll == second.best.nll
    uniform = [c for c in first.candidates if c.role is Role.UNIFORM]
    switches = [c for c in first.candidates if c.role is Role.MOVE]
    assert switches and first.passes <= 12  # the local search ran, within the budget
    assert first.best.nll <= min(c.nll for c in uniform)


def test_a_candidate_must_win_by_a_margin_of_paired_standard_errors():
    import numpy as np

    from grape.searching.algorithm import Candidate
    from solvers.plan import Plan

    plan = Plan(kept={0: [0]}, removed={0: [1]})
    base = Candidate("uniform x", plan, 1.0, np.array([1.0, 1.2, 0.8, 1.0]))
    noisy = Candidate("noisy", plan, 0.975, np.array([0.9, 1.3, 0.7, 1.0]))  # lower, but within noise
    clear = Candidate("clear", plan, 0.95, np.array([0.95, 1.15, 0.75, 0.95]))  # lower on every sequence
    assert not noisy.beats(base, 2.0) and noisy.beats(base, 0.0)
    assert clear.beats(base, 2.0) and not base.beats(clear, 2.0)


def test_bad_search_settings_are_refused(setup):
    model, scores, ids = setup
    with pytest.raises(UserError, match="max_passes"):
        SearchConfig(max_passes=0)
    with pytest.raises(UserError, match="search tokens"):
        search(model, scores, SolveConfig(budget=0.5), ids[0])


def test_measured_curves_seed_the_program_and_the_criterion_is_chosen_by_measurement(setup):
    model, scores, ids = setup
    result = search(model, scores, SolveConfig(budget=0.5, time_limit=10), ids,
                    SearchConfig(max_passes=60, moves_per_round=2, progress=False))
    curves = result.nll_curves
    assert curves is not None and curves.passes == len(curves.points) > 0
    names = [c.name for c in result.candidates]
    assert any(n.startswith("exact curves on measured NLL") for n in names)
    # other criteria's within-layer orders measured (globally, or one layer at a time)
    assert any(n.endswith("order") or "order, incumbent's counts" in n for n in names)
    assert result.passes <= 60 and len(result.candidates) == result.passes - 1 - curves.passes
    assert result.to_json()["nll_curves"]["passes"] == curves.passes
    # single-layer curve points and level switches rerun only the layers after their prefix
    assert 0 < result.computed_passes < result.passes
    assert result.to_json()["computed_passes"] == round(result.computed_passes, 2)


def test_an_interrupted_search_resumes_from_its_cache(setup, tmp_path):
    model, scores, ids = setup
    config = SearchConfig(max_passes=9, moves_per_round=2, progress=False)
    cache = tmp_path / "search.cache.json"
    first = search(model, scores, SolveConfig(budget=0.5, time_limit=10), ids, config, cache=cache)
    assert cache.is_file() and first.reused < first.passes  # (a plan met twice is measured once)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = search(model, scores, SolveConfig(budget=0.5, time_limit=10), ids, config, cache=cache)
    finally:
        hook.remove()
    assert calls == [] and again.reused == again.passes == first.passes  # nothing measured twice
    assert again.best.plan.kept == first.best.plan.kept and again.best.nll == first.best.nll
    other = search(model, scores, SolveConfig(budget=0.5, time_limit=10), ids[:3], config, cache=cache)
    assert other.reused == first.reused and other.unpruned_nll != first.unpruned_nll  # not reused


def test_unknown_search_criteria_are_refused_before_measuring(setup):
    model, scores, ids = setup
    with pytest.raises(UserError, match="--search-criteria"):
        search(model, scores, SolveConfig(budget=0.5), ids, SearchConfig(criteria=("bogus",)))
    with pytest.raises(UserError, match="--search-margin"):
        SearchConfig(margin_se=-1)


def test_the_reconstruction_criterion_is_a_seed_and_skipped_where_the_scores_lack_it(setup):
    import copy
    from dataclasses import replace

    model, scores, ids = setup
    config = SearchConfig(max_passes=8, moves_per_round=2, nll_curves=False, progress=False)
    result = search(model, scores, SolveConfig(budget=0.5, time_limit=10), ids, config)
    assert "uniform reconstruction" in [c.name for c in result.candidates]
    older = copy.copy(scores)  # a file calibrated before the criterion existed
    older.layers = {i: replace(ls, stats={k: v for k, v in ls.stats.items() if k != "reconstruction"})
                    for i, ls in scores.layers.items()}
    result = search(model, older, SolveConfig(budget=0.5, time_limit=10), ids, config)
    assert "uniform reconstruction" not in [c.name for c in result.candidates]
    assert any("'reconstruction' skipped" in n for n in result.notes)
    with pytest.raises(UserError, match="none is in the scores file"):
        search(model, older, SolveConfig(budget=0.5), ids, replace(config, criteria=("reconstruction",)))


def test_curves_at_fewer_depths_when_the_passes_are_short(setup):
    from grape.searching.algorithm import _curve_depths, seed_plans

    model, scores, ids = setup
    layers = len(scores.layers)
    assert _curve_depths(scores, (0.25, 0.5, 0.75), 0.3, 3 * layers) == (0.25, 0.5, 0.75)
    assert _curve_depths(scores, (0.25, 0.5, 0.75), 0.3, 2 * layers + 1) == (0.25, 0.5)
    assert _curve_depths(scores, (0.25, 0.5, 0.75), 0.7, layers) == (0.75,)
    assert _curve_depths(scores, (0.25, 0.5, 0.75), 0.5, layers - 1) == ()
    config, solve = SearchConfig(moves_per_round=2, progress=False), SolveConfig(budget=0.5, time_limit=10)
    seeds = len(seed_plans(scores, solve, config)[0])
    short = SearchConfig(max_passes=1 + seeds + 2 * layers + 1, moves_per_round=2, progress=False)
    result = search(model, scores, solve, ids, short)
    assert result.nll_curves is not None and result.nll_curves.fractions == (0.5,)
    assert any("1 of 3 depths" in n for n in result.notes)


def test_runners_up_that_beat_every_uniform_plan_get_a_second_hearing(setup):
    from grape.searching.algorithm import Candidate, _confirm, _finalists, _key

    model, scores, ids = setup
    found = search(model, scores, SolveConfig(budget=0.5, time_limit=10), ids[:3],
                   SearchConfig(max_passes=12, moves_per_round=3, nll_curves=False, progress=False))
    uniform = [c for c in found.candidates if c.role is Role.UNIFORM]
    floor = min(c.nll for c in uniform)
    # make three non-uniform candidates look better than every uniform one on the search tokens
    others = [c for c in found.candidates if c.role is not Role.UNIFORM
              and _key(c.plan) not in {_key(u.plan) for u in uniform}]
    assert len(others) >= 3
    staged = [Candidate(c.name, c.plan, floor - 0.1 * (i + 1), c.per_sequence, role=c.role)
              for i, c in enumerate(others[:3])]
    best = staged[-1]  # the lowest
    candidates = uniform + staged
    names = [c.name for c in _finalists(best, candidates, runners_up=1)]
    assert names == [c.name for c in uniform] + [best.name, staged[1].name]  # best, then one runner-up
    assert [c.name for c in _finalists(best, candidates, 0)] == [c.name for c in uniform] + [best.name]
    notes = []
    lenient = SearchConfig(runners_up=1, min_confirm_tokens=0, min_confirm_documents=0, progress=False)
    chosen, record, versus = _confirm(model, best, candidates, ids, lenient, None, None, notes)
    assert [r["name"] for r in record] == names and chosen in candidates and not notes
    assert versus["on"] == "confirmation" and versus["documents"] == ids.shape[0]
    assert all("se" in r for r in record)


def test_a_thin_confirmation_never_adopts_a_non_uniform_plan(setup):
    """Below the confirmation minimums the best uniform plan there is the result, however good
    a non-uniform finalist looks (here: made to look far better by its role alone)."""
    from grape.searching.algorithm import _confirm

    model, scores, ids = setup
    found = search(model, scores, SolveConfig(budget=0.5, time_limit=10), ids[:3],
                   SearchConfig(max_passes=10, nll_curves=False, progress=False))
    uniform = [c for c in found.candidates if c.role is Role.UNIFORM]
    other = next(c for c in found.candidates if c.role is not Role.UNIFORM)
    notes = []
    strict = SearchConfig(min_confirm_tokens=ids.numel() + 1, progress=False)
    chosen, record, _ = _confirm(model, other, uniform + [other], ids, strict, None, None, notes)
    assert chosen.role is Role.UNIFORM and any("below the minimum" in n for n in notes)
    measured = {r["name"]: r["nll"] for r in record}
    assert chosen.name == min((u.name for u in uniform), key=measured.get)


def test_standard_errors_are_by_document():
    """Two candidates whose gap is steady within documents but flips between them: by window
    the gap looks certain, by document it is noise."""
    plan = Plan(kept={0: [0]}, removed={0: [1]})
    base = np.ones(400)
    flip = np.repeat([-0.05, -0.03, -0.04, 0.04], 100)  # 4 documents of 100 windows
    groups = np.repeat(np.arange(4), 100)
    floor = Candidate("u", plan, 1.0, base, role=Role.UNIFORM, groups=groups)
    other = Candidate("m", plan, float((base + flip).mean()), base + flip, role=Role.MOVE, groups=groups)
    naive = Candidate("m", plan, other.nll, base + flip, role=Role.MOVE)
    assert naive.beats(Candidate("u", plan, 1.0, base, role=Role.UNIFORM), margin_se=2.0)
    assert not other.beats(floor, margin_se=2.0)


def test_search_tokens_spread_over_the_whole_file(tmp_path):
    import json

    from grape.searching.stage import search_tokens
    from grape.errors import DataError

    ws = make_workspace(tmp_path / "ws")
    tokenizer = grape.load_tokenizer(ws.model)
    docs = [f"document {i} " + " ".join(["word"] * 60) for i in range(40)]
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ids = search_tokens([data, data], tokenizer, seq_len=16, samples=4)
    assert ids.shape == (8, 16) and torch.equal(ids[:4], ids[4:])  # each file weighs the same
    from grape.evaluation.perplexity import pack_windows, token_stream

    stream, _ = token_stream(tokenizer, docs, 64 * 4 * 16)  # the spread cap: 64 x samples x seq_len
    full = [w[:16] for w in pack_windows(stream, 16) if len(w) == 17]
    assert len(full) > 20  # many windows to choose from: the first and last are taken, not 4 in a row
    assert ids[0].tolist() == full[0] and ids[3].tolist() == full[-1]
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "two words"}) + "\n")
    with pytest.raises(DataError, match="fewer than 17 tokens"):
        search_tokens([tiny], tokenizer, seq_len=16, samples=4)


def test_the_final_choice_is_confirmed_on_more_tokens(setup):
    model, scores, ids = setup
    config = SearchConfig(max_passes=10, moves_per_round=2, progress=False)
    result = search(model, scores, SolveConfig(budget=0.5, time_limit=10), ids[:3], config, confirm_ids=ids)
    names = [c["name"] for c in result.confirmed]
    uniform = [c.name for c in result.candidates if c.role is Role.UNIFORM]
    assert set(uniform) <= set(names) and sum(c["chosen"] for c in result.confirmed) == 1
    chosen = next(c for c in result.confirmed if c["chosen"])
    assert chosen["name"] == result.best.name
    # by the seed rule: the lowest uniform on the confirmation tokens unless clearly beaten
    lowest_uniform = min((c for c in result.confirmed if c["name"] in uniform), key=lambda c: c["nll"])
    assert chosen["nll"] <= lowest_uniform["nll"]
    assert result.tokens_measured == result.passes * ids[:3].numel() + len(result.confirmed) * ids.numel()
    off = search(model, scores, SolveConfig(budget=0.5, time_limit=10), ids[:3],
                 SearchConfig(max_passes=10, moves_per_round=2, progress=False, confirm=False), confirm_ids=ids)
    assert off.confirmed == [] and off.tokens_measured == off.passes * ids[:3].numel()
