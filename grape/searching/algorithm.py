"""Loss-verified allocation: candidate plans judged by their real effect on the model.

The solvers optimise proxies (importance sums, output-error curves) that are neither comparable
across layers nor additive, so the plan they find can be worse than simply removing the same
count from every layer. This stage measures instead of assuming:

1. seeds: the configured plan, the integer program on other objectives, and the uniform plan
   under every importance criterion (so the result is never worse than the best uniform plan
   *on the search tokens*);
2. each candidate costs one forward pass over held-out search tokens (tokens calibration did
   not see) with the routers masked to the plan's experts: no weights change, no copy; the
   decoder layers a plan shares with one measured before are not run again (grape.searching.prefix).
   Passes go through grape.searching.meter.Meter: the loaded model, or - for a model that does not
   fit - the checkpoint streamed one decoder layer at a time (grape.searching.sequential), the
   plans of each generation (the seeds, the curve points, a round of switches, ...) measured
   together on the search's hint; the same NLLs to the bit, so the same decisions;
3. measured per-layer NLL curves (grape.searching.sensitivity: each layer alone pruned at a few depths,
   one pass each, when they fit in half the budget) feed the integer program once more: its plan
   on *measured* costs is one more seed, and the curves are returned to be stored in the scores;
4. the within-layer criterion is chosen by measurement too: the incumbent's counts under every
   other criterion's order;
5. a level-switch local search from the incumbent (EvoPress-style): move a few experts of the
   budget from one layer to another, keep the move when the measured loss drops by a margin,
   shrink the step when no move helps; then, with passes left, each layer's own criterion;
6. stop at `SearchConfig.max_passes` forward passes and report what was spent. With a cache
   file every measurement is recorded as it is made, so an interrupted search resumes without
   repeating a pass.

Every candidate carries its :class:`~grape.searching.config.Role` (uniform seed, solver plan,
curves seed, move, ...); the rule that keeps the result no worse than uniform reads the role,
never the display name. The stage around this algorithm (search tokens from files, plan.json
and search.json written) is grape.searching.stage; the public function is ``grape.search``.

    result = search(model, scores, SolveConfig(budget=0.25), search_ids, groups=documents)
    result.best          # a Plan, checked against the problem's constraints
    result.table()       # every candidate with its measured NLL
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from grape.errors import DataError
from grape.searching.config import Candidate, Role, SearchConfig, SearchResult
from grape.searching.meter import Meter, confirmation_cache, curve_plans, evaluator_for
from grape.searching.sensitivity import (
    masked,
    mean_nll,
    measure_nll_curves,
    nll_curve_passes,
    sequence_nll,
    with_nll_curves,
)
from solvers.errors import UserError
from solvers.plan import Plan
from solvers.spec import SolveConfig, build_problem, plan_for


# -- seeds --------------------------------------------------------------------------------------
class Seed(NamedTuple):
    name: str
    role: Role
    plan: Plan
    criterion: str | None = None  # a uniform seed's criterion


def seed_plans(scores, config: SolveConfig, search: SearchConfig,
               given: Plan | None = None) -> tuple[list[Seed], list[str]]:
    """The configured plan (`given`, or else the configured solver's), the other objectives'
    and every uniform plan, each once; seeds the scores cannot support are skipped with a note."""
    wanted = [(f"exact {o} on {config.criterion}", Role.OBJECTIVE,
               replace(config, objective=o, solver="exact"), None)
              for o in search.objectives if o != config.objective]
    wanted += [(f"uniform {c}", Role.UNIFORM,
                replace(config, objective="additive", criterion=c, solver="uniform"), c)
               for c in search.criteria]
    seeds = [Seed("given plan", Role.SOLVER, given)] if given is not None else []
    if given is None:
        wanted.insert(0, (f"{config.solver} {config.objective} on {config.criterion}", Role.SOLVER,
                          config, None))
    notes, seen = [], {_key(s.plan) for s in seeds}
    for name, role, cfg, criterion in wanted:
        try:
            plan = plan_for(scores, cfg)
        except UserError as exc:
            notes.append(f"seed {name!r} skipped: {exc}")
            continue
        if _key(plan) not in seen:
            seen.add(_key(plan))
            seeds.append(Seed(name, role, plan, criterion))
    return seeds, notes


def _key(plan: Plan) -> tuple:
    return tuple((layer, tuple(plan.kept[layer])) for layer in plan.layers)


# -- the search ---------------------------------------------------------------------------------
def search(model, scores, config: SolveConfig, ids: torch.Tensor,
           search_config: SearchConfig | None = None, cache: str | os.PathLike | None = None,
           confirm_ids: torch.Tensor | None = None, plan: Plan | None = None, *,
           groups=None, confirm_groups=None) -> SearchResult:
    """The best plan found by measurement (see the module docstring). `cache`: a JSON file
    of measurements to resume from and add to. `confirm_ids`: held-out tokens of other documents
    (typically several times `ids`) on which the finalists - every uniform seed, the search's
    choice and its runners-up - are measured again and the final choice made, so that the
    selection on `ids` does not bias it. `groups` / `confirm_groups`: the document of each row
    (standard errors are by document; None: each row its own). `plan`: a plan to start from
    instead of the configured solver's (it must meet `config`'s budget and constraints).
    `model`: the loaded model (nn.Module), or a checkpoint opened for layer-by-layer measurement
    (grape.searching.sequential.LayerStream): the same plans and NLLs, a generation at a time."""
    search_config = search_config or SearchConfig()
    search_config.check_names()
    search_config, lacking = _available_criteria(scores, search_config)
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise DataError("search tokens must be a (samples, seq_len >= 2) tensor of input ids")
    problem = build_problem(scores, config)
    if plan is not None:
        check_given_plan(plan, problem)
    start = time.perf_counter()
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    meter = Meter(evaluator_for(model, ids, search_config), ids, search_config,
                  Path(cache) if cache is not None else None, groups)
    try:
        seeds, notes = seed_plans(scores, config, search_config, plan)
        meter.prefetch([None, *(s.plan for s in seeds)])  # one generation: the reference and the seeds
        unpruned_seq = meter.nll("unpruned", None)
        notes[:0] = lacking
        if not seeds:
            raise UserError("no seed plan could be built for the search: " + "; ".join(notes))
        candidates = [meter.candidate(s.name, s.plan, s.role, s.criterion) for s in seeds[: meter.left]]
        best, curves = _improve(model, scores, config, problem, candidates, meter, search_config, notes,
                                unpruned_seq)
        confirmed, versus = [], _versus_uniform(best, candidates, "search")
        if confirm_ids is not None and search_config.confirm:
            best, confirmed, versus = _confirm(model, best, candidates, confirm_ids, search_config, cache,
                                               confirm_groups, notes)
        elif search_config.confirm:
            notes.append("no confirmation tokens: the choice was made on the tokens the search selected on")
    finally:
        meter.bar.close()
        if was_training:
            model.train()
    return SearchResult(best=best, candidates=candidates, unpruned_nll=float(unpruned_seq.mean()),
                        passes=meter.used, tokens_per_pass=int(ids.numel()),
                        seconds=time.perf_counter() - start, notes=notes, nll_curves=curves,
                        reused=meter.reused, confirmed=confirmed,
                        computed_passes=meter.computed_passes,
                        confirm_tokens=int(confirm_ids.numel()) if confirmed else 0, versus_uniform=versus,
                        mode=model.record() if not isinstance(model, nn.Module) else {"mode": "whole"})


def _improve(model, scores, config, problem, candidates, meter, search_config, notes, unpruned_seq):
    """From the measured seeds: the curves seed, the criterion choice, the level switches and
    the per-layer criteria, while passes are left; (incumbent, measured NLL curves or None)."""
    count_level = not problem.needs_expert_level()
    best = _choose_seed(candidates, search_config)
    # a uniform incumbent brings its own criterion; any other plan the configured one
    criterion = (best.criterion if best.role is Role.UNIFORM and best.criterion else
                 problem.provenance.get("criterion", "reap_mass"))
    orders, curves = _orders(scores, criterion), None
    if count_level and search_config.nll_curves:
        curves, best = _curves_seed(model, scores, config, problem, criterion, orders, best, meter,
                                    search_config, candidates, notes, unpruned_seq)
    if not count_level:
        notes.append("criterion choice and local search skipped: a constraint depends on which "
                     "experts are kept")
        return best, curves
    best, orders = _choose_criterion(problem, scores, best, orders, meter, search_config, candidates)
    best = _local_search(problem, best, orders, meter, search_config, candidates)
    best, orders = _per_layer_criteria(problem, scores, best, orders, meter, search_config, candidates)
    return best, curves


def check_given_plan(plan: Plan, problem) -> None:
    """A plan to start from must be one the problem allows: same layers, budget and constraints."""
    if sorted(plan.layers) != sorted(layer.index for layer in problem.layers):
        raise UserError(f"the plan covers MoE layers {sorted(plan.layers)}, the scores "
                        f"{[layer.index for layer in problem.layers]}: a plan of another model?")
    broken = [msg for c in problem.all_constraints if (msg := c.check(plan, problem))]
    if broken:
        raise UserError(f"the plan does not meet the problem ({broken[0]}); give the budget and "
                        "constraints it was solved under")


def _available_criteria(scores, config: SearchConfig) -> tuple[SearchConfig, list[str]]:
    """`config` with only the criteria the scores can compute (an older file has no
    `reconstruction`), and a note for each one dropped."""
    have = tuple(c for c in config.criteria if scores.has_criterion(c))
    if not have:
        raise UserError(f"--search-criteria {','.join(config.criteria)}: none is in the scores file; "
                        "add reap_mass (always available) or re-run `grape calibrate`")
    notes = [f"criterion {c!r} skipped: not in the scores file (re-run `grape calibrate` to record it)"
             for c in config.criteria if c not in have]
    return replace(config, criteria=have), notes


def _confirm(model, best: Candidate, candidates: list[Candidate], ids: torch.Tensor, config: SearchConfig,
             cache, groups, notes: list[str]) -> tuple[Candidate, list[dict], dict | None]:
    """The final choice on the confirmation tokens, by the seed rule: the best uniform plan there
    is the incumbent, and the search's choice - or one of the `runners_up` next-best candidates
    that beat every uniform plan on the search tokens - replaces it only by `margin_se` standard
    errors (by document). Too few confirmation tokens or documents to tell plans apart: the best
    uniform plan there. Returns (the choice, each finalist's confirmation NLL, the choice
    against the best uniform plan)."""
    from grape.evaluation.stats import count_units

    if ids.dim() != 2 or ids.shape[1] < 2:
        raise DataError("confirmation tokens must be a (samples, seq_len >= 2) tensor of input ids")
    finalists = _finalists(best, candidates, config.runners_up)
    path = confirmation_cache(cache) if cache is not None else None
    meter = Meter(evaluator_for(model, ids, config), ids, replace(config, max_passes=len(finalists)), path,
                  groups)
    meter.prefetch([c.plan for c in finalists])
    try:
        measured = [meter.candidate(c.name, c.plan, c.role, c.criterion) for c in finalists]
    finally:
        meter.bar.close()
    documents = count_units(groups) if groups is not None else int(ids.shape[0])
    enough = ids.numel() >= config.min_confirm_tokens and documents >= config.min_confirm_documents
    uniform = _uniform(measured)
    if enough or not uniform:
        chosen = _choose_seed(measured, config)
    else:
        chosen = min(uniform, key=lambda c: c.nll)
        notes.append(f"confirmation on {ids.numel():,} tokens of {documents} documents, below the "
                     f"minimum ({config.min_confirm_tokens:,} tokens, {config.min_confirm_documents} "
                     "documents) for adopting a non-uniform plan: the best uniform plan there is kept")
    record = []
    for c in measured:
        row = {"name": c.name, "role": c.role.value, "nll": c.nll, "chosen": c is chosen}
        if uniform:
            row["difference_vs_best_uniform"], row["se"] = c.difference(min(uniform, key=lambda u: u.nll))
        record.append(row)
    return finalists[measured.index(chosen)], record, _versus_uniform(chosen, measured, "confirmation")


def _finalists(best: Candidate, candidates: list[Candidate], runners_up: int) -> list[Candidate]:
    """Every uniform seed, the search's choice, and up to `runners_up` other candidates that beat
    every uniform seed on the search tokens (a real gain the small search sample showed by less
    than the margin gets a second, larger hearing)."""
    uniform = _uniform(candidates)
    floor = min((c.nll for c in uniform), default=float("inf"))
    finalists = uniform + ([best] if best not in uniform else [])
    seen, wanted = {_key(c.plan) for c in finalists}, len(finalists) + runners_up
    for c in sorted(candidates, key=lambda c: c.nll):
        if len(finalists) >= wanted or c.nll >= floor:
            break
        if _key(c.plan) not in seen:
            finalists.append(c)
            seen.add(_key(c.plan))
    return finalists


def _versus_uniform(chosen: Candidate, measured: list[Candidate], on: str) -> dict | None:
    """The choice against the best uniform plan on the same tokens: NLL difference (negative:
    the choice is better) and its standard error by document."""
    from grape.evaluation.stats import count_units

    uniform = _uniform(measured)
    if not uniform:
        return None
    best = min(uniform, key=lambda c: c.nll)
    diff, se = chosen.difference(best)
    rows = len(chosen.per_sequence)
    return {"best_uniform": best.name, "difference": diff, "se": se, "on": on,
            "documents": count_units(chosen.groups) if chosen.groups is not None else rows}


def _uniform(candidates: list[Candidate]) -> list[Candidate]:
    """The uniform seeds among `candidates` (the plans the result must never be worse than)."""
    return [c for c in candidates if c.role is Role.UNIFORM]


def _choose_seed(candidates: list[Candidate], config: SearchConfig) -> Candidate:
    """The best uniform seed is the incumbent; another seed replaces it only when it is
    clearly (margin_se paired standard errors) better on the search tokens."""
    uniform = _uniform(candidates)
    best = min(uniform or candidates, key=lambda c: c.nll)
    for c in sorted(candidates, key=lambda c: c.nll):
        if c is not best and c.beats(best, config.margin_se):
            best = c
    return best


def _orders(scores, criterion: str) -> dict[int, np.ndarray]:
    """Each layer's experts from most to least important under `criterion`."""
    return {layer: np.argsort(-imp, kind="stable") for layer, imp in scores.importance(criterion).items()}


def _counts(problem, plan: Plan) -> np.ndarray:
    return np.array([len(plan.kept[layer.index]) for layer in problem.layers])


def _curves_seed(model, scores, config, problem, criterion, orders, best, meter, search_config,
                 candidates, notes, unpruned_seq):
    """Measure per-layer NLL curves (when they fit in half the passes left) and add the integer
    program's plan on them as a candidate; (curves or None, incumbent)."""
    if all(ls.nll_curve is not None for ls in scores.layers.values()):
        notes.append("NLL curves: the scores already have them; not measured again")
        return None, best
    total = sum(ls.num_experts for ls in scores.layers.values())
    fractions = _curve_depths(scores, search_config.curve_fractions, best.plan.num_removed / max(total, 1),
                              meter.left // 2)
    if not fractions:
        need = nll_curve_passes(scores, search_config.curve_fractions[:1])
        notes.append(f"NLL curves skipped: even one depth needs {need} passes, {meter.left} left "
                     "(raise --search-passes to measure them)")
        return None, best
    if len(fractions) < len(search_config.curve_fractions):
        notes.append(f"NLL curves at {len(fractions)} of {len(search_config.curve_fractions)} depths "
                     f"({', '.join(f'{f:.0%}' for f in fractions)} removed), the ones nearest the "
                     "budget, to stay within half the passes left")
    meter.prefetch(lambda: curve_plans(scores, criterion, fractions, config))  # one generation
    curves = measure_nll_curves(model, scores, meter.ids, criterion, fractions, config,
                                search_config.batch_size, unpruned_seq, measure=meter.nll)
    measured = with_nll_curves(scores, curves)
    cfg = replace(config, objective="curves", curves="nll", solver="exact", criterion=criterion)
    try:
        counts = _counts(problem, plan_for(measured, cfg))
    except UserError as exc:
        notes.append(f"seed 'exact curves on measured NLL' skipped: {exc}")
        return curves, best
    plan = _plan_from_counts(problem, orders, counts, best.plan)
    if plan is None or meter.left < 1:
        return curves, best
    candidate = meter.candidate(f"exact curves on measured NLL ({criterion} order)", plan, Role.CURVES)
    candidates.append(candidate)
    return curves, candidate if candidate.beats(best, search_config.margin_se) else best


def _curve_depths(scores, fractions: tuple[float, ...], budget: float, passes: int) -> tuple[float, ...]:
    """As many of `fractions` as `passes` allow (one pass per layer and depth), nearest the
    budget's removed fraction first; ascending. On a 48-94-layer model all three depths would
    take most of the passes, one or two still give the program measured costs where it decides."""
    fit = passes // max(nll_curve_passes(scores, (0.5,)), 1)
    nearest = sorted(fractions, key=lambda f: (abs(f - budget), f))[:fit]
    return tuple(sorted(nearest))


def _adopt(name: str, role: Role, plan: Plan, trial, best: Candidate, orders, meter, config, candidates):
    """Measure `plan` (made with the `trial` orders); (incumbent, its orders) afterwards."""
    candidate = meter.candidate(name, plan, role)
    candidates.append(candidate)
    return (candidate, trial) if candidate.beats(best, config.margin_se) else (best, orders)


def _choose_criterion(problem, scores, best, orders, meter, config, candidates):
    """The incumbent's counts under every other criterion's within-layer order."""
    counts = _counts(problem, best.plan)
    meter.prefetch(lambda: _criterion_trials(problem, scores, config.criteria, counts, best.plan, candidates))
    for criterion in config.criteria:
        trial = _orders(scores, criterion)
        plan = _plan_from_counts(problem, trial, counts, best.plan)
        if plan is None or _key(plan) in {_key(c.plan) for c in candidates} or meter.left < 1:
            continue
        best, orders = _adopt(f"{criterion} order, incumbent's counts", Role.CRITERION, plan, trial, best, orders, meter,
                              config, candidates)
    return best, orders


def _criterion_trials(problem, scores, criteria, counts, incumbent: Plan, candidates) -> list[Plan]:
    """The plans _choose_criterion measures (the counts stay; a plan measured before is skipped)."""
    seen, plans = {_key(c.plan) for c in candidates}, []
    for criterion in criteria:
        plan = _plan_from_counts(problem, _orders(scores, criterion), counts, incumbent)
        if plan is not None and _key(plan) not in seen:
            seen.add(_key(plan))
            plans.append(plan)
    return plans


def _per_layer_criteria(problem, scores, best, orders, meter, config, candidates):
    """With passes left: each layer's experts under each other criterion, one layer at a time."""
    counts = _counts(problem, best.plan)
    by_criterion = {criterion: _orders(scores, criterion) for criterion in config.criteria}
    pairs = [(layer.index, criterion) for layer in problem.layers for criterion in by_criterion]
    for i, (layer, criterion) in enumerate(pairs):
        if meter.left < 1:
            return best, orders
        trial = {**orders, layer: by_criterion[criterion][layer]}
        plan = _plan_from_counts(problem, trial, counts, best.plan)
        if plan is None or _key(plan) == _key(best.plan):
            continue
        if not meter.ready(plan):  # the trials left, from the incumbent as it is now: one generation
            meter.prefetch(lambda: _layer_trials(problem, by_criterion, orders, counts, best.plan, pairs[i:]))
        best, orders = _adopt(f"layer {layer} in {criterion} order", Role.LAYER_CRITERION, plan, trial, best,
                              orders, meter, config, candidates)
    return best, orders


def _layer_trials(problem, by_criterion, orders, counts, incumbent: Plan, pairs) -> list[Plan]:
    """The plans _per_layer_criteria measures for `pairs` while the incumbent stays."""
    plans = (_plan_from_counts(problem, {**orders, layer: by_criterion[c][layer]}, counts, incumbent)
             for layer, c in pairs)
    return [p for p in plans if p is not None and _key(p) != _key(incumbent)]


def _local_search(problem, best: Candidate, orders, meter: Meter, config: SearchConfig,
                  candidates: list[Candidate]) -> Candidate:
    """Level switches between layers around `best`, measured, while passes are left."""
    allowed = problem.allowed_counts()
    counts = _counts(problem, best.plan)
    step = max(1, round(0.05 * max(layer.num_experts for layer in problem.layers)))
    rng = np.random.default_rng(config.seed)
    while meter.left > 0 and step >= 1:
        moves = _moves(counts, allowed, step, rng, min(config.moves_per_round, meter.left))
        improved = False
        for i, (a, b) in enumerate(moves):
            trial = _switched(counts, a, b, step)
            plan = _plan_from_counts(problem, orders, trial, best.plan)
            if plan is None:
                continue
            if not meter.ready(plan):  # the round's moves left, from the counts as they are now
                meter.prefetch(lambda: _round(problem, orders, counts, moves[i:], step, best.plan))
            name = f"switch {step} from layer {problem.layers[b].index} to {problem.layers[a].index}"
            candidate = meter.candidate(name, plan, Role.MOVE)
            candidates.append(candidate)
            if candidate.beats(best, config.margin_se):
                best, counts, improved = candidate, trial, True
        if not improved:
            step //= 2
    return best


def _switched(counts: np.ndarray, a: int, b: int, step: int) -> np.ndarray:
    trial = counts.copy()
    trial[a] += step
    trial[b] -= step
    return trial


def _round(problem, orders, counts, moves, step: int, incumbent: Plan) -> list[Plan]:
    """The plans _local_search measures for `moves` while the incumbent stays."""
    plans = (_plan_from_counts(problem, orders, _switched(counts, a, b, step), incumbent) for a, b in moves)
    return [p for p in plans if p is not None]


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


def _plan_from_counts(problem, orders, counts, template: Plan) -> Plan | None:
    """Keep each layer's top `counts[p]` experts by its order; None if a constraint objects."""
    kept, removed = {}, {}
    for p, layer in enumerate(problem.layers):
        ranked = orders[layer.index]
        kept[layer.index] = sorted(int(e) for e in ranked[: counts[p]])
        removed[layer.index] = sorted(int(e) for e in ranked[counts[p]:])
    plan = Plan(kept=kept, removed=removed, status="feasible", solver="search", model=template.model,
                provenance={**template.provenance, "method": "loss-verified search"})
    if any(c.check(plan, problem) for c in problem.all_constraints):
        return None
    return plan


__all__ = ["Candidate", "Role", "SearchConfig", "SearchResult", "Seed", "check_given_plan", "masked",
           "mean_nll", "search", "seed_plans", "sequence_nll"]
