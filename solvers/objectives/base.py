"""The objective-term contract and its registry by name.

Every term is a sum over layers of a function of the layer's kept set S (``mask``). Each term
evaluates plans on its own (``layer_values``), gives a lower bound for every kept count
(``lower_bounds``), an incremental state for greedy and local search (``state``), and adds
itself to the integer program (``add_to_model``). A plan's objective is always recomputed from
``layer_values``, never taken from a solver. Terms round-trip through their spec
(``to_json`` / :func:`term_from_json`).

Two optional answers feed the exact solver's certificates (:mod:`solvers.bounds`):
``quadratic(layer)`` - the term as ``x'Mx + c'x + const`` on the binary keep vector, which the
first-order convex bound handles - and ``count_only`` - the value depends only on the count, so
its ``lower_bounds`` are exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from solvers.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from solvers.formulation import Formulation
    from solvers.problem import Layer, Problem

TERMS: dict[str, type["Term"]] = {}


def register_term(cls):
    TERMS[cls.name] = cls
    return cls


def term_from_json(data: dict) -> "Term":
    """The term a spec (``Term.to_json()``, with or without a ``weight``) describes."""
    if not isinstance(data, dict) or data.get("name") not in TERMS:
        name = data.get("name") if isinstance(data, dict) else data
        raise UserError(f"unknown objective term {name!r}; known terms: {', '.join(sorted(TERMS))}")
    cls = TERMS[data["name"]]
    try:
        return cls.from_json(data)
    except (TypeError, KeyError) as exc:
        raise UserError(
            f"objective term spec {data!r} does not fit {cls.__name__}: {exc}"
        ) from None


@dataclass
class Quadratic:
    """A term on one layer as ``x'Mx + c'x + const`` over binary keep vectors x (M symmetric,
    zero diagonal, or None when the term is linear)."""

    matrix: np.ndarray | None
    linear: np.ndarray
    const: float = 0.0


class Term:
    name: ClassVar[str] = ""
    # value depends only on the kept set through importance order: sorting is exact
    order_exact: ClassVar[bool] = False
    # value depends only on the kept count: lower_bounds are exact
    count_only: ClassVar[bool] = False

    def validate(self, problem: "Problem") -> None:
        pass

    def __eq__(self, other):  # equal specs, equal terms (so objectives compare after a round trip)
        return type(self) is type(other) and self.to_json() == other.to_json()

    def __hash__(self):
        return hash((type(self).__name__, repr(sorted(self.to_json().items()))))

    def to_json(self) -> dict:
        return {"name": self.name}

    @classmethod
    def from_json(cls, data: dict) -> "Term":
        """Inverse of ``to_json``: by default the spec's fields are the constructor's arguments."""
        return cls(**{k: v for k, v in data.items() if k not in ("name", "weight")})

    def layer_values(self, layer: "Layer", masks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def lower_bounds(self, layer: "Layer") -> np.ndarray:
        raise NotImplementedError

    def quadratic(self, layer: "Layer") -> Quadratic | None:
        return None

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


def need_similarity(term: str, problem: "Problem") -> None:
    missing = [layer.index for layer in problem.layers if layer.similarity is None]
    if missing:
        raise UserError(
            f"the {term} objective needs expert similarity, but layers {missing[:5]} have none; "
            "calibrate with a similarity (e.g. cka) or choose the additive objective"
        )
