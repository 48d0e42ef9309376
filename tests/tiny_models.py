"""Tiny random MoE models of every supported family, built from configs (no downloads).

`make_tiny(family, **overrides)` returns an eval-mode fp32 model with hidden size 32 and
3 decoder layers; seeds are fixed so every test sees the same weights.
"""

from __future__ import annotations

import torch
import transformers as T

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

_CONFIGS = {
    "mixtral": lambda: T.MixtralConfig(**_COMMON, intermediate_size=48, num_local_experts=8,
                                       num_experts_per_tok=2),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=24,
                                          shared_expert_intermediate_size=32, num_experts=8,
                                          num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=24,
                                          num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                          head_dim=8),
    "olmoe": lambda: T.OlmoeConfig(**_COMMON, intermediate_size=24, num_experts=8,
                                   num_experts_per_tok=2),
    # first layer dense, two MoE layers; 8 routed experts in 4 groups, 2 groups per token
    "deepseek_v3": lambda: T.DeepseekV3Config(**{**_COMMON, "num_key_value_heads": 4},
                                              intermediate_size=48, moe_intermediate_size=16,
                                              n_routed_experts=8, n_shared_experts=1,
                                              num_experts_per_tok=2, n_group=4, topk_group=2,
                                              first_k_dense_replace=1, q_lora_rank=None,
                                              kv_lora_rank=16, qk_rope_head_dim=4,
                                              qk_nope_head_dim=4, v_head_dim=8, head_dim=4,
                                              routed_scaling_factor=1.5,
                                              rope_parameters={"rope_type": "default",
                                                               "rope_theta": 10000.0}),
    # not in FAMILIES (DeepSeek-V2 shares the V3 adapter): softmax router, group-limited by the
    # group maximum; 8 experts in 2 groups, 1 group per token
    "deepseek_v2": lambda: T.DeepseekV2Config(**{**_COMMON, "num_key_value_heads": 4},
                                              intermediate_size=48, moe_intermediate_size=16,
                                              n_routed_experts=8, n_shared_experts=1,
                                              num_experts_per_tok=2, n_group=2, topk_group=1,
                                              topk_method="group_limited_greedy",
                                              first_k_dense_replace=1, q_lora_rank=None,
                                              kv_lora_rank=16, qk_rope_head_dim=4,
                                              qk_nope_head_dim=4, v_head_dim=8, head_dim=4),
    "gpt_oss": lambda: T.GptOssConfig(**_COMMON, intermediate_size=24, num_local_experts=8,
                                      num_experts_per_tok=2, head_dim=8, sliding_window=16,
                                      layer_types=["sliding_attention", "full_attention",
                                                   "sliding_attention"]),
}


def tiny_config(family: str, **overrides):
    config = _CONFIGS[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def make_tiny(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model of `family`. Router weights get a larger scale than the default
    init so routing is decisive and statistics differ between experts."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = T.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or "bias" in name:
                param.normal_(0.0, 0.2)
            if "e_score_correction_bias" in name:
                param.normal_(0.0, 0.1)
    return model.eval()


def tiny_input_ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, _COMMON["vocab_size"], (batch, seq), generator=g)


def make_tiny_tokenizer(texts: list[str], vocab_size: int = 300):
    """A tiny byte-level BPE trained on `texts`, wrapped like the zoo's (<pad>, <s>, </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
