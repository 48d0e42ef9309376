"""Llama-4 text decoder (llama4_text): MoE on the layers in `moe_layers` (every
`interleave_moe_layer_step`-th; the others are a dense `Llama4TextMLP`), block `feed_forward`
with a top-k sigmoid router `router` (an nn.Linear), one shared expert and routed experts that
scale their INPUT by the router score: a routed expert contributes f_e(s_e * x), not s_e * f_e(x).

transformers' Llama4TextMoe runs every expert on every token (zero-scored rows) without the
v5 experts interface. The adapter gives each MoE block, once, subclasses with the same
parameters and names (checkpoints are unchanged) that follow that interface:

* the router returns (logits, top_k_weights, top_k_index) like every v5 router, so masks
  (templates/grape_pruning.install_router_mask) and route / route_masked work as for others;
* the experts module is called as experts(x, index, weights) and computes, for each routed
  pair, weights * g_e(x) with g_e(x) = f_e(s_e(x) x) / s_e(x) and s_e(x) the expert's own
  sigmoid score from the router weight. The router's weight for a chosen expert is s_e(x)
  (no renormalisation), so weights * g_e(x) = f_e(s_e x): the real contribution. Everything
  that weights expert_forward by the routing weight (the observer's statistics, the
  reconstruction order) therefore sees the real per-expert contribution, and removing or
  masking an expert leaves the others' contributions exactly as they were. The block itself
  calls it with `stock=True`: then the arithmetic is Llama4TextMoe's own, bit for bit (a
  pruned checkpoint gives the same logits in stock transformers), except under the observer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.llama4.modeling_llama4 import Llama4Router, Llama4TextExperts, Llama4TextMoe

from grape.models.adapters.base import register_adapter
from grape.models.adapters.fused import FusedMoEAdapter

# grape.calibration.observer's OBSERVER_IMPLEMENTATION and _STATE_ATTR (not imported: an import cycle)
_OBSERVER, _OBSERVED = "grape_observer", "_grape_observer_state"


class GrapeLlama4Router(Llama4Router):
    """Llama4Router returning the v5 triple; the same top-k on logits and sigmoid(float)."""

    def forward(self, hidden_states):
        logits = F.linear(hidden_states, self.weight)
        top_value, top_index = torch.topk(logits, self.top_k, dim=1)
        weights = torch.sigmoid(top_value.float()).to(logits.dtype)
        return logits, weights, top_index


class _Dispatch:
    """The experts module's `config` as the observer reads it: 'eager', i.e. the class's own
    input-scaled forward. (transformers cannot switch Llama-4's experts implementation: its
    modeling file has no decorated experts class; the observer's state on the module is the
    switch instead.)"""

    _experts_implementation = "eager"


def _input_scaled(self, hidden, top_k_index, top_k_weights):
    """sum over the routed pairs of weight * f_e(s_e x) / s_e (see the module docstring)."""
    router = self.__dict__["_grape_router"]
    out = torch.zeros_like(hidden)
    logits = F.linear(hidden, router.weight)
    for e in torch.unique(top_k_index).tolist():
        rows, slot = torch.nonzero(top_k_index == e, as_tuple=True)
        score = torch.sigmoid(logits[rows, e].float()).to(hidden.dtype)
        x = hidden[rows] * score[:, None]
        gate, up = (x @ self.gate_up_proj[e]).chunk(2, dim=-1)
        y = (up * self.act_fn(gate)) @ self.down_proj[e]
        g = torch.where(score[:, None] > 0, y / score[:, None].clamp_min(torch.finfo(score.dtype).tiny),
                        torch.zeros_like(y))
        out.index_add_(0, rows, (g * top_k_weights[rows, slot][:, None]).to(out.dtype))
    return out


class GrapeLlama4Experts(Llama4TextExperts):
    """Llama4TextExperts with the v5 interface experts(x, top_k_index, top_k_weights)."""

    has_gate, has_bias, is_transposed, is_concatenated = True, False, True, True

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None, stock=False):
        if top_k_index is None:  # the stock call: rows pre-scaled, every expert
            return Llama4TextExperts.forward(self, hidden_states)
        if getattr(self, _OBSERVED, None) is not None:  # an ExpertObserver is installed here
            return ALL_EXPERTS_FUNCTIONS[_OBSERVER](self, hidden_states, top_k_index, top_k_weights)
        if stock:  # the block's call with the router's own scores: Llama4TextMoe's arithmetic
            return self._stock(hidden_states, top_k_index, top_k_weights)
        return _input_scaled(self, hidden_states, top_k_index, top_k_weights)

    def _stock(self, hidden, top_k_index, top_k_weights):
        """Llama4TextMoe.forward's routed part, operation for operation (bit-identical)."""
        scores = hidden.new_zeros(hidden.shape[0], self.gate_up_proj.shape[0])
        scores = scores.scatter(1, top_k_index, top_k_weights.to(scores.dtype))
        routed_in = hidden.repeat(scores.shape[1], 1) * scores.transpose(0, 1).reshape(-1, 1)
        routed_out = Llama4TextExperts.forward(self, routed_in)
        return routed_out.reshape(scores.shape[1], -1, routed_out.shape[-1]).sum(dim=0)

    forward.__wrapped__ = _input_scaled  # what the observer calls the class's own forward

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return up * self.act_fn(gate)


class GrapeLlama4Moe(Llama4TextMoe):
    """Llama4TextMoe through the router triple and the experts interface; same outputs."""

    def forward(self, hidden_states):
        hidden = hidden_states.reshape(-1, self.hidden_dim)
        router_logits, weights, index = self.router(hidden)
        out = self.shared_expert(hidden)
        out.add_(self.experts(hidden, index, weights, stock=True))
        return out, router_logits


def convert_block(block: nn.Module) -> None:
    """Give a stock Llama4TextMoe (once) the interface subclasses; parameters untouched."""
    if isinstance(block, GrapeLlama4Moe):
        return
    block.__class__ = GrapeLlama4Moe
    block.router.__class__ = GrapeLlama4Router
    block.experts.__class__ = GrapeLlama4Experts
    block.experts.config = _Dispatch()
    block.experts.__dict__["_grape_router"] = block.router  # not a submodule: no new weights


@register_adapter
class Llama4TextAdapter(FusedMoEAdapter):
    model_types = ("llama4_text",)
    block_attr = "feed_forward"
    router_attr = "router"
    expert_count_keys = ("num_local_experts",)
    family = "Llama 4 (text decoder)"
    examples = "Llama-4-Scout-17B-16E, Llama-4-Maverick-17B-128E"
    special = ("top-1 sigmoid router scaling the expert's input; shared expert kept; MoE on "
               "interleaved layers")
    lstsq_refusal = "its experts scale their input by the router score, which lstsq cannot model"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        for block in self.moe_blocks().values():
            convert_block(block)

    def expert_forward(self, layer: int, hidden: torch.Tensor, expert: int) -> torch.Tensor:
        # g_e(x): times the routing weight s_e(x), the expert's real contribution f_e(s_e x)
        rows = hidden.shape[0]
        index = torch.full((rows, 1), int(expert), dtype=torch.long, device=hidden.device)
        return self.experts(layer)(hidden, index, torch.ones(rows, 1, dtype=hidden.dtype, device=hidden.device))
