"""The quality benchmark's method table (benchmarks/quality_methods.py) on a tiny random model:
every method solves, keeps the right number of experts, is applied as it says, and gives one
result row per (method, budget); the report renders every row. Seconds on CPU."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import quality
import quality_report
from quality_methods import (
    CALIBRATION_DOMAIN_METHODS,
    METHODS,
    PROBES,
    Row,
    measure_layer_curves,
    methods_by_name,
    paired_difference,
    run_table,
)
from tiny_models import make_tiny

from grape.calibration.calibrate import CalibrationConfig, calibrate
from grape.searching.sensitivity import interpolate_curve

BUDGETS = (0.25, 0.5)


@pytest.fixture(scope="module")
def tiny():
    model = make_tiny("qwen3_moe")  # 3 MoE layers x 8 experts, top-2
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 128, (8, 24), generator=g)
    config = CalibrationConfig(samples=8, seq_len=24, subsample=48, batch_size=4, progress=False)
    scores = calibrate(model, calib, config)
    held_out = {"a": torch.randint(0, 128, (2, 20), generator=g),
                "b": torch.randint(0, 128, (2, 20), generator=g)}
    return model, scores, held_out


def nll_of(held_out):
    @torch.no_grad()
    def evaluate(model):
        out, windows = {}, {}
        for domain, ids in held_out.items():
            logits = model(input_ids=ids).logits[:, :-1]
            loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            out[domain] = float(loss.mean())
            windows[domain] = loss.mean(dim=1).tolist()
        return out, windows

    return evaluate


@pytest.fixture(scope="module")
def rows(tiny):
    model, scores, held_out = tiny
    evaluate = nll_of(held_out)
    baseline, _ = evaluate(model)
    task_calls = []

    def tasks(m):
        task_calls.append(1)
        return {"toy_task": 0.5}

    measured, records = measure_layer_curves(model, scores, evaluate, baseline, time_limit=10,
                                             log=lambda msg: None)
    assert sorted(measured) == [0, 1, 2] and len(records) == 3 * 3  # layers x fractions
    search_ids = torch.randint(0, 128, (4, 20), generator=torch.Generator().manual_seed(2))
    settings = quality.replace(quality.FAST, search_passes=12)
    out = run_table(model, scores, BUDGETS, [*METHODS, *PROBES], evaluate, baseline,
                    model_name="tiny", time_limit=10, measured=measured, evaluate_tasks=tasks,
                    search=quality.searcher(model, scores, search_ids, settings),
                    tasks_for=lambda method, budget: method.name == "uniform-reap" and budget == 0.5,
                    log=lambda msg: None)
    return out, baseline, task_calls


def test_every_method_and_budget_gives_one_row(rows):
    out, _, _ = rows
    names = [m.name for m in (*METHODS, *PROBES)]
    assert [(r.method, r.budget) for r in out] == [(n, b) for b in BUDGETS for n in names]


def test_every_plan_removes_the_budget_and_respects_the_router_floor(rows, tiny):
    out, _, _ = rows
    total = sum(tiny[1].model.experts_per_layer.values())  # 24
    for r in out:
        removed = round(r.budget * total)
        assert r.removed == removed, r.method
        assert sum(r.kept.values()) == total - removed, r.method
        assert min(r.kept.values()) >= 2, r.method  # top_k of the tiny model
        if r.family == "uniform":
            assert max(r.kept.values()) - min(r.kept.values()) <= 1, r.method
        assert r.solve_seconds >= 0 and r.status in ("optimal", "feasible", "time_limit")


def test_rows_carry_finite_nll_increases_against_the_baseline(rows):
    out, baseline, _ = rows
    for r in out:
        assert set(r.nll) == set(baseline)
        for d in baseline:
            assert math.isclose(r.nll_increase[d], r.nll[d] - baseline[d], abs_tol=1e-12)
        assert math.isfinite(r.mean_increase)
    # pruning half the experts of a random model changes its outputs
    assert any(abs(r.mean_increase) > 1e-4 for r in out if r.budget == 0.5)


def test_merge_variants_share_the_plan_but_change_the_weights(rows):
    out, _, _ = rows
    by = {(r.method, r.budget): r for r in out}
    merged = [m for m in METHODS if m.apply == "merge"]
    assert {m.name for m in merged} == {"uniform-reap+merge", "grape-alg1+merge",
                                        "exact-coverage+merge"}
    for m in merged:
        for b in BUDGETS:
            plain, merge = by[(m.name.replace("+merge", ""), b)], by[(m.name, b)]
            assert merge.apply == "merge" and plain.apply == "remove"
            assert merge.kept == plain.kept
            assert merge.nll != plain.nll, f"{m.name} at {b}: merging changed nothing"


def test_lm_eval_runs_only_where_asked(rows):
    out, _, calls = rows
    assert len(calls) == 1
    assert [(r.method, r.budget) for r in out if r.tasks] == [("uniform-reap", 0.5)]


def test_report_renders_every_row_and_states_a_verdict(rows, tmp_path):
    out, baseline, _ = rows
    model = {"name": "tiny", "model_type": "qwen3_moe",
             "experts_per_layer": {"0": 8, "1": 8, "2": 8}, "top_k": {"0": 2, "1": 2, "2": 2},
             "n_group": None, "baseline_nll": baseline, "baseline_tasks": {},
             "rows": [r.to_json() for r in out], "sensitivity": []}
    assert [Row.from_json(r) for r in model["rows"]] == out
    data = {"command": "test", "date": "today", "machine": "cpu", "seconds": 1.0,
            "settings": {"budgets": list(BUDGETS)}, "settings_text": [("mode", "test")],
            "models": [model]}
    text = quality_report.render_markdown(data)
    for m in (*METHODS, *PROBES):
        assert f"`{m.name}`" in text
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and "| `" in line
                  and line.split("|")[1].strip().isdigit()]
    assert len(table_rows) == len(out)
    verdict = quality_report.verdicts(model, BUDGETS)
    assert len(verdict) == 2 and all("uniform REAP" in v for v in verdict)
    written = quality_report.plot(model, list(BUDGETS), tmp_path)
    assert all(p.exists() and p.stat().st_size > 1000 for p in written)


def test_method_names_are_unique_and_calibration_methods_are_in_the_table():
    names = [m.name for m in (*METHODS, *PROBES)]
    assert len(names) == len(set(names))
    assert {m.name for m in CALIBRATION_DOMAIN_METHODS} <= set(names)
    with pytest.raises(KeyError):
        methods_by_name(["no-such-method"])


def test_measured_curves_interpolate_and_never_rise_with_more_experts():
    curve = interpolate_curve({8: 0.0, 6: 0.1, 4: 0.5, 3: 0.4}, 8)
    assert curve.shape == (9,)
    assert curve[8] == 0.0 and math.isclose(curve[6], 0.1) and math.isclose(curve[5], 0.3)
    assert curve[3] == curve[4] == 0.5  # the dip at 3 is lifted: fewer experts never cost less
    assert all(curve[n] >= curve[n + 1] for n in range(8))
    assert curve[2] == curve[0] == 2.0  # below the last measured count: prohibitive, not a guess


def test_paired_difference_uses_the_per_window_differences(rows):
    out, _, _ = rows
    a, b = out[0], out[1]
    diff, se = paired_difference(a, b)
    assert math.isclose(diff, a.mean_increase - b.mean_increase)
    assert se is not None and se >= 0
    assert paired_difference(a, a) == (0.0, 0.0)
    # shifting every window of one domain by a constant moves the mean, not the error
    shifted = Row.from_json({**a.to_json(), "windows": {d: [v + (0.3 if d == "a" else 0.0)
                                                             for v in w]
                                                         for d, w in a.windows.items()},
                             "nll_increase": {**a.nll_increase,
                                              "mean": a.mean_increase + 0.15}})
    d2, se2 = paired_difference(shifted, a)
    assert math.isclose(d2, 0.15) and math.isclose(se2, 0.0, abs_tol=1e-9)


def test_paired_difference_by_document_counts_a_document_once(rows):
    """Windows of one document move together: by document, one unit per document, so the error
    of a difference carried by a single document's windows is larger than the per-window one."""
    out, _, _ = rows
    noise = [0.01, -0.02, 0.015, 0.0, -0.01, 0.02, -0.005, 0.01]
    base = {**out[0].to_json(), "nll": {"a": 1.0, "b": 1.0},
            "nll_increase": {"a": 0.0, "b": 0.0, "mean": 0.0},
            "windows": {"a": [1.0] * 8, "b": [1.0] * 8}}
    a = Row.from_json(base)
    b = Row.from_json({**base, "windows": {"a": [1.0 + n + (0.5 if i < 2 else 0.0) for i, n in enumerate(noise)],
                                           "b": [1.0 + n for n in noise]}})
    by_window = paired_difference(b, a)[1]
    one_document = {"a": [0, 0, 1, 2, 3, 4, 5, 6], "b": list(range(8))}
    by_document = paired_difference(b, a, one_document)[1]
    assert by_document > by_window > 0
    singletons = {"a": list(range(8)), "b": list(range(8))}
    assert math.isclose(paired_difference(b, a, singletons)[1], by_window)  # every window its own unit
    with pytest.raises(ValueError, match="window documents"):
        paired_difference(b, a, {"a": [0], "b": [0]})


def test_window_documents_follow_the_eos_joined_stream():
    from quality_setup import window_documents

    # [EOS] d0 (5) [EOS] d1 (2) [EOS] d2 (9) [EOS]: 20 tokens; windows of 4 predict 1-4, 5-8, ...
    lengths = [5, 2, 9]
    owners = window_documents(lengths, sum(lengths) + 4, 4)
    assert owners == [0, 0, 2, 2, 2]  # window 1 (positions 5-8) is half d0, half d1: the earlier
    assert window_documents([3, 3], 6, 2) == [0, 1, 1]  # no separators: predicted 1-2, 3-4, 5
    with pytest.raises(ValueError):
        window_documents([3, 3], 10, 2)


def test_the_default_searches_within_its_passes_and_fidelity_ranks_the_proxies(rows, tiny):
    from fidelity import MEASURED, fidelity

    out, _, _ = rows
    model, scores, held_out = tiny
    default = [r for r in out if r.method == "grape-run"]
    assert len(default) == len(BUDGETS) and all(0 < r.passes <= 12 for r in default)
    assert all(r.passes == 0 for r in out if r.method != "grape-run")
    removal = [r for r in out if r.apply == "remove"]
    ids = torch.randint(0, 128, (4, 20), generator=torch.Generator().manual_seed(2))
    entries = fidelity(scores, removal, measure=quality.masked_nll(model, ids))
    names = [e["predictor"] for e in entries]
    assert "additive, reap_mass" in names and names[-1] == MEASURED
    assert "curves, measured NLL per layer" not in names  # no measured curves were given
    for e in entries:
        assert e["plans"] > 0
        assert all(v is None or -1.0 <= v <= 1.0 for v in e["per_budget"].values())
    data = {"models": [{"name": "tiny", "fidelity": entries}]}
    text = "\n".join(quality_report.fidelity_section(data, BUDGETS))
    assert "| tiny | additive, reap_mass |" in text


def test_the_default_table_and_merging_two_runs(rows, tmp_path):
    import json
    from dataclasses import asdict

    out, baseline, _ = rows
    model = {"name": "tiny", "model_type": "qwen3_moe",
             "experts_per_layer": {"0": 8, "1": 8, "2": 8}, "top_k": {"0": 2, "1": 2, "2": 2},
             "n_group": None, "baseline_nll": baseline, "baseline_tasks": {},
             "rows": [r.to_json() for r in out], "sensitivity": [], "seconds": 2.0}
    table = quality_report.default_rows(model, BUDGETS)
    assert len(table) == len(BUDGETS) and all(line.startswith("| tiny |") for line in table)
    best = min((r for r in out if r.budget == 0.25 and r.method in quality_report.UNIFORM_BASELINES),
               key=lambda r: r.mean_increase)
    assert f"`{best.method}` {best.mean_increase:+.4f}" in table[0]
    settings = quality.replace(quality.FAST, budgets=BUDGETS)
    base = {"command": "a", "date": "today", "machine": "cpu", "seconds": 1.0,
            "settings": json.loads(json.dumps(asdict(settings))), "settings_text": settings.describe(),
            "methods": [asdict(m) for m in (*METHODS, *PROBES)]}
    for name, where in (("qwen3moe-32x4", "a"), ("olmoe-32x4", "b")):
        (tmp_path / where).mkdir()
        data = {**base, "command": where, "models": [{**model, "name": name}]}
        (tmp_path / where / "quality.json").write_text(json.dumps(data))
    assert quality.main(["--out", str(tmp_path / "a"), "--merge", str(tmp_path / "b")]) == 0
    merged = json.loads((tmp_path / "a" / "quality.json").read_text())
    assert [m["name"] for m in merged["models"]] == ["qwen3moe-32x4", "olmoe-32x4"]
    assert merged["commands"] == ["a", "b"] and (tmp_path / "a" / "quality.md").is_file()
    other = {**base, "settings": {**base["settings"], "search_passes": 1}, "models": []}
    (tmp_path / "b" / "quality.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="other settings"):
        quality.main(["--out", str(tmp_path / "a"), "--merge", str(tmp_path / "b")])


def test_a_partial_rerun_keeps_the_other_rows_and_checks_the_baseline(rows):
    out, baseline, _ = rows
    previous = {"name": "tiny", "baseline_nll": dict(baseline),
                "rows": [r.to_json() for r in out]}
    rerun = [r for r in out if r.method == "uniform-reap"]
    fresh = [quality.replace(r, nll_increase={d: v + 1.0 for d, v in r.nll_increase.items()}) for r in rerun]
    merged = quality._with_kept_rows(fresh, previous, {"uniform-reap"})
    assert len(merged) == len(out)  # one row per (method, budget), as before
    assert [r for r in merged if r.method == "uniform-reap"] == sorted(fresh, key=lambda r: r.budget)
    assert [r.budget for r in merged] == sorted(r.budget for r in merged)
    quality._same_baseline(previous, dict(baseline))
    with pytest.raises(SystemExit, match="differs from the previous run"):
        quality._same_baseline(previous, {d: v + 0.01 for d, v in baseline.items()})
    with pytest.raises(SystemExit, match="unknown methods"):
        quality._previous_run(Path("."), quality.FAST, ["nope"], list(METHODS))


def test_the_reconstruction_study_renders_its_rows():
    import reconstruction_study

    data = {"command": "python benchmarks/reconstruction_study.py", "date": "today", "minutes": 1.0,
            "rows": [{"model": "m", "calibration": how, "budget": 0.5, "tokens": 16384,
                      "reconstruction": 0.06, "reap": 0.09, "ratio": 0.06 / 0.09} for how in ("packed", "spread")]}
    text = reconstruction_study.render(data)
    assert "| m | packed | 50% | +0.0600 | +0.0900 | 0.67 |" in text and "| m | spread |" in text
