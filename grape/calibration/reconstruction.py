"""The ``reconstruction`` criterion: the greedy order in which removing experts least increases a
layer's own output error (the measurements it uses are in grape.calibration.layer_outputs).

* :func:`reconstruction_order`: greedy backward elimination on the layer's own output error,
  the tokens re-routed around each removal as the pruned model routes them, evaluated
  incrementally (a removal re-evaluates only the rows it can change, see
  ``MoEAdapter.removal_effect``); :func:`full_reconstruction_order` is the plain evaluation it
  falls back on, and the reference the tests compare it with (the incremental engine:
  grape.calibration.reconstruction_greedy);
* :func:`reconstruction_importance`: the criterion's per-expert values from that order.

grape.calibration.scoring assembles these into a layer's scores; see docs/calibration.md.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from grape.calibration.layer_outputs import _bilinear_errors, expert_grams
from grape.calibration.reconstruction_greedy import _Greedy, _pick
from grape.models.adapters.base import MoEAdapter


class _ProjectionMemo(TorchFunctionMode):
    """While active, a linear projection of the same input memory by the same weight returns
    the first result: every trial of the greedy routes the same rows, so the router's logits
    are computed once per layer instead of E^2/2 times (the mask of `route_masked` is applied
    on top of the returned logits, out of place). The first input of each key is held, so its
    memory cannot be reused by another tensor while the memo lives."""

    def __init__(self):
        super().__init__()
        self.memo: dict[tuple, tuple] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not nn.functional.linear or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        x = args[0]
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype,
               *(id(a) for a in args[1:]), *sorted((k, id(v)) for k, v in kwargs.items()))
        if key not in self.memo:
            self.memo[key] = (args, func(*args, **kwargs))
        return self.memo[key][1]


# -- the reconstruction order ------------------------------------------------------------------
@torch.no_grad()
def full_reconstruction_order(adapter: MoEAdapter, layer: int, hidden: torch.Tensor,
                              grams: torch.Tensor, exact_ties: bool = False
                              ) -> tuple[np.ndarray, np.ndarray]:
    """reconstruction_order the slow way: every step re-routes every row for every remaining
    expert (E^2/2 masked routings of the subsample) and evaluates each with the per-token Gram
    matrices (T, E, E) of `expert_grams`. The fallback for families without a RemovalEffect,
    and the reference the fast path is tested against. `exact_ties`: the smallest error wins
    and only bit-equal errors go to the lower index (the rule before ties had a tolerance)."""
    num_experts = adapter.num_experts(layer)
    full_index, full_weight = adapter.route(layer, hidden)
    full_index, full_weight = full_index.to(grams.device), full_weight.to(grams.device, torch.float64)
    energy = float(_bilinear_errors(full_index, full_weight, grams).mean())
    memo = _ProjectionMemo()

    def error(removed: list[int]) -> float:
        with memo:
            index, weight = adapter.route_masked(layer, hidden, removed)
        both = torch.cat([full_index, index.to(grams.device)], dim=1)
        coeff = torch.cat([full_weight, -weight.to(grams.device, torch.float64)], dim=1)
        return float(_bilinear_errors(both, coeff, grams).mean())

    removed: list[int] = []
    errors = []
    for _ in range(num_experts - 1):
        trial = torch.full((num_experts,), float("inf"), dtype=torch.float64)
        for e in range(num_experts):
            if e not in removed:
                trial[e] = error(removed + [e])
        if exact_ties:
            left = (e for e in range(num_experts) if e not in removed)
            best = min(left, key=lambda e: (trial[e], e))
        else:
            allowed = torch.ones(num_experts, dtype=torch.bool)
            allowed[removed] = False
            best = _pick(trial, energy, allowed)
        removed.append(int(best))
        errors.append(float(trial[best]))
    removed += [e for e in range(num_experts) if e not in removed]
    errors.append(energy)  # nothing left
    return np.array(removed, dtype=np.int64), np.nan_to_num(np.array(errors, dtype=np.float64))


@torch.no_grad()
def reconstruction_order(adapter: MoEAdapter, layer: int, hidden: torch.Tensor
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Greedy backward elimination on the layer's own output: (order, errors), both (E,).

    Starting from every expert, each step removes the expert whose removal (the tokens routed
    around it with `adapter.route_masked`, as the pruned model routes) least increases the
    block output error mean_x ||y_E(x) - y(x)||^2; order[k] is the k-th expert removed and
    errors[k] the error once order[:k+1] are gone. Unlike a per-expert score (REAP, frequency)
    this sees substitution: an expert whose tokens fall back on a similar one costs little.
    Ties (errors equal up to float32 rounding, see grape.calibration.reconstruction_greedy._TIE) go to the lower expert index.

    A removal re-routes only some tokens (the adapter's RemovalEffect says which; for softmax
    routers without renormalisation the others' weights scale by one number per token), so
    each step re-evaluates only the tokens the previous removal changed, from the experts'
    outputs on the (token, expert) pairs routing can reach (_Greedy). Families without a
    RemovalEffect take full_reconstruction_order, E^2/2 masked routings of every row."""
    effect = adapter.removal_effect(layer)
    logits, index, weight = adapter.router_logits(layer, hidden)
    if effect is None or logits is None or hidden.shape[0] == 0:
        grams = expert_grams(adapter, layer, hidden)
        return full_reconstruction_order(adapter, layer, hidden, grams)
    return _Greedy(adapter, layer, hidden, effect, logits, index, weight).run()


def reconstruction_importance(order: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """The `reconstruction` criterion: each expert's importance is the block output error once
    it and every expert removed before it are gone (made non-decreasing along the order, with a
    tiny step so the greedy order is exactly the criterion's order). Comparable across layers
    in units of output energy, like the cost curves; it orders experts, its sum is not a cost."""
    level = np.maximum.accumulate(np.maximum(np.asarray(errors, dtype=np.float64), 0.0))
    scale = max(float(level[-1]), 1e-30)
    value = level + scale * 1e-9 * np.arange(1, len(order) + 1)
    out = np.zeros(len(order), dtype=np.float64)
    out[np.asarray(order)] = value
    return out
