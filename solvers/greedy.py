"""Greedy solvers: fast, no guarantee, the baselines the exact solver is measured against.

* ``ranking`` - global ranking (He et al. 2024): drop the globally least important experts,
  never taking a layer below its smallest allowed count. Exactly optimal for the additive
  objective with only a count budget and per-layer floors.
* ``grape`` - GRAPE's Algorithm 1 ("Global Greedy"), exactly as published (reference facts §1):
  repeatedly merge the most similar pair of the layer with the largest remaining redundancy,
  with the entropy freeze and restart. Two additions, both documented: a layer at its smallest
  allowed count takes no further merges (the paper has no floor; the router needs top_k), and
  each final cluster keeps its most important member (the others are removed and mapped to it).
* ``marginal`` - marginal-gain greedy for any objective: repeatedly remove the expert, in any
  layer, whose removal raises the objective least.
* ``greedy`` - picks ``ranking`` for a purely additive objective, ``grape`` for pure
  redundancy, and ``marginal`` otherwise.

All of them end in :func:`solvers.repair.finalize`, which fixes what they cannot see.
"""

from __future__ import annotations

import math

import numpy as np

from solvers.constraints import EntropyGuard, over_cap
from solvers.layer_search import _pick, removable
from solvers.registry import Outcome, Solver, register_solver
from solvers.repair import finalize


class _Budget:
    """The stopping rule shared by the greedy loops: exact kept count, or kept bytes under a cap."""

    def __init__(self, problem, masks):
        self.k = problem.budget.kept_total(problem)
        self.cap = problem.budget.kept_bytes_cap(problem)
        self.kept = sum(int(m.sum()) for m in masks)
        self.bytes = sum(
            float(layer.expert_bytes[m].sum()) for layer, m in zip(problem.layers, masks)
        )

    def met(self) -> bool:
        if self.k is not None:
            return self.kept <= self.k
        return not over_cap(self.bytes, self.cap)

    def drop(self, nbytes: float) -> None:
        self.kept -= 1
        self.bytes -= nbytes


def _floors(problem) -> np.ndarray:
    return np.array([int(np.flatnonzero(a).min()) for a in problem.allowed_counts()])


def _start_masks(problem) -> list[np.ndarray]:
    return [~rule.remove for rule in problem.layer_rules()]


def ranking_masks(problem) -> list[np.ndarray]:
    masks = _start_masks(problem)
    floors = _floors(problem)
    rules = problem.layer_rules()
    budget = _Budget(problem, masks)
    counts = np.array([int(m.sum()) for m in masks])
    s = np.concatenate([layer.importance for layer in problem.layers])
    pos = np.concatenate([np.full(layer.num_experts, p) for p, layer in enumerate(problem.layers)])
    idx = np.concatenate([np.arange(layer.num_experts) for layer in problem.layers])
    for g in np.lexsort((idx, pos, s)):  # least important first; ties by layer, then expert
        if budget.met():
            break
        p, e = int(pos[g]), int(idx[g])
        if not masks[p][e] or rules[p].keep[e] or counts[p] <= floors[p]:
            continue
        masks[p][e] = False
        counts[p] -= 1
        budget.drop(float(problem.layers[p].expert_bytes[e]))
    return masks


def marginal_masks(problem) -> list[np.ndarray]:
    masks = _start_masks(problem)
    floors = _floors(problem)
    rules = problem.layer_rules()
    budget = _Budget(problem, masks)
    per_byte = budget.k is None  # byte budgets: cheapest objective increase per freed byte
    states = [problem.objective.state(layer, m) for layer, m in zip(problem.layers, masks)]
    best = np.full(len(masks), np.inf)
    choice = np.full(len(masks), -1)

    def refresh(p):
        layer = problem.layers[p]
        if masks[p].sum() <= floors[p]:
            best[p], choice[p] = np.inf, -1
            return
        deltas = states[p].removal_deltas()
        if per_byte:
            deltas = deltas / np.maximum(layer.expert_bytes, 1)
        e = _pick(deltas, removable(masks[p], rules[p]), layer.importance)
        choice[p] = e
        best[p] = deltas[e] if e >= 0 else np.inf

    for p in range(len(masks)):
        refresh(p)
    while not budget.met():
        p = int(np.argmin(best))
        if not np.isfinite(best[p]):
            break
        e = int(choice[p])
        states[p].remove(e)
        masks[p][e] = False
        budget.drop(float(problem.layers[p].expert_bytes[e]))
        refresh(p)
    return masks


def _nlogn(n) -> float:
    return float(n) * math.log(n) if n > 0 else 0.0


class _PairStream:
    """A layer's pairs (i < j) in descending similarity, ties in row-major order, sorted lazily
    in chunks (Algorithm 1 consumes only the top of the list)."""

    def __init__(self, sim: np.ndarray, chunk: int):
        n = sim.shape[0]
        self.i, self.j = np.triu_indices(n, 1)
        self.d = sim[self.i, self.j]
        self.rest = np.arange(self.d.size)
        self.chunk = chunk
        self.order = np.zeros(0, int)
        self.ptr = 0

    def _refill(self) -> None:
        values = self.d[self.rest]
        if self.rest.size > self.chunk:
            cut = np.partition(values, values.size - self.chunk)[values.size - self.chunk]
            take = values >= cut  # every tie of the cut value: same order as one full stable sort
        else:
            take = np.ones(values.size, bool)
        chosen = self.rest[take]
        self.order = chosen[np.lexsort((chosen, -self.d[chosen]))]
        self.rest = self.rest[~take]
        self.ptr = 0

    def exhausted(self) -> bool:
        return self.ptr >= self.order.size and self.rest.size == 0

    def pop(self) -> tuple[int, int, float]:
        if self.ptr >= self.order.size:
            self._refill()
        k = self.order[self.ptr]
        self.ptr += 1
        return int(self.i[k]), int(self.j[k]), float(self.d[k])


def grape_algorithm1(problem) -> tuple[list[np.ndarray], dict[int, dict[int, int]]]:
    """GRAPE Algorithm 1 on the problem's similarity; returns kept masks and the merge map."""
    layers = problem.layers
    n_layers = len(layers)
    floors = _floors(problem)
    guard = next((c for c in problem.constraints if isinstance(c, EntropyGuard)), None)
    parent = [list(range(layer.num_experts)) for layer in layers]
    sizes = np.array([layer.num_experts for layer in layers])  # |C^l|: number of clusters
    streams, redundancy = [], np.zeros(n_layers)
    for p, layer in enumerate(layers):
        d = layer.similarity.copy()
        np.fill_diagonal(d, 0.0)
        streams.append(_PairStream(d, chunk=4 * layer.num_experts))
        redundancy[p] = d.sum()  # R^l = sum_{i != j} D^l_ij
    # entropy of the cluster counts, kept incrementally: E = log K - (sum n log n) / K. The floor
    # is the constraint's own, (1 - gamma) log L: the paper's E_init (1 - gamma) equals it only
    # when every layer starts with the same number of experts
    nlogn = float(EntropyGuard.nlogn(sizes).sum())
    entropy_floor = -np.inf if guard is None else guard.entropy_floor(problem) - guard.TOL
    frozen = np.zeros(n_layers, bool)
    budget = _Budget(problem, [np.ones(layer.num_experts, bool) for layer in layers])
    bytes_each = np.array([float(layer.expert_bytes.min()) for layer in layers])

    def open_(p) -> bool:  # the paper's candidates, less layers at their floor or out of pairs
        return not frozen[p] and sizes[p] > floors[p] and not streams[p].exhausted()

    score = np.array([redundancy[p] if open_(p) else -np.inf for p in range(n_layers)])

    def find(p, a):
        root = a
        while parent[p][root] != root:
            root = parent[p][root]
        while parent[p][a] != root:  # path compression
            parent[p][a], a = root, parent[p][a]
        return root

    while not budget.met():
        p = int(np.argmax(score))  # l* = argmax_{l not in F} R^l (ties: the first layer)
        if score[p] == -np.inf:
            if frozen.any():  # restart: every open layer was frozen
                frozen[:] = False
                score = np.array([redundancy[q] if open_(q) else -np.inf for q in range(n_layers)])
                continue
            break
        i, j, dij = streams[p].pop()  # (i*, j*) = argmax_{i != j} D^{l*}_ij among unpicked pairs
        ri, rj = find(p, i), find(p, j)
        if ri != rj:  # a later pick may fall inside a cluster: no count change, R still drops
            parent[p][max(ri, rj)] = min(ri, rj)
            n = sizes[p]
            nlogn += _nlogn(n - 1) - _nlogn(n)
            sizes[p] -= 1
            budget.drop(bytes_each[p])
        redundancy[p] -= 2.0 * dij
        if guard is not None:
            k = budget.kept
            if k > 0 and math.log(k) - nlogn / k < entropy_floor:
                frozen[p] = True
        score[p] = redundancy[p] if open_(p) else -np.inf
    masks, merge = [], {}
    for p, layer in enumerate(layers):
        roots = np.array([find(p, a) for a in range(layer.num_experts)])
        mask = np.zeros(layer.num_experts, bool)
        mapping = {}
        for r in np.unique(roots):
            members = np.flatnonzero(roots == r)
            keep = int(members[np.argmax(layer.importance[members])])  # first of the most important
            mask[keep] = True
            mapping.update({int(e): keep for e in members if e != keep})
        masks.append(mask)
        merge[layer.index] = mapping
    return masks, merge


def _merge_by_similarity(layer, mask) -> dict[int, int]:
    kept = np.flatnonzero(mask)
    removed = np.flatnonzero(~mask)
    if layer.similarity is None or kept.size == 0:
        return {}
    target = (
        kept[np.argmax(layer.similarity[np.ix_(removed, kept)], axis=1)] if removed.size else []
    )
    return {int(e): int(k) for e, k in zip(removed, target)}


def heuristic_plan(problem, info: dict | None = None) -> list[np.ndarray]:
    """The greedy the objective calls for, repaired to feasibility (the exact solver's start)."""
    names = problem.objective.names
    if names == ["additive"]:
        masks = ranking_masks(problem)
    else:
        masks = marginal_masks(problem)
    return finalize(problem, masks, info)


def seed_plans(problem) -> list[list[np.ndarray]]:
    """Unrepaired plans of every greedy, as starting points for the exact solver's local search
    (each layer's kept set is searched at its own count, so no repair is needed)."""
    plans = [marginal_masks(problem), ranking_masks(problem)]
    if all(layer.similarity is not None for layer in problem.layers):
        plans.append(grape_algorithm1(problem)[0])
    return plans


class _GreedyBase(Solver):
    def _finish(self, problem, masks, method, merge=None) -> Outcome:
        info = {"method": method}
        final = finalize(problem, masks, info)
        if merge is not None:
            for p, layer in enumerate(problem.layers):
                if not np.array_equal(final[p], masks[p]):  # repaired layer: re-map by similarity
                    merge[layer.index] = _merge_by_similarity(layer, final[p])
        return Outcome(final, "feasible", None, merge_map=merge, info=info)


@register_solver
class RankingSolver(_GreedyBase):
    name = "ranking"
    guarantee = "global ranking by importance; optimal for additive + count budget + floors only"

    def run(self, problem):
        return self._finish(problem, ranking_masks(problem), "global ranking")


@register_solver
class MarginalSolver(_GreedyBase):
    name = "marginal"
    guarantee = "marginal-gain greedy for any objective; no guarantee"

    def run(self, problem):
        return self._finish(problem, marginal_masks(problem), "marginal-gain greedy")


@register_solver
class GrapeSolver(_GreedyBase):
    name = "grape"
    guarantee = "GRAPE Algorithm 1 (global greedy merging with entropy freeze); no guarantee"

    def run(self, problem):
        missing = [layer.index for layer in problem.layers if layer.similarity is None]
        if missing:
            from solvers.errors import UserError

            raise UserError(
                f"GRAPE's Algorithm 1 needs expert similarity; layers {missing[:5]} have none"
            )
        masks, merge = grape_algorithm1(problem)
        return self._finish(problem, masks, "GRAPE Algorithm 1", merge)


@register_solver
class GreedySolver(Solver):
    name = "greedy"
    guarantee = (
        "ranking (additive), GRAPE Algorithm 1 (redundancy) or marginal-gain greedy; no guarantee"
    )

    def run(self, problem):
        names = problem.objective.names
        chosen = {("additive",): RankingSolver, ("redundancy",): GrapeSolver}.get(
            tuple(names), MarginalSolver
        )
        return chosen(self.time_limit, **self.options).run(problem)
