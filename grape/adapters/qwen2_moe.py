"""Qwen2-MoE / Qwen1.5-MoE: softmax top-k router `mlp.gate`, fused routed experts, plus a
sigmoid-gated shared expert (`mlp.shared_expert`) that is always on and never pruned."""

from grape.adapters.base import register_adapter
from grape.adapters.fused import FusedMoEAdapter


@register_adapter
class Qwen2MoeAdapter(FusedMoEAdapter):
    model_types = ("qwen2_moe",)
    router_attr = "gate"
    expert_count_keys = ("num_experts", "num_local_experts")
