"""The router re-fit repair (grape.pruning.repair_router; --repair router and lstsq+router): it
lowers each pruned layer's routed-output error on its tokens (or is undone), changes nothing but
the kept router rows (and a router bias), is deterministic, the checkpoint reloads in stock
transformers, the layer-by-layer repair from the shards writes the same tensors, and a family
whose experts read the router (Llama-4) is refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from test_repair import IDS, block_io, block_output, build, half_plan, plain, repaired
from tiny_models import make_tiny

from grape.errors import ArchitectureError, PlanError
from grape.models.adapters import get_adapter
from grape.pruning.apply import ApplyConfig
from grape.pruning.checkpoint import load_pruned, save_pruned
from grape.pruning.repair import RepairSettings, prune_and_repair
from grape.pruning.repair_router import expert_statistics
from solvers.plan import Plan

FAST = {"router_steps": 40}  # enough to move the rows on the tiny models, quick to run


def changed_tensors(model, plan, fixed) -> set[str]:
    """Names of the tensors that differ from plain removal (same names, shapes, dtypes)."""
    removed = plain(model, plan).state_dict()
    state = fixed.state_dict()
    assert list(state) == list(removed)
    out = set()
    for name, tensor in state.items():
        assert tensor.shape == removed[name].shape and tensor.dtype == removed[name].dtype, name
        if not torch.equal(tensor, removed[name]):
            out.add(name)
    return out


def model_of(family: str):
    return build(family) if family != "olmoe" else make_tiny("olmoe")


# -- what it does ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_the_router_refit_lowers_each_layers_error_and_changes_only_the_router(family):
    """Measured independently of the report: on the inputs the repaired model gives each pruned
    block, the block is closer to the original block than the plainly pruned one (DeepSeek-V3:
    sigmoid, correction bias and groups; gpt-oss: a router bias; OLMoE: softmax without
    renormalisation). Only router weights (and gpt-oss's router bias) differ from plain removal."""
    model = model_of(family)
    plan = half_plan(model)
    fixed, report = repaired(model, plan, "router", **FAST)
    assert [r.layer for r in report.layers] == plan.layers and all(r.kept_fit for r in report.layers)
    removed = plain(model, plan)
    for layer, (x, out) in block_io(fixed, IDS).items():
        target = block_output(model, layer, x)
        before = (block_output(removed, layer, x) - target).pow(2).sum(-1).mean()
        after = (out - target).pow(2).sum(-1).mean()
        assert after < before, (layer, float(before), float(after))
    router = get_adapter(fixed).router_attr
    expected = {f"{router}.{p}" for p in (("weight", "bias") if family == "gpt_oss" else ("weight",))}
    changed = changed_tensors(model, plan, fixed)
    assert changed and {n.split(".mlp.", 1)[1] for n in changed} == expected


def test_lstsq_then_router_is_no_worse_than_lstsq_and_changes_both():
    model = build("qwen3_moe")
    plan = half_plan(model)
    fixed, both = repaired(model, plan, "lstsq+router", **FAST)
    _, alone = repaired(model, plan, "lstsq")
    # the first pruned layer sees the same inputs in both (the layers above see repaired ones);
    # the router stage is kept only where it lowers the error lstsq left
    first, reference = both.layers[0], alone.layers[0]
    assert first.before == reference.before and first.after <= reference.after
    kinds = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in changed_tensors(model, plan, fixed)}
    assert kinds == {"experts.down_proj", "gate.weight"}


def test_the_router_refit_is_deterministic():
    model = build("deepseek_v3")
    plan = half_plan(model)
    first = repaired(model, plan, "lstsq+router", **FAST)[0].state_dict()
    second = repaired(model, plan, "lstsq+router", **FAST)[0].state_dict()
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_a_refit_that_does_not_help_is_undone():
    """No steps: the rows stay the original ones, the error does not fall, the stage is undone
    and the model is exactly plainly pruned."""
    model = build("qwen3_moe")
    plan = half_plan(model)
    fixed, report = repaired(model, plan, "router", router_steps=0)
    assert not any(r.kept_fit for r in report.layers)
    assert all(r.after == r.before for r in report.layers)
    assert changed_tensors(model, plan, fixed) == set()


def test_the_statistics_give_the_routed_error_of_any_selection():
    """yy - 2 W.b + W G W (W: routing weights scattered by expert) is ||y - routed output||^2 as
    the experts module computes it, token by token, for the router's selection and for random
    ones (the re-fit's selection changes from step to step)."""
    model = plain(build("gpt_oss"), half_plan(build("gpt_oss")))  # expert biases: E_e(x) affine
    adapter = get_adapter(model)
    experts, x, y = adapter.experts(0), torch.randn(50, 32), torch.randn(50, 32)
    yy, b, gram = expert_statistics(experts, x, y, adapter.num_experts(0))
    generator = torch.Generator().manual_seed(0)
    random = (torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(50)]),
              torch.rand(50, 2, generator=generator))
    for index, weight in (adapter.route(0, x), random):
        dense = torch.zeros(50, 4).scatter(1, index, weight)
        modelled = yy - 2 * (dense * b).sum(-1) + torch.einsum("tk,tkl,tl->t", dense, gram, dense)
        direct = (y - experts(x, index, weight)).pow(2).sum(-1)
        torch.testing.assert_close(modelled, direct, rtol=1e-4, atol=1e-4)


# -- the checkpoint ---------------------------------------------------------------------------------------
def test_the_router_repaired_checkpoint_reloads_to_the_same_logits(tmp_path):
    model = build("gpt_oss")
    fixed, _ = repaired(model, half_plan(model), "lstsq+router", **FAST)
    save_pruned(fixed, tmp_path / "ckpt", plan=half_plan(model))
    with torch.no_grad():
        expected = fixed(input_ids=IDS).logits
        stock = T.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")(input_ids=IDS).logits
        ours = load_pruned(tmp_path / "ckpt")(input_ids=IDS).logits
    torch.testing.assert_close(stock, expected, rtol=0, atol=0)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family, method", [("qwen3_moe", "router"), ("gpt_oss", "lstsq+router")])
def test_the_layer_by_layer_repair_writes_the_same_router(family, method, tmp_path):
    """From the shards (grape.pruning.repair_sequential), the router rows (and bias) are written
    under the checkpoint's names: the same tensors as the in-memory repair, bit for bit."""
    from test_repair_sequential import IDS as STORED_IDS
    from test_repair_sequential import QUIET, assert_same_model, in_memory, saved
    from test_repair_sequential import half_plan as stored_plan

    from grape.pruning.repair_sequential import stream_repair

    source = saved(tmp_path, family)
    plan = stored_plan(source)
    config = ApplyConfig(repair=method)
    expected, report = in_memory(source, plan, config, **FAST)
    done = stream_repair(source, plan, tmp_path / "out", config, STORED_IDS,
                         settings=RepairSettings(**FAST), **QUIET)
    assert [r.after for r in done.report.layers] == [r.after for r in report.layers]
    assert all(r.kept_fit for r in report.layers)
    assert_same_model(load_pruned(done.path), expected)


# -- refusals ----------------------------------------------------------------------------------------------
def test_experts_that_read_the_router_are_refused_in_one_line():
    """Llama-4's experts scale their input by the router's own score: their outputs cannot be
    held fixed while the rows move."""
    from tiny_families import make_family

    model = make_family("llama4_text")
    adapter = get_adapter(model)
    layer = next(iter(adapter.moe_blocks()))
    kept = [0, 2, 5, 7]
    plan = Plan(kept={layer: kept}, removed={layer: [e for e in range(8) if e not in kept]})
    ids = torch.randint(0, int(model.config.vocab_size), (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ArchitectureError, match="--repair router cannot") as err:
        prune_and_repair(copy.deepcopy(model), plan, ApplyConfig(repair="router"), ids)
    assert "\n" not in str(err.value)


def test_bad_router_settings_are_refused():
    assert ApplyConfig(repair="lstsq+router").repair == "lstsq+router"
    for bad in ({"router_steps": -1}, {"router_lr": 0.0}, {"router_lr": float("nan")}):
        with pytest.raises(PlanError, match="router"):
            RepairSettings(**bad)
    assert RepairSettings().ridge_for("router") is None
    assert RepairSettings().ridge_for("lstsq+router") == RepairSettings().ridge_for("lstsq")


# -- the command -------------------------------------------------------------------------------------------
def test_grape_apply_repairs_the_router_in_memory_and_from_the_shards_alike(tmp_path, capsys):
    from cli_workspace import make_workspace
    from test_repair_sequential import assert_same_model
    from test_repair_sequential import half_plan as stored_plan

    from grape.cli.main import main as grape_main

    ws = make_workspace(tmp_path / "ws")
    stored_plan(ws.model).save(tmp_path / "plan.json")
    base = ["apply", "--model", str(ws.model), "--plan", str(tmp_path / "plan.json"), "--repair",
            "lstsq+router", "--repair-data", str(ws.calibration), "--repair-samples", "4",
            "--repair-seq-len", "32"]
    assert grape_main([*base, "--out", str(tmp_path / "m"), "--mode", "in-memory"]) == 0
    assert "repair lstsq+router: 3 layer(s) on 128 tokens" in capsys.readouterr().out
    assert grape_main([*base, "--out", str(tmp_path / "s"), "--mode", "streaming"]) == 0
    assert "streamed shard by shard" in capsys.readouterr().out
    assert_same_model(load_pruned(tmp_path / "s"), load_pruned(tmp_path / "m"))
    plain_dir = tmp_path / "p"
    assert grape_main([*base[:5], "--out", str(plain_dir)]) == 0
    repaired_state, plain_state = load_pruned(tmp_path / "m").state_dict(), load_pruned(plain_dir).state_dict()
    assert any(n.endswith("gate.weight") and not torch.equal(t, plain_state[n]) for n, t in repaired_state.items())
