"""The Python API (grape/api.py, re-exported lazily from grape): one verb per stage, typed
configs, paths accepted for artifacts, no hidden state, and `import grape` free of torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_workspace import make_workspace

import grape
from grape.api import BudgetError, SolveConfig, check_budget
from solvers.errors import UserError

SMALL = {"samples": 4, "seq_len": 32, "subsample": 32, "progress": False}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def scores(ws):
    tokenizer = grape.load_tokenizer(ws.model)
    model = grape.load(ws.model, dtype=torch.float32)
    return grape.calibrate(model, [str(ws.calibration)], grape.CalibrationConfig(**SMALL), tokenizer=tokenizer)


def test_import_grape_stays_light():
    code = ("import sys, grape; grape.SolveConfig; grape.check_budget('0.5', 8); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_every_stage_end_to_end(ws, scores, tmp_path):
    assert scores.model.model_type == "qwen3_moe" and scores.tokens == 4 * 32
    config = SolveConfig(budget=0.25, objective="redundancy", solver="exact", time_limit=10)
    problem = grape.build_problem(scores, config)
    plan = grape.solve(problem, config)
    assert plan.num_removed == 6 and plan.status == "optimal"

    tokenizer = grape.load_tokenizer(ws.model)
    model = grape.load(ws.model, dtype=torch.float32)
    grape.apply(model, plan, grape.ApplyConfig("remove"))
    path = grape.save(model, tmp_path / "pruned", plan=plan, tokenizer=tokenizer)
    reloaded = grape.load(path, dtype=torch.float32)
    ids = tokenizer(["def add(a, b):\n    return a + b"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)

    config = grape.EvalConfig(seq_len=32, max_tokens_per_domain=64, progress=False)
    after = grape.evaluate(reloaded, tokenizer, [str(p) for p in ws.heldout], config)
    before = grape.evaluate(grape.load(ws.model, dtype=torch.float32), tokenizer,
                            [str(p) for p in ws.heldout], config)
    assert set(after.domains) == set(before.domains) == {"prose", "code"}
    assert after.domains["prose"].tokens == before.domains["prose"].tokens == 64


def test_paths_work_where_artifacts_are_expected(ws, scores, tmp_path):
    scores.save(tmp_path / "s.npz")
    from_object = grape.solve(scores, SolveConfig(budget=6, objective="curves"))
    from_path = grape.solve(tmp_path / "s.npz", budget=6, objective="curves")  # keyword overrides
    assert from_object.kept == from_path.kept
    from_path.save(tmp_path / "plan.json")
    model = grape.load(ws.model, dtype=torch.float32)
    grape.apply(model, tmp_path / "plan.json", "mask")
    assert grape.load_plan(tmp_path / "plan.json").kept == from_path.kept


def test_calibrate_from_a_model_path_uses_its_tokenizer(ws, scores):
    again = grape.calibrate(ws.model, ws.calibration, grape.CalibrationConfig(**SMALL))
    assert again.calibration["model_path"].endswith("qwen3")
    for layer, ls in scores.layers.items():  # same model, same data, same seed: same statistics
        np.testing.assert_allclose(again.layers[layer].stats["count"], ls.stats["count"])


def test_calibrate_takes_a_padded_tokenizer_output(ws):
    """A tokenizer's padded batch is calibration data as it is (not raw text to pack); only its
    real tokens count."""
    tokenizer = grape.load_tokenizer(ws.model)
    tokenizer.padding_side = "left"
    batch = tokenizer(["def add(a, b):\n    return a + b", "The quick brown fox"], padding=True,
                      return_tensors="pt")
    assert int(batch["attention_mask"].sum()) < batch["input_ids"].numel()
    scores = grape.calibrate(ws.model, batch, grape.CalibrationConfig(subsample=8, progress=False))
    assert scores.tokens == int(batch["attention_mask"].sum())


def test_sequences_past_the_context_are_capped_or_refused(ws, capsys):
    """Raw text is packed by the API: a too-long seq_len is capped with a notice. Pre-packed ids
    longer than the context cannot be repacked: refused before any forward."""
    model = grape.load(ws.model, dtype=torch.float32)
    context = model.config.max_position_embeddings
    config = grape.CalibrationConfig(seq_len=4 * context, samples=1, subsample=8, progress=False)
    scores = grape.calibrate(model, [str(ws.calibration)], config,
                             tokenizer=grape.load_tokenizer(ws.model))
    assert scores.calibration["seq_len"] == context and scores.tokens == context
    assert "longer than the model's context" in capsys.readouterr().out
    with pytest.raises(UserError, match="max_position_embeddings"):
        grape.calibrate(model, torch.zeros(1, context + 1, dtype=torch.long), config)


def test_the_whole_pipeline_is_one_library_call(ws, scores, tmp_path):
    from grape.searching.config import SearchConfig

    """grape.run_pipeline is what `grape run` calls: same outputs, from typed configurations."""
    scores_file = tmp_path / "scores.npz"
    scores.save(scores_file)
    config = grape.RunConfig(
        model=ws.model, out=tmp_path / "run", scores=scores_file, eval_data=[str(p) for p in ws.heldout],
        solve=SolveConfig(budget=6, objective="curves", time_limit=10), baselines=("uniform",),
        compare=False, evaluation=grape.EvalConfig(seq_len=32, max_tokens_per_domain=64, progress=False),
        calibration=grape.CalibrationConfig(seq_len=32), search_data=[str(p) for p in ws.heldout],
        search=SearchConfig(max_passes=6, tokens=128, confirm_tokens=256, progress=False))
    result = grape.run_pipeline(config)
    assert result.report.is_file() and (tmp_path / "run" / "checkpoint" / "config.json").is_file()
    assert set(result.summary["nll"]) == {"unpruned", "search", "exact", "uniform"}
    # the search measured on at most 2 sequences from each search-data file, within its pass budget
    found = result.summary["search"]
    assert found["tokens_per_pass"] == found["held_out"]["search"]["tokens"] <= 2 * 2 * 32
    assert found["passes"] <= 6 and found["held_out"]["confirmation"]["tokens"] <= 256
    assert result.summary["plans"]["exact"]["removed"] == 6
    assert result.summary["solve_config"]["objective"] == "curves"
    with pytest.raises(UserError, match="unknown solver"):
        grape.RunConfig(model=ws.model, out=tmp_path / "x", scores=scores_file, baselines=("nope",))


def test_no_hidden_state_between_calls(scores):
    config = SolveConfig(budget=0.25, objective="additive")
    first = grape.solve(scores, config)
    grape.solve(scores, config, budget=0.5, solver="greedy")  # a different call in between
    assert grape.solve(scores, config).kept == first.kept
    assert config.budget == 0.25 and config.solver == "exact"  # configs are frozen values
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.budget = 0.5


def test_verb_names_are_plain_functions_and_the_stage_modules_import():
    import types

    from grape.calibration.calibrate import CalibrationConfig
    from grape.evaluation.perplexity import EvalConfig
    from grape.pruning.apply import apply_plan

    for verb in ("calibrate", "apply", "evaluate"):
        assert isinstance(getattr(grape, verb), types.FunctionType)
    assert grape.apply_plan is apply_plan and grape.CalibrationConfig is CalibrationConfig
    assert grape.EvalConfig is EvalConfig
    assert type(grape) is types.ModuleType  # no class swapping on the package
    with pytest.raises(AttributeError):
        _ = grape.not_a_verb


@pytest.mark.parametrize("budget", ["0", "0.25", "0.99", "23", "free:1GB", "keep:1MiB", 0.5, 12])
def test_budgets_in_range(budget):
    check_budget(budget, 24)


@pytest.mark.parametrize("budget, needle", [
    ("1.5", "out of range"), ("-1", "out of range"), ("-0.2", "out of range"), ("nan", "not a finite number"),
    ("1.0", "every expert"), ("24", "only 24"), ("100", "only 24"), ("half", "not a fraction"), ("inf", "not a finite"), ("1e400", "not a finite"),
])
def test_budgets_out_of_range(budget, needle):
    with pytest.raises(BudgetError) as info:
        check_budget(budget, 24)
    assert needle in str(info.value)
    assert isinstance(info.value, UserError)


def test_build_problem_checks_the_budget_against_the_model(scores):
    with pytest.raises(BudgetError, match="only 24"):
        grape.build_problem(scores, SolveConfig(budget=30))
    with pytest.raises(UserError, match="time_limit"):
        SolveConfig(time_limit=0)
