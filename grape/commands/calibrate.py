"""`grape calibrate`: run a model over calibration text and write its scores file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from grape.modelfiles import check_model_dir, resolve_seq_len
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
    from grape.calibrate import SIMILARITIES, CalibrationConfig
    from solvers.scores import CRITERIA, NORMALIZATIONS

    d = CalibrationConfig()
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
    parser.add_argument("--text-field", default=d.text_field, help="JSONL field holding the text")
    parser.add_argument("--out", required=True, type=Path, help="scores file to write (.npz)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"tokens per packed sequence; unset: {d.seq_len}, capped at the model's "
                        "context (a longer explicit value is an error)")
    parser.add_argument("--samples", type=int, default=d.samples, help="packed sequences")
    parser.add_argument("--seed", type=int, default=d.seed, help="shuffle and subsample seed")
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="sequences per forward pass"
    )
    parser.add_argument(
        "--similarity",
        default=",".join(d.similarity),
        help=f"comma-separated similarity kinds from {', '.join(SIMILARITIES)}; 'none' for none",
    )
    parser.add_argument(
        "--subsample",
        type=int,
        default=d.subsample,
        help="tokens per MoE layer on which every expert is evaluated (similarity, cost curves)",
    )
    parser.add_argument("--no-cost-curves", action="store_true", help="skip the layer cost curves")
    parser.add_argument(
        "--criterion",
        default=d.criterion,
        choices=sorted(CRITERIA),
        help="expert order for the cost curves; recorded for the solver",
    )
    parser.add_argument(
        "--normalize",
        default=d.normalize,
        choices=sorted(NORMALIZATIONS),
        help="cross-layer normalisation recorded for the solver (docs/calibration.md)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="'auto': float32 on CPU, the checkpoint's dtype on GPU",
    )
    parser.add_argument(
        "--device-map",
        default="auto",
        help="accelerate device_map: 'auto' (all GPUs, else CPU), 'balanced', "
        "'cpu', 'cuda:0', or a JSON object mapping module names to devices",
    )
    parser.add_argument("--offload-folder", default=None, metavar="DIR",
                        help="folder for weights a --device-map puts on 'disk'")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def config_from_args(args: argparse.Namespace):
    from grape.calibrate import CalibrationConfig

    kinds = tuple(
        k.strip() for k in args.similarity.split(",") if k.strip() and k.strip() != "none"
    )
    return CalibrationConfig(
        seq_len=args.seq_len if args.seq_len is not None else CalibrationConfig().seq_len,
        samples=args.samples,
        seed=args.seed,
        text_field=args.text_field,
        batch_size=args.batch_size,
        similarity=kinds,
        subsample=args.subsample,
        cost_curves=not args.no_cost_curves,
        criterion=args.criterion,
        normalize=args.normalize,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only
    from grape.calibrate import CalibrationConfig, calibrate
    from grape.data import load_calibration_data
    from grape.loading import device_map, load_model, load_tokenizer

    # everything that needs no weights first: bad settings fail in a second
    model_config = check_model_dir(args.model)
    args.seq_len = resolve_seq_len(args.seq_len, CalibrationConfig().seq_len, model_config,
                                   who="grape calibrate")
    config = config_from_args(args)
    config.validate()
    device_map(args.device_map, args.offload_folder)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    data = load_calibration_data(
        [str(p) for p in args.data],
        tokenizer,
        seq_len=config.seq_len,
        samples=config.samples,
        seed=config.seed,
        text_field=config.text_field,
        progress=config.progress,
    )
    model = load_model(args.model, args.device_map, args.dtype, offload_folder=args.offload_folder)
    scores = calibrate(model, data, config)
    scores.calibration["model_path"] = str(args.model.resolve())
    scores.save(args.out)
    print(summary(scores))
    print(f"wrote {args.out}")
    return 0


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
    "summary",
]
