"""Checks that a loaded model and tokenizer are the sane ones the directory describes.

transformers fills what the weights lack with random values, and builds a tokenizer with an
empty vocabulary from a folder without tokenizer files: both "work" and give meaningless scores
and perplexities. These checks turn each such folder into a one-line error naming the file,
the field and the fix (the checks made before loading, on config.json and the safetensors
headers, are grape.models.files.check_model_dir's):

* `check_loaded`: what transformers reported missing when it loaded the weights;
* `check_tokenizer`: the tokenizer has a vocabulary and turns text into known tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from grape.errors import DataError
from grape.models.files import CheckpointFilesError

# text any real tokenizer turns into several known tokens
_PROBE = "The quick brown fox jumps over the lazy dog. 0123456789"
# fewer tokens than this is no vocabulary (an empty tokenizer has 1: its unknown token)
_MIN_VOCAB = 16
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
                    "tokenizer_config.json")


def check_loaded(path: Path, info: dict[str, Any]) -> None:
    """Refuse a load that left parameters randomly initialised (transformers' missing keys)."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise CheckpointFilesError(
            f"{path}: the weights lack {len(missing)} parameter(s) the model in config.json "
            f"expects (e.g. {missing[0]}), which would run on random values; re-download the "
            "checkpoint or fix its config.json")


# -- the tokenizer ----------------------------------------------------------------------------
def check_tokenizer(tokenizer: Any, path: Path) -> None:
    """A tokenizer with a vocabulary that turns plain text into known tokens. transformers
    builds an empty one from config.json alone when a folder has no tokenizer files."""
    size = len(tokenizer)
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    unknown = getattr(tokenizer, "unk_token_id", None)
    if size >= _MIN_VOCAB and ids and any(i != unknown for i in ids):
        return
    folder = Path(path) if Path(path).is_dir() else None
    present = [n for n in _TOKENIZER_FILES if folder is not None and (folder / n).is_file()]
    what = (f"has no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...)" if not present
            else f"holds an empty tokenizer ({size} token(s); text becomes "
            f"{'nothing' if not ids else 'only unknown tokens'})")
    raise DataError(f"{path} {what}; pass --tokenizer DIR naming the folder with the model's "
                    "tokenizer (tokenizer.json)")


__all__ = ["check_loaded", "check_tokenizer"]
