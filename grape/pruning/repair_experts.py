"""The ``experts`` repair stage: a short local re-fit of a pruned MoE layer's kept experts, every
projection (grape.pruning.repair runs it per layer, after the down projections' closed-form fit
as ``--repair lstsq+experts``).

The closed-form fit (grape.pruning.repair_fit) changes only the kept experts' down projections:
it can mix what the kept experts already compute, not compute anything new. Where a layer keeps
few experts for many removed ones (a top-2 Mixtral plan keeping 2 of 8 experts in a layer), what
the removed experts did lies mostly outside that span and the fit recovers little of it. This
stage lets the kept experts' gate / up projections move too: Adam on

    mean_t ||y_t - y'_t||^2 / mean_t ||y_t||^2

over the layer's own calibration inputs x and the ORIGINAL layer's routed output y on them (the
same objective and tokens as the closed-form fit), the pruned layer's routing held fixed (the
router is not changed here), y' computed by the experts module's own forward so any family's
expert arithmetic is exact. No end-to-end training: one layer at a time, on tensors the repair
already holds.

Steps are minibatches of `batch` tokens drawn with a fixed seed (deterministic: a fixed step count,
no wall-clock limit), at most `steps` and at most MAX_EPOCHS passes over the tokens; each tensor's step size is `lr` times its root-mean-square value (Adam moves
a coordinate by about the step size), so one setting suits models whose weights differ in scale.
The fit runs in float32 (a half-precision layer is widened for it and narrowed after).
grape.pruning.repair undoes the stage if the layer's error on all its tokens is not lower after it.

Memory: the layer's experts in float32 with their gradients and Adam's two moments (4x the kept
experts' float32 size), and one minibatch's activations.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from grape.pruning.repair_fit import Routing

# chosen on the zoo's validation split (docs/repair.md): Adam steps per layer (at most), tokens
# per step, step size relative to each tensor's RMS value
DEFAULT_STEPS = 200
DEFAULT_BATCH = 1024
DEFAULT_LR = 0.015
# at most this many passes over the layer's tokens: the default 200 steps of 1024 on 128 x 256
# calibration tokens; fewer tokens get fewer steps (little text is not fitted for hundreds of passes)
MAX_EPOCHS = 6.25


def expert_parameters(experts: nn.Module) -> dict[str, nn.Parameter]:
    """Every tensor of the experts module the stage re-fits (its parameters: the kept experts'
    fused projections and biases), by name under the module."""
    return dict(experts.named_parameters())


def fit_experts(experts: nn.Module, x: torch.Tensor, target: torch.Tensor, routing: Routing,
                steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, batch: int = DEFAULT_BATCH,
                seed: int = 0) -> None:
    """Re-fit `experts` (in place) toward `target` on `x` under the fixed `routing`; see the
    module docstring."""
    params = list(expert_parameters(experts).values())
    batch = min(batch, x.shape[0])
    steps = min(steps, math.ceil(MAX_EPOCHS * x.shape[0] / batch)) if x.shape[0] else 0
    if not params or steps <= 0:
        return
    dtype = params[0].dtype
    experts.float()
    x, target = x.float(), target.float()
    energy = float(target.pow(2).sum(-1).mean()) or 1.0
    groups = [{"params": [p], "lr": lr * max(float(p.detach().pow(2).mean().sqrt()), 1e-8)} for p in params]
    optimizer = torch.optim.Adam(groups)
    generator = torch.Generator().manual_seed(seed)
    flags = [p.requires_grad for p in params]
    try:
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            for _ in range(steps):
                rows = torch.randint(0, x.shape[0], (batch,), generator=generator).to(x.device)
                out = experts(x[rows], routing.index[rows], routing.weight[rows].float())
                loss = (out - target[rows]).pow(2).sum(-1).mean() / energy
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
        experts.to(dtype)


__all__ = ["DEFAULT_BATCH", "DEFAULT_LR", "DEFAULT_STEPS", "MAX_EPOCHS", "expert_parameters", "fit_experts"]
