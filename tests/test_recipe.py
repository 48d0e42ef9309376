"""Recipes: YAML/TOML/JSON files of options; precedence flag > recipe section > recipe top level >
default; values checked like flags; the resolved configuration written after a run is itself a
recipe that repeats the run."""

from __future__ import annotations

import json

import pytest

from grape import recipe
from grape.cli.main import build_parser, main
from grape.recipe import RecipeError, load_recipe


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def parse(parser, argv, tmp_path, text: str | None = None, suffix: str = ".yaml"):
    """Parse argv with `text` as the recipe (a fresh parser each time: recipes change defaults)."""
    parser = build_parser()
    if text is not None:
        path = tmp_path / f"recipe{suffix}"
        path.write_text(text)
        argv = [*argv, "--recipe", str(path)]
    recipe.prepare(argv, parser.verb_parsers)
    return parser.parse_args(argv)


SCORES = ["compare", "--scores", "s.npz", "--out", "o"]


def test_default_recipe_section_and_flag_precedence(parser, tmp_path):
    assert parse(parser, SCORES, tmp_path).budget == "0.25"  # built-in default
    top = "budget: 0.4\ntime_limit: 3\n"
    assert parse(parser, SCORES, tmp_path, top).budget == "0.4"  # recipe top level
    both = top + "compare:\n  budget: 0.3\n"
    args = parse(parser, SCORES, tmp_path, both)
    assert args.budget == "0.3" and args.time_limit == 3.0  # the verb's section wins over top level
    args = parse(parser, [*SCORES, "--budget", "0.1"], tmp_path, both)
    assert args.budget == "0.1" and args.time_limit == 3.0  # an explicit flag wins over everything


def test_toml_and_json_recipes_read_alike(tmp_path):
    (tmp_path / "r.toml").write_text('budget = "0.5"\n[solve]\nobjective = "coverage"\nuniform = true\n')
    (tmp_path / "r.json").write_text(json.dumps({"budget": "0.5", "solve": {"objective": "coverage",
                                                                               "uniform": True}}))
    (tmp_path / "r.yml").write_text("budget: '0.5'\nsolve: {objective: coverage, uniform: true}\n")
    loaded = [load_recipe(tmp_path / name) for name in ("r.toml", "r.json", "r.yml")]
    assert loaded[0] == loaded[1] == loaded[2]


def test_recipe_supplies_required_options_and_switches(parser, tmp_path):
    args = parse(parser, ["compare"], tmp_path,
                 "scores: a.npz\ncompare:\n  out: dir\n  uniform: true\n  no-plans: true\n")
    # relative paths are read from the recipe's folder, not the current directory
    assert args.scores == tmp_path / "a.npz" and args.out == tmp_path / "dir"
    assert args.uniform is True and args.no_plans is True
    args = parse(parser, ["compare"], tmp_path, "scores: a.npz\nout: dir\nuniform: false\n")
    assert args.uniform is False


def test_lists_and_types_convert_like_flags(parser, tmp_path):
    args = parse(parser, ["run"], tmp_path,
                 "run:\n  data: one.jsonl\n  calib_similarity: [cka, router]\n  samples: 8\n  "
                 "compare_time_limit: 2\n")
    assert args.data == [str(tmp_path / "one.jsonl")]  # a single value for a many-valued option
    assert args.calib_similarity == "cka,router"  # a list for a comma-separated option
    assert args.samples == 8 and args.compare_time_limit == 2.0
    # keys work with dashes or underscores
    assert parse(parser, ["run"], tmp_path, "run:\n  eval-tokens: 64\n").eval_tokens == 64


@pytest.mark.parametrize("text, needle", [
    ("run:\n  method: fold\n", "not one of"),  # choices are checked
    ("run:\n  samples: many\n", "cannot read 'many'"),  # types are checked
    ("run:\n  uniform: 'yes'\n", "true or false"),  # switches take booleans
    ("run:\n  sampels: 8\n", "'sampels' is not an option of `grape run`"),  # typo in a section
    ("budgett: 0.5\n", "'budgett' is not an option of any grape verb"),  # typo at the top level
    ("run: 3\n", "must be a mapping"),
    ("- a\n- b\n", "must hold a mapping"),
    ("run: [unclosed\n", "not valid YAML"),
])
def test_bad_recipes_are_user_errors(parser, tmp_path, text, needle):
    with pytest.raises(RecipeError, match=None) as info:
        parse(parser, ["run"], tmp_path, text)
    assert needle in str(info.value)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "r.ini").write_text("[x]\n")
    with pytest.raises(RecipeError, match="unknown suffix"):
        load_recipe(tmp_path / "r.ini")
    (tmp_path / "bad.toml").write_text("budget = \n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(tmp_path / "bad.toml")


def test_a_key_for_another_verb_is_ignored(parser, tmp_path):
    # `samples` is an option of calibrate and run, not of compare: the top level may hold it
    args = parse(parser, SCORES, tmp_path, "samples: 8\nbudget: 0.3\n")
    assert args.budget == "0.3" and not hasattr(args, "samples")


def test_bad_recipe_on_the_command_line_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("compare:\n  budget: 0.3\n  colour: red\n")
    assert main(["compare", "--scores", "s.npz", "--out", str(tmp_path), "--recipe", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'colour' is not an option of `grape compare`" in err[0]


def test_resolved_recipe_repeats_the_run(tmp_path, capsys):
    from solvers.synth import custom_shape, synth_scores

    scores = tmp_path / "s.npz"
    synth_scores(custom_shape(3, 8), seed=1).save(scores)
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["compare", "--scores", str(scores), "--out", str(first), "--budget", "6",
                 "--objectives", "additive,curves", "--solvers", "exact,uniform", "--uniform",
                 "--time-limit", "5"]) == 0
    resolved = first / "compare.recipe.yaml"
    text = resolved.read_text()
    assert text.startswith("# resolved configuration of `grape compare`")
    assert "uniform: true" in text and "budget: '6'" in text
    # the resolved file is a recipe: the same run, only the output moved by a flag
    assert main(["compare", "--recipe", str(resolved), "--out", str(second)]) == 0
    rows = [json.loads((d / "compare.json").read_text())["rows"] for d in (first, second)]
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in rs] for rs in rows]
    assert strip[0] == strip[1] and len(strip[0]) == 4
    assert all(r["uniform"] for r in rows[0])


def test_command_line_recipe_may_hold_options_of_other_verbs(tmp_path, capsys):
    from solvers.synth import custom_shape, synth_scores

    synth_scores(custom_shape(2, 8)).save(tmp_path / "s.npz")
    path = tmp_path / "r.yaml"
    # `model` and `samples` belong to other verbs; main() builds only compare's flags at first
    path.write_text(f"model: m\nsamples: 8\nscores: {tmp_path / 's.npz'}\n"
                    "compare:\n  solvers: exact\n  objectives: additive\n  budget: 4\n")
    assert main(["compare", "--recipe", str(path), "--out", str(tmp_path / "o")]) == 0
    rows = json.loads((tmp_path / "o" / "compare.json").read_text())["rows"]
    assert [(r["objective"], r["solver"], r["status"]) for r in rows] == [("additive", "exact", "optimal")]
    path.write_text("modle: m\n")
    assert main(["compare", "--recipe", str(path), "--scores", "s", "--out", "o"]) == 2
    assert "'modle' is not an option of any grape verb" in capsys.readouterr().err


def test_recipe_paths_are_relative_to_the_recipe_and_hub_ids_stay(parser, tmp_path):
    (tmp_path / "local-model").mkdir()
    args = parse(parser, ["run"], tmp_path, "run:\n  model: Qwen/Qwen3-30B-A3B\n  eval_data: [prose=p.jsonl, "
                 "/abs/c.jsonl]\n  tokenizer: local-model\n  plugin: [my_plugin]\n")
    assert str(args.model) == "Qwen/Qwen3-30B-A3B"  # owner/name not found there: a Hub id
    assert args.tokenizer == tmp_path / "local-model"
    assert args.eval_data == [f"prose={tmp_path / 'p.jsonl'}", "/abs/c.jsonl"]
    assert args.plugin == ["my_plugin"]  # a module name, not a path


@pytest.mark.parametrize("verb", ["run", "search"])
def test_search_data_in_a_recipe_is_relative_to_the_recipe(parser, tmp_path, verb):
    argv = [verb, "--model", "/abs/m", "--scores", "/abs/s.npz", "--out", "/abs/o"]
    args = parse(parser, argv, tmp_path, f"{verb}:\n  search_data: [s.jsonl, /abs/t.jsonl]\n")
    assert args.search_data == [str(tmp_path / "s.jsonl"), "/abs/t.jsonl"]
