"""Qwen3-Next (qwen3_next) and the Qwen3.5 MoE text decoder (qwen3_5_moe_text): hybrid
Gated-DeltaNet / full-attention layers, every MLP a sparse block of `num_experts` routed experts
(softmax top-k, `norm_topk_prob`) plus one shared expert scaled by a sigmoid
`shared_expert_gate`. The shared expert and its gate depend on the token only, never on the
routed experts, so they are left as they are. Layers in `mlp_only_layers` are dense."""

from grape.models.adapters.base import register_adapter
from grape.models.adapters.fused import FusedMoEAdapter


@register_adapter
class Qwen3NextAdapter(FusedMoEAdapter):
    model_types = ("qwen3_next", "qwen3_5_moe_text")
    router_attr = "gate"
    expert_count_keys = ("num_experts",)
    family = "Qwen3-Next, Qwen3.5 MoE (text decoder)"
    examples = "Qwen3-Next-80B-A3B, Qwen3.5-35B-A3B"
    special = "Gated-DeltaNet hybrid; a gated shared expert, kept"
