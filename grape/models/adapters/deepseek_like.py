"""Families whose router is a copy of DeepSeek-V3's (`XTopkRouter`: sigmoid scores,
`e_score_correction_bias` for the choice only, group-limited choice by the sum of each group's
best two, renormalised, scaled by `routed_scaling_factor`) with shared experts beside the routed
ones. Each is a declaration on top of the DeepSeek-V3 adapter: where its config keeps the counts,
and, for Nemotron-H, where the block lives and how its latent experts are evaluated.

Dense layers (`first_k_dense_replace`, `mlp_layer_types`) have no router and are skipped by
structure; shared experts are never pruned.
"""

from __future__ import annotations

import torch

from grape.models.adapters.base import register_adapter
from grape.models.adapters.deepseek import DeepseekV3Adapter


@register_adapter
class Glm4MoeAdapter(DeepseekV3Adapter):
    """GLM-4.5/4.6/4.7 and -Air (glm4_moe), GLM-4.7-Flash (glm4_moe_lite, MLA attention),
    DeepSeek-V3.2 (deepseek_v32, indexed sparse attention), dots.llm1 (dots1): all store
    `n_routed_experts` (aliased `num_local_experts`)."""

    model_types = ("glm4_moe", "glm4_moe_lite", "deepseek_v32", "dots1")
    expert_count_keys = ("n_routed_experts", "num_local_experts")
    family = "GLM-4.5 / 4.6 / 4.7, GLM-4.7-Flash, DeepSeek-V3.2, dots.llm1"
    examples = "GLM-4.6, GLM-4.5-Air, GLM-4.7-Flash, DeepSeek-V3.2-Exp, dots.llm1.inst"
    special = "the DeepSeek-V3 router; shared expert kept"


@register_adapter
class KimiLinearAdapter(DeepseekV3Adapter):
    """Kimi-Linear: hybrid KDA linear attention; its config names the counts `num_experts` and
    `num_experts_per_token` (aliases `num_local_experts`, `num_experts_per_tok`)."""

    model_types = ("kimi_linear",)
    expert_count_keys = ("num_experts", "num_local_experts")
    top_k_key = "num_experts_per_token"
    family = "Kimi-Linear"
    examples = "Kimi-Linear-48B-A3B-Instruct"
    special = "KDA linear-attention hybrid; the DeepSeek-V3 router"


@register_adapter
class ExaoneMoeAdapter(DeepseekV3Adapter):
    """EXAONE MoE: `num_experts` routed experts plus shared ones, DeepSeek-V3 router."""

    model_types = ("exaone_moe",)
    expert_count_keys = ("num_experts",)
    family = "EXAONE MoE"
    examples = "K-EXAONE-236B-A23B"
    special = "the DeepSeek-V3 router"


@register_adapter
class NemotronHAdapter(DeepseekV3Adapter):
    """Nemotron-H (hybrid Mamba-2): the MoE block is a layer's `mixer` (only on "moe" layers),
    with non-gated experts (`up_proj`, relu^2; no `gate_up_proj`). Latent-MoE checkpoints
    (`moe_latent_size`, Nemotron-3) run the experts on fc1_latent_proj(x), not on the router's
    input x, which calibration does not capture yet: refused until it does."""

    model_types = ("nemotron_h",)
    block_attr = "mixer"
    expert_count_keys = ("n_routed_experts", "num_local_experts")
    family = "Nemotron-H"
    examples = "NVIDIA-Nemotron-3-Nano-30B-A3B"
    special = ("Mamba-2 hybrid, MoE block `mixer`, the DeepSeek-V3 router; latent MoE "
               "(moe_latent_size) refused")

    config_refusals = {"moe_latent_size": (
        "nemotron_h with moe_latent_size (latent MoE) is not supported yet: its experts see a "
        "projected input, not the router's; Nemotron-H without a latent size is")}

    def expert_forward(self, layer: int, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        # the experts module itself, every row sent to `expert` at weight 1
        rows = hidden.shape[0]
        index = torch.full((rows, 1), int(expert), dtype=torch.long, device=hidden.device)
        return self.experts(layer)(hidden, index, torch.ones(rows, 1, dtype=hidden.dtype, device=hidden.device))
