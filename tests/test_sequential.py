"""Layer-sequential calibration (grape.calibration.sequential): the scores equal the whole-model pass's for
every family (sliding-window layers, padded batches, bf16 checkpoints, GRAPE-pruned non-uniform
and masked checkpoints, FP8 and MXFP4 experts); models it cannot run (no rotary embedding or
final norm where it expects them) are refused in one line; hidden states on disk; the mode
choice; resume after an interruption (an exception, and kill -9 of the command) gives the same
scores."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from grape.calibration.calibrate import CalibrationConfig, calibrate
from grape.calibration.distributed import World
from grape.errors import ArchitectureError, DataError
from grape.models.layerwise import LayerLoader
from grape.models.loading import load_model
from grape.models.placement import choose_mode, sequential_device
from grape.calibration.sequential import calibrate_sequential, final_norm_name, layer_arguments, refuse_unhandled
from solvers.scores import STAT_NAMES, Scores
from tests.tiny_families import NEW_FAMILIES, make_family
from tests.tiny_models import FAMILIES, make_tiny, tiny_input_ids

REPO = Path(__file__).resolve().parents[1]
QUICK = dict(batch_size=2, subsample=24, progress=False)
SEQ = 24  # longer than gpt_oss's sliding window (16): the sliding layers mask differently
# every family has a final norm by one of grape.calibration.sequential.FINAL_NORMS (Mamba / short-conv
# hybrids and NoPE configs have no rotary embedding: nothing to move)
# layers that hand the next layer more than the hidden states (their adapters declare
# sequential_refusal), and a decoder without a final norm: refused in one line
NOT_SEQUENTIAL = {"glm_moe_dsa", "hy_v4", "qwen4_exp_text"}
# the new families' exactness in the quick suite (the others are slow): sliding and full
# attention layers, dense layers from mlp_layer_types, the cheapest of them here
QUICK_NEW = {"cohere2_moe"}


def same_scores(got: Scores, expected: Scores, rtol: float = 1e-5, stored: bool = True) -> None:
    """Every array of two scores files: counts exactly, float statistics to `rtol` relative.
    `stored=False`: the two checkpoints store the weights in different formats, so their byte
    sizes differ and only the parameter counts are compared."""
    assert got.model == expected.model and got.tokens == expected.tokens
    for layer, params in expected.sizes.expert_params.items():
        np.testing.assert_array_equal(got.sizes.expert_params[layer], params)
    if stored:
        assert got.sizes.to_json() == expected.sizes.to_json()
    assert got.calibration["subsample_tokens"] == expected.calibration["subsample_tokens"]
    assert sorted(got.layers) == sorted(expected.layers)
    for layer, ls in expected.layers.items():
        other = got.layers[layer]
        np.testing.assert_array_equal(other.stats["count"], ls.stats["count"])
        for name in STAT_NAMES:
            np.testing.assert_allclose(other.stats[name], ls.stats[name], rtol=rtol, atol=0,
                                       err_msg=f"layer {layer} {name}")
        if stored:
            np.testing.assert_array_equal(other.expert_bytes, ls.expert_bytes)
        assert other.output_energy == pytest.approx(ls.output_energy, rel=rtol)
        assert sorted(other.similarity) == sorted(ls.similarity)
        # similarities lie in [-1, 1] and a cost curve falls to 0: entries near 0 are compared
        # on the scale of the whole matrix / curve (float32 outputs computed with other thread
        # counts in another process differ in the last bits)
        for kind, sim in ls.similarity.items():
            np.testing.assert_allclose(other.similarity[kind], sim, rtol=rtol, atol=rtol / 10)
        scale = float(np.abs(ls.cost_curve).max())
        np.testing.assert_allclose(other.cost_curve, ls.cost_curve, rtol=rtol,
                                   atol=rtol / 10 * scale)


def saved(tmp_path: Path, family: str, dtype=torch.float32, **overrides) -> Path:
    directory = tmp_path / family
    if family in NEW_FAMILIES:  # tests/tiny_families.py: one fixed tiny config each
        assert not overrides, overrides
        model = make_family(family)
    else:
        model = make_tiny(family, **overrides)
    model.to(dtype).save_pretrained(directory)
    return directory


def whole(directory: Path, data, config: CalibrationConfig) -> Scores:
    return calibrate(load_model(directory, "cpu"), data, config)


# -- equality with the whole-model pass ----------------------------------------------------------
@pytest.mark.parametrize("family", [*FAMILIES, *(
    pytest.param(f, marks=() if f in QUICK_NEW else pytest.mark.slow)
    for f in NEW_FAMILIES if f not in NOT_SEQUENTIAL)])
def test_sequential_equals_whole_model(family, tmp_path):
    directory = saved(tmp_path, family)
    ids = tiny_input_ids(6, SEQ)
    config = CalibrationConfig(**QUICK)
    scores = calibrate_sequential(directory, ids, config)
    same_scores(scores, whole(directory, ids, config))
    run = scores.calibration["run"]
    assert run["mode"] == "sequential" and run["hidden_states"] == "cpu"
    assert run["tokens"] == 6 * SEQ and run["peak_host_memory"] > 0


def test_models_it_cannot_run_are_refused_in_one_line(tmp_path):
    for family in NEW_FAMILIES:  # the others run (exactly: test_sequential_equals_whole_model)
        if family not in NOT_SEQUENTIAL:
            refuse_unhandled(make_family(family))
            continue
        with pytest.raises(ArchitectureError, match="use --mode whole") as refused:
            refuse_unhandled(make_family(family))
        assert len(str(refused.value).splitlines()) == 1, family
    model = make_family("glm4_moe")
    name = final_norm_name(model.model)
    model.model.add_module("renamed_norm", getattr(model.model, name))
    delattr(model.model, name)  # a final norm by a name the stand-in does not know
    with pytest.raises(ArchitectureError, match="final norm is none of") as refused:
        refuse_unhandled(model)
    assert len(str(refused.value).splitlines()) == 1


@pytest.mark.parametrize("family", ["gpt_oss", "qwen2_moe"])
def test_padded_batches_and_a_bf16_checkpoint(family, tmp_path):
    """A tokenizer's padded output (left padding) and a bf16 checkpoint loaded in float32."""
    directory = saved(tmp_path, family, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (4, SEQ), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 5, 11, 2)):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    data = {"input_ids": ids, "attention_mask": mask}
    config = CalibrationConfig(batch_size=2, subsample=40, progress=False)
    scores = calibrate_sequential(directory, data, config)
    assert scores.tokens == int(mask.sum())
    same_scores(scores, whole(directory, data, config))


def test_layer_arguments_follow_each_layers_attention_type(tmp_path):
    """gpt_oss alternates sliding-window and full attention: each layer gets its own mask."""
    from grape.models.layerwise import build_skeleton

    model = build_skeleton(saved(tmp_path, "gpt_oss"), torch.float32)
    model.model.rotary_emb.to("cpu")
    model.config._attn_implementation = "eager"  # masks as tensors, to compare
    arguments = layer_arguments(model, (1, SEQ), None, torch.device("cpu"), torch.float32)
    masks = [kwargs["attention_mask"] for _, kwargs in arguments]
    assert torch.equal(masks[0], masks[2]) and not torch.equal(masks[0], masks[1])
    assert all("position_embeddings" in kwargs for _, kwargs in arguments)


def test_grape_pruned_non_uniform_and_masked_checkpoints(tmp_path):
    from grape.pruning.apply import apply_plan
    from grape.pruning.checkpoint import save_pruned
    from solvers.plan import Plan

    ids = tiny_input_ids(4, SEQ)
    config = CalibrationConfig(**QUICK)
    for method, kept in (("remove", {0: [0, 2, 5, 7], 1: [1, 2, 3, 4, 6, 7], 2: [3, 6, 7]}),
                         ("mask", {0: [0, 1, 2, 5, 7], 1: list(range(8)), 2: [1, 3, 6]})):
        model = make_tiny("qwen3_moe")
        plan = Plan(kept=kept, removed={k: [e for e in range(8) if e not in v]
                                        for k, v in kept.items()})
        out = save_pruned(apply_plan(model, plan, method), tmp_path / method, plan=plan)
        scores = calibrate_sequential(out, ids, config)
        same_scores(scores, whole(out, ids, config))
        assert scores.model.experts_per_layer == {0: 4, 1: 6, 2: 3} or method == "mask"


def _fp8_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """DeepSeek-V3 with block-FP8 routed and shared experts (two shards), and its float copy."""
    from grape.models.quantized import dequantize_fp8_blocks, quantize_fp8_blocks

    float_dir = saved(tmp_path, "deepseek_v3", hidden_size=160, moe_intermediate_size=144)
    tensors = load_file(str(float_dir / "model.safetensors"))
    config = json.loads((float_dir / "config.json").read_text())
    source, reference = tmp_path / "fp8", tmp_path / "reference"
    source.mkdir()
    for name in [n for n in tensors if n.endswith("_proj.weight")]:  # attention too, as V3
        tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(tensors[name])
    # V3's multi-token-prediction layer past num_hidden_layers: not part of the model
    extra = "model.layers.3.mlp.experts.0.up_proj.weight"
    tensors[extra] = tensors["model.layers.1.mlp.experts.0.up_proj.weight"]
    tensors[extra + "_scale_inv"] = tensors["model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"]
    names = sorted(tensors)
    weight_map = {}
    for shard, part in enumerate((names[::2], names[1::2])):
        file = f"model-{shard + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(source / file))
        weight_map.update(dict.fromkeys(part, file))
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
             "activation_scheme": "dynamic"}
    (source / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    for name in [n for n in tensors if n.endswith("_scale_inv")]:
        weight = name[: -len("_scale_inv")]
        tensors[weight] = dequantize_fp8_blocks(tensors[weight], tensors.pop(name))
    tensors.pop(extra)
    reference.mkdir()
    save_file(tensors, str(reference / "model.safetensors"))
    (reference / "config.json").write_text(json.dumps(config))
    return source, reference


def test_fp8_experts_are_dequantised_layer_by_layer(tmp_path):
    source, reference = _fp8_checkpoint(tmp_path)
    ids = tiny_input_ids(4, SEQ)
    config = CalibrationConfig(**QUICK)
    scores = calibrate_sequential(source, ids, config)
    expected = whole(reference, ids, config)
    scores.model = dataclasses.replace(scores.model, name_or_path=expected.model.name_or_path)
    same_scores(scores, expected, stored=False)
    # sized as stored: 1-byte weights plus float32 block scales (not the float32 copy's 4 bytes)
    assert scores.sizes.quantization == "fp8" and expected.sizes.quantization is None
    for layer, ls in scores.layers.items():
        params = scores.sizes.expert_params[layer]
        assert np.all(params < ls.expert_bytes) and np.all(ls.expert_bytes < 1.1 * params)
        np.testing.assert_array_equal(expected.layers[layer].expert_bytes, 4 * params)


def test_mxfp4_experts_are_dequantised_layer_by_layer(tmp_path):
    from grape.models.quantized import dequantize_mxfp4

    float_dir = saved(tmp_path, "gpt_oss", intermediate_size=32)
    tensors = load_file(str(float_dir / "model.safetensors"))
    config = json.loads((float_dir / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    source, reference = tmp_path / "mxfp4", tmp_path / "reference"
    source.mkdir(), reference.mkdir()
    quantised = dict(tensors)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, cols, rows = quantised.pop(name).shape  # stored [E, in, out]
        blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=g,
                               dtype=torch.uint8)
        scales = torch.randint(122, 128, (experts, rows, cols // 32), generator=g,
                               dtype=torch.uint8)
        quantised[name + "_blocks"], quantised[name + "_scales"] = blocks, scales
        tensors[name] = dequantize_mxfp4(blocks, scales).transpose(1, 2).contiguous()
    save_file(quantised, str(source / "model.safetensors"))
    quant = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
             "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (source / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    save_file(tensors, str(reference / "model.safetensors"))
    (reference / "config.json").write_text(json.dumps(config))
    ids = tiny_input_ids(4, SEQ)
    config = CalibrationConfig(**QUICK)
    scores = calibrate_sequential(source, ids, config)
    expected = whole(reference, ids, config)
    scores.model = dataclasses.replace(scores.model, name_or_path=expected.model.name_or_path)
    same_scores(scores, expected, stored=False)
    # sized as stored: 4-bit values, one exponent byte per 32 and float32 biases
    assert scores.sizes.quantization == "mxfp4"
    weights, biases = 3 * 32 * 32, 2 * 32 + 32  # gate_up + down weights; their biases
    for layer, ls in scores.layers.items():
        np.testing.assert_array_equal(scores.sizes.expert_params[layer], weights + biases)
        np.testing.assert_array_equal(ls.expert_bytes, weights // 2 + weights // 32 + 4 * biases)


@pytest.mark.parametrize("where", ["disk", "cpu"])
def test_hidden_states_on_disk_or_host(where, tmp_path):
    directory = saved(tmp_path, "mixtral")
    ids = tiny_input_ids(6, SEQ)
    config = CalibrationConfig(**QUICK)
    reference = calibrate_sequential(directory, ids, config, hidden_states="device")
    scores = calibrate_sequential(directory, ids, config, hidden_states=where,
                                  checkpoint=tmp_path / "partial")
    assert scores.calibration["run"]["hidden_states"] == where
    same_scores(scores, reference, rtol=0)
    assert not list((tmp_path / "partial").glob("*.scratch"))  # the memory-mapped file is gone


# -- choosing the mode -----------------------------------------------------------------------------
def test_mode_choice():
    gb = 10**9
    assert choose_mode("auto", 10 * gb, 100 * gb, "1 GPU(s)", None).mode == "whole"
    small = choose_mode("auto", 90 * gb, 100 * gb, "1 GPU(s)", None)
    assert small.mode == "sequential" and "90.00 GB" in small.reason and "1 GPU(s)" in small.reason
    assert choose_mode("auto", 1, 100 * gb, "host", "fp8, 128x128 blocks").mode == "sequential"
    assert choose_mode("whole", 90 * gb, 1, "", None) == choose_mode("whole", 0, 0, "x", None)
    with pytest.raises(DataError, match="one device"):
        sequential_device({"model.layers.0": "cpu"}, World())
    assert sequential_device("cpu", World()) == torch.device("cpu")


def _cli(tmp_path: Path, *extra: str) -> list[str]:
    from tests.test_data import _words, char_tokenizer

    model_dir = tmp_path / "model"
    if not model_dir.exists():
        make_tiny("qwen3_moe").save_pretrained(model_dir)
        char_tokenizer().save_pretrained(model_dir)
        (tmp_path / "corpus").mkdir()
        for i in range(4):
            (tmp_path / "corpus" / f"{i}.txt").write_text(_words(400, i))
    return ["calibrate", "--model", str(model_dir), "--data", str(tmp_path / "corpus"),
            "--out", str(tmp_path / "scores.npz"), "--seq-len", "32", "--samples", "8",
            "--batch-size", "2", "--subsample", "16", "--device-map", "cpu", "--no-progress",
            *extra]


def test_auto_mode_goes_sequential_when_the_model_does_not_fit(tmp_path, capsys, monkeypatch):
    import grape.models.placement
    from grape.cli.main import main

    assert main(_cli(tmp_path)) == 0
    assert "whole mode (the model needs" in capsys.readouterr().out
    whole_scores = Scores.load(tmp_path / "scores.npz")
    monkeypatch.setattr(grape.models.placement, "whole_capacity", lambda placement, world: (1000, "test"))
    assert main(_cli(tmp_path, "--overwrite")) == 0
    out = capsys.readouterr().out
    assert "sequential mode (the model needs" in out and "more than 85% of the 0.00 GB" in out
    assert "tokens/s" in out and "peak host memory" in out
    scores = Scores.load(tmp_path / "scores.npz")
    assert scores.calibration["run"]["mode"] == "sequential"
    assert scores.calibration["run"]["reason"].startswith("the model needs")
    same_scores(scores, whole_scores)
    assert not (tmp_path / "scores.npz.partial").exists()


# -- resume ----------------------------------------------------------------------------------------
class Stop(Exception):
    pass


def test_interrupted_sequential_run_resumes_to_the_same_scores(tmp_path, monkeypatch, capsys):
    import grape.calibration.resume

    directory = saved(tmp_path, "deepseek_v3")
    ids = tiny_input_ids(6, SEQ)
    config = CalibrationConfig(**QUICK)
    reference = calibrate_sequential(directory, ids, config)
    commits, original = [], grape.calibration.resume.CalibrationCheckpoint.commit

    def commit_then_stop(self, progress):
        original(self, progress)
        commits.append(progress["layers_done"])
        if len(commits) == 2:
            raise Stop

    monkeypatch.setattr(grape.calibration.resume.CalibrationCheckpoint, "commit", commit_then_stop)
    with pytest.raises(Stop):
        calibrate_sequential(directory, ids, config, checkpoint=tmp_path / "partial")
    monkeypatch.setattr(grape.calibration.resume.CalibrationCheckpoint, "commit", original)
    ran = []
    monkeypatch.setattr(LayerLoader, "load_layer", _recording(LayerLoader.load_layer, ran))
    scores = calibrate_sequential(directory, ids, config, checkpoint=tmp_path / "partial")
    assert "resuming from the checkpoint" in capsys.readouterr().out
    assert ran == [2]  # layers 0 and 1 were done
    same_scores(scores, reference, rtol=0)
    # other settings: the checkpoint is another run's, the run starts over
    other = CalibrationConfig(**{**QUICK, "seed": 5})
    calibrate_sequential(directory, ids, other, checkpoint=tmp_path / "partial")
    assert "holds the checkpoint of another run" in capsys.readouterr().out


def _recording(method, ran):
    def load_layer(self, index):
        ran.append(index)
        return method(self, index)
    return load_layer


_KILLER = """
import os, signal, sys
import grape.calibration.resume
from grape.cli.main import main
original = grape.calibration.resume.CalibrationCheckpoint.commit
def commit(self, progress):
    original(self, progress)
    if progress["layers_done"] == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
grape.calibration.resume.CalibrationCheckpoint.commit = commit
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_a_sequential_command_then_the_same_command(tmp_path):
    """The acceptance case: `grape calibrate --sequential` killed with SIGKILL after its second
    layer; the same command finishes and writes the uninterrupted run's scores."""
    from grape.cli.main import main

    argv = _cli(tmp_path, "--sequential")
    assert main(argv) == 0
    reference = Scores.load(tmp_path / "scores.npz")
    (tmp_path / "scores.npz").unlink()
    env = {**os.environ, "KILL_AFTER": "2", "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", _KILLER, *argv], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "scores.npz.partial" / "progress.json").is_file()
    assert main(argv) == 0
    scores = Scores.load(tmp_path / "scores.npz")
    assert not (tmp_path / "scores.npz.partial").exists()
    # layer 0 ran in another process (its float sums may round differently in the last bits)
    same_scores(scores, reference)


def test_a_layer_handing_the_next_more_than_hidden_states_stops_the_run():
    from grape.calibration.sequential import _hidden_out

    hidden = torch.zeros(2, 3)
    assert _hidden_out(hidden, 0) is hidden and _hidden_out((hidden,), 0) is hidden
    assert _hidden_out((hidden, None), 0) is hidden
    with pytest.raises(ArchitectureError, match="decoder layer 4 returns 2 tensors"):
        _hidden_out((hidden, torch.zeros(2, 1)), 4)
