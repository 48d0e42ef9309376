"""`grape run` makes the search's final choice again on repaired plans (grape.run_repair.judge_repaired):
the chosen plan and the best uniform finalists are repaired and measured on the confirmation
documents, one model copy at a time, and the search's rule decides on what the run would keep."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

import grape.pruning.repair as repair_module
import grape.pruning.repair_check as repair_check
from cli_workspace import make_workspace
from grape.cli.main import main as grape_main
from grape.pruning.apply import ApplyConfig
from grape.run_repair import RunRepair, judge_repaired
from grape.searching.config import Candidate, Role
from solvers.plan import Plan
from test_repair_check import repair_run_argv

GROUPS = np.repeat(np.arange(8), 2)  # 16 confirmation windows of 8 documents


def _plan(kept: list[int]) -> Plan:
    return Plan(kept={0: kept}, removed={0: [e for e in range(4) if e not in kept]}, solver="test")


def _setup(monkeypatch, plain: dict, repaired: dict, noise: float = 0.0):
    """Candidates named by their kept experts; the NLL each has plain / repaired on the windows."""
    rng = np.random.default_rng(0)
    wiggle = {name: noise * rng.standard_normal(16) for name in plain}
    state = {"loads": 0, "released": 0, "live": 0, "most": 0}

    class Model:
        def __init__(self):
            self.plan = None

    def load():
        state["loads"] += 1
        state["live"] += 1
        state["most"] = max(state["most"], state["live"])
        return Model()

    def release(model):
        state["released"] += 1
        state["live"] -= 1

    def nll(model, ids, plan=None, batch_size=8):
        name = str((plan or model.plan).kept[0])
        table = plain if plan is not None else repaired
        return table[name] + wiggle[name] + (0 if plan is not None else rng.normal(0, noise / 10, 16))

    monkeypatch.setattr(repair_module, "prune_and_repair", lambda model, plan, *a, **k: setattr(model, "plan", plan))
    monkeypatch.setattr(repair_check, "held_out_nll", nll)
    monkeypatch.setattr(repair_check, "release_weights", release)
    confirm = SimpleNamespace(ids=np.zeros((16, 4)), groups=GROUPS)
    repair = RunRepair(ApplyConfig(repair="lstsq"), np.zeros((4, 4)), confirm)
    return repair, load, state


def _found(chosen_role: Role, names: list[str], plain: dict):
    candidates = [Candidate(n, _plan(json.loads(n)), plain[n], role=Role.UNIFORM if i else chosen_role)
                  for i, n in enumerate(names)]
    confirmed = [{"name": c.name, "nll": plain[c.name]} for c in candidates]
    return SimpleNamespace(best=candidates[0], candidates=candidates, confirmed=confirmed)


NAMES = ["[0, 1]", "[0, 2]", "[1, 2]", "[2, 3]"]  # the chosen plan, then three uniform finalists


def test_a_uniform_plan_better_once_repaired_replaces_a_non_uniform_choice(monkeypatch, tmp_path):
    plain = {"[0, 1]": 3.0, "[0, 2]": 3.1, "[1, 2]": 3.2, "[2, 3]": 3.3}
    repaired = {"[0, 1]": 2.80, "[0, 2]": 2.85, "[1, 2]": 2.70, "[2, 3]": 2.60}  # [2, 3]: not a rival
    repair, load, state = _setup(monkeypatch, plain, repaired, noise=0.01)
    pick, record = judge_repaired(_found(Role.SOLVER, NAMES, plain), repair, 2, 2.0, load, tmp_path, say=print)
    assert pick.name == "[1, 2]" and record["changed"] and record["chosen"] == "[1, 2]"
    assert [r["name"] for r in record["plans"]] == ["[0, 1]", "[0, 2]", "[1, 2]"]  # the 2 best uniform rivals
    # one fresh copy per plan, each released before the next is read
    assert state["loads"] == 3 and state["released"] == 3 and state["most"] == 1


def test_the_choice_stays_unless_a_rival_is_clearly_lower_repaired(monkeypatch, tmp_path):
    plain = {"[0, 1]": 3.0, "[0, 2]": 3.1, "[1, 2]": 3.2, "[2, 3]": 3.3}
    # the best rival a little lower than the choice, within the margin of the noise: the choice stays
    repaired = {"[0, 1]": 2.800, "[0, 2]": 2.85, "[1, 2]": 2.797, "[2, 3]": 2.60}
    repair, load, _ = _setup(monkeypatch, plain, repaired, noise=0.01)
    pick, record = judge_repaired(_found(Role.SOLVER, NAMES, plain), repair, 2, 2.0, load, tmp_path, say=print)
    assert pick.name == "[0, 1]" and not record["changed"] and record["best_rival"] == "[1, 2]"
    assert -2 * record["se"] < record["rival_minus_choice"] < 2 * record["se"]
    # a repair that does not help is judged as the run keeps it: plain
    repaired["[0, 1]"] = 3.5
    pick, record = judge_repaired(_found(Role.SOLVER, NAMES, plain), repair, 2, 2.0, load, tmp_path, say=print)
    assert record["plans"][0]["kept"] == pytest.approx(record["plans"][0]["plain"])


def test_a_uniform_choice_is_judged_alike_and_no_rival_means_no_judgement(monkeypatch, tmp_path):
    plain = {"[0, 1]": 3.0, "[0, 2]": 3.1, "[1, 2]": 3.2, "[2, 3]": 3.3}
    repaired = {"[0, 1]": 2.71, "[0, 2]": 2.50, "[1, 2]": 2.90, "[2, 3]": 2.0}
    repair, load, _ = _setup(monkeypatch, plain, repaired, noise=0.01)
    pick, _ = judge_repaired(_found(Role.UNIFORM, NAMES, plain), repair, 1, 2.0, load, tmp_path, say=print)
    assert pick.name == "[0, 2]"  # [2, 3] is lower still, but not among the 1 best rivals on plain NLL
    assert judge_repaired(_found(Role.SOLVER, NAMES[:1], plain), repair, 2, 2.0, load, tmp_path) is None


# -- grape run ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("judgement"))


def test_grape_run_records_the_repaired_judgement_and_applies_its_choice(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert grape_main(repair_run_argv(ws, out, "--baselines", "none")) == 0
    printed = capsys.readouterr().out
    search = json.loads((out / "search.json").read_text())
    judgement = search["repaired_judgement"]
    assert judgement is not None and 2 <= len(judgement["plans"]) <= 3
    assert search["chosen"] == judgement["chosen"]
    assert printed.count("repaired judgement:") == len(judgement["plans"]) + 1
    applied = Plan.load(out / "plan.json")
    assert applied.provenance["search"]["chosen"] == judgement["chosen"]
    report = (out / "report.md").read_text()  # what the user opens first says so
    assert "repair `lstsq+experts` fitted on" in report and "repair checked on" in report
    assert f"final choice judged repaired against {len(judgement['plans']) - 1} uniform finalist(s)" in report
    # --repair-rivals 0: the plain judgement only
    assert grape_main(repair_run_argv(ws, tmp_path / "plain", "--baselines", "none", "--repair-rivals", "0")) == 0
    assert json.loads((tmp_path / "plain" / "search.json").read_text())["repaired_judgement"] is None
    assert "repaired judgement" not in capsys.readouterr().out


def test_a_negative_rival_count_is_one_line_and_exit_2(ws, tmp_path, capsys):
    assert grape_main(repair_run_argv(ws, tmp_path / "r", "--repair-rivals", "-1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--repair-rivals -1 must be >= 0" in err[0]
    assert not (tmp_path / "r").exists()  # refused before anything was written
