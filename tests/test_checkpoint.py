"""save_pruned / load_pruned: uniform checkpoints load in vanilla transformers, non-uniform ones
through grape.load_pruned and through remote code, with identical logits; plan, provenance and
tokenizer travel along; writes are atomic; the `grape apply` command end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as T
from tiny_models import FAMILIES, make_tiny, tiny_input_ids

from grape.models.adapters import get_adapter
from grape.pruning.apply import ApplyConfig
from grape.pruning.apply import apply_plan as _apply_plan
from grape.pruning.checkpoint import (
    MODELING_FILE,
    PLAN_FILE,
    CheckpointError,
    load_provenance,
    load_pruned,
    save_pruned,
)
from grape.cli.main import main as grape_main
from solvers.plan import Plan

GROUPED = {"deepseek_v3": {"n_group": 2, "topk_group": 1}}
IDS = tiny_input_ids(batch=2, seq=10)
COUNT_KEYS = {
    "mixtral": {"num_local_experts", "num_experts"},
    "qwen2_moe": {"num_experts", "num_local_experts"},
    "qwen3_moe": {"num_experts", "num_local_experts"},
    "olmoe": {"num_experts", "num_local_experts"},
    "deepseek_v3": {"n_routed_experts", "num_local_experts"},
    "gpt_oss": {"num_local_experts", "num_experts"},
}


def build(family: str):
    return make_tiny(family, **GROUPED.get(family, {}))


def plan_for(network, kept: dict[int, list[int]], **kwargs) -> Plan:
    adapter = get_adapter(network)
    removed = {layer: [e for e in range(adapter.num_experts(layer)) if e not in keep]
               for layer, keep in kept.items()}
    return Plan(kept=kept, removed=removed, **kwargs)


def uniform_plan(network) -> Plan:
    return plan_for(network, {layer: [1, 2, 4, 7] for layer in get_adapter(network).moe_blocks()})


def apply_plan(model, plan, method: str = "remove"):
    """apply_plan accepting plans that lower top_k: non_uniform_plan keeps 1 expert in a layer on
    purpose, so the per-layer top_k round trip is tested too."""
    return _apply_plan(model, plan, ApplyConfig(method, allow_lower_top_k=True))


def non_uniform_plan(network, family: str) -> Plan:
    layers = sorted(get_adapter(network).moe_blocks())
    choices = [[0, 2, 5, 7], [1, 2, 3, 4, 6, 7], [6]]  # the last keeps 1 < top_k
    if family == "deepseek_v3":
        choices = [[1, 2, 3, 4, 6, 7], [0, 2, 5, 7]]
    return plan_for(network, {layer: choices[i] for i, layer in enumerate(layers)},
                    solver="greedy", provenance={"scores_fingerprint": "abc123", "objective": "grape",
                                                 "budget": {"experts": 11}})


def logits(network) -> torch.Tensor:
    with torch.no_grad():
        return network.eval()(IDS).logits


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(20)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                     bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_checkpoint_loads_in_vanilla_transformers(family, tmp_path):
    model = build(family)
    apply_plan(model, uniform_plan(model))
    expected = logits(model)
    out = save_pruned(model, tmp_path / f"uniform_{family}")
    assert not (out / MODELING_FILE).exists()
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "experts_per_layer" not in config["grape_pruning"]
    for key in COUNT_KEYS[family]:
        assert config[key] == 4, key
    vanilla = T.AutoModelForCausalLM.from_pretrained(out)
    assert type(vanilla).__name__ == type(model).__name__
    torch.testing.assert_close(logits(vanilla), expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(load_pruned(out)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_non_uniform_checkpoint_reloads_exactly(family, tmp_path):
    model = build(family)
    plan = non_uniform_plan(model, family)
    apply_plan(model, plan)
    expected = logits(model)
    out = save_pruned(model, tmp_path / f"nonuniform_{family}")

    config = json.loads((out / "config.json").read_text())
    assert config["grape_pruning"]["experts_per_layer"] == {str(k): v for k, v in plan.kept_counts().items()}
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_grape_pruned.GrapePrunedForCausalLM"

    loaded = load_pruned(out)  # no remote code
    assert type(loaded) is type(model)
    assert get_adapter(loaded).identity().experts_per_layer == plan.kept_counts()
    assert get_adapter(loaded).identity().top_k == get_adapter(model).identity().top_k
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)

    remote = T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(remote).__name__ == "GrapePrunedForCausalLM"
    torch.testing.assert_close(logits(remote), expected, rtol=0, atol=0)


def param_dtypes(network) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in network.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_checkpoint_keeps_dtype_and_logits(family, dtype, tmp_path):
    # loaded the way users get a half-precision model (buffers such as RoPE frequencies stay
    # float32 there, unlike after model.to(dtype))
    build(family).save_pretrained(tmp_path / "original")
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "original", dtype=dtype)
    # the reference is the unpruned model loaded the same way: transformers keeps some tensors
    # in float32 on purpose (DeepSeek's router, `_keep_in_fp32_modules_strict`)
    expected_dtypes = param_dtypes(model)
    assert dtype in expected_dtypes.values()
    plan = non_uniform_plan(model, family)
    apply_plan(model, plan)
    assert param_dtypes(model) == expected_dtypes
    expected = logits(model)
    assert torch.isfinite(expected.float()).all()
    out = save_pruned(model, tmp_path / f"half_{family}")
    loaded = load_pruned(out)
    assert loaded.dtype == dtype
    assert param_dtypes(loaded) == expected_dtypes
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    remote = T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype="auto")
    assert remote.dtype == dtype
    assert param_dtypes(remote) == expected_dtypes
    torch.testing.assert_close(logits(remote), expected, rtol=0, atol=0)


def test_top_k_adjustment_survives_reload(tmp_path):
    model = build("mixtral")
    apply_plan(model, non_uniform_plan(model, "mixtral"))
    out = save_pruned(model, tmp_path / "topk")
    assert json.loads((out / "config.json").read_text())["grape_pruning"]["top_k_per_layer"] == {
        "0": 2, "1": 2, "2": 1}
    for loaded in (load_pruned(out), T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)):
        block = loaded.model.layers[2].mlp
        assert block.gate.top_k == 1 and block.top_k == 1 and block.experts.num_experts == 1


def test_remote_code_model_saves_again(tmp_path):
    model = build("gpt_oss")
    apply_plan(model, non_uniform_plan(model, "gpt_oss"))
    expected = logits(model)
    remote = T.AutoModelForCausalLM.from_pretrained(save_pruned(model, tmp_path / "first"),
                                                    trust_remote_code=True)
    again = save_pruned(remote, tmp_path / "second")
    assert json.loads((again / "config.json").read_text())["architectures"] == ["GptOssForCausalLM"]
    torch.testing.assert_close(logits(load_pruned(again)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_masked_checkpoint_keeps_weights_and_mask(family, tmp_path):
    model = build(family)
    plan = non_uniform_plan(model, family)
    apply_plan(model, plan, method="mask")
    expected = logits(model)
    out = save_pruned(model, tmp_path / f"masked_{family}")
    config = json.loads((out / "config.json").read_text())
    assert config["grape_pruning"]["masked_experts"] == {str(k): v for k, v in plan.removed.items()}
    assert config["num_experts"] == 8
    for loaded in (load_pruned(out), T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)):
        assert get_adapter(loaded).num_experts(0) == 8
        torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["remove", "mask"])
def test_checkpoints_with_the_old_top_level_keys_still_load(method, tmp_path):
    """Before the `grape_pruning` block, per-layer counts, top_k and masks were top-level keys."""
    model = build("qwen3_moe")
    apply_plan(model, non_uniform_plan(model, "qwen3_moe"), method=method)
    expected = logits(model)
    out = save_pruned(model, tmp_path / "old")
    config = json.loads((out / "config.json").read_text())
    block = config.pop("grape_pruning")
    for key in ("experts_per_layer", "top_k_per_layer", "masked_experts"):
        if key in block:
            config[f"grape_{key}"] = block[key]
    (out / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(logits(load_pruned(out)), expected, rtol=0, atol=0)


def test_the_model_card_says_how_to_load_and_warns_for_masks(tmp_path):
    model = build("qwen3_moe")
    apply_plan(model, non_uniform_plan(model, "qwen3_moe"), method="mask")
    card = (save_pruned(model, tmp_path / "masked") / "README.md").read_text()
    assert "trust_remote_code=True" in card and "ignore the mask" in card
    model = build("qwen3_moe")
    apply_plan(model, uniform_plan(model))
    card = (save_pruned(model, tmp_path / "uniform") / "README.md").read_text()
    assert "standard checkpoint" in card and "mask" not in card.lower()


def test_plan_provenance_and_tokenizer_are_saved(tmp_path):
    model = build("qwen3_moe")
    plan = non_uniform_plan(model, "qwen3_moe")
    apply_plan(model, plan)
    out = save_pruned(model, tmp_path / "full", tokenizer=tiny_tokenizer(),
                      provenance={"source_model": "tiny/qwen3"})
    assert Plan.load(out / PLAN_FILE).kept == plan.kept
    record = load_provenance(out)
    assert record["source_model"] == "tiny/qwen3"
    assert record["scores_fingerprint"] == "abc123"
    assert record["objective"] == "grape" and record["solver"] == "greedy"
    assert record["budget"] == {"experts": 11} and record["method"] == "remove"
    assert record["uniform"] is False
    tokenizer = T.AutoTokenizer.from_pretrained(out)
    assert tokenizer("w1 w2")["input_ids"] == [5, 6]
    # the plan recorded by apply_plan is the default
    assert load_pruned(out).grape_applied_plan.kept == plan.kept


def test_save_is_atomic(tmp_path, monkeypatch):
    model = build("olmoe")
    apply_plan(model, uniform_plan(model))
    target = save_pruned(model, tmp_path / "ckpt")
    first = (target / "model.safetensors").read_bytes()

    class Broken:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(model, tmp_path / "ckpt", tokenizer=Broken())
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp dir left, old checkpoint intact
    assert (target / "model.safetensors").read_bytes() == first
    with pytest.raises(RuntimeError):
        save_pruned(model, tmp_path / "fresh", tokenizer=Broken())
    assert not (tmp_path / "fresh").exists()
    # and a successful save replaces the old directory
    model2 = build("olmoe")
    apply_plan(model2, plan_for(model2, {layer: [0, 1, 2, 3, 4, 5] for layer in range(3)}))
    save_pruned(model2, tmp_path / "ckpt")
    assert json.loads((target / "config.json").read_text())["num_experts"] == 6
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_load_pruned_rejects_a_non_checkpoint(tmp_path):
    import grape

    assert grape.load_pruned is load_pruned and grape.save_pruned is save_pruned
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pruned(tmp_path)


def test_grape_apply_command(tmp_path, capsys):
    model = build("deepseek_v3")
    source = tmp_path / "source"
    model.save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    plan = non_uniform_plan(model, "deepseek_v3")
    plan.model = get_adapter(model).identity().to_json()  # grape apply checks it against --model
    plan.save(tmp_path / "plan.json")
    expected = logits(apply_plan(model, plan))

    status = grape_main(["apply", "--model", str(source), "--plan", str(tmp_path / "plan.json"),
                         "--method", "remove", "--out", str(tmp_path / "out")])
    assert status == 0
    assert "kept 10/16 experts" in capsys.readouterr().out
    torch.testing.assert_close(logits(load_pruned(tmp_path / "out")), expected, rtol=0, atol=0)
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert load_provenance(tmp_path / "out")["source_model"] == str(source)

    # a broken group plan is a user error: one line, exit 2
    bad = plan_for(build("deepseek_v3"), {1: [0, 1, 2, 4, 5, 6], 2: [0, 1, 2, 3, 4, 5]})
    bad.model = plan.model
    bad.save(tmp_path / "bad.json")
    status = grape_main(["apply", "--model", str(source), "--plan", str(tmp_path / "bad.json"),
                         "--out", str(tmp_path / "bad_out")])
    assert status == 2
    assert "same number of experts kept in each group" in capsys.readouterr().err
    assert not (tmp_path / "bad_out").exists()


# -- identity independent of the load dtype -------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_fingerprint_does_not_depend_on_the_load_dtype(family, tmp_path):
    """A checkpoint has one fingerprint whichever dtype it is loaded in (the router tensors are
    hashed as stored); a router changed after loading, or pruned, hashes from memory."""
    model = build(family)
    model.save_pretrained(tmp_path / "fp32")
    expected = get_adapter(model).fingerprint()
    # without the stored tensors a half-precision copy hashes differently: the test can fail
    assert get_adapter(build(family).to(torch.bfloat16)).fingerprint() != expected
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=dtype)
        assert get_adapter(loaded).fingerprint() == expected, dtype

    changed = T.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    adapter = get_adapter(changed)
    with torch.no_grad():
        adapter.router(min(adapter.moe_blocks())).weight[0, 0] += 1.0
    assert adapter.fingerprint() != expected
    pruned = T.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")
    apply_plan(pruned, uniform_plan(pruned))
    in_memory = build(family)
    apply_plan(in_memory, uniform_plan(in_memory))
    assert get_adapter(pruned).fingerprint() == get_adapter(in_memory).fingerprint() != expected


def test_fingerprint_reads_a_sharded_checkpoint(tmp_path):
    model = build("qwen3_moe")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.bfloat16)
    assert get_adapter(loaded).fingerprint() == get_adapter(model).fingerprint()


def test_calibrate_in_bfloat16_then_apply_in_float32(tmp_path, capsys):
    """`grape calibrate --dtype bfloat16`, `grape solve`, `grape apply --dtype float32` on the
    same float32 checkpoint: the plan is recognised as this model's."""
    from cli_workspace import make_workspace

    ws = make_workspace(tmp_path / "ws")
    scores, plan, out = tmp_path / "scores.npz", tmp_path / "plan.json", tmp_path / "pruned"
    steps = [
        ["calibrate", "--model", str(ws.model), "--data", str(ws.calibration), "--out", str(scores),
         "--samples", "4", "--seq-len", "32", "--subsample", "32", "--dtype", "bfloat16",
         "--device-map", "cpu", "--no-progress"],
        ["solve", "--scores", str(scores), "--budget", "0.25", "--objective", "additive",
         "--out", str(plan)],
        ["apply", "--model", str(ws.model), "--plan", str(plan), "--dtype", "float32",
         "--out", str(out)],
    ]
    for argv in steps:
        assert grape_main(argv) == 0, (argv, capsys.readouterr().err)
    assert load_pruned(out).dtype == torch.float32
