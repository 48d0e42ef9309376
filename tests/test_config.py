"""One problem configuration for every verb, and plugins.

* `grape solve`, `grape compare` and `grape run` accept exactly the same problem flags (generated
  from grape.cli.problem.SolveConfig) and refuse bad values with the same message;
* the plugin example in docs/extending.md, written to a temporary directory, works through
  `grape solve --plugin`, `grape compare` and `grape run`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from cli_workspace import RUN_FLAGS, make_workspace

from grape.cli.main import build_parser, main
from grape.cli.problem import PROBLEM_FLAGS, SolveConfig, parse_constraint_spec
from solvers.errors import UserError
from solvers.plan import Plan

REPO = Path(__file__).resolve().parents[1]
VERBS = ("solve", "compare", "run")


def _problem_options(verb: str) -> dict[str, tuple]:
    parser = build_parser().verb_parsers[verb]
    return {a.dest: (tuple(a.option_strings), a.type, a.choices, a.nargs, type(a).__name__)
            for a in parser._actions if a.dest in PROBLEM_FLAGS}


def test_the_three_verbs_accept_the_same_problem_flags():
    solve = _problem_options("solve")
    assert set(solve) == set(PROBLEM_FLAGS)
    for verb in ("compare", "run"):
        assert _problem_options(verb) == solve, verb


@pytest.mark.parametrize("flags, phrase", [
    (["--min-kept", "-3"], "must not be negative"),
    (["--min-kept", "abc"], "--min-kept 'abc'"),
    (["--budget", "nan"], "not a finite number"),
    (["--budget", "1.5"], "out of range"),
    (["--similarity-top-m", "0"], "--similarity-top-m"),
    (["--objective", "nan*additive"], "finite positive"),
    (["--memory-cap", "10GB"], "exactly one placement"),
    (["--pipeline", "2"], "give --memory-cap"),
    (["--constraint", "nope"], "unknown constraint"),
    (["--time-limit", "0"], "--time-limit"),
])
def test_the_three_verbs_refuse_bad_problem_flags_alike(tmp_path, capsys, flags, phrase):
    """Validation happens before any file is read: a missing scores file or model is not
    reached, and the message after 'error:' is the same for every verb."""
    messages = {}
    for verb in VERBS:
        target = ["--scores", str(tmp_path / "missing.npz")] if verb != "run" else \
            ["--scores", str(tmp_path / "missing.npz"), "--model", str(REPO / "benchmarks" / "zoo" /
                                                                      "models" / "qwen3moe-32x4")]
        out = ["--out", str(tmp_path / f"{verb}.out")]
        capsys.readouterr()
        assert main([verb, *target, *out, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and phrase in err, (verb, err)
        messages[verb] = err.split("error: ", 1)[1]
    assert len(set(messages.values())) == 1, messages


def test_constraint_specs_build_registered_constraints():
    assert parse_constraint_spec("min_kept:count=3").count == 3
    assert parse_constraint_spec('{"name": "multiple_of", "g": 4}').g == 4
    assert parse_constraint_spec("uniform").name == "uniform"
    # a spec recorded in a plan (Constraint.to_json) is read back the way the plan reads it,
    # including constraints whose spec is not their constructor's arguments
    from solvers.constraints import MemoryCap

    cap = MemoryCap.pipeline([0, 1, 2, 3], 2, 1e9)
    assert parse_constraint_spec(json.dumps(cap.to_json())) == cap
    with pytest.raises(UserError, match="has no setting 'size'"):
        parse_constraint_spec("min_kept:size=3")
    with pytest.raises(UserError, match="key=value"):
        parse_constraint_spec("min_kept:3")


def test_solve_config_round_trips_through_json():
    config = SolveConfig(budget=0.5, objective="redundancy+0.5*additive", uniform=True,
                         constraint=("min_kept:count=2",), routing_groups="off")
    data = json.loads(json.dumps(config.to_json()))
    data.pop("constraints")
    again = SolveConfig(**{**data, "constraint": tuple(data["constraint"])})
    assert again.to_json() == config.to_json()


# -- the documented plugin ----------------------------------------------------------------------
def _documented_plugin() -> str:
    text = (REPO / "docs" / "extending.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(# my_grape_plugin\.py\n.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "docs/extending.md must hold the plugin example once"
    return blocks[0]


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    (root / "my_grape_plugin.py").write_text(_documented_plugin(), encoding="utf-8")
    sys.path.insert(0, str(root))
    yield root
    # leave the registries as they were: later tests list every registered name
    from solvers.constraints import CONSTRAINTS
    from solvers.objectives import TERMS

    sys.path.remove(str(root))
    CONSTRAINTS.pop("max_kept", None)
    TERMS.pop("shared_load", None)
    sys.modules.pop("my_grape_plugin", None)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("plugin_ws"))


@pytest.fixture(scope="module")
def scores(ws):
    path = ws.root / "scores.npz"
    assert main(["calibrate", "--model", str(ws.model), "--data", str(ws.calibration), "--out",
                 str(path), "--samples", "4", "--seq-len", "32", "--subsample", "32",
                 "--no-progress"]) == 0
    return path


PLUGIN = ["--plugin", "my_grape_plugin", "--objective", "shared_load", "--constraint", "max_kept:count=5"]


def test_the_documented_plugin_works_in_grape_solve(plugin_dir, scores, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["solve", "--scores", str(scores), "--budget", "9", "--out", str(out), *PLUGIN]) == 0
    plan = Plan.load(out)
    assert plan.kept_counts() == {0: 5, 1: 5, 2: 5} and plan.status == "optimal"
    recorded = json.dumps(plan.provenance)
    assert "shared_load" in recorded and "max_kept" in recorded


def test_the_documented_plugin_works_in_grape_compare(plugin_dir, scores, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--scores", str(scores), "--budget", "9", "--solvers", "exact,greedy",
                 "--out", str(out), *PLUGIN]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert {r["solver"] for r in rows if r.get("value") is not None} == {"exact", "greedy"}
    assert all(r["kept_max"] <= 5 for r in rows if r.get("kept_max") is not None)


def test_compare_objectives_all_takes_the_registry_plugins_included(plugin_dir, scores, tmp_path):
    from solvers.registry import objective_names

    out = tmp_path / "cmp-all"
    assert main(["compare", "--scores", str(scores), "--budget", "9", "--solvers", "greedy",
                 "--objectives", "all", "--plugin", "my_grape_plugin", "--out", str(out)]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert "shared_load" in objective_names()
    assert [r["objective"] for r in rows] == objective_names()  # every registered term, in order


def test_the_documented_plugin_works_in_grape_run(plugin_dir, ws, scores, tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--model", str(ws.model), "--scores", str(scores), "--eval-data",
            *map(str, ws.heldout), "--out", str(out), "--budget", "9", "--baselines", "none",
            "--no-compare", *RUN_FLAGS, *PLUGIN]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == "shared_load"
    assert max(summary["plans"]["exact"]["kept_per_layer"].values()) <= 5
    assert "search" not in summary["plans"]  # reused scores and no --data: nothing to hold out


# -- layering -----------------------------------------------------------------------------------
def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]


def test_the_library_never_imports_the_command_line():
    import ast

    offenders = []
    for path in _python_files("grape", "solvers"):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("grape/cli/commands/") or rel in ("grape/cli/main.py", "grape/__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{rel}: {n}" for n in names if n.startswith(("grape.cli.commands", "grape.cli.main"))]
    assert not offenders, offenders


def test_no_product_module_refers_to_the_benchmarks():
    hits = [p.relative_to(REPO).as_posix() for p in _python_files("grape", "solvers")
            if "benchmarks" in p.read_text(encoding="utf-8")]
    assert not hits, hits


def test_solvers_never_import_torch_or_grape():
    import ast

    for path in _python_files("solvers"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] in ("torch", "grape", "transformers")], path


def test_the_defaults_table_matches_the_flags_and_the_api():
    """docs/index.md "Defaults": every `code` cell equals the parser's (or the API's) default."""
    import dataclasses

    from grape.pruning.apply import ApplyConfig
    from grape.calibration.calibrate import CalibrationConfig
    from grape.evaluation.perplexity import EvalConfig

    text = (REPO / "docs" / "index.md").read_text(encoding="utf-8")
    section = text.split("## Defaults, in one table", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| `--") or line.startswith("| device")
            or line.startswith("| predicted")]
    verbs = ("solve", "compare", "run", "calibrate", "eval", "apply")
    parsers = build_parser().verb_parsers
    api = {**{f.name: f.default for f in dataclasses.fields(SolveConfig)},
           **{f"cal.{f.name}": f.default for f in dataclasses.fields(CalibrationConfig)},
           **{f"eval.{f.name}": f.default for f in dataclasses.fields(EvalConfig)},
           "method": ApplyConfig().method, "dtype": "auto", "device": "auto"}
    checked = 0
    for row in rows:
        flag = row[0].strip("`")
        for verb, cell in zip(verbs, row[1:7]):
            for value, named in re.findall(r"`([^`]+)`(?: \(`(--[a-z-]+)`\))?", cell):
                option = named or (flag if flag.startswith("--") else None)
                defaults = {o: a.default for a in parsers[verb]._actions for o in a.option_strings}
                assert option in defaults, (verb, option)
                assert str(defaults[option]) == value, (verb, option, defaults[option], value)
                checked += 1
        for value, where in re.findall(r"`([^`]+)` \(([A-Za-z. ,]+)\)", row[7]):
            name = flag.lstrip("-").replace("-", "_")
            keys = {"SolveConfig": [name], "CalibrationConfig": [f"cal.{name}"], "EvalConfig":
                    [f"eval.{name}", "eval.max_tokens_per_domain"], "ApplyConfig": [name],
                    "grape.load": [name]}
            candidates = [k for w in where.replace(" ", "").split(",") for k in keys[w] if k in api]
            assert any(str(api[k]) == value for k in candidates), (flag, value, where)
            checked += 1
    assert checked >= 30
