"""The uniform baseline (REAP's setting): the same number of experts removed in every layer,
each layer's experts chosen by the same objective (for additive: the least important)."""

from __future__ import annotations

import numpy as np

from solvers.constraints import over_cap
from solvers.layer_search import adjust
from solvers.registry import Outcome, Solver, register_solver
from solvers.repair import finalize


@register_solver
class UniformSolver(Solver):
    name = "uniform"
    guarantee = (
        "the same count removed in every layer (as equal as the budget allows: counts "
        "differ by at most one); no optimality guarantee"
    )

    def run(self, problem) -> Outcome:
        layers = problem.layers
        allowed = problem.allowed_counts()
        lo = np.array([np.flatnonzero(a).min() for a in allowed])
        hi = np.array([np.flatnonzero(a).max() for a in allowed])
        full = [np.ones(layer.num_experts, bool) for layer in layers]
        sizes = np.array([layer.num_experts for layer in layers])
        k = problem.budget.kept_total(problem)

        def masks_for(removed: np.ndarray):
            return [
                adjust(problem, p, full[p], int(np.clip(sizes[p] - removed[p], lo[p], hi[p])))
                for p in range(len(layers))
            ]

        if k is not None:
            total_removed = problem.total_experts - k
            per, extra = divmod(total_removed, len(layers))
            removed = np.full(len(layers), per)
            masks = masks_for(removed)
            if extra:  # one more in the layers where the next removal costs least
                cost = []
                for p, layer in enumerate(layers):
                    state = problem.objective.state(layer, masks[p])
                    d = np.where(masks[p], state.removal_deltas(), np.inf)
                    cost.append(d.min())
                removed[np.argsort(np.asarray(cost), kind="stable")[:extra]] += 1
                masks = masks_for(removed)
        else:
            cap = problem.budget.kept_bytes_cap(problem)
            masks = masks_for(np.zeros(len(layers), int))
            for r in range(int(sizes.max()) + 1):
                masks = masks_for(np.full(len(layers), r))
                if not over_cap(
                    sum(float(layer.expert_bytes[m].sum()) for layer, m in zip(layers, masks)), cap
                ):
                    break
        info = {"method": "uniform removal per layer"}
        return Outcome(finalize(problem, masks, info), "feasible", None, info=info)
