"""What calibration measures beyond the forward pass, and the Scores it assembles.

* similarity between the experts of a layer: ``cka`` and ``cosine`` from their outputs on the
  layer's token subsample, ``router`` from the router weights (no data);
* the layer cost curve: the routed output's error keeping the n most important experts;
* the ``reconstruction`` criterion: the order in which greedy elimination on the layer's own
  output error (tokens re-routed around each removal) would remove the experts;
* :func:`layer_scores`: one MoE layer's LayerScores from its observation;
* :func:`assemble_scores`: the Scores of a run, with the calibration settings and the model's
  sizes as its checkpoint stores them (grape.models.sizes), so byte budgets and memory caps do not
  depend on the dtype calibration ran in.

Both calibration modes (grape.calibration.calibrate, grape.calibration.sequential) use these; see docs/calibration.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

import grape
from grape.models.adapters.base import MoEAdapter
from grape.calibration.layer_outputs import (  # noqa: F401 - tests import the gram helpers from here
    all_expert_outputs,
    cost_curve,
    expert_grams,
    token_grams,
)
from grape.calibration.reconstruction import (  # noqa: F401 - full_reconstruction_order: tests import it here
    full_reconstruction_order,
    reconstruction_importance,
    reconstruction_order,
)
from solvers.scores import CRITERIA, LayerScores, Scores

if TYPE_CHECKING:  # pragma: no cover
    from grape.calibration.calibrate import CalibrationConfig
    from grape.calibration.runreport import CalibrationReport
    from solvers.sizes import ModelSizes

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
            stats["reconstruction"] = reconstruction_importance(
                *reconstruction_order(adapter, layer, obs.samples))
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
    """The run's Scores. `sizes` (grape.models.sizes.model_sizes): the checkpoint's sizes, whose
    per-expert bytes replace the in-memory ones the layers were measured with."""
    if sizes is not None:
        layers = {idx: dataclasses.replace(ls, expert_bytes=sizes[1][idx])
                  for idx, ls in layers.items()}
    calibration = {
        **provenance,
        **config.measurement_settings(),  # not where or how the pass ran (no machine paths)
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
