"""OLMoE: softmax top-k router `mlp.gate` (`norm_topk_prob` optional), fused experts, every
decoder layer sparse."""

from grape.adapters.base import register_adapter
from grape.adapters.fused import FusedMoEAdapter


@register_adapter
class OlmoeAdapter(FusedMoEAdapter):
    model_types = ("olmoe",)
    router_attr = "gate"
    expert_count_keys = ("num_experts", "num_local_experts")
