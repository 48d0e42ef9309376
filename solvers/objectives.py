"""Objectives to minimise, one class per term, combinable with positive weights.

Every term is a sum over layers of a function of the layer's kept set S (``mask``):

* ``additive``   f(S) = sum_{e not in S} s_e                      (removed importance)
* ``redundancy`` f(S) = sum_{i != j in S} D_ij                    (GRAPE Eq. 4-5, D = similarity
  with a zero diagonal; ordered pairs, as in the paper)
* ``coverage``   f(S) = sum_e s_e (1 - max(0, max_{k in S} C_ek))  (facility location, C = similarity
  clipped to [0, 1] with a unit diagonal, so kept experts cost 0; each removed expert is
  assigned to its most similar kept expert, which is the merge map)
* ``curves``     f(S) = c_l(|S|)                                  (measured per-layer cost curves)

Each term evaluates plans on its own (``layer_values``), gives a lower bound for every kept count
(``lower_bounds``), an incremental state for greedy and local search (``state``), and adds
itself to the integer program (``add_to_model``). A plan's objective is always recomputed from
``layer_values``, never taken from a solver.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import scipy.sparse as sp

from solvers.errors import UserError
from solvers.milp import QuadBlock

if TYPE_CHECKING:  # pragma: no cover
    from solvers.formulation import Formulation
    from solvers.plan import Plan
    from solvers.problem import Layer, Problem

TERMS: dict[str, type["Term"]] = {}


def register_term(cls):
    TERMS[cls.name] = cls
    return cls


class Term:
    name: ClassVar[str] = ""
    # value depends only on the kept set through importance order: sorting is exact
    order_exact: ClassVar[bool] = False

    def validate(self, problem: "Problem") -> None:
        pass

    def to_json(self) -> dict:
        return {"name": self.name}

    def layer_values(self, layer: "Layer", masks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def lower_bounds(self, layer: "Layer") -> np.ndarray:
        raise NotImplementedError

    def state(self, layer: "Layer", mask: np.ndarray) -> "TermState":
        raise NotImplementedError

    def add_to_model(self, form: "Formulation", p: int, weight: float) -> None:
        raise NotImplementedError

    def merge_map(self, layer: "Layer", mask: np.ndarray) -> dict[int, int] | None:
        return None


class TermState:
    """Incremental view of one term on one layer's kept mask (shared, updated in place)."""

    def removal_deltas(self) -> np.ndarray:  # change of f when expert e leaves S
        raise NotImplementedError

    def addition_deltas(self) -> np.ndarray:  # change of f when expert e joins S
        raise NotImplementedError

    def swap_deltas(self, out: np.ndarray, into: np.ndarray) -> np.ndarray:  # |out| x |into|
        raise NotImplementedError

    def remove(self, e: int) -> None:
        pass

    def add(self, e: int) -> None:
        pass


def _need_similarity(term: str, problem: "Problem") -> None:
    missing = [layer.index for layer in problem.layers if layer.similarity is None]
    if missing:
        raise UserError(
            f"the {term} objective needs expert similarity, but layers {missing[:5]} have none; "
            "calibrate with a similarity (e.g. cka) or choose the additive objective"
        )


# -- additive ------------------------------------------------------------------------------------
@register_term
class Additive(Term):
    name = "additive"
    order_exact = True

    def layer_values(self, layer, masks):
        return (~masks) @ layer.importance

    def lower_bounds(self, layer):
        s = np.sort(layer.importance)[::-1]
        return s.sum() - np.concatenate([[0.0], np.cumsum(s)])

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


# -- redundancy ----------------------------------------------------------------------------------
def _zero_diag(sim: np.ndarray) -> np.ndarray:
    d = sim.copy()
    np.fill_diagonal(d, 0.0)
    return d


@register_term
class Redundancy(Term):
    name = "redundancy"

    def validate(self, problem):
        _need_similarity(self.name, problem)

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
@register_term
@dataclass
class Coverage(Term):
    """Facility location. ``candidates``: in the integer program each expert may be assigned
    only to its m most similar experts (others get a fallback at the (m+1)-th similarity, which
    keeps the program a valid lower bound)."""

    candidates: int = 16
    name: ClassVar[str] = "coverage"

    def validate(self, problem):
        _need_similarity(self.name, problem)
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
        off = np.where(np.eye(n, dtype=bool), -np.inf, c)
        order = np.argsort(-off, axis=1, kind="stable")
        cand = np.concatenate([np.arange(n)[:, None], order[:, :m]], axis=1)  # self first
        fallback = off[np.arange(n), order[:, m]] if m < n - 1 else np.zeros(n)
        e = np.repeat(np.arange(n), m + 1)
        k = cand.ravel()
        return e, k, s[e] * (1.0 - c[e, k]), s * (1.0 - np.maximum(fallback, 0.0))

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

    def lp_lower_bounds(self, layer, at, rule=None) -> np.ndarray:
        """Per-count lower bounds (N+1,) from the layer's own facility-location LP, solved at the
        kept counts `at`, obeying the layer's rule (must-keep/remove as bounds, equal counts per
        routing group as rows). The LP value is convex in the count, so each solve gives a
        tangent line (value + d value / d count times the distance) below it at every count."""
        from scipy.optimize import linprog

        e, k, cost_a, cost_u = self._assignment(layer)
        n, na = cost_u.size, e.size
        # variables: x (n), a (na), u (n); rows: assignment (n), then the count rows
        groups = np.zeros(n, int) if rule is None or rule.groups is None else rule.groups
        g = int(groups.max()) + 1
        cost = np.concatenate([np.zeros(n), cost_a, cost_u])
        rows = np.concatenate([e, np.arange(n), n + groups])
        cols = np.concatenate([n + np.arange(na), n + na + np.arange(n), np.arange(n)])
        a_eq = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n + g, 2 * n + na))
        r = np.arange(na)
        a_ub = sp.csr_matrix(
            (
                np.concatenate([np.ones(na), -np.ones(na)]),
                (np.concatenate([r, r]), np.concatenate([n + r, k])),
            ),
            shape=(na, 2 * n + na),
        )
        lo = np.zeros(2 * n + na)
        hi = np.ones(2 * n + na)
        if rule is not None:
            lo[:n], hi[:n] = rule.keep, ~rule.remove
        counts = np.arange(n + 1)
        out = np.full(n + 1, -np.inf)
        for n0 in sorted(set(int(a) for a in at)):
            res = linprog(
                cost,
                A_ub=a_ub,
                b_ub=np.zeros(na),
                A_eq=a_eq,
                b_eq=np.concatenate([np.ones(n), np.full(g, n0 / g)]),
                bounds=np.stack([lo, hi], axis=1),
                method="highs",
            )
            if res.status == 0:
                slope = float(res.eqlin.marginals[n:].sum()) / g  # every count row moves by 1/g
                # solver round-off: step back a hair so the line stays below the LP
                out = np.maximum(
                    out, res.fun + slope * (counts - n0) - 1e-9 * max(1.0, abs(res.fun))
                )
        return out


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
@register_term
class Curves(Term):
    """sum_l c_l(n_l): measured error of keeping n experts (a multiple-choice knapsack)."""

    name = "curves"
    order_exact = True  # any kept set of the right size has the same value

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


# -- the combination ----------------------------------------------------------------------------
@dataclass
class Objective:
    """A positive-weighted sum of terms."""

    terms: list[tuple[float, Term]] = field(default_factory=list)

    def __post_init__(self):
        if not self.terms:
            raise UserError("an objective needs at least one term")
        for w, t in self.terms:
            if not (isinstance(w, (int, float, np.number)) and math.isfinite(w) and w > 0):
                raise UserError(f"objective weight {w!r} of {t.name} must be a finite positive number")

    @property
    def names(self) -> list[str]:
        return [t.name for _, t in self.terms]

    @property
    def order_exact(self) -> bool:
        """Keeping the most important experts is exactly optimal for every kept count."""
        return all(t.order_exact for _, t in self.terms)

    def validate(self, problem):
        for _, t in self.terms:
            t.validate(problem)

    def describe(self) -> str:
        return " + ".join(t.name if w == 1 else f"{w:g}*{t.name}" for w, t in self.terms)

    def to_json(self) -> list[dict]:
        return [{"weight": w, **t.to_json()} for w, t in self.terms]

    def layer_values(self, layer, masks: np.ndarray) -> np.ndarray:
        masks = np.atleast_2d(np.asarray(masks, bool))
        return sum(w * t.layer_values(layer, masks) for w, t in self.terms)

    def layer_value(self, layer, mask: np.ndarray) -> float:
        return float(self.layer_values(layer, mask[None, :])[0])

    def value(self, plan: "Plan", problem: "Problem") -> float:
        """The objective of a plan, computed from scratch."""
        total = 0.0
        for layer in problem.layers:
            mask = np.zeros(layer.num_experts, bool)
            mask[plan.kept.get(layer.index, [])] = True
            total += self.layer_value(layer, mask)
        return total

    def lower_bounds(self, layer) -> np.ndarray:
        return sum(w * t.lower_bounds(layer) for w, t in self.terms)

    def state(self, layer, mask) -> "CombinedState":
        return CombinedState([(w, t.state(layer, mask)) for w, t in self.terms], mask)

    def add_to_model(self, form: "Formulation") -> None:
        for p in range(len(form.problem.layers)):
            for w, t in self.terms:
                t.add_to_model(form, p, w)

    def merge_map(self, layer, mask) -> dict[int, int] | None:
        for _, t in self.terms:
            out = t.merge_map(layer, mask)
            if out is not None:
                return out
        return None


class CombinedState:
    """The weighted sum of term states for one layer, plus the kept mask."""

    def __init__(self, states, mask):
        self.states = states
        self.mask = mask.copy()

    def removal_deltas(self):
        return sum(w * s.removal_deltas() for w, s in self.states)

    def addition_deltas(self):
        return sum(w * s.addition_deltas() for w, s in self.states)

    def swap_deltas(self, out, into):
        return sum(w * s.swap_deltas(out, into) for w, s in self.states)

    def remove(self, e):
        self.mask[e] = False
        for _, s in self.states:
            s.remove(e)

    def add(self, e):
        self.mask[e] = True
        for _, s in self.states:
            s.add(e)


def _weight(text: str | None, chunk: str) -> float:
    if text is None:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"objective term {chunk!r}: the weight must be a finite positive number, "
                        "e.g. redundancy+0.5*additive")
    return value


def parse_objective(text: str) -> Objective:
    """'redundancy', 'redundancy+0.5*additive', 'coverage + 2*curves'."""
    terms = []
    for chunk in str(text).replace(" ", "").split("+"):
        m = re.fullmatch(r"(?:([^*]+)\*)?([a-z_]+)", chunk)
        if not m:
            raise UserError(
                f"cannot read objective term {chunk!r}; write e.g. redundancy+0.5*additive"
            )
        name = {"layer_curves": "curves", "curve": "curves"}.get(m.group(2), m.group(2))
        if name not in TERMS:
            raise UserError(f"unknown objective {m.group(2)!r}; choose from {', '.join(TERMS)}")
        terms.append((_weight(m.group(1), chunk), TERMS[name]()))
    return Objective(terms)
