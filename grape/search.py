"""Loss-verified allocation: candidate plans judged by their real effect on the model.

The solvers optimise proxies (importance sums, output-error curves) that are neither comparable
across layers nor additive, so the plan they find can be worse than simply removing the same
count from every layer. This stage measures instead of assuming:

1. seeds: the configured plan, the integer program on other objectives, and the uniform plan
   under every importance criterion (so the result is never worse than the best uniform plan
   *on the search tokens*);
2. each candidate costs one forward pass over held-out search tokens (tokens calibration did
   not see) with the routers masked to the plan's experts: no weights change, no copy;
3. a level-switch local search from the best seed (EvoPress-style): move a few experts of the
   budget from one layer to another, keep the move when the measured loss drops, shrink the
   step when no move helps; within each layer the experts kept are the best seed's criterion's
   top ones;
4. stop at `SearchConfig.max_passes` forward passes and report what was spent.

    result = search(model, scores, SolveConfig(budget=0.25), search_ids)
    result.best          # a Plan, checked against the problem's constraints
    result.table()       # every candidate with its measured NLL
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from grape.adapters import get_adapter
from grape.config import SolveConfig
from grape.errors import DataError
from grape.templates.grape_pruning import install_router_mask
from solvers.errors import UserError
from solvers.plan import Plan


@dataclass(frozen=True)
class SearchConfig:
    """How much to spend on measuring plans. One pass = one forward over the search tokens."""

    max_passes: int = 200
    criteria: tuple[str, ...] = ("reap_mass", "frequency", "reap")  # uniform seeds, within-layer orders
    objectives: tuple[str, ...] = ("additive", "curves")  # integer-program seeds besides the configured one
    moves_per_round: int = 8  # level switches measured per round of the local search
    # a candidate replaces the incumbent only when its NLL is lower by this many paired standard
    # errors (over search sequences): many comparisons on few tokens otherwise pick noise
    margin_se: float = 2.0
    batch_size: int = 8  # search sequences per forward
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_passes", "moves_per_round", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"search {name} must be at least 1, got {getattr(self, name)}")


@dataclass
class Candidate:
    name: str
    plan: Plan
    nll: float  # mean NLL per predicted search token (nats)
    per_sequence: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)  # mean NLL of each

    def beats(self, other: "Candidate", margin_se: float) -> bool:
        """Lower NLL than `other` by more than `margin_se` paired standard errors."""
        diff = self.per_sequence - other.per_sequence
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
        return float(diff.mean()) < -margin_se * se and self.nll < other.nll


@dataclass
class SearchResult:
    best: Candidate
    candidates: list[Candidate]
    unpruned_nll: float
    passes: int
    tokens_per_pass: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = ["| candidate | mean NLL | increase |", "|---|---:|---:|"]
        for c in sorted(self.candidates, key=lambda c: c.nll):
            mark = " **(chosen)**" if c is self.best else ""
            rows.append(f"| {c.name}{mark} | {c.nll:.4f} | {c.nll - self.unpruned_nll:+.4f} |")
        return "\n".join(rows)

    def to_json(self) -> dict:
        return {"chosen": self.best.name, "unpruned_nll": self.unpruned_nll, "passes": self.passes,
                "tokens_per_pass": self.tokens_per_pass, "seconds": self.seconds, "notes": self.notes,
                "candidates": [{"name": c.name, "nll": c.nll,
                                "kept_per_layer": {str(k): v for k, v in c.plan.kept_counts().items()}}
                               for c in self.candidates]}


# -- measuring ----------------------------------------------------------------------------------
@contextlib.contextmanager
def masked(model: nn.Module, plan: Plan):
    """The model routing only among the plan's kept experts (weights untouched), for the block."""
    adapter = get_adapter(model)
    routers = []
    try:
        for layer in plan.layers:
            router = adapter.router(layer)
            if hasattr(router, "_grape_keep"):
                raise DataError("the model's routers are already masked; search an unmasked model")
            install_router_mask(router, plan.kept[layer], min(int(router.top_k), len(plan.kept[layer])))
            routers.append(router)
        yield model
    finally:
        for router in routers:
            for name in ("forward", "_grape_keep", "_grape_top_k"):
                router.__dict__.pop(name, None)


@torch.no_grad()
def sequence_nll(model: nn.Module, ids: torch.Tensor, batch_size: int) -> np.ndarray:
    """Mean next-token NLL (nats) of each row of `ids` (samples, seq_len)."""
    device = model.get_input_embeddings().weight.device
    out = []
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        out.append(loss.mean(dim=1).cpu().double().numpy())
    return np.concatenate(out)


def mean_nll(model: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL (nats) over every predicted position of `ids` (equal-length rows)."""
    return float(sequence_nll(model, ids, batch_size).mean())


# -- seeds --------------------------------------------------------------------------------------
def seed_plans(scores, config: SolveConfig, search: SearchConfig) -> tuple[list[tuple[str, Plan]], list[str]]:
    """(name, plan) for the configured plan, the other objectives' and every uniform plan;
    seeds the scores cannot support are skipped with a note."""
    from grape.api import build_problem, solve

    wanted = [(f"{config.solver} {config.objective} on {config.criterion}", config)]
    wanted += [(f"exact {o} on {config.criterion}", replace(config, objective=o, solver="exact"))
               for o in search.objectives if o != config.objective]
    wanted += [(f"uniform {c}", replace(config, objective="additive", criterion=c, solver="uniform"))
               for c in search.criteria]
    seeds, notes, seen = [], [], set()
    for name, cfg in wanted:
        try:
            plan = solve(build_problem(scores, cfg), cfg)
        except UserError as exc:
            notes.append(f"seed {name!r} skipped: {exc}")
            continue
        key = _key(plan)
        if key not in seen:
            seen.add(key)
            seeds.append((name, plan))
    return seeds, notes


def _key(plan: Plan) -> tuple:
    return tuple((layer, tuple(plan.kept[layer])) for layer in plan.layers)


# -- the search ---------------------------------------------------------------------------------
class _Budget:
    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    @property
    def left(self) -> int:
        return self.limit - self.used


def search(model: nn.Module, scores, config: SolveConfig, ids: torch.Tensor,
           search_config: SearchConfig | None = None) -> SearchResult:
    """The best plan found by measurement (see the module docstring)."""
    from grape.api import build_problem

    search_config = search_config or SearchConfig()
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise DataError("search tokens must be a (samples, seq_len >= 2) tensor of input ids")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    budget = _Budget(search_config.max_passes)
    try:
        unpruned = mean_nll(model, ids, search_config.batch_size)
        budget.used += 1  # the unpruned pass is part of the spend
        seeds, notes = seed_plans(scores, config, search_config)
        if not seeds:
            raise UserError("no seed plan could be built for the search: " + "; ".join(notes))
        candidates = []
        for name, plan in seeds[: budget.left]:
            candidates.append(_measure(model, name, plan, ids, search_config, budget))
        best = _choose_seed(candidates, search_config)
        problem = build_problem(scores, config)
        if problem.needs_expert_level():
            notes.append("local search skipped: a constraint depends on which experts are kept")
        else:
            best = _local_search(model, problem, scores, best, ids, search_config, budget, candidates)
    finally:
        model.train(was_training)
    return SearchResult(best=best, candidates=candidates, unpruned_nll=unpruned, passes=budget.used,
                        tokens_per_pass=int(ids.numel()), seconds=time.perf_counter() - start, notes=notes)


def _measure(model, name: str, plan: Plan, ids, config: SearchConfig, budget: _Budget) -> Candidate:
    with masked(model, plan):
        per_sequence = sequence_nll(model, ids, config.batch_size)
    budget.used += 1
    nll = float(per_sequence.mean())
    if config.progress:
        print(f"    search [{budget.used}/{budget.limit}] {name}: NLL {nll:.4f}", flush=True)
    return Candidate(name, plan, nll, per_sequence)


def _choose_seed(candidates: list[Candidate], config: SearchConfig) -> Candidate:
    """The best uniform seed is the incumbent; another seed replaces it only when it is
    clearly (margin_se paired standard errors) better on the search tokens."""
    uniform = [c for c in candidates if c.name.startswith("uniform ")]
    best = min(uniform or candidates, key=lambda c: c.nll)
    for c in sorted(candidates, key=lambda c: c.nll):
        if c is not best and c.beats(best, config.margin_se):
            best = c
    return best


def _criterion_of(candidate: Candidate, default: str, criteria: tuple[str, ...]) -> str:
    return next((c for c in criteria if candidate.name == f"uniform {c}"), default)


def _local_search(model, problem, scores, best: Candidate, ids, config: SearchConfig,
                  budget: _Budget, candidates: list[Candidate]) -> Candidate:
    """Level switches between layers around `best`, measured, while passes are left."""
    criterion = _criterion_of(best, problem.provenance.get("criterion", "reap_mass"), config.criteria)
    order = {layer: np.argsort(-imp, kind="stable") for layer, imp in scores.importance(criterion).items()}
    allowed = problem.allowed_counts()
    counts = np.array([len(best.plan.kept[layer.index]) for layer in problem.layers])
    step = max(1, int(round(0.05 * max(layer.num_experts for layer in problem.layers))))
    rng = np.random.default_rng(config.seed)
    while budget.left > 0 and step >= 1:
        moves = _moves(counts, allowed, step, rng, min(config.moves_per_round, budget.left))
        improved = False
        for a, b in moves:
            trial = counts.copy()
            trial[a] += step
            trial[b] -= step
            plan = _plan_from_counts(problem, order, trial, best.plan)
            if plan is None:
                continue
            name = f"switch {step} from layer {problem.layers[b].index} to {problem.layers[a].index}"
            candidate = _measure(model, name, plan, ids, config, budget)
            candidates.append(candidate)
            if candidate.beats(best, config.margin_se):
                best, counts, improved = candidate, trial, True
        if not improved:
            step //= 2
    return best


def _moves(counts, allowed, step: int, rng, how_many: int) -> list[tuple[int, int]]:
    """Random feasible (a, b): layer a keeps `step` more experts, layer b `step` fewer."""
    n = len(counts)
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b
             and counts[a] + step < len(allowed[a]) and allowed[a][counts[a] + step]
             and counts[b] - step >= 0 and allowed[b][counts[b] - step]]
    if not pairs:
        return []
    picks = rng.choice(len(pairs), size=min(how_many, len(pairs)), replace=False)
    return [pairs[i] for i in sorted(picks)]


def _plan_from_counts(problem, order, counts, template: Plan) -> Plan | None:
    """Keep each layer's top `counts[p]` experts by the order; None if a constraint objects."""
    kept, removed = {}, {}
    for p, layer in enumerate(problem.layers):
        ranked = order[layer.index]
        kept[layer.index] = sorted(int(e) for e in ranked[: counts[p]])
        removed[layer.index] = sorted(int(e) for e in ranked[counts[p]:])
    plan = Plan(kept=kept, removed=removed, status="feasible", solver="search", model=template.model,
                provenance={**template.provenance, "method": "loss-verified search"})
    if any(c.check(plan, problem) for c in problem.all_constraints):
        return None
    return plan


__all__ = ["Candidate", "SearchConfig", "SearchResult", "masked", "mean_nll", "search", "seed_plans",
           "sequence_nll"]
