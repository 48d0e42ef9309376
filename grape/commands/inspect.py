"""`grape inspect PATH`: summarise a scores file, a plan, an eval result or a checkpoint directory.

The kind is detected from the content, not the name: a numpy archive holding GRAPE's
``__meta__`` is a scores file; JSON with ``"format": "grape.plan"`` (or ``kept``/``removed``)
is a plan, with ``"format": "grape-eval"`` an evaluation result; a directory with a
``config.json`` is a checkpoint. Nothing loads model weights or imports torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "summarise a scores file, a plan, an eval result or a (pruned) checkpoint directory"
DESCRIPTION = (
    "Print what PATH holds: a scores file (model identity, calibration settings, per-layer "
    "statistics, similarity kinds, cost curves), a plan (solver, status, objective, bound, gap, "
    "experts kept per layer, budget and objective it was made for), an eval result (NLL per "
    "domain, tasks) or a checkpoint directory (model type, experts per layer, whether it loads "
    "in vanilla transformers / vLLM or needs trust_remote_code, the GRAPE provenance). The kind "
    "is detected from the content. Model weights are never loaded."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="scores file (.npz), plan / eval result (.json) or "
                        "checkpoint directory")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--criterion", default=None,
                        help="importance criterion for the per-layer table of a scores file "
                        "(default: the one recorded at calibration)")


def run(args: argparse.Namespace) -> int:
    from grape.inspect import inspect_path, render

    summary = inspect_path(args.path, args.criterion)
    print(json.dumps(summary, indent=2) if args.json else render(summary))
    return 0


__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]
