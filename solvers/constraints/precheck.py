"""Infeasibility explanations: cheap proofs, with numbers, that no plan exists.

:func:`precheck` runs before any solver, so every solver raises the same message. It asks each
constraint for its own proof (``Constraint.precheck``) and checks what needs several of them:
every layer has an allowed count, and the budget's exact total is reachable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from solvers.constraints.base import Constraint
from solvers.errors import InfeasibleError

if TYPE_CHECKING:  # pragma: no cover
    from solvers.problem import Problem


def explain_bounds(problem: "Problem", side: str) -> str:
    """Words for the per-layer lower (or upper) count bounds, grouped by the constraint that sets them.

    e.g. 'per-layer minimum 8 x 58 layers' or 'per-layer minimum 8 x 57 layers + must-keep 12 in layer 3'.
    """
    allowed = problem.allowed_counts()
    groups: dict[tuple[str, int], list[int]] = {}
    for p, layer in enumerate(problem.layers):
        label, value = _tightest(problem, p, side)
        ok = np.flatnonzero(allowed[p])
        actual = int(ok.min() if side == "lo" else ok.max()) if ok.size else value
        if actual != value:  # several constraints together (e.g. a minimum and a multiple)
            others = [
                c.describe(problem)
                for c in problem.all_constraints
                if c.count_allowed(problem, p) is not None or c.layer_rule(problem, p) is not None
            ]
            verb = "raised" if side == "lo" else "lowered"
            label += f" {value} {verb} by {' and '.join(others)} to"
        groups.setdefault((label, actual), []).append(layer.index)
    parts = []
    for (label, value), layers in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        if len(layers) == 1:
            parts.append(f"{label} {value} in layer {layers[0]}")
        else:
            parts.append(f"{label} {value} x {len(layers)} layers")
    return " + ".join(parts)


def _tightest(problem, p: int, side: str) -> tuple[str, int]:
    """(label, count) of the single constraint that bounds layer p's count the most on `side`."""
    n_all = problem.layers[p].num_experts
    value, label = (0, "no constraint") if side == "lo" else (n_all, "all experts")
    for c in problem.all_constraints:
        single = single_bound(c, problem, p, side)
        if single is None:
            continue
        if (side == "lo" and single > value) or (side == "hi" and single < value):
            value, label = single, c.bound_label(side)
    return label, value


def single_bound(c: Constraint, problem, p, side) -> int | None:
    """The lowest (or highest) count constraint `c` alone allows in layer p; None if it allows all."""
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
            raise InfeasibleError(
                f"layer {layer.index} ({layer.num_experts} experts) has no allowed kept count: "
                f"{_explain_single(problem, p)}"
            )
    lo = np.array([np.flatnonzero(a).min() for a in allowed])
    hi = np.array([np.flatnonzero(a).max() for a in allowed])
    for c in problem.all_constraints:
        message = c.precheck(problem, lo, hi)
        if message:
            raise InfeasibleError(message)
    k = problem.budget.kept_total(problem)
    if k is not None and not (reachable_totals(allowed) >> k) & 1:
        raise InfeasibleError(_unreachable(problem, allowed, k, int(hi.sum())))


def _unreachable(problem, allowed, k: int, most: int) -> str:
    reach = reachable_totals(allowed)
    below = next((t for t in range(k, -1, -1) if (reach >> t) & 1), None)
    above = next((t for t in range(k, most + 1) if (reach >> t) & 1), None)
    near = ", ".join(str(t) for t in (below, above) if t is not None)
    # the constraints that leave gaps between counts: allowed sets and layer rules
    kinds = sorted(
        {
            c.describe(problem)
            for c in problem.constraints
            if any(
                c.count_allowed(problem, p) is not None or c.layer_rule(problem, p) is not None
                for p in range(len(problem.layers))
            )
        }
    )
    return (
        f"the budget keeps {k} experts, but no choice of allowed per-layer counts "
        f"adds up to {k} under {', '.join(kinds) or 'the per-layer constraints'} "
        f"(nearest reachable totals: {near})"
    )


def conflict_message(problem: "Problem") -> str:
    """The message when a solver finds no plan although every cheap check passed."""
    parts = [c.describe(problem) for c in problem.all_constraints]
    return (
        "no plan satisfies all constraints together (the cheap per-constraint checks passed, so the "
        "conflict is between several of them): " + "; ".join(parts) + ". Relax one of them."
    )


def _explain_single(problem, p) -> str:
    parts = []
    for c in problem.all_constraints:
        lo = single_bound(c, problem, p, "lo")
        hi = single_bound(c, problem, p, "hi")
        if lo is not None or hi is not None:
            parts.append(f"{c.describe(problem)} allows {lo}..{hi}")
        elif any(x is not None for x in (c.count_bounds(problem, p), c.count_allowed(problem, p))):
            parts.append(f"{c.describe(problem)} allows nothing")
    return "; ".join(parts) or "conflicting per-layer constraints"


# names the single module used
_explain_bounds = explain_bounds
_single_bound = single_bound
