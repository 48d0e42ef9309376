"""What the experts of one MoE layer do on its calibration rows: every expert's output, the
per-token Gram matrices of the routed outputs, and the layer cost curve (the routed output's
error keeping the n most important experts). The reconstruction order (grape.calibration.reconstruction)
and the layer scores (grape.calibration.scoring) are built from these."""

from __future__ import annotations

import numpy as np
import torch

from grape.models.adapters.base import MoEAdapter

# rows of one all-experts evaluation call; bounds the transient memory of the subsample pass
_MAX_ROWS_PER_CALL = 1 << 16


# -- subsample measurements ---------------------------------------------------------------
@torch.no_grad()
def all_expert_outputs(adapter: MoEAdapter, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """Every expert's output f_e(x) on every row of `hidden`: (E, T, H) in the model's dtype.

    Calls the experts module itself (so accelerate offload hooks fire) with each row routed to
    one expert at unit weight, a few experts per call."""
    experts = adapter.experts(layer)
    num_experts, tokens = adapter.num_experts(layer), hidden.shape[0]
    per_call = max(1, _MAX_ROWS_PER_CALL // max(tokens, 1))
    out = []
    for start in range(0, num_experts, per_call):
        ids = torch.arange(start, min(num_experts, start + per_call), device=hidden.device)
        rows = hidden.repeat(len(ids), 1)
        index = ids.repeat_interleave(tokens).unsqueeze(1)
        ones = torch.ones(rows.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
        out.append(experts(rows, index, ones).reshape(len(ids), tokens, -1))
    return torch.cat(out)


def dense_weights(
    top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Routing as a dense (T, E) float64 matrix: entry (t, e) is the weight token t gives e."""
    out = torch.zeros(
        top_k_index.shape[0], num_experts, dtype=torch.float64, device=top_k_index.device
    )
    return out.scatter_add_(1, top_k_index, top_k_weights.to(torch.float64))


def token_grams(outputs: torch.Tensor) -> torch.Tensor:
    """Per-token Gram matrices of the experts' outputs, (T, E, E) float64:
    G_t[i, j] = <f_i(x_t), f_j(x_t)>."""
    num_experts, _, hidden = outputs.shape
    per_token = outputs.transpose(0, 1)  # (T, E, H)
    chunk = max(1, (1 << 25) // max(num_experts * hidden, 1))  # ~256 MB of float64 per chunk
    grams = []
    for x in per_token.split(chunk):
        x = x.to(torch.float64)
        grams.append(x @ x.transpose(1, 2))
    return torch.cat(grams)


@torch.no_grad()
def expert_grams(adapter: MoEAdapter, layer: int, hidden: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """token_grams of every expert's outputs on `hidden`, (T, E, E) float64, computed `chunk`
    rows at a time so that the (E, T, H) outputs never exist all at once (E x H x 2048 values
    would be gigabytes on a 256-expert model)."""
    return torch.cat([token_grams(all_expert_outputs(adapter, layer, part)) for part in hidden.split(chunk)])


@torch.no_grad()
def cost_curve(
    adapter: MoEAdapter, layer: int, hidden: torch.Tensor, outputs: torch.Tensor, order: np.ndarray
) -> np.ndarray:
    """Block output error against the number of experts kept, (E+1,) float64.

    `order` lists the experts from least to most important. Keeping n means removing
    order[:E-n]; the tokens are routed with `adapter.route_masked` (the removed experts masked,
    weights renormalised as the model does; below top_k the router uses what is left, as
    `remove` with top_k = min(top_k, kept) does), and

        cost_curve[n] = mean_x || y_E(x) - y_n(x) ||^2,

    y_n the routed-experts output (shared experts cancel in the difference). So cost_curve[E]
    is 0 and cost_curve[0] is the mean energy of the routed output. With W_n the (T, E) routing
    weights and G_t the per-token Gram matrix of the expert outputs, the error of token t is
    d_t^T G_t d_t with d_t = W_E[t] - W_n[t]: one Gram per layer, then O(T E^2) per n."""
    num_experts = adapter.num_experts(layer)
    grams = token_grams(outputs)
    full = dense_weights(*adapter.route(layer, hidden), num_experts).to(grams.device)

    def error(diff: torch.Tensor) -> float:
        return float(torch.einsum("te,tef,tf->t", diff, grams, diff).clamp_min(0).mean())

    curve = np.zeros(num_experts + 1, dtype=np.float64)
    curve[0] = error(full)
    for kept in range(1, num_experts):
        removed = [int(e) for e in order[: num_experts - kept]]
        pruned = dense_weights(*adapter.route_masked(layer, hidden, removed), num_experts)
        curve[kept] = error(full - pruned.to(grams.device))
    return np.nan_to_num(curve, nan=curve[0], posinf=curve[0])


def _bilinear_errors(index: torch.Tensor, coeff: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """Per-token ||sum_i coeff[t, i] f_{index[t, i]}(x_t)||^2 from the Gram matrices: (T,) float64.
    Repeated indices are fine (the expansion counts every pair), so the full and the pruned
    routing can be concatenated as they are."""
    tokens, num_experts, m = grams.shape[0], grams.shape[1], index.shape[1]
    flat = (index[:, :, None] * num_experts + index[:, None, :]).reshape(tokens, m * m)
    block = grams.reshape(tokens, num_experts * num_experts).gather(1, flat).reshape(tokens, m, m)
    return torch.einsum("ti,tij,tj->t", coeff, block, coeff).clamp_min(0)
