"""Architecture adapters: structure, routing the model really applies, expert outputs, identity."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, make_tiny
from torch import nn

from grape.models.adapters import get_adapter, supported_model_types
from grape.models.adapters.deepseek import DeepseekV2Adapter, DeepseekV3Adapter
from grape.models.adapters.gpt_oss import GptOssAdapter
from grape.models.adapters.mixtral import MixtralAdapter
from grape.models.adapters.olmoe import OlmoeAdapter
from grape.models.adapters.qwen2_moe import Qwen2MoeAdapter
from grape.models.adapters.qwen3_moe import Qwen3MoeAdapter
from grape.errors import ArchitectureError
from solvers.scores import ModelIdentity

ALL = FAMILIES + ("deepseek_v2",)
EXPECTED = {
    "mixtral": MixtralAdapter,
    "qwen2_moe": Qwen2MoeAdapter,
    "qwen3_moe": Qwen3MoeAdapter,
    "olmoe": OlmoeAdapter,
    "deepseek_v3": DeepseekV3Adapter,
    "deepseek_v2": DeepseekV2Adapter,
    "gpt_oss": GptOssAdapter,
}


@pytest.fixture(scope="module", params=ALL)
def family_model(request):
    return request.param, make_tiny(request.param)


def _hidden(tokens: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(tokens, 32, generator=torch.Generator().manual_seed(seed))


def test_adapter_class_and_moe_layers(family_model):
    family, model = family_model
    adapter = get_adapter(model)
    assert type(adapter) is EXPECTED[family]
    expected_layers = [1, 2] if family.startswith("deepseek") else [0, 1, 2]  # first layer dense
    assert sorted(adapter.moe_blocks()) == expected_layers
    for layer in expected_layers:
        assert adapter.num_experts(layer) == 8 and adapter.top_k(layer) == 2
        assert adapter.router(layer).weight.shape == (8, 32)


def test_unknown_model_type_lists_supported_ones():
    class Dense(nn.Module):
        config = type("Config", (), {"model_type": "llama"})()

    with pytest.raises(ArchitectureError) as info:
        get_adapter(Dense())
    message = str(info.value)
    assert "'llama'" in message
    for model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"):
        assert model_type in message
    assert set(EXPECTED) <= set(supported_model_types())


def test_dense_layers_are_skipped():
    model = make_tiny("qwen3_moe", mlp_only_layers=[1])
    assert sorted(get_adapter(model).moe_blocks()) == [0, 2]
    with pytest.raises(ArchitectureError, match="layer 1 .*no routed experts"):
        get_adapter(model).router(1)


def test_route_is_what_the_block_applies(family_model):
    """The block's own call to its experts receives exactly adapter.route's indices and weights."""
    _family, model = family_model
    adapter = get_adapter(model)
    for layer in adapter.moe_blocks():
        seen = {}

        def capture(module, args, kwargs, seen=seen):
            seen["index"], seen["weights"] = args[1], args[2]

        handle = adapter.experts(layer).register_forward_pre_hook(capture, with_kwargs=True)
        hidden = _hidden()
        with torch.no_grad():
            adapter.block(layer)(hidden.unsqueeze(0))
            index, weights = adapter.route(layer, hidden)
        handle.remove()
        assert torch.equal(index, seen["index"])
        assert torch.equal(weights, seen["weights"])
        assert index.shape == (24, 2) and weights.shape == (24, 2)


def test_deepseek_route_uses_bias_corrected_group_choice():
    """A large e_score_correction_bias decides the choice but not the weights (sigmoid scores)."""
    model = make_tiny("deepseek_v3")
    adapter = get_adapter(model)
    router = adapter.router(1)
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
        router.e_score_correction_bias[[6, 7]] = 100.0  # group 3 = experts 6, 7
        index, weights = adapter.route(1, _hidden())
    assert set(index.flatten().tolist()) >= {6, 7}
    assert (index == 6).any(dim=1).all() and (index == 7).any(dim=1).all()
    scores = torch.sigmoid(_hidden() @ router.weight.T)
    chosen = scores.gather(1, index)
    expected = chosen / chosen.sum(1, keepdim=True) * model.config.routed_scaling_factor
    torch.testing.assert_close(weights, expected)


def test_expert_forward_equals_the_experts_module(family_model):
    """f_e(x) = the experts module's own output with every row routed to e at weight 1
    (GPT-OSS: interleaved, transposed gate_up with biases; others: [gate; up])."""
    _family, model = family_model
    adapter = get_adapter(model)
    hidden = _hidden(10)
    for layer in adapter.moe_blocks():
        for expert in (0, 3, 7):
            route = torch.full((10, 1), expert)
            with torch.no_grad():
                reference = adapter.experts(layer)(hidden, route, torch.ones(10, 1))
                out = adapter.expert_forward(layer, hidden, expert)
            torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)


def test_block_output_is_gate_weighted_sum_of_expert_outputs(family_model):
    _family, model = family_model
    adapter = get_adapter(model)
    layer = max(adapter.moe_blocks())
    hidden = _hidden(6)
    with torch.no_grad():
        index, weights = adapter.route(layer, hidden)
        routed = adapter.experts(layer)(hidden, index, weights)
        slow = torch.stack([
            sum(weights[t, j] * adapter.expert_forward(layer, hidden[t:t + 1], int(index[t, j]))[0]
                for j in range(index.shape[1]))
            for t in range(hidden.shape[0])
        ])
    torch.testing.assert_close(routed, slow, rtol=1e-5, atol=1e-6)


def test_expert_bytes_cover_the_experts_module(family_model):
    _family, model = family_model
    adapter = get_adapter(model)
    for layer in adapter.moe_blocks():
        experts = adapter.experts(layer)
        total = sum(p.numel() * p.element_size() for p in experts.parameters())
        sizes = adapter.expert_bytes(layer)
        assert len(sizes) == 8 and sum(sizes) == total


def test_identity_and_fingerprint(family_model):
    family, model = family_model
    identity = get_adapter(model).identity()
    assert isinstance(identity, ModelIdentity)
    assert identity.model_type == family
    assert identity.num_hidden_layers == 3
    assert identity.experts_per_layer == {layer: 8 for layer in identity.moe_layers}
    assert identity.top_k == {layer: 2 for layer in identity.moe_layers}
    assert len(identity.fingerprint) == 16 and int(identity.fingerprint, 16) >= 0
    if family.startswith("deepseek"):
        assert (identity.n_group, identity.topk_group) == (
            model.config.n_group, model.config.topk_group)
    else:
        assert identity.n_group is None
    # stable across rebuilds and JSON round trips
    assert get_adapter(make_tiny(family)).identity().fingerprint == identity.fingerprint
    assert ModelIdentity.from_json(identity.to_json()) == identity


def test_fingerprint_follows_router_weights():
    base = get_adapter(make_tiny("qwen3_moe")).identity().fingerprint
    assert get_adapter(make_tiny("qwen3_moe", seed=1)).identity().fingerprint != base
    model = make_tiny("qwen3_moe")
    with torch.no_grad():
        get_adapter(model).router(2).weight[5, 3] += 1e-3
    assert get_adapter(model).identity().fingerprint != base
    # expert weights are not part of it
    model = make_tiny("qwen3_moe")
    with torch.no_grad():
        get_adapter(model).experts(0).down_proj.mul_(2)
    assert get_adapter(model).identity().fingerprint == base


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_route_masked_matches_the_pruned_router(family):
    """route_masked (calibration's cost curves) routes as the router of a pruned model does."""
    overrides = {"n_group": 2, "topk_group": 1} if family == "deepseek_v3" else {}
    model = make_tiny(family, **overrides)
    pruned = make_tiny(family, **overrides)
    adapter, pruned_adapter = get_adapter(model), get_adapter(pruned)
    layer, keep = 2, [0, 2, 3, 5, 6, 7]
    removed = [1, 4]
    pruned_adapter.keep_experts(layer, keep)
    hidden = _hidden()
    with torch.no_grad():
        index, weights = adapter.route_masked(layer, hidden, removed)
        pruned_index, pruned_weights = pruned_adapter.route(layer, hidden)
    mapped = torch.tensor(keep)[pruned_index]
    order, pruned_order = index.sort(dim=1), mapped.sort(dim=1)
    assert torch.equal(order.values, pruned_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices),
                               pruned_weights.gather(1, pruned_order.indices))
