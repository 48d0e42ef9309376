"""Constraints on a pruning plan: one small class each, found by name in :data:`CONSTRAINTS`.

One module per kind: :mod:`~solvers.constraints.budget` (how much to remove),
:mod:`~solvers.constraints.count` (per-layer counts: floors, caps, multiples, uniform, entropy
guard), :mod:`~solvers.constraints.expert` (which experts: routing groups, must-keep/remove),
:mod:`~solvers.constraints.memory` (per-device caps); units apart
(:mod:`~solvers.constraints.units`) and the infeasibility explanations apart
(:mod:`~solvers.constraints.precheck`). The contract is in :mod:`~solvers.constraints.base`.

Counts are *kept* counts. Layers are addressed by position ``p`` in ``problem.layers`` inside
the code, and by decoder-layer index in every message.
"""

from solvers.constraints.base import (
    CONSTRAINTS,
    Constraint,
    CountConstraint,
    LayerRule,
    constraint_from_json,
    constraints_from_json,
    kept_mask,
    plan_counts,
    register_constraint,
)
from solvers.constraints.budget import Budget
from solvers.constraints.count import (
    EntropyGuard,
    MaxRemovedFraction,
    MinKept,
    MultipleOf,
    Uniform,
    most_even,
)
from solvers.constraints.expert import MustKeep, MustRemove, RoutingGroups
from solvers.constraints.memory import MemoryCap
from solvers.constraints.precheck import (
    conflict_message,
    explain_bounds,
    precheck,
    reachable_totals,
)
from solvers.constraints.units import format_bytes, over_cap, parse_bytes, parse_caps, parse_min_kept

__all__ = [
    "CONSTRAINTS",
    "Budget",
    "Constraint",
    "CountConstraint",
    "EntropyGuard",
    "LayerRule",
    "MaxRemovedFraction",
    "MemoryCap",
    "MinKept",
    "MultipleOf",
    "MustKeep",
    "MustRemove",
    "RoutingGroups",
    "Uniform",
    "constraint_from_json",
    "conflict_message",
    "constraints_from_json",
    "explain_bounds",
    "format_bytes",
    "kept_mask",
    "most_even",
    "over_cap",
    "parse_bytes",
    "parse_caps",
    "parse_min_kept",
    "plan_counts",
    "precheck",
    "reachable_totals",
    "register_constraint",
]
