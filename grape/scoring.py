"""What calibration measures beyond the forward pass, and the Scores it assembles.

* similarity between the experts of a layer: ``cka`` and ``cosine`` from their outputs on the
  layer's token subsample, ``router`` from the router weights (no data);
* the layer cost curve: the routed output's error keeping the n most important experts;
* the ``reconstruction`` criterion: the order in which greedy elimination on the layer's own
  output error (tokens re-routed around each removal) would remove the experts;
* :func:`layer_scores`: one MoE layer's LayerScores from its observation;
* :func:`assemble_scores`: the Scores of a run, with the calibration settings and the model's
  sizes as its checkpoint stores them (grape.modelsizes), so byte budgets and memory caps do not
  depend on the dtype calibration ran in.

Both calibration modes (grape.calibration, grape.sequential) use these; see docs/calibration.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import grape
from grape.adapters.base import MoEAdapter
from solvers.scores import CRITERIA, LayerScores, Scores

if TYPE_CHECKING:  # pragma: no cover
    from grape.calibration import CalibrationConfig
    from grape.runreport import CalibrationReport
    from solvers.sizes import ModelSizes

# rows of one all-experts evaluation call; bounds the transient memory of the subsample pass
_MAX_ROWS_PER_CALL = 1 << 16


# -- similarity -----------------------------------------------------------------------------
def _finish_similarity(sim: torch.Tensor, low: float) -> np.ndarray:
    """Symmetric, finite, clipped to [low, 1], with an exact unit diagonal."""
    sim = torch.nan_to_num(sim.to(torch.float64), nan=0.0, posinf=1.0, neginf=low)
    sim = ((sim + sim.T) / 2).clamp(low, 1.0)
    sim.fill_diagonal_(1.0)
    return sim.cpu().numpy()


def _cosine_rows(rows: torch.Tensor) -> np.ndarray:
    rows = rows.to(torch.float64)
    norms = rows.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 0, rows / norms.clamp_min(1e-300), torch.zeros_like(rows))
    return _finish_similarity(unit @ unit.T, low=-1.0)


def linear_cka(outputs: torch.Tensor) -> np.ndarray:
    """Linear CKA between every pair of experts from their outputs on the same tokens.

    outputs: (E, T, H). With X_e the token-centred (T, H) output of expert e and K_e = X_e X_e^T,
    CKA(i, j) = <K_i, K_j>_F / (||K_i||_F ||K_j||_F), in [0, 1]; an expert with constant output
    has similarity 0 to every other expert."""
    num_experts, tokens, hidden = outputs.shape
    chunk = max(1, (1 << 26) // max(tokens * hidden, 1))  # ~256 MB of fp32 per chunk
    grams = []
    for start in range(0, num_experts, chunk):
        x = outputs[start : start + chunk].to(torch.float32)
        x = x - x.mean(dim=1, keepdim=True)
        grams.append((x @ x.transpose(1, 2)).to(torch.float64).reshape(x.shape[0], -1))
    flat = torch.cat(grams)  # (E, T*T)
    inner = flat @ flat.T
    norm = inner.diagonal().clamp_min(0).sqrt()
    denom = norm[:, None] * norm[None, :]
    cka = torch.where(denom > 0, inner / denom.clamp_min(1e-300), torch.zeros_like(inner))
    return _finish_similarity(cka, low=0.0)


def mean_output_cosine(outputs: torch.Tensor) -> np.ndarray:
    """Cosine similarity of the experts' mean outputs on the shared tokens (HC-SMoE), in [-1, 1]."""
    return _cosine_rows(outputs.to(torch.float32).mean(dim=1))


def router_cosine(adapter: MoEAdapter, layer: int) -> np.ndarray:
    """Data-free: cosine similarity of the router weight rows [E, H], in [-1, 1]."""
    with onloaded([adapter.router(layer)]):
        return _cosine_rows(adapter.router(layer).weight.detach())


# kinds measured from the experts' outputs on the shared subsample
OUTPUT_SIMILARITIES: dict[str, Callable[[torch.Tensor], np.ndarray]] = {
    "cka": linear_cka,
    "cosine": mean_output_cosine,
}
# kinds that need no data
WEIGHT_SIMILARITIES: dict[str, Callable[[MoEAdapter, int], np.ndarray]] = {
    "router": router_cosine,
}
SIMILARITIES = tuple(OUTPUT_SIMILARITIES) + tuple(WEIGHT_SIMILARITIES)


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


@torch.no_grad()
def reconstruction_order(
    adapter: MoEAdapter, layer: int, hidden: torch.Tensor, grams: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy backward elimination on the layer's own output: (order, errors), both (E,).

    Starting from every expert, each step removes the expert whose removal (the tokens routed
    around it with `adapter.route_masked`, as the pruned model routes) least increases the
    block output error mean_x ||y_E(x) - y(x)||^2; order[k] is the k-th expert removed and
    errors[k] the error once order[:k+1] are gone. Unlike a per-expert score (REAP, frequency)
    this sees substitution: an expert whose tokens fall back on a similar one costs little.
    Cost: E^2/2 masked routings of the subsample, O(T k^2) each with the Gram matrices;
    ties go to the lower expert index, so the order is deterministic."""
    num_experts = adapter.num_experts(layer)
    full_index, full_weight = adapter.route(layer, hidden)
    full_index, full_weight = full_index.to(grams.device), full_weight.to(grams.device, torch.float64)

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
        trial = {e: error(removed + [e]) for e in range(num_experts) if e not in removed}
        best = min(trial, key=lambda e: (trial[e], e))
        removed.append(best)
        errors.append(trial[best])
    removed += [e for e in range(num_experts) if e not in removed]
    errors.append(float(_bilinear_errors(full_index, full_weight, grams).mean()))  # nothing left
    return np.array(removed, dtype=np.int64), np.nan_to_num(np.array(errors, dtype=np.float64))


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


def shared_rows(samples: torch.Tensor, count: int) -> torch.Tensor:
    """`count` of the kept rows, evenly spaced (the observer keeps them in call order, so they
    span every batch): the subsample of the similarity and the cost curves."""
    if samples.shape[0] <= count:
        return samples
    index = torch.linspace(0, samples.shape[0] - 1, count).round().long().to(samples.device)
    return samples[index]


@contextlib.contextmanager
def onloaded(modules: list[nn.Module]):
    """Give accelerate-offloaded modules (weights on `meta`, loaded per forward) their real
    weights for reads outside a forward, such as the router fingerprint. No-op otherwise."""
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(align_module_device(module))
        yield


# -- assembling the scores ----------------------------------------------------------------
def layer_scores(
    adapter: MoEAdapter, layer: int, obs, config: CalibrationConfig, tokens: int
) -> LayerScores:
    """One MoE layer's scores from its observation: similarity and cost curve on the subsample
    (the layer's weights must be present)."""
    similarity = {
        kind: WEIGHT_SIMILARITIES[kind](adapter, layer)
        for kind in config.similarity
        if kind in WEIGHT_SIMILARITIES
    }
    curve, stats = None, dict(obs.stats)
    if config.needs_subsample and obs.samples is not None:
        if config.reconstruction and config.subsample > 0:  # on every kept row
            grams = expert_grams(adapter, layer, obs.samples)
            stats["reconstruction"] = reconstruction_importance(
                *reconstruction_order(adapter, layer, obs.samples, grams))
            del grams
        rows = shared_rows(obs.samples, config.subsample)
        outputs = all_expert_outputs(adapter, layer, rows)
        for kind in config.similarity:
            if kind in OUTPUT_SIMILARITIES:
                similarity[kind] = OUTPUT_SIMILARITIES[kind](outputs)
        if config.cost_curves:
            importance = CRITERIA[config.criterion](stats, tokens)
            order = np.argsort(importance, kind="stable")
            curve = cost_curve(adapter, layer, rows, outputs, order)
        del outputs
    return LayerScores(
        layer=layer,
        stats=stats,
        expert_bytes=np.asarray(adapter.expert_bytes(layer), dtype=np.int64),
        output_energy=obs.output_energy,
        similarity=similarity,
        cost_curve=curve,
    )


def merge_layers(parts: list[dict] | None) -> dict[int, LayerScores] | None:
    if parts is None:
        return None
    merged = {}
    for part in parts:
        merged.update(part)
    return dict(sorted(merged.items()))


def assemble_scores(identity, layers: dict[int, LayerScores], tokens: int, provenance: dict,
                    config: CalibrationConfig, dtype, input_ids: torch.Tensor, sampled: dict,
                    report: CalibrationReport,
                    sizes: tuple[ModelSizes, dict[int, np.ndarray]] | None = None) -> Scores:
    """The run's Scores. `sizes` (grape.modelsizes.model_sizes): the checkpoint's sizes, whose
    per-expert bytes replace the in-memory ones the layers were measured with."""
    if sizes is not None:
        layers = {idx: dataclasses.replace(ls, expert_bytes=sizes[1][idx])
                  for idx, ls in layers.items()}
    calibration = {
        **provenance,
        **{k: v for k, v in dataclasses.asdict(config).items() if k != "progress"},
        "similarity": list(config.similarity),
        # rows of the similarity and cost curves; the reconstruction order ran on all kept rows
        "subsample_tokens": {str(layer): min(int(n), config.subsample) for layer, n in sorted(sampled.items())},
        **({"reconstruction_tokens": {str(layer): int(n) for layer, n in sorted(sampled.items())}}
           if config.reconstruction and config.subsample > 0 else {}),
        "cost_curve": "mean squared error of the routed output keeping the n best experts"
        if config.cost_curves
        else None,
        "dtype": str(dtype).replace("torch.", ""),
        # what was really run (pre-packed data may differ from the config's packing settings)
        "samples": int(input_ids.shape[0]),
        "seq_len": int(input_ids.shape[1]),
        "run": report.as_dict(),
    }
    return Scores(
        model=identity,
        layers=layers,
        tokens=tokens,
        calibration=calibration,
        created_by=f"grape {grape.__version__} calibrate",
        sizes=None if sizes is None else sizes[0],
    )
