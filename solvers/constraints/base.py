"""The constraint contract, the per-layer rule it may impose, and the registry by name.

Every constraint answers four questions, and each answer is used by a different part:

* ``check(plan, problem)`` - the violations of a finished plan, in words. The independent plan
  checker (:mod:`solvers.check`) calls only this, so it must not reuse model-building code.
* ``count_bounds`` / ``count_allowed`` / ``layer_rule`` - what the constraint says about a single
  layer: the kept counts it allows, and which experts must be kept, removed or balanced across
  routing groups. Greedy, uniform, DP and the per-layer curves work from these.
* ``add_to_model(form)`` - the rows it adds to the integer program (:mod:`solvers.formulation`),
  on the count indicators ``y[l, n]`` or, where it needs them, the keep variables ``x[l, e]``.
* ``precheck(problem, lo, hi)`` - a cheap proof of infeasibility with numbers, run before any
  solver so that every solver raises the same message.

Each also round-trips through its spec: ``to_json()`` and :func:`constraint_from_json`, so the
constraints recorded in a plan can be read back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from solvers.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from solvers.formulation import Formulation
    from solvers.plan import Plan
    from solvers.problem import Problem

CONSTRAINTS: dict[str, type["Constraint"]] = {}


def register_constraint(cls):
    CONSTRAINTS[cls.name] = cls
    return cls


def constraint_from_json(data: dict) -> "Constraint":
    """The constraint a spec (``Constraint.to_json()``) describes, through :data:`CONSTRAINTS`."""
    if not isinstance(data, dict) or data.get("name") not in CONSTRAINTS:
        name = data.get("name") if isinstance(data, dict) else data
        raise UserError(
            f"unknown constraint spec {name!r}; known constraints: {', '.join(sorted(CONSTRAINTS))}"
        )
    cls = CONSTRAINTS[data["name"]]
    try:
        return cls.from_json(data)
    except (TypeError, KeyError, ValueError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(f"constraint spec {data!r} does not fit {cls.__name__}: {exc}") from None


def constraints_from_json(specs) -> list["Constraint"]:
    """A plan's ``provenance.constraint_specs`` back as constraint objects."""
    return [constraint_from_json(d) for d in specs or []]


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

    def labels(self) -> np.ndarray:
        """Group label of every expert (all 0 without groups)."""
        return np.zeros(self.keep.shape[0], int) if self.groups is None else self.groups

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

    def min_linear(self, rho: np.ndarray) -> np.ndarray:
        """(N+1,): for each kept count n, the smallest sum_e rho_e x_e over x in [0, 1]^N with
        sum x = n obeying the rule (forced and banned experts, n / G per group); +inf where no
        such x exists. The minimum is integral: each group keeps its smallest rho."""
        n_all = self.keep.shape[0]
        labels, g = self.labels(), self.num_groups
        per = np.zeros(n_all // g + 1)  # value of keeping m experts in every group
        for label in range(g):
            members = labels == label
            forced = members & self.keep
            free = members & ~self.keep & ~self.remove
            m = np.arange(per.size) - int(forced.sum())
            prefix = np.concatenate([[0.0], np.cumsum(np.sort(rho[free]))])
            ok = (m >= 0) & (m < prefix.size)
            kept = float(rho[forced].sum()) + prefix[np.clip(m, 0, prefix.size - 1)]
            per += np.where(ok, kept, np.inf)
        out = np.full(n_all + 1, np.inf)
        out[np.arange(per.size) * g] = per
        return out

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
    # its count-level rows stay a valid relaxation even when it needs the expert level, so a
    # count-level lower bound may keep them (a byte budget: n times the smallest expert)
    count_relaxation: ClassVar[bool] = False

    def describe(self, problem: "Problem") -> str:
        return self.name

    def to_json(self) -> dict:
        return {"name": self.name}

    @classmethod
    def from_json(cls, data: dict) -> "Constraint":
        """Inverse of ``to_json``: by default the spec's fields are the constructor's arguments."""
        return cls(**{k: v for k, v in data.items() if k != "name"})

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

    def bound_label(self, side: str) -> str:
        """Words for the per-layer lower ('lo') or upper ('hi') count this constraint sets,
        used in infeasibility messages, e.g. 'per-layer minimum'."""
        return self.name + (" minimum" if side == "lo" else " maximum")

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


def kept_mask(plan: "Plan", problem: "Problem", p: int) -> np.ndarray:
    """Bool kept mask of layer position p, read from the plan file's lists."""
    layer = problem.layers[p]
    mask = np.zeros(layer.num_experts, bool)
    mask[list(plan.kept.get(layer.index, []))] = True
    return mask


def plan_counts(plan: "Plan", problem: "Problem") -> np.ndarray:
    return np.array([len(plan.kept.get(layer.index, [])) for layer in problem.layers])


class CountConstraint(Constraint):
    """A constraint on the kept count of each layer alone: a plan is checked through
    ``count_violations`` on its counts, so a subclass writes the rule once."""

    def check(self, plan: "Plan", problem: "Problem") -> list[str]:
        return self.count_violations(problem, plan_counts(plan, problem))


# names the single module used (kept for code written against it)
_kept_mask = kept_mask
_counts = plan_counts
