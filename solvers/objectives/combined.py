"""An objective: a positive-weighted sum of terms, parsed from text or read back from its spec."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from solvers.errors import UserError
from solvers.objectives.base import TERMS, Term, term_from_json

if TYPE_CHECKING:  # pragma: no cover
    from solvers.formulation import Formulation
    from solvers.plan import Plan
    from solvers.problem import Problem


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


def objective_from_json(specs) -> Objective:
    """Inverse of ``Objective.to_json()``: ``[{"weight": w, "name": ..., ...}, ...]``."""
    if not isinstance(specs, list) or not specs:
        raise UserError(f"objective spec {specs!r} must be a non-empty list of terms")
    weights = [d.get("weight", 1.0) if isinstance(d, dict) else 1.0 for d in specs]
    return Objective([(w, term_from_json(d)) for w, d in zip(weights, specs)])
