"""The one model loader: a checkpoint directory (stock or GRAPE-pruned) on the devices asked for.

    model = load_model("path/to/moe")                          # float32 on CPU, all GPUs otherwise
    model = load_model("path", device="cuda:1", dtype="bfloat16")
    model = load_model("path", device='{"model.layers.0": "cpu", "": "disk"}', offload_folder="off")
    tok = load_tokenizer("path/to/moe")

`device` is what every verb's --device / --device-map flag takes: ``auto`` (every GPU through
accelerate, else the CPU), ``balanced`` / ``sequential`` (accelerate placements), one device
(``cpu``, ``cuda``, ``cuda:1``), or a JSON object mapping module names to devices. Every device is
checked before any weight is read (grape.modelfiles). ``dtype`` ``auto`` is float32 on the CPU
(half precision is slow there) and the checkpoint's own dtype on GPUs.
"""

from __future__ import annotations

import os
from typing import Any

from grape.errors import DataError
from grape.modelfiles import check_model_dir, parse_device_map, resolve_model

DTYPES = ("auto", "float32", "bfloat16", "float16")


def device_map(device: str = "auto", offload_folder: str | None = None) -> Any:
    """The accelerate device_map for a --device / --device-map value, every device checked."""
    import torch

    placement = parse_device_map(device, offload_folder)
    if placement == "auto" and not torch.cuda.is_available():
        return "cpu"
    return placement


def load_model(path: str | os.PathLike, device: str = "auto", dtype: Any = "auto", *,
               offload_folder: str | None = None, moe_only: bool = True, **from_pretrained_kwargs):
    """An eval-mode model from a checkpoint directory (or a Hub id in the local cache). GRAPE checkpoints (per-layer expert
    counts included) and stock MoE checkpoints load through grape.checkpoint.load_pruned; with
    `moe_only=False` any other causal LM (a dense one, for evaluation) loads as it is. `dtype`:
    a name from DTYPES or a torch.dtype; other keyword arguments go to ``from_pretrained``."""
    import torch

    from grape.checkpoint import load_pruned
    from grape.errors import ArchitectureError

    path = resolve_model(path)  # a Hub id is looked up in the local cache only
    check_model_dir(path)
    device = from_pretrained_kwargs.pop("device_map", device)  # from_pretrained's own name
    if not isinstance(dtype, torch.dtype) and dtype not in DTYPES:
        raise DataError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    placement = device_map(device, offload_folder)
    if dtype == "auto":
        dtype = torch.float32 if placement == "cpu" else "auto"
    kwargs: dict[str, Any] = {**from_pretrained_kwargs, "device_map": placement,
                              "dtype": getattr(torch, dtype) if dtype in DTYPES[1:] else dtype}
    if offload_folder:
        kwargs["offload_folder"] = offload_folder
    try:
        return load_pruned(path, **kwargs)
    except ArchitectureError:
        if moe_only:
            raise
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a model (or tokenizer) directory."""
    from transformers import AutoTokenizer

    path = resolve_model(path)
    if not path.is_dir() and not path.is_file():
        raise DataError(f"tokenizer {path} does not exist; pass --tokenizer DIR.")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"no usable tokenizer in {path} ({exc}); pass --tokenizer DIR holding "
                        "tokenizer.json.") from None


__all__ = ["DTYPES", "device_map", "load_model", "load_tokenizer"]
