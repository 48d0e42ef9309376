"""Routers that take a selection bias from their MoE block. MiniMax-M2 / M2.1 (256 routed
experts, top-8, sigmoid, no shared expert) keeps `e_score_correction_bias` as a buffer of the
block (`mlp.e_score_correction_bias`), not of the router, and the block passes it to the router
on every call. Surgery slices it with the block's other per-expert tensors
(fused.keep_experts, templates/grape_pruning.shrink_layer), and a masked router slices it as a
per-expert argument (masked_router_forward)."""

from __future__ import annotations

from typing import ClassVar

import torch

from grape.adapters.base import _MaskRouterColumns, register_adapter
from grape.adapters.fused import FusedMoEAdapter


class BlockBiasAdapter(FusedMoEAdapter):
    """A fused family whose block calls `router(hidden, block.<block_bias>)`."""

    # the block's attribute holding the selection bias (None there: the router gets None)
    block_bias: ClassVar[str] = "e_score_correction_bias"

    def route(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the router module, called exactly as the block calls it
        bias = getattr(self.block(layer), self.block_bias, None)
        _, weights, index = self.router(layer)(hidden, bias)
        return index, weights

    def route_masked(self, layer: int, hidden: torch.Tensor, removed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # as the default, but the selection bias to mask belongs to the block, not the router
        if not removed:
            return self.route(layer, hidden)
        with _MaskRouterColumns(self.block(layer), self.num_experts(layer), removed):
            return self.route(layer, hidden)


@register_adapter
class MiniMaxM2Adapter(BlockBiasAdapter):
    model_types = ("minimax_m2",)
    router_attr = "gate"
    expert_count_keys = ("num_local_experts", "num_experts")
