"""The families added by declaration (grape/models/adapters/{deepseek_like,minimax_m2,lfm2_moe,
qwen3_next,standard}.py), each from a tiny random config: the adapter routes as the block does
and its experts add up to the block's output; physical removal equals masking and equals the
original with the removed experts' router scores at -inf; a uniform checkpoint reloads in stock
transformers; calibration gives finite scores. Also prints the MoE families of the installed
transformers (scripts/moe_families.py), a listing that never fails."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from tiny_families import NEW_FAMILIES, make_family
from tiny_models import FAMILIES, make_tiny, tiny_input_ids

from grape.models.adapters import get_adapter, supported_model_types
from grape.calibration.calibrate import CalibrationConfig, calibrate
from grape.pruning.checkpoint import save_pruned
from grape.errors import ArchitectureError
from grape.pruning.apply import ApplyConfig, apply_plan
from solvers.plan import Plan

IDS = tiny_input_ids(batch=2, seq=12)
# sparsemixer takes |logit| of every expert: a -inf logit makes NaN, so Phi-3.5-MoE is checked
# against masking (the router run on the kept experts' rows) instead
NO_INF_REFERENCE = {"phimoe"}


def _grouped(adapter) -> bool:
    n_group, _ = adapter.routing_groups()
    return bool(n_group and n_group > 1)


def _plan(adapter, kind: str) -> Plan:
    layers = sorted(adapter.moe_blocks())
    if kind == "uniform":
        kept = {layer: [0, 2, 5, 7] for layer in layers}
    else:  # grouped routers (2 groups of 4) keep the same number in each group
        # (Phi-3.5-MoE's sparsemixer always picks two: no single-expert layer either)
        choices = ([[1, 2, 3, 4, 6, 7], [0, 2, 5, 7]] if _grouped(adapter) or adapter.config.model_type == "phimoe"
                   else [[0, 2, 5, 7], [1, 2, 3, 4, 6, 7], [3]])
        kept = {layer: choices[i % len(choices)] for i, layer in enumerate(layers)}
    removed = {layer: [e for e in range(8) if e not in keep] for layer, keep in kept.items()}
    return Plan(kept=kept, removed=removed)


@contextlib.contextmanager
def router_scores_at_minus_inf(adapter, removed: dict[int, list[int]]):
    """The stock model, except every router projection has the removed experts' columns at -inf
    and every selection-only bias (router's or block's) is -inf there too."""
    routers = {}
    for layer, experts in removed.items():
        router = adapter.router(layer)
        routers[router.weight.data_ptr()] = experts
        # the router's children too (ERNIE-4.5: gate.moe_statics holds a [1, E] bias)
        for module, recurse in ((router, True), (adapter.block(layer), False)):
            for name, tensor in list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse)):
                if name.endswith(("e_score_correction_bias", "expert_bias")):
                    tensor.data[..., experts] = float("-inf")
    original = F.linear

    def linear(x, weight, bias=None):
        out = original(x, weight, bias)
        columns = routers.get(weight.data_ptr())
        if columns:
            out = out.clone()
            out[..., columns] = float("-inf")
        return out

    F.linear = linear
    try:
        yield
    finally:
        F.linear = original


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def family_model(request):
    return request.param, make_family(request.param)


def test_route_and_experts_are_what_the_block_applies(family_model):
    family, model = family_model
    adapter = get_adapter(model)
    assert adapter.moe_blocks() and type(adapter).__name__ != "MoEAdapter"
    hidden = torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
    for layer in adapter.moe_blocks():
        assert adapter.num_experts(layer) == 8 and adapter.top_k(layer) == 2
        seen = {}
        handle = adapter.experts(layer).register_forward_pre_hook(
            lambda _m, args, _kw: seen.update(index=args[1], weights=args[2]), with_kwargs=True)
        with torch.no_grad():
            adapter.block(layer)(hidden.unsqueeze(0))
            index, weights = adapter.route(layer, hidden)
        handle.remove()
        assert torch.equal(index, seen["index"]) and torch.equal(weights, seen["weights"])
        # the experts' routed output is the gate-weighted sum of expert_forward
        rows = hidden[:6]
        with torch.no_grad():
            index, weights = adapter.route(layer, rows)
            routed = adapter.experts(layer)(rows, index, weights)
            slow = torch.stack([sum(weights[t, j] * adapter.expert_forward(layer, rows[t:t + 1], int(index[t, j]))[0]
                                    for j in range(index.shape[1])) for t in range(rows.shape[0])])
        torch.testing.assert_close(routed, slow, rtol=1e-5, atol=1e-6)
        assert sum(adapter.expert_bytes(layer)) == sum(
            p.numel() * p.element_size() for p in adapter.experts(layer).parameters())
    assert get_adapter(make_family(family)).identity().fingerprint == adapter.identity().fingerprint


@pytest.mark.parametrize("kind", ["uniform", pytest.param("non_uniform", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_remove_equals_mask_equals_minus_inf(family, kind):
    model = make_family(family)
    plan = _plan(get_adapter(model), kind)
    original = logits(model)
    masked = apply_plan(copy.deepcopy(model), plan, ApplyConfig("mask", allow_lower_top_k=True))
    reference = logits(masked)
    if family not in NO_INF_REFERENCE:
        stock = copy.deepcopy(model)
        with router_scores_at_minus_inf(get_adapter(stock), plan.removed):
            reference = logits(stock)
        torch.testing.assert_close(logits(masked), reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(reference, original, atol=1e-3)  # the plan changes the output
    removed = apply_plan(model, plan, ApplyConfig("remove", allow_lower_top_k=True))
    torch.testing.assert_close(logits(removed), reference, rtol=1e-5, atol=1e-5)
    adapter = get_adapter(removed)
    for layer, keep in plan.kept.items():
        for module in (adapter.router(layer), adapter.experts(layer), adapter.block(layer)):
            if hasattr(module, "num_experts"):
                assert module.num_experts == len(keep)
    assert adapter.identity().experts_per_layer == plan.kept_counts()


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_uniform_checkpoint_reloads_in_stock_transformers(family, tmp_path):
    model = make_family(family)
    adapter = get_adapter(model)
    apply_plan(model, _plan(adapter, "uniform"), ApplyConfig("remove"))
    out = save_pruned(model, tmp_path / family)
    config = json.loads((out / "config.json").read_text())
    for key in type(adapter).expert_count_keys:
        if key in config:
            assert config[key] == 4, key
    stock = T.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(stock), logits(model), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_calibration_gives_finite_scores(family):
    model = make_family(family)
    config = CalibrationConfig(batch_size=2, subsample=16, progress=False, reconstruction=False)
    scores = calibrate(model, tiny_input_ids(2, 12), config)
    adapter = get_adapter(model)
    assert sorted(scores.layers) == sorted(adapter.moe_blocks())
    for layer in scores.layers.values():
        for name, values in layer.stats.items():
            assert np.isfinite(values).all(), name
        if layer.cost_curve is not None:
            assert np.isfinite(layer.cost_curve).all()


# every family: the first seven (DeepSeek-V3 with 2 groups of 4, as the others' V3 routers) and
# the new ones
TWO_GROUPS = {"deepseek_v3": {"n_group": 2, "topk_group": 1}}
ROUTED = {**{f: lambda f=f: make_tiny(f, **TWO_GROUPS.get(f, {})) for f in (*FAMILIES, "deepseek_v2")},
          **{f: lambda f=f: make_family(f) for f in NEW_FAMILIES}}


# in the quick suite: the selection biases of a block (MiniMax-M2, LFM2) and of a router child
# (ERNIE), the sparsemixer (no -inf), a group-limited DeepSeek-V3 router; the others are slow
QUICK_ROUTED = {"minimax_m2", "lfm2_moe", "ernie4_5_moe", "phimoe", "deepseek_v3"}


@pytest.mark.parametrize("family", [
    pytest.param(f, marks=() if f in QUICK_ROUTED else pytest.mark.slow) for f in sorted(ROUTED)])
def test_route_rows_is_the_models_own_routing(family):
    """route_rows (the reconstruction order's routing of many masks at once, from the router
    logits) chooses what the model's router chooses: with nothing removed, the stock router's
    top-k; with a row's experts removed, the top-k of the model masked to that row's set
    (mask_experts: the router run on the kept experts, biases sliced as the model slices them)."""
    model = ROUTED[family]()
    generator = torch.Generator().manual_seed(3)
    # selection biases as large as the scores: a removed expert's bias alone would win
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    adapter = get_adapter(model)
    hidden = torch.randn(32, 32, generator=generator)
    sets = [[1, 6], [0, 3, 4, 7]]  # balanced in 2 groups of 4; at least two kept (sparsemixer)
    got, stock = {}, {}
    with torch.no_grad():
        for i, layer in enumerate(sorted(adapter.moe_blocks())):
            logits, index, weight = adapter.router_logits(layer, hidden)
            removed = torch.zeros(logits.shape, dtype=torch.bool)
            removed[:16, sets[i % 2]] = True  # the first half of the rows masks a set
            got[layer], stock[layer] = adapter.route_rows(layer, logits, removed), (index, weight)
        for i, layer in enumerate(sorted(adapter.moe_blocks())):
            adapter.mask_experts(layer, sets[i % 2])
            masked = adapter.route(layer, hidden[:16])
            assert not torch.equal(masked[0], stock[layer][0][:16])  # the removal re-routes rows
            want = [torch.cat([m, s[16:]]) for m, s in zip(masked, stock[layer])]
            order, want_order = got[layer][0].argsort(1), want[0].argsort(1)
            chosen, want_chosen = got[layer][0].gather(1, order), want[0].gather(1, want_order)
            wrong = (chosen != want_chosen).any(1).nonzero().squeeze(1).tolist()
            assert not wrong, (f"layer {layer}: rows {wrong} chose {chosen[wrong].tolist()}, "
                               f"not {want_chosen[wrong].tolist()}")
            torch.testing.assert_close(got[layer][1].gather(1, order),
                                       want[1].gather(1, want_order), rtol=1e-5, atol=1e-6)


def test_uneven_balancing_loss_hooks_a_block_not_named_mlp():
    """Granite's MoE block is `block_sparse_moe`: the per-layer load-balancing loss of an
    unevenly pruned model records every MoE layer's router (a hook each, and the model's two)."""
    from test_aux_loss import uneven_plan

    model = make_family("granitemoe")
    apply_plan(model, uneven_plan(model))
    assert len(model._grape_uneven_aux_hooks) == len(get_adapter(model).moe_blocks()) + 2


@pytest.mark.slow
@pytest.mark.parametrize("family", ["granitemoe", "granitemoeshared", "granitemoehybrid"])
def test_uneven_balancing_loss_finds_a_block_not_named_mlp(family, tmp_path):
    """The same loss computed (in memory, and from the remote-code checkpoint) as
    tests/test_aux_loss.py checks it for the first families."""
    from test_aux_loss import check_uneven_output, uneven_plan

    model = make_family(family)
    assert type(get_adapter(model)).block_attr == "block_sparse_moe"
    apply_plan(model, uneven_plan(model))
    check_uneven_output(model.train())
    out = save_pruned(model, tmp_path / family)
    check_uneven_output(T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).train())


def test_latent_nemotron_h_is_refused():
    model = make_family("nemotron_h")
    model.config.moe_latent_size = 16
    with pytest.raises(ArchitectureError, match="latent MoE"):
        get_adapter(model)


def test_grouped_axk2_is_refused():
    """A.X-K2's group-limited router fills unchosen groups with 0, not -inf: removing an expert
    there is not masking it, so a grouped config is refused (A.X-K2-Light has no groups)."""
    model = make_family("axk2")
    model.config.n_group, model.config.topk_group = 2, 1
    with pytest.raises(ArchitectureError, match="n_group") as refused:
        get_adapter(model)
    assert len(str(refused.value).splitlines()) == 1


def test_refused_config_values_stop_before_the_model_is_built():
    """config_refusals are read from config.json itself: the refusal comes before any weight
    is loaded, in one line naming the file."""
    from grape.models.adapters import check_model_config

    for family, extra in (("nemotron_h", {"moe_latent_size": 16}), ("axk2", {"n_group": 2, "topk_group": 1})):
        config = {**make_family(family).config.to_dict(), **extra}
        with pytest.raises(ArchitectureError) as refused:
            check_model_config(config, "m/config.json")
        message = str(refused.value)
        assert message.startswith(f"m/config.json: {family} with {next(iter(extra))}"), message
        assert len(message.splitlines()) == 1
        check_model_config({**config, **{key: None for key in extra}}, "m/config.json")  # unset: fine


def moe_families_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "moe_families.py"
    spec = importlib.util.spec_from_file_location("moe_families", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_architecture_table_is_the_adapters():
    """README's table is generated from the adapters' declarations: one row per adapter class,
    every supported model type in one row (`python scripts/moe_families.py --write`)."""
    script = moe_families_script()
    rows = script.adapter_rows()  # refuses an adapter that declares no family or examples
    assert sorted(t for row in rows for t in row["model_types"]) == supported_model_types()
    readme = script.README.read_text()
    table = script.readme_table(rows)
    assert script.with_table(readme, table) == readme, "run python scripts/moe_families.py --write"
    assert "| Llama 4 (text decoder) | `llama4_text` |" in table


def test_moe_families_of_transformers_are_listed(capsys):
    """Prints every MoE model type with GRAPE's answer; informative only, never fails."""
    try:
        module = moe_families_script()
        rows = module.report()
    except Exception as exc:  # noqa: BLE001 - a listing, never a failure
        print(f"moe_families could not run: {exc!r}")
        return
    supported = [r["model_type"] for r in rows if r["supported"]]
    with capsys.disabled():
        print(f"\n{len(rows)} MoE model types, {len(supported)} supported: {', '.join(supported)}")
        for row in rows:
            if not row["supported"]:
                print(f"  refused {row['model_type']}: {row['detail']}")


def test_llama4_contribution_is_the_input_scaled_expert():
    """Llama-4 scales an expert's input by its score: weight x expert_forward must be f_e(s x),
    the contribution the block really adds, for the observer's statistics to be real."""
    adapter = get_adapter(make_family("llama4_text"))
    experts = adapter.experts(1)
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        index, weights = adapter.route(1, hidden)
        for t in range(hidden.shape[0]):
            for j in range(index.shape[1]):
                e, x = int(index[t, j]), weights[t, j] * hidden[t]
                gate, up = (x @ experts.gate_up_proj[e]).chunk(2, dim=-1)
                direct = (up * experts.act_fn(gate)) @ experts.down_proj[e]
                got = weights[t, j] * adapter.expert_forward(1, hidden[t:t + 1], e)[0]
                torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-6)
