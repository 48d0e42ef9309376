"""LFM2-MoE (Liquid): hybrid short-convolution / attention layers; the first `num_dense_layers`
feed-forwards are dense. The MoE block is a layer's `feed_forward`: sigmoid router `gate`, top-k
chosen on sigmoid + the block's `expert_bias` (when `use_expert_bias`), weights renormalised
and scaled by `routed_scaling_factor`; no shared expert."""

from grape.models.adapters.base import register_adapter
from grape.models.adapters.minimax_m2 import BlockBiasAdapter


@register_adapter
class Lfm2MoeAdapter(BlockBiasAdapter):
    model_types = ("lfm2_moe",)
    block_attr = "feed_forward"
    block_bias = "expert_bias"
    router_attr = "gate"
    expert_count_keys = ("num_experts",)
    family = "LFM2-MoE"
    examples = "LFM2-8B-A1B"
    special = ("short-convolution hybrid, MoE block `feed_forward`; sigmoid + the block's expert "
               "bias")
