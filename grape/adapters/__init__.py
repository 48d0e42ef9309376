"""Architecture adapters, one module per family. Importing this package registers them all."""

from grape.adapters import deepseek, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401
from grape.adapters import deepseek_like, lfm2_moe, minimax_m2, qwen3_next, refused, standard  # noqa: F401
from grape.adapters import ernie4_5_moe, llama4  # noqa: F401
from grape.adapters import deepseek_v3_copies, fused_families  # noqa: F401
from grape.adapters.base import MoEAdapter, get_adapter, register_adapter, supported_model_types

__all__ = ["MoEAdapter", "get_adapter", "register_adapter", "supported_model_types"]
