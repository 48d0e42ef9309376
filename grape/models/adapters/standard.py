"""Families on the standard transformers v5 layout with nothing special to declare beyond where
the block and router live and which config key holds the expert count: a fused `XExperts`
module and a router returning (logits, top_k_weights, top_k_index) from its own `weight`."""

import copy

import torch

from grape.models.adapters.base import register_adapter
from grape.models.adapters.fused import FusedMoEAdapter
from grape.errors import ArchitectureError
from grape.templates.grape_pruning import install_router_mask


@register_adapter
class FlexOlmoAdapter(FusedMoEAdapter):
    """FlexOlmo: softmax top-k router `mlp.gate`, optional renormalisation."""

    model_types = ("flex_olmo",)
    expert_count_keys = ("num_experts",)
    family = "FlexOlmo"
    examples = "FlexOlmo-7x7B-1T"
    special = "softmax top-k, optionally renormalised"


@register_adapter
class MiniMaxAdapter(FusedMoEAdapter):
    """MiniMax-Text-01 (hybrid lightning attention): softmax top-k router `mlp.gate`."""

    model_types = ("minimax",)
    expert_count_keys = ("num_local_experts",)
    family = "MiniMax-01"
    examples = "MiniMax-Text-01"
    special = "lightning-attention hybrid"


@register_adapter
class Cohere2MoeAdapter(FusedMoEAdapter):
    """Cohere2-MoE: top-k on logits, then softmax or sigmoid over the k (`expert_selection_fn`);
    optional shared experts; dense layers from `mlp_layer_types`."""

    model_types = ("cohere2_moe",)
    expert_count_keys = ("num_experts",)
    family = "Cohere2-MoE"
    examples = "command-a-plus-05-2026"
    special = "top-k on the logits, softmax or sigmoid over the chosen"


@register_adapter
class GraniteMoeAdapter(FusedMoEAdapter):
    """Granite-MoE, -Shared (a dense shared MLP beside the block) and -Hybrid (Mamba-2 layers):
    the block is a layer's `block_sparse_moe`, top-k on logits, softmax over the k."""

    model_types = ("granitemoe", "granitemoeshared", "granitemoehybrid")
    block_attr = "block_sparse_moe"
    router_attr = "router"
    expert_count_keys = ("num_local_experts",)
    family = "Granite MoE (3.x, 4.0-H)"
    examples = "granite-3.1-3b-a800m, granite-4.0-h-small"
    special = "MoE block `block_sparse_moe`; Mamba-2 hybrid (4.0-H)"


@register_adapter
class JambaAdapter(FusedMoEAdapter):
    """Jamba (Mamba / attention hybrid): MoE on every `expert_layer_period`-th layer's
    `feed_forward`, softmax top-k router `router`, weights not renormalised."""

    model_types = ("jamba",)
    block_attr = "feed_forward"
    router_attr = "router"
    expert_count_keys = ("num_experts",)
    family = "Jamba"
    examples = "Jamba-v0.1, AI21-Jamba-Mini-1.7"
    special = "Mamba hybrid, MoE every expert_layer_period-th layer; weights not renormalised"


@register_adapter
class PhimoeAdapter(FusedMoEAdapter):
    """Phi-3.5-MoE: sparsemixer router `mlp.router` (an nn.Linear subclass). Sparsemixer
    compares every expert's logit with the best (|logit| in a denominator), so an expert forced
    to -inf makes NaN: masked routing runs the router on the kept experts' rows instead, which
    is exactly what the pruned model's router computes."""

    model_types = ("phimoe",)
    router_attr = "router"
    expert_count_keys = ("num_local_experts",)
    family = "Phi-3.5-MoE"
    examples = "Phi-3.5-MoE-instruct"
    special = "sparsemixer router: at least 2 experts kept per layer"

    def route_masked(self, layer: int, hidden: torch.Tensor, removed: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if not removed:
            return self.route(layer, hidden)
        gone = {int(e) for e in removed}
        keep = [e for e in range(self.num_experts(layer)) if e not in gone]
        view = copy.copy(self.router(layer))  # a shallow copy: the mask is installed on it alone
        install_router_mask(view, keep, top_k=min(self.top_k(layer), len(keep)))
        _, weights, index = view(hidden)
        return index, weights

    def check_plan_counts(self, kept_counts: dict[int, int]) -> None:
        # sparsemixer always picks two experts (its top-2 is written out, not top_k)
        super().check_plan_counts(kept_counts)
        for layer, count in kept_counts.items():
            if count < 2:
                raise ArchitectureError(f"layer {layer}: Phi-3.5-MoE's sparsemixer router always "
                                        f"picks two experts; keep at least 2, the plan keeps {count}")
