"""The ``router`` repair stage: a short local re-fit of a pruned MoE layer's router rows (issue 27's
third candidate; grape.pruning.repair runs it per layer, alone as ``--repair router`` or after the
down projections' fit as ``--repair lstsq+router``).

After pruning, the kept experts' router rows are those of the original model, but the routing
they produce is not the original's: a token whose experts were removed goes to its next-best
kept experts, and softmax / renormalised weights are spread over fewer experts. This stage
adjusts only the router's parameters (the kept experts' weight rows, and a router bias where the
family has one, e.g. gpt-oss) so that the pruned layer's routed output

    y'(x) = sum_{e in topk'(x)} w'_e(x) E_e(x)

comes closer to the original layer's routed output y(x) on the layer's own calibration inputs:
Adam on  mean_t ||y_t - y'_t||^2 / mean_t ||y_t||^2,  a fixed number of full-batch steps
starting from the original rows, the routing computed by the family's own router module
(adapter.route: softmax / sigmoid, bias-corrected or group-limited selection, renormalisation
and scaling exactly as the model applies them). The gradient flows through the weights of the
selected experts; the top-k choice itself is piecewise constant (no gradient) but is
recomputed at every step, so tokens do move between experts as the rows change. Selection-only
tensors (DeepSeek-V3's e_score_correction_bias, a buffer) get no gradient and stay as they are.

The experts are frozen here, so they run once: with W (T, K) the routing weights scattered by
expert, the objective is sum_t yy_t - 2 W_t.b_t + W_t G_t W_t with per-token statistics
b[t, e] = <E_e(x_t), y_t> and G[t, e, f] = <E_e(x_t), E_f(x_t)> over all K kept experts
(:func:`expert_statistics`: K / top_k passes of the experts over the tokens, T x K x K floats
kept), exact whichever experts a step selects. A step is then one router projection and a
(T, k, k) contraction, forward and backward: cheap next to one pass of the experts.

Deterministic: no sampling, a fixed step count, no wall-clock limit; the best iterate seen
(lowest objective) is kept, and grape.pruning.repair undoes the stage if the layer's error,
measured with the real routing afterwards, is not lower.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from grape.errors import ArchitectureError
from grape.pruning.repair_fit import ROUTED_CHUNK

# full-batch Adam steps per layer and the step size: the largest change of a token's router
# logit one step can make, relative to the logits' standard deviation on the layer's tokens
# (Adam moves each coordinate by about lr, so a weight step of lr moves a logit by up to
# lr * ||x||_1; chosen on the zoo's validation split, docs/repair.md)
DEFAULT_STEPS = 300
DEFAULT_LR = 0.1


def router_parameters(adapter, layer: int) -> dict[str, nn.Parameter]:
    """The router's trainable per-expert tensors (weight rows, bias), by name under the router:
    the adapter's router tensors that are parameters (buffers such as a correction bias only
    select experts and carry no gradient)."""
    router = adapter.router(layer)
    getter = getattr(adapter, "router_tensors", None)
    tensors = getter(layer) if getter is not None else dict(router.named_parameters())
    own = dict(router.named_parameters())
    return {name: own[name] for name, t in tensors.items()
            if name in own and own[name] is t and t.is_floating_point()}


def check_router_model(adapter, layer: int, x: torch.Tensor) -> None:
    """Refuse a family whose routed output is not sum_e w_e E_e(x) with E_e independent of the
    router (Llama-4's experts scale their input by the router's own score): cached expert
    outputs would then be wrong as soon as the rows move."""
    experts, router = adapter.experts(layer), adapter.router(layer)
    if not router_parameters(adapter, layer):
        raise ArchitectureError(f"--repair router: this {type(router).__name__} has no router "
                                "weight to re-fit; use --repair lstsq")
    index, weight = adapter.route(layer, x[:64])
    one, w = index[:, :1], weight[:, :1]
    unit = experts(x[:64], one, torch.ones_like(w)).double()
    same = experts(x[:64], one, w).double()
    params = list(router_parameters(adapter, layer).values())
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.data.mul_(2.0)
    moved = experts(x[:64], one, w).double()
    for p, value in zip(params, saved):
        p.data.copy_(value)
    scale = same.abs().max().clamp_min(1e-12)
    tolerance = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if (float((same - w.double() * unit).abs().max() / scale) > tolerance
            or float((moved - same).abs().max() / scale) > tolerance):
        raise ArchitectureError(
            f"--repair router cannot hold this {type(experts).__name__}'s expert outputs fixed "
            "while the router moves (they depend on the router's scores); use --repair scale")


def expert_statistics(experts: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(yy, b, G), float32: per token yy_t = ||y_t||^2, b[t, e] = <E_e(x_t), y_t> and
    G[t, e, f] = <E_e(x_t), E_f(x_t)> over every kept expert, E_e the experts module's own output
    for that expert at weight 1. With W (T, K) the routing weights scattered by expert (zero
    where an expert is not chosen), ||y_t - y'_t||^2 = yy_t - 2 W_t.b_t + W_t G_t W_t exactly,
    whichever experts a step selects: the experts run once, on chunks of tokens sized so that
    their (chunk, K, H) outputs stay near 256 MB."""
    tokens, width = x.shape
    chunk = max(1, min(ROUTED_CHUNK, 2**26 // max(num_experts * width, 1)))
    b = torch.zeros(tokens, num_experts, dtype=torch.float32, device=x.device)
    gram = torch.zeros(tokens, num_experts, num_experts, dtype=torch.float32, device=x.device)
    for s in range(0, tokens, chunk):
        part = x[s:s + chunk]
        ones = torch.ones(len(part), 1, dtype=x.dtype, device=x.device)
        index = torch.zeros(len(part), 1, dtype=torch.long, device=x.device)
        outputs = torch.stack([experts(part, index + e, ones).float() for e in range(num_experts)], 1)
        b[s:s + chunk] = torch.einsum("tkh,th->tk", outputs, y[s:s + chunk].float())
        gram[s:s + chunk] = outputs @ outputs.transpose(1, 2)
    return y.float().pow(2).sum(-1), b, gram


@contextmanager
def _float_masters(router: nn.Module, params: dict[str, nn.Parameter]):
    """The router's parameters replaced by float32 leaves while the fit runs (Adam in bf16 would
    round most steps away), copied back into the original tensors, in their dtype, on exit."""
    masters = {}
    for name, param in params.items():
        owner, _, leaf = name.rpartition(".")
        module = router.get_submodule(owner) if owner else router
        masters[name] = (module, leaf, param, nn.Parameter(param.detach().float().clone()))
        module._parameters[leaf] = masters[name][3]
    try:
        yield {name: m[3] for name, m in masters.items()}
    finally:
        for module, leaf, param, master in masters.values():
            with torch.no_grad():
                param.copy_(master.detach().to(param.dtype))
            module._parameters[leaf] = param


def _objective(adapter, layer: int, x: torch.Tensor, stats: tuple[torch.Tensor, ...],
               scale: float) -> torch.Tensor:
    """sum_t ||y_t - y'_t||^2 * scale with y' routed by the router as it is now (differentiable
    in the routing weights; the selection is whatever the router's top-k picks). Only the
    selected experts' entries of b and G are read: (T, k) and (T, k, k) per step."""
    yy, b, gram = stats
    index, weight = adapter.route(layer, x)
    weight = weight.float()
    tokens, experts = b.shape
    pairs = (index[:, :, None] * experts + index[:, None, :]).reshape(tokens, -1)
    chosen = gram.view(tokens, -1).gather(1, pairs).view(*index.shape, index.shape[1])
    error = (yy - 2 * (weight * b.gather(1, index)).sum(-1)
             + ((chosen * weight[:, None, :]).sum(-1) * weight).sum(-1))
    return error.sum() * scale


@torch.no_grad()
def fit_router(adapter, layer: int, x: torch.Tensor, y: torch.Tensor, steps: int = DEFAULT_STEPS,
               lr: float = DEFAULT_LR) -> None:
    """The ``router`` stage, in place on the pruned layer `layer` (see the module docstring)."""
    check_router_model(adapter, layer, x)
    energy = float(y.double().pow(2).sum()) / max(x.shape[0], 1)
    if energy <= 0 or steps == 0:
        return
    stats = expert_statistics(adapter.experts(layer), x, y, adapter.num_experts(layer))
    scale = 1.0 / (x.shape[0] * energy)
    xf = x.float()
    logits = adapter.router_logits(layer, x[:ROUTED_CHUNK])[0]
    spread = float(logits.float().std()) if logits is not None and logits.numel() > 1 else 1.0
    step = lr * max(spread, 1e-6)  # in logit units
    router = adapter.router(layer)
    with _float_masters(router, router_parameters(adapter, layer)) as masters:
        # Adam's per-coordinate step is about lr: a bias moves a logit by lr, a weight row by up
        # to lr * ||x||_1, so both are given the same step in logit units
        width_x = float(xf.abs().sum(-1).mean().clamp_min(1e-12))
        optimiser = torch.optim.Adam([{"params": [p], "lr": step / (1.0 if p.dim() == 1 else width_x)}
                                      for p in masters.values()])
        best, best_value = None, float("inf")
        for done in range(steps + 1):  # the last pass only measures the final rows
            optimiser.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = _objective(adapter, layer, xf, stats, scale)
                if done < steps and loss.requires_grad:
                    loss.backward()
            value = float(loss.detach())
            if value < best_value:
                best_value, best = value, [p.detach().clone() for p in masters.values()]
            if done == steps:
                break
            if all(p.grad is None for p in masters.values()):
                raise ArchitectureError("--repair router: this family's routing weights carry no "
                                        "gradient to its router weight; use --repair lstsq")
            optimiser.step()
        for p, value in zip(masters.values(), best):
            p.copy_(value)


__all__ = ["DEFAULT_LR", "DEFAULT_STEPS", "check_router_model", "expert_statistics", "fit_router",
           "router_parameters"]
