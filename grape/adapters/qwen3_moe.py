"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder): softmax top-k router `mlp.gate`,
optional top-k renormalisation (`norm_topk_prob`), fused experts, no shared expert. Layers in
`mlp_only_layers` or off the `decoder_sparse_step` grid are dense and are skipped."""

from grape.adapters.base import register_adapter
from grape.adapters.fused import FusedMoEAdapter


@register_adapter
class Qwen3MoeAdapter(FusedMoEAdapter):
    model_types = ("qwen3_moe",)
    router_attr = "gate"
    expert_count_keys = ("num_experts", "num_local_experts")
