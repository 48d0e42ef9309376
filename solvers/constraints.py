"""Constraints on a pruning plan: one small class each, found by name in :data:`CONSTRAINTS`.

Every constraint answers four questions, and each answer is used by a different part:

* ``check(plan, problem)`` - the violations of a finished plan, in words. The independent plan
  checker (:mod:`solvers.check`) calls only this, so it must not reuse model-building code.
* ``count_bounds`` / ``count_allowed`` / ``layer_rule`` - what the constraint says about a single
  layer: the kept counts it allows, and which experts must be kept, removed or balanced across
  routing groups. Greedy, uniform, DP and the per-layer curves work from these.
* ``add_to_model(form)`` - the rows it adds to the integer program (:mod:`solvers.formulation`),
  on the count indicators ``y[l, n]`` or, where it needs them, the keep variables ``x[l, e]``.
* ``precheck(problem, bounds)`` - a cheap proof of infeasibility with numbers, run before any
  solver so that every solver raises the same message.

Counts are *kept* counts. Layers are addressed by position ``p`` in ``problem.layers`` inside
the code, and by decoder-layer index in every message.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from solvers.errors import InfeasibleError, UserError

if TYPE_CHECKING:  # pragma: no cover
    from solvers.formulation import Formulation
    from solvers.plan import Plan
    from solvers.problem import Problem

CONSTRAINTS: dict[str, type["Constraint"]] = {}


def register_constraint(cls):
    CONSTRAINTS[cls.name] = cls
    return cls


def over_cap(used: float, cap: float) -> bool:
    """Byte caps are exact (kept bytes are integers); the tiny slack only absorbs float round-off."""
    return used > cap + 1e-9 * max(1.0, abs(cap))


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_min_kept(text: str | int | None) -> int | str | None:
    """The --min-kept value: 'top_k' (the router's k), 'none' (no floor) or a whole number >= 0."""
    if text is None or isinstance(text, int) and not isinstance(text, bool):
        if text is not None and text < 0:
            raise UserError(f"--min-kept {text} must not be negative; give top_k, a number >= 0, or none")
        return text
    word = str(text).strip().lower()
    if word in ("none", "top_k"):
        return None if word == "none" else "top_k"
    try:
        value = int(word)
    except ValueError:
        raise UserError(f"--min-kept {text!r}: write top_k, a whole number >= 0, or none") from None
    if value < 0:
        raise UserError(f"--min-kept {value} must not be negative; give top_k, a number >= 0, or none")
    return value


def parse_bytes(text: str) -> float:
    """'40GB', '12.5 GiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"cannot read {text!r} as a size; write e.g. 40GB, 12.5GiB or 1e9")
    try:
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    except ValueError as exc:
        raise UserError(f"cannot read {text!r} as a size; write e.g. 40GB or 12.5GiB") from exc
    if not math.isfinite(value) or value < 0:
        raise UserError(f"size {text!r} must be a finite, non-negative number of bytes (e.g. 40GB)")
    return value


@dataclass
class LayerRule:
    """Which experts of one layer must be kept, must be removed, or kept equally per group."""

    keep: np.ndarray  # bool (N,)
    remove: np.ndarray  # bool (N,)
    groups: np.ndarray | None = None  # int (N,) group label; kept count must be equal per group

    @classmethod
    def free(cls, n: int) -> "LayerRule":
        return cls(np.zeros(n, bool), np.zeros(n, bool), None)

    @property
    def num_groups(self) -> int:
        return 1 if self.groups is None else int(self.groups.max()) + 1

    def feasible_counts(self) -> np.ndarray:
        """bool (N+1,): kept counts n for which a kept set obeying the rule exists."""
        n_all = self.keep.shape[0]
        ok = np.zeros(n_all + 1, bool)
        if self.groups is None:
            ok[int(self.keep.sum()) : n_all - int(self.remove.sum()) + 1] = True
            return ok
        g = self.num_groups
        per = np.arange(n_all // g + 1)
        good = np.ones(per.shape, bool)
        for label in range(g):
            members = self.groups == label
            good &= per >= self.keep[members].sum()
            good &= per <= members.sum() - self.remove[members].sum()
        ok[per[good] * g] = True
        return ok

    def mask_ok(self, mask: np.ndarray) -> bool:
        if np.any(self.keep & ~mask) or np.any(self.remove & mask):
            return False
        if self.groups is not None:
            counts = np.bincount(self.groups[mask], minlength=self.num_groups)
            return bool(np.all(counts == counts[0]))
        return True


class Constraint:
    """Base class: a constraint that says nothing. Subclasses override what applies."""

    name: ClassVar[str] = ""

    def describe(self, problem: "Problem") -> str:
        return self.name

    def to_json(self) -> dict:
        return {"name": self.name}

    def validate(self, problem: "Problem") -> None:
        """Raise a UserError if the constraint does not fit the problem (unknown layer, ...)."""

    # per-layer view
    def count_bounds(self, problem: "Problem", p: int) -> tuple[int, int] | None:
        return None

    def count_allowed(self, problem: "Problem", p: int) -> np.ndarray | None:
        """bool (N+1,) of allowed kept counts beyond the bounds, or None."""
        return None

    def restrict_counts(self, problem: "Problem", p: int, allowed: np.ndarray) -> np.ndarray:
        """`allowed` (bool (N+1,) over kept counts of layer p) with this constraint's bounds
        and allowed counts applied, in place."""
        bounds = self.count_bounds(problem, p)
        if bounds is not None:
            allowed[: bounds[0]] = False
            allowed[bounds[1] + 1 :] = False
        extra = self.count_allowed(problem, p)
        if extra is not None:
            allowed &= extra
        return allowed

    def layer_rule(self, problem: "Problem", p: int) -> LayerRule | None:
        return None

    # global view
    def needs_expert_level(self, problem: "Problem") -> bool:
        return False

    def add_to_model(self, form: "Formulation") -> None:
        """Rows beyond the per-layer counts and rules (which the formulation applies itself)."""

    def count_violations(self, problem: "Problem", counts: np.ndarray) -> list[str]:
        """Violations visible from the kept counts alone (used by heuristics to repair)."""
        return []

    def check(self, plan: "Plan", problem: "Problem") -> list[str]:
        raise NotImplementedError

    def precheck(self, problem: "Problem", lo: np.ndarray, hi: np.ndarray) -> str | None:
        return None


def _kept_mask(plan: "Plan", problem: "Problem", p: int) -> np.ndarray:
    layer = problem.layers[p]
    mask = np.zeros(layer.num_experts, bool)
    mask[list(plan.kept.get(layer.index, []))] = True
    return mask


def _counts(plan: "Plan", problem: "Problem") -> np.ndarray:
    return np.array([len(plan.kept.get(layer.index, [])) for layer in problem.layers])


class CountConstraint(Constraint):
    """A constraint on the kept count of each layer alone: a plan is checked through
    ``count_violations`` on its counts, so a subclass writes the rule once."""

    def check(self, plan: "Plan", problem: "Problem") -> list[str]:
        return self.count_violations(problem, _counts(plan, problem))


# -- the budget ---------------------------------------------------------------------------------
@register_constraint
@dataclass(frozen=True)
class Budget(Constraint):
    """How much to remove: an exact count or fraction of experts, or a byte target.

    kinds: ``remove`` (exactly R experts), ``fraction`` (exactly round(f * total) experts),
    ``free_bytes`` (removed experts free at least B bytes), ``keep_bytes`` (kept experts use at
    most C bytes).
    """

    kind: str
    value: float
    name: ClassVar[str] = "budget"
    KINDS: ClassVar[tuple[str, ...]] = ("remove", "fraction", "free_bytes", "keep_bytes")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise UserError(f"budget kind {self.kind!r} is not one of {self.KINDS}")
        if not math.isfinite(self.value):
            raise UserError(f"budget {self.value} must be a finite number")
        if self.kind == "fraction" and not 0.0 <= self.value <= 1.0:
            raise UserError(f"budget fraction {self.value} must lie in [0, 1]")
        if self.value < 0:
            raise UserError(f"budget {self.value} must not be negative")

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """'0.5' (fraction), '64' (experts), 'free:40GB', 'keep:100GiB'."""
        text = str(text).strip()
        if ":" in text:
            kind, amount = text.split(":", 1)
            kinds = {"free": "free_bytes", "keep": "keep_bytes"}
            if kind.strip().lower() not in kinds:
                raise UserError(f"budget {text!r}: write free:SIZE or keep:SIZE (e.g. free:40GB)")
            return cls(kinds[kind.strip().lower()], parse_bytes(amount))
        try:
            number = float(text)
        except ValueError as exc:
            raise UserError(
                f"budget {text!r} is not a fraction (0.5), an expert count (64), free:SIZE or keep:SIZE"
            ) from exc
        if not math.isfinite(number):
            raise UserError(f"budget {text!r} is not a finite number; give a fraction (0.5), an "
                            "expert count (64), free:SIZE or keep:SIZE")
        if 0.0 <= number < 1.0 or (number == 1.0 and "." in text):
            return cls("fraction", number)
        if number != int(number):
            raise UserError(f"budget {text!r}: an expert count must be a whole number")
        return cls("remove", float(int(number)))

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "value": self.value}

    # count budgets fix the kept total K; byte budgets cap the kept bytes
    def kept_total(self, problem: "Problem") -> int | None:
        total = problem.total_experts
        if self.kind == "remove":
            return total - int(self.value)
        if self.kind == "fraction":
            return total - int(round(self.value * total))
        return None

    def kept_bytes_cap(self, problem: "Problem") -> float | None:
        if self.kind == "keep_bytes":
            return float(self.value)
        if self.kind == "free_bytes":
            return problem.total_bytes - float(self.value)
        return None

    def describe(self, problem: "Problem") -> str:
        total = problem.total_experts
        k = self.kept_total(problem)
        if k is not None:
            return f"remove exactly {total - k} of {total} experts (keep {k})"
        cap = self.kept_bytes_cap(problem)
        return (
            f"keep at most {format_bytes(cap)} of {format_bytes(problem.total_bytes)} expert bytes"
        )

    def validate(self, problem: "Problem") -> None:
        if self.kind == "remove" and self.value > problem.total_experts:
            raise UserError(
                f"budget removes {int(self.value)} experts but the model has only {problem.total_experts}"
            )

    def needs_expert_level(self, problem: "Problem") -> bool:
        return self.kept_bytes_cap(problem) is not None and not problem.uniform_bytes_per_layer

    def add_to_model(self, form: "Formulation") -> None:
        k = self.kept_total(form.problem)
        if k is not None:
            cols, vals = form.total_count_terms()
            form.mip.add_row(cols, vals, k, k)
        else:
            cols, vals = form.kept_bytes_terms(range(len(form.problem.layers)))
            form.mip.add_row(cols, vals, -math.inf, self.kept_bytes_cap(form.problem))

    def count_violations(self, problem, counts) -> list[str]:
        k = self.kept_total(problem)
        if k is not None and int(counts.sum()) != k:
            return [f"budget: {int(counts.sum())} experts kept, the budget keeps exactly {k}"]
        return []

    def check(self, plan, problem) -> list[str]:
        out = self.count_violations(problem, _counts(plan, problem))
        cap = self.kept_bytes_cap(problem)
        if cap is not None:
            kept = sum(
                int(layer.expert_bytes[_kept_mask(plan, problem, p)].sum())
                for p, layer in enumerate(problem.layers)
            )
            if over_cap(kept, cap):
                out.append(
                    f"budget: kept experts use {format_bytes(kept)}, above the cap {format_bytes(cap)}"
                )
        return out

    def precheck(self, problem, lo, hi) -> str | None:
        k = self.kept_total(problem)
        if k is not None:
            if lo.sum() > k:
                return (
                    f"{_explain_bounds(problem, 'lo')} = {int(lo.sum())} kept, "
                    f"but the budget keeps {k} ({self.describe(problem)})"
                )
            if hi.sum() < k:
                return (
                    f"{_explain_bounds(problem, 'hi')} = {int(hi.sum())} kept at most, "
                    f"but the budget keeps {k} ({self.describe(problem)})"
                )
            return None
        cap = self.kept_bytes_cap(problem)
        least = sum(
            float(np.sort(layer.expert_bytes)[: lo[p]].sum())
            for p, layer in enumerate(problem.layers)
        )
        if over_cap(least, cap):
            return (
                f"{_explain_bounds(problem, 'lo')} = {int(lo.sum())} kept experts use at least "
                f"{format_bytes(least)}, but the budget keeps at most {format_bytes(cap)}"
            )
        return None


# -- per-layer count constraints ---------------------------------------------------------------
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
class RoutingGroups(Constraint):
    """DeepSeek-V3 group-limited routing: experts form ``n_group`` contiguous groups; every group
    keeps the same count, at least 2, and ``topk_group * kept / n_group >= top_k``."""

    n_group: int
    topk_group: int
    name: ClassVar[str] = "routing_groups"

    def describe(self, problem):
        return f"routing groups (n_group {self.n_group}, topk_group {self.topk_group})"

    def to_json(self):
        return {"name": self.name, "n_group": self.n_group, "topk_group": self.topk_group}

    def validate(self, problem):
        for layer in problem.layers:
            if layer.num_experts % self.n_group:
                raise UserError(
                    f"layer {layer.index}: {layer.num_experts} experts do not split "
                    f"into {self.n_group} routing groups"
                )

    def labels(self, problem, p) -> np.ndarray:
        n = problem.layers[p].num_experts
        return np.arange(n) // (n // self.n_group)

    def count_allowed(self, problem, p):
        n = np.arange(problem.layers[p].num_experts + 1)
        per = n // self.n_group
        return (
            (n % self.n_group == 0)
            & (per >= 2)
            & (self.topk_group * per >= problem.layers[p].top_k)
        )

    def layer_rule(self, problem, p):
        n = problem.layers[p].num_experts
        return LayerRule(np.zeros(n, bool), np.zeros(n, bool), self.labels(problem, p))

    def count_violations(self, problem, counts):
        ok = [self.count_allowed(problem, p)[counts[p]] for p in range(len(problem.layers))]
        return [
            f"layer {layer.index}: keeps {counts[p]} experts, but routing groups need a multiple "
            f"of {self.n_group} with >= 2 per group and topk_group*kept/n_group >= top_k {layer.top_k}"
            for p, layer in enumerate(problem.layers)
            if not ok[p]
        ]

    def check(self, plan, problem):
        out = self.count_violations(problem, _counts(plan, problem))
        for p, layer in enumerate(problem.layers):
            per = np.bincount(
                self.labels(problem, p)[_kept_mask(plan, problem, p)], minlength=self.n_group
            )
            if np.any(per != per[0]):
                out.append(
                    f"layer {layer.index}: kept experts per routing group {per.tolist()} are not equal"
                )
        return out


class _ExpertList(Constraint):
    """Shared code of must-keep and must-remove: ``experts`` maps decoder layer -> expert indices."""

    experts: dict
    keep_them: ClassVar[bool] = True

    def __init__(self, experts: dict):
        self.experts = {int(k): sorted({int(e) for e in v}) for k, v in experts.items()}

    def __eq__(self, other):
        return type(self) is type(other) and self.experts == other.experts

    def __repr__(self):
        return f"{type(self).__name__}({self.experts})"

    @classmethod
    def parse(cls, text: str) -> "_ExpertList":
        """'3:0,5,7;4:1' -> {3: [0, 5, 7], 4: [1]}."""
        out: dict[int, list[int]] = {}
        for chunk in filter(None, (c.strip() for c in str(text).split(";"))):
            try:
                layer, experts = chunk.split(":")
                out.setdefault(int(layer), []).extend(
                    int(e) for e in experts.split(",") if e.strip()
                )
            except ValueError as exc:
                raise UserError(
                    f"cannot read {chunk!r}; write LAYER:E1,E2 separated by ';' (e.g. 3:0,5;4:1)"
                ) from exc
        return cls(out)

    def to_json(self):
        return {"name": self.name, "experts": {str(k): v for k, v in self.experts.items()}}

    def describe(self, problem):
        total = sum(len(v) for v in self.experts.values())
        return f"{self.name.replace('_', '-')} ({total} experts in {len(self.experts)} layers)"

    def validate(self, problem):
        for layer_index, experts in self.experts.items():
            if layer_index not in problem.position:
                raise UserError(
                    f"{self.name}: layer {layer_index} is not an MoE layer of this model "
                    f"(MoE layers: {problem.layer_indices[:8]}...)"
                )
            n = problem.layers[problem.position[layer_index]].num_experts
            bad = [e for e in experts if not 0 <= e < n]
            if bad:
                raise UserError(
                    f"{self.name}: layer {layer_index} has experts 0..{n - 1}, not {bad}"
                )

    def _mask(self, problem, p):
        layer = problem.layers[p]
        mask = np.zeros(layer.num_experts, bool)
        mask[self.experts.get(layer.index, [])] = True
        return mask

    def layer_rule(self, problem, p):
        mask = self._mask(problem, p)
        empty = np.zeros_like(mask)
        return LayerRule(mask, empty) if self.keep_them else LayerRule(empty, mask)

    def check(self, plan, problem):
        out = []
        for p, layer in enumerate(problem.layers):
            kept = _kept_mask(plan, problem, p)
            wrong = np.flatnonzero(self._mask(problem, p) & (~kept if self.keep_them else kept))
            if wrong.size:
                verb = "removed" if self.keep_them else "kept"
                out.append(
                    f"layer {layer.index}: experts {wrong.tolist()} are {verb}, against {self.name}"
                )
        return out


@register_constraint
class MustKeep(_ExpertList):
    name: ClassVar[str] = "must_keep"
    keep_them: ClassVar[bool] = True


@register_constraint
class MustRemove(_ExpertList):
    name: ClassVar[str] = "must_remove"
    keep_them: ClassVar[bool] = False


# -- global constraints ------------------------------------------------------------------------
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
                f"constraints leave none in common ({_explain_bounds(problem, 'lo')})"
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
    E_b = (1 - gamma) log L, i.e. sum_l n_l log n_l <= K (log K - E_b)."""

    gamma: float
    name: ClassVar[str] = "entropy_guard"

    def __post_init__(self):
        if not 0.0 <= self.gamma <= 1.0:
            raise UserError(f"entropy guard gamma {self.gamma} must lie in [0, 1]")

    def describe(self, problem):
        return f"entropy guard (gamma {self.gamma:g}: entropy >= {self.entropy_floor(problem):.4f})"

    def to_json(self):
        return {"name": self.name, "gamma": self.gamma}

    def entropy_floor(self, problem) -> float:
        return (1.0 - self.gamma) * math.log(len(problem.layers))

    @staticmethod
    def entropy(counts: np.ndarray) -> float:
        counts = np.asarray(counts, float)
        total = counts.sum()
        if total <= 0:
            return 0.0
        p = counts[counts > 0] / total
        return float(-(p * np.log(p)).sum())

    @staticmethod
    def nlogn(n) -> np.ndarray:
        n = np.asarray(n, float)
        return np.where(n > 0, n * np.log(np.maximum(n, 1.0)), 0.0)

    def add_to_model(self, form):
        problem = form.problem
        eb = self.entropy_floor(problem)
        cols, vals = [], []
        for p in range(len(problem.layers)):
            cols.append(form.y[p])
            vals.append(self.nlogn(form.counts[p]))
        k = problem.budget.kept_total(problem)
        if k is not None:
            rhs = k * (math.log(k) - eb) if k > 0 else 0.0
            form.mip.add_row(
                np.concatenate(cols),
                np.concatenate(vals),
                -math.inf,
                rhs + 1e-7 * max(1.0, abs(rhs)),
            )
            return
        # byte budget: the total K varies, so pick it with one-hot z[K] and move K log K - K E_b left
        lo = int(sum(c.min() for c in form.counts))
        hi = int(sum(c.max() for c in form.counts))
        ks = np.arange(lo, hi + 1)
        # an empty plan has no allocation entropy at all: K = 0 never satisfies a positive floor
        z = form.mip.add_vars(
            ks.size, 0.0, np.where((ks == 0) & (eb > 0), 0.0, 1.0), integral=not form.relax
        )
        form.mip.add_row(z, 1.0, 1.0, 1.0)
        tcols, tvals = form.total_count_terms()
        form.mip.add_row(
            np.concatenate([tcols, z]), np.concatenate([tvals, -ks.astype(float)]), 0.0, 0.0
        )
        rhs = np.where(ks > 0, ks * (np.log(np.maximum(ks, 1)) - eb), 0.0)
        form.mip.add_row(np.concatenate(cols + [z]), np.concatenate(vals + [-rhs]), -math.inf, 1e-7)

    def count_violations(self, problem, counts):
        e, eb = self.entropy(counts), self.entropy_floor(problem)
        if e < eb - 1e-9:
            return [
                f"entropy guard: allocation entropy {e:.4f} is below the floor {eb:.4f} (gamma {self.gamma:g})"
            ]
        return []


    def precheck(self, problem, lo, hi):
        k = problem.budget.kept_total(problem)
        if k is None or not lo.sum() <= k <= hi.sum():
            return None
        counts = _most_even(lo, hi, k)
        e, eb = self.entropy(counts), self.entropy_floor(problem)
        if e < eb - 1e-9:
            return (
                f"entropy guard (gamma {self.gamma:g}) needs allocation entropy >= {eb:.4f}, but the "
                f"most even allocation of {k} kept experts within the per-layer bounds has {e:.4f}"
            )
        return None


def _most_even(lo: np.ndarray, hi: np.ndarray, k: int) -> np.ndarray:
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


@register_constraint
class MemoryCap(Constraint):
    """Kept routed-expert bytes on each device stay within its cap, under a placement.

    ``placement`` is either ``{"layers": {device: [decoder layers]}}`` (pipeline parallel: each
    device holds whole layers) or ``{"experts": {decoder layer: [device of expert 0, 1, ...]}}``
    (expert parallel). ``caps`` maps device -> bytes (one number: the same cap for every device).
    """

    name: ClassVar[str] = "memory_cap"

    def __init__(self, caps, placement: dict):
        if set(placement) not in ({"layers"}, {"experts"}):
            raise UserError("memory cap placement must be {'layers': {...}} or {'experts': {...}}")
        self.kind = next(iter(placement))
        if self.kind == "layers":
            self.layers_of = {
                str(d): [int(layer) for layer in ls] for d, ls in placement["layers"].items()
            }
            self.devices = sorted(self.layers_of, key=_natural)
        else:
            self.device_of = {
                int(layer): [str(d) for d in ds] for layer, ds in placement["experts"].items()
            }
            self.devices = sorted({d for ds in self.device_of.values() for d in ds}, key=_natural)
        if isinstance(caps, dict):
            self.caps = {str(d): float(c) for d, c in caps.items()}
        else:
            self.caps = {d: float(caps) for d in self.devices}
        missing = [d for d in self.devices if d not in self.caps]
        if missing:
            raise UserError(f"memory cap: no cap given for devices {missing}")

    @classmethod
    def pipeline(cls, layer_indices: list[int], devices: int, cap) -> "MemoryCap":
        """Split the MoE layers into `devices` contiguous stages of near-equal size."""
        if devices < 1:
            raise UserError("pipeline parallel needs at least one device")
        stages = np.array_split(np.asarray(sorted(layer_indices)), devices)
        return cls(cap, {"layers": {str(d): s.tolist() for d, s in enumerate(stages)}})

    @classmethod
    def expert_parallel(cls, experts_per_layer: dict[int, int], devices: int, cap) -> "MemoryCap":
        """Expert e of every layer lives on device e * devices // N (contiguous blocks, as in EP)."""
        if devices < 1:
            raise UserError("expert parallel needs at least one device")
        return cls(
            cap,
            {
                "experts": {
                    layer: [str(e * devices // n) for e in range(n)]
                    for layer, n in experts_per_layer.items()
                }
            },
        )

    def to_json(self):
        placement = (
            {"layers": self.layers_of}
            if self.kind == "layers"
            else {"experts": {str(layer): ds for layer, ds in self.device_of.items()}}
        )
        return {"name": self.name, "caps": self.caps, "placement": placement}

    def __eq__(self, other):
        return isinstance(other, MemoryCap) and self.to_json() == other.to_json()

    def describe(self, problem):
        caps = sorted(set(self.caps.values()))
        cap_text = format_bytes(caps[0]) if len(caps) == 1 else "per-device caps"
        where = "pipeline stages" if self.kind == "layers" else "expert-parallel ranks"
        return f"memory cap {cap_text} on {len(self.devices)} {where}"

    def validate(self, problem):
        if self.kind == "layers":
            placed = [layer for ls in self.layers_of.values() for layer in ls]
            if sorted(placed) != problem.layer_indices:
                raise UserError(
                    "memory cap: the pipeline placement must list every MoE layer exactly "
                    f"once (MoE layers {problem.layer_indices[:6]}..., placed {sorted(placed)[:6]}...)"
                )
        else:
            for layer in problem.layers:
                if len(self.device_of.get(layer.index, [])) != layer.num_experts:
                    raise UserError(
                        f"memory cap: the expert placement of layer {layer.index} must list "
                        f"a device for each of its {layer.num_experts} experts"
                    )

    def needs_expert_level(self, problem):
        return self.kind == "experts" or not problem.uniform_bytes_per_layer

    def _members(self, problem, device):
        """[(position, expert mask on this device)] for one device."""
        out = []
        for p, layer in enumerate(problem.layers):
            if self.kind == "layers":
                if layer.index in self.layers_of[device]:
                    out.append((p, np.ones(layer.num_experts, bool)))
            else:
                mask = np.asarray(self.device_of[layer.index]) == device
                if mask.any():
                    out.append((p, mask))
        return out

    def add_to_model(self, form):
        for device in self.devices:
            members = self._members(form.problem, device)
            if not members:
                continue
            cols, vals = form.kept_bytes_terms([p for p, _ in members], {p: m for p, m in members})
            form.mip.add_row(cols, vals, -math.inf, self.caps[device])

    def kept_bytes(self, problem, masks) -> dict[str, float]:
        return {
            d: float(
                sum(
                    problem.layers[p].expert_bytes[m & masks[p]].sum()
                    for p, m in self._members(problem, d)
                )
            )
            for d in self.devices
        }

    def count_violations(self, problem, counts):
        if self.needs_expert_level(problem):
            return []
        masks = [np.arange(layer.num_experts) < counts[p] for p, layer in enumerate(problem.layers)]
        return self._over(problem, masks)

    def _over(self, problem, masks):
        used = self.kept_bytes(problem, masks)
        return [
            f"memory cap: device {d} holds {format_bytes(used[d])} of kept experts, above its cap "
            f"{format_bytes(self.caps[d])}"
            for d in self.devices
            if over_cap(used[d], self.caps[d])
        ]

    def check(self, plan, problem):
        masks = [_kept_mask(plan, problem, p) for p in range(len(problem.layers))]
        return self._over(problem, masks)

    def precheck(self, problem, lo, hi):
        rules = problem.layer_rules()
        for device in self.devices:
            least = 0.0
            for p, mask in self._members(problem, device):
                b = problem.layers[p].expert_bytes
                forced = float(b[mask & rules[p].keep].sum())
                if self.kind == "layers":
                    forced = max(forced, float(np.sort(b)[: lo[p]].sum()))
                least += forced
            if over_cap(least, self.caps[device]):
                return (
                    f"memory cap: device {device} must hold at least {format_bytes(least)} of kept "
                    f"experts (per-layer minimums and must-keep), above its cap "
                    f"{format_bytes(self.caps[device])}"
                )
        return None


def _natural(text: str):
    return (0, int(text)) if str(text).isdigit() else (1, str(text))


# -- feasibility of counts -----------------------------------------------------------------------
def _explain_bounds(problem: "Problem", side: str) -> str:
    """Words for the per-layer lower (or upper) count bounds, grouped by the constraint that sets them.

    e.g. 'per-layer minimum 8 x 58 layers' or 'per-layer minimum 8 x 57 layers + must-keep 12 in layer 3'.
    """
    allowed = problem.allowed_counts()
    groups: dict[tuple[str, int], list[int]] = {}
    for p, layer in enumerate(problem.layers):
        best_value, best_label = (
            (0, "no constraint") if side == "lo" else (layer.num_experts, "all experts")
        )
        for c in problem.all_constraints:
            value = _single_bound(c, problem, p, side)
            if value is None:
                continue
            if (side == "lo" and value > best_value) or (side == "hi" and value < best_value):
                best_value, best_label = value, _bound_label(c, problem, p, side)
        ok = np.flatnonzero(allowed[p])
        actual = int(ok.min() if side == "lo" else ok.max()) if ok.size else best_value
        label = best_label
        if actual != best_value:  # several constraints together (e.g. a minimum and a multiple)
            others = [
                c.describe(problem)
                for c in problem.all_constraints
                if c.count_allowed(problem, p) is not None or c.layer_rule(problem, p) is not None
            ]
            verb = "raised" if side == "lo" else "lowered"
            label += f" {best_value} {verb} by {' and '.join(others)} to"
        groups.setdefault((label, actual), []).append(layer.index)
    parts = []
    for (label, value), layers in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        if len(layers) == 1:
            parts.append(f"{label} {value} in layer {layers[0]}")
        else:
            parts.append(f"{label} {value} x {len(layers)} layers")
    return " + ".join(parts)


def _single_bound(c: Constraint, problem, p, side) -> int | None:
    allowed = c.restrict_counts(problem, p, np.ones(problem.layers[p].num_experts + 1, bool))
    rule = c.layer_rule(problem, p)
    if rule is not None:
        allowed &= rule.feasible_counts()
    if allowed.all():
        return None
    idx = np.flatnonzero(allowed)
    if idx.size == 0:
        return None
    return int(idx.min() if side == "lo" else idx.max())


def _bound_label(c: Constraint, problem, p, side) -> str:
    if isinstance(c, MinKept):
        return "per-layer minimum"
    if isinstance(c, MaxRemovedFraction):
        return f"at most {c.fraction:g} removed per layer: minimum kept"
    if isinstance(c, MustKeep):
        return "must-keep"
    if isinstance(c, MustRemove):
        return "must-remove leaves at most"
    if isinstance(c, RoutingGroups):
        return "routing-groups minimum" if side == "lo" else "routing-groups maximum"
    if isinstance(c, MultipleOf):
        return f"multiple of {c.g}: " + ("minimum" if side == "lo" else "maximum")
    return c.name + (" minimum" if side == "lo" else " maximum")


def reachable_totals(allowed: list[np.ndarray]) -> int:
    """Bitset (a Python int) of every kept total reachable by picking one allowed count per layer."""
    reach = 1
    for a in allowed:
        step = 0
        for n in np.flatnonzero(a):
            step |= reach << int(n)
        reach = step
    return reach


def precheck(problem: "Problem") -> None:
    """Raise InfeasibleError with numbers if the counts alone make the problem infeasible."""
    rules = problem.layer_rules()
    for p, layer in enumerate(problem.layers):
        both = np.flatnonzero(rules[p].keep & rules[p].remove)
        if both.size:
            raise InfeasibleError(
                f"layer {layer.index}: experts {both.tolist()} are both must-keep and must-remove"
            )
    allowed = problem.allowed_counts()
    for p, layer in enumerate(problem.layers):
        if not allowed[p].any():
            lo = _explain_bounds_single(problem, p)
            raise InfeasibleError(
                f"layer {layer.index} ({layer.num_experts} experts) has no allowed kept count: {lo}"
            )
    lo = np.array([np.flatnonzero(a).min() for a in allowed])
    hi = np.array([np.flatnonzero(a).max() for a in allowed])
    for c in problem.all_constraints:
        message = c.precheck(problem, lo, hi)
        if message:
            raise InfeasibleError(message)
    k = problem.budget.kept_total(problem)
    if k is not None and not (reachable_totals(allowed) >> k) & 1:
        reach = reachable_totals(allowed)
        below = next((t for t in range(k, -1, -1) if (reach >> t) & 1), None)
        above = next((t for t in range(k, int(hi.sum()) + 1) if (reach >> t) & 1), None)
        near = ", ".join(str(t) for t in (below, above) if t is not None)
        kinds = sorted(
            {
                c.describe(problem)
                for c in problem.constraints
                if isinstance(c, (MultipleOf, RoutingGroups, MustKeep, MustRemove))
            }
        )
        raise InfeasibleError(
            f"the budget keeps {k} experts, but no choice of allowed per-layer counts "
            f"adds up to {k} under {', '.join(kinds) or 'the per-layer constraints'} "
            f"(nearest reachable totals: {near})"
        )


def _explain_bounds_single(problem, p) -> str:
    parts = []
    for c in problem.all_constraints:
        lo = _single_bound(c, problem, p, "lo")
        hi = _single_bound(c, problem, p, "hi")
        if lo is not None or hi is not None:
            parts.append(f"{c.describe(problem)} allows {lo}..{hi}")
        elif any(x is not None for x in (c.count_bounds(problem, p), c.count_allowed(problem, p))):
            parts.append(f"{c.describe(problem)} allows nothing")
    return "; ".join(parts) or "conflicting per-layer constraints"
