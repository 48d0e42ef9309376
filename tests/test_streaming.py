"""Streaming apply (grape/pruning/streaming.py): `mask` and a re-pruned GRAPE checkpoint equal the
in-memory path; block-FP8 (DeepSeek-V3 layout) and MXFP4 (gpt-oss) experts stay quantised with
their scales and give the masked original's logits; the plan is validated exactly as in memory
(fingerprint included); `grape apply` streams by default; byte-range slicing on any axis; a
refusal an adapter declares, a per-expert tensor it does not declare and one stored with
another shape stop streaming in one line. Equality with the in-memory path for every family:
tests/test_streaming_families.py (which uses this module's helpers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_families import NEW_FAMILIES, make_family
from tiny_models import make_tiny, tiny_input_ids

from grape.models.adapters import get_adapter
from grape.models.adapters import adapter_class
from grape.models.adapters.stored import _renames
from grape.pruning.apply import ApplyConfig, apply_plan
from grape.pruning.checkpoint import load_provenance, load_pruned, save_pruned
from grape.cli.main import main as grape_main
from grape.errors import PlanError
from grape.models.quantized import dequantize_fp8_blocks, dequantize_mxfp4, quantize_fp8_blocks
from grape.models.shards import Piece, StoredTensor, parse_size
from grape.pruning.streaming import StreamingError, stream_apply, streaming_unavailable
from solvers.plan import Plan

GROUPED = {"deepseek_v3": {"n_group": 2, "topk_group": 1}}
IDS = tiny_input_ids(batch=2, seq=10)
SHARD = "20KB"  # tiny models: ~10-20 source shards, several output shards


def build(family: str, seed: int = 0, **overrides):
    if family in NEW_FAMILIES:  # tests/tiny_families.py: one fixed tiny config each
        assert not overrides, overrides
        return make_family(family, seed)
    return make_tiny(family, seed, **{**GROUPED.get(family, {}), **overrides})


def grouped(model) -> bool:
    n_group, _ = get_adapter(model).routing_groups()
    return bool(n_group and n_group > 1)


def plan_for(model, kept: dict[int, list[int]], **kwargs) -> Plan:
    adapter = get_adapter(model)
    removed = {layer: [e for e in range(adapter.num_experts(layer)) if e not in keep]
               for layer, keep in kept.items()}
    return Plan(kept=kept, removed=removed, **kwargs)


def make_plan(model, family: str, kind: str) -> Plan:
    layers = sorted(get_adapter(model).moe_blocks())
    if kind == "uniform":
        choices = [[1, 2, 4, 7]] * len(layers)
    elif grouped(model):  # groups of 4 must stay balanced, at least 2 per group
        choices = [[1, 2, 3, 4, 6, 7], [0, 2, 5, 7], [0, 1, 4, 5]]
    else:
        choices = [[0, 2, 5, 7], [1, 2, 3, 4, 6, 7], [3, 6]]
    return plan_for(model, dict(zip(layers, choices)), solver="greedy",
                    provenance={"scores_fingerprint": "abc123", "objective": "additive"})


def logits(model) -> torch.Tensor:
    """The logits on IDS, the model's tensors first copied to fresh (64-byte aligned) memory: a
    tensor loaded from safetensors is a view at whatever alignment its file offset gives, and
    CPU kernels may round the last bit differently at another alignment (the same bytes in
    shards cut elsewhere gave logits 1 ulp apart: Granite's experts load as such views)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
        return model.eval()(IDS).logits


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def renamed(tensors: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """`tensors` with transformers' one-to-one load renames applied: streaming keeps the stored
    names, save_pruned may write the module names (Nemotron-H: backbone.* stored, model.* in
    memory). Per-expert keys that loading fuses keep their names on both sides."""
    from transformers.core_model_loading import rename_source_key

    renamings, _ = _renames(model)
    present = dict.fromkeys(model.state_dict(), True)
    prefix = getattr(model, "base_model_prefix", None)
    out = {rename_source_key(key, renamings, [], prefix, present)[0]: tensor
           for key, tensor in tensors.items()}
    assert len(out) == len(tensors)
    return out


def source_checkpoint(tmp_path: Path, family: str, dtype: torch.dtype, **overrides) -> tuple[Path, torch.nn.Module]:
    model = build(family, **overrides)
    source = tmp_path / "source"
    model.to(dtype).save_pretrained(source, max_shard_size=SHARD)
    assert len(list(source.glob("*.safetensors"))) > 3
    return source, model


# -- mask, and a GRAPE checkpoint as the source --------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "ernie4_5_moe"])
def test_streaming_mask_matches_in_memory(family, tmp_path):
    source, model = source_checkpoint(tmp_path, family, torch.float32)
    plan = make_plan(model, family, "non_uniform")
    in_memory = load_pruned(source)
    apply_plan(in_memory, plan, ApplyConfig("mask", allow_lower_top_k=True))
    expected = logits(in_memory)
    save_pruned(in_memory, tmp_path / "memory", plan=plan)
    out = stream_apply(source, plan, tmp_path / "stream", method="mask", allow_lower_top_k=True)
    mine, original = read_all(out), read_all(source)
    assert {k: raw(v) for k, v in mine.items()} == {k: raw(v) for k, v in original.items()}
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((tmp_path / "memory" / "config.json").read_text())
    assert config["grape_pruning"]["masked_experts"] == {str(k): v for k, v in plan.removed.items()}
    torch.testing.assert_close(logits(load_pruned(out)), expected, rtol=0, atol=0)


def test_a_pruned_checkpoint_prunes_again(tmp_path):
    """A non-uniform GRAPE checkpoint (per-layer counts, remote code) as the source."""
    source, model = source_checkpoint(tmp_path, "qwen3_moe", torch.float32)
    first = make_plan(model, "qwen3_moe", "non_uniform")
    once = stream_apply(source, first, tmp_path / "once", allow_lower_top_k=True)
    counts = first.kept_counts()
    second = Plan(kept={layer: list(range(1, n)) for layer, n in counts.items()},
                  removed={layer: [0] for layer in counts})
    twice = stream_apply(once, second, tmp_path / "twice", allow_lower_top_k=True)
    in_memory = load_pruned(once)
    apply_plan(in_memory, second, ApplyConfig("remove", allow_lower_top_k=True))
    save_pruned(in_memory, tmp_path / "memory", plan=second)
    assert {k: raw(v) for k, v in read_all(twice).items()} == {
        k: raw(v) for k, v in read_all(tmp_path / "memory").items()}
    assert json.loads((twice / "config.json").read_text())["grape_pruning"]["experts_per_layer"] == {
        str(layer): n - 1 for layer, n in counts.items()}
    torch.testing.assert_close(logits(load_pruned(twice)), logits(in_memory), rtol=0, atol=0)


# -- validation is the in-memory path's ----------------------------------------------------------
def test_plan_is_validated_against_the_checkpoint(tmp_path):
    source, model = source_checkpoint(tmp_path, "deepseek_v3", torch.bfloat16)
    plan = make_plan(model, "deepseek_v3", "uniform")
    good = Plan.from_json({**plan.to_json(), "model": get_adapter(load_pruned(source)).identity().to_json()})
    stream_apply(source, good, tmp_path / "ok")  # the loaded model's identity fits the stream
    other = get_adapter(build("deepseek_v3", seed=1)).identity().to_json()
    wrong = Plan.from_json({**plan.to_json(), "model": other})
    with pytest.raises(PlanError, match="fingerprint"):
        stream_apply(source, wrong, tmp_path / "bad")
    unbalanced = plan_for(model, {1: [0, 1, 2, 4, 5, 6], 2: [0, 1, 2, 3, 4, 5]})
    with pytest.raises(Exception, match="same number of experts kept in each group"):
        stream_apply(source, unbalanced, tmp_path / "bad")
    short = plan_for(model, {1: [0, 1, 2, 4], 2: [0, 1, 4, 5]})
    short.removed[1] = short.removed[1][:-1]
    with pytest.raises(PlanError, match="kept \\+ removed"):
        stream_apply(source, short, tmp_path / "bad")
    with pytest.raises(PlanError, match="needs the model in memory"):
        stream_apply(source, plan, tmp_path / "bad", method="merge")
    assert not (tmp_path / "bad").exists()


def test_unrecognised_expert_layout_is_refused(tmp_path):
    source, model = source_checkpoint(tmp_path, "qwen3_moe", torch.float32)
    tensors = read_all(source)
    for name in [n for n in tensors if re.search(r"layers\.1\.mlp\.experts\.5\.", n)]:
        del tensors[name]
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    (broken / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(StreamingError, match="experts \\[5\\]"):
        stream_apply(broken, make_plan(model, "qwen3_moe", "uniform"), tmp_path / "out")


def test_a_declared_refusal_is_one_line(tmp_path, monkeypatch):
    family = "minimax_m2"
    assert adapter_class(family).streaming_refusal is None
    model = build(family)
    model.save_pretrained(tmp_path / family)
    config = json.loads((tmp_path / family / "config.json").read_text())
    assert streaming_unavailable(tmp_path / family, config, "remove") is None
    monkeypatch.setattr(type(get_adapter(model)), "streaming_refusal", "a reason")
    # grape apply (mode auto) loads a family that declares one in memory, saying why
    reason = streaming_unavailable(tmp_path / family, config, "remove")
    assert reason == f"{family} checkpoints cannot be pruned shard by shard: a reason"
    with pytest.raises(StreamingError) as refused:
        stream_apply(tmp_path / family, make_plan(model, family, "uniform"), tmp_path / "out")
    assert str(refused.value).startswith(reason) and len(str(refused.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_undeclared_per_expert_tensor_is_refused_not_copied(tmp_path, monkeypatch):
    """Without its adapter's declaration, a per-expert tensor that surgery's generic slicing
    misses (ERNIE-4.5's bias in a router child) stops streaming: never a checkpoint whose bias
    has more experts than its router."""
    model = build("ernie4_5_moe")
    model.save_pretrained(tmp_path / "source")
    monkeypatch.setattr(type(get_adapter(model)), "extra_expert_tensors", {})
    tensor = "layers.1.mlp.gate.moe_statics.e_score_correction_bias"
    with pytest.raises(StreamingError, match=re.escape(tensor) + " holds one value per expert"):
        stream_apply(tmp_path / "source", make_plan(model, "ernie4_5_moe", "uniform"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_per_expert_tensor_stored_with_another_shape_is_refused(tmp_path):
    """A stored copy of a per-expert tensor must have the loaded tensor's shape (here
    MiniMax-M2's block bias stored [1, E]): never sliced on a guessed axis."""
    model = build("minimax_m2")
    model.save_pretrained(tmp_path / "source")
    tensors = load_file(str(tmp_path / "source" / "model.safetensors"))
    key = "model.layers.1.block_sparse_moe.e_score_correction_bias"
    tensors[key] = tensors[key][None]
    save_file(tensors, str(tmp_path / "source" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(StreamingError, match=re.escape(f"{key}: stored with shape [1, 8]")):
        stream_apply(tmp_path / "source", make_plan(model, "minimax_m2", "uniform"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rows_are_byte_ranges():
    tensor = StoredTensor("x", "BF16", [6, 4], [Piece(Path("f"), 100, 48)])
    sliced = tensor.rows([1, 2, 4])
    assert sliced.shape == [3, 4] and sliced.nbytes == 24
    assert [(p.offset, p.length) for p in sliced.pieces] == [(108, 16), (132, 8)]
    # a [1, E] bias on its last axis; a middle axis: one range per run in each outer block
    bias = StoredTensor("b", "F32", [1, 8], [Piece(Path("f"), 0, 32)]).take([0, 2, 3, 7], -1)
    assert bias.shape == [1, 4] and [(p.offset, p.length) for p in bias.pieces] == [(0, 4), (8, 8), (28, 4)]
    cube = StoredTensor("c", "F32", [2, 3, 2], [Piece(Path("f"), 0, 48)]).take([0, 2], 1)
    assert cube.shape == [2, 2, 2] and [(p.offset, p.length) for p in cube.pieces] == [(0, 8), (16, 16), (40, 8)]
    values = torch.arange(48, dtype=torch.uint8).reshape(2, 3, 8)
    cut = StoredTensor("v", "U8", [2, 3, 8], [Piece(Path("f"), 0, 48)]).take([1, 2], 1)
    taken = b"".join(bytes(values.flatten()[p.offset:p.offset + p.length].tolist()) for p in cut.pieces)
    assert taken == raw(values[:, [1, 2]])
    with pytest.raises(Exception, match="has no dimension 2"):
        bias.take([0], 2)
    assert parse_size("200MB") == 200_000_000 and parse_size("2GiB") == 2 << 30
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")


# -- quantised experts ---------------------------------------------------------------------------
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
              "activation_scheme": "dynamic"}
_FP8_LINEAR = re.compile(r"\.(experts\.\d+|shared_experts)\.(gate|up|down)_proj\.weight$")


def _write_sharded(tensors: dict[str, torch.Tensor], directory: Path, shards: int) -> None:
    directory.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _dequantized_copy(source: Path, target: Path) -> None:
    """`source` with every FP8 weight replaced by its float32 value (the reference model)."""
    tensors = read_all(source)
    config = json.loads((source / "config.json").read_text())
    block = tuple(config.pop("quantization_config")["weight_block_size"])
    for name in [n for n in tensors if n.endswith(".weight_scale_inv")]:
        weight = name[: -len("_scale_inv")]
        tensors[weight] = dequantize_fp8_blocks(tensors[weight], tensors.pop(name), block)
    target.mkdir()
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config))
    for extra in ("modeling_grape_pruned.py", "grape_moe_aux.py", "configuration_deepseek.py"):
        if (source / extra).exists():
            (target / extra).write_text((source / extra).read_text())


def test_fp8_block_quantised_deepseek_v3(tmp_path):
    """DeepSeek-V3's layout: FP8 expert weights with 128x128 scales (partial edge blocks),
    bf16 router, an extra multi-token-prediction layer past num_hidden_layers."""
    model = build("deepseek_v3", hidden_size=160, moe_intermediate_size=144)
    model.save_pretrained(tmp_path / "float")
    tensors = load_file(str(tmp_path / "float" / "model.safetensors"))
    for name in [n for n in tensors if _FP8_LINEAR.search(n)]:
        tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(tensors[name])
    for name in [n for n in tensors if ".mlp.gate." in n]:
        tensors[name] = tensors[name].to(torch.bfloat16)
    tensors["model.layers.3.mlp.experts.0.up_proj.weight"] = tensors["model.layers.1.mlp.experts.0.up_proj.weight"]
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    source = tmp_path / "fp8"
    _write_sharded(tensors, source, shards=4)
    auto_map = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
    (source / "config.json").write_text(json.dumps({**config, "quantization_config": FP8_CONFIG,
                                                    "auto_map": auto_map}))
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):  # the Hub repo's own code
        (source / name).write_text("# remote code\n")
    plan = make_plan(model, "deepseek_v3", "non_uniform")

    out = stream_apply(source, plan, tmp_path / "pruned")
    pruned = read_all(out)
    written = json.loads((out / "config.json").read_text())
    assert written["quantization_config"] == FP8_CONFIG
    assert written["auto_map"] == {**auto_map, "AutoModelForCausalLM": "modeling_grape_pruned.GrapePrunedForCausalLM"}
    assert (out / "configuration_deepseek.py").is_file() and not (out / "modeling_deepseek.py").exists()
    assert load_provenance(out)["dropped_tensors"] == 1  # the layer past num_hidden_layers
    assert not any(n.startswith("model.layers.3.") for n in pruned)
    for layer, keep in plan.kept.items():
        for new, old in enumerate(keep):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                stem = f"model.layers.{layer}.mlp.experts.{{}}.{proj}.weight"
                assert pruned[stem.format(new)].dtype == torch.float8_e4m3fn
                assert pruned[stem.format(new) + "_scale_inv"].shape == (2, 2)
                for suffix in ("", "_scale_inv"):
                    assert raw(pruned[stem.format(new) + suffix]) == raw(tensors[stem.format(old) + suffix])
        assert f"model.layers.{layer}.mlp.experts.{len(keep)}.up_proj.weight" not in pruned

    _dequantized_copy(source, tmp_path / "reference")
    _dequantized_copy(out, tmp_path / "pruned_float")
    original = T.AutoModelForCausalLM.from_pretrained(tmp_path / "reference", dtype=torch.float32)
    expected = logits(apply_plan(original, plan, "mask"))
    got = load_pruned(tmp_path / "pruned_float", dtype=torch.float32)
    assert get_adapter(got).identity().experts_per_layer == plan.kept_counts()
    torch.testing.assert_close(logits(got), expected, rtol=0, atol=0)


def test_mxfp4_gpt_oss_stays_quantised(tmp_path):
    """gpt-oss's MXFP4 layout: fused *_blocks / *_scales sliced by expert with their biases;
    transformers (dequantising on CPU) gives the masked original's logits."""
    model = build("gpt_oss", intermediate_size=32)
    model.save_pretrained(tmp_path / "float")
    tensors = load_file(str(tmp_path / "float" / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, cols, rows = tensors.pop(name).shape  # stored [E, in, out]; blocks are [E, out, in/32, 16]
        tensors[name + "_blocks"] = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=g,
                                                  dtype=torch.uint8)
        tensors[name + "_scales"] = torch.randint(122, 128, (experts, rows, cols // 32), generator=g,
                                                  dtype=torch.uint8)
    source = tmp_path / "mxfp4"
    _write_sharded(tensors, source, shards=3)
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    quant = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
             "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (source / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    plan = make_plan(model, "gpt_oss", "uniform")

    out = stream_apply(source, plan, tmp_path / "pruned")
    pruned = read_all(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == quant
    keep = torch.tensor(plan.kept[0])
    for name in [n for n in tensors if ".experts." in n or ".router." in n]:
        assert pruned[name].dtype == tensors[name].dtype
        assert torch.equal(pruned[name], tensors[name][keep]), name

    original = T.AutoModelForCausalLM.from_pretrained(source)  # dequantised to bf16 on CPU
    reference = dequantize_mxfp4(tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"],
                                 tensors["model.layers.0.mlp.experts.gate_up_proj_scales"]).transpose(1, 2)
    assert torch.equal(original.model.layers[0].mlp.experts.gate_up_proj.float(), reference)
    expected = logits(apply_plan(original, plan, "mask"))
    torch.testing.assert_close(logits(T.AutoModelForCausalLM.from_pretrained(out)), expected, rtol=0, atol=0)


# -- the command ---------------------------------------------------------------------------------
def test_grape_apply_streams_remove_by_default(tmp_path, capsys):
    source, model = source_checkpoint(tmp_path, "mixtral", torch.bfloat16)
    plan = make_plan(model, "mixtral", "non_uniform")
    plan.save(tmp_path / "plan.json")
    # a hand-made plan records no model: its check is skipped knowingly
    base = ["apply", "--model", str(source), "--plan", str(tmp_path / "plan.json"), "--allow-lower-top-k",
            "--skip-model-check"]

    assert grape_main([*base, "--out", str(tmp_path / "s"), "--max-shard-size", "25KB"]) == 0
    assert "streamed shard by shard" in capsys.readouterr().out
    assert load_provenance(tmp_path / "s")["apply_mode"] == "streaming"
    assert grape_main([*base, "--out", str(tmp_path / "m"), "--in-memory"]) == 0
    assert "streamed" not in capsys.readouterr().out
    assert "apply_mode" not in load_provenance(tmp_path / "m")
    torch.testing.assert_close(logits(load_pruned(tmp_path / "s")), logits(load_pruned(tmp_path / "m")),
                               rtol=0, atol=0)

    assert grape_main([*base, "--out", str(tmp_path / "x"), "--max-shard-size", "lots"]) == 2
    assert "not a size" in capsys.readouterr().err
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "quantization_config": FP8_CONFIG}))
    assert grape_main([*base, "--out", str(tmp_path / "x"), "--method", "merge"]) == 2
    err = capsys.readouterr().err
    assert "quantised (fp8, 128x128 blocks)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
