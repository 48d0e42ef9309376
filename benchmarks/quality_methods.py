"""The method table of the quality benchmark, and the loop that runs it on one model.

A :class:`Method` is a named way to go from calibration scores to a pruned model: how the
allocation problem is built (objective, importance criterion, cross-layer normalisation,
constraints), which solver picks the experts, and how the plan is applied (``remove`` or
``merge``). Variants that differ only in how they are applied share one plan.

:func:`run_table` solves every method at every budget, applies each plan to a fresh copy of the
unpruned model and hands it to an evaluation callback; the result is one :class:`Row` per
(method, budget). It knows nothing about the zoo or the held-out files, so the smoke test runs it
on a tiny random model in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from grape.api import SolveConfig, apply, build_problem
from grape.searching.sensitivity import measure_nll_curves, uniform_plan
from solvers.constraints import EntropyGuard
from solvers.errors import UserError
from solvers.plan import Plan
from solvers.problem import Problem
from solvers.scores import Scores
from solvers.solve import solve

# GRAPE's entropy guard: gamma is not given in the paper; 0.1 is the project's documented default
ENTROPY_GAMMA = 0.1


@dataclass(frozen=True)
class Method:
    """One row of the method table."""

    name: str
    family: str  # "uniform" (same count per layer) | "global" (counts chosen across layers)
    solver: str
    objective: str = "additive"
    criterion: str = "reap_mass"
    normalize: str = "none"
    entropy_gamma: float | None = None
    apply: str = "remove"  # remove | merge
    # "calibration": the cost curves in the scores file (block-output error); "measured": the
    # end-to-end NLL increase of each layer pruned alone (measure_layer_curves)
    curves: str = "calibration"
    # loss-verified allocation (grape.search, the default of `grape run`): the solver's plan is
    # one seed; the plan applied is the best measured candidate
    search: bool = False
    about: str = ""

    @property
    def plan_key(self) -> tuple:
        """Methods with the same key share one plan (e.g. a remove and a merge variant)."""
        return (self.solver, self.objective, self.criterion, self.normalize, self.entropy_gamma,
                self.curves, self.search)

    def solve_config(self, budget: float, time_limit: float) -> SolveConfig:
        constraints = () if self.entropy_gamma is None else (EntropyGuard(self.entropy_gamma),)
        return SolveConfig(budget=budget, objective=self.objective, solver=self.solver,
                           time_limit=time_limit, criterion=self.criterion,
                           normalize=self.normalize, constraints=constraints)

    def describe(self) -> str:
        parts = [f"solver `{self.solver}`", f"objective `{self.objective}`"]
        if self.objective in ("additive", "coverage") or self.solver in ("ranking", "uniform"):
            parts.append(f"importance `{self.criterion}`"
                         + ("" if self.normalize == "none" else f" / `{self.normalize}`"))
        if self.objective == "curves":
            parts.append("curves: " + ("measured NLL per layer, experts in `reap` order"
                                       if self.curves == "measured" else
                                       "block-output error from calibration"))
        if self.entropy_gamma is not None:
            parts.append(f"entropy guard gamma {self.entropy_gamma:g}")
        if self.search:
            parts.append("then loss-verified search (grape.search defaults, validation split)")
        parts.append(f"apply `{self.apply}`")
        return ", ".join(parts)


def _merge(method: Method, about: str) -> Method:
    return Method(**{**asdict(method), "name": method.name + "+merge", "apply": "merge",
                     "about": about})


UNIFORM_FREQUENCY = Method("uniform-frequency", "uniform", "uniform", criterion="frequency",
                           about="same count per layer, drop the least-routed experts")
UNIFORM_REAP = Method("uniform-reap", "uniform", "uniform", criterion="reap",
                      about="REAP's protocol: same count per layer, rank by REAP saliency")
UNIFORM_RECONSTRUCTION = Method(
    "uniform-reconstruction", "uniform", "uniform", criterion="reconstruction",
    about="same count per layer, experts chosen by greedy elimination on the layer's output error "
          "with tokens re-routed (criterion `reconstruction`)")
GLOBAL_RANKING = Method("global-ranking", "global", "ranking",
                        about="drop the globally least important experts (reap_mass)")
GRAPE_ALG1 = Method("grape-alg1", "global", "grape", objective="redundancy",
                    entropy_gamma=ENTROPY_GAMMA,
                    about="GRAPE Algorithm 1 on CKA similarity, entropy freeze")
EXACT_ADDITIVE = Method("exact-additive", "global", "exact",
                        about="integer program: least removed reap_mass")
EXACT_REDUNDANCY = Method("exact-redundancy", "global", "exact", objective="redundancy",
                          entropy_gamma=ENTROPY_GAMMA,
                          about="integer program: GRAPE Eq. 4-5 (least kept CKA) + entropy guard")
EXACT_COVERAGE = Method("exact-coverage", "global", "exact", objective="coverage",
                        about="integer program: removed reap_mass not covered by a similar kept expert")
EXACT_CURVES = Method("exact-curves", "global", "exact", objective="curves",
                      about="integer program over measured per-layer output-error curves")
GRAPE_RUN = Method("grape-run", "loss-verified", "exact", objective="curves", search=True,
                   about="the default of `grape run`: the exact curves plan, uniform plans per "
                         "criterion and the program on measured NLL curves as seeds, then measured "
                         "criterion choice and level switches (grape.search)")
RELAXATION = Method("relaxation", "global", "relaxation", objective="redundancy",
                    entropy_gamma=ENTROPY_GAMMA,
                    about="convex relaxation of the redundancy program, rounded")

# the comparison the issue asks for, in table order
METHODS: tuple[Method, ...] = (
    UNIFORM_FREQUENCY,
    UNIFORM_REAP,
    _merge(UNIFORM_REAP, "REAP's plan, each removed expert merged into its nearest kept expert "
           "(weight cosine), frequency-weighted"),
    UNIFORM_RECONSTRUCTION,
    GLOBAL_RANKING,
    GRAPE_ALG1,
    _merge(GRAPE_ALG1, "Algorithm 1's clusters merged, frequency-weighted"),
    EXACT_ADDITIVE,
    EXACT_REDUNDANCY,
    EXACT_COVERAGE,
    _merge(EXACT_COVERAGE, "coverage plan, each removed expert merged into the kept expert "
           "covering it"),
    EXACT_CURVES,
    RELAXATION,
    GRAPE_RUN,
)

# improvement experiments: why (or whether) global allocation beats uniform REAP
PROBES: tuple[Method, ...] = (
    Method("global-ranking-reap", "global", "ranking", criterion="reap",
           about="global ranking on raw REAP (a per-routed-token mean: not comparable across layers)"),
    Method("global-ranking-frequency", "global", "ranking", criterion="frequency",
           about="global ranking on routing frequency"),
    Method("global-ranking-energy", "global", "ranking", normalize="layer_energy",
           about="global ranking on reap_mass divided by the RMS of the layer's MoE output"),
    Method("exact-additive-guarded", "global", "exact", entropy_gamma=0.01,
           about="least removed reap_mass with a tight entropy guard (gamma 0.01)"),
    Method("uniform-reap-mass", "uniform", "uniform",
           about="same count per layer, rank by reap_mass (separates criterion from allocation)"),
    Method("exact-measured", "global", "exact", objective="curves", criterion="reap",
           curves="measured",
           about="integer program over measured per-layer NLL curves (validation split), "
                 "REAP's order within each layer"),
)

# a few methods rerun with single-domain calibration data
CALIBRATION_DOMAIN_METHODS: tuple[Method, ...] = (
    UNIFORM_FREQUENCY, UNIFORM_REAP, GLOBAL_RANKING, EXACT_COVERAGE, EXACT_CURVES,
)


def methods_by_name(names: Sequence[str]) -> list[Method]:
    table = {m.name: m for m in (*METHODS, *PROBES)}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise KeyError(f"unknown method(s) {unknown}; choose from {sorted(table)}")
    return [table[n] for n in names]


# -- running ------------------------------------------------------------------------------------
@dataclass
class Row:
    """One pruned model: which method, what it kept, how long the solve took, what it scored."""

    model: str
    calibration: str
    budget: float
    method: str
    family: str
    apply: str
    solver: str
    status: str
    removed: int
    kept: dict[int, int]  # decoder layer -> experts kept
    solve_seconds: float
    objective: float | None
    nll: dict[str, float]  # domain -> nats/token
    nll_increase: dict[str, float]  # domain -> against the unpruned model, plus "mean"
    tasks: dict[str, float] = field(default_factory=dict)  # lm-eval task -> acc
    eval_seconds: float = 0.0
    windows: dict[str, list[float]] = field(default_factory=dict)  # domain -> per-window NLL
    passes: int = 0  # forward passes spent choosing the plan (loss-verified search)
    removed_experts: dict[int, list[int]] = field(default_factory=dict)  # the plan: layer -> removed

    @property
    def mean_increase(self) -> float:
        return self.nll_increase["mean"]

    def to_json(self) -> dict:
        out = asdict(self)
        out["kept"] = {str(k): v for k, v in self.kept.items()}
        out["removed_experts"] = {str(k): v for k, v in self.removed_experts.items()}
        return out

    @classmethod
    def from_json(cls, data: dict) -> Row:
        data = dict(data)
        data["kept"] = {int(k): int(v) for k, v in data["kept"].items()}
        data["removed_experts"] = {int(k): list(v) for k, v in data.get("removed_experts", {}).items()}
        return cls(**data)


def _split(result) -> tuple[dict[str, float], dict[str, list[float]]]:
    return result if isinstance(result, tuple) else (result, {})


def paired_difference(a: Row, b: Row, documents: dict[str, list[int]] | None = None
                      ) -> tuple[float, float | None]:
    """Mean NLL increase of `a` minus `b`, and its standard error from the per-window
    differences (same windows for both; None without per-window values): by document when
    `documents` gives each window's document (quality.json's "window_documents"), the
    unit every GRAPE standard error uses (grape.evaluation.stats); else by window, which
    understates it."""
    from grape.evaluation.stats import domain_mean_se

    diff = a.mean_increase - b.mean_increase
    domains = [d for d in a.windows if d in b.windows and len(a.windows[d]) == len(b.windows[d])]
    if not domains or len(domains) != len(a.nll) or any(len(a.windows[d]) < 2 for d in domains):
        return diff, None
    documents = documents or {}
    per_domain = {}
    for d in domains:
        groups = documents.get(d)
        if groups is not None and len(groups) != len(a.windows[d]):
            raise ValueError(f"{d}: {len(groups)} window documents for {len(a.windows[d])} windows")
        per_domain[d] = (np.asarray(a.windows[d]) - np.asarray(b.windows[d]), groups)
    return diff, domain_mean_se(per_domain)[1]


def nll_increase(nll: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    out = {d: nll[d] - baseline[d] for d in baseline}
    out["mean"] = sum(out.values()) / len(out)
    return out


LayerCurves = dict[int, np.ndarray]  # decoder layer -> (N+1,) cost of keeping n experts
_UNUSED_IDS = torch.zeros((1, 2), dtype=torch.long)  # see measure_layer_curves


# a SolveConfig -> the loss-verified search's plan (provenance["search"]["passes"] set)
Search = Callable[[SolveConfig], Plan]


def plan_for(method: Method, scores: Scores, budget: float, time_limit: float,
             measured: LayerCurves | None = None, search: Search | None = None) -> Plan:
    """Build the method's problem from the scores and solve it (the plan's `seconds` is the
    solve time; problem building is a few milliseconds)."""
    config = method.solve_config(budget, time_limit)
    if method.search:
        if search is None:
            raise ValueError(f"{method.name} needs a model to search with (run_table(search=...))")
        return search(config)
    problem = build_problem(scores, config)
    if method.curves == "measured":
        if measured is None:
            raise ValueError(f"{method.name} needs measured layer curves (measure_layer_curves)")
        layers = [dataclasses.replace(layer, cost_curve=measured[layer.index])
                  for layer in problem.layers]
        problem = Problem(layers, problem.budget, problem.objective, problem.constraints,
                          problem.model, {**problem.provenance, "cost_curve": "measured NLL"})
    return solve(problem, solver=method.solver, time_limit=time_limit)


def measure_layer_curves(
    base, scores: Scores, evaluate: Evaluate, baseline_nll: dict[str, float],
    fractions: Sequence[float] = (0.25, 0.5, 0.75), time_limit: float = 30.0,
    log: Callable[[str], None] = print,
) -> tuple[LayerCurves, list[dict]]:
    """Each MoE layer pruned alone to each fraction (uniform REAP's experts in that layer) and
    evaluated end to end: grape.searching.sensitivity.measure_nll_curves, each single-layer plan applied
    to a copy of `base` and scored by `evaluate` (mean NLL increase over the domains against
    `baseline_nll`). Returns per-layer curves of that increase against the kept count and one
    record per (fraction, layer). `time_limit` is unused (the uniform plans take no search)."""
    def measure(name: str, plan: Plan) -> np.ndarray:
        model = pruned_copy(base, plan, UNIFORM_REAP, scores)
        increase = nll_increase(_split(evaluate(model))[0], baseline_nll)["mean"]
        del model
        log(f"  {name}: mean dNLL {increase:+.4f}")
        return np.array([increase])

    # the reference is the unpruned model itself (increase 0); `measure` runs every forward
    # pass, so the token ids measure_nll_curves would read are never used
    found = measure_nll_curves(base, scores, _UNUSED_IDS, UNIFORM_REAP.criterion, fractions,
                               unpruned=np.zeros(1), measure=measure)
    increase = {(p["layer"], p["kept"]): p["nll_increase"] for p in found.points}
    records = []
    for fraction in fractions:
        try:
            plan = uniform_plan(scores, fraction, UNIFORM_REAP.criterion)
        except UserError as exc:  # e.g. routing groups forbid that many removals
            log(f"  no single-layer measurement at {fraction:.0%}: {exc}")
            continue
        for layer in plan.layers:
            if plan.removed[layer]:
                kept = len(plan.kept[layer])
                records.append({"layer": layer, "fraction": fraction, "kept": kept,
                                "removed": plan.removed[layer],
                                "nll_increase": increase[layer, kept]})
    return found.curves, records


def pruned_copy(base, plan: Plan, method: Method, scores: Scores):
    """A deep copy of the unpruned model with the plan applied (merges are frequency-weighted)."""
    model = copy.deepcopy(base)
    quiet = logging.getLogger("grape.pruning.apply")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the nearest-expert fallback warning is the intended merge
    try:
        apply(model, plan, method.apply, merge_weights=scores if method.apply == "merge" else None)
    finally:
        quiet.setLevel(level)
    return model


# model -> {domain: nll}, or ({domain: nll}, {domain: [per-window nll]}) for paired errors
Evaluate = Callable[[object], dict[str, float] | tuple[dict[str, float], dict[str, list[float]]]]
EvaluateTasks = Callable[[object], dict[str, float]]  # model -> {task: acc}


def run_table(
    base,
    scores: Scores,
    budgets: Sequence[float],
    methods: Sequence[Method],
    evaluate: Evaluate,
    baseline_nll: dict[str, float],
    *,
    model_name: str = "model",
    calibration: str = "mixed",
    time_limit: float = 30.0,
    measured: LayerCurves | None = None,
    search: Search | None = None,
    evaluate_tasks: EvaluateTasks | None = None,
    tasks_for: Callable[[Method, float], bool] = lambda method, budget: False,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Every method at every budget: solve, apply to a copy of `base`, evaluate."""
    rows = []
    for budget in budgets:
        plans: dict[tuple, Plan] = {}
        for method in methods:
            if method.plan_key not in plans:
                try:
                    plans[method.plan_key] = plan_for(method, scores, budget, time_limit,
                                                      measured, search)
                except UserError as exc:  # the budget is out of this model's reach
                    plans[method.plan_key] = None
                    log(f"  {model_name} {budget:.0%} {method.name}: no plan ({exc})")
            plan = plans[method.plan_key]
            if plan is None:
                continue
            start = time.perf_counter()
            model = pruned_copy(base, plan, method, scores)
            nll, windows = _split(evaluate(model))
            tasks = {}
            if evaluate_tasks is not None and tasks_for(method, budget):
                tasks = evaluate_tasks(model)
            del model
            row = Row(
                model=model_name, calibration=calibration, budget=float(budget),
                method=method.name, family=method.family, apply=method.apply,
                solver=plan.solver, status=plan.status, removed=plan.num_removed,
                kept=plan.kept_counts(), solve_seconds=plan.seconds,
                objective=None if math.isnan(plan.objective) else plan.objective,
                nll=nll, nll_increase=nll_increase(nll, baseline_nll), tasks=tasks,
                eval_seconds=time.perf_counter() - start, windows=windows,
                passes=int(plan.provenance.get("search", {}).get("passes", 0)),
                removed_experts={int(k): list(v) for k, v in plan.removed.items()},
            )
            rows.append(row)
            log(f"  {model_name} [{calibration}] {budget:.0%} {method.name:<26} "
                f"mean dNLL {row.mean_increase:+.4f}  kept {list(row.kept.values())}  "
                f"solve {row.solve_seconds:.2f}s")
    return rows
