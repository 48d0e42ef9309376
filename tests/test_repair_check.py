"""The repair check (grape.pruning.repair_check): the repaired model is judged against the plainly
pruned one on held-out windows; a repair that does not lower their NLL is undone under
--repair auto (the model comes back pruned without repair, the repaired copy's weights released),
kept when named; grape run fits the repair on its calibration rows, so the confirmation
documents it is judged on are unseen by it, and records every check in summary.json."""

from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import make_tiny, tiny_input_ids

from cli_workspace import RUN_FLAGS, make_workspace
from grape.cli.main import main as grape_main
from grape.pruning import repair_check
from grape.pruning.apply import ApplyConfig, apply_plan
from grape.pruning.repair_check import checked_apply, held_out_nll, judge
from grape.pruning.stage import AUTO_MIN_ROWS, repair_rows
from test_repair import half_plan

FIT = tiny_input_ids(batch=8, seq=32, seed=1)
CONFIRM = SimpleNamespace(ids=tiny_input_ids(batch=6, seq=32, seed=2), groups=np.array([0, 0, 1, 1, 2, 2]))


# -- the verdict ----------------------------------------------------------------------------------------
def test_judge_keeps_a_repair_that_lowers_the_nll_and_undoes_one_that_does_not():
    before = np.array([3.0, 3.2, 2.9, 3.1])
    lower = judge(before, before - 0.01, groups=np.array([0, 0, 1, 1]), undo=True)
    assert lower.kept and lower.difference == pytest.approx(-0.01) and lower.documents == 2
    assert lower.unrepaired == pytest.approx(before.mean()) and lower.repaired == pytest.approx(before.mean() - 0.01)
    higher = judge(before, before + np.array([0.02, -0.01, 0.0, 0.0]), groups=None, undo=True)
    assert not higher.kept and higher.difference == pytest.approx(0.0025) and higher.documents == 4
    assert higher.se > 0
    assert judge(before, before, groups=None, undo=True).kept is False  # no gain: plain removal
    assert judge(before, before + 1, groups=None, undo=False).kept  # named explicitly: kept
    with pytest.raises(ValueError, match="same windows"):
        judge(before, before[:3], groups=None, undo=True)


def test_the_line_says_what_happened():
    kept = judge(np.ones(4), np.ones(4) - 0.5, None, undo=True)
    assert "-0.5000" in kept.line() and kept.line().endswith("kept")
    assert "undone" in judge(np.ones(4), np.ones(4), None, undo=True).line()
    assert "asked for by name" in judge(np.ones(4), np.ones(4) + 1, None, undo=False).line()


# -- the apply -------------------------------------------------------------------------------------------
def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_checked_apply_measures_both_sides_on_the_same_windows():
    model = make_tiny("qwen3_moe")
    plan = half_plan(model)
    plain = apply_plan(copy.deepcopy(model), plan, ApplyConfig("remove"))
    lines = []
    out, check, _ = checked_apply(model, plan, ApplyConfig(repair="lstsq"), FIT, CONFIRM,
                                  reload=lambda: pytest.fail("no reload when the repair stays"), undo=False,
                                  say=lines.append)
    assert out is model and check.kept and check.tokens == CONFIRM.ids.numel() and check.documents == 3
    # the unrepaired side is the plainly pruned model's NLL (masked routing = removal)
    assert check.unrepaired == pytest.approx(float(held_out_nll(plain, CONFIRM.ids).mean()), abs=1e-5)
    assert check.repaired == pytest.approx(float(held_out_nll(model, CONFIRM.ids).mean()), abs=1e-6)
    assert any(line.startswith("repair lstsq:") for line in lines) and lines[-1] == check.line()


def test_an_undone_repair_gives_the_plainly_pruned_model_and_releases_the_repaired_one(monkeypatch):
    original = make_tiny("qwen3_moe")
    plan = half_plan(original)
    plain = _weights(apply_plan(copy.deepcopy(original), plan, ApplyConfig("remove")))
    model = copy.deepcopy(original)
    real = repair_check.judge
    monkeypatch.setattr(repair_check, "judge", lambda *a, **k: _undone(real(*a, **k)))  # whatever it measured
    out, check, _ = checked_apply(model, plan, ApplyConfig(repair="lstsq"), FIT, CONFIRM,
                                  reload=lambda: copy.deepcopy(original), undo=True, say=lambda line: None)
    assert not check.kept and out is not model
    assert all(p.numel() == 0 for p in model.parameters())  # the repaired copy is released
    got = _weights(out)
    assert got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in plain)
    assert float(held_out_nll(out, CONFIRM.ids).mean()) == pytest.approx(check.unrepaired, abs=1e-5)


def _undone(check):
    from dataclasses import replace

    return replace(check, kept=False)


def test_without_windows_or_repair_it_is_the_plain_apply():
    model = make_tiny("qwen3_moe")
    plan = half_plan(model)
    plain = _weights(apply_plan(copy.deepcopy(model), plan, ApplyConfig("remove")))
    out, check, _ = checked_apply(model, plan, ApplyConfig(), FIT, CONFIRM, reload=lambda: None, undo=True,
                                  say=lambda line: None)
    assert check is None and all(torch.equal(v, plain[k]) for k, v in out.state_dict().items())


# -- the rows ----------------------------------------------------------------------------------------------
def test_the_split_keeps_the_calibration_documents_stream(ws):
    from grape.data.split import Targets, split_text
    from grape.models.loading import load_tokenizer

    split = split_text([str(ws.calibration)], load_tokenizer(ws.model), Targets(256, 512, 4 * 32), seq_len=32,
                       samples=4, window_len=32)
    rows = split.calibration
    assert rows.stream.numel() > rows.input_ids.numel()  # the rows are the start of the stream
    assert torch.equal(rows.stream[: rows.input_ids.numel()], rows.input_ids.reshape(-1))


def test_repair_rows_are_cut_from_the_calibration_stream(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "max_position_embeddings": 64}))
    calibration = torch.arange(40 * 32).view(40, 32)
    lines = []
    rows = repair_rows(calibration, tmp_path, ApplyConfig(repair="lstsq", repair_samples=10, repair_seq_len=16),
                       say=lines.append)
    assert rows.shape == (10, 16) and torch.equal(rows.reshape(-1), torch.arange(160)) and not lines
    rows = repair_rows(calibration, tmp_path, ApplyConfig(repair="lstsq", repair_samples=500, repair_seq_len=64),
                       say=lines.append)
    assert rows.shape == (20, 64) and "all the calibration documents fill (500 asked)" in lines[0]
    short = torch.arange(AUTO_MIN_ROWS * 8 - 1).view(1, -1)
    assert repair_rows(short, tmp_path, ApplyConfig(repair="lstsq", repair_seq_len=8), say=lines.append) is None


# -- grape run ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("check"))


def repair_run_argv(ws, out, *extra: str) -> list[str]:
    """`grape run` on the workspace's model at 50%, with a search, a repair on 8-token rows and
    nothing saved (the runs of the repair tests)."""
    return ["run", "--model", str(ws.model), "--data", str(ws.calibration), "--eval-data", *map(str, ws.heldout),
            "--out", str(out), "--budget", "0.5", "--no-compare", "--no-save", *RUN_FLAGS, "--repair-seq-len", "8",
            *extra]


def test_grape_run_checks_each_repair_on_the_confirmation_documents(ws, tmp_path, capsys):
    out = tmp_path / "run"
    argv = repair_run_argv(ws, out)
    assert grape_main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    search = json.loads((out / "search.json").read_text())
    checks = summary["repair_check"]
    assert set(checks) == {"search", "exact", "uniform"}  # the applied plan and both baselines
    confirmation = search["held_out"]["confirmation"]
    for check in checks.values():  # judged on the confirmation windows, by document
        assert check["tokens"] == confirmation["tokens"] and check["documents"] == confirmation["documents"]
        assert check["kept"] == (check["difference"] < 0)  # --repair auto: kept only where it helps
    assert printed.count("repair check on") == 3
    # the repair fitted on the calibration documents' stream: more than the 4 x 32 calibration
    # rows (its start), less than the whole text (the held-out documents are not in it)
    fitted = [int(n) for n in re.findall(r"repair lstsq\+experts: 3 layer\(s\) on (\d+) tokens", printed)]
    assert len(fitted) == 3 and len(set(fitted)) == 1 and 4 * 32 < fitted[0] < 128 * 8


def test_the_search_finalists_unrepaired_nll_is_read_not_measured_again(ws, tmp_path, capsys, monkeypatch):
    from grape.searching.meter import plan_key
    from solvers.plan import Plan

    measured = []  # the plans whose unrepaired NLL the check measured itself
    real = repair_check.held_out_nll
    monkeypatch.setattr(repair_check, "held_out_nll", lambda model, ids, plan=None, **k:
                        measured.append(plan) or real(model, ids, plan, **k))
    out = tmp_path / "run"
    argv = repair_run_argv(ws, out, "--baselines", "none")
    assert grape_main(argv) == 0
    chosen = Plan.load(out / "plan.json")
    cached = json.loads((out / "search.cache.confirm.json").read_text())["measured"][plan_key(chosen)]
    check = json.loads((out / "summary.json").read_text())["repair_check"]["search"]
    assert check["unrepaired"] == pytest.approx(float(np.mean(cached)))  # the search's own measurement
    assert [p for p in measured if p is not None] == []  # so no pass over the windows for it
