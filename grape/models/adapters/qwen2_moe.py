"""Qwen2-MoE / Qwen1.5-MoE: softmax top-k router `mlp.gate`, fused routed experts, plus a
sigmoid-gated shared expert (`mlp.shared_expert`) that is always on and never pruned."""

from grape.models.adapters.base import RemovalEffect, register_adapter, softmax_strength
from grape.models.adapters.fused import FusedMoEAdapter


@register_adapter
class Qwen2MoeAdapter(FusedMoEAdapter):
    model_types = ("qwen2_moe",)
    router_attr = "gate"
    expert_count_keys = ("num_experts", "num_local_experts")
    family = "Qwen2-MoE"
    examples = "Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B"
    special = "a sigmoid-gated shared expert, kept"

    def removal_effect(self, layer: int) -> RemovalEffect | None:
        # softmax over every expert; without norm_topk_prob the chosen weights are not
        # renormalised, so masking an expert rescales every other token's weights
        if self.router_masked(layer):
            return None
        norm = bool(self.router(layer).norm_topk_prob)
        return RemovalEffect(rescale=not norm, strength=softmax_strength, renormalise=norm)
