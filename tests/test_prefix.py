"""Prefix reuse (grape.searching.prefix): a plan measured from stored decoder-layer inputs gives the NLL of
the full forward pass, for every family, and computes only the layers after the shared prefix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grape.models.adapters import get_adapter
from grape.models.layerwise import PassThrough
from grape.searching.prefix import PrefixReuse
from grape.searching.sensitivity import masked, sequence_nll
from solvers.plan import Plan
from tests.tiny_models import FAMILIES, make_tiny, tiny_input_ids


def _plan(model, drop: dict[int, list[int]]) -> Plan:
    adapter = get_adapter(model)
    layers = sorted(adapter.moe_blocks())
    kept = {i: [e for e in range(adapter.num_experts(i)) if e not in drop.get(i, [])] for i in layers}
    return Plan(kept=kept, removed={i: sorted(drop.get(i, [])) for i in layers}, solver="test")


def _full(model, ids, plan):
    if plan is None:
        return sequence_nll(model, ids, 2)
    with masked(model, plan):
        return sequence_nll(model, ids, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_measuring_from_stored_layer_inputs_equals_the_full_forward(family):
    overrides = dict(n_group=2, topk_group=2) if family == "deepseek_v3" else {}
    model = make_tiny(family, **overrides).eval()
    ids = tiny_input_ids(5, 12)
    adapter = get_adapter(model)
    layers = sorted(adapter.moe_blocks())
    last, group = layers[-1], (2 if family == "deepseek_v3" else 1)
    reuse = PrefixReuse(model, ids, batch_size=2)
    full_layers = len(reuse.layers)
    plans = [None,
             _plan(model, {last: list(range(group))}),  # differs from the unpruned model only at the end
             _plan(model, {layers[0]: list(range(group)), last: list(range(group))}),
             _plan(model, {layers[0]: list(range(group)), last: list(range(group, 2 * group))})]
    for plan in plans:
        got = reuse.nll(plan)
        np.testing.assert_allclose(got, _full(model, ids, plan), rtol=1e-5, atol=1e-6)
    # unpruned ran in full, the third plan from the first MoE layer on (DeepSeek's dense first
    # layer is shared), the second and fourth only from the last MoE layer on
    assert reuse.layers_run == full_layers + (full_layers - layers[0]) + 2 * (full_layers - last)
    assert last > 0  # so the reuse saved something
    # the routers are unmasked and the layers restored afterwards
    np.testing.assert_allclose(sequence_nll(model, ids, 2), _full(model, ids, None), rtol=0, atol=0)
    assert not any(isinstance(layer, PassThrough) for layer in reuse.layers)


def test_without_room_every_measurement_is_a_full_pass():
    model = make_tiny("qwen3_moe").eval()
    ids = tiny_input_ids(4, 12)
    reuse = PrefixReuse(model, ids, batch_size=2, max_bytes=0)
    layers = sorted(get_adapter(model).moe_blocks())
    for plan in (None, _plan(model, {layers[-1]: [0]})):
        np.testing.assert_allclose(reuse.nll(plan), _full(model, ids, plan), rtol=1e-5, atol=1e-6)
    assert reuse.boundaries == () and reuse.layers_run == 2 * len(reuse.layers)


def test_a_failed_measurement_leaves_the_model_whole(monkeypatch):
    model = make_tiny("mixtral").eval()
    ids = tiny_input_ids(4, 12)
    reuse = PrefixReuse(model, ids, batch_size=2)
    reuse.nll(None)
    layers = sorted(get_adapter(model).moe_blocks())
    monkeypatch.setattr(reuse, "_run", lambda inputs: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        reuse.nll(_plan(model, {layers[-1]: [0]}))
    assert not any(isinstance(layer, PassThrough) for layer in reuse.layers)
    assert all(not layer._forward_pre_hooks for layer in reuse.layers)
    with torch.no_grad():
        np.testing.assert_allclose(sequence_nll(model, ids, 2), _full(model, ids, None), rtol=0, atol=0)
