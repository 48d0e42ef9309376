"""ERNIE-4.5 MoE (ernie4_5_moe): MoE from `moe_layer_start_index` every `moe_layer_interval`
layers, block `mlp` with shared experts; router `mlp.gate`: fp32 softmax over every expert, the
top-k chosen on softmax + a correction bias, the chosen weights renormalised (clamped at
`moe_norm_min`). The correction bias is a [1, E] parameter of a child module,
`gate.moe_statics.e_score_correction_bias`, which the generic slicing (direct tensors, expert on
dim 0) misses: the adapter declares it (`extra_expert_tensors`), by which surgery and streaming
apply slice it; shrinking, masks and the fingerprint handle it here."""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

from grape.models.adapters.base import register_adapter
from grape.models.adapters.fused import FusedMoEAdapter
from grape.templates.grape_pruning import install_router_mask

_BIAS = "e_score_correction_bias"


def masked_statics_forward(self, hidden_states):
    """Ernie4_5_MoeStatics.forward for a router masked to `self._grape_keep`: the scores it is
    given are as wide as the kept experts, so is the bias added to them."""
    bias = getattr(self, _BIAS).squeeze()
    if hidden_states.shape[-1] != bias.shape[-1]:
        bias = bias.index_select(-1, torch.tensor(self._grape_keep, dtype=torch.long, device=bias.device))
    return hidden_states + bias


def _mask_statics(statics: nn.Module, keep: list[int]) -> None:
    statics._grape_keep = [int(e) for e in keep]
    statics.forward = types.MethodType(masked_statics_forward, statics)  # a deep copy rebinds it


@register_adapter
class Ernie45MoeAdapter(FusedMoEAdapter):
    model_types = ("ernie4_5_moe",)
    router_attr = "gate"
    expert_count_keys = ("moe_num_experts",)
    top_k_key = "moe_k"
    family = "ERNIE-4.5"
    examples = "ERNIE-4.5-21B-A3B, ERNIE-4.5-300B-A47B"
    special = ("softmax + a correction bias in the router's child gate.moe_statics; MoE from "
               "moe_layer_start_index")
    # the correction bias [1, E], expert on the last axis (FusedMoEAdapter.keep_experts slices it;
    # streaming apply slices its stored copy, mlp.moe_statics.e_score_correction_bias, the same way)
    extra_expert_tensors = {f"gate.moe_statics.{_BIAS}": -1}

    def statics(self, layer: int) -> nn.Module:
        return self.router(layer).moe_statics

    def router_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        out = super().router_tensors(layer)
        out[f"moe_statics.{_BIAS}"] = getattr(self.statics(layer), _BIAS).reshape(-1)
        return out

    def route_masked(self, layer: int, hidden: torch.Tensor, removed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # the router of the pruned model: its own forward on the kept experts' rows and bias
        if not removed:
            return self.route(layer, hidden)
        gone = {int(e) for e in removed}
        keep = [e for e in range(self.num_experts(layer)) if e not in gone]
        view = copy.copy(self.router(layer))  # shallow: weights shared, masks on the copies only
        view._modules = {**view._modules, "moe_statics": copy.copy(self.statics(layer))}
        _mask_statics(view.moe_statics, keep)
        install_router_mask(view, keep, top_k=min(self.top_k(layer), len(keep)))
        _, weights, index = view(hidden)
        return index, weights

    def mask_experts(self, layer: int, removed: list[int]) -> None:
        super().mask_experts(layer, removed)
        _mask_statics(self.statics(layer), self.router(layer)._grape_keep)

    def shrink_to_config(self) -> None:
        super().shrink_to_config()
        for layer in self.moe_blocks():
            statics, n = self.statics(layer), self.num_experts(layer)
            bias = getattr(statics, _BIAS)
            if bias.shape[-1] != n:
                statics._parameters[_BIAS] = nn.Parameter(bias[..., :n].clone(), requires_grad=False)

    def mask_from_config(self) -> None:
        super().mask_from_config()
        for layer in self.masked_experts():
            _mask_statics(self.statics(layer), self.router(layer)._grape_keep)
