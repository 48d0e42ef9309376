"""Constraints on *which* experts a layer keeps: DeepSeek-V3 routing groups, must-keep and
must-remove lists. Per-layer searches obey them through each layer's :class:`LayerRule`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from solvers.constraints.base import (
    Constraint,
    LayerRule,
    kept_mask,
    plan_counts,
    register_constraint,
)
from solvers.errors import UserError


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

    def bound_label(self, side):
        return "routing-groups minimum" if side == "lo" else "routing-groups maximum"

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
        out = self.count_violations(problem, plan_counts(plan, problem))
        for p, layer in enumerate(problem.layers):
            per = np.bincount(
                self.labels(problem, p)[kept_mask(plan, problem, p)], minlength=self.n_group
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
            kept = kept_mask(plan, problem, p)
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

    def bound_label(self, side):
        return "must-keep"


@register_constraint
class MustRemove(_ExpertList):
    name: ClassVar[str] = "must_remove"
    keep_them: ClassVar[bool] = False

    def bound_label(self, side):
        return "must-remove leaves at most"
