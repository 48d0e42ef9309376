"""Constraints on how many experts each layer keeps: floors, caps, multiples, uniformity and
GRAPE's entropy guard. All of them are visible from the kept counts alone."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from solvers.constraints.base import CountConstraint, register_constraint
from solvers.constraints.precheck import explain_bounds
from solvers.errors import UserError


@register_constraint
@dataclass(frozen=True)
class MinKept(CountConstraint):
    """Keep at least ``count`` experts in every layer (None: the layer's top_k, which the router needs)."""

    count: int | None = None
    name: ClassVar[str] = "min_kept"

    def __post_init__(self):
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int)
                                       or self.count < 0):
            raise UserError(f"per-layer minimum kept {self.count!r} must be a whole number >= 0 "
                            "(or top_k)")

    def minimum(self, problem, p) -> int:
        layer = problem.layers[p]
        return min(layer.top_k if self.count is None else int(self.count), layer.num_experts)

    def describe(self, problem) -> str:
        return "per-layer minimum " + ("top_k" if self.count is None else str(self.count))

    def bound_label(self, side):
        return "per-layer minimum"

    def to_json(self):
        return {"name": self.name, "count": self.count}

    def count_bounds(self, problem, p):
        return self.minimum(problem, p), problem.layers[p].num_experts

    def count_violations(self, problem, counts):
        return [
            f"layer {layer.index}: keeps {counts[p]} experts, below the per-layer minimum "
            f"{self.minimum(problem, p)}"
            for p, layer in enumerate(problem.layers)
            if counts[p] < self.minimum(problem, p)
        ]


@register_constraint
@dataclass(frozen=True)
class MaxRemovedFraction(CountConstraint):
    """Remove at most ``fraction`` of the experts of any one layer (floor(fraction * N))."""

    fraction: float
    name: ClassVar[str] = "max_removed_fraction"

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise UserError(f"max removed fraction {self.fraction} must lie in [0, 1]")

    def most_removed(self, problem, p) -> int:
        return int(math.floor(self.fraction * problem.layers[p].num_experts + 1e-9))

    def describe(self, problem):
        return f"at most {self.fraction:g} of each layer removed"

    def bound_label(self, side):
        return f"at most {self.fraction:g} removed per layer: minimum kept"

    def to_json(self):
        return {"name": self.name, "fraction": self.fraction}

    def count_bounds(self, problem, p):
        n = problem.layers[p].num_experts
        return n - self.most_removed(problem, p), n

    def count_violations(self, problem, counts):
        out = []
        for p, layer in enumerate(problem.layers):
            removed = layer.num_experts - counts[p]
            if removed > self.most_removed(problem, p):
                out.append(
                    f"layer {layer.index}: removes {removed} of {layer.num_experts} experts, "
                    f"above the maximum fraction {self.fraction:g} ({self.most_removed(problem, p)})"
                )
        return out


@register_constraint
@dataclass(frozen=True)
class MultipleOf(CountConstraint):
    """Every layer keeps a multiple of ``g`` experts (kernel tiles, expert-parallel sharding)."""

    g: int
    name: ClassVar[str] = "multiple_of"

    def __post_init__(self):
        if int(self.g) < 1:
            raise UserError(f"multiple-of {self.g} must be a positive integer")

    def describe(self, problem):
        return f"kept count a multiple of {self.g} in every layer"

    def bound_label(self, side):
        return f"multiple of {self.g}: " + ("minimum" if side == "lo" else "maximum")

    def to_json(self):
        return {"name": self.name, "g": self.g}

    def count_allowed(self, problem, p):
        return np.arange(problem.layers[p].num_experts + 1) % self.g == 0

    def count_violations(self, problem, counts):
        return [
            f"layer {layer.index}: keeps {counts[p]} experts, not a multiple of {self.g}"
            for p, layer in enumerate(problem.layers)
            if counts[p] % self.g
        ]


@register_constraint
@dataclass(frozen=True)
class Uniform(CountConstraint):
    """Every layer keeps the same count: the checkpoint loads in vanilla transformers and vLLM."""

    name: ClassVar[str] = "uniform"

    def describe(self, problem):
        return "uniform (same kept count in every layer)"

    def add_to_model(self, form):
        # y[p, n] == y[0, n] for every count n; counts a layer does not allow are fixed to 0
        first = dict(zip(form.counts[0].tolist(), form.y[0].tolist()))
        for p in range(1, len(form.problem.layers)):
            mine = dict(zip(form.counts[p].tolist(), form.y[p].tolist()))
            for n in set(first) | set(mine):
                if n in first and n in mine:
                    form.mip.add_row([mine[n], first[n]], [1.0, -1.0], 0.0, 0.0)
                else:
                    form.mip.add_row([first.get(n, mine.get(n))], [1.0], 0.0, 0.0)

    def count_violations(self, problem, counts):
        if len(set(counts.tolist())) > 1:
            return [f"uniform: kept counts differ across layers ({min(counts)} to {max(counts)})"]
        return []

    def precheck(self, problem, lo, hi):
        allowed = problem.allowed_counts()
        common = set(np.flatnonzero(allowed[0]).tolist())
        for a in allowed[1:]:
            common &= set(np.flatnonzero(a).tolist())
        if not common:
            return (
                f"uniform needs one kept count allowed in every layer, but the per-layer "
                f"constraints leave none in common ({explain_bounds(problem, 'lo')})"
            )
        k = problem.budget.kept_total(problem)
        n_layers = len(problem.layers)
        if k is not None and not any(n * n_layers == k for n in common):
            near = sorted(common, key=lambda n: abs(n * n_layers - k))[:2]
            return (
                f"uniform: every layer keeps the same count, so the kept total is a multiple of "
                f"{n_layers} layers; the budget keeps {k} (nearest uniform totals: "
                f"{', '.join(str(n * n_layers) for n in sorted(near))})"
            )
        return None


@register_constraint
@dataclass(frozen=True)
class EntropyGuard(CountConstraint):
    """GRAPE's safeguard: the entropy of the kept-count allocation p_l = n_l / K stays at least
    E_b = (1 - gamma) log L, i.e. sum_l n_l log n_l <= K (log K - E_b).

    One tolerance, :attr:`TOL` (entropy units), serves the program row, the checker, the
    precheck and Algorithm 1's freeze, so no allocation is accepted by one and refused by another.
    It is above HiGHS's row feasibility tolerance (1e-7 on the row, 1e-7 / K in entropy).
    """

    gamma: float
    name: ClassVar[str] = "entropy_guard"
    TOL: ClassVar[float] = 1e-7

    def __post_init__(self):
        if not 0.0 <= self.gamma <= 1.0:
            raise UserError(f"entropy guard gamma {self.gamma} must lie in [0, 1]")

    def describe(self, problem):
        return f"entropy guard (gamma {self.gamma:g}: entropy >= {self.entropy_floor(problem):.4f})"

    def to_json(self):
        return {"name": self.name, "gamma": self.gamma}

    def entropy_floor(self, problem) -> float:
        return self.floor_for(len(problem.layers))

    def floor_for(self, num_layers: int) -> float:
        """E_b = (1 - gamma) log L: the floor depends on the number of layers only."""
        return (1.0 - self.gamma) * math.log(num_layers)

    @staticmethod
    def entropy(counts: np.ndarray) -> float:
        """log K - (sum_l n_l log n_l) / K: the same arithmetic as the program row."""
        counts = np.asarray(counts, float)
        total = counts.sum()
        if total <= 0:
            return 0.0
        return float(math.log(total) - EntropyGuard.nlogn(counts).sum() / total)

    @staticmethod
    def nlogn(n) -> np.ndarray:
        n = np.asarray(n, float)
        return np.where(n > 0, n * np.log(np.maximum(n, 1.0)), 0.0)

    def satisfied(self, counts: np.ndarray, floor: float) -> bool:
        """Whether an allocation meets the floor, within :attr:`TOL`; an empty plan has no
        allocation entropy, so it meets only a floor of 0."""
        if np.asarray(counts).sum() <= 0:
            return floor <= 0
        return self.entropy(counts) >= floor - self.TOL

    def add_to_model(self, form):
        problem = form.problem
        eb = self.entropy_floor(problem) - self.TOL  # the row says what `satisfied` says
        cols = list(form.y)
        vals = [self.nlogn(c) for c in form.counts]
        k = problem.budget.kept_total(problem)
        if k is not None:
            rhs = k * (math.log(k) - eb) if k > 0 else 0.0
            form.mip.add_row(np.concatenate(cols), np.concatenate(vals), -math.inf, rhs)
            return
        # byte budget: the total K varies, so pick it with one-hot z[K] and move K log K - K E_b left
        lo = int(sum(c.min() for c in form.counts))
        hi = int(sum(c.max() for c in form.counts))
        ks = np.arange(lo, hi + 1)
        # an empty plan has no allocation entropy at all: K = 0 never satisfies a positive floor
        z = form.mip.add_vars(
            ks.size, 0.0, np.where((ks == 0) & (eb + self.TOL > 0), 0.0, 1.0), integral=not form.relax
        )
        form.mip.add_row(z, 1.0, 1.0, 1.0)
        tcols, tvals = form.total_count_terms()
        form.mip.add_row(
            np.concatenate([tcols, z]), np.concatenate([tvals, -ks.astype(float)]), 0.0, 0.0
        )
        rhs = np.where(ks > 0, ks * (np.log(np.maximum(ks, 1)) - eb), 0.0)
        form.mip.add_row(np.concatenate(cols + [z]), np.concatenate(vals + [-rhs]), -math.inf, 0.0)

    def count_violations(self, problem, counts):
        eb = self.entropy_floor(problem)
        if not self.satisfied(counts, eb):
            return [
                f"entropy guard: allocation entropy {self.entropy(counts):.4f} is below the floor "
                f"{eb:.4f} (gamma {self.gamma:g})"
            ]
        return []

    def precheck(self, problem, lo, hi):
        k = problem.budget.kept_total(problem)
        if k is None or not lo.sum() <= k <= hi.sum():
            return None
        counts = most_even(lo, hi, k)
        eb = self.entropy_floor(problem)
        if not self.satisfied(counts, eb):
            return (
                f"entropy guard (gamma {self.gamma:g}) needs allocation entropy >= {eb:.4f}, but the "
                f"most even allocation of {k} kept experts within the per-layer bounds has "
                f"{self.entropy(counts):.4f}"
            )
        return None


def most_even(lo: np.ndarray, hi: np.ndarray, k: int) -> np.ndarray:
    """The counts within [lo, hi] summing to k with the largest entropy (water filling)."""
    lo_f, hi_f = lo.astype(float), hi.astype(float)
    a, b = 0.0, float(hi.max())
    for _ in range(100):
        mid = (a + b) / 2
        if np.clip(mid, lo_f, hi_f).sum() < k:
            a = mid
        else:
            b = mid
    counts = np.clip(np.floor(b), lo, hi).astype(int)
    while counts.sum() < k:  # hand out the remainder to the smallest layers that can grow
        room = np.flatnonzero(counts < hi)
        counts[room[np.argmin(counts[room])]] += 1
    while counts.sum() > k:
        room = np.flatnonzero(counts > lo)
        counts[room[np.argmax(counts[room])]] -= 1
    return counts


_most_even = most_even
