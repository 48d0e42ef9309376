"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder): softmax top-k router `mlp.gate`,
optional top-k renormalisation (`norm_topk_prob`), fused experts, no shared expert. Layers in
`mlp_only_layers` or off the `decoder_sparse_step` grid are dense and are skipped."""

from grape.models.adapters.base import RemovalEffect, register_adapter, softmax_strength
from grape.models.adapters.fused import FusedMoEAdapter


@register_adapter
class Qwen3MoeAdapter(FusedMoEAdapter):
    model_types = ("qwen3_moe",)
    router_attr = "gate"
    expert_count_keys = ("num_experts", "num_local_experts")
    family = "Qwen3-MoE"
    examples = "Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-480B-A35B"
    special = "softmax top-k, renormalised (norm_topk_prob)"

    def removal_effect(self, layer: int) -> RemovalEffect | None:
        # softmax over every expert; without norm_topk_prob the chosen weights are not
        # renormalised, so masking an expert rescales every other token's weights
        if self.router_masked(layer):
            return None
        norm = bool(self.router(layer).norm_topk_prob)
        return RemovalEffect(rescale=not norm, strength=softmax_strength, renormalise=norm)
