"""`grape calibrate`: run a model over calibration text and write its scores file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from grape.errors import DataError
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
    from grape.calibration import CalibrationConfig
    from grape.flags import add_config_arguments

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
    add_config_arguments(parser, CalibrationConfig)  # every CalibrationConfig field (grape/flags.py)
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
    _add_scale_arguments(parser)


def _add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the mode, the hidden states and the checkpoints (docs/calibration.md section 9);
    none changes the scores."""
    parser.add_argument("--mode", default="auto", choices=("auto", "whole", "sequential"),
                        help="'whole': the model on its devices; 'sequential': one decoder layer "
                        "at a time on one device (any size of model); 'auto': whole when the "
                        "model fits the devices (or host memory), else sequential")
    parser.add_argument("--sequential", action="store_true", help="same as --mode sequential")
    parser.add_argument("--hidden-states", default="auto",
                        choices=("auto", "device", "cpu", "disk"),
                        help="sequential mode: where the calibration set's hidden states live "
                        "between layers; 'auto': the device when they fit, else host memory, "
                        "else a memory-mapped file in OUT.partial/")
    parser.add_argument("--checkpoint-every", type=int, default=32, metavar="N",
                        help="save resumable progress to OUT.partial/ every N batches "
                        "(whole-model mode; sequential mode saves after every layer); rerunning "
                        "the same command continues from it; 0: no checkpoints")


def config_from_args(args: argparse.Namespace):
    from grape.calibration import CalibrationConfig
    from grape.flags import config_from_args as build

    return build(CalibrationConfig, args)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only
    from grape.calibration import CalibrationConfig
    from grape.distributed import init_from_env, launched_size, shutdown
    from grape.loading import device_map
    from grape.placement import uses_cuda

    # everything that needs no weights first: bad settings fail in a second
    model_config = check_model_dir(args.model)
    args.seq_len = resolve_seq_len(args.seq_len, CalibrationConfig().seq_len, model_config,
                                   who="grape calibrate")
    config = config_from_args(args)
    config.validate()
    if args.checkpoint_every < 0:
        raise DataError(f"--checkpoint-every must be >= 0 batches, got {args.checkpoint_every}")
    if args.sequential:
        if args.mode == "whole":
            raise DataError("--sequential and --mode whole contradict each other; pass one")
        args.mode = "sequential"
    placement = device_map(args.device_map, args.offload_folder)
    launched_size()  # a malformed WORLD_SIZE fails here
    world = init_from_env(use_cuda=uses_cuda(placement))
    try:
        return _calibrate(args, config, placement, world)
    finally:
        shutdown()


def _calibrate(args, config, placement, world) -> int:
    from grape.data import load_calibration_data
    from grape.distributed import barrier, from_main
    from grape.loading import load_tokenizer
    from grape.placement import sequential_device
    from grape.resume import discard, partial_dir

    choice = _choose(args, placement, world)
    # the one device of sequential mode is checked before any text is read
    device = sequential_device(placement, world) if choice.mode == "sequential" else None
    config.progress = config.progress and world.main
    if world.main:
        print(f"grape calibrate: {choice.mode} mode ({choice.reason})")
    # rank 0 reads and packs the text; every rank gets the same tokens (or the same error)
    data = from_main(lambda: load_calibration_data(
        [str(p) for p in args.data], load_tokenizer(args.tokenizer or args.model),
        seq_len=config.seq_len, samples=config.samples, seed=config.seed,
        text_field=config.text_field, progress=config.progress), world)
    checkpoint = partial_dir(args.out) if args.checkpoint_every > 0 else None
    scores = _measure(args, config, placement, world, choice, device, data, checkpoint)
    if world.main:
        scores.calibration["model_path"] = str(args.model.resolve())
        scores.calibration["run"]["reason"] = choice.reason
        scores.save(args.out)
        if checkpoint is not None:
            discard(checkpoint)
        print(summary(scores))
        print(f"grape calibrate: {run_line(scores.calibration['run'])}")
        print(f"wrote {args.out}")
    barrier(world)
    return 0


def _choose(args, placement, world):
    """The mode (grape.placement.ModeChoice): asked for, or the size check on the meta-device
    skeleton (no weights read)."""
    import torch
    from transformers import AutoConfig

    from grape.layerwise import build_skeleton, model_bytes
    from grape.modelfiles import read_config
    from grape.placement import choose_mode, uses_cuda, whole_capacity
    from grape.quantized import describe
    from grape.sequential import resolve_dtype

    if args.mode != "auto":
        return choose_mode(args.mode, 0, 0, "", None)
    device = torch.device("cuda" if uses_cuda(placement) else "cpu")
    config = AutoConfig.from_pretrained(args.model, trust_remote_code=False)  # never prompt
    dtype = resolve_dtype(args.dtype, device, config)
    needed = model_bytes(build_skeleton(args.model, dtype), dtype)
    capacity, where = whole_capacity(placement, world)
    return choose_mode("auto", needed, capacity, where, describe(read_config(args.model)))


def _measure(args, config, placement, world, choice, device, data, checkpoint):
    from grape.calibration import calibrate
    from grape.loading import load_model
    from grape.placement import whole_placement
    from grape.sequential import calibrate_sequential

    if choice.mode == "sequential":
        return calibrate_sequential(args.model, data, config,
                                    device=device, dtype=args.dtype,
                                    checkpoint=checkpoint, hidden_states=args.hidden_states,
                                    reason=choice.reason)
    model = load_model(args.model, whole_placement(placement, world), args.dtype,
                       offload_folder=args.offload_folder)
    return calibrate(model, data, config, checkpoint=checkpoint,
                     checkpoint_every=args.checkpoint_every)


def run_line(run: dict) -> str:
    """The calibration's mode, time and memory in one line (runreport.CalibrationReport.line)."""
    from grape.runreport import CalibrationReport

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
