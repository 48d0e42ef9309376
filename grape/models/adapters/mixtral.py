"""Mixtral: softmax router `mlp.gate`, top-k weights always renormalised, fused experts. The
block also stores `top_k` (kept in step on surgery)."""

from grape.models.adapters.base import RemovalEffect, register_adapter, softmax_strength
from grape.models.adapters.fused import FusedMoEAdapter


@register_adapter
class MixtralAdapter(FusedMoEAdapter):
    model_types = ("mixtral",)
    router_attr = "gate"
    expert_count_keys = ("num_local_experts", "num_experts")
    family = "Mixtral"
    examples = "Mixtral-8x7B, Mixtral-8x22B"
    special = "softmax top-2, renormalised"

    def removal_effect(self, layer: int) -> RemovalEffect | None:
        # weights renormalised over the chosen experts: other tokens' routing is unchanged
        if self.router_masked(layer):
            return None
        return RemovalEffect(strength=softmax_strength, renormalise=True)
