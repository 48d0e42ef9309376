"""The calibration stage: a checkpoint + calibration text -> a scores file.

    scores = calibrate_checkpoint("path/to/moe", ["corpus/"], CalibrationConfig(mode="sequential"),
                                  out=Path("scores.npz"))

`grape calibrate`, `grape run` (grape.pipeline) and the Python API (`grape.calibrate` given a
model directory) all call :func:`calibrate_checkpoint`, so the runtime choices of
:class:`~grape.calibration.calibrate.CalibrationConfig` hold whichever way the stage is called: the mode
(whole / sequential / auto, grape.models.placement), torchrun (each rank its share of the batches,
grape.calibration.distributed), resuming from ``OUT.partial/`` (grape.calibration.resume), the device map, and one policy
for a sequence length past the model's context (capped with a notice).
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from grape.calibration.calibrate import CalibrationConfig
from grape.errors import DataError


# -- flags (one generator: grape.flags) ---------------------------------------------------------
def add_calibration_arguments(parser, skip: tuple[str, ...] = (), rename: dict[str, str] | None = None,
                              unset: tuple[str, ...] = ()) -> None:
    """Every CalibrationConfig field as a flag, plus --sequential (short for --mode sequential)."""
    from grape.flags import add_config_arguments

    add_config_arguments(parser, CalibrationConfig, skip=skip, rename=rename, unset=unset)
    parser.add_argument("--sequential", action="store_true", help="same as --mode sequential")


def calibration_config_from_args(args: argparse.Namespace, rename: dict[str, str] | None = None,
                                 **overrides: Any) -> CalibrationConfig:
    from grape.flags import config_from_args

    if getattr(args, "sequential", False):
        if getattr(args, "mode", "auto") == "whole":
            raise DataError("--sequential and --mode whole contradict each other; pass one")
        overrides.setdefault("mode", "sequential")
    return config_from_args(CalibrationConfig, args, rename=rename, **overrides)


# -- one policy for every caller ----------------------------------------------------------------
def fit_seq_len(config: CalibrationConfig, model_config: dict, who: str = "grape calibrate") -> CalibrationConfig:
    """`config` with its sequence length capped at the model's context, with a notice (the one
    policy of grape.models.files.cap_seq_len)."""
    from grape.models.files import cap_seq_len

    seq_len = cap_seq_len(config.seq_len, model_config, "seq_len", who)
    return config if seq_len == config.seq_len else replace(config, seq_len=seq_len)


@contextmanager
def joined_world(placement):
    """The torchrun job the environment describes (a plain process: World()); a process group
    this stage opened is closed when it ends, one the caller opened is left open."""
    from grape.calibration.distributed import current_world, init_from_env, launched_size, shutdown
    from grape.models.placement import uses_cuda

    launched_size()  # a malformed WORLD_SIZE fails here
    opened = not current_world().distributed
    world = init_from_env(use_cuda=uses_cuda(placement))
    try:
        yield world
    finally:
        if opened:
            shutdown()


def choose(model_dir, config: CalibrationConfig, placement, world):
    """The mode (grape.models.placement.ModeChoice): the one asked for, or the size check on the
    meta-device skeleton (no weights read)."""
    import torch
    from transformers import AutoConfig

    from grape.models.layerwise import build_skeleton, model_bytes
    from grape.models.files import read_config
    from grape.models.placement import choose_mode, uses_cuda, whole_capacity
    from grape.models.quantized import describe
    from grape.calibration.sequential import resolve_dtype

    if config.mode != "auto":
        return choose_mode(config.mode, 0, 0, "", None)
    device = torch.device("cuda" if uses_cuda(placement) else "cpu")
    model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)  # never prompt
    dtype = resolve_dtype(config.dtype, device, model_config)
    needed = model_bytes(build_skeleton(model_dir, dtype), dtype)
    capacity, where = whole_capacity(placement, world)
    return choose_mode("auto", needed, capacity, where, describe(read_config(model_dir)))


def resolve_mode(model_dir, config: CalibrationConfig):
    """The ModeChoice calibrate_checkpoint would make (grape run loads the model for its later
    stages first when the choice is whole, and hands it over)."""
    from grape.models.loading import device_map

    placement = device_map(config.device_map, config.offload_folder)
    with joined_world(placement) as world:
        return choose(model_dir, config, placement, world)


# -- the stage ------------------------------------------------------------------------------------
def calibrate_checkpoint(model_dir: str | os.PathLike, data, config: CalibrationConfig | None = None, *,
                         tokenizer: Any = None, out: str | os.PathLike | None = None, model=None,
                         say=print):
    """Calibrate the checkpoint in `model_dir` on `data` and return its Scores (None on the
    ranks of a torchrun job other than 0).

    `data`: raw sources (files, directories, a list of strings), packed here into
    `config.samples` sequences with `tokenizer` (default: the model's), or pre-packed
    CalibrationData / input ids. `out`: the scores file to write; its ``OUT.partial/`` folder
    holds resumable progress (every `config.checkpoint_every` batches) until the file is written.
    `model`: the checkpoint already loaded (whole mode on it; grape run reuses it later)."""
    from grape.models.loading import device_map
    from grape.models.files import check_model_dir

    config = config or CalibrationConfig()
    model_dir = Path(model_dir)
    # everything that needs no weights first: bad settings fail in a second
    config = fit_seq_len(config, check_model_dir(model_dir))
    config.validate()
    placement = device_map(config.device_map, config.offload_folder)
    with joined_world(placement) as world:
        return _calibrate(model_dir, data, config, placement, world, tokenizer, out, model, say)


def _calibrate(model_dir: Path, data, config, placement, world, tokenizer, out, model, say):
    from grape.calibration.distributed import barrier
    from grape.models.placement import ModeChoice, sequential_device
    from grape.calibration.resume import discard, partial_dir

    if model is not None and config.mode != "sequential":
        choice = ModeChoice("whole", "the model was given loaded")
    else:
        choice = choose(model_dir, config, placement, world)
    # the one device of sequential mode is checked before any text is read
    device = sequential_device(placement, world) if choice.mode == "sequential" else None
    config = replace(config, progress=config.progress and world.main)
    if world.main:
        say(f"grape calibrate: {choice.mode} mode ({choice.reason})")
    data = _packed(model_dir, data, config, tokenizer, world)
    checkpoint = partial_dir(Path(out)) if out is not None and config.checkpoint_every > 0 else None
    scores = _measure(model_dir, config, placement, world, choice, device, data, checkpoint, model)
    if world.main:
        scores.calibration["model_path"] = str(model_dir.resolve())
        scores.calibration["run"]["reason"] = choice.reason
        if out is not None:
            scores.save(Path(out))
            if checkpoint is not None:
                discard(checkpoint)
    barrier(world)
    return scores if world.main else None


def _packed(model_dir: Path, data, config: CalibrationConfig, tokenizer, world):
    """Pre-packed data as it is; raw sources packed on rank 0, every rank getting the same
    tokens (or the same error)."""
    from grape.calibration.calibrate import is_tokenized
    from grape.data.text import load_calibration_data
    from grape.calibration.distributed import from_main
    from grape.models.loading import load_tokenizer

    if is_tokenized(data):
        return data
    sources = [str(p) for p in data] if isinstance(data, (list, tuple)) else data
    if isinstance(sources, (str, os.PathLike)):
        sources = [str(sources)]
    return from_main(lambda: load_calibration_data(
        sources, tokenizer or load_tokenizer(model_dir), seq_len=config.seq_len,
        samples=config.samples, seed=config.seed, text_field=config.text_field,
        progress=config.progress), world)


def _measure(model_dir, config, placement, world, choice, device, data, checkpoint, model):
    from grape.calibration.calibrate import calibrate
    from grape.models.loading import load_model
    from grape.models.placement import whole_placement
    from grape.calibration.sequential import calibrate_sequential

    if choice.mode == "sequential":
        return calibrate_sequential(model_dir, data, config, device=device, dtype=config.dtype,
                                    checkpoint=checkpoint, hidden_states=config.hidden_states,
                                    reason=choice.reason)
    if model is None:
        model = load_model(model_dir, whole_placement(placement, world), config.dtype,
                           offload_folder=config.offload_folder)
    return calibrate(model, data, config, checkpoint=checkpoint,
                     checkpoint_every=config.checkpoint_every)


__all__ = ["add_calibration_arguments", "calibrate_checkpoint", "calibration_config_from_args",
           "choose", "fit_seq_len", "joined_world", "resolve_mode"]
