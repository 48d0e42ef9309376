"""GRAPE's redundancy term: f(S) = sum_{i != j in S} D_ij (Eq. 4-5; D = similarity with a zero
diagonal; ordered pairs, as in the paper)."""

from __future__ import annotations

import numpy as np

from solvers.milp import QuadBlock
from solvers.objectives.base import Quadratic, Term, TermState, need_similarity, register_term


def _zero_diag(sim: np.ndarray) -> np.ndarray:
    d = sim.copy()
    np.fill_diagonal(d, 0.0)
    return d


@register_term
class Redundancy(Term):
    name = "redundancy"

    def validate(self, problem):
        need_similarity(self.name, problem)

    def _d(self, layer) -> np.ndarray:
        cache = layer.__dict__.setdefault("_cache", {})
        if "redundancy_d" not in cache:
            cache["redundancy_d"] = _zero_diag(layer.similarity)
        return cache["redundancy_d"]

    def layer_values(self, layer, masks):
        m = masks.astype(np.float64)
        return ((m @ self._d(layer)) * m).sum(axis=1)

    def lower_bounds(self, layer):
        # each kept expert meets n-1 other kept ones: at least its n-1 smallest similarities
        d = self._d(layer)
        n = d.shape[0]
        off = np.where(np.eye(n, dtype=bool), np.inf, d)
        rows = np.sort(off, axis=1)[:, : n - 1]
        row_sums = np.concatenate([np.zeros((n, 1)), np.cumsum(rows, axis=1)], axis=1)  # [i, m]
        out = np.zeros(n + 1)
        for k in range(2, n + 1):
            out[k] = np.partition(row_sums[:, k - 1], k - 1)[:k].sum()
        return out

    def quadratic(self, layer):
        return Quadratic(self._d(layer), np.zeros(layer.num_experts), 0.0)

    def state(self, layer, mask):
        return _RedundancyState(self._d(layer), mask)

    def add_to_model(self, form, p, weight):
        d = self._d(form.problem.layers[p])
        x = form.x[p]
        if form.relax:
            # x'Dx = x'(D + mu I)x - mu sum(x) on binaries; with mu = -lambda_min the form is convex
            vals, vecs = np.linalg.eigh(d)
            mu = max(0.0, -float(vals[0])) + 1e-9
            factor = vecs * np.sqrt(np.maximum(vals + mu, 0.0))
            form.mip.quad.append(QuadBlock(x, factor, np.full(x.size, -mu), weight))
            return
        i, j = np.nonzero(np.triu(d, 1))
        if i.size == 0:
            return
        z = form.mip.add_vars(i.size, 0.0, 1.0, integral=False, cost=2.0 * weight * d[i, j])
        pos = d[i, j] > 0
        r = np.arange(int(pos.sum()))
        if r.size:  # z >= x_i + x_j - 1 (enough when minimising a positive coefficient)
            zi, xi, xj = z[pos], x[i[pos]], x[j[pos]]
            form.mip.add_rows(
                np.concatenate([r, r, r]),
                np.concatenate([zi, xi, xj]),
                np.concatenate([np.ones(r.size), -np.ones(r.size), -np.ones(r.size)]),
                -1.0,
                np.inf,
                r.size,
            )
        neg = ~pos
        r = np.arange(int(neg.sum()))
        if r.size:  # z <= x_i, z <= x_j for negative coefficients
            for side in (i[neg], j[neg]):
                form.mip.add_rows(
                    np.concatenate([r, r]),
                    np.concatenate([z[neg], x[side]]),
                    np.concatenate([np.ones(r.size), -np.ones(r.size)]),
                    -np.inf,
                    0.0,
                    r.size,
                )


class _RedundancyState(TermState):
    def __init__(self, d, mask):
        self.d = d
        self.g = d @ mask.astype(np.float64)  # similarity of each expert to the kept set

    def removal_deltas(self):
        return -2.0 * self.g

    def addition_deltas(self):
        return 2.0 * self.g

    def swap_deltas(self, out, into):
        return 2.0 * (self.g[into][None, :] - self.g[out][:, None] - self.d[np.ix_(out, into)])

    def remove(self, e):
        self.g -= self.d[e]

    def add(self, e):
        self.g += self.d[e]


# -- coverage ------------------------------------------------------------------------------------
