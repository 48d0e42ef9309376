"""Streaming apply keeps block-FP8 checkpoints FP8 for the families whose public checkpoints ship
FP8 (GLM-4.5/4.6 ``glm4_moe``, MiniMax-M2 ``minimax_m2``, Qwen3-MoE FP8 variants ``qwen3_moe``,
DeepSeek-V3.2 ``deepseek_v32``), as tests/test_streaming.py::test_fp8_block_quantised_deepseek_v3
checks for DeepSeek-V3: a tiny random model whose per-expert linears (``experts.N.*_proj`` /
MiniMax-M2's ``experts.N.w1/w2/w3``), shared experts and attention projections are stored as
float8_e4m3fn with float32 ``weight_scale_inv`` (128x128 blocks), its router in bf16, plus a
tensor of a layer past num_hidden_layers (the multi-token-prediction layer GLM-4.5 and
DeepSeek-V3.2 ship), is pruned shard by shard. Every output tensor is the source's bytes:
kept experts' weights and scales renumbered, router rows (and correction biases) sliced,
the rest copied, the extra layer dropped; quantization_config is kept; and the dequantised
pruned checkpoint gives the dequantised original's masked logits exactly."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from test_streaming import (
    FP8_CONFIG,
    _dequantized_copy,
    _write_sharded,
    build,
    logits,
    make_plan,
    raw,
    read_all,
)

from grape.models.adapters import get_adapter
from grape.pruning.checkpoint import load_provenance, load_pruned
from grape.pruning.apply import apply_plan
from grape.models.quantized import quantize_fp8_blocks
from grape.pruning.streaming import stream_apply

# one tensor per expert, as every one of these families' save_pretrained stores them
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(.+)\.experts\.(\d+)\.(.+)$")
# the linears their FP8 checkpoints quantise: routed and shared experts, attention projections
_FP8 = re.compile(r"\.(experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)"
                  r"|shared_experts\.(gate|up|down)_proj"
                  r"|self_attn\.(q_proj|k_proj|v_proj|o_proj"
                  r"|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj))"
                  r"\.weight$")
# per-expert router tensors: the router's rows (bf16) and the correction bias (kept float32)
_ROUTER = re.compile(r"\.(mlp|block_sparse_moe)\.(gate\.weight|gate\.e_score_correction_bias"
                     r"|e_score_correction_bias)$")

# qwen3_moe (tests/tiny_models.py) takes sizes: 2x2 scale blocks, the edge ones partial
SIZES = {"qwen3_moe": dict(hidden_size=160, moe_intermediate_size=144)}
FAMILIES = ["glm4_moe", "minimax_m2", "qwen3_moe", "deepseek_v32"]


def _scale_shape(weight: torch.Tensor) -> tuple[int, int]:
    return tuple(-(-size // 128) for size in weight.shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_block_quantised_family_streams(family, tmp_path):
    model = build(family, **SIZES.get(family, {}))
    layers = int(model.config.num_hidden_layers)
    model.save_pretrained(tmp_path / "float")
    tensors = load_file(str(tmp_path / "float" / "model.safetensors"))
    quantised = [n for n in tensors if _FP8.search(n)]
    assert any(_EXPERT.match(n) for n in quantised) and any(".self_attn." in n for n in quantised)
    for name in quantised:
        tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(tensors[name])
    routers = [n for n in tensors if _ROUTER.search(n)]
    assert routers
    for name in [n for n in routers if n.endswith(".gate.weight")]:
        tensors[name] = tensors[name].to(torch.bfloat16)
    # a layer past num_hidden_layers (multi-token prediction): dropped, as transformers' load does
    expert_weight = next(n for n in quantised
                         if n.startswith("model.layers.1.") and _EXPERT.match(n))
    extra = expert_weight.replace("model.layers.1.", f"model.layers.{layers}.", 1)
    tensors[extra] = tensors[expert_weight]
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    source = tmp_path / "fp8"
    _write_sharded(tensors, source, shards=4)
    (source / "config.json").write_text(json.dumps({**config, "quantization_config": FP8_CONFIG}))
    plan = make_plan(model, family, "non_uniform")

    out = stream_apply(source, plan, tmp_path / "pruned")
    pruned = read_all(out)
    written = json.loads((out / "config.json").read_text())
    assert written["quantization_config"] == FP8_CONFIG
    assert set((written.get("auto_map") or {})) <= {"AutoModelForCausalLM"}
    assert load_provenance(out)["dropped_tensors"] == 1
    assert not any(n.startswith(f"model.layers.{layers}.") for n in pruned)

    expected = {}  # what the pruned checkpoint must hold, from the source's tensors
    for name, tensor in tensors.items():
        if name == extra:
            continue
        match = _EXPERT.match(name)
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if match and layer in plan.kept:
            keep = plan.kept[layer]
            old = int(match.group(3))
            if old in keep:
                block, rest = match.group(2), match.group(4)
                expected[f"model.layers.{layer}.{block}.experts.{keep.index(old)}.{rest}"] = tensor
        elif _ROUTER.search(name) and layer in plan.kept:
            assert tensor.shape[0] == get_adapter(model).num_experts(layer), name
            expected[name] = tensor[torch.tensor(plan.kept[layer])]
        else:
            expected[name] = tensor
    assert sorted(pruned) == sorted(expected)
    assert sum(n.endswith("_scale_inv") and bool(_EXPERT.match(n)) for n in pruned) == 3 * sum(
        len(keep) for keep in plan.kept.values())
    for name, tensor in expected.items():
        assert pruned[name].dtype == tensor.dtype, name
        assert pruned[name].shape == tensor.shape, name
        assert raw(pruned[name]) == raw(tensor), name
    for layer, keep in plan.kept.items():
        experts = [n for n in pruned if n.startswith(f"model.layers.{layer}.") and _EXPERT.match(n)]
        assert {int(_EXPERT.match(n).group(3)) for n in experts} == set(range(len(keep)))
        for name in [n for n in experts if _FP8.search(n)]:
            assert pruned[name].dtype == torch.float8_e4m3fn, name
            assert tuple(pruned[name + "_scale_inv"].shape) == _scale_shape(pruned[name]), name
    if family in SIZES:  # partial edge blocks
        assert any(tuple(pruned[n + "_scale_inv"].shape) == (2, 2)
                   for n in pruned if _FP8.search(n))

    _dequantized_copy(source, tmp_path / "reference")
    _dequantized_copy(out, tmp_path / "pruned_float")
    original, info = T.AutoModelForCausalLM.from_pretrained(
        tmp_path / "reference", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    unpruned = logits(original)
    want = logits(apply_plan(original, plan, "mask"))
    assert not torch.equal(want, unpruned)  # the plan changes the logits
    got = load_pruned(tmp_path / "pruned_float", dtype=torch.float32)
    assert get_adapter(got).identity().experts_per_layer == plan.kept_counts()
    torch.testing.assert_close(logits(got), want, rtol=0, atol=0)
