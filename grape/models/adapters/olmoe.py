"""OLMoE: softmax top-k router `mlp.gate` (`norm_topk_prob` optional), fused experts, every
decoder layer sparse."""

from grape.models.adapters.base import RemovalEffect, register_adapter, softmax_strength
from grape.models.adapters.fused import FusedMoEAdapter


@register_adapter
class OlmoeAdapter(FusedMoEAdapter):
    model_types = ("olmoe",)
    router_attr = "gate"
    expert_count_keys = ("num_experts", "num_local_experts")
    family = "OLMoE"
    examples = "OLMoE-1B-7B"
    special = "softmax top-8 on every layer"

    def removal_effect(self, layer: int) -> RemovalEffect | None:
        # softmax over every expert; without norm_topk_prob the chosen weights are not
        # renormalised, so masking an expert rescales every other token's weights
        if self.router_masked(layer):
            return None
        norm = bool(self.router(layer).norm_topk_prob)
        return RemovalEffect(rescale=not norm, strength=softmax_strength, renormalise=norm)
