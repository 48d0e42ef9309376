"""The exact solver: an integer program solved by OR-Tools (HiGHS), with a proof or a gap.

Which program depends on what the problem allows, always the smallest one that is still exact:

1. **count level, exact curves** - when every constraint is about counts (and the layer rules)
   and each layer's best kept set of size n is known exactly (additive and curve objectives:
   keep the most important; any objective on layers small enough to enumerate), the whole
   problem is a multiple-choice knapsack over one-hot count indicators. Optimal with proof.
2. **count level, heuristic curves + certificate** - redundancy or coverage on larger layers:
   the best *known* kept set for each n (removal greedy; swap local search around the chosen
   counts, also started from the other heuristics' plans and from the rounded relaxation) gives
   the plan; :mod:`solvers.certify` proves per-layer, per-count lower bounds (first-order convex
   bounds for quadratic terms, Lagrangian LP bounds for coverage), and the same count program
   over them gives the bound, re-evaluated where that program's counts move (cutting planes).
3. **expert level** - when a constraint depends on *which* experts are kept (expert-parallel
   memory caps, byte budgets with unequal experts): the repaired greedy plan, the full program
   over keep variables where it is small enough, and the certificate over the counts (without
   the expert-level constraints, so still a valid bound).

Phases are bounded by work (iterations, swaps, HiGHS nodes), not by the clock, so the same
inputs give the same plan and bound on a busy machine; the time limit only decides, *between*
phases and from size-based estimates, whether the next phase starts. The best plan and the best
bound of any phase are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from solvers.certify import Certificate
from solvers.constraints.precheck import conflict_message
from solvers.errors import InfeasibleError
from solvers.formulation import Formulation, solve_count_program
from solvers.knapsack import KnapsackCache
from solvers.layer_search import (
    build_curves,
    improve_curves,
    local_search,
    round_point,
    search_seconds,
    seed_curves,
)
from solvers.layer_program import layer_program, layer_program_size
from solvers.registry import Outcome, Solver, register_solver

OPTIMAL_GAP = 1e-6
SEARCH_WIDTHS = (2, 4, 8)  # allowed counts searched on either side of the chosen ones
CUT_ROUNDS = 40  # certificate re-evaluations at the counts the bound program picks
CUT_PAYS = 0.1  # a round must close this share of the gap for the next one to run
CUT_TARGET = 1e-6  # past the first round, cuts run only while the gap is above this
CERT_SHARE = 0.3  # of the time limit the certificate may take, by its size-based estimate
SDP_GAP = 1e-3  # below this gap the SDP shift is not worth its time
# above this many pair variables the linearised redundancy program is not worth building
MAX_PAIR_VARIABLES = 200_000
# ...and when a constraint forces the expert level: its LP bound is weak, so only small ones
MAX_PAIRS_WHEN_FORCED = 20_000
MIP_NODES = 5_000  # branch-and-bound nodes of an expert-level program (work, not time)
VARIABLES_PER_SECOND = 2500  # expert-level program sizes HiGHS gets through, per second
MIP_SHARE = 0.5  # of the time limit the expert-level program may take, by that estimate
LAYER_SHARE = 0.05  # ... and the one-layer programs together
LAYER_VARIABLES_PER_SECOND = 20_000  # one-layer programs are nearly integral: fast per variable
LAYER_ROUNDS = 3  # one-layer programs at the plan's and the bound program's counts, then cuts


def relative_gap(value: float, bound: float | None) -> float | None:
    if bound is None:
        return None
    return max(0.0, (value - bound) / max(abs(value), 1e-12))


def expert_program_size(problem) -> int:
    """Rough number of variables of the expert-level program."""
    size = problem.total_experts
    for _, term in problem.objective.terms:
        for layer in problem.layers:
            if term.name == "redundancy":
                size += int(np.count_nonzero(np.triu(layer.similarity, 1)))
            elif term.name == "coverage":
                size += layer.num_experts * (min(term.candidates, layer.num_experts - 1) + 2)
    return size


def count_seconds(problem) -> float:
    """Estimated seconds of one count-level program (building it dominates: ~1 s on Kimi-K2)."""
    return 0.05 + 8e-5 * sum(int(a.sum()) for a in problem.allowed_counts())


def curve_seconds(problem) -> float:
    """Estimated seconds of one greedy pass over every layer (removal greedy curves, or one
    greedy plan): N removals, each scanning the layer's deltas (~1.2 s on Kimi-K2)."""
    return 0.02 + 5e-10 * sum(layer.num_experts**3 for layer in problem.layers)


def _pairs_ok(problem, limit: int | None = None) -> bool:
    """Whether the linearised redundancy program (a variable per similar pair) is worth building."""
    if "redundancy" not in problem.objective.names:
        return True
    pairs = sum(int(np.count_nonzero(np.triu(layer.similarity, 1))) for layer in problem.layers)
    return pairs <= (limit or MAX_PAIR_VARIABLES)


def _value(problem, masks) -> float:
    layers = problem.layers
    return float(sum(problem.objective.layer_value(layer, m) for layer, m in zip(layers, masks)))


@dataclass
class Progress:
    """The best plan and the best bound found by any phase so far (neither is ever dropped)."""

    masks: list
    value: float
    bound: float | None = None
    counts: np.ndarray | None = None
    lb_counts: np.ndarray | None = None  # the counts the last bound program chose
    cut: bool = False  # a phase was skipped or stopped for lack of time
    method: list = field(default_factory=list)
    phases: list = field(default_factory=list)  # (phase, value, bound) after each phase

    def note(self, phase: str) -> None:
        self.phases.append({"phase": phase, "value": self.value, "bound": self.bound})

    def offer_plan(self, masks, value: float) -> bool:
        if value < self.value - 1e-12 * max(1.0, abs(value)):
            self.masks, self.value = masks, value
            self.counts = np.array([int(m.sum()) for m in masks])
            return True
        return False

    def offer_bound(self, bound: float | None) -> None:
        if bound is not None and np.isfinite(bound):
            self.bound = bound if self.bound is None else max(self.bound, bound)

    def gap(self) -> float | None:
        return relative_gap(self.value, self.bound)

    def closed(self) -> bool:
        gap = self.gap()
        return gap is not None and gap <= OPTIMAL_GAP

    def outcome(self) -> Outcome:
        status = "optimal" if self.closed() else ("time_limit" if self.cut else "feasible")
        info = {"method": "; ".join(self.method), "phases": self.phases}
        return Outcome(self.masks, status, self.bound, info=info)


@register_solver
class ExactSolver(Solver):
    name = "exact"
    guarantee = (
        "optimal with proof when it says so; otherwise the best plan found with a proven "
        "lower bound and gap (heuristic curves, or the time limit)"
    )

    def __init__(self, time_limit: float = 60.0, **options):
        super().__init__(time_limit, **options)
        self._tables = {"value": KnapsackCache(), "bound": KnapsackCache()}  # one per program
        self._cert_budget = CERT_SHARE * self.time_limit  # estimated seconds, over all rounds

    def run(self, problem) -> Outcome:
        if problem.needs_expert_level():
            return self._expert_level(problem)
        if not problem.objective.order_exact and not self.fits(curve_seconds(problem)):
            return self._fallback(problem, None, "per-layer curves skipped (time limit)")
        curves = build_curves(problem, self.time_limit)
        if all(c.exact for c in curves):
            return self._exact_curves(problem, curves)
        return self._heuristic_curves(problem, curves)

    def _solve(self, problem, curves, side: str):
        """The count program over the curves' values (the plan) or bounds (the bound), each with
        its own table cache across rounds."""
        costs = [getattr(c, side) for c in curves]
        return solve_count_program(problem, costs, self._count_limit(), cache=self._tables[side])

    def fits(self, seconds: float) -> bool:
        """Whether a phase estimated at `seconds` may start (the only use of the clock)."""
        return seconds <= self.remaining()

    def _count_limit(self) -> float:
        """HiGHS's own limit for a count program: what is left, and a sliver past an expired
        limit (the limit's 5% allowance) so that a plan always exists."""
        return max(self.remaining(), 0.03 * self.time_limit, 0.05)

    # 1. exact curves ------------------------------------------------------------------------------
    def _exact_curves(self, problem, curves) -> Outcome:
        counts, res = self._solve(problem, curves, "value")
        how = "dynamic program" if res.status == "optimal" and res.x is None else "HiGHS"
        method = f"exact per-layer curves + count-level integer program ({how})"
        if counts is None:
            return self._fallback(problem, res.bound, method)
        masks = [c.masks[int(n)] for c, n in zip(curves, counts)]
        status = "optimal" if res.status == "optimal" else "time_limit"
        return Outcome(masks, status, res.bound, info={"method": method})

    def _fallback(self, problem, bound, method: str) -> Outcome:
        """The count program found no plan in time: the repaired greedy plan, with any bound."""
        from solvers.greedy import heuristic_plan

        masks = heuristic_plan(problem)
        info = {"method": method + "; no plan within the time limit: repaired greedy plan"}
        return Outcome(masks, "time_limit", bound, info=info)

    # 2. heuristic curves + certificate ------------------------------------------------------------
    def _heuristic_curves(self, problem, curves) -> Outcome:
        counts, res = self._solve(problem, curves, "value")
        if counts is None:
            return self._fallback(problem, None, "heuristic per-layer curves")
        progress = self._progress(problem, curves, counts)
        progress.method.append(
            "heuristic per-layer curves (greedy + swap local search, seeded from the heuristics) "
            "+ count-level program"
        )
        cert = Certificate(problem, curves)  # the cheap per-count bounds, at once
        self._search(problem, curves, progress)
        self._certify(problem, curves, cert, progress)
        for _ in range(LAYER_ROUNDS):  # exact layers where the bound needs them, then cuts
            if progress.closed() or not self._layer_programs(problem, curves, cert, progress):
                break
            self._cut_rounds(problem, curves, cert, progress, progress.lb_counts)
        if "coverage" in problem.objective.names and not progress.closed():
            self._expert_program(problem, progress)
        if progress.bound is None:  # every phase was cut: at least the cheap per-count bounds
            progress.offer_bound(self._solve(problem, curves, "bound")[1].bound)
        return progress.outcome()

    def _progress(self, problem, curves, counts) -> Progress:
        masks = [c.masks[int(n)] for c, n in zip(curves, counts)]
        value = float(sum(c.value[c.at(int(n))] for c, n in zip(curves, counts)))
        return Progress(masks, value, counts=np.asarray(counts))

    def _resolve_values(self, problem, curves, progress: Progress) -> None:
        """Re-solve the count program on the improved curves; keep its plan if better."""
        if not self.fits(count_seconds(problem)):
            progress.cut = True
            return
        counts, _ = self._solve(problem, curves, "value")
        if counts is not None:
            masks = [c.masks[int(n)] for c, n in zip(curves, counts)]
            progress.offer_plan(masks, _value(problem, masks))

    def _search(self, problem, curves, progress: Progress) -> None:
        """Seeds from the other heuristics' plans, then local search at widening counts around
        the chosen ones, re-solving the count program until the counts settle."""
        from solvers.greedy import seed_plans

        if not self.fits(curve_seconds(problem) + search_seconds(problem, 3)):
            progress.cut = True
            return
        if seed_curves(problem, curves, seed_plans(problem), progress.counts, SEARCH_WIDTHS[-1]):
            self._resolve_values(problem, curves, progress)
        progress.note("seeded from the greedy plans")
        for width in SEARCH_WIDTHS:
            if not self.fits(search_seconds(problem, 2 * width + 1) + count_seconds(problem)):
                progress.cut = True
                return
            before, value = progress.counts.copy(), progress.value
            if improve_curves(problem, curves, progress.counts, width):
                self._resolve_values(problem, curves, progress)
            progress.note(f"local search at {2 * width + 1} counts per layer")
            if progress.value >= value and np.array_equal(before, progress.counts):
                return  # the plan stood still: wider searches would only move unchosen counts

    def _certify(self, problem, curves, cert: Certificate, progress: Progress) -> None:
        words = {"quadratic": "first-order convex bound", "coverage": "Lagrangian LP bounds"}
        parts = [words.get(name.split(":")[-1], name.split(":")[-1] + " lower bounds")
                 for name in cert.parts]
        progress.method.append(f"bound: count program over per-count bounds ({', '.join(parts)})")
        lb_counts = self._cut_rounds(problem, curves, cert, progress, progress.counts)
        if not cert.quad_terms or progress.closed() or (progress.gap() or 1.0) <= SDP_GAP:
            return
        small = cert.sdp_candidates(progress.counts)
        if not small:
            return
        if not self.fits(cert.sdp_seconds(problem, small) + count_seconds(problem)):
            progress.cut = True
            return
        if cert.apply_sdp(small, progress.counts):
            progress.method.append(f"SDP diagonal shift on {len(small)} small layers")
            self._cut_rounds(problem, curves, cert, progress, lb_counts)

    def _cut_rounds(self, problem, curves, cert, progress: Progress, lb_counts) -> np.ndarray:
        """Evaluate the certificate at the plan's counts and the bound program's, re-solve, and
        repeat while the bound moves (CUT_ROUNDS at most, within CERT_SHARE of the limit by
        estimate over all calls, past a first round); returns the bound program's counts."""
        lb_counts = progress.counts if lb_counts is None else lb_counts
        wanted = {p: {int(progress.counts[p]), int(lb_counts[p])} for p in range(len(curves))}
        previous = None
        for _ in range(CUT_ROUNDS):
            pending = cert.pending(wanted)
            estimate = cert.seconds(pending) + count_seconds(problem)
            if previous is None:  # the first round also searches from the rounded relaxation
                estimate += search_seconds(problem, 1)
            if not pending or (previous is not None and estimate > self._cert_budget):
                break
            if not self.fits(estimate):
                progress.cut = True
                break
            self._cert_budget -= estimate
            cert.evaluate(pending)
            if previous is None and self._seed_from_relaxation(problem, curves, cert, pending):
                self._resolve_values(problem, curves, progress)  # first round: the plan's counts
            new, res = self._solve(problem, curves, "bound")
            progress.offer_bound(res.bound)
            progress.lb_counts = new if new is not None else progress.lb_counts
            progress.note(f"certificate round ({len(pending)} evaluations)")
            if progress.closed() or new is None or progress.gap() <= CUT_TARGET and previous:
                break
            lb_counts = new
            gap = progress.value - progress.bound
            if previous is not None and progress.bound - previous <= CUT_PAYS * gap:
                break  # the cuts no longer pay
            previous = progress.bound
            wanted = {p: {int(progress.counts[p]), int(new[p])} for p in range(len(curves))}
        return lb_counts

    def _seed_from_relaxation(self, problem, curves, cert, pending) -> bool:
        """Round each new relaxed point (convex bound or coverage LP) to a kept set of its count
        and search from it."""
        changed = False
        for part, p, n in pending:
            store = cert.points if part == "quadratic" else cert.lp_points
            point = store.get((p, n))
            if point is None or curves[p].exact:
                continue
            mask, value = local_search(problem, p, round_point(problem, p, point, n))
            changed |= curves[p].update(n, mask, value)
        return changed

    def _layer_programs(self, problem, curves, cert, progress: Progress) -> bool:
        """One-layer programs where a layer's found set and bound still differ, at the plan's
        counts and the bound program's, the widest gaps first, within LAYER_SHARE of the limit
        (by size): each makes that count exact. Not for redundancy: its pair LP is too weak to
        close. Returns whether any ran."""
        if "redundancy" in problem.objective.names:
            return False
        tol = 1e-9 * max(1.0, abs(progress.value))
        todo = set()
        for counts in (progress.counts, progress.lb_counts):
            for p, n in enumerate(counts if counts is not None else []):
                c, i = curves[p], curves[p].at(int(n))
                gap = c.value[i] - c.bound[i]
                if not c.exact and (p, int(n)) not in cert.programs and gap > tol:
                    todo.add((-gap, p, int(n)))
        budget = LAYER_SHARE * self.time_limit - cert.program_seconds
        done = 0
        for _, p, n in sorted(todo):
            estimate = layer_program_size(problem, p) / LAYER_VARIABLES_PER_SECOND
            if estimate > budget:
                break
            if not self.fits(estimate + count_seconds(problem)):
                progress.cut = True
                break
            budget -= estimate
            cert.program_seconds += estimate
            cert.programs.add((p, n))
            mask, bound = layer_program(problem, p, n, self.remaining())
            if mask is not None:
                curves[p].update(n, mask, problem.objective.layer_value(problem.layers[p], mask))
            if bound is not None:
                cert.raise_whole(p, n, bound)
            done += 1
        if done:
            self._resolve_values(problem, curves, progress)
            progress.method.append(f"{done} one-layer programs")
            progress.note(f"one-layer programs ({done})")
        return done > 0

    def _expert_program(self, problem, progress: Progress) -> None:
        """The expert-level coverage program, where it is small enough to help: node-limited."""
        size = expert_program_size(problem)
        if not _pairs_ok(problem) or size > VARIABLES_PER_SECOND * MIP_SHARE * self.time_limit:
            return
        if not self.fits(size / VARIABLES_PER_SECOND):
            progress.cut = True
            return
        form = Formulation(problem, "expert")
        res = form.mip.solve(self.remaining(), max_nodes=MIP_NODES)
        progress.method.append("expert-level program (HiGHS, node-limited)")
        progress.offer_bound(res.bound)
        if res.x is not None:
            masks = form.kept_masks(res.x)
            progress.offer_plan(masks, _value(problem, masks))

    # 3. constraints on which experts: the expert-level program from the start ---------------------
    def _expert_level(self, problem) -> Outcome:
        from solvers.greedy import heuristic_plan

        masks = heuristic_plan(problem)
        progress = Progress(masks, _value(problem, masks), counts=_counts_of(masks))
        progress.method.append("greedy + repair as the starting plan")
        names = problem.objective.names
        if _pairs_ok(problem, MAX_PAIRS_WHEN_FORCED if "redundancy" in names else None):
            form = Formulation(problem, "expert")
            res = form.mip.solve(self.remaining(), max_nodes=MIP_NODES)
            if res.status == "infeasible":
                raise InfeasibleError(conflict_message(problem))
            progress.method.append("expert-level integer program (HiGHS)")
            progress.offer_bound(res.bound)
            if res.x is not None:
                mip_masks = form.kept_masks(res.x)
                progress.offer_plan(mip_masks, _value(problem, mip_masks))
        if not progress.closed():
            self._count_relaxation_bound(problem, progress)
        return progress.outcome()

    def _count_relaxation_bound(self, problem, progress: Progress) -> None:
        """A bound from the count program without the expert-level constraints (a relaxation),
        over the per-layer curves' certified per-count bounds."""
        curves = build_curves(problem, self.time_limit)
        cert = Certificate(problem, curves)
        pending = cert.pending({p: {int(n)} for p, n in enumerate(progress.counts)})
        if not self.fits(cert.seconds(pending) + count_seconds(problem)):
            progress.cut = True
            return
        cert.evaluate(pending)
        _, res = solve_count_program(
            problem, [c.bound for c in curves], self._count_limit(), skip_expert=True
        )
        progress.offer_bound(res.bound)
        progress.method.append("bound: count-level relaxation over per-count bounds")


def _counts_of(masks) -> np.ndarray:
    return np.array([int(m.sum()) for m in masks])

