"""The budget: how much to remove, as an exact count or fraction of experts, or in bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from solvers.constraints.base import Constraint, kept_mask, plan_counts, register_constraint
from solvers.constraints.precheck import explain_bounds
from solvers.constraints.units import format_bytes, over_cap, parse_bytes
from solvers.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from solvers.formulation import Formulation
    from solvers.problem import Problem


@register_constraint
@dataclass(frozen=True)
class Budget(Constraint):
    """How much to remove: an exact count or fraction of experts, or a byte target.

    kinds: ``remove`` (exactly R experts), ``fraction`` (exactly round(f * total) experts),
    ``free_bytes`` (removed experts free at least B bytes), ``keep_bytes`` (kept experts use at
    most C bytes), ``fit`` (the fewest removals that let the pipeline memory caps hold the rest).
    """

    kind: str
    value: float
    name: ClassVar[str] = "budget"
    count_relaxation: ClassVar[bool] = True
    KINDS: ClassVar[tuple[str, ...]] = ("remove", "fraction", "free_bytes", "keep_bytes", "fit")

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
        """'0.5' (fraction), '64' (experts), 'free:40GB', 'keep:100GiB', 'fit'."""
        text = str(text).strip()
        if text.lower() == "fit":
            return cls("fit", 0.0)
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
        if self.kind == "fit":
            return _fit_kept_total(problem)
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
            fit = " (fit: the fewest removals the memory caps allow)" if self.kind == "fit" else ""
            return f"remove exactly {total - k} of {total} experts (keep {k}){fit}"
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
        out = self.count_violations(problem, plan_counts(plan, problem))
        cap = self.kept_bytes_cap(problem)
        if cap is not None:
            kept = sum(
                int(layer.expert_bytes[kept_mask(plan, problem, p)].sum())
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
                    f"{explain_bounds(problem, 'lo')} = {int(lo.sum())} kept, "
                    f"but the budget keeps {k} ({self.describe(problem)})"
                )
            if hi.sum() < k:
                return (
                    f"{explain_bounds(problem, 'hi')} = {int(hi.sum())} kept at most, "
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
                f"{explain_bounds(problem, 'lo')} = {int(lo.sum())} kept experts use at least "
                f"{format_bytes(least)}, but the budget keeps at most {format_bytes(cap)}"
            )
        return None


def _fit_kept_total(problem: "Problem") -> int:
    """The budget `fit`: the most experts the pipeline memory caps can hold together (each
    device filled with its cheapest experts above the per-layer minimums), i.e. the fewest
    removals. Exact under per-layer bounds; other count rules (uniform, multiple-of) can make
    it unreachable, which the feasibility check then reports."""
    from solvers.constraints.memory import MemoryCap

    caps = [c for c in problem.constraints if isinstance(c, MemoryCap) and c.kind == "layers"]
    if not caps:
        raise UserError("budget fit needs a pipeline memory cap: --fit SPEC, or --memory-cap with "
                        "--pipeline D")
    cache = problem.__dict__.setdefault("_fit_kept_total", {})
    if "k" not in cache:
        allowed = problem.allowed_counts()
        lo = np.array([np.flatnonzero(a).min() if a.any() else 0 for a in allowed])
        hi = np.array([np.flatnonzero(a).max() if a.any() else 0 for a in allowed])
        cache["k"] = int(min([int(hi.sum())] + [sum(c.most_kept(problem, lo, hi).values()) for c in caps]))
    return cache["k"]
