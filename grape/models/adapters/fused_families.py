"""More families on the standard transformers v5 layout (a fused `XExperts` module and a router
module returning (logits, top_k_weights, top_k_index) from its own `weight`), each declared by
what differs: where the router lives, which config keys hold the counts, and which existing
adapter's routing it shares. Whatever else a block adds (shared experts, gated or not, a
constant scale on the experts' sum) depends on the token only and is left as it is."""

from __future__ import annotations

from grape.models.adapters.base import RemovalEffect, register_adapter, softmax_strength
from grape.models.adapters.fused import FusedMoEAdapter
from grape.models.adapters.minimax_m2 import BlockBiasAdapter
from grape.models.adapters.qwen3_moe import Qwen3MoeAdapter
from grape.models.adapters.qwen3_next import Qwen3NextAdapter
from grape.models.adapters.standard import GraniteMoeAdapter


@register_adapter
class FlintAdapter(FusedMoEAdapter):
    """Flint: sigmoid top-k without a bias, renormalised; an ungated shared expert; dense
    layers from `mlp_only_layers`."""

    model_types = ("flint",)
    expert_count_keys = ("num_experts",)
    family = "Flint"
    examples = "RecursiveSI/flint"
    special = "sigmoid top-k, renormalised; shared expert kept"


@register_adapter
class Kolibri1Adapter(FusedMoEAdapter):
    """Kolibri-1: top-k on the logits plus the router's correction bias, weights the chosen
    logits' sigmoids (renormalised with `norm_topk_prob`); a shared expert."""

    model_types = ("kolibri1",)
    expert_count_keys = ("num_local_experts", "num_experts")
    family = "Kolibri-1"
    examples = "Kolibri-1"
    special = "top-k on logits + correction bias, sigmoid weights; shared expert kept"


@register_adapter
class LagunaAdapter(FusedMoEAdapter):
    """Laguna: sigmoid + correction bias (the router's), optional tanh soft-capping of the
    logits, renormalised; the block scales the experts' sum and adds a shared expert."""

    model_types = ("laguna",)
    expert_count_keys = ("num_experts",)
    family = "Laguna"
    examples = "laguna-XS.2"
    special = "sigmoid + correction bias, soft-capped logits; shared expert kept"


@register_adapter
class MiniMaxM3Adapter(FusedMoEAdapter):
    """MiniMax-M3's text decoder (minimax_m3_vl_text): sigmoid + the router's correction bias,
    renormalised; clamped SwiGLU experts; a shared expert; dense layers from `mlp_layer_types`."""

    model_types = ("minimax_m3_vl_text",)
    expert_count_keys = ("num_local_experts", "num_experts")
    family = "MiniMax-M3 (text decoder)"
    examples = "MiniMax-M3"
    special = "sigmoid + correction bias; clamped SwiGLU experts; shared expert kept"


@register_adapter
class AriaTextAdapter(FusedMoEAdapter):
    """Aria's text decoder (aria_text): top-k on the logits of router `mlp.router`, softmax over
    the chosen; transposed experts (`is_transposed`); shared experts beside them."""

    model_types = ("aria_text",)
    router_attr = "router"
    expert_count_keys = ("moe_num_experts",)
    top_k_key = "moe_topk"
    family = "Aria (text decoder)"
    examples = "Aria"
    special = ("top-k on the logits, softmax over the chosen; transposed experts; shared "
               "experts kept")

    def removal_effect(self, layer: int) -> RemovalEffect | None:
        # softmax over the k chosen logits: other tokens' routing is unchanged
        if self.router_masked(layer):
            return None
        return RemovalEffect(strength=softmax_strength, renormalise=True)


@register_adapter
class LaraMiniAdapter(Qwen3MoeAdapter):
    """Lara-4-Mini: Qwen3-MoE's router (fp32 logits) on a Gated-DeltaNet hybrid, with an
    ungated shared expert."""

    model_types = ("lara_mini",)
    expert_count_keys = ("num_experts",)
    family = "Lara Mini"
    examples = "Lara-4-Mini-Base"
    special = "Gated-DeltaNet hybrid; softmax top-k; shared expert kept"


@register_adapter
class MellumAdapter(Qwen3MoeAdapter):
    """Mellum-2: Qwen3-MoE's router and block; dense layers from `mlp_layer_types`."""

    model_types = ("mellum",)
    expert_count_keys = ("num_local_experts", "num_experts")
    family = "Mellum 2"
    examples = "Mellum2-12B-A2.5B-Base"
    special = "softmax top-k, renormalised (norm_topk_prob)"


@register_adapter
class Qwen4ExpAdapter(Qwen3NextAdapter):
    """Qwen4-Exp's text decoder (qwen4_exp_text): Qwen3-Next's block (a sigmoid-gated shared
    expert) with hyper-connections, n-gram embeddings and an indexed attention."""

    model_types = ("qwen4_exp_text",)
    family = "Qwen4-Exp (text decoder)"
    examples = "Qwen4-Exp"
    special = "Gated-DeltaNet hybrid, hyper-connections; a gated shared expert, kept"
    sequential_refusal = ("after the last layer its decoder mixes the hyper-connection streams "
                          "(hyper_connection_mixer) instead of a final norm")


@register_adapter
class GraniteMoeSWAAdapter(GraniteMoeAdapter):
    """Granite Swash (granitemoe_swa): Granite-MoE's block `block_sparse_moe` and router
    `router`, sliding-window attention."""

    model_types = ("granitemoe_swa",)
    family = "Granite Swash"
    examples = "granite-swash-3b-a600m"
    special = "MoE block `block_sparse_moe`; sliding-window attention"


@register_adapter
class HYV3Adapter(BlockBiasAdapter):
    """Hy3 (hy_v3): sigmoid router `mlp.gate` that takes the block's correction bias
    (`mlp.e_score_correction_bias`) as an argument, renormalised and scaled; a shared expert."""

    model_types = ("hy_v3",)
    router_attr = "gate"
    expert_count_keys = ("num_experts",)
    family = "Hy3"
    examples = "Hy3-preview"
    special = "sigmoid + the block's correction bias; shared expert kept"
