"""The experts re-fit (grape.pruning.repair_experts; --repair lstsq+experts): after the closed-form
fit of the down projections, a short Adam re-fit of every kept-expert tensor lowers each pruned
layer's error further (or is undone), changes only expert tensors, is deterministic, runs in
float32 for a half-precision layer, and the layer-by-layer repair from the shards writes the same
tensors as the in-memory one."""

from __future__ import annotations

import json

import pytest
import torch
from test_repair import build, half_plan, plain, repaired
from test_repair_router import changed_tensors
from test_repair_sequential import IDS as STORED_IDS
from test_repair_sequential import QUIET, assert_same_model, in_memory, saved, stream_plain
from test_repair_sequential import half_plan as stored_half_plan

from grape.errors import PlanError
from grape.pruning.apply import ApplyConfig
from grape.pruning.checkpoint import load_pruned
from grape.pruning.repair import RepairSettings
from grape.pruning.repair_sequential import stream_repair
FAST = {"experts_steps": 30, "experts_batch": 64}  # enough to move the tiny experts, quick to run


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_the_experts_refit_lowers_the_error_lstsq_leaves_and_changes_only_expert_tensors(family):
    model = build(family)
    plan = half_plan(model)
    fixed, both = repaired(model, plan, "lstsq+experts", **FAST)
    _, alone = repaired(model, plan, "lstsq")
    # the first pruned layer sees the same inputs in both; the stage is kept only if it lowers
    # the error lstsq left there
    first, reference = both.layers[0], alone.layers[0]
    assert first.before == reference.before and first.after < reference.after
    changed = changed_tensors(model, plan, fixed)
    assert changed and all(".experts." in name for name in changed)
    assert any("down_proj" not in name for name in changed)  # the gate / up projections moved too


def test_the_experts_refit_is_deterministic_and_no_steps_is_lstsq():
    model = build("qwen3_moe")
    plan = half_plan(model)
    first = repaired(model, plan, "lstsq+experts", **FAST)[0].state_dict()
    second = repaired(model, plan, "lstsq+experts", **FAST)[0].state_dict()
    assert all(torch.equal(first[n], second[n]) for n in first)
    none = repaired(model, plan, "lstsq+experts", experts_steps=0)[0].state_dict()
    lstsq = repaired(model, plan, "lstsq")[0].state_dict()
    assert all(torch.equal(none[n], lstsq[n]) for n in lstsq)


def test_a_half_precision_layer_is_fitted_in_float32_and_kept_in_its_dtype():
    model = build("qwen3_moe").to(torch.bfloat16)
    plan = half_plan(model)
    fixed, report = repaired(model, plan, "lstsq+experts", **FAST)
    assert all(p.dtype == torch.bfloat16 for p in fixed.parameters())
    assert all(r.after <= r.before for r in report.layers)
    assert plain(model, plan).state_dict().keys() == fixed.state_dict().keys()


def test_bad_experts_settings_are_refused():
    for bad in ({"experts_steps": -1}, {"experts_batch": 0}, {"experts_lr": 0.0}, {"experts_lr": float("nan")}):
        with pytest.raises(PlanError, match="experts"):
            RepairSettings(**bad)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_the_layer_by_layer_repair_writes_the_same_experts(family, tmp_path):
    """Mixtral's per-expert w1 / w3 / w2 tensors rebuilt from the fused ones; gpt-oss's fused,
    transposed experts with biases."""
    source = saved(tmp_path, family)
    plan = stored_half_plan(source)
    config = ApplyConfig(repair="lstsq+experts")
    expected, expected_report = in_memory(source, plan, config, **FAST)
    done = stream_repair(source, plan, tmp_path / "out", config, STORED_IDS, settings=RepairSettings(**FAST),
                         **QUIET)
    assert [r.after for r in done.report.layers] == [r.after for r in expected_report.layers]
    assert_same_model(load_pruned(done.path), expected)
    got, unrepaired = load_pruned(done.path).state_dict(), stream_plain(source, plan, tmp_path / "plain")
    changed = {n for n in got if not torch.equal(got[n], unrepaired[n])}
    assert changed and all(".experts." in n for n in changed)
    assert any("down" not in n and "w2" not in n for n in changed)
    assert json.loads((done.path / "grape_provenance.json").read_text())["repair"]["method"] == "lstsq+experts"


def test_the_experts_flags_reach_the_fit_and_the_resume_key():
    from grape.pruning import repair_experts
    from grape.pruning.apply import ApplyConfig
    from test_repair_auto import fit_settings

    _, given, unset = fit_settings("lstsq+experts", "--repair-experts-steps", "7", "--repair-experts-lr", "0.05")
    assert (given.experts_steps, given.experts_lr) == (7, 0.05)
    assert (unset.experts_steps, unset.experts_lr) == (repair_experts.DEFAULT_STEPS, repair_experts.DEFAULT_LR)
    for bad in ({"repair_experts_steps": -1}, {"repair_experts_lr": 0.0}):
        with pytest.raises(PlanError, match="--repair-experts"):
            ApplyConfig(repair="lstsq+experts", **bad)


def test_a_resume_folder_of_other_experts_settings_is_started_over(tmp_path):
    from test_repair_sequential import Interrupted, stop_after

    source = saved(tmp_path, "qwen3_moe")
    plan = stored_half_plan(source)
    config = ApplyConfig(repair="lstsq+experts")
    with pytest.raises(Interrupted):
        stream_repair(source, plan, tmp_path / "out", config, STORED_IDS, settings=RepairSettings(**FAST),
                      on_layer=stop_after(0), **QUIET)
    other = {**FAST, "experts_lr": 0.05}
    lines: list[str] = []
    done = stream_repair(source, plan, tmp_path / "out", config, STORED_IDS, settings=RepairSettings(**other),
                         device="cpu", say=lines.append)
    assert done.resumed_at == 0 and any("another run" in line for line in lines)
    expected, _ = in_memory(source, plan, config, **other)
    assert_same_model(load_pruned(done.path), expected)
