"""DeepSeek-V3 (also Kimi-K2, GLM-4.5-style configs using this class) and DeepSeek-V2.

V3 router `mlp.gate`: sigmoid scores, `e_score_correction_bias` added for the choice only,
group-limited choice (experts split into `n_group` contiguous groups; a group's score is the
sum of its best two; the best `topk_group` groups are eligible), weights renormalised and
scaled by `routed_scaling_factor`. V2: softmax scores, optionally group-limited by the group
maximum (`topk_method="group_limited_greedy"`). Shared experts are never pruned.

Group rules for a plan: the router regroups the kept experts into `n_group` contiguous groups,
so the routing stays the same only if every original group keeps the same number of experts;
each group needs at least two (V3: the group score is a top-2 sum) or one (V2), and the
eligible groups must hold at least top_k experts.
"""

from __future__ import annotations

import torch

from grape.models.adapters.base import RemovalEffect, register_adapter, softmax_strength
from grape.models.adapters.fused import FusedMoEAdapter
from grape.errors import ArchitectureError


@register_adapter
class DeepseekV3Adapter(FusedMoEAdapter):
    model_types = ("deepseek_v3",)
    router_attr = "gate"
    expert_count_keys = ("n_routed_experts", "num_local_experts")
    min_experts_per_group = 2
    family = "DeepSeek-V3"
    examples = "DeepSeek-V3, DeepSeek-R1"
    special = ("sigmoid + correction bias, group-limited routing (plans keep the groups "
               "balanced); shared expert kept; FP8 experts stay FP8")

    def group_limited(self) -> bool:
        return True

    def routing_groups(self) -> tuple[int | None, int | None]:
        if not self.group_limited():
            return None, None
        return int(self.config.n_group), int(self.config.topk_group)

    def removal_effect(self, layer: int) -> RemovalEffect | None:
        """V3: a weight is the expert's own sigmoid score (renormalised over the chosen), so
        only the groups reach other tokens: a group is scored by its best two of sigmoid +
        correction bias, the router's choice score. V2 (below): softmax over every expert."""
        router = self.router(layer)
        needs = ("num_group", "topk_group", "e_score_correction_bias", "norm_topk_prob")
        if self.router_masked(layer) or not all(hasattr(router, name) for name in needs):
            return None  # not the router described above
        groups, top = int(router.num_group), int(router.topk_group)
        grouped = self.group_limited() and 1 < groups and top < groups

        def choice(logits):  # the router's own operations (float32 logits in, as it computes)
            return logits.sigmoid() + router.e_score_correction_bias

        return RemovalEffect(groups=groups if grouped else 1, topk_group=top if grouped else 1,
                             group_top=2 if grouped else 0, choice=choice,
                             strength=lambda logits: logits.to(torch.float64).sigmoid(),
                             renormalise=bool(router.norm_topk_prob))

    def _rule(self) -> str:
        n_group, topk_group = self.routing_groups()
        return f"{self.config.model_type} group-limited routing (n_group={n_group}, topk_group={topk_group})"

    def check_plan_counts(self, kept_counts: dict[int, int]) -> None:
        super().check_plan_counts(kept_counts)
        if not self.group_limited():
            return
        n_group, topk_group = self.routing_groups()
        for layer, count in sorted(kept_counts.items()):
            if count % n_group:
                raise ArchitectureError(
                    f"layer {layer}: {self._rule()} needs a multiple of {n_group} experts, the plan "
                    f"keeps {count}. Keep {count - count % n_group} or {count + n_group - count % n_group}."
                )
            per_group = count // n_group
            if per_group < self.min_experts_per_group:
                raise ArchitectureError(
                    f"layer {layer}: {self._rule()} needs at least {self.min_experts_per_group} experts "
                    f"per group ({self.min_experts_per_group * n_group} in the layer), the plan keeps {count}."
                )
            top_k = min(self.top_k(layer), count)
            if topk_group * per_group < top_k:
                raise ArchitectureError(
                    f"layer {layer}: {self._rule()} lets a token reach {topk_group} groups x "
                    f"{per_group} experts = {topk_group * per_group} < top_k={top_k}; keep at least "
                    f"{-(-top_k // topk_group) * n_group} experts in this layer."
                )

    def check_kept(self, kept: dict[int, list[int]]) -> None:
        self.check_plan_counts({layer: len(v) for layer, v in kept.items()})
        if not self.group_limited():
            return
        n_group, _ = self.routing_groups()
        for layer, keep in sorted(kept.items()):
            size = self.num_experts(layer) // n_group
            per_group = [sum(1 for e in keep if g * size <= e < (g + 1) * size) for g in range(n_group)]
            if len(set(per_group)) > 1:
                raise ArchitectureError(
                    f"layer {layer}: {self._rule()} needs the same number of experts kept in each "
                    f"group of {size} (experts {0}-{size - 1}, {size}-{2 * size - 1}, ...); the plan "
                    f"keeps {per_group} per group. Re-solve with a per-group balance constraint or "
                    "move removals between groups."
                )


@register_adapter
class DeepseekV2Adapter(DeepseekV3Adapter):
    model_types = ("deepseek_v2",)
    expert_count_keys = ("n_routed_experts", "num_experts")
    min_experts_per_group = 1
    family = "DeepSeek-V2"
    examples = "DeepSeek-V2, DeepSeek-V2-Lite"
    special = ("softmax router, group-limited with topk_method group_limited_greedy; shared "
               "experts kept")

    def group_limited(self) -> bool:
        return getattr(self.config, "topk_method", "greedy") == "group_limited_greedy"

    def removal_effect(self, layer: int) -> RemovalEffect | None:
        # softmax over every expert, scaled, never renormalised; a group scored by its maximum
        router = self.router(layer)
        if self.router_masked(layer) or not all(hasattr(router, n) for n in ("num_group", "topk_group")):
            return None
        groups, top = int(router.num_group), int(router.topk_group)
        grouped = self.group_limited() and 1 < groups and top < groups
        return RemovalEffect(rescale=True, groups=groups if grouped else 1,
                             topk_group=top if grouped else 1, group_top=1 if grouped else 0,
                             strength=softmax_strength)
