"""Repair at any size (grape.pruning.repair_sequential): pruned and repaired from the shards one decoder
layer at a time, the checkpoint equals the in-memory repair's bit for bit (families with and
without shared experts, fused and per-expert layouts, both methods, padded rows, hidden states on
disk); an interrupted run resumes after its last finished layer with the same result; `grape
apply --repair --mode streaming` (and auto on a model that does not fit) takes this path; bad
requests are refused before any layer is read."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny, tiny_input_ids

from cli_workspace import make_workspace
from grape.models.adapters import get_adapter
from grape.pruning.checkpoint import load_pruned
from grape.cli.main import main as grape_main
from grape.errors import ArchitectureError, DataError, PlanError
from grape.models.layerwise import LayerLoader
from grape.pruning.apply import ApplyConfig
from grape.pruning.repair import RepairSettings, prune_and_repair
from grape.pruning.repair_sequential import check_layout, stream_repair
from grape.models.shards import stored_tensors
from solvers.plan import Plan

IDS = tiny_input_ids(batch=6, seq=24)
# DeepSeek tiny model: 8 experts in 2 groups of 4, so [0, 2, 5, 7] keeps 2 per group
OVERRIDES = {"deepseek_v3": {"n_group": 2, "topk_group": 1}}
QUIET = dict(device="cpu", say=lambda line: None)


def saved(tmp_path: Path, family: str) -> Path:
    path = tmp_path / family
    make_tiny(family, **OVERRIDES.get(family, {})).save_pretrained(path)
    return path


def half_plan(model_dir: Path, kept=(0, 2, 5, 7)) -> Plan:
    adapter = get_adapter(load_pruned(model_dir))
    keep = {layer: list(kept) for layer in adapter.moe_blocks()}
    removed = {layer: [e for e in range(adapter.num_experts(layer)) if e not in k] for layer, k in keep.items()}
    return Plan(kept=keep, removed=removed, model=adapter.identity().to_json())


def in_memory(model_dir: Path, plan: Plan, config: ApplyConfig, ids=IDS, mask=None, **settings):
    model = load_pruned(model_dir)
    report = prune_and_repair(model, plan, config, ids, mask, settings=RepairSettings(**settings))
    return model, report


def assert_same_model(got, expected) -> None:
    a, b = got.state_dict(), expected.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    # the layer counts and routing settings (not where it was loaded from, nor the record of an
    # apply, and its remote-code entry, that an unsaved model has not written yet)
    skip = ("_name_or_path", "grape_pruning", "auto_map")
    assert ({k: v for k, v in got.config.to_dict().items() if k not in skip}
            == {k: v for k, v in expected.config.to_dict().items() if k not in skip})


# -- the same tensors as in memory ----------------------------------------------------------------
@pytest.mark.parametrize("family, method", [("qwen3_moe", "lstsq"), ("mixtral", "lstsq"),
                                            ("deepseek_v3", "lstsq"), ("gpt_oss", "scale")])
def test_sequential_repair_equals_the_in_memory_repair_bit_for_bit(family, method, tmp_path):
    """Shared experts (deepseek_v3, its first layer dense), Mixtral's renamed per-expert tensors,
    gpt-oss's fused, transposed experts with biases (scale changes both down_proj and its bias)."""
    source = saved(tmp_path, family)
    plan = half_plan(source)
    config = ApplyConfig(repair=method)
    expected, expected_report = in_memory(source, plan, config)
    done = stream_repair(source, plan, tmp_path / "out", config, IDS, **QUIET)
    assert [r.after for r in done.report.layers] == [r.after for r in expected_report.layers]
    assert_same_model(load_pruned(done.path), expected)
    plain = load_pruned(done.path).state_dict()
    unrepaired = stream_plain(source, plan, tmp_path / "plain")
    changed = {n.rsplit(".", 1)[-1] for n in plain if not torch.equal(plain[n], unrepaired[n])}
    assert changed == ({"down_proj", "down_proj_bias"} if method == "scale" else {"down_proj"})
    record = json.loads((done.path / "grape_provenance.json").read_text())
    assert record["apply_mode"] == "streaming" and record["repair"]["layer_sequential"] is True
    assert not (tmp_path / "out.partial").exists()  # the progress is removed once written


def stream_plain(source: Path, plan: Plan, out: Path) -> dict:
    from grape.pruning.streaming import stream_apply

    return load_pruned(stream_apply(source, plan, out)).state_dict()


def test_padded_rows_a_non_uniform_plan_and_hidden_states_on_disk(tmp_path):
    source = saved(tmp_path, "mixtral")
    identity = get_adapter(load_pruned(source)).identity().to_json()
    kept = {0: [0, 2, 5, 7], 1: [1, 2, 3, 4, 6, 7], 2: [3, 4]}
    plan = Plan(kept=kept, removed={l: [e for e in range(8) if e not in k] for l, k in kept.items()},
                model=identity)
    mask = torch.ones_like(IDS)
    mask[0, 15:] = 0
    config = ApplyConfig(repair="lstsq")
    expected, _ = in_memory(source, plan, config, mask=mask, batch_size=4)
    done = stream_repair(source, plan, tmp_path / "out", config, IDS, mask, hidden_states="disk",
                         settings=RepairSettings(batch_size=4), **QUIET)
    assert done.hidden_states == "disk" and done.report.tokens == IDS.numel() - 9
    assert_same_model(load_pruned(done.path), expected)


def test_the_fit_in_token_chunks_matches_one_call_and_stays_equal_to_in_memory(tmp_path, monkeypatch):
    """grape.pruning.repair_fit runs the experts over ROUTED_CHUNK tokens at a time (bounded memory):
    the chunked routed output equals one call over all tokens to float rounding, and both
    repairs, chunked alike, still agree bit for bit."""
    import grape.pruning.repair_fit as fit

    source = saved(tmp_path, "qwen3_moe")
    plan = half_plan(source)
    adapter = get_adapter(load_pruned(source))
    x = torch.randn(IDS.numel(), 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        routing = fit.Routing(*adapter.route(0, x))
        whole = fit.routed(adapter.experts(0), x, routing)
        monkeypatch.setattr(fit, "ROUTED_CHUNK", 40)  # 144 tokens: four chunks, the last one short
        chunked = fit.routed(adapter.experts(0), x, routing)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert fit.mean_error(whole, chunked) < 1e-10
    assert fit.mean_energy(whole) == pytest.approx(float(whole.double().pow(2).sum(-1).mean()), rel=1e-12)
    expected, _ = in_memory(source, plan, ApplyConfig(repair="lstsq"))
    done = stream_repair(source, plan, tmp_path / "out", ApplyConfig(repair="lstsq"), IDS, **QUIET)
    assert_same_model(load_pruned(done.path), expected)


# -- resume ------------------------------------------------------------------------------------------
class Interrupted(Exception):
    pass


def stop_after(layer: int):
    def hook(index: int) -> None:
        if index == layer:
            raise Interrupted
    return hook


def test_an_interrupted_repair_resumes_after_its_last_layer_with_the_same_result(tmp_path, monkeypatch):
    source = saved(tmp_path, "qwen3_moe")
    plan = half_plan(source)
    config = ApplyConfig(repair="lstsq")
    whole = load_pruned(stream_repair(source, plan, tmp_path / "whole", config, IDS, **QUIET).path)
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        stream_repair(source, plan, out, config, IDS, on_layer=stop_after(1), **QUIET)
    progress = json.loads((tmp_path / "out.partial" / "progress.json").read_text())
    assert progress["progress"]["layers_done"] == 2 and not out.exists()
    loaded = []
    monkeypatch.setattr(LayerLoader, "load_layer", lambda self, i, real=LayerLoader.load_layer:
                        loaded.append(i) or real(self, i))
    lines: list[str] = []
    done = stream_repair(source, plan, out, config, IDS, device="cpu", say=lines.append)
    assert loaded == [2] and done.resumed_at == 2  # layers 0 and 1 were not read again
    assert any("resumes after decoder layer 1" in line for line in lines)
    assert [r.layer for r in done.report.layers] == [0, 1, 2]
    assert_same_model(load_pruned(done.path), whole)
    assert not (tmp_path / "out.partial").exists()


def test_a_resume_folder_of_other_settings_is_started_over(tmp_path):
    source = saved(tmp_path, "qwen3_moe")
    plan = half_plan(source)
    with pytest.raises(Interrupted):
        stream_repair(source, plan, tmp_path / "out", ApplyConfig(repair="lstsq"), IDS,
                      on_layer=stop_after(0), **QUIET)
    lines: list[str] = []
    done = stream_repair(source, plan, tmp_path / "out", ApplyConfig(repair="scale"), IDS,
                         device="cpu", say=lines.append)
    assert done.resumed_at == 0 and any("another run" in line for line in lines)
    expected, _ = in_memory(source, plan, ApplyConfig(repair="scale"))
    assert_same_model(load_pruned(done.path), expected)


# -- refusals, before any layer is read ------------------------------------------------------------------
def test_bad_requests_are_refused_before_any_layer_is_read(tmp_path, monkeypatch):
    source = saved(tmp_path, "qwen3_moe")
    plan = half_plan(source)
    other = half_plan(saved(tmp_path, "mixtral"))
    monkeypatch.setattr(LayerLoader, "load_layer", lambda *a: pytest.fail("a layer was read"))
    config = ApplyConfig(repair="lstsq")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [
        (dict(plan=other), PlanError, None),
        (dict(config=ApplyConfig()), PlanError, "stream_apply"),
        (dict(input_ids=IDS + 1000), DataError, "vocabulary"),
        (dict(input_ids=IDS.float()), DataError, "integer matrix"),
        (dict(hidden_states="gpu"), DataError, "hidden_states"),
        (dict(out=foreign), Exception, "not a GRAPE checkpoint"),
    ]
    for change, error, phrase in cases:
        args = {**dict(plan=plan, out=tmp_path / "out", config=config, input_ids=IDS), **change}
        with pytest.raises(error, match=phrase):
            stream_repair(source, args.pop("plan"), args.pop("out"), args.pop("config"),
                          args.pop("input_ids"), **args, **QUIET)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    # a family whose layers cannot run one at a time (its adapter says why): refused by the
    # apply stage's check from config.json, and by the repair itself
    from grape.models.adapters import adapter_class
    from grape.pruning.stage import check_repair

    monkeypatch.setattr(adapter_class("qwen3_moe"), "sequential_refusal", "its layers need more",
                        raising=False)
    data = ApplyConfig(repair="lstsq", repair_data=(str(source / "config.json"),))
    with pytest.raises(PlanError, match="do not allow .its layers need more.; apply without --repair"):
        check_repair({"model_type": "qwen3_moe"}, data)
    with pytest.raises(ArchitectureError, match="its layers need more"):
        stream_repair(source, plan, tmp_path / "out", config, IDS, **QUIET)
    monkeypatch.setattr(adapter_class("qwen3_moe"), "sequential_refusal", None, raising=False)
    # a folder at OUT.partial that grape did not write is refused, not emptied
    monkeypatch.undo()
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not a checkpoint grape apply wrote"):
        stream_repair(source, plan, tmp_path / "out", config, IDS, **QUIET)
    assert (tmp_path / "out.partial" / "keep.txt").read_text() == "mine"


def test_a_stored_layout_that_does_not_match_is_refused(tmp_path):
    """check_layout compares the loaded layer, turned back into stored form, with the stored
    bytes: pointing expert 0's down projection at expert 1's bytes is caught."""
    source = saved(tmp_path, "qwen3_moe")
    from grape.models.layerwise import build_skeleton

    model = build_skeleton(source, torch.float32)
    loader = LayerLoader(model, source, "cpu", torch.float32)
    loader.load_layer(0)
    adapter = get_adapter(model)
    stored = stored_tensors(source)
    check_layout(model, adapter, 0, stored)  # the real layout passes
    swapped = dict(stored)
    name = "model.layers.0.mlp.experts.0.down_proj.weight"
    swapped[name] = stored["model.layers.0.mlp.experts.1.down_proj.weight"].renamed(name)
    with pytest.raises(ArchitectureError, match="--mode in-memory"):
        check_layout(model, adapter, 0, swapped)


# -- the command -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("repair_sequential"))


def test_grape_apply_repairs_layer_by_layer_with_mode_streaming(ws, tmp_path, capsys, monkeypatch):
    half_plan(ws.model).save(tmp_path / "plan.json")
    base = ["apply", "--model", str(ws.model), "--plan", str(tmp_path / "plan.json"), "--repair", "lstsq",
            "--repair-data", str(ws.calibration), "--repair-samples", "4", "--repair-seq-len", "32"]
    assert grape_main([*base, "--out", str(tmp_path / "s"), "--mode", "streaming"]) == 0
    out = capsys.readouterr().out
    assert "repair lstsq: 3 layer(s) on 128 tokens" in out and "streamed shard by shard" in out
    assert grape_main([*base, "--out", str(tmp_path / "m"), "--mode", "in-memory"]) == 0
    capsys.readouterr()
    assert_same_model(load_pruned(tmp_path / "s"), load_pruned(tmp_path / "m"))
    record = json.loads((tmp_path / "s" / "grape_provenance.json").read_text())
    assert record["repair"]["data"] == [str(ws.calibration)] and record["repair"]["rows"] == 4
    # auto: in memory when the model fits, layer by layer when it does not
    assert grape_main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "repairing it in memory" in capsys.readouterr().out
    monkeypatch.setattr("grape.models.placement.whole_capacity", lambda *a: (1000, "host memory"))
    assert grape_main([*base, "--out", str(tmp_path / "b")]) == 0
    assert "layer by layer from the shards" in capsys.readouterr().out
    assert_same_model(load_pruned(tmp_path / "b"), load_pruned(tmp_path / "m"))
    # what cannot stream is refused in one line, before any weight is read
    capsys.readouterr()
    assert grape_main([*base, "--out", str(tmp_path / "x"), "--mode", "streaming", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "apply mode 'streaming'" in err and len(err.strip().splitlines()) == 1
