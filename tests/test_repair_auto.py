"""`--repair auto` (grape run's default): lstsq where it can run, else plain removal with one line
saying why; it fits on as many rows as the calibration text fills, down to AUTO_MIN_ROWS."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from cli_workspace import RUN_FLAGS, make_workspace
from grape.cli.main import main as grape_main
from grape.data.text import pack_documents
from grape.errors import ShortTextError
from grape.pruning.apply import AUTO_REPAIR, AUTO_REPAIR_LAYERWISE, ApplyConfig, apply_plan
from grape.pruning.repair import resolve_repair
from grape.pruning.stage import AUTO_MIN_ROWS
from test_repair import half_plan

QWEN = {"model_type": "qwen3_moe"}


@pytest.mark.parametrize("config, model_config, why", [
    (ApplyConfig(repair="auto", repair_data=("c.jsonl",)), QWEN, None),
    (ApplyConfig(repair="auto"), QWEN, "no calibration text"),
    (ApplyConfig("mask", repair="auto", repair_data=("c.jsonl",)), QWEN, "--method mask"),
    (ApplyConfig(repair="auto", repair_data=("c.jsonl",)),
     {**QWEN, "quantization_config": {"quant_method": "fp8"}}, "quantised"),
    (ApplyConfig(repair="auto", repair_data=("c.jsonl",)), {"model_type": "llama4_text"}, "scale their input"),
])
def test_auto_is_lstsq_where_it_can_run_else_none_with_why(config, model_config, why):
    resolved, reason = resolve_repair(model_config, config)
    assert resolved.repair == ("none" if why else AUTO_REPAIR)
    assert (reason is None) if why is None else (why in reason)


def test_an_explicit_repair_is_left_to_its_checks():
    config = ApplyConfig(repair="scale")
    assert resolve_repair({"model_type": "llama4_text"}, config) == (config, None)


def test_auto_without_tokens_is_plain_removal():
    from tiny_models import make_tiny

    model = make_tiny("qwen3_moe")
    plain = apply_plan(make_tiny("qwen3_moe"), half_plan(model), ApplyConfig("remove"))
    auto = apply_plan(model, half_plan(model), ApplyConfig(repair="auto"))
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), plain.state_dict().values()))


class _Words:
    """Whitespace 'tokenizer': one id per word."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[len(w) for w in t.split()] for t in texts]}


def test_pack_documents_gives_what_the_text_fills_down_to_at_least():
    docs = ["a bb ccc dddd " * 10]  # 40 tokens (+ no separator)
    rows = pack_documents(docs, _Words(), seq_len=8, samples=10, progress=False, at_least=3)
    assert rows.shape == (5, 8)
    with pytest.raises(ShortTextError, match="too little calibration text"):
        pack_documents(docs, _Words(), seq_len=8, samples=10, progress=False, at_least=6)
    with pytest.raises(ShortTextError):
        pack_documents(docs, _Words(), seq_len=8, samples=10, progress=False)


# -- the commands -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("auto"))


def _run(ws, out, *extra):
    return ["run", "--model", str(ws.model), "--data", str(ws.calibration), "--eval-data", *map(str, ws.heldout),
            "--out", str(out), "--budget", "0.5", "--no-search", "--no-compare", "--no-save", *RUN_FLAGS, *extra]


def test_grape_run_repairs_by_default_on_what_the_text_fills(ws, tmp_path, capsys):
    # the workspace's text fills a few hundred rows of 8 tokens: fewer than the 400 asked
    assert grape_main(_run(ws, tmp_path / "run", "--repair-seq-len", "8", "--repair-samples", "400")) == 0
    printed = capsys.readouterr().out
    assert "all the calibration text fills once documents are held out for its check (400 asked)" in printed
    assert printed.count("repair lstsq+experts:") == 2  # the applied plan and the uniform baseline
    # no search to hold documents out: the run holds some out of the text to check the repair
    checks = json.loads((tmp_path / "run" / "summary.json").read_text())["repair_check"]
    assert set(checks) == {"exact", "uniform"} and all(c["tokens"] > 0 for c in checks.values())
    assert printed.count("nats/token against no repair") == 2
    recipe = (tmp_path / "run" / "run.recipe.yaml").read_text()
    assert "repair: auto" in recipe


def test_grape_run_falls_back_to_plain_removal_with_one_line(ws, tmp_path, capsys):
    short = tmp_path / "short.jsonl"  # a few rows of 32 tokens: fewer than AUTO_MIN_ROWS
    short.write_text(json.dumps({"text": ws.calibration.read_text().splitlines()[0]}) + "\n")
    assert grape_main(_run(ws, tmp_path / "run", "--repair-seq-len", "32", "--repair-data", str(short))) == 0
    printed = capsys.readouterr().out
    assert f"repair: none (the calibration text fills fewer than {AUTO_MIN_ROWS} rows" in printed
    assert "repair lstsq+experts:" not in printed
    assert grape_main(_run(ws, tmp_path / "mask", "--method", "mask")) == 0
    assert "repair: none (--method mask" in capsys.readouterr().out


def test_grape_apply_auto_without_text_is_plain_removal(ws, tmp_path, capsys):
    model = T.AutoModelForCausalLM.from_pretrained(ws.model)
    half_plan(model).save(tmp_path / "plan.json")
    argv = ["apply", "--model", str(ws.model), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "a"),
            "--repair", "auto"]
    assert grape_main(argv) == 0
    assert "--repair auto: no repair (no calibration text" in capsys.readouterr().out
    assert "repair" not in json.loads((tmp_path / "a" / "grape_provenance.json").read_text())


def test_a_run_that_does_not_hold_the_model_repairs_its_checkpoint_layer_by_layer(ws, tmp_path, monkeypatch, capsys):
    """Where the model does not fit, auto repairs the streamed checkpoint from the shards
    (grape.pruning.repair_sequential) instead of being refused or dropped."""
    import grape.models.loading
    import grape.models.placement

    scores = tmp_path / "scores.npz"
    assert grape_main(["calibrate", "--model", str(ws.model), "--data", str(ws.calibration), "--out", str(scores),
                       "--samples", "4", "--seq-len", "32", "--subsample", "32", "--no-progress",
                       "--device-map", "cpu"]) == 0
    monkeypatch.setattr(grape.models.placement, "whole_capacity", lambda placement, world: (1000, "a test"))
    monkeypatch.setattr(grape.models.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "run"
    held = [str(p) for p in ws.heldout]
    assert grape_main(["run", "--model", str(ws.model), "--scores", str(scores), "--data", str(ws.calibration),
                       "--eval-data", *held, "--search-data", *held, "--out", str(out), "--budget", "0.5",
                       "--baselines", "none", "--no-compare", *RUN_FLAGS, "--repair-seq-len", "8"]) == 0
    printed = capsys.readouterr().out
    # layer by layer, auto is the lighter lstsq (the experts re-fit would need more memory)
    assert "does not fit in memory" in printed and f"repair {AUTO_REPAIR_LAYERWISE}:" in printed
    record = json.loads((out / "checkpoint" / "grape_provenance.json").read_text())
    assert record["repair"]["layer_sequential"] is True and record["repair"]["method"] == AUTO_REPAIR_LAYERWISE


def test_grape_apply_auto_layer_by_layer_is_the_lighter_fit(ws, tmp_path, capsys):
    model = T.AutoModelForCausalLM.from_pretrained(ws.model)
    half_plan(model).save(tmp_path / "plan.json")
    argv = ["apply", "--model", str(ws.model), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "a"),
            "--repair", "auto", "--repair-data", str(ws.calibration), "--repair-seq-len", "8", "--mode", "streaming"]
    assert grape_main(argv) == 0
    assert f"--repair auto: {AUTO_REPAIR_LAYERWISE} (layer by layer" in capsys.readouterr().out
    record = json.loads((tmp_path / "a" / "grape_provenance.json").read_text())["repair"]
    assert record["method"] == AUTO_REPAIR_LAYERWISE != AUTO_REPAIR and record["layer_sequential"] is True


def fit_settings(repair: str, *flags: str):
    """(the ApplyConfig `grape apply --repair REPAIR FLAGS...` parses to, the fits' settings it
    gives, the settings without the flags): how a re-fit's flags reach grape.pruning.repair."""
    import argparse

    from grape.cli.commands.apply import add_arguments, apply_config_from_args
    from grape.pruning.repair import settings_for

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--model", "m", "--plan", "p.json", "--out", "o", "--repair", repair]
    config = apply_config_from_args(parser.parse_args([*base, *flags]))
    return config, settings_for(config, None), settings_for(apply_config_from_args(parser.parse_args(base)), None)


def test_the_router_refit_flags_reach_the_fit(tmp_path):
    from grape.errors import PlanError
    from grape.pruning.repair import RepairSettings, settings_for
    from grape.pruning.repair_router import DEFAULT_LR, DEFAULT_STEPS

    config, given, unset = fit_settings("router", "--repair-router-steps", "7", "--repair-router-lr", "0.05")
    assert (given.router_steps, given.router_lr) == (7, 0.05)
    assert (unset.router_steps, unset.router_lr) == (DEFAULT_STEPS, DEFAULT_LR)
    explicit = RepairSettings(router_steps=3)
    assert settings_for(config, explicit) is explicit  # explicit settings win
    with pytest.raises(PlanError, match="--repair-router-lr"):
        ApplyConfig(repair="router", repair_router_lr=0.0)
