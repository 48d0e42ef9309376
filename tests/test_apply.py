"""apply_plan: remove / merge / mask, exactness against an independent -inf router reference,
top_k adjustment, plan validation and DeepSeek group rules."""

from __future__ import annotations

import contextlib
import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, make_tiny, tiny_input_ids

from grape.models.adapters import get_adapter
from grape.pruning.apply import ApplyConfig, apply_plan
from grape.errors import ArchitectureError, PlanError, ScoresError
from solvers.plan import Plan
from solvers.scores import LayerScores, Scores

ALL = FAMILIES + ("deepseek_v2",)
# DeepSeek tiny models: 8 experts in 2 groups of 4, so balanced removals exist
GROUPED = {"deepseek_v3": {"n_group": 2, "topk_group": 1}, "deepseek_v2": {}}
IDS = tiny_input_ids(batch=2, seq=12)


def build(family: str, **overrides):
    return make_tiny(family, **{**GROUPED.get(family, {}), **overrides})


def plan_for(network, kept: dict[int, list[int]], **kwargs) -> Plan:
    adapter = get_adapter(network)
    removed = {layer: [e for e in range(adapter.num_experts(layer)) if e not in keep]
               for layer, keep in kept.items()}
    return Plan(kept=kept, removed=removed, **kwargs)


def uniform_kept(model) -> dict[int, list[int]]:
    return {layer: [0, 2, 5, 7] for layer in get_adapter(model).moe_blocks()}


def non_uniform_kept(model, family: str) -> dict[int, list[int]]:
    """Different counts per layer; outside DeepSeek one layer keeps 1 expert (< top_k = 2)."""
    layers = sorted(get_adapter(model).moe_blocks())
    choices = [[0, 2, 5, 7], [1, 2, 3, 4, 6, 7], [3]]
    if family.startswith("deepseek"):
        choices = [[1, 2, 3, 4, 6, 7], [0, 2, 5, 7]]  # 3 + 3 and 2 + 2 per group
    return {layer: choices[i] for i, layer in enumerate(layers)}


@contextlib.contextmanager
def router_logits_forced_to_inf(model, removed: dict[int, list[int]]):
    """Reference, independent of apply.py and the adapters' surgery: the stock model runs
    unchanged except that every router linear output has the removed experts' columns at -inf
    (a patched F.linear recognising each router weight by storage). DeepSeek-V3's selection-only
    e_score_correction_bias is set to -inf there too, since a -inf logit alone only zeroes the
    sigmoid score it is added to."""
    routers = {}
    for layer, experts in removed.items():
        block = model.model.layers[layer].mlp
        router = getattr(block, "router", None) or block.gate
        routers[router.weight.data_ptr()] = experts
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.data[experts] = float("-inf")
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


def reference_logits(model, plan: Plan) -> torch.Tensor:
    reference = copy.deepcopy(model)
    with router_logits_forced_to_inf(reference, plan.removed):
        return logits(reference)


# -- exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["uniform", "non_uniform"])
@pytest.mark.parametrize("family", ALL)
def test_remove_and_mask_equal_inf_router_logits(family, kind):
    model = build(family)
    kept = uniform_kept(model) if kind == "uniform" else non_uniform_kept(model, family)
    plan = plan_for(model, kept)
    original = logits(model)
    reference = reference_logits(model, plan)
    assert not torch.allclose(reference, original, atol=1e-3)  # the plan changes the output

    # the non-uniform plans leave one expert in a layer: top_k drops there, on purpose
    masked = apply_plan(copy.deepcopy(model), plan, ApplyConfig("mask", allow_lower_top_k=True))
    removed = apply_plan(model, plan, ApplyConfig("remove", allow_lower_top_k=True))
    torch.testing.assert_close(logits(removed), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(masked), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(masked), logits(removed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ALL)
def test_remove_updates_every_count(family):
    """Router, experts and block all read the new count (a stale one mis-routes silently)."""
    model = build(family)
    plan = plan_for(model, non_uniform_kept(model, family))
    adapter = get_adapter(apply_plan(model, plan, ApplyConfig(allow_lower_top_k=True)))
    for layer, keep in plan.kept.items():
        n = len(keep)
        for module in (adapter.router(layer), adapter.experts(layer), adapter.block(layer)):
            if hasattr(module, "num_experts"):
                assert module.num_experts == n
        for module in (adapter.router(layer), adapter.block(layer)):
            if hasattr(module, "top_k"):
                assert module.top_k == min(2, n)
        for name, tensor in list(adapter.router(layer).named_parameters()) + list(
                adapter.router(layer).named_buffers()):
            assert tensor.shape[0] == n, name
        for name, tensor in adapter.experts(layer).named_parameters():
            assert tensor.shape[0] == n, name
    identity = adapter.identity()
    assert identity.experts_per_layer == plan.kept_counts()
    assert identity.top_k == {layer: min(2, n) for layer, n in plan.kept_counts().items()}


def test_remove_keeps_the_right_expert_rows():
    model = build("gpt_oss")
    adapter = get_adapter(model)
    before = {name: t.detach().clone() for name, t in adapter.experts(1).named_parameters()}
    router_before = adapter.router(1).bias.detach().clone()
    plan = plan_for(model, {0: list(range(8)), 1: [1, 4, 6], 2: list(range(8))})
    apply_plan(model, plan)
    for name, tensor in adapter.experts(1).named_parameters():
        assert torch.equal(tensor, before[name][[1, 4, 6]])
    assert torch.equal(adapter.router(1).bias, router_before[[1, 4, 6]])


def test_top_k_shrinks_to_the_experts_left_and_config_records_it():
    model = build("qwen3_moe")
    plan = plan_for(model, {0: [3], 1: [0, 1, 2, 3], 2: [0, 1, 2, 3]})
    reference = reference_logits(model, plan)
    with pytest.raises(PlanError, match="fewer experts than top_k.*layer 0: 1 kept, top_k 2"):
        apply_plan(model, plan)  # lowering top_k changes the routing: refused unless asked for
    assert get_adapter(model).num_experts(0) == 8  # and the model was not touched
    apply_plan(model, plan, ApplyConfig(allow_lower_top_k=True))
    adapter = get_adapter(model)
    assert adapter.top_k(0) == 1 and adapter.top_k(1) == 2
    torch.testing.assert_close(logits(model), reference, rtol=1e-5, atol=1e-5)
    block = model.config.grape_pruning
    assert block["experts_per_layer"] == {"0": 1, "1": 4, "2": 4}
    assert block["top_k_per_layer"] == {"0": 1, "1": 2, "2": 2}
    assert model.config.num_experts == 4 and model.config.num_experts_per_tok == 2


def test_uniform_remove_writes_stock_config_keys():
    model = build("mixtral")
    apply_plan(model, plan_for(model, uniform_kept(model)))
    assert model.config.num_local_experts == 4
    assert "experts_per_layer" not in model.config.grape_pruning


# -- DeepSeek group rules -----------------------------------------------------------------------
def test_deepseek_needs_two_experts_per_group():
    model = make_tiny("deepseek_v3")  # 4 groups of 2: nothing can go
    before = logits(model)
    plan = plan_for(model, {1: [0, 1, 2, 3, 4, 5], 2: list(range(8))})
    with pytest.raises(ArchitectureError, match=r"layer 1: .*n_group=4.*multiple of 4"):
        apply_plan(model, plan)
    plan = plan_for(model, {1: [0, 2, 4, 6], 2: list(range(8))})
    with pytest.raises(ArchitectureError, match=r"at least 2 experts per group"):
        apply_plan(model, plan)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)  # untouched


def test_deepseek_groups_must_stay_balanced():
    model = build("deepseek_v3")
    plan = plan_for(model, {1: [0, 1, 2, 4, 5, 6], 2: [0, 1, 2, 3, 4, 5]})  # layer 2: 4 + 2
    with pytest.raises(ArchitectureError, match=r"layer 2: .*same number of experts kept in each "
                                                r"group of 4.*\[4, 2\]"):
        apply_plan(model, plan)
    with pytest.raises(ArchitectureError, match="same number"):
        apply_plan(model, plan, method="mask")


def test_deepseek_groups_must_reach_top_k():
    model = build("deepseek_v3", num_experts_per_tok=3)  # 1 group of 4 per token
    plan = plan_for(model, {1: [0, 1, 4, 5], 2: list(range(8))})
    with pytest.raises(ArchitectureError, match=r"1 groups x 2 experts = 2 < top_k=3"):
        apply_plan(model, plan)


# -- validation -----------------------------------------------------------------------------
def test_plan_for_other_layers_is_rejected():
    model = build("qwen3_moe")
    plan = Plan(kept={0: [0, 1]}, removed={0: [2, 3, 4, 5, 6, 7]})
    with pytest.raises(PlanError, match=r"covers layers \[0\] but .* MoE layers \[0, 1, 2\]"):
        apply_plan(model, plan)


def test_plan_applied_twice_is_rejected():
    model = build("olmoe")
    plan = plan_for(model, uniform_kept(model))
    apply_plan(model, plan)
    with pytest.raises(PlanError, match=r"layer 0: .*exactly 0..3.*already pruned"):
        apply_plan(model, plan)


def test_plan_from_another_model_is_rejected():
    model = build("qwen3_moe")
    other = get_adapter(make_tiny("qwen3_moe", seed=1)).identity()
    plan = plan_for(model, uniform_kept(model), model=other.to_json())
    with pytest.raises(PlanError, match="fingerprint"):
        apply_plan(model, plan)
    plan = plan_for(model, uniform_kept(model), model=get_adapter(model).identity().to_json())
    apply_plan(model, plan)  # its own identity is accepted


def test_unknown_method():
    with pytest.raises(PlanError, match="unknown apply method 'prune'"):
        ApplyConfig("prune")


# -- merge ------------------------------------------------------------------------------------
def _scores_for(model, counts: dict[int, list[float]]) -> Scores:
    identity = get_adapter(model).identity()
    layers = {}
    for layer, n in identity.experts_per_layer.items():
        c = np.asarray(counts.get(layer, [1.0] * n), dtype=np.float64)
        stats = {name: c.copy() for name in ("count", "gate_sum", "norm_sum", "gate_norm_sum",
                                             "gate_norm_sq_sum", "norm_max")}
        layers[layer] = LayerScores(layer=layer, stats=stats, expert_bytes=np.ones(n, dtype=np.int64))
    return Scores(model=identity, layers=layers, tokens=100)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_merge_is_frequency_weighted_average(family):
    model = build(family)
    adapter = get_adapter(model)
    before = {name: t.detach().clone() for name, t in adapter.experts(1).named_parameters()}
    kept = {layer: list(range(8)) for layer in adapter.moe_blocks()}
    kept[1] = [0, 1, 2, 3, 4, 5]
    plan = plan_for(model, kept, merge_map={1: {6: 0, 7: 0}})
    counts = {1: [3.0, 1, 1, 1, 1, 1, 1.0, 4.0]}
    apply_plan(model, plan, ApplyConfig("merge", merge_weights=_scores_for(model, counts)))
    for name, tensor in adapter.experts(1).named_parameters():
        expected = (3 * before[name][0] + 1 * before[name][6] + 4 * before[name][7]) / 8
        torch.testing.assert_close(tensor[0], expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(tensor[1:], before[name][1:6], rtol=0, atol=0)
    assert adapter.num_experts(1) == 6


def test_merge_without_map_uses_weight_cosine(caplog):
    model = build("mixtral")
    adapter = get_adapter(model)
    with torch.no_grad():  # expert 6 is a scaled copy of expert 3: cosine 1
        for tensor in adapter.experts(2).parameters():
            tensor[6] = 2 * tensor[3]
    before = {name: t.detach().clone() for name, t in adapter.experts(2).named_parameters()}
    kept = {layer: list(range(8)) for layer in adapter.moe_blocks()}
    kept[2] = [0, 1, 2, 3, 4, 5, 7]
    with caplog.at_level(logging.WARNING, logger="grape.pruning.apply"):
        apply_plan(model, plan_for(model, kept), method="merge")  # equal weights
    assert "no merge map for layers [2]" in caplog.text
    for name, tensor in adapter.experts(2).named_parameters():
        torch.testing.assert_close(tensor[3], 1.5 * before[name][3], rtol=1e-6, atol=1e-6)


def test_merge_map_must_send_removed_to_kept():
    model = build("qwen3_moe")
    kept = {layer: [0, 1, 2, 3] for layer in get_adapter(model).moe_blocks()}
    plan = plan_for(model, kept, merge_map={0: {1: 5}})
    with pytest.raises(PlanError, match="layer 0: merge_map sends expert 1 to 5"):
        apply_plan(model, plan, method="merge")


def test_merge_scores_from_another_model_are_rejected():
    model = build("qwen3_moe")
    plan = plan_for(model, uniform_kept(model))
    scores = _scores_for(make_tiny("qwen3_moe", seed=3), {})
    with pytest.raises(ScoresError, match="fingerprint"):
        apply_plan(model, plan, "merge", merge_weights=scores)
