"""Coverage (facility location): f(S) = sum_e s_e (1 - max(0, max_{k in S} C_ek)), C = similarity
clipped to [0, 1] with a unit diagonal, so kept experts cost 0; each removed expert is assigned
to its most similar kept expert, which is the merge map."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from solvers.errors import UserError
from solvers.objectives.base import Term, TermState, need_similarity, register_term


@register_term
@dataclass
class Coverage(Term):
    """Facility location. ``candidates``: in the integer program each expert may be assigned
    only to its m most similar experts (others get a fallback at the (m+1)-th similarity, which
    keeps the program a valid lower bound)."""

    candidates: int = 16
    name: ClassVar[str] = "coverage"

    def validate(self, problem):
        need_similarity(self.name, problem)
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 1:
            raise UserError(f"--coverage-candidates {self.candidates!r} must be a whole number >= 1")

    def to_json(self):
        return {"name": self.name, "candidates": self.candidates}

    def _c(self, layer) -> np.ndarray:
        cache = layer.__dict__.setdefault("_cache", {})
        if "coverage_c" not in cache:
            c = np.clip(layer.similarity, 0.0, 1.0)
            np.fill_diagonal(c, 1.0)
            cache["coverage_c"] = c
        return cache["coverage_c"]

    def layer_values(self, layer, masks):
        c, s = self._c(layer), layer.importance
        out = np.empty(masks.shape[0])
        step = max(1, 4_000_000 // max(c.size, 1))
        for a in range(0, masks.shape[0], step):
            m = masks[a : a + step]
            best = np.where(m[:, None, :], c[None, :, :], 0.0).max(axis=2)
            out[a : a + step] = ((1.0 - best) * s).sum(axis=1)
        return out

    def lower_bounds(self, layer):
        # each removed expert is covered at best by its most similar other expert
        c, s = self._c(layer), layer.importance
        n = s.size
        off = np.where(np.eye(n, dtype=bool), 0.0, c)
        least = np.sort(s * (1.0 - off.max(axis=1)))
        return np.concatenate([[0.0], np.cumsum(least)])[::-1]  # [n] = sum of the N-n smallest

    def state(self, layer, mask):
        return _CoverageState(self._c(layer), layer.importance, mask)

    def merge_map(self, layer, mask):
        kept = np.flatnonzero(mask)
        if kept.size == 0:
            return {}
        c = self._c(layer)
        removed = np.flatnonzero(~mask)
        target = kept[np.argmax(c[np.ix_(removed, kept)], axis=1)] if removed.size else []
        return {int(e): int(k) for e, k in zip(removed, target)}

    def _assignment(self, layer):
        """(e, k, cost of a[e, k], cost of u[e]) of the candidate assignment program.

        u[e]: covered by no candidate. Either the best kept expert lies outside the candidates
        (similarity at most the (m+1)-th) or the layer keeps nothing (cost s_e): pricing u at the
        (m+1)-th similarity (0 when all are candidates) never exceeds the true cost.
        """
        c, s = self._c(layer), layer.importance
        n = s.size
        m = min(self.candidates, n - 1)
        cache = layer.__dict__.setdefault("_cache", {})
        if ("coverage_assignment", m) in cache:
            return cache[("coverage_assignment", m)]
        off = np.where(np.eye(n, dtype=bool), -np.inf, c)
        order = np.argsort(-off, axis=1, kind="stable")
        cand = np.concatenate([np.arange(n)[:, None], order[:, :m]], axis=1)  # self first
        fallback = off[np.arange(n), order[:, m]] if m < n - 1 else np.zeros(n)
        e = np.repeat(np.arange(n), m + 1)
        k = cand.ravel()
        out = e, k, s[e] * (1.0 - c[e, k]), s * (1.0 - np.maximum(fallback, 0.0))
        cache[("coverage_assignment", m)] = out
        return out

    def add_to_model(self, form, p, weight):
        e, k, cost_a, cost_u = self._assignment(form.problem.layers[p])
        x, n = form.x[p], cost_u.size
        a = form.mip.add_vars(e.size, 0.0, 1.0, cost=weight * cost_a)
        u = form.mip.add_vars(n, 0.0, 1.0, cost=weight * cost_u)
        # sum_k a[e, k] + u[e] == 1 ; a[e, k] <= x[k]
        form.mip.add_rows(
            np.concatenate([e, np.arange(n)]), np.concatenate([a, u]), 1.0, 1.0, 1.0, n
        )
        r = np.arange(e.size)
        form.mip.add_rows(
            np.concatenate([r, r]),
            np.concatenate([a, x[k]]),
            np.concatenate([np.ones(r.size), -np.ones(r.size)]),
            -np.inf,
            0.0,
            r.size,
        )

    def lp_lower_bounds(
        self, layer, at, rule=None, models: dict | None = None, points: dict | None = None
    ) -> np.ndarray:
        """Per-count lower bounds (N+1,) from the layer's own facility-location LP, solved at the
        kept counts `at`, obeying the layer's rule (must-keep/remove as bounds, equal counts per
        routing group as rows). Each solve's duals of the assignment rows (lambda) give a
        Lagrangian bound at *every* count n: with the assignment rows priced by lambda the rest
        of the program splits per expert, and its minimum over kept sets of size n is a sort
        (weak duality: valid for any lambda; equal to the LP value at the solved count).

        `models`: the caller's store of LPs (one solve's), so that later counts warm-start from
        earlier ones; results then depend on the order of calls, which the caller fixes.
        `points`: filled with each solved count's relaxed keep vector (for rounding)."""
        from solvers.constraints.base import LayerRule

        rule = rule if rule is not None else LayerRule.free(layer.num_experts)
        lp = self._layer_lp(layer, rule, {} if models is None else models)
        out = np.full(layer.num_experts + 1, -np.inf)
        for n0 in sorted(set(int(a) for a in at)):
            lam = lp.prices(n0)
            if lam is not None:
                out = np.maximum(out, self.lagrangian_bounds(layer, lam, rule))
                if points is not None:
                    points[n0] = lp.keep
        return out

    def _layer_lp(self, layer, rule, models: dict):
        """The layer's LP under `rule`, built once per store (warm starts between counts)."""
        from solvers.objectives.coverage_lp import LayerLP

        m = min(self.candidates, layer.num_experts - 1)
        key = (id(layer), m, rule.keep.tobytes(), rule.remove.tobytes(), rule.labels().tobytes())
        if key not in models:
            models[key] = (layer, LayerLP(*self._assignment(layer), rule))  # keeps `layer` alive
        return models[key][1]

    def lagrangian_bounds(self, layer, lam: np.ndarray, rule) -> np.ndarray:
        """(N+1,) lower bounds on the candidate program at every kept count, for assignment-row
        prices `lam` (any values are valid), less a small relative safety margin."""
        e, k, cost_a, cost_u = self._assignment(layer)
        reduced = np.minimum(0.0, cost_a - lam[e])  # a[e, k] in [0, x_k]: pays only if negative
        rho = np.bincount(k, weights=reduced, minlength=lam.size)
        const = float(lam.sum() + np.minimum(0.0, cost_u - lam).sum())
        values = const + rule.min_linear(rho)
        scale = float(np.abs(lam).sum() + np.abs(reduced).sum() + np.abs(cost_u).sum())
        return values - 1e-9 * max(1.0, scale)

def _top2(c_rows: np.ndarray, mask: np.ndarray):
    """Best and second-best similarity of each row to the kept columns, with their columns
    (value 0 and column -1 where there is none; similarities lie in [0, 1])."""
    sub = np.where(mask, c_rows, -1.0)
    r = np.arange(sub.shape[0])
    a1 = sub.argmax(axis=1)
    b1 = sub[r, a1]
    sub[r, a1] = -1.0
    a2 = sub.argmax(axis=1)
    b2 = sub[r, a2]
    return (
        np.maximum(b1, 0.0),
        np.where(b1 < 0, -1, a1),
        np.maximum(b2, 0.0),
        np.where(b2 < 0, -1, a2),
    )


class _CoverageState(TermState):
    def __init__(self, c, s, mask):
        self.c, self.s = c, s
        self.mask = mask.copy()
        self.b1, self.a1, self.b2, self.a2 = _top2(c, self.mask)

    def removal_deltas(self):
        has = self.a1 >= 0
        return np.bincount(
            self.a1[has], weights=(self.s * (self.b1 - self.b2))[has], minlength=self.s.size
        )

    def addition_deltas(self):
        return -(np.maximum(self.c - self.b1[:, None], 0.0).T @ self.s)

    def swap_deltas(self, out, into):
        gain = self.addition_deltas()[into]
        cj = self.c[:, into]
        extra = self.s[:, None] * (
            np.maximum(self.b1[:, None], cj) - np.maximum(self.b2[:, None], cj)
        )
        per = np.zeros((self.s.size, into.size))
        has = self.a1 >= 0
        np.add.at(per, self.a1[has], extra[has])
        return gain[None, :] + per[out]

    def remove(self, e):
        self.mask[e] = False
        hit = np.flatnonzero((self.a1 == e) | (self.a2 == e))
        if hit.size:
            b1, a1, b2, a2 = _top2(self.c[hit], self.mask)
            self.b1[hit], self.a1[hit], self.b2[hit], self.a2[hit] = b1, a1, b2, a2

    def add(self, e):
        self.mask[e] = True
        ce = self.c[:, e]
        top = ce > self.b1
        mid = ~top & (ce > self.b2)
        self.b2 = np.where(top, self.b1, np.where(mid, ce, self.b2))
        self.a2 = np.where(top, self.a1, np.where(mid, e, self.a2))
        self.b1 = np.where(top, ce, self.b1)
        self.a1 = np.where(top, e, self.a1)


# -- layer cost curves --------------------------------------------------------------------------
