"""Mixtral: softmax router `mlp.gate`, top-k weights always renormalised, fused experts. The
block also stores `top_k` (kept in step on surgery)."""

from grape.adapters.base import register_adapter
from grape.adapters.fused import FusedMoEAdapter


@register_adapter
class MixtralAdapter(FusedMoEAdapter):
    model_types = ("mixtral",)
    router_attr = "gate"
    expert_count_keys = ("num_local_experts", "num_experts")
