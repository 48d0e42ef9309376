"""First-order convex lower bounds for quadratic layer objectives (pure numpy).

On a binary keep vector x, a quadratic term ``x'Mx + c'x + k`` (M symmetric with a zero
diagonal) equals ``x'(M + U)x + (c - u)'x + k`` for any diagonal U = diag(u), since x_i^2 = x_i.
With M + U positive semidefinite the right side, f, is convex on all of R^N, so for any point x
and any kept set s of size n

    f(s) >= f(x) + grad f(x)'(s - x)     and hence     min_{|s| = n} f(s) >= f(x) - g'x + S_n(g),

where S_n(g) is the smallest sum of g over n experts obeying the layer's rule (a sort). One
point therefore bounds the layer at *every* kept count, and the bound is tight at the count the
point was optimised for. The points come from FISTA (accelerated projected gradient) on
``{lo <= x <= hi, n / G kept per routing group}``, a fixed number of iterations: work, not
wall-clock, decides when it stops, so the bound is the same on a loaded machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

MARGIN = 1e-8  # relative safety margin on every bound (float round-off in sums and eigenvalues)
BISECTION_STEPS = 60  # projection accuracy: the span of v over 2^60


@dataclass
class QuadBatch:
    """B convex quadratics f_b(x) = x'Q_b x + c_b'x + k_b, each with a box and per-group sums."""

    q: np.ndarray  # (B, N, N) positive semidefinite
    c: np.ndarray  # (B, N)
    const: np.ndarray  # (B,)
    lip: np.ndarray  # (B,) Lipschitz constant of the gradient: 2 lambda_max(Q)
    lo: np.ndarray  # (B, N)
    hi: np.ndarray  # (B, N)
    labels: np.ndarray  # (B, N) routing-group label of every expert (0 without groups)
    targets: np.ndarray  # (B, G) kept count of every group

    def value_and_grad(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        qx = np.einsum("bij,bj->bi", self.q, x)
        return (x * qx).sum(axis=1) + (self.c * x).sum(axis=1) + self.const, 2.0 * qx + self.c


def convexify(matrix: np.ndarray, shift: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(u, lambda_max) such that matrix + diag(u) is positive semidefinite: u = shift plus the
    smallest uniform amount that makes it so (shift None: u uniform, mu = -lambda_min)."""
    base = matrix if shift is None else matrix + np.diag(shift)
    values = np.linalg.eigvalsh(base)
    # eigvalsh is accurate to about eps * ||M||; step past that so the form really is convex
    mu = max(0.0, -float(values[0])) + 1e-10 * max(1.0, float(np.abs(values).max()))
    u = np.full(matrix.shape[0], mu) if shift is None else shift + mu
    return u, float(values[-1]) + mu


def project(v: np.ndarray, batch: QuadBatch) -> np.ndarray:
    """Euclidean projection of each row of v onto its box with fixed group sums: x = clip(v -
    tau_g, lo, hi) with one threshold per group, found by bisection. Groups are made contiguous
    blocks of equal size (a column permutation per row), so each (row, group) is one flat row."""
    perm, inverse, groups = _blocks(batch)
    rows, size = v.shape[0] * groups, v.shape[1] // groups

    def flat(a):
        return np.take_along_axis(a, perm, axis=1).reshape(rows, size) if groups > 1 else a

    vv, lo, hi = flat(v), _flat_bounds(batch, "lo", flat), _flat_bounds(batch, "hi", flat)
    target = batch.targets.reshape(rows)
    low = (vv - hi).min(axis=1) - 1.0
    high = (vv - lo).max(axis=1) + 1.0
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2.0
        over = np.clip(vv - mid[:, None], lo, hi).sum(axis=1) > target
        low = np.where(over, mid, low)
        high = np.where(over, high, mid)
    x = np.clip(vv - ((low + high) / 2.0)[:, None], lo, hi)
    if groups > 1:
        x = np.take_along_axis(x.reshape(v.shape), inverse, axis=1)
    return x


def _blocks(batch: QuadBatch):
    """(column order that makes each row's groups contiguous, its inverse, number of groups);
    computed once per batch."""
    cache = batch.__dict__.setdefault("_blocks", {})
    if "perm" not in cache:
        groups = batch.targets.shape[1]
        perm = np.argsort(batch.labels, axis=1, kind="stable")
        sizes = np.stack([(batch.labels == g).sum(axis=1) for g in range(groups)], axis=1)
        if groups > 1 and not np.all(sizes == batch.labels.shape[1] // groups):
            raise ValueError("routing groups of unequal size")  # RoutingGroups makes equal ones
        cache.update(perm=perm, inverse=np.argsort(perm, axis=1), groups=groups)
    return cache["perm"], cache["inverse"], cache["groups"]


def _flat_bounds(batch: QuadBatch, name: str, flat) -> np.ndarray:
    cache = batch.__dict__.setdefault("_blocks", {})
    if name not in cache:
        cache[name] = flat(getattr(batch, name))
    return cache[name]


def bound_curves(
    batch: QuadBatch,
    min_linear: Callable[[np.ndarray], np.ndarray],
    iterations: int,
    tol: float = 1e-6,
    check_every: int = 10,
    start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """FISTA with gradient restarts on every row; returns (bounds (B, N+1), last iterate (B, N)).

    ``bounds[b, n]`` is a proven lower bound on min f_b over kept sets of size n (the elementwise
    maximum over the checked iterates of f(x) - g'x + S_n(g), less a relative margin);
    ``min_linear(g)`` gives S_n(g) for every row and count. It stops after `iterations`, or
    earlier once every row's bound at its own count is within `tol` (relative) of its value.
    `start` (B, N): points to start from (e.g. the solution at a nearby count), projected.
    """
    rows = np.arange(batch.q.shape[0])
    own = batch.targets.sum(axis=1).astype(int)  # the count each row is optimised for
    x = project((batch.lo + batch.hi) / 2.0 if start is None else start, batch)
    y, t = x.copy(), np.ones(rows.size)
    best = np.full((rows.size, batch.lo.shape[1] + 1), -np.inf)
    for it in range(1, iterations + 1):
        _, g = batch.value_and_grad(y)
        new = project(y - g / batch.lip[:, None], batch)
        restart = ((y - new) * (new - x)).sum(axis=1) > 0  # momentum points uphill: drop it
        t_next = np.where(restart, 1.0, (1.0 + np.sqrt(1.0 + 4.0 * t * t)) / 2.0)
        y = new + (np.where(restart, 0.0, (t - 1.0) / t_next))[:, None] * (new - x)
        x, t = new, t_next
        if it % check_every == 0 or it == iterations:
            value, lower = _certify(batch, x, min_linear)
            best = np.maximum(best, lower)
            gap = (value - best[rows, own]) / np.maximum(np.abs(value), 1e-12)
            if np.all(gap <= tol):
                break
    return best, x


def _certify(batch: QuadBatch, x: np.ndarray, min_linear) -> tuple[np.ndarray, np.ndarray]:
    """(f(x), lower bounds at every count from the tangent plane at x)."""
    value, g = batch.value_and_grad(x)
    base = value - (g * x).sum(axis=1)
    lower = base[:, None] + min_linear(g)
    margin = MARGIN * (np.abs(value) + np.abs(g).sum(axis=1) + np.abs(batch.const) + 1e-12)
    return value, lower - margin[:, None]
