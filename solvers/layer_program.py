"""The expert-level program of a single layer at one kept count: exact where it can finish.

The count-level decomposition leaves, per layer and count, a best *found* kept set and a proven
bound; where they differ, this program (the layer's keep variables, its rule, the objective's
linearisation) finds the best set and a bound of its own. Coverage's facility-location program
is nearly integral, so HiGHS closes it in a few nodes; the node limit bounds the work.
"""

from __future__ import annotations

import numpy as np

from solvers.constraints.base import Constraint, LayerRule
from solvers.constraints.budget import Budget
from solvers.formulation import Formulation

LAYER_NODES = 500  # branch-and-bound nodes per layer program


class _Rule(Constraint):
    """A layer's rule as a constraint, for a one-layer problem (not registered: internal)."""

    name = "layer_rule"

    def __init__(self, rule: LayerRule):
        self.rule = rule

    def layer_rule(self, problem, p):
        return self.rule

    def check(self, plan, problem):
        return []


def layer_program(problem, p: int, n: int, time_limit: float):
    """(best kept mask or None, proven lower bound or None) of layer p keeping n experts."""
    from solvers.problem import Problem

    layer = problem.layers[p]
    sub = Problem(
        [layer], Budget("remove", layer.num_experts - n), problem.objective,
        [_Rule(problem.layer_rules()[p])],
    )
    form = Formulation(sub, "expert")
    res = form.mip.solve(time_limit, max_nodes=LAYER_NODES)
    mask = form.kept_masks(res.x)[0] if res.x is not None else None
    if mask is not None and (int(mask.sum()) != n or not problem.layer_rules()[p].mask_ok(mask)):
        mask = None  # integrality round-off: never hand back a set of the wrong shape
    return mask, res.bound


def layer_program_size(problem, p: int) -> int:
    """Variables of the one-layer program (as :func:`solvers.exact.expert_program_size`)."""
    layer = problem.layers[p]
    size = layer.num_experts
    for _, term in problem.objective.terms:
        if term.name == "coverage":
            size += layer.num_experts * (min(term.candidates, layer.num_experts - 1) + 2)
        elif term.name == "redundancy":
            size += int(np.count_nonzero(np.triu(layer.similarity, 1)))
    return size
