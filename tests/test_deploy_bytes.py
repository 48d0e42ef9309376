"""Sizes as deployed (issue 13, item 1): the scores file records the checkpoint's stored bytes
(not the calibration dtype's), the non-expert parts and the attention shape; --deploy-dtype
rescales them; old files without them still load."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import grape
from grape.cli.main import main
from grape.models.sizes import Stored, classify, model_sizes
from grape.testbed import calibration_file, model_dir
from solvers.errors import UserError
from solvers.plan import Plan
from solvers.scores import ModelIdentity, Scores
from solvers.sizes import BYTES_PER_PARAM, deployed, parse_deploy_dtype
from solvers.synth import custom_shape, synth_scores

QUICK = ["--samples", "4", "--seq-len", "32", "--similarity", "none", "--no-cost-curves",
         "--subsample", "0", "--no-progress"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The test bed calibrated twice: by the CLI (float32 on the CPU) and by the Python API in
    bfloat16, on the same packed text."""
    folder = tmp_path_factory.mktemp("deploy")
    cli = folder / "cli.npz"
    assert main(["calibrate", "--model", str(model_dir()), "--data", str(calibration_file()),
                 *QUICK, "--out", str(cli)]) == 0
    config = grape.CalibrationConfig(samples=4, seq_len=32, similarity=(), cost_curves=False,
                                     subsample=0, progress=False)
    api = grape.calibrate(grape.load(model_dir(), dtype=torch.bfloat16), [calibration_file()],
                          config, tokenizer=grape.load_tokenizer(model_dir()))
    return Scores.load(cli), api


def _total(scores: Scores) -> int:
    return sum(int(ls.expert_bytes.sum()) for ls in scores.layers.values()) + scores.sizes.other_bytes()


def test_sizes_do_not_depend_on_the_calibration_dtype(calibrated):
    cli, api = calibrated
    assert (cli.calibration["dtype"], api.calibration["dtype"]) == ("float32", "bfloat16")
    assert cli.sizes.to_json() == api.sizes.to_json()
    assert cli.sizes.source == "checkpoint" and cli.sizes.dtype == "bfloat16"
    for layer, ls in cli.layers.items():
        np.testing.assert_array_equal(ls.expert_bytes, api.layers[layer].expert_bytes)
        np.testing.assert_array_equal(ls.expert_bytes, 2 * cli.sizes.expert_params[layer])


def test_recorded_totals_match_the_saved_checkpoint(calibrated):
    tensors = load_file(str(model_dir() / "model.safetensors"))
    saved = sum(t.numel() * t.element_size() for t in tensors.values())
    experts = sum(t.numel() * t.element_size() for name, t in tensors.items() if ".experts." in name)
    for scores in calibrated:
        assert abs(_total(scores) - saved) <= 0.01 * saved
        routed = sum(int(ls.expert_bytes.sum()) for ls in scores.layers.values())
        assert abs(routed - experts) <= 0.01 * experts
        assert scores.sizes.tied and scores.sizes.kv.heads == 2  # tied embeddings, 2 KV heads


@pytest.mark.parametrize("budget", ["free:2MiB", "keep:6MiB", "free:3MB"])
def test_byte_budgets_give_the_same_plan_from_cli_and_api(calibrated, budget):
    """Byte budgets resolve to the same removals and the same kept bytes (before version 2 the
    CLI's float32 sizes were twice the API's bfloat16 ones). Which experts go still follows
    each file's statistics, which differ in the last bits of bf16 arithmetic."""
    cli, api = calibrated
    plans = [grape.solve(s, grape.SolveConfig(budget=budget)) for s in (cli, api)]
    assert plans[0].num_removed == plans[1].num_removed > 0
    kept = [sum(int(s.layers[k].expert_bytes[v].sum()) for k, v in p.kept.items())
            for s, p in zip((cli, api), plans)]
    assert kept[0] == kept[1]


def test_deploy_dtype_rescales_by_parameter_count(calibrated):
    cli, _ = calibrated
    fp32 = deployed(cli, "fp32")
    for layer, ls in cli.layers.items():
        np.testing.assert_array_equal(fp32.expert_bytes[layer], 2 * ls.expert_bytes)
    assert fp32.footprint.embed == 2 * cli.sizes.embed.bytes and fp32.footprint.kv_width == 4.0
    fp8 = deployed(cli, "fp8")  # quantised formats re-size the routed experts only
    per = BYTES_PER_PARAM["fp8"]
    np.testing.assert_array_equal(fp8.expert_bytes[0], np.round(cli.sizes.expert_params[0] * per))
    assert fp8.footprint.layers == {k: p.bytes for k, p in cli.sizes.layers.items()}
    assert "deployed as fp8" in fp8.note and fp8.dtype == "fp8"
    assert parse_deploy_dtype("BFloat16") == "bf16"
    with pytest.raises(UserError, match="--deploy-dtype 'int3': choose one of"):
        parse_deploy_dtype("int3")


def test_deploy_dtype_flag_and_provenance(calibrated, tmp_path, capsys):
    cli, _ = calibrated
    path, out = tmp_path / "s.npz", tmp_path / "plan.json"
    cli.save(path)
    assert main(["solve", "--scores", str(path), "--budget", "free:4MiB", "--deploy-dtype", "fp32",
                 "--out", str(out), "--quiet"]) == 0
    provenance = json.loads(out.read_text())["provenance"]
    assert provenance["deploy_dtype"] == "fp32" and "deployed as fp32" in provenance["sizes"]
    # 4 MiB of float32 experts: half as many as of the stored bfloat16 ones
    per = int(cli.layers[0].expert_bytes[0])
    assert Plan.load(out).num_removed == math.ceil(4 * 2**20 / (2 * per))
    assert grape.solve(cli, grape.SolveConfig(budget="free:4MiB")).num_removed == math.ceil(4 * 2**20 / per)
    capsys.readouterr()
    assert main(["solve", "--scores", str(path), "--deploy-dtype", "int3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--deploy-dtype 'int3'" in err and err.count("\n") == 0


def test_version_1_files_still_load(tmp_path):
    scores = synth_scores(custom_shape(2, 8), seed=1, similarity=False)
    assert scores.sizes is None  # test shapes carry no sizes, like a version-1 file
    path = tmp_path / "v1.npz"
    scores.save(path)
    with np.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files}
    meta = json.loads(str(arrays["__meta__"]))
    arrays["__meta__"] = np.array(json.dumps({**meta, "version": 1}))
    np.savez_compressed(path, **arrays)
    again = Scores.load(path)
    assert again.sizes is None and again.fingerprint() == scores.fingerprint()
    view = deployed(again)
    assert view.footprint is None and view.note.startswith("routed experts only")
    # synthetic sizes are bf16 by construction, so a deployment format still rescales them
    np.testing.assert_array_equal(deployed(again, "fp32").expert_bytes[0], 2 * again.layers[0].expert_bytes)


def test_real_shapes_record_their_whole_size(tmp_path):
    scores = synth_scores("qwen3-235b-a22b", similarity=False, cost_curve=False)
    params = (sum(int(ls.expert_bytes.sum()) for ls in scores.layers.values())
              + scores.sizes.other_bytes()) / 2
    assert 234e9 < params < 236e9  # Qwen3-235B-A22B: 235B parameters
    scores.save(tmp_path / "q.npz")
    assert Scores.load(tmp_path / "q.npz").sizes.to_json() == scores.sizes.to_json()


# -- sorting tensors by where they sit ------------------------------------------------------
IDENTITY = ModelIdentity("deepseek_v3", 3, {1: 2, 2: 2}, {1: 1, 2: 1})


def _t(name: str, shape: tuple, dtype: str = "bfloat16", width: float = 2) -> Stored:
    return Stored(name, dtype, shape, int(np.prod(shape) * width))


def test_quantised_and_fused_layouts_are_sized_as_stored():
    tensors = [
        _t("model.embed_tokens.weight", (10, 4)), _t("lm_head.weight", (10, 4)),
        _t("model.norm.weight", (4,)),
        _t("model.layers.0.mlp.down_proj.weight", (4, 8)),  # a dense layer: other parts
        _t("model.layers.0.self_attn.q_proj.weight", (4, 4)),
        _t("model.layers.3.mlp.experts.0.up_proj.weight", (8, 4)),  # multi-token prediction
        _t("model.layers.1.mlp.gate.weight", (2, 4)),
        _t("model.layers.1.mlp.shared_experts.up_proj.weight", (8, 4)),
    ]
    for e in range(2):  # layer 1: block-FP8 experts with float32 scales
        tensors += [_t(f"model.layers.1.mlp.experts.{e}.up_proj.weight", (8, 4), "float8_e4m3fn", 1),
                    _t(f"model.layers.1.mlp.experts.{e}.up_proj.weight_scale_inv", (1, 1), "float32", 4)]
    tensors += [  # layer 2: fused MXFP4 experts (two values a byte) with exponents and biases
        _t("model.layers.2.mlp.experts.gate_up_proj_blocks", (2, 8, 1, 16), "uint8", 1),
        _t("model.layers.2.mlp.experts.gate_up_proj_scales", (2, 8, 1), "uint8", 1),
        _t("model.layers.2.mlp.experts.gate_up_proj_bias", (2, 8), "float32", 4),
    ]
    sizes, expert_bytes = classify(tensors, IDENTITY, {"tie_word_embeddings": False,
                                                       "num_attention_heads": 2, "hidden_size": 4},
                                   "checkpoint", "fp8")
    np.testing.assert_array_equal(expert_bytes[1], [32 + 4, 32 + 4])
    np.testing.assert_array_equal(sizes.expert_params[1], [32, 32])
    np.testing.assert_array_equal(expert_bytes[2], [128 + 8 + 32] * 2)
    np.testing.assert_array_equal(sizes.expert_params[2], [256 + 8] * 2)
    assert sizes.layers[0].params == 32 + 16 and sizes.layers[1].params == 8 + 32
    assert sizes.layers[2].bytes == 0 and sizes.embed.params == 40 and sizes.head.params == 44
    assert sizes.dtype == "bfloat16" and not sizes.tied and sizes.kv.elems_per_token[0] == 2 * 2 * 2
    # a checkpoint whose expert counts differ from the model's is not the model's
    assert classify(tensors[:-3], IDENTITY, {}, "checkpoint", None) is None


def test_a_model_changed_since_loading_is_sized_in_memory():
    from grape.models.adapters import get_adapter
    from grape.pruning.apply import apply_plan

    model = grape.load(model_dir(), dtype=torch.bfloat16)
    apply_plan(model, Plan(kept={i: list(range(8)) for i in range(6)},
                           removed={i: list(range(8, 32)) for i in range(6)}), "remove")
    identity = get_adapter(model).identity()
    sizes, expert_bytes = model_sizes(model, identity)
    assert sizes.source == "parameters" and all(len(b) == 8 for b in expert_bytes.values())
    assert sizes.embed.bytes == 4096 * 192 * 2
