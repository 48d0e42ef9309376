"""How much the chosen plan depends on the calibration text (`grape run --stability`).

Scores move when the calibration text changes: on the zoo, uniform REAP at 50% cost +0.073 nats
with one 64 x 256 calibration set and +0.186 with another from the same file. A user should know
how much of their plan is the text's accident. This calibrates again on each half of the
calibration rows (two disjoint runs of documents, one straddling document aside), rebuilds the
chosen plan's per-layer counts from each half's expert ranking, and reports for each half:

- overlap: the share of the chosen plan's removed experts that the half's plan removes too;
- the half plan's NLL minus the chosen plan's on the confirmation tokens (the search's when
  there are none), with its standard error by document.

Cost: one calibration over the same rows (two halves), and three forward passes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from solvers.plan import Plan


def halves(data):
    """The calibration rows cut in two contiguous halves (rows are packed from documents in
    order, so each half is its own documents, one straddling the cut aside)."""
    from grape.data.text import CalibrationData

    half = data.samples // 2
    return [CalibrationData(ids, {**data.provenance, "samples": int(ids.shape[0]), "half": n})
            for n, ids in enumerate((data.input_ids[:half], data.input_ids[half: 2 * half]))]


def overlap(chosen: Plan, other: Plan) -> float:
    """Share of `chosen`'s removed experts that `other` removes too (1.0: the same experts)."""
    removed = {(layer, e) for layer in chosen.layers for e in chosen.removed[layer]}
    if not removed:
        return 1.0
    again = {(layer, e) for layer in other.layers for e in other.removed[layer]}
    return len(removed & again) / len(removed)


def same_counts(plan: Plan, scores, criterion: str, problem) -> Plan | None:
    """`plan`'s per-layer kept counts with each layer's experts ranked by `scores` under
    `criterion`; None where a constraint refuses that choice of experts."""
    from grape.searching.algorithm import _counts, _orders, _plan_from_counts

    return _plan_from_counts(problem, _orders(scores, criterion), _counts(problem, plan), plan)


def measure(model, model_dir, data, calibration, solve, found, held_out, say=print) -> dict:
    """Calibrate on each half of `data` (CalibrationData) with `calibration`
    (CalibrationConfig), rebuild `found.best`'s counts from each half's ranking, and measure
    (see the module docstring). Returns the record search.json keeps under "stability"."""
    from grape.calibration.stage import calibrate_checkpoint
    from grape.searching.sensitivity import masked, sequence_nll
    from grape.evaluation.stats import mean_and_se
    from solvers.spec import build_problem

    best = found.best
    criterion = best.criterion or solve.criterion
    windows = held_out.confirm if held_out.confirm is not None else held_out.search

    def nll(plan: Plan) -> np.ndarray:
        with masked(model, plan):
            return sequence_nll(model, windows.ids, 8)

    chosen_nll = nll(best.plan)
    rows = []
    for part in halves(data):
        scores = calibrate_checkpoint(model_dir, part, replace(calibration, samples=part.samples),
                                      model=model, say=lambda line: None)
        plan = same_counts(best.plan, scores, criterion, build_problem(scores, solve))
        if plan is None:
            rows.append({"rows": part.samples, "note": "a constraint refuses this half's experts at these counts"})
            continue
        diff, se = mean_and_se(nll(plan) - chosen_nll, windows.groups)
        rows.append({"rows": part.samples, "overlap": round(overlap(best.plan, plan), 4),
                     "nll_difference": diff, "se": se})
    record = {"criterion": criterion, "on": "confirmation" if held_out.confirm is not None else "search",
              "halves": rows}
    say(describe(record))
    return record


def describe(record: dict) -> str:
    parts = [f"overlap {r['overlap']:.0%}, NLL {r['nll_difference']:+.4f} +- {r['se']:.4f}"
             for r in record["halves"] if "overlap" in r]
    return (f"stability: the plan's counts ranked by {record['criterion']} calibrated on each half of the "
            f"calibration rows: " + "; ".join(parts or ["not measurable (constraints)"])
            + f" (against the plan, on the {record['on']} tokens)")


__all__ = ["describe", "halves", "measure", "overlap", "same_counts"]
