"""Router tensors as stored in the model's own checkpoint files, for a load-dtype-free identity.

The fingerprint of a model must not depend on the dtype it was loaded in: an fp32 checkpoint
calibrated in bfloat16 and pruned in float32 is the same model. Hashing the tensors in memory
cannot give that (bf16 rounding changes the bytes), so when the model was loaded from a local
directory of safetensors the fingerprint reads the router tensors from the files instead - and
uses them only when they still are the model's (equal after casting to the in-memory dtype):
a model changed after loading (pruned, edited) keeps the in-memory hash.

Checkpoint keys are mapped to module names with transformers' own loading renames (v5
conversion mappings, e.g. Mixtral's legacy ``block_sparse_moe`` keys); any key that cannot be
found, or any unreadable file, means "no stored tensors" and the caller falls back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

INDEX_FILE = "model.safetensors.index.json"


def checkpoint_dir(model: nn.Module) -> Path | None:
    """The local directory the model was loaded from, or None (hub id, built in memory)."""
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    path = Path(name) if name else None
    return path if path is not None and path.is_dir() else None


def key_files(directory: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it (sharded or single-file)."""
    from safetensors import safe_open

    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: directory / name for key, name in weight_map.items()}
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:  # reads the header only
            out.update(dict.fromkeys(handle.keys(), file))
    return out


def _renames(model: nn.Module):
    """(renamings, converters) transformers applies to checkpoint keys when loading `model`."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = get_model_conversion_mapping(model)
    return (
        [c for c in conversions if isinstance(c, WeightRenaming)],
        [c for c in conversions if isinstance(c, WeightConverter)],
    )


def stored_names(model: nn.Module, wanted: set[str], keys: list[str]) -> dict[str, str]:
    """Module tensor name -> checkpoint key for the `wanted` names found among `keys`."""
    key_set = set(keys)
    found = {name: name for name in wanted if name in key_set}
    if len(found) == len(wanted):
        return found
    try:  # private transformers API: without it only identical names are found
        from transformers.core_model_loading import rename_source_key

        renamings, converters = _renames(model)
    except (ImportError, AttributeError):
        return found
    present = dict.fromkeys(wanted, True)  # decides base-model-prefix handling, as loading does
    prefix = getattr(model, "base_model_prefix", None)
    for key in keys:
        name, _ = rename_source_key(key, renamings, converters, prefix, present)
        if name in wanted:
            found.setdefault(name, key)
    return found


def read_stored(model: nn.Module, wanted: list[str]) -> dict[str, torch.Tensor] | None:
    """The checkpoint's tensors for the module tensor names `wanted`, as stored (their file
    dtype), or None when the model was not loaded from local safetensors or a name is missing."""
    from safetensors import SafetensorError, safe_open

    directory = checkpoint_dir(model)
    if directory is None:
        return None
    try:
        files = key_files(directory)
        names = stored_names(model, set(wanted), list(files))
        if len(names) != len(wanted):
            return None
        out = {}
        for file in sorted({files[key] for key in names.values()}):
            with safe_open(str(file), framework="pt") as handle:
                for name, key in names.items():
                    if files[key] == file:
                        out[name] = handle.get_tensor(key)
        return out
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):
        return None  # an unreadable checkpoint only costs the load-dtype independence


def matches_memory(stored: torch.Tensor, memory: torch.Tensor) -> bool:
    """True when `stored` is what is in memory, up to the load's cast (same shape, equal after
    casting to the in-memory dtype). Weights left on `meta` cannot be checked."""
    if memory.device.type == "meta" or stored.shape != memory.shape:
        return False
    return torch.equal(stored.to(memory.dtype), memory.detach().to("cpu"))
