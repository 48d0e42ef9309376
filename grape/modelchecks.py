"""Checks that a model directory describes one sane model before any work starts.

transformers builds whatever config.json describes and fills what the weights lack with random
values, and builds a tokenizer with an empty vocabulary from a folder without tokenizer files:
both "work" and give meaningless scores and perplexities. These checks turn each such folder
into a one-line error naming the file, the field and the fix:

* `check_config_values`: model_type known, and the supported MoE family's expert count and
  top_k whole numbers in range (validated by the family's adapter);
* `check_layers_covered`: the safetensors headers (no weights read) hold every decoder layer
  config.json declares;
* `check_loaded`: what transformers reported missing when it loaded the weights;
* `check_tokenizer`: the tokenizer has a vocabulary and turns text into known tokens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from grape.errors import ArchitectureError, DataError

# a decoder layer's index in a tensor name: model.layers.12.mlp..., layers.0.attn...
_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# text any real tokenizer turns into several known tokens
_PROBE = "The quick brown fox jumps over the lazy dog. 0123456789"
# fewer tokens than this is no vocabulary (an empty tokenizer has 1: its unknown token)
_MIN_VOCAB = 16
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
                    "tokenizer_config.json")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- config.json ----------------------------------------------------------------------------
def check_config_values(path: Path, config: dict[str, Any]) -> None:
    """config.json's model_type is one transformers (or GRAPE) knows, and a supported MoE
    family's expert count and top_k make sense. Unknown types with an `auto_map` are left to
    the remote-code check (grape.modelfiles.check_remote_code)."""
    where = Path(path) / "config.json"
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ArchitectureError(f"{where} has no model_type (found {model_type!r}); it must name "
                                "the architecture, e.g. \"qwen3_moe\"")
    from grape.adapters.base import check_model_config, supported_model_types

    if check_model_config(config, str(where)):
        return
    if config.get("auto_map") or _transformers_knows(model_type):
        return  # a dense model (grape eval takes any causal LM) or remote code
    raise ArchitectureError(f"{where}: model_type {model_type!r} is not an architecture this "
                            "transformers knows; GRAPE prunes "
                            f"{', '.join(supported_model_types())} (grape eval also takes any "
                            "causal LM transformers has)")


def _transformers_knows(model_type: str) -> bool:
    from grape.modelfiles import builtin_model_type

    return builtin_model_type(model_type)


def declared_layers(config: dict[str, Any]) -> int | None:
    """num_hidden_layers (of the text model for a multimodal config), or None when absent."""
    value = config.get("num_hidden_layers")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("num_hidden_layers")
    return value


# -- weights against the config ---------------------------------------------------------------
def check_layers_covered(path: Path, config: dict[str, Any]) -> None:
    """Every decoder layer config.json declares has tensors in the safetensors files (headers
    only). Folders without safetensors, or with names that carry no layer index, are left to
    transformers' own report (check_loaded)."""
    from grape.modelfiles import CheckpointFilesError, safetensors_header, weight_files

    declared = declared_layers(config)
    if declared is None:
        return
    where = Path(path) / "config.json"
    if not _whole(declared) or declared < 1:
        raise ArchitectureError(f"{where}: num_hidden_layers is {declared!r}; it must be a whole "
                                "number of decoder layers, at least 1")
    found = set()
    for shard in weight_files(Path(path)):
        for name in safetensors_header(shard):
            match = _LAYER_NAME.search(name)
            if match:
                found.add(int(match.group(1)))
    missing = sorted(set(range(declared)) - found)
    if found and missing:
        raise CheckpointFilesError(
            f"{where} declares {declared} layers (num_hidden_layers) but the weights hold none of "
            f"layer(s) {_span(missing)}, which would run on random values; set num_hidden_layers "
            f"to {max(found) + 1} if the model has that many layers, or re-download the missing "
            "weight files")


def _span(indices: list[int]) -> str:
    if len(indices) > 1 and indices[-1] - indices[0] == len(indices) - 1:
        return f"{indices[0]}-{indices[-1]}"
    shown = ", ".join(str(i) for i in indices[:8])
    return shown + (f" and {len(indices) - 8} more" if len(indices) > 8 else "")


def check_loaded(path: Path, info: dict[str, Any]) -> None:
    """Refuse a load that left parameters randomly initialised (transformers' missing keys)."""
    from grape.modelfiles import CheckpointFilesError

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


__all__ = ["check_config_values", "check_layers_covered", "check_loaded", "check_tokenizer",
           "declared_layers"]
