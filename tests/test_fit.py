"""Fit to hardware (issue 13): per-device cap lists, --fit SPEC and --kv-reserve, the budget
`fit`, the plan's per-device placement table, its re-check and the infeasibility message."""

import json

import pytest

from grape.api import build_problem
from grape.cli import main
from grape.config import SolveConfig
from solvers import InfeasibleError, Plan
from solvers.check import check_plan
from solvers.constraints import MemoryCap, parse_caps
from solvers.constraints.fit import fit_caps, parse_fit, parse_reserve
from solvers.errors import UserError
from solvers.solve import solve
from solvers.synth import custom_shape, synth_scores

PER_EXPERT = 3 * 64 * 32 * 2  # bf16 bytes of one expert of custom_shape


@pytest.fixture(scope="module")
def scores():
    return synth_scores(custom_shape(8, 16, top_k=2), seed=3, similarity=False)


@pytest.fixture(scope="module")
def scores_path(tmp_path_factory, scores):
    path = tmp_path_factory.mktemp("fit") / "s.npz"
    scores.save(path)
    return path


def test_caps_parse_as_one_size_or_one_per_device():
    assert parse_caps("80GB") == 80e9
    assert parse_caps("80GB,80GB, 40GB") == [80e9, 80e9, 40e9]
    with pytest.raises(UserError, match="empty entry"):
        parse_caps("80GB,,40GB")
    with pytest.raises(UserError, match="lists 3 caps but --pipeline 2"):
        MemoryCap.pipeline([0, 1, 2, 3], 2, [1, 2, 3])
    cap = MemoryCap.pipeline([0, 1, 2, 3], 3, [1, 2, 3])
    assert cap.caps == {"0": 1.0, "1": 2.0, "2": 3.0}


def test_placements_larger_than_the_model_are_refused():
    with pytest.raises(UserError, match="more pipeline devices than the model's 4 MoE layers"):
        MemoryCap.pipeline([0, 1, 2, 3], 5, 1e9)
    with pytest.raises(UserError, match="more expert-parallel ranks than the 8 experts"):
        MemoryCap.expert_parallel({0: 8, 1: 16}, 9, 1e9)


def test_fit_specs():
    assert parse_fit("2x80GB") == (2, 80e9)
    assert parse_fit("8xH100") == (8, 80e9)
    assert parse_fit("4xh200") == (4, 141e9)
    assert parse_fit("4x141GB") == (4, 141e9)
    assert parse_fit("1xMI300X") == (1, 192e9)
    assert parse_reserve("20%") == pytest.approx(0.2) and parse_reserve("0.1") == 0.1
    assert parse_reserve(None) == 0.0
    assert fit_caps("4x80GB", "20%") == (4, 64e9)
    for bad, words in (("4xFOO", "unknown GPU 'FOO'"), ("0x80GB", "at least 1"), ("80GB", "COUNTx")):
        with pytest.raises(UserError, match=words):
            parse_fit(bad)
    for bad in ("100%", "-1%", "abc"):
        with pytest.raises(UserError, match="--kv-reserve"):
            parse_reserve(bad)


@pytest.mark.parametrize("kwargs, words", [
    ({"kv_reserve": "20%"}, "only applies to --fit"),
    ({"fit": "2x80GB", "memory_cap": "80GB"}, "not both"),
    ({"fit": "2x80GB", "pipeline": 3}, "places 2 devices but --pipeline says 3"),
    ({"fit": "2xNOPE"}, "unknown GPU"),
])
def test_fit_flags_are_validated_before_any_file(kwargs, words):
    with pytest.raises(UserError, match=words):
        SolveConfig(**kwargs)


def test_the_budget_defaults_to_fit_with_fit_only():
    assert SolveConfig().budget == 0.25
    assert SolveConfig(fit="2x80GB").budget == "fit"
    assert SolveConfig(fit="2x80GB", budget=0.5).budget == 0.5


def _plan(scores, **config):
    problem = build_problem(scores, SolveConfig(**config))
    return problem, solve(problem, "exact", time_limit=30)


def test_fit_removes_the_fewest_experts_and_records_the_placement(scores):
    cap = 40 * PER_EXPERT  # 4 layers x 16 experts = 64 per device; 40 fit
    problem, plan = _plan(scores, fit=f"2x{cap}", objective="additive")
    assert plan.num_removed == 2 * (64 - 40)
    assert [row["device"] for row in plan.placement] == [0, 1]
    assert [row["layers"] for row in plan.placement] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(row["bytes"] == 40 * PER_EXPERT and row["cap"] == cap for row in plan.placement)
    with pytest.raises(InfeasibleError, match=r"Remove at least 48 experts \(--budget 48\)"):
        _plan(scores, fit=f"2x{cap}", budget=47)
    # the reserve lowers every cap: 40 experts' bytes less 25% hold 30 experts per device
    _, reserved = _plan(scores, fit=f"2x{cap}", kv_reserve="25%")
    assert reserved.num_removed == 2 * (64 - 30)


def test_placement_round_trips_and_the_checker_recomputes_it(scores, tmp_path):
    problem, plan = _plan(scores, budget=0.5, memory_cap=f"{40 * PER_EXPERT},{40 * PER_EXPERT}",
                          pipeline=2)
    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert {"kept", "removed", "merge_map", "status", "objective", "provenance"} <= set(data)
    assert data["placement"] == plan.placement
    again = Plan.load(path)
    assert again.placement == plan.placement and check_plan(again, problem) == []
    data["placement"][0]["bytes"] -= 1  # a table that does not match the scores
    assert any("placement" in p for p in check_plan(Plan.from_json(data), problem))
    without = _plan(scores, budget=0.5)[1]
    assert without.placement == [] and "placement" not in without.to_json()


def test_uneven_caps_and_the_binding_device(scores):
    caps = f"{60 * PER_EXPERT},{20 * PER_EXPERT}"
    _, plan = _plan(scores, fit=None, memory_cap=caps, pipeline=2, budget="fit")
    assert [row["bytes"] for row in plan.placement] == [60 * PER_EXPERT, 20 * PER_EXPERT]
    with pytest.raises(InfeasibleError) as err:
        _plan(scores, memory_cap=caps, pipeline=2, budget=0.25)
    text = str(err.value)
    assert "the budget keeps 96 experts, but the 2 devices hold at most 80" in text
    assert "device 1 (layers 4-7) would keep 48" in text and "Remove at least 48" in text


def test_budget_fit_needs_a_pipeline_cap(scores):
    with pytest.raises(UserError, match="budget fit needs a pipeline memory cap"):
        _plan(scores, budget="fit")


def test_cli_prints_the_device_table(scores_path, capsys):
    assert main(["solve", "--scores", str(scores_path), "--fit", f"2x{40 * PER_EXPERT}B"]) == 0
    out = capsys.readouterr().out
    assert "fit: the fewest removals" in out and "per device" in out
    assert "0-3 (4)" in out and "4-7 (4)" in out and "100.0%" in out
    for argv, words in (
        (["--memory-cap", "1GB", "--pipeline", "9"], "more pipeline devices than the model's 8"),
        (["--memory-cap", "1GB", "--expert-parallel", "17"], "more expert-parallel ranks"),
        (["--memory-cap", "1GB,1GB", "--pipeline", "3"], "lists 2 caps but --pipeline 3"),
    ):
        assert main(["solve", "--scores", str(scores_path), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and err.count("\n") == 0 and "Traceback" not in err


def test_the_recipe_records_the_budget_the_run_used(scores_path, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["solve", "--scores", str(scores_path), "--fit", f"2x{40 * PER_EXPERT}B",
                 "--out", str(out), "--quiet"]) == 0
    recipe = tmp_path / "plan.recipe.yaml"
    assert "budget: fit" in recipe.read_text()
    assert main(["solve", "--recipe", str(recipe), "--out", str(tmp_path / "again.json"), "--quiet"]) == 0
    assert Plan.load(tmp_path / "again.json").kept == Plan.load(out).kept
    plain = tmp_path / "plain.json"
    assert main(["solve", "--scores", str(scores_path), "--out", str(plain), "--quiet"]) == 0
    assert "budget: '0.25'" in (tmp_path / "plain.recipe.yaml").read_text()


def test_inspect_prints_the_device_table(scores_path, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["solve", "--scores", str(scores_path), "--fit", f"2x{40 * PER_EXPERT}B",
                 "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "per device" in text and "0-3 (4)" in text and "4-7 (4)" in text
