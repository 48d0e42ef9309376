"""Removed importance: f(S) = sum_{e not in S} s_e. Keeping the most important is exact."""

from __future__ import annotations

import numpy as np

from solvers.objectives.base import Quadratic, Term, TermState, register_term


@register_term
class Additive(Term):
    """f(S) = sum_{e not in S} s_e: removed importance."""

    name = "additive"
    order_exact = True

    def layer_values(self, layer, masks):
        return (~masks) @ layer.importance

    def lower_bounds(self, layer):
        s = np.sort(layer.importance)[::-1]
        return s.sum() - np.concatenate([[0.0], np.cumsum(s)])

    def quadratic(self, layer):
        return Quadratic(None, -layer.importance, float(layer.importance.sum()))

    def state(self, layer, mask):
        return _AdditiveState(layer.importance)

    def add_to_model(self, form, p, weight):
        s = form.problem.layers[p].importance
        form.mip.offset += weight * float(s.sum())
        form.mip.add_cost(form.x[p], -weight * s)


class _AdditiveState(TermState):
    def __init__(self, s):
        self.s = s

    def removal_deltas(self):
        return self.s

    def addition_deltas(self):
        return -self.s

    def swap_deltas(self, out, into):
        return self.s[out][:, None] - self.s[into][None, :]
