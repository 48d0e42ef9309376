"""`grape inspect PATH`: summarise anything GRAPE writes, and draw a scores file's pictures.

The kind is detected from the content, not the name: a numpy archive holding GRAPE's
``__meta__`` is a scores file; JSON with ``"format": "grape.plan"`` (or ``kept``/``removed``)
is a plan, with ``"format": "grape-eval"`` an evaluation result; a run's ``summary.json`` and a
comparison's ``compare.json`` by their keys; a directory by what it holds (``config.json``: a
checkpoint; ``summary.json``: a run; ``compare.json``: a comparison; ``eval.json``: an
evaluation). Nothing loads model weights or imports torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "summarise a scores file, plan, eval result, run, comparison, recipe or checkpoint"
DESCRIPTION = (
    "Print what PATH holds: a scores file (model identity, calibration settings, per-layer "
    "statistics, similarity kinds, cost curves), a plan (solver, status, objective, bound, gap, "
    "experts kept per layer, budget and objective it was made for), an eval result or folder (NLL "
    "per domain, tasks), a run folder or its summary.json (plans, NLL before and after, files), a "
    "comparison folder or compare.json (every solver's row), a resolved recipe, or a checkpoint "
    "directory (model type, experts per layer, whether it loads in vanilla transformers / vLLM or "
    "needs trust_remote_code, the GRAPE provenance). The kind is detected from the content. "
    "--plot DIR draws a scores file's (or a run folder's) pictures: expert importance per layer, "
    "each layer's similarity matrix, the layer cost curves. Model weights are never loaded."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="scores file (.npz), plan / eval / summary / compare "
                        "JSON, recipe, or a checkpoint, run, comparison or eval directory")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--criterion", default=None,
                        help="importance criterion for the per-layer table and the importance "
                        "picture of a scores file (default: the one recorded at calibration)")
    parser.add_argument("--plot", type=Path, default=None, metavar="DIR",
                        help="also write importance.png, similarity.png and cost_curves.png of the "
                        "scores (a scores file, or a run folder's scores.npz) into DIR")


def run(args: argparse.Namespace) -> int:
    from grape.report.inspect import inspect_path, readable_once, render, scores_path

    # a pipe (`<(cat plan.json)`) is read once, into a temporary file every step below reads
    with readable_once(args.path) as path:
        source = scores_path(path) if args.plot is not None else None  # a wrong kind fails first
        summary = inspect_path(path, args.criterion)
        if summary.get("path") == str(path):
            summary["path"] = str(args.path)
        print(json.dumps(summary, indent=2) if args.json else render(summary))
        if source is not None:
            _plot(source, args.plot, args.criterion)
    return 0


def _plot(source: Path, out: Path, criterion: str | None) -> None:
    from grape.outputs import check_creatable
    from grape.report.scoreplots import missing_pictures, plot_scores
    from solvers.scores import Scores

    check_creatable(out / "importance.png", "--plot")
    scores = Scores.load(source)
    written = plot_scores(scores, out, criterion)
    print(f"wrote {', '.join(str(p) for p in written.values())}")
    for why in missing_pictures(scores):
        print(f"not drawn: {why}")


__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]
