"""`grape calibrate`: run a model over calibration text and write its scores file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from grape.models.files import check_model_dir
from grape.outputs import SCORES_FILE, FileOutput

HELP = "measure per-expert statistics, expert similarity and layer cost curves; write a scores file"
DESCRIPTION = (
    "Run a MoE model over calibration text (text files, JSONL, or directories of them), packed "
    "into fixed-length sequences, and write the scores file the solvers read: per-expert routing "
    "statistics from the model's real routing, expert similarity matrices and per-layer cost "
    "curves measured on a token subsample, and the model's identity. See docs/calibration.md."
)

OUTPUT = FileOutput(SCORES_FILE, inputs=("model", "tokenizer", "data"), what="scores file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from grape.calibration.stage import add_calibration_arguments

    parser.add_argument(
        "--model", required=True, type=Path, help="checkpoint directory (config.json + weights)"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer directory; when not given, the model directory",
    )
    parser.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="PATH",
        help="calibration text: .txt/.md/.rst files, .jsonl files, or directories of them",
    )
    parser.add_argument("--out", required=True, type=Path, help="scores file to write (.npz)")
    # every CalibrationConfig field, the runtime ones (--mode, --device-map, ...) included
    add_calibration_arguments(parser)


def config_from_args(args: argparse.Namespace):
    from grape.calibration.stage import calibration_config_from_args

    return calibration_config_from_args(args)


def run(args: argparse.Namespace) -> int:
    from grape.calibration.stage import calibrate_checkpoint
    from grape.models.loading import load_tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this process reads local files only
    check_model_dir(args.model)  # before anything else: a wrong path fails in a second
    config = config_from_args(args)
    # the tokenizer is loaded on first use inside the stage (rank 0 packs the text)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer is not None else None
    try:
        scores = calibrate_checkpoint(args.model, [str(p) for p in args.data], config,
                                      tokenizer=tokenizer, out=args.out)
    finally:
        # the verb is the whole job of a torchrun rank: it leaves the process group when done,
        # even one its caller opened (the library stage closes only what it opened)
        from grape.calibration.distributed import shutdown

        shutdown()
    if scores is not None:  # rank 0 of a torchrun job, or a plain process
        print(summary(scores))
        print(f"grape calibrate: {run_line(scores.calibration['run'])}")
        print(f"wrote {args.out}")
    return 0


def run_line(run: dict) -> str:
    """The calibration's mode, time and memory in one line (runreport.CalibrationReport.line)."""
    from grape.calibration.runreport import CalibrationReport

    fields = {k: v for k, v in run.items() if k != "tokens_per_second"}
    return CalibrationReport(**fields).line()


def summary(scores) -> str:
    """A short per-layer table: experts, output energy, and the spread of the chosen criterion."""
    criterion = scores.calibration.get("criterion", "reap_mass")
    importance = scores.importance(criterion)
    lines = [
        f"{scores.model.model_type}: {len(scores.layers)} MoE layers, {scores.tokens} tokens, "
        f"identity {scores.model.fingerprint}",
        f"| layer | experts | output energy | {criterion} min | {criterion} max | never routed |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for layer, ls in sorted(scores.layers.items()):
        values = importance[layer]
        unused = int((ls.stats["count"] == 0).sum())
        lines.append(
            f"| {layer} | {ls.num_experts} | {ls.output_energy:.4g} | {values.min():.4g} | "
            f"{values.max():.4g} | {unused} |"
        )
    return "\n".join(lines)


__all__ = [
    "HELP",
    "DESCRIPTION",
    "add_arguments",
    "run",
    "config_from_args",
    "run_line",
    "summary",
]
