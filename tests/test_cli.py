"""The `grape` command line end to end on tiny models: every verb in-process (grape.cli.main.main),
the main job and an error as subprocesses (`python -m grape`), complete --help, and every user
error exiting 2 with one line and no traceback."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_workspace import RUN_FLAGS, make_workspace

from grape.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _grape(*argv: str) -> str:
    """`python -m grape ARGV` in a fresh interpreter; returns stdout, asserts exit 0."""
    proc = subprocess.run([sys.executable, "-m", "grape", *map(str, argv)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"grape {argv[0]}: {proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def pipeline(ws):
    """calibrate -> solve -> apply -> eval through grape.cli.main.main, once for the module."""
    out = ws.root / "pipeline"
    scores, plan, pruned, evaluation = out / "scores.npz", out / "plan.json", out / "pruned", out / "eval"
    steps = [
        ["calibrate", "--model", str(ws.model), "--data", str(ws.calibration), "--out", str(scores),
         "--samples", "4", "--seq-len", "32", "--subsample", "32", "--no-progress", "--device-map", "cpu"],
        ["solve", "--scores", str(scores), "--budget", "0.25", "--objective", "redundancy",
         "--out", str(plan), "--time-limit", "10"],
        ["apply", "--model", str(ws.model), "--plan", str(plan), "--out", str(pruned)],
        ["eval", "--model", str(pruned), "--data", *map(str, ws.heldout), "--out", str(evaluation),
         "--seq-len", "32", "--max-tokens", "128", "--no-progress", "--device", "cpu"],
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    return {"scores": scores, "plan": plan, "pruned": pruned, "eval": evaluation}


def _one_line_error(capsys, argv: list[str]) -> str:
    """Run argv in-process; assert exit 2 with a single line on stderr and no traceback."""
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and "it/s]" not in line and "Loading weights" not in line]
    assert len(err) == 1, err
    assert "Traceback" not in err[0] and "error:" in err[0]
    return err[0]


# -- help ---------------------------------------------------------------------------------
def test_every_verb_is_registered_and_every_option_has_help():
    parser = build_parser()
    assert set(parser.verb_parsers) == {"calibrate", "solve", "search", "apply", "eval", "compare",
                                        "inspect", "synth", "run"}
    for verb, sub in parser.verb_parsers.items():
        assert sub.description, verb
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"grape {verb} {action.option_strings or action.dest}"
        assert any(a.dest == "recipe" for a in sub._actions), verb


@pytest.mark.parametrize("verb", ["run", "search", "compare", "inspect"])
def test_help_prints_and_exits_zero(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: grape {verb}" in text and "--recipe" in text


# -- every verb in-process ----------------------------------------------------------------
def test_pipeline_writes_every_artifact_and_its_resolved_recipe(pipeline):
    from grape.models.adapters.base import read_block
    from solvers.plan import Plan

    plan = Plan.load(pipeline["plan"])
    assert plan.num_removed == 6 and plan.solver == "exact"
    config = json.loads((pipeline["pruned"] / "config.json").read_text())
    per_layer = read_block(config)["experts_per_layer"] or {str(l): config["num_experts"] for l in plan.layers}
    assert {int(k): v for k, v in per_layer.items()} == plan.kept_counts()
    result = json.loads((pipeline["eval"] / "eval.json").read_text())
    assert set(result["perplexity"]["domains"]) == {"prose", "code"}
    # every verb leaves a recipe of what it ran beside its output
    for path in (pipeline["scores"].with_name("scores.recipe.yaml"),
                 pipeline["plan"].with_name("plan.recipe.yaml"),
                 pipeline["pruned"] / "apply.recipe.yaml", pipeline["eval"] / "eval.recipe.yaml"):
        assert path.is_file(), path


def test_inspect_detects_scores_plan_checkpoint_and_eval(pipeline, capsys):
    expected = {"scores": "scores file", "plan": "plan ", "pruned": "checkpoint ", "eval": "eval result"}
    for key, head in expected.items():
        path = pipeline[key] / "eval.json" if key == "eval" else pipeline[key]
        assert main(["inspect", str(path)]) == 0
        assert capsys.readouterr().out.startswith(head), key
    assert main(["inspect", str(pipeline["pruned"]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "checkpoint" and summary["pruned_by_grape"]
    assert summary["plan"]["removed"] == 6
    assert summary["needs_trust_remote_code"] == (not summary["uniform"])


def test_compare_and_synth(ws, pipeline, capsys):
    out = ws.root / "compare"
    assert main(["compare", "--scores", str(pipeline["scores"]), "--out", str(out), "--budget", "0.25",
                 "--objectives", "additive,redundancy", "--solvers", "exact,greedy,uniform",
                 "--time-limit", "5"]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [(r["objective"], r["solver"]) for r in rows] == [
        (o, s) for o in ("additive", "redundancy") for s in ("exact", "greedy", "uniform")]
    for objective in ("additive", "redundancy"):
        mine = {r["solver"]: r for r in rows if r["objective"] == objective}
        assert mine["exact"]["status"] == "optimal"
        # the proven optimum is never beaten
        assert mine["exact"]["value"] <= min(r["value"] for r in mine.values()) + 1e-9
    assert (out / "compare.png").stat().st_size > 1000 and (out / "plans" / "redundancy.exact.json").is_file()
    synth = ws.root / "synth.npz"
    assert main(["synth", "--shape", "mixtral-8x7b", "--out", str(synth)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(synth), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total_experts"] == 32 * 8
    assert "reap" in summary["criteria"] and "reconstruction" not in summary["criteria"]  # synthetic
    assert main(["inspect", str(pipeline["scores"]), "--json"]) == 0
    assert "reconstruction" in json.loads(capsys.readouterr().out)["criteria"]  # calibrated


def test_run_in_process_with_a_recipe(ws, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'model = "{ws.model}"\nbudget = "0.5"\n[run]\nobjective = "additive"\n'
                      f'data = ["{ws.calibration}"]\neval_data = {json.dumps([str(p) for p in ws.heldout])}\n'
                      'baselines = "none"\nno_compare = true\nno_save = true\n')
    out = tmp_path / "run"
    # the flag wins over the recipe's top-level budget
    assert main(["run", "--recipe", str(recipe), "--budget", "0.25", "--out", str(out), *RUN_FLAGS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budget"] == "0.25" and summary["objective"] == "additive"
    assert summary["plans"]["exact"]["removed"] == 6 and set(summary["plans"]) == {"exact", "search"}
    assert not (out / "checkpoint").exists()
    resolved = (out / "run.recipe.yaml").read_text()
    assert "budget: '0.25'" in resolved and "objective: additive" in resolved


@pytest.mark.slow
def test_every_verb_as_a_subprocess(ws, tmp_path):
    scores, plan, pruned = tmp_path / "scores.npz", tmp_path / "plan.json", tmp_path / "pruned"
    _grape("calibrate", "--model", ws.model, "--data", ws.calibration, "--out", scores, "--samples", "4",
           "--seq-len", "32", "--subsample", "32", "--no-progress", "--device-map", "cpu")
    assert "optimal" in _grape("solve", "--scores", scores, "--budget", "6", "--objective", "coverage",
                               "--out", plan)
    _grape("compare", "--scores", scores, "--budget", "6", "--solvers", "exact,uniform", "--out",
           tmp_path / "compare")
    _grape("apply", "--model", ws.model, "--plan", plan, "--method", "merge", "--scores", scores,
           "--out", pruned)
    _grape("eval", "--model", pruned, "--data", *ws.heldout, "--out", tmp_path / "eval", "--seq-len", "32",
           "--max-tokens", "64", "--no-progress", "--device", "cpu")
    _grape("synth", "--shape", "olmoe-1b-7b", "--out", tmp_path / "synth.npz", "--no-similarity")
    summary = json.loads(_grape("inspect", pruned, "--json"))
    assert summary["plan"]["removed"] == 6 and summary["provenance"]["method"] == "merge"
    assert json.loads(_grape("inspect", tmp_path / "synth.npz", "--json"))["total_experts"] == 16 * 64
    for path in (tmp_path / "scores.recipe.yaml", tmp_path / "plan.recipe.yaml", pruned / "apply.recipe.yaml",
                 tmp_path / "eval" / "eval.json", tmp_path / "compare" / "compare.md"):
        assert path.is_file(), path


def test_run_as_a_subprocess_writes_the_report(ws, tmp_path):
    out = tmp_path / "run"
    stdout = _grape("run", "--model", ws.model, "--data", ws.calibration, "--eval-data", *ws.heldout,
                    "--out", out, "--objective", "redundancy", "--solver", "exact", "--baselines", "uniform",
                    *RUN_FLAGS)
    # with the search, a checkpoint and baselines: eight stages
    assert "[8/8] writing the report" in stdout and "loss-verified allocation" in stdout
    report = (out / "report.md").read_text()
    for section in ("Held-out NLL before and after", "Experts kept per layer", "Solvers on these scores"):
        assert section in report
    for png in ("experts_per_layer.png", "nll_per_domain.png", "solvers.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    # the search's choice is applied; the solver's own plan and uniform are evaluated beside it
    assert set(summary["nll"]) == {"unpruned", "search", "exact", "uniform"}
    assert summary["plans"]["uniform"]["uniform"] is True
    assert summary["search"]["chosen"] in {c["name"] for c in summary["search"]["candidates"]}
    assert (out / "search.json").is_file()
    # the checkpoint reloads with the plan's per-layer counts
    from grape import load

    model = load(out / "checkpoint")
    from grape.models.adapters import get_adapter

    adapter = get_adapter(model)
    assert {l: adapter.num_experts(l) for l in adapter.moe_blocks()} == \
        {int(k): v for k, v in summary["plans"]["search"]["kept_per_layer"].items()}


# -- user errors ----------------------------------------------------------------------------
def test_bad_paths(ws, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert "does not exist" in _one_line_error(capsys, ["inspect", missing])
    assert "does not exist" in _one_line_error(capsys, ["run", "--model", missing, *RUN_FLAGS])
    assert "does not exist" in _one_line_error(capsys, ["compare", "--scores", missing, "--out", str(tmp_path)])
    assert "recipe" in _one_line_error(capsys, ["run", "--recipe", missing])


def test_unknown_architecture(ws, tmp_path, capsys):
    line = _one_line_error(capsys, ["run", "--model", str(ws.dense_model), "--data", str(ws.calibration),
                                    "--eval-data", *map(str, ws.heldout), "--out", str(tmp_path), *RUN_FLAGS])
    assert "'llama' is not supported" in line and "qwen3_moe" in line


@pytest.mark.parametrize("budget, needle", [("1.5", "out of range"), ("-3", "out of range"),
                                            ("1.0", "every expert"), ("24", "only 24")])
def test_budget_out_of_range(pipeline, tmp_path, capsys, budget, needle):
    line = _one_line_error(capsys, ["compare", "--scores", str(pipeline["scores"]), "--out",
                                    str(tmp_path), "--budget", budget])
    assert needle in line


def test_budget_out_of_range_fails_run_before_loading_the_model(ws, tmp_path, capsys):
    line = _one_line_error(capsys, ["run", "--model", str(ws.model), "--budget", "2.5", "--out",
                                    str(tmp_path), *RUN_FLAGS])
    assert "out of range" in line
    assert not (tmp_path / "scores.npz").exists()


def test_infeasible_budget(ws, pipeline, tmp_path, capsys):
    # every layer must keep its top_k = 2 of 8 experts: at most 18 of 24 can go
    line = _one_line_error(capsys, ["run", "--model", str(ws.model), "--scores", str(pipeline["scores"]),
                                    "--eval-data", *map(str, ws.heldout), "--budget", "0.9",
                                    "--out", str(tmp_path), *RUN_FLAGS])
    assert "per-layer minimum" in line and "keeps" in line


def test_scores_and_plans_from_another_model(ws, pipeline, tmp_path, capsys):
    line = _one_line_error(capsys, ["run", "--model", str(ws.other_model), "--scores", str(pipeline["scores"]),
                                    "--eval-data", *map(str, ws.heldout), "--out", str(tmp_path), *RUN_FLAGS])
    assert "different model" in line
    line = _one_line_error(capsys, ["apply", "--model", str(ws.other_model), "--plan", str(pipeline["plan"]),
                                    "--out", str(tmp_path / "pruned")])
    assert "different model" in line or "another model" in line


def test_user_error_as_a_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "grape", "inspect", str(tmp_path / "missing.npz")],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr


def test_readme_results_are_copied_from_benchmarks_results():
    import importlib.util

    spec = importlib.util.spec_from_file_location("update_readme", REPO / "benchmarks" / "update_readme.py")
    update_readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(update_readme)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = {m.group(2): m.group(3) for m in update_readme.MARKERS.finditer(readme)}
    assert {"solvers", "quality"} <= set(blocks)
    for name, block in blocks.items():  # every existing results file is quoted as it is now
        if (update_readme.RESULTS / f"{name}.md").is_file():
            assert block == update_readme.generated(name), \
                f"README results for {name} are stale: run python benchmarks/update_readme.py"
    text = "# T\n\nintro\n\n## Section A\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nprose\n"
    assert update_readme.tables(text) == "**Section A**\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
