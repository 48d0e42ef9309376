"""More families whose router is a copy of DeepSeek-V3's `XTopkRouter` (sigmoid scores, a
correction bias for the choice only, group-limited choice, renormalised and scaled), each a
declaration on top of the DeepSeek-V3 adapter: where the config keeps the counts and what
else differs around the block. Dense layers (`mlp_layer_types`) have no router and are skipped
by structure; shared experts are never pruned. See grape/models/adapters/deepseek_like.py for the
first ones (GLM-4.5, Kimi-Linear, ...)."""

from __future__ import annotations

import torch

from grape.models.adapters.base import RemovalEffect, register_adapter
from grape.models.adapters.deepseek import DeepseekV3Adapter

# most of these configs store `n_routed_experts`, aliased `num_local_experts`
_ROUTED = ("n_routed_experts", "num_local_experts")


@register_adapter
class GlmMoeDsaAdapter(DeepseekV3Adapter):
    """GLM-5 (glm_moe_dsa): DeepSeek sparse attention with an indexer, the V3 router."""

    model_types = ("glm_moe_dsa",)
    expert_count_keys = _ROUTED
    family = "GLM-5"
    examples = "GLM-5"
    special = "DSA indexed attention; the DeepSeek-V3 router; shared expert kept"
    sequential_refusal = ("its decoder layers return the indexer's top-k positions beside the "
                          "hidden states, for the next layer")


@register_adapter
class SolarOpenAdapter(DeepseekV3Adapter):
    """Solar Open: GLM-4.5's MoE block (the V3 router) on Llama attention, no dense layers."""

    model_types = ("solar_open",)
    expert_count_keys = _ROUTED
    family = "Solar Open"
    examples = "Solar-Open-100B"
    special = "the DeepSeek-V3 router; shared expert kept"


@register_adapter
class MiMoV2FlashAdapter(DeepseekV3Adapter):
    """MiMo-V2-Flash: the V3 router without shared experts; sliding / full attention."""

    model_types = ("mimo_v2_flash",)
    expert_count_keys = _ROUTED
    family = "MiMo-V2-Flash"
    examples = "MiMo-V2-Flash"
    special = "the DeepSeek-V3 router, no shared expert"


@register_adapter
class Dots3NoteAdapter(DeepseekV3Adapter):
    """dots3-note's text decoder (dots3_note_text): MLA + indexed attention, the V3 router."""

    model_types = ("dots3_note_text",)
    expert_count_keys = _ROUTED
    family = "dots3-note (text decoder)"
    examples = "dots3-note-prev"
    special = "MLA with an indexer; the DeepSeek-V3 router; shared expert kept"


@register_adapter
class AXK1Adapter(DeepseekV3Adapter):
    """A.X-K1: DeepSeek-V3's block with an RMSNorm on its output (routed + shared). The norm
    follows the sum of the experts, so removal stays exact; calibration's contributions are
    measured before it, as every family's are before the residual add."""

    model_types = ("axk1",)
    expert_count_keys = _ROUTED
    family = "A.X-K1"
    examples = "A.X-K1"
    special = "the DeepSeek-V3 router; an RMSNorm on the MoE block's output; shared expert kept"


@register_adapter
class HYV4Adapter(DeepseekV3Adapter):
    """Hy4 (hy_v4): hyper-connection residual streams around each layer, the V3 router on the
    collapsed stream the block receives."""

    model_types = ("hy_v4",)
    expert_count_keys = _ROUTED
    family = "Hy4"
    examples = "Hy4-preview"
    special = ("hyper-connections; the DeepSeek-V3 router; clamped SwiGLU experts; shared "
               "expert kept")
    sequential_refusal = ("its decoder layers pass hyper-connection streams and the indexer's "
                          "top-k positions to the next layer, not one hidden-state tensor")


@register_adapter
class BeamAdapter(DeepseekV3Adapter):
    """Beam: the V3 router without `routed_scaling_factor`, which the block applies to the
    experts' sum instead (one constant per model: the measured importances scale alike)."""

    model_types = ("beam",)
    expert_count_keys = ("num_experts",)
    family = "Beam"
    examples = "Beam-1.0-501B-A23B"
    special = "the DeepSeek-V3 router, scaling applied by the block; no shared expert"


@register_adapter
class BailingHybridAdapter(DeepseekV3Adapter):
    """Ling 3.0 (bailing_hybrid): linear-attention / MLA hybrid; its config names the counts
    `num_experts`, `num_experts_per_token` and the groups `num_expert_group`."""

    model_types = ("bailing_hybrid",)
    expert_count_keys = ("num_experts",)
    top_k_key = "num_experts_per_token"
    family = "Ling 3.0 (Bailing hybrid)"
    examples = "Ling-3.0-Flash"
    special = "linear-attention hybrid; the DeepSeek-V3 router; shared expert kept"


@register_adapter
class AXK2Adapter(DeepseekV3Adapter):
    """A.X-K2-Light (axk2 without `n_group`): the V3 router without groups. Grouped A.X-K2
    configs are refused: their router fills the experts of unchosen groups with 0, not -inf,
    so a removed expert there could still be chosen where the pruned model chooses a kept one,
    and GRAPE's masked routings (-inf scores) would not be the pruned model's."""

    model_types = ("axk2",)
    expert_count_keys = _ROUTED
    family = "A.X-K2"
    examples = "A.X-K2-Light"
    special = ("gated RMSNorms; the DeepSeek-V3 router without groups; grouped configs "
               "(n_group) refused; shared expert kept")

    config_refusals = {"n_group": (
        "axk2 with n_group (group-limited routing) is not supported: its router scores the "
        "experts of unchosen groups 0, not -inf, so removing an expert is not masking it; "
        "A.X-K2 without n_group (A.X-K2-Light) is")}

    def group_limited(self) -> bool:
        return False

    def removal_effect(self, layer: int) -> RemovalEffect | None:
        # DeepSeek-V3's effect without groups (its router holds no group counts to read)
        router = self.router(layer)
        if self.router_masked(layer):
            return None

        def choice(logits):
            return logits.sigmoid() + router.e_score_correction_bias

        def strength(logits):
            return logits.to(torch.float64).sigmoid()

        return RemovalEffect(choice=choice, strength=strength, renormalise=bool(router.norm_topk_prob))
