"""Routers that take a selection bias from their MoE block. MiniMax-M2 / M2.1 (256 routed
experts, top-8, sigmoid, no shared expert) keeps `e_score_correction_bias` as a buffer of the
block (`mlp.e_score_correction_bias`), not of the router, and the block passes it to the router
on every call. Surgery slices it with the block's other per-expert tensors
(fused.keep_experts, templates/grape_pruning.shrink_layer), a masked router slices it as a
per-expert argument (masked_router_forward), and calibration's masked routings (route_masked,
route_rows) mask it: it is the block's, so the block is the selection module."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from grape.models.adapters.base import register_adapter
from grape.models.adapters.fused import FusedMoEAdapter


class BlockBiasAdapter(FusedMoEAdapter):
    """A fused family whose block calls `router(hidden, block.<block_bias>)`."""

    # the block's attribute holding the selection bias (None there: the router gets None)
    block_bias: ClassVar[str] = "e_score_correction_bias"

    def route(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the router module, called exactly as the block calls it
        bias = getattr(self.block(layer), self.block_bias, None)
        _, weights, index = self.router(layer)(hidden, bias)
        return index, weights

    def selection_module(self, layer: int) -> nn.Module:
        # the selection bias that route_masked / route_rows mask belongs to the block
        return self.block(layer)


@register_adapter
class MiniMaxM2Adapter(BlockBiasAdapter):
    model_types = ("minimax_m2",)
    router_attr = "gate"
    expert_count_keys = ("num_local_experts", "num_experts")
    family = "MiniMax-M2"
    examples = "MiniMax-M2, MiniMax-M2.1"
    special = "sigmoid + the block's correction bias"
