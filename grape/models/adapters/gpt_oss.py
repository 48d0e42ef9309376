"""GPT-OSS: router `mlp.router` with a bias (top-k on raw logits, softmax over the k chosen),
experts with biases and a transposed, interleaved gate/up layout: `gate_up_proj [E, H, 2I]`
(gate = even columns, up = odd), `down_proj [E, I, H]`. The fused base handles both through
the experts module's own `is_transposed` / `has_bias` flags and `_apply_gate`."""

from grape.models.adapters.base import RemovalEffect, register_adapter, softmax_strength
from grape.models.adapters.fused import FusedMoEAdapter


@register_adapter
class GptOssAdapter(FusedMoEAdapter):
    model_types = ("gpt_oss",)
    router_attr = "router"
    expert_count_keys = ("num_local_experts", "num_experts")
    family = "GPT-OSS"
    examples = "gpt-oss-20b, gpt-oss-120b"
    special = "router bias, softmax over the chosen; MXFP4 experts stay MXFP4"

    def removal_effect(self, layer: int) -> RemovalEffect | None:
        # softmax over the k chosen logits: other tokens' routing is unchanged
        if self.router_masked(layer):
            return None
        return RemovalEffect(strength=softmax_strength, renormalise=True)
