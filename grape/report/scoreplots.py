"""Pictures of a scores file, what a researcher looks at before choosing a plan:

* importance.png   per MoE layer, each expert's importance relative to the layer's mean
                   (1 = an average expert), in expert order and sorted: dead and dominant experts,
                   and how skewed each layer's routing is;
* similarity.png   each layer's expert similarity matrix (CKA when measured): blocks of
                   near-duplicate experts are what redundancy and coverage exploit;
* cost_curves.png  each layer's measured block-output error against the experts it keeps,
                   relative to the layer's output energy: which layers tolerate deep cuts.

    paths = plot_scores(scores, "plots/")       # {"importance": Path, ...}; absent ones skipped

Drawn on Agg figures (`new_figure`, no pyplot state touched) saved atomically (`save_figure`),
the helpers every GRAPE picture uses (grape.report.tables's too); no torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from solvers._io import atomic_open

PLOT_IMPORTANCE = "importance.png"
PLOT_SIMILARITY = "similarity.png"
PLOT_CURVES = "cost_curves.png"
SIMILARITY_ORDER = ("cka", "cosine", "router")  # the first one measured is drawn


def new_figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas (no pyplot state touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike) -> Path:
    """`fig` written to `path` as a PNG, atomically."""
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png")
    return Path(path)


def plot_scores(scores, out_dir: str | os.PathLike, criterion: str | None = None) -> dict[str, Path]:
    """Every picture the scores support, written into `out_dir`; {what: path}. Similarity and
    cost curves are optional in a scores file: see `missing_pictures` for what was skipped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    criterion = criterion or scores.calibration.get("criterion") or "reap_mass"
    paths = {"importance": plot_importance(scores, criterion, out / PLOT_IMPORTANCE)}
    kind = similarity_kind(scores)
    if kind is not None:
        paths["similarity"] = plot_similarity(scores, kind, out / PLOT_SIMILARITY)
    if any(ls.cost_curve is not None for ls in scores.layers.values()):
        paths["cost_curves"] = plot_cost_curves(scores, out / PLOT_CURVES)
    return paths


def missing_pictures(scores) -> list[str]:
    """Why a picture cannot be drawn from these scores (one phrase each)."""
    out = []
    if similarity_kind(scores) is None:
        out.append("no similarity matrices (calibrate with --similarity, or synth without "
                   "--no-similarity)")
    if all(ls.cost_curve is None for ls in scores.layers.values()):
        out.append("no cost curves (calibrate without --no-cost-curves)")
    return out


def similarity_kind(scores) -> str | None:
    kinds = {k for ls in scores.layers.values() for k in ls.similarity}
    ordered = [k for k in SIMILARITY_ORDER if k in kinds] + sorted(kinds - set(SIMILARITY_ORDER))
    return ordered[0] if ordered else None


def _relative_importance(values: np.ndarray) -> np.ndarray:
    """Importance over the layer's mean (1 = average expert); NaN for experts never used, so a
    log colour scale shows them as 'none' rather than failing on zero."""
    mean = float(values.mean()) if values.size else 0.0
    rel = values / mean if mean > 0 else np.zeros_like(values, dtype=float)
    return np.where(rel > 0, rel, np.nan)


def plot_importance(scores, criterion: str, path: str | os.PathLike) -> Path:
    from matplotlib.colors import LogNorm

    importance = scores.importance(criterion)
    layers = sorted(importance)
    width = max(len(importance[layer]) for layer in layers)
    grid = np.full((len(layers), width), np.nan)
    for row, layer in enumerate(layers):
        rel = _relative_importance(np.asarray(importance[layer], dtype=float))
        grid[row, :rel.size] = rel
    ranked = -np.sort(-np.nan_to_num(grid, nan=0.0), axis=1)
    ranked[ranked == 0] = np.nan
    finite = grid[np.isfinite(grid)]
    top = float(finite.max()) if finite.size else 1.0
    low = max(float(finite.min()) if finite.size else 0.1, top * 1e-3)  # 3 decades at most
    norm = LogNorm(vmin=min(low, 0.5), vmax=max(top, 2.0))
    fig = new_figure(min(18.0, 4.0 + 0.16 * width), min(14.0, max(3.6, 2.0 + 0.22 * len(layers))))
    axes = fig.subplots(1, 2, sharey=True)
    cmap = _cmap("viridis")
    for ax, data, title in ((axes[0], grid, "in expert order"), (axes[1], ranked, "sorted, largest first")):
        image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("expert" if data is grid else "rank within the layer")
    axes[0].set_yticks(range(len(layers)), _tick_labels(layers))
    axes[0].set_ylabel("MoE layer (decoder index)")
    fig.colorbar(image, ax=axes, label="importance / layer mean")
    fig.suptitle(f"Expert importance per layer ({criterion}; 1 = the layer's mean, log scale; "
                 "grey = never routed)", fontsize="medium")
    return save_figure(fig, path)


def plot_similarity(scores, kind: str, path: str | os.PathLike) -> Path:
    layers = [layer for layer in sorted(scores.layers) if kind in scores.layers[layer].similarity]
    cols = math.ceil(math.sqrt(len(layers)))
    rows = math.ceil(len(layers) / cols)
    fig = new_figure(2.0 * cols + 1.2, 2.0 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    low = min(0.0, min(float(scores.layers[layer].similarity[kind].min()) for layer in layers))
    image = None
    for ax, layer in zip(axes, layers):
        sim = scores.layers[layer].similarity[kind]
        # large matrices are shown smaller than their size: average pixels rather than alias
        image = ax.imshow(sim, vmin=low, vmax=1.0, cmap=_cmap("magma"),
                          interpolation="nearest" if len(sim) <= 128 else "antialiased")
        ax.set_title(f"layer {layer}", fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(layers):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.tolist(), label=f"{kind} similarity", shrink=0.8)
    fig.suptitle(f"Expert similarity per layer ({kind}; experts in index order)", fontsize="medium")
    return save_figure(fig, path)


def plot_cost_curves(scores, path: str | os.PathLike) -> Path:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    layers = [layer for layer in sorted(scores.layers) if scores.layers[layer].cost_curve is not None]
    fig = new_figure(7.5, 4.2)
    ax = fig.add_subplot()
    colours = ScalarMappable(Normalize(min(layers), max(max(layers), min(layers) + 1)), _cmap("viridis"))
    for layer in layers:
        ls = scores.layers[layer]
        curve = np.asarray(ls.cost_curve, dtype=float)
        scale = ls.output_energy if ls.output_energy > 0 else max(float(curve.max()), 1e-30)
        kept = np.arange(curve.size) / max(curve.size - 1, 1)
        ax.plot(kept, curve / scale, color=colours.to_rgba(layer), linewidth=1.2)
    ax.set_xlabel("fraction of the layer's experts kept (most important first)")
    ax.set_ylabel("block-output error / output energy")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.colorbar(colours, ax=ax, label="MoE layer (decoder index)")
    ax.set_title("Measured cost of keeping fewer experts, per layer", fontsize="medium")
    return save_figure(fig, path)


def _tick_labels(layers: list[int]) -> list[str]:
    step = max(1, len(layers) // 24)  # at most ~24 labels, whatever the depth
    return [str(layer) if i % step == 0 else "" for i, layer in enumerate(layers)]


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="0.85")  # never-routed experts and padding: light grey


__all__ = ["PLOT_CURVES", "PLOT_IMPORTANCE", "PLOT_SIMILARITY", "missing_pictures", "new_figure",
           "plot_scores", "save_figure", "similarity_kind"]
