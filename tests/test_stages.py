"""Every stage is one config and one function: the verbs' flags are the configs' fields, and
`grape run` and the Python API get the runtime choices the verbs have (sequential calibration,
streaming apply) by the same rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cli_workspace import make_workspace
from grape.cli.main import build_parser, main


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("stages"))


def options(verb: str) -> set[str]:
    parser = build_parser(only=verb).verb_parsers[verb]
    return {o for action in parser._actions for o in action.option_strings}


# -- one flag generator -------------------------------------------------------------------------
def test_run_help_lists_every_stage_flag(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--sequential", "--mode", "--reconstruction-tokens", "--no-cost-curves", "--text-field",
                 "--task-path", "--num-fewshot", "--max-shard-size", "--apply-mode", "--checkpoint-every",
                 "--hidden-states", "--search-passes", "--eval-tokens", "--calib-similarity"):
        assert flag in text, flag


def test_each_verb_flags_are_its_stage_config_fields():
    from grape.calibration.calibrate import CalibrationConfig
    from grape.cli.commands import run
    from grape.evaluation.perplexity import EvalConfig
    from grape.flags import flag_names
    from grape.pruning.apply import ApplyConfig
    from grape.searching.config import SearchConfig
    from solvers.spec import PROBLEM_FLAGS

    stages = {"calibrate": CalibrationConfig, "apply": ApplyConfig, "eval": EvalConfig, "search": SearchConfig}
    for verb, cls in stages.items():
        missing = set(flag_names(cls).values()) - options(verb)
        assert not missing, (verb, missing)
    # and nothing else but the verb's inputs and outputs, and the short forms of a mode
    common = {"-h", "--help", "--out", "--overwrite", "--recipe", "--plugin", "--model"}
    own = {"calibrate": {"--tokenizer", "--data", "--sequential"},
           "apply": {"--plan", "--scores", "--dtype", "--no-tokenizer", "--skip-model-check", "--in-memory"}}
    for verb, extra in own.items():
        assert options(verb) - set(flag_names(stages[verb]).values()) == common | extra, verb
    problem = {"--" + name.replace("_", "-") for name in PROBLEM_FLAGS}
    for verb in ("solve", "search", "compare", "run"):
        assert problem <= options(verb), verb
    # grape run: every stage's flags, prefixed where two stages share a name, the shared ones once
    have = options("run")
    expected = {**flag_names(CalibrationConfig, run.CALIBRATION_SHARED, run.CALIBRATION_RENAMED),
                **{f"apply.{k}": v for k, v in flag_names(ApplyConfig, rename=run.APPLY_RENAMED).items()},
                **{f"eval.{k}": v for k, v in flag_names(EvalConfig, run.EVAL_SHARED, run.EVAL_RENAMED).items()},
                **{f"search.{k}": v for k, v in flag_names(SearchConfig).items()}}
    assert not set(expected.values()) - have, set(expected.values()) - have
    assert {"--seed", "--no-progress", "--device", "--dtype", "--criterion", "--normalize"} <= have


def test_run_flags_build_the_stage_configs(tmp_path):
    from grape.cli.commands.run import run_config

    parser = build_parser(only="run").verb_parsers["run"]
    args = parser.parse_args(["--model", "m", "--out", str(tmp_path), "--data", "x", "--samples", "4",
                              "--seq-len", "32", "--subsample", "16", "--eval-tokens", "0",
                              "--eval-seq-len", "16", "--sequential", "--no-cost-curves",
                              "--apply-mode", "in-memory", "--max-shard-size", "5MB", "--num-fewshot", "2",
                              "--calib-similarity", "router", "--seed", "3"])
    config = run_config(args)
    cal = config.calibration
    assert (cal.mode, cal.cost_curves, cal.similarity, cal.seed) == ("sequential", False, ("router",), 3)
    assert (config.apply.mode, config.apply.max_shard_size) == ("in-memory", "5MB")
    assert config.evaluation.max_tokens_per_domain is None and config.evaluation.num_fewshot == 2
    assert config.evaluation.seed == 3 and config.search.seed == 3


def test_library_functions_leave_the_environment_alone():
    import inspect

    from grape import api, pipeline
    from grape.calibration import stage as calibrate_stage
    from grape.pruning import stage as apply_stage

    for module in (api, apply_stage, calibrate_stage, pipeline):
        assert "os.environ" not in inspect.getsource(module), module.__name__


# -- the same rules whichever way a stage is called ---------------------------------------------
SMALL = ["--samples", "4", "--seq-len", "32", "--subsample", "32", "--eval-tokens", "64",
         "--eval-seq-len", "32", "--no-compare", "--baselines", "none", "--no-search", "--time-limit", "10",
         "--no-progress", "--device", "cpu", "--budget", "6"]


def _run(ws, out: Path, *extra: str) -> dict:
    assert main(["run", "--model", str(ws.model), "--data", str(ws.calibration), "--eval-data",
                 *map(str, ws.heldout), "--out", str(out), *SMALL, *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            found.update({key: handle.get_tensor(key) for key in handle.keys()})
    return found


def _same_scores(a, b) -> None:
    from solvers.scores import STAT_NAMES

    assert a.fingerprint() == b.fingerprint()
    for layer in a.layers:
        for name in STAT_NAMES:
            np.testing.assert_allclose(a.layers[layer].stats[name], b.layers[layer].stats[name],
                                       rtol=1e-5, atol=1e-6)


def test_grape_run_sequential_equals_whole_and_streams_like_in_memory(ws, tmp_path, capsys):
    from solvers.scores import Scores

    whole = _run(ws, tmp_path / "whole", "--mode", "whole", "--apply-mode", "streaming")
    sequential = _run(ws, tmp_path / "seq", "--sequential", "--apply-mode", "in-memory")
    out = capsys.readouterr().out
    assert "sequential mode" in out and "streamed shard by shard" in out
    _same_scores(Scores.load(tmp_path / "whole" / "scores.npz"), Scores.load(tmp_path / "seq" / "scores.npz"))
    assert whole["plans"] == sequential["plans"]
    streamed, loaded = _tensors(tmp_path / "whole" / "checkpoint"), _tensors(tmp_path / "seq" / "checkpoint")
    assert streamed.keys() == loaded.keys()
    assert all(torch.equal(streamed[k], loaded[k]) for k in streamed)


def test_the_api_calibrates_sequentially_and_applies_by_streaming(ws, tmp_path, capsys):
    import grape

    config = grape.CalibrationConfig(samples=4, seq_len=32, subsample=32, progress=False)
    whole = grape.calibrate(ws.model, [str(ws.calibration)], config)
    sequential = grape.calibrate(ws.model, [str(ws.calibration)],
                                 grape.CalibrationConfig(**{**config.__dict__, "mode": "sequential"}),
                                 out=tmp_path / "scores.npz")
    assert "sequential mode" in capsys.readouterr().out and (tmp_path / "scores.npz").is_file()
    _same_scores(whole, sequential)
    plan = grape.solve(sequential, grape.SolveConfig(budget=6))
    plan.save(tmp_path / "plan.json")
    streamed = grape.apply(ws.model, tmp_path / "plan.json", grape.ApplyConfig(mode="streaming"),
                           out=tmp_path / "streamed")
    loaded = grape.apply(ws.model, plan, grape.ApplyConfig(mode="in-memory"), out=tmp_path / "loaded")
    a, b = _tensors(streamed), _tensors(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(grape.UserError, match="model directory"):
        grape.calibrate(grape.load(ws.model), torch.zeros(1, 8, dtype=torch.long),
                        grape.CalibrationConfig(mode="sequential"))
