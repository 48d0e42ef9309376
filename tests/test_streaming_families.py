"""Streaming apply equals the in-memory path for every supported family that tests/tiny_models.py
or tests/tiny_families.py builds: a tiny random model saved as a sharded fp32 and bf16
safetensors checkpoint, pruned by a uniform and a non-uniform plan in memory (apply_plan +
save_pruned) and shard by shard (stream_apply), gives the same tensors byte for byte (under
transformers' load names), the same config.json (expert counts included) and generation
config, and reloads with grape.load to the in-memory pruned model's logits, bit for bit; a
uniform plan's output also loads in stock transformers. Includes the families whose stored
layout differs from the loaded one: routers' correction biases stored beside the router
(EXAONE) or as the block's own tensor (MiniMax-M2, LFM2-MoE), ERNIE-4.5's [1, E] bias in a
router child, Granite's experts stored as input_linear / output_linear. A family whose adapter
declares its stored layout unstreamable is checked to be refused in one line instead."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers as T
from test_streaming import logits, make_plan, raw, read_all, renamed, source_checkpoint
from tiny_families import NEW_FAMILIES
from tiny_models import FAMILIES

from grape.models.adapters import get_adapter, supported_model_types
from grape.models.adapters import adapter_class
from grape.pruning.checkpoint import MODELING_FILE, load_provenance, load_pruned, save_pruned
from grape.pruning.apply import ApplyConfig, apply_plan
from grape.pruning.streaming import StreamingError, stream_apply, streaming_unavailable

_ONE_EXPERT = re.compile(r"\.experts\.\d+\.")
# tiny_models builds DeepSeek-V2 (not in its FAMILIES: it shares the V3 adapter)
EXTRA = ("deepseek_v2",)
TABLE = FAMILIES + NEW_FAMILIES + EXTRA
# families whose stored names or per-expert tensors differ from the loaded model's: a quick case
# each way (the rest of their cases run in the slow set)
STORED_LAYOUTS = ("minimax_m2", "lfm2_moe", "ernie4_5_moe", "exaone_moe", "granitemoe",
                  "granitemoeshared", "granitemoehybrid", "deepseek_v2")
QUICK = ({("glm4_moe", "bf16", "non_uniform"), ("nemotron_h", "fp32", "uniform")}
         | {(f, "bf16", "non_uniform") for f in STORED_LAYOUTS}
         | {(f, "fp32", "uniform") for f in STORED_LAYOUTS})


def _cases():
    for family in TABLE:
        for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            for kind in ("uniform", "non_uniform"):
                quick = family in FAMILIES or (family, name, kind) in QUICK
                yield pytest.param(family, dtype, kind, id=f"{family}-{name}-{kind}",
                                   marks=() if quick else pytest.mark.slow)


def test_the_table_covers_every_buildable_supported_family():
    assert set(supported_model_types()) <= set(TABLE), sorted(set(supported_model_types()) - set(TABLE))
    assert not [f for f in STORED_LAYOUTS if adapter_class(f).streaming_refusal]


def _refused_in_one_line(family: str, model, source, tmp_path) -> None:
    """A family whose adapter declares its stored layout unstreamable (one added since): grape
    apply loads it in memory, saying why, and stream_apply refuses in that one line."""
    config = json.loads((source / "config.json").read_text())
    reason = streaming_unavailable(source, config, "remove")
    assert reason.startswith(f"{family} checkpoints cannot be pruned shard by shard: "), reason
    with pytest.raises(StreamingError) as refused:
        stream_apply(source, make_plan(model, family, "uniform"), tmp_path / "stream")
    assert str(refused.value).startswith(reason) and len(str(refused.value).splitlines()) == 1
    assert not (tmp_path / "stream").exists()


@pytest.mark.parametrize(("family", "dtype", "kind"), list(_cases()))
def test_streaming_equals_in_memory(family, dtype, kind, tmp_path):
    source, model = source_checkpoint(tmp_path, family, dtype)
    if adapter_class(family).streaming_refusal:
        return _refused_in_one_line(family, model, source, tmp_path)
    plan = make_plan(model, family, kind)
    in_memory = load_pruned(source)
    apply_plan(in_memory, plan, ApplyConfig("remove", allow_lower_top_k=True))
    expected = logits(in_memory)
    save_pruned(in_memory, tmp_path / "memory", plan=plan)
    out = stream_apply(source, plan, tmp_path / "stream", allow_lower_top_k=True, max_shard_size="30KB")

    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    _same_tensors(out, tmp_path / "memory", source, in_memory, dtype)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text()) == json.loads((tmp_path / "memory" / name).read_text())
    adapter = get_adapter(load_pruned(out))
    assert {layer: adapter.num_experts(layer) for layer in adapter.moe_blocks()} == plan.kept_counts()
    # (Jamba's and Llama-4's tiny models have one MoE layer: "non_uniform" is uniform there)
    assert (out / MODELING_FILE).exists() == (len(set(plan.kept_counts().values())) > 1)
    torch.testing.assert_close(logits(load_pruned(out)), expected, rtol=0, atol=0)
    if kind == "uniform":  # a stock checkpoint: vanilla transformers, no remote code
        vanilla = T.AutoModelForCausalLM.from_pretrained(out)
        torch.testing.assert_close(logits(vanilla), expected, rtol=0, atol=0)
    record = load_provenance(out)
    assert record["apply_mode"] == "streaming" and record["method"] == "remove"
    assert record["experts_per_layer"] == {str(k): v for k, v in plan.kept_counts().items()}


def _same_tensors(out, memory, source, model, dtype) -> None:
    """The streamed checkpoint's tensors are the in-memory path's (under the load names),
    and every tensor no expert owns is the source's, copied byte for byte."""
    stored, original = read_all(out), read_all(source)
    mine, theirs = renamed(stored, model), renamed(read_all(memory), model)
    assert set(mine) == set(theirs)
    for name, tensor in mine.items():
        other = theirs[name]
        if tensor.dtype != other.dtype:  # transformers keeps some modules in fp32 in memory
            # (_keep_in_fp32_modules: DeepSeek-style and ERNIE routers, Kimi's dt_bias);
            # streaming keeps the stored dtype
            assert other.dtype == torch.float32 and tensor.dtype == dtype, name
            assert torch.equal(tensor.float(), other), name
        else:
            assert raw(tensor) == raw(other), name
    for name, tensor in stored.items():
        assert name in original, name  # streaming keeps the stored names
        # every plan removes experts in every MoE layer: a sliced tensor changes its shape, and
        # one expert's tensor may hold another's under a lower number
        if tensor.shape == original[name].shape and not _ONE_EXPERT.search(name):
            assert raw(tensor) == raw(original[name]), name
