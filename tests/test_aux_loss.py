"""Router load-balancing loss on pruned models (`output_router_logits=True`, as when fine-tuning
after pruning): transformers' loss must see the pruned expert count, and models whose layers
keep different counts get the per-layer loss of grape/templates/grape_moe_aux.py."""

from __future__ import annotations

import importlib

import pytest
import torch
import transformers as T
from tiny_models import make_tiny, tiny_input_ids

from grape.models.adapters import get_adapter
from grape.pruning.apply import apply_plan
from grape.pruning.checkpoint import load_pruned, save_pruned
from grape.templates.grape_moe_aux import uneven_load_balancing_loss
from solvers.plan import Plan

WITH_AUX_LOSS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"]
IDS = tiny_input_ids(batch=2, seq=10)


def stock_loss_func(model):
    return importlib.import_module(type(model).__module__).load_balancing_loss_func


def plan_for(model, kept: dict[int, list[int]]) -> Plan:
    adapter = get_adapter(model)
    removed = {layer: [e for e in range(adapter.num_experts(layer)) if e not in keep]
               for layer, keep in kept.items()}
    return Plan(kept=kept, removed=removed)


def uneven_plan(model) -> Plan:
    layers = sorted(get_adapter(model).moe_blocks())
    choices = [[0, 2, 5, 7], [1, 2, 3, 4, 6, 7], [1, 6]]
    return plan_for(model, {layer: choices[i] for i, layer in enumerate(layers)})


def router_logits(model) -> list[torch.Tensor]:
    """Each MoE router's logits for IDS, read by hooks (independent of the code under test)."""
    adapter = get_adapter(model)
    captured = []
    handles = [adapter.router(layer).register_forward_hook(lambda m, a, out: captured.append(out[0]))
               for layer in sorted(adapter.moe_blocks())]
    try:
        with torch.no_grad():
            model(IDS, output_router_logits=False)
    finally:
        for h in handles:
            h.remove()
    return captured


@pytest.mark.parametrize("family", WITH_AUX_LOSS)
def test_per_layer_loss_matches_transformers_on_one_layer(family):
    model = make_tiny(family)
    logits = router_logits(model)[0]
    k = model.config.num_experts_per_tok
    mask = torch.ones(IDS.shape, dtype=torch.long)
    mask[1, 6:] = 0
    for attention_mask in (None, mask):
        expected = stock_loss_func(model)((logits,), logits.shape[-1], k, attention_mask)
        got = uneven_load_balancing_loss([logits], [k], attention_mask)
        torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


def test_per_layer_loss_is_top_k_when_routing_is_balanced():
    logits = torch.zeros(12, 4)  # uniform probabilities; ties make top-k pick experts 0,1
    loss = uneven_load_balancing_loss([logits], [2])
    assert loss.item() == pytest.approx(2.0)  # E * sum_i f_i / 4 = sum_i f_i = k


@pytest.mark.parametrize("family", WITH_AUX_LOSS)
def test_uniformly_pruned_model_uses_the_pruned_count(family):
    model = make_tiny(family)
    layers = sorted(get_adapter(model).moe_blocks())
    apply_plan(model, plan_for(model, {layer: [1, 2, 4, 7] for layer in layers}))
    logits = router_logits(model)
    out = model(IDS, labels=IDS, output_router_logits=True)
    expected = stock_loss_func(model)(tuple(logits), 4, model.config.num_experts_per_tok, None)
    torch.testing.assert_close(out.aux_loss, expected, rtol=1e-5, atol=1e-6)


def check_uneven_output(model):
    logits = router_logits(model)
    assert len({t.shape[-1] for t in logits}) > 1
    top_ks = [int(get_adapter(model).router(layer).top_k) for layer in sorted(get_adapter(model).moe_blocks())]
    with torch.no_grad():
        plain = model(IDS, labels=IDS, output_router_logits=False)
    out = model(IDS, labels=IDS, output_router_logits=True)
    expected = uneven_load_balancing_loss(logits, top_ks)
    torch.testing.assert_close(out.aux_loss, expected, rtol=1e-5, atol=1e-6)
    assert [t.shape for t in out.router_logits] == [t.shape for t in logits]
    coef = model.router_aux_loss_coef
    torch.testing.assert_close(out.loss, plain.loss + coef * expected, rtol=1e-5, atol=1e-6)
    out.loss.backward()  # the balancing term reaches the routers
    router = get_adapter(model).router(sorted(get_adapter(model).moe_blocks())[0])
    assert router.weight.grad is not None and torch.isfinite(router.weight.grad).all()
    assert not model.config.output_router_logits  # off again: the next call is the plain forward
    assert model(IDS, labels=IDS).aux_loss is None


@pytest.mark.parametrize("family", WITH_AUX_LOSS)
def test_unevenly_pruned_model_gets_the_per_layer_loss(family):
    model = make_tiny(family)
    apply_plan(model, uneven_plan(model))
    check_uneven_output(model)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_uneven_checkpoint_trains_with_and_without_remote_code(family, tmp_path):
    model = make_tiny(family)
    apply_plan(model, uneven_plan(model))
    out = save_pruned(model, tmp_path / family)
    assert (out / "grape_moe_aux.py").is_file()
    check_uneven_output(load_pruned(out).train())
    check_uneven_output(T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).train())


def test_deepseek_has_no_balancing_loss_and_is_left_alone():
    model = make_tiny("deepseek_v3", n_group=2, topk_group=1)
    layers = sorted(get_adapter(model).moe_blocks())
    apply_plan(model, plan_for(model, {layers[0]: [0, 1, 2, 4, 5, 6], layers[1]: [0, 1, 4, 5]}))
    out = model(IDS, labels=IDS, output_router_logits=True)
    assert out.aux_loss is None and torch.isfinite(out.loss)
