"""Measured per-layer cost curves: f(S) = c_l(|S|), a multiple-choice knapsack over counts."""

from __future__ import annotations

import numpy as np

from solvers.errors import UserError
from solvers.objectives.base import Term, TermState, register_term


@register_term
class Curves(Term):
    """sum_l c_l(n_l): measured error of keeping n experts (a multiple-choice knapsack)."""

    name = "curves"
    order_exact = True  # any kept set of the right size has the same value
    count_only = True

    def validate(self, problem):
        missing = [layer.index for layer in problem.layers if layer.cost_curve is None]
        if missing:
            raise UserError(
                f"the curves objective needs a cost curve per layer, but layers {missing[:5]} "
                "have none; calibrate with cost curves or choose another objective"
            )

    def layer_values(self, layer, masks):
        return layer.cost_curve[masks.sum(axis=1)]

    def lower_bounds(self, layer):
        return layer.cost_curve.copy()

    def state(self, layer, mask):
        return _CurveState(layer.cost_curve, int(mask.sum()), mask.size)

    def add_to_model(self, form, p, weight):
        form.mip.add_cost(form.y[p], weight * form.problem.layers[p].cost_curve[form.counts[p]])


class _CurveState(TermState):
    def __init__(self, curve, n, size):
        self.curve, self.n, self.size = curve, n, size

    def removal_deltas(self):
        step = self.curve[self.n - 1] - self.curve[self.n] if self.n > 0 else np.inf
        return np.full(self.size, step)

    def addition_deltas(self):
        step = self.curve[self.n + 1] - self.curve[self.n] if self.n < self.size else np.inf
        return np.full(self.size, step)

    def swap_deltas(self, out, into):
        return np.zeros((out.size, into.size))

    def remove(self, e):
        self.n -= 1

    def add(self, e):
        self.n += 1
