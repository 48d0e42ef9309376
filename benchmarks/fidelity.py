"""Objective fidelity: does an objective's predicted cost rank plans the way their measured
loss does?

For one model, the quality benchmark's plans at one budget (every method's, mixed calibration,
experts removed rather than merged) all remove the same number of experts; each objective and
criterion predicts a cost for each of them (the objective's value on the problem built with that
criterion), and the benchmark measured each plan's NLL increase on the test split. The Spearman
rank correlation between the two, per budget, says how far a user can trust the proxy to choose
between plans: 1 ranks them exactly as the model does, 0 is unrelated, below 0 is backwards. The
search's own measurement (NLL on its validation-split search tokens) is one more predictor:
the one `grape run` uses by default.

Used by benchmarks/quality.py (`fidelity` in quality.json, a table in quality.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

from grape.api import SolveConfig, build_problem
from grape.searching.sensitivity import with_nll_curves
from solvers.errors import UserError
from solvers.plan import Plan


@dataclass(frozen=True)
class Predictor:
    name: str
    objective: str = "additive"
    criterion: str = "reap_mass"
    normalize: str = "none"
    curves: str = "auto"


PREDICTORS: tuple[Predictor, ...] = (
    Predictor("additive, reap_mass"),
    Predictor("additive, reap", criterion="reap"),
    Predictor("additive, frequency", criterion="frequency"),
    Predictor("additive, ean", criterion="ean"),
    Predictor("additive, reap_mass / layer RMS", normalize="layer_energy"),
    Predictor("coverage, reap_mass", objective="coverage"),
    Predictor("redundancy (GRAPE)", objective="redundancy"),
    Predictor("curves, block-output error", objective="curves", curves="output"),
    Predictor("curves, measured NLL per layer", objective="curves", curves="nll"),
)
MEASURED = "measured NLL on the search tokens"  # the loss-verified search's own yardstick


def plan_of(removed: dict[int, list[int]], experts_per_layer: dict[int, int]) -> Plan:
    kept = {layer: sorted(set(range(n)) - set(removed.get(layer, []))) for layer, n in experts_per_layer.items()}
    return Plan(kept=kept, removed={layer: sorted(removed.get(layer, [])) for layer in experts_per_layer})


def rank_correlation(predicted: Sequence[float], measured: Sequence[float]) -> float | None:
    """Spearman's rho (ties averaged); None with fewer than 3 plans or a constant side."""
    if len(predicted) < 3 or np.ptp(predicted) == 0 or np.ptp(measured) == 0:
        return None
    return float(spearmanr(predicted, measured).statistic)


def fidelity(scores, rows: Sequence, measured_curves: dict[int, np.ndarray] | None = None,
             measure: Callable[[Plan], float] | None = None) -> list[dict]:
    """One entry per predictor: {"predictor", "per_budget": {budget: rho}, "mean", "plans"}.
    `rows`: the benchmark's Rows (mixed calibration, remove); `measure(plan)`: NLL of the model
    under the plan on the search tokens (the search's yardstick), if given."""
    scores = scores if measured_curves is None else with_nll_curves(scores, measured_curves)
    experts = dict(scores.model.experts_per_layer)
    budgets = sorted({r.budget for r in rows})
    plans: dict[float, list[tuple[Plan, float]]] = {}
    for budget in budgets:
        seen, at = set(), []
        for r in sorted((r for r in rows if r.budget == budget), key=lambda r: r.method):
            key = tuple(sorted((k, tuple(v)) for k, v in r.removed_experts.items()))
            if r.removed_experts and key not in seen:
                seen.add(key)
                at.append((plan_of(r.removed_experts, experts), r.mean_increase))
        plans[budget] = at
    out = []
    for predictor in PREDICTORS:
        entry = _correlate(predictor.name, plans, lambda b, p, pr=predictor: _predict(scores, pr, b, p))
        if entry is not None:
            out.append(entry)
    if measure is not None:
        out.append(_correlate(MEASURED, plans, lambda b, p: measure(p)))
    return out


def _predict(scores, predictor: Predictor, budget: float, plan: Plan) -> float:
    config = SolveConfig(budget=budget, objective=predictor.objective, criterion=predictor.criterion,
                         normalize=predictor.normalize, curves=predictor.curves, min_kept=None,
                         routing_groups="off")
    problem = build_problem(scores, config)
    return float(problem.objective.value(plan, problem))


def _correlate(name: str, plans, predict) -> dict | None:
    per_budget, count = {}, 0
    for budget, at in plans.items():
        try:
            predicted = [predict(budget, plan) for plan, _ in at]
        except UserError:  # the scores cannot price this (e.g. no similarity, no curves)
            return None
        rho = rank_correlation(predicted, [m for _, m in at])
        per_budget[str(budget)] = rho
        count += len(at)
    values = [v for v in per_budget.values() if v is not None]
    return {"predictor": name, "per_budget": per_budget,
            "mean": float(np.mean(values)) if values else None, "plans": count}


def render(model_name: str, entries: list[dict], budgets: Sequence[float]) -> list[str]:
    """Markdown rows: | model | predictor | rho per budget | mean |."""
    lines = []
    for e in sorted(entries, key=lambda e: -(e["mean"] if e["mean"] is not None else -2)):
        cells = [model_name, e["predictor"]]
        cells += [_fmt(e["per_budget"].get(str(b))) for b in budgets]
        cells += [_fmt(e["mean"]), str(e["plans"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:+.2f}"


def refresh(entry: list[dict], scores, rows: Sequence, measured_curves=None) -> list[dict]:
    """The proxies recomputed from the scores (after a change to the predictor table); the
    search-token entry, which needs the model, is kept as it was measured."""
    kept = [e for e in entry if e["predictor"] == MEASURED]
    return [e for e in fidelity(scores, rows, measured_curves) if e["predictor"] != MEASURED] + kept


__all__ = ["MEASURED", "PREDICTORS", "Predictor", "fidelity", "rank_correlation", "refresh", "render"]
