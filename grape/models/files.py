"""Checks on a model directory and on where to run it, made before any weights are read.

Everything here reads only small files (config.json, safetensors headers), so a verb can refuse a
missing, corrupt or truncated checkpoint, a sequence length past the model's context or a device
that does not exist in a second, instead of after minutes of loading or calibrating. No torch at
import time.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any

from grape.errors import ArchitectureError, DataError
from solvers.errors import UserError


class CheckpointFilesError(UserError):
    """A model directory whose files cannot be read as a checkpoint."""


_FIX = "pass a checkpoint directory written by `grape apply` or `save_pretrained`"
# a safetensors header is a JSON object of at most this many bytes (the format's own limit)
_MAX_HEADER = 100_000_000
INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint's tensor name -> file map


# a decoder layer's index in a tensor name: model.layers.12.mlp..., layers.0.attn...
_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# owner/name as the Hugging Face Hub spells model ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
MODEL_HELP = ("model directory, or a Hugging Face model id (owner/name) already in the local "
              "Hugging Face cache (HF_HUB_CACHE); nothing is downloaded")


def hf_cache_roots() -> tuple[Path, Path]:
    """(hub cache, datasets cache), read from the environment at call time as the Hugging Face
    libraries read it at import (so a test or a caller can point them elsewhere)."""
    default_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    home = Path(os.environ.get("HF_HOME", default_home)).expanduser()
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub"
    datasets = os.environ.get("HF_DATASETS_CACHE") or home / "datasets"
    return Path(hub).expanduser(), Path(datasets).expanduser()


def cached_model(model_id: str) -> Path | None:
    """The local snapshot of a Hub model id with a config.json, or None; never downloads."""
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(model_id, cache_dir=hf_cache_roots()[0], local_files_only=True))
    except (ImportError, OSError, ValueError):  # not cached, or not a valid id
        return None
    return snapshot if (snapshot / "config.json").is_file() else None


def resolve_model(path_or_id: str | os.PathLike) -> Path:
    """The model directory a --model value names: the path when it exists, else the local
    Hugging Face cache's snapshot of a Hub id (owner/name). Nothing is ever downloaded; anything
    else is a one-line DataError saying which of the two was looked for."""
    text = os.fspath(path_or_id)
    path = Path(text).expanduser()
    if path.exists() or not _HUB_ID.match(text):
        return path
    snapshot = cached_model(text)
    if snapshot is not None:
        return snapshot
    raise DataError(f"model {text!r} is neither a directory here nor a model in the local Hugging "
                    f"Face cache ({hf_cache_roots()[0]}); download it first (`hf download {text}`) "
                    "or pass a checkpoint directory")


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a model directory (or a cached Hub id, see resolve_model), parsed; a
    one-line error when it is missing or bad."""
    path = resolve_model(path)
    if not path.is_dir():
        raise DataError(f"model directory {path} does not exist; {_FIX}.")
    config = path / "config.json"
    if not config.is_file():
        raise DataError(f"model directory {path} has no config.json; {_FIX}.")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFilesError(f"{config} cannot be read as JSON ({exc}); {_FIX}.") from None
    if not isinstance(data, dict):
        raise CheckpointFilesError(f"{config} is not a JSON object; {_FIX}.")
    return data


def check_model_dir(path: Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """The directory holds a readable config.json and intact safetensors files, and loads
    without running code from its folder (unless `trust_remote_code`); returns the config.
    Reads headers only."""
    config = read_config(path)
    check_remote_code(path, config, trust_remote_code)
    for shard in weight_files(resolve_model(path)):
        check_safetensors(shard)
    # values the model is built from, and weights for every layer it declares (a bad config
    # would otherwise fail deep inside transformers, or run on random values)
    check_config_values(resolve_model(path), config)
    check_layers_covered(resolve_model(path), config)
    return config


# -- remote code ------------------------------------------------------------------------------
class RemoteCodeError(UserError):
    """A model or tokenizer folder that loads only by running Python code from that folder."""


REMOTE_CODE_FIX = ("GRAPE never runs it unless asked: only `grape eval --trust-remote-code` (or "
                   "trust_remote_code=True in Python) loads such a model, and pruning needs an "
                   "architecture built into transformers")


def builtin_model_type(model_type: Any) -> bool:
    """transformers has its own classes for this model_type (read without importing torch)."""
    try:
        from transformers.models.auto.auto_mappings import CONFIG_MAPPING_NAMES as names
    except ImportError:  # another transformers layout: the full mapping (imports torch)
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES as names
    if model_type in names:
        return True
    # types a program registered with AutoConfig.register (a plugin may) count as built in
    auto = sys.modules.get("transformers.models.auto.configuration_auto")
    return auto is not None and isinstance(model_type, str) and model_type in auto.CONFIG_MAPPING


def auto_map_files(auto_map: Any) -> list[str]:
    """The .py files an auto_map names: "module.Class" -> module.py, "owner/repo--module.Class"
    -> owner/repo:module.py; values may be lists ([slow, fast] tokenizers, with None)."""
    refs = auto_map.values() if isinstance(auto_map, dict) else auto_map or ()
    files = set()
    for ref in refs:
        for one in ref if isinstance(ref, (list, tuple)) else [ref]:
            if isinstance(one, str) and "." in one:
                repo, _, dotted = one.rpartition("--")
                module = dotted.rsplit(".", 1)[0].replace(".", "/") + ".py"
                files.add(f"{repo}:{module}" if repo else module)
    return sorted(files)


def model_code_files(config: dict[str, Any]) -> list[str]:
    """The .py files transformers would have to run to load this config.json's model: those its
    auto_map names, when its model_type is not built into transformers; [] when it is (then the
    built-in classes load it and its auto_map is ignored unless code is trusted)."""
    auto_map = config.get("auto_map")
    if not auto_map or builtin_model_type(config.get("model_type")):
        return []
    return auto_map_files(auto_map)


def remote_code_files(path: str | os.PathLike) -> list[str]:
    """Every .py file the auto_maps of a folder's config.json and tokenizer_config.json name:
    what transformers may run from it when code is trusted (it then prefers them)."""
    files = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((Path(path) / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(data, dict):
            files += auto_map_files(data.get("auto_map"))
    return sorted(set(files))


def check_remote_code(path: str | os.PathLike, config: dict[str, Any],
                      trust_remote_code: bool = False) -> list[str]:
    """Refuse, in one line, a model that loads only by running code from its folder, unless
    `trust_remote_code`; returns the files that would run ([] when none)."""
    files = model_code_files(config)
    if files and not trust_remote_code:
        raise RemoteCodeError(
            f"model {path} has model type {config.get('model_type')!r}, which transformers does "
            f"not have: loading it would run code from the model folder ({', '.join(files)}); "
            f"{REMOTE_CODE_FIX}")
    return files


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, else every *.safetensors.
    A missing shard named by the index is an error."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointFilesError(f"{index} is not a safetensors index ({exc!r}); "
                                       "re-save or re-download the checkpoint") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointFilesError(f"{index} names {len(missing)} missing shard(s), e.g. "
                                       f"{missing[0]}; re-download or re-save the checkpoint")
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


def _bad_file(file: Path, why: str) -> CheckpointFilesError:
    return CheckpointFilesError(f"{file} is not a valid safetensors file ({why}); re-download "
                                "or re-save the checkpoint")


def safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets; plus
    ``__metadata__``), read without the tensors; a one-line error when it is not one."""
    return read_header(file)[0]


def read_header(file: Path) -> tuple[dict[str, Any], int, int]:
    """(header, offset of the data section, file size) of a safetensors file; a one-line error
    when it is not one (too short, a header longer than the file or not a JSON object)."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise _bad_file(file, f"only {size} bytes")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER):
            raise _bad_file(file, f"header of {length} bytes in a file of {size}")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _bad_file(file, "the header is not JSON") from None
    if not isinstance(header, dict):
        raise _bad_file(file, "the header is not a JSON object")
    return header, 8 + length, size


def check_safetensors(file: Path) -> None:
    """The file is a complete safetensors file: a valid header whose tensors all lie inside it.
    Catches truncated downloads and corrupt files without reading the tensors."""
    def bad(why: str) -> CheckpointFilesError:
        return _bad_file(file, why)

    header, data_start, size = read_header(file)
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(v) for v in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name!r} has no data offsets") from None
        if not 0 <= start <= stop:
            raise bad(f"tensor {name!r} has offsets {start}..{stop}")
        end = max(end, stop)
    if data_start + end > size:
        raise bad(f"truncated: the header needs {data_start + end} bytes, the file has {size}")


# -- config.json against transformers, and against the weights ------------------------------
def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config_values(path: Path, config: dict[str, Any]) -> None:
    """config.json's model_type is one transformers (or GRAPE) knows, and a supported MoE
    family's expert count and top_k make sense. Unknown types with an `auto_map` are left to
    the remote-code check (check_remote_code)."""
    where = Path(path) / "config.json"
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ArchitectureError(f"{where} has no model_type (found {model_type!r}); it must name "
                                "the architecture, e.g. \"qwen3_moe\"")
    from grape.models.adapters import check_model_config, supported_model_types

    if check_model_config(config, str(where)):
        return
    if config.get("auto_map") or builtin_model_type(model_type):
        return  # a dense model (grape eval takes any causal LM) or remote code
    raise ArchitectureError(f"{where}: model_type {model_type!r} is not an architecture this "
                            "transformers knows; GRAPE prunes "
                            f"{', '.join(supported_model_types())} (grape eval also takes any "
                            "causal LM transformers has)")


def declared_layers(config: dict[str, Any]) -> int | None:
    """num_hidden_layers (of the text model for a multimodal config), or None when absent."""
    value = config.get("num_hidden_layers")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("num_hidden_layers")
    return value


def check_layers_covered(path: Path, config: dict[str, Any]) -> None:
    """Every decoder layer config.json declares has tensors in the safetensors files (headers
    only). Folders without safetensors, or with names that carry no layer index, are left to
    transformers' own report (check_loaded)."""
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


def context_length(config: dict[str, Any]) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings), if it says."""
    value = config.get("max_position_embeddings")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else None


def check_seq_len(seq_len: int, config: dict[str, Any], flag: str = "--seq-len") -> None:
    """Refuse sequences longer than the model's context (positions past it are meaningless)."""
    context = context_length(config)
    if context is not None and seq_len > context:
        raise DataError(f"{flag} {seq_len} is longer than the model's context "
                        f"(max_position_embeddings {context}); pass {flag} {context} or less")


def resolve_seq_len(seq_len: int | None, default: int, config: dict[str, Any],
                    flag: str = "--seq-len", who: str = "grape") -> int:
    """`seq_len`, or `default` when unset, capped at the model's context (cap_seq_len)."""
    return cap_seq_len(default if seq_len is None else seq_len, config, flag, who)


def cap_seq_len(seq_len: int, config: dict[str, Any], flag: str = "--seq-len", who: str = "grape") -> int:
    """The one policy for text packed into windows, whichever stage and caller: a length past
    the model's context is capped at it, with a notice (positions past the context are
    meaningless, and text can always be packed shorter). Pre-packed ids cannot be repacked:
    check_seq_len refuses them."""
    context = context_length(config)
    if context is not None and seq_len > context:
        print(f"{who}: {flag} {seq_len} is longer than the model's context; using {context}")
        return context
    return seq_len


# -- devices ----------------------------------------------------------------------------------
_PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device(device: Any, what: str, offload_folder: str | None = None) -> None:
    """`device` (a device_map value) names a device this machine has."""
    import torch

    if device == "disk":
        if not offload_folder:
            raise DataError(f"{what} puts weights on 'disk', which needs an offload folder; pass "
                            "--offload-folder DIR")
        return
    text = str(device)
    if isinstance(device, int) and not isinstance(device, bool):
        text = f"cuda:{device}"
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise DataError(f"{what}: {text!r} is not a device; use cpu, cuda, cuda:N or disk") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        if parsed.type == "meta" or not _backend_available(parsed.type):
            raise DataError(f"{what}: device {text!r} is not available here; use cpu or cuda:N")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = parsed.index or 0
    if index >= count:
        have = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise DataError(f"{what}: device {text!r} does not exist (this machine has {have}); "
                        "use cpu" + (f" or cuda:0..cuda:{count - 1}" if count else ""))


def _backend_available(kind: str) -> bool:
    import torch

    module = getattr(torch, kind, None)
    available = getattr(module, "is_available", None)
    return bool(available()) if callable(available) else False


def parse_device_map(spec: str, offload_folder: str | None = None) -> Any:
    """A --device-map value as accelerate takes it, with every device checked: 'auto' and the
    other placements, one device ('cpu', 'cuda:1'), or a JSON object {module: device}."""
    text = json.dumps(spec) if isinstance(spec, dict) else str(spec).strip()
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"--device-map {spec!r} is not valid JSON ({exc.msg})") from None
        if not isinstance(mapping, dict) or not mapping:
            raise DataError(f"--device-map {spec!r} must map module names to devices")
        for module, device in mapping.items():
            check_device(device, f"--device-map entry {module!r}", offload_folder)
        return mapping
    if text in _PLACEMENTS:
        return text
    check_device(text, "--device-map", offload_folder)
    return text


__all__ = [
    "MODEL_HELP",
    "REMOTE_CODE_FIX",
    "INDEX_FILE",
    "CheckpointFilesError",
    "RemoteCodeError",
    "auto_map_files",
    "builtin_model_type",
    "check_config_values",
    "check_device",
    "check_layers_covered",
    "check_model_dir",
    "check_remote_code",
    "check_safetensors",
    "cap_seq_len",
    "check_seq_len",
    "cached_model",
    "context_length",
    "declared_layers",
    "hf_cache_roots",
    "model_code_files",
    "parse_device_map",
    "read_config",
    "read_header",
    "remote_code_files",
    "resolve_model",
    "resolve_seq_len",
    "safetensors_header",
    "weight_files",
]
