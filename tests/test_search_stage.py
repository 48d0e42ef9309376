"""The search as a stage: `grape search` reproduces the plan `grape run` chose from the same
inputs, `grape.search` is the same stage in Python, and candidates carry typed roles that the
"never worse than uniform" rule reads (never their display names)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_workspace import RUN_FLAGS, make_workspace

import grape
from grape.cli.main import main
from grape.searching.config import Candidate, Role, SearchConfig
from solvers.errors import UserError
from solvers.plan import Plan
from solvers.spec import SolveConfig

# the search settings both verbs get (small: seconds on the tiny model); everything else default
SEARCH_FLAGS = ["--search-passes", "14", "--search-tokens", "128", "--confirm-tokens", "256",
                "--budget", "0.5", "--time-limit", "10", "--no-progress"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("search_stage"))
    scores = ws.root / "scores.npz"
    assert main(["calibrate", "--model", str(ws.model), "--data", str(ws.calibration), "--out", str(scores),
                 "--samples", "4", "--seq-len", "32", "--subsample", "32", "--no-progress",
                 "--device-map", "cpu"]) == 0
    return ws


def _kept(path) -> dict:
    return json.loads(path.read_text())["kept"]


def test_grape_search_reproduces_the_plan_grape_run_chose(ws, tmp_path):
    scores, data = ws.root / "scores.npz", [str(p) for p in ws.heldout]
    # SEARCH_FLAGS come last: they override RUN_FLAGS' search sizes (the last flag given wins)
    assert main(["run", "--model", str(ws.model), "--scores", str(scores), "--eval-data", *data,
                 "--search-data", *data, "--out", str(tmp_path / "run"), "--baselines", "none",
                 "--no-compare", "--no-save", *RUN_FLAGS, *SEARCH_FLAGS]) == 0
    assert main(["search", "--model", str(ws.model), "--scores", str(scores), "--search-data", *data,
                 "--out", str(tmp_path / "search"), "--device", "cpu", *SEARCH_FLAGS]) == 0
    ran, searched = (json.loads((tmp_path / d / "search.json").read_text()) for d in ("run", "search"))
    assert _kept(tmp_path / "search" / "plan.json") == _kept(tmp_path / "run" / "plan.json")
    assert searched["chosen"] == ran["chosen"] and searched["passes"] == ran["passes"]
    assert [c["nll"] for c in searched["candidates"]] == [c["nll"] for c in ran["candidates"]]
    assert {c["role"] for c in searched["candidates"]} >= {"uniform seed", "solver plan"}
    assert json.loads((tmp_path / "search" / "plan.json").read_text())["provenance"]["search"]["role"]


def test_grape_search_starts_from_a_given_plan_and_takes_its_budget(ws, tmp_path, capsys):
    scores, data = ws.root / "scores.npz", [str(p) for p in ws.heldout]
    plan = tmp_path / "uniform.json"
    assert main(["solve", "--scores", str(scores), "--budget", "6", "--solver", "uniform",
                 "--out", str(plan)]) == 0
    out = tmp_path / "from_plan"
    assert main(["search", "--model", str(ws.model), "--scores", str(scores), "--plan", str(plan),
                 "--search-data", *data, "--out", str(out), "--search-passes", "6", "--search-tokens", "128",
                 "--no-search-confirm", "--no-progress", "--device", "cpu"]) == 0
    found = json.loads((out / "search.json").read_text())
    first = found["candidates"][0]
    assert (first["name"], first["role"]) == ("given plan", "solver plan")
    assert sum(len(v) for v in json.loads((out / "plan.json").read_text())["removed"].values()) == 6
    capsys.readouterr()
    assert main(["search", "--model", str(ws.model), "--scores", str(scores), "--plan", str(plan),
                 "--budget", "2", "--search-data", *data, "--out", str(tmp_path / "bad"),
                 "--no-progress", "--device", "cpu"]) == 2
    assert "does not meet the problem" in capsys.readouterr().err


def test_the_python_function_is_the_same_stage(ws, tmp_path):
    scores = grape.load_scores(ws.root / "scores.npz")
    config = SearchConfig(max_passes=6, tokens=128, confirm_tokens=256, progress=False)
    found = grape.search(ws.model, scores, [str(p) for p in ws.heldout], SolveConfig(budget=0.5, time_limit=10),
                         config, out=tmp_path / "api")
    assert found.tokens_per_pass == 2 * 2 * 32  # 128 tokens: 2 windows per file of the calibration's 32
    # the search and its confirmation measured different documents
    held = found.held_out
    assert {d["sha256"] for d in held["search"]["by_document"]}.isdisjoint(
        d["sha256"] for d in held["confirmation"]["by_document"])
    assert found.passes <= 6 and found.confirmed and (tmp_path / "api" / "search.json").is_file()
    assert _kept(tmp_path / "api" / "plan.json") == {str(k): v for k, v in found.best.plan.kept.items()}


def test_the_uniform_floor_reads_roles_not_names():
    from grape.searching.algorithm import _choose_seed

    plan = Plan(kept={0: [0]}, removed={0: [1]})
    base = np.array([1.0, 1.2, 0.8, 1.0])
    floor = Candidate("plain name", plan, 1.0, base, role=Role.UNIFORM)
    # lower than the floor but within noise, and named like a uniform seed: not one
    lookalike = Candidate("uniform lookalike", plan, 0.975, np.array([0.9, 1.3, 0.7, 1.0]), role=Role.MOVE)
    assert _choose_seed([lookalike, floor], SearchConfig(progress=False)) is floor
    clear = Candidate("switch", plan, 0.95, base - 0.05, role=Role.MOVE)
    assert _choose_seed([lookalike, floor, clear], SearchConfig(progress=False)) is clear


def test_search_settings_name_their_flags():
    with pytest.raises(UserError, match="--search-tokens"):
        SearchConfig(tokens=0)
    with pytest.raises(UserError, match="--confirm-tokens"):
        SearchConfig(confirm_tokens=-1)
    with pytest.raises(UserError, match="--held-out-share"):
        SearchConfig(held_out_share=0)
    with pytest.raises(UserError, match="--search-seq-len"):
        SearchConfig(seq_len=1)


def test_stability_recalibrates_on_each_half_and_reports_overlap(ws, tmp_path):
    from grape.searching.stability import overlap

    out = tmp_path / "stable"
    assert main(["run", "--model", str(ws.model), "--data", str(ws.calibration), "--eval-data",
                 *map(str, ws.heldout), "--out", str(out), "--baselines", "none", "--no-compare", "--no-save",
                 *RUN_FLAGS, "--samples", "8", "--budget", "0.5", "--stability"]) == 0
    record = json.loads((out / "search.json").read_text())["stability"]
    assert [h["rows"] for h in record["halves"]] == [4, 4]
    for half in record["halves"]:
        assert 0.0 <= half["overlap"] <= 1.0 and half["se"] >= 0.0
    a = Plan(kept={0: [0, 1], 1: [2, 3]}, removed={0: [2, 3], 1: [0, 1]})
    b = Plan(kept={0: [0, 2], 1: [2, 3]}, removed={0: [1, 3], 1: [0, 1]})
    assert overlap(a, a) == 1.0 and overlap(a, b) == 0.75
