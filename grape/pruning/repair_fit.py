"""The per-layer fits of `--repair` (grape.pruning.repair runs them layer by layer).

Each fit sees one pruned MoE layer: its calibration inputs x (T, H) taken from the pruned and
already repaired upstream layers, the ORIGINAL layer's routed output y (T, H) on those same
inputs, and the pruned layer's routing (index, weight) (T, k) on them (kept numbering). It
changes only the kept experts' down projections, in place, so the checkpoint keeps its tensor
names and shapes. Shared experts are not refitted: the same input gives the same shared output
before and after pruning, so they cancel in y - y'.

* :func:`fit_scales` (``scale``): one output scale s_e per kept expert from the normal equations
  of  min_s sum_t ||y_t - sum_{e routed} s_e c_e(x_t)||^2  (c_e = routing weight x expert output,
  a K x K Gram of co-routed contributions), ridge toward s = 1, folded into the down projection;
* :func:`fit_down` (``lstsq``): each kept expert's down projection re-fitted by ridge least
  squares (toward its original value) over the tokens it receives after pruning, block
  coordinate descent over the experts on the shared residual, so the kept experts also carry
  the removed experts' contributions for those tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from grape.errors import ArchitectureError

# tokens per chunk when accumulating the scale Gram (bounds the (chunk, k, H) contributions)
_CHUNK = 2048
# tokens per call of the experts module over a layer's fitting tokens: its intermediates are
# (tokens x top_k) rows of the gate/up width, a GB at 8192 tokens of a top-8 layer; chunks keep
# the fit within the layer-sequential calibration's memory (one layer + the hidden states)
ROUTED_CHUNK = 1024


@dataclass(frozen=True)
class Routing:
    """The pruned layer's routing of the fitting tokens: (T, k) expert index and weight."""

    index: torch.Tensor
    weight: torch.Tensor

    def rows(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens routed to `expert`, their routing weight for it); an expert appears at most
        once in a token's top-k, so the tokens are distinct."""
        token, slot = torch.nonzero(self.index == expert, as_tuple=True)
        return token, self.weight[token, slot]


def mean_error(y: torch.Tensor, approx: torch.Tensor) -> float:
    """mean_t ||y_t - approx_t||^2 in float64 (the fits' objective without the ridge), summed
    chunk by chunk (no float64 copy of the whole layer's outputs)."""
    if not y.numel():
        return 0.0
    total = sum(float((y[s:s + ROUTED_CHUNK].double() - approx[s:s + ROUTED_CHUNK].double())
                      .pow(2).sum()) for s in range(0, y.shape[0], ROUTED_CHUNK))
    return total / y.shape[0]


def mean_energy(y: torch.Tensor) -> float:
    """mean_t ||y_t||^2 in float64, chunk by chunk."""
    return mean_error(y, y.new_zeros(()).expand_as(y))


def routed(experts: nn.Module, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The routed output as the model computes it (the experts module's own forward), on
    ROUTED_CHUNK tokens at a time (each token's output depends on that token alone)."""
    if x.shape[0] <= ROUTED_CHUNK:
        return experts(x, routing.index, routing.weight)
    return torch.cat([experts(x[s:s + ROUTED_CHUNK], routing.index[s:s + ROUTED_CHUNK],
                              routing.weight[s:s + ROUTED_CHUNK])
                      for s in range(0, x.shape[0], ROUTED_CHUNK)])


# -- scale --------------------------------------------------------------------------------------
def _contributions(experts: nn.Module, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """(T, k, H) float64: slot j of token t holds w_tj * E_{index_tj}(x_t), each computed by the
    experts module itself (one expert per call), so any family's expert arithmetic is exact."""
    out = torch.zeros(*routing.index.shape, x.shape[-1], dtype=torch.float64, device=x.device)
    for expert in torch.unique(routing.index).tolist():
        token, slot = torch.nonzero(routing.index == expert, as_tuple=True)
        one = torch.full((len(token), 1), expert, dtype=routing.index.dtype, device=x.device)
        part = experts(x[token], one, routing.weight[token, slot][:, None])
        out[token, slot] = part.double()
    return out


def scale_statistics(experts: nn.Module, x: torch.Tensor, y: torch.Tensor, routing: Routing,
                     num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, b): G[i, j] = sum_t <c_i(x_t), c_j(x_t)> over the tokens routing both i and j (the
    diagonal: i alone), b[i] = sum_t <c_i(x_t), y_t>, float64."""
    gram = torch.zeros(num_experts * num_experts, dtype=torch.float64, device=x.device)
    rhs = torch.zeros(num_experts, dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], _CHUNK):
        part = Routing(routing.index[start:start + _CHUNK], routing.weight[start:start + _CHUNK])
        c = _contributions(experts, x[start:start + _CHUNK], part)
        pairs = part.index[:, :, None] * num_experts + part.index[:, None, :]
        gram.index_add_(0, pairs.flatten(), (c @ c.transpose(1, 2)).flatten())
        target = y[start:start + _CHUNK].double()[:, None, :]
        rhs.index_add_(0, part.index.flatten(), (c * target).sum(-1).flatten())
    return gram.view(num_experts, num_experts), rhs


def solve_scales(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_s s'Gs - 2 b's + ridge * sum_e G_ee (s_e - 1)^2: the ridge is scaled by each
    expert's own energy (so it means the same for a busy and a rare expert) and pulls toward
    the unrepaired model; an expert no token reaches keeps s = 1."""
    diag = torch.diagonal(gram).clone()
    unused = diag <= 0
    diag[unused] = 1.0
    lhs = gram + torch.diag(ridge * diag)
    lhs[unused, :] = 0.0
    lhs[:, unused] = 0.0
    lhs[unused, unused] = 1.0
    target = rhs + ridge * diag
    target[unused] = 1.0
    return torch.linalg.solve(lhs, target)


@torch.no_grad()
def fold_scales(experts: nn.Module, scales: torch.Tensor) -> None:
    """Multiply each expert's down projection (and its bias, if any) by its scale: the expert's
    output, and so its contribution, scales by exactly that factor."""
    for name in ("down_proj", "down_proj_bias"):
        tensor = getattr(experts, name, None)
        if tensor is not None:
            shape = (-1,) + (1,) * (tensor.dim() - 1)
            tensor.mul_(scales.to(tensor.dtype).view(shape))


def fit_scales(experts: nn.Module, x: torch.Tensor, y: torch.Tensor, routing: Routing,
               num_experts: int, ridge: float, sweeps: int = 1) -> None:
    """The ``scale`` repair, in place (see the module docstring); `sweeps` is unused."""
    gram, rhs = scale_statistics(experts, x, y, routing, num_experts)
    fold_scales(experts, solve_scales(gram, rhs, ridge))


# -- lstsq --------------------------------------------------------------------------------------
def _layout(experts: nn.Module) -> tuple[bool, bool]:
    return bool(getattr(experts, "is_transposed", False)), bool(getattr(experts, "has_bias", False))


def down_input(experts: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """The down projection's input a_e(x) (n, I): gate/up projection, then the family's own
    gating (`_apply_gate`), as grape.models.adapters.fused computes expert outputs."""
    transposed, has_bias = _layout(experts)
    weight = experts.gate_up_proj[expert]
    out = x @ weight if transposed else nn.functional.linear(x, weight)
    if has_bias:
        out = out + experts.gate_up_proj_bias[expert]
    return experts._apply_gate(out)


def down_matrix(experts: nn.Module, expert: int, stacked: torch.Tensor | None = None) -> torch.Tensor:
    """The expert's down projection as M (I, H) with output a @ M (+ bias), whatever the layout;
    `stacked`: read it from this copy of `down_proj` instead of the module's."""
    transposed, _ = _layout(experts)
    weight = (experts.down_proj if stacked is None else stacked)[expert]
    return weight if transposed else weight.transpose(0, 1)


def _down_bias(experts: nn.Module, expert: int, width: int, like: torch.Tensor) -> torch.Tensor:
    _, has_bias = _layout(experts)
    if has_bias:
        return experts.down_proj_bias[expert].double()
    return torch.zeros(width, dtype=torch.float64, device=like.device)


def check_down_model(experts: nn.Module, x: torch.Tensor, routing: Routing) -> None:
    """Refuse ``lstsq`` where w * (a_e(x) M_e + b_e) is not what the experts module computes
    (experts that scale their input by the router score, as Llama-4's do): a fit of M_e on that
    model would change the layer in a way it did not measure."""
    for expert in torch.unique(routing.index).tolist():
        token, weight = routing.rows(expert)
        if weight.abs().max() <= 0:
            continue
        x_e = x[token[:64]]
        mine = _modelled(experts, x_e, expert, weight[:64])
        one = torch.full((len(x_e), 1), expert, dtype=routing.index.dtype, device=x.device)
        theirs = experts(x_e, one, weight[:64, None]).double()
        scale = theirs.abs().max().clamp_min(1e-12)
        tolerance = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-4
        if float((mine - theirs).abs().max() / scale) > tolerance:
            raise ArchitectureError(
                f"--repair lstsq cannot model this {type(experts).__name__}'s outputs as a linear "
                "down projection of the gated activations (its experts differ); use --repair scale")
        return


def _modelled(experts: nn.Module, x: torch.Tensor, expert: int, weight: torch.Tensor) -> torch.Tensor:
    a = down_input(experts, x, expert).double()
    m = down_matrix(experts, expert).double()
    bias = _down_bias(experts, expert, m.shape[1], x)
    return weight.double()[:, None] * (a @ m + bias)


@torch.no_grad()
def fit_down(experts: nn.Module, x: torch.Tensor, y: torch.Tensor, routing: Routing,
             num_experts: int, ridge: float, sweeps: int = 2) -> None:
    """The ``lstsq`` repair, in place: block coordinate descent on

        sum_t ||y_t - sum_{e routed} w_te (a_e(x_t) M_e + b_e)||^2 + sum_e lam_e ||M_e - M_e^0||^2

    one expert's M_e at a time (closed form: an I x I ridge system on the tokens it receives),
    the others fixed, the residual updated after each; `sweeps` passes over the experts. Each
    step can only lower the objective. lam_e = ridge * trace(A'A) / I, A the expert's weighted
    activations, so the pull toward the original M_e^0 is relative to what the data says."""
    check_down_model(experts, x, routing)
    residual = y.double() - routed(experts, x, routing).double()
    original = experts.down_proj.detach().clone()  # the ridge's anchor, in the model's dtype
    for _ in range(max(1, sweeps)):
        for expert in range(num_experts):
            token, weight = routing.rows(expert)
            if len(token) == 0:
                continue
            w = weight.double()[:, None]
            a = down_input(experts, x[token], expert).double() * w
            m = down_matrix(experts, expert).double()
            bias = w * _down_bias(experts, expert, m.shape[1], x)
            old = a @ m + bias
            target = residual[token] + old - bias
            gram = a.T @ a
            lam = ridge * float(torch.trace(gram)) / gram.shape[0]
            if lam <= 0:
                continue  # the expert's activations are all zero here: nothing to fit
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            new = torch.linalg.solve(gram + lam * eye, a.T @ target + lam * down_matrix(experts, expert, original).double())
            residual[token] -= (a @ new + bias) - old
            _set_down(experts, expert, new)


def _set_down(experts: nn.Module, expert: int, m: torch.Tensor) -> None:
    transposed, _ = _layout(experts)
    value = m if transposed else m.transpose(0, 1)
    experts.down_proj[expert].copy_(value.to(experts.down_proj.dtype))


FITS = {"scale": fit_scales, "lstsq": fit_down}

__all__ = ["FITS", "ROUTED_CHUNK", "Routing", "check_down_model", "down_input", "down_matrix",
           "fit_down", "fit_scales", "fold_scales", "mean_energy", "mean_error", "routed",
           "scale_statistics", "solve_scales"]
