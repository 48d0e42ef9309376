"""The embedded test bed: a small trained MoE model and its held-out text, shipped as package data.

`grape run` without `--model` prunes this model (Qwen3-MoE architecture, 32 experts per layer,
trained for this project by the zoo scripts) with its committed calibration and held-out text, so a
fresh install can try the whole pipeline offline. This module is the one place that knows where
those files are; nothing in the product looks for them anywhere else.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from grape.errors import DataError

MODEL_NAME = "qwen3moe-32x4"  # its name in the project's model zoo
DOMAINS = ("prose", "python", "c")
SPLITS = ("test", "validation")


def _assets() -> Path:
    return Path(str(resources.files("grape").joinpath("assets")))


def model_dir() -> Path:
    """The embedded model's checkpoint directory (config, weights, tokenizer)."""
    path = _assets() / "testbed-model"
    if not (path / "config.json").is_file():
        raise DataError(f"the embedded test-bed model is not installed ({path} is missing); "
                        "reinstall GRAPE with its package data, or pass --model DIR")
    return path


def calibration_file() -> Path:
    """The test bed's calibration text (JSONL), disjoint from its held-out splits."""
    path = _assets() / "heldout" / "calibration.jsonl"
    if not path.is_file():
        raise DataError(f"the test bed's calibration text is not installed ({path} is missing); "
                        "pass --data PATH")
    return path


def heldout_files(split: str = "test") -> list[Path]:
    """The test bed's held-out files of one split, one JSONL per domain."""
    if split not in SPLITS:
        raise DataError(f"held-out split {split!r} is not one of {', '.join(SPLITS)}")
    files = sorted((_assets() / "heldout").glob(f"*.{split}.jsonl"))
    if not files:
        raise DataError(f"no held-out {split} files are installed with GRAPE "
                        f"({_assets() / 'heldout'}); pass evaluation files with --data / --eval-data")
    return files


__all__ = ["DOMAINS", "MODEL_NAME", "SPLITS", "calibration_file", "heldout_files", "model_dir"]
