"""Tiny random models of the families added after the first seven (tests/test_families.py):
hidden 32, 3 decoder layers (4 for Nemotron-H's mamba/moe/attention pattern), 8 routed experts,
top-2, plus each family's dense layers, shared experts and hybrid attention kept small."""

from __future__ import annotations

import torch
import transformers as T
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from tiny_models import _COMMON

# DeepSeek-style multi-head latent attention, small
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
            v_head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
# DeepSeek-V3 router: 8 experts in 2 groups, 1 group per token; first layer dense
_V3 = dict(intermediate_size=48, moe_intermediate_size=16, n_shared_experts=1, num_experts_per_tok=2,
           n_group=2, topk_group=1, routed_scaling_factor=1.5)
_DENSE_FIRST = dict(mlp_layer_types=["dense", "sparse", "sparse"])
# Gated-DeltaNet linear attention between full-attention layers
_LINEAR = dict(layer_types=["linear_attention", "full_attention", "linear_attention"],
               linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
               linear_value_head_dim=8, linear_conv_kernel_dim=4, head_dim=8)

CONFIGS = {
    "glm4_moe": dict(**_V3, n_routed_experts=8, first_k_dense_replace=1, head_dim=8),
    "glm4_moe_lite": dict(**_V3, **_MLA, **_DENSE_FIRST, n_routed_experts=8, q_lora_rank=None, head_dim=4),
    "deepseek_v32": dict(**_V3, **_MLA, **_DENSE_FIRST, n_routed_experts=8, q_lora_rank=16, head_dim=4,
                         first_k_dense_replace=1, index_topk=8, index_n_heads=2, index_head_dim=8,
                         layer_types=["indexed_attention"] * 3),
    "dots1": dict(**_V3, n_routed_experts=8, first_k_dense_replace=1, head_dim=8),
    "kimi_linear": dict(**_V3, **_MLA, **_DENSE_FIRST, num_local_experts=8, q_lora_rank=None,
                        layer_types=["linear_attention", "full_attention", "linear_attention"],
                        linear_head_dim=8, linear_num_heads=4),
    "exaone_moe": dict(**_V3, **_DENSE_FIRST, num_experts=8, num_shared_experts=1, first_k_dense_replace=1,
                       head_dim=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    # mamba, moe, attention, moe (latent MoE is refused: see NemotronHAdapter)
    "nemotron_h": dict(**{**_V3, "intermediate_size": 48}, num_hidden_layers=4, n_routed_experts=8,
                       layers_block_type=["mamba", "moe", "attention", "moe"],
                       moe_shared_expert_intermediate_size=16, mamba_num_heads=4, mamba_head_dim=8,
                       ssm_state_size=8, n_groups=1, head_dim=8),
    "minimax_m2": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    "qwen3_next": dict(**_LINEAR, intermediate_size=48, moe_intermediate_size=16,
                       shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2),
    "qwen3_5_moe_text": dict(**_LINEAR, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                             num_experts=8, num_experts_per_tok=2),
    "lfm2_moe": dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                     num_dense_layers=1, layer_types=["conv", "full_attention", "conv"]),
    "flex_olmo": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    "minimax": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                    layer_types=["full_attention", "linear_attention", "full_attention"]),
    "cohere2_moe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, head_dim=8,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        mlp_layer_types=["sparse"] * 3),
    "phimoe": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
    "granitemoe": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
    "granitemoeshared": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                             shared_intermediate_size=24),
    "granitemoehybrid": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                             shared_intermediate_size=24, layer_types=["mamba", "attention", "mamba"],
                             mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1),
    # MoE on layer 1 only (period 2, offset 1); no mamba kernels on CPU
    "jamba": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, expert_layer_period=2,
                  expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=0, mamba_d_state=8,
                  mamba_d_conv=4, mamba_expand=2, use_mamba_kernels=False),
    # MoE on layer 1 only (interleave step 2), dense MLPs beside it; input-scaled experts
    "llama4_text": dict(intermediate_size=16, intermediate_size_mlp=48, num_local_experts=8,
                        num_experts_per_tok=2, interleave_moe_layer_step=2, head_dim=8,
                        attention_chunk_size=8),
    # dense layer 0; correction bias [1, E] in the router's child gate.moe_statics
    "ernie4_5_moe": dict(intermediate_size=48, moe_intermediate_size=16, moe_num_experts=8, moe_k=2,
                         moe_num_shared_experts=1, moe_layer_start_index=1, head_dim=8),
    # DeepSeek-V3 router copies (grape/models/adapters/deepseek_v3_copies.py)
    "glm_moe_dsa": dict(**_V3, **_MLA, **_DENSE_FIRST, n_routed_experts=8, q_lora_rank=16, head_dim=4,
                        index_topk=8, index_n_heads=2, index_head_dim=8),
    # every layer MoE (no dense layers in Solar Open): 2 layers, so the grouped plans cover them
    "solar_open": dict(**_V3, n_routed_experts=8, head_dim=8, num_hidden_layers=2),
    "mimo_v2_flash": dict(**_V3, **_DENSE_FIRST, n_routed_experts=8, head_dim=8),
    "dots3_note_text": dict(**_V3, **_MLA, **_DENSE_FIRST, n_routed_experts=8, q_lora_rank=16, head_dim=4,
                            index_topk=8, index_n_heads=2, index_head_dim=8,
                            shared_experts_intermediate_size=16),
    # an RMSNorm on the block's output
    "axk1": dict(**_V3, **_MLA, **_DENSE_FIRST, n_routed_experts=8, q_lora_rank=16, head_dim=4),
    # hyper-connection streams around every layer
    "hy_v4": dict(**_V3, **_MLA, **_DENSE_FIRST, n_routed_experts=8, q_lora_rank=16, head_dim=4,
                  index_topk=8, index_n_heads=2, index_head_dim=8),
    # routed_scaling_factor applied by the block, no shared expert
    "beam": dict(**_V3, **_DENSE_FIRST, num_experts=8, head_dim=8),
    "bailing_hybrid": dict(**_V3, **_MLA, **_DENSE_FIRST, num_local_experts=8, head_dim=8,
                           layer_types=["linear_attention", "full_attention", "linear_attention"]),
    # A.X-K2-Light: no groups (grouped A.X-K2 is refused)
    "axk2": dict(**{**_V3, "n_group": None, "topk_group": None}, **_MLA, **_DENSE_FIRST,
                 n_routed_experts=8, q_lora_rank=16, head_dim=4, gated_norm_rank=8),
    # the standard layout (grape/models/adapters/fused_families.py)
    "flint": dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                  num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0], head_dim=8),
    "kolibri1": dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
                     num_experts_per_tok=2, head_dim=8, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # soft-capped router logits: a -inf logit caps to a finite one, the bias still masks it
    "laguna": dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                   num_experts=8, num_experts_per_tok=2, head_dim=8, moe_router_logit_softcapping=2.0,
                   moe_routed_scaling_factor=1.5),
    "minimax_m3_vl_text": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    "aria_text": dict(intermediate_size=16, moe_num_experts=8, moe_topk=2, head_dim=8),
    "lara_mini": dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
                      num_experts_per_tok=2, head_dim=8,
                      layer_types=["linear_attention", "full_attention", "linear_attention"],
                      linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                      linear_value_head_dim=8, linear_conv_kernel_dim=4),
    "mellum": dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                   head_dim=8, sliding_window=8, mlp_layer_types=["dense", "sparse", "sparse"],
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "qwen4_exp_text": dict(moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=8,
                           num_experts_per_tok=2, head_dim=8,
                           layer_types=["linear_attention", "indexed_attention", "linear_attention"],
                           linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                           linear_value_head_dim=8, hc_count=2, hc_lowrank=8, ngram_vocab_size_base=256,
                           heads_per_ngram=2, split_ngram_parts=2, indexer_n_heads=2, indexer_kv_heads=1,
                           indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=2),
    "granitemoe_swa": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                           shared_intermediate_size=24),
    # the router takes the block's correction bias; a dense layer between the MoE ones
    "hy_v3": dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                  num_shared_experts=1, head_dim=8, mlp_layer_types=["sparse", "dense", "sparse"]),
}
NEW_FAMILIES = tuple(CONFIGS)


def make_family(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model; routers and correction biases scaled as in tiny_models.make_tiny."""
    torch.manual_seed(seed)
    config = CONFIG_MAPPING[model_type](**{**_COMMON, **CONFIGS[model_type]})
    model = T.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or "bias" in name:
                param.normal_(0.0, 0.2)
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                tensor.normal_(0.0, 0.1)
    return model.eval()
