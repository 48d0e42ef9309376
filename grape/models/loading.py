"""The one model loader: a checkpoint directory (stock or GRAPE-pruned) on the devices asked for.

    model = load_model("path/to/moe")                          # float32 on CPU, all GPUs otherwise
    model = load_model("path", device="cuda:1", dtype="bfloat16")
    model = load_model("path", device='{"model.layers.0": "cpu", "": "disk"}', offload_folder="off")
    tok = load_tokenizer("path/to/moe")

`device` is what every verb's --device / --device-map flag takes: ``auto`` (every GPU through
accelerate, else the CPU), ``balanced`` / ``sequential`` (accelerate placements), one device
(``cpu``, ``cuda``, ``cuda:1``), or a JSON object mapping module names to devices. Every device is
checked before any weight is read (grape.models.files). ``dtype`` ``auto`` is float32 on the CPU
(half precision is slow there) and the checkpoint's own dtype on GPUs.
"""

from __future__ import annotations

import os
from typing import Any

from grape.errors import DataError
from grape.models.files import (
    RemoteCodeError,
    check_model_dir,
    model_code_files,
    parse_device_map,
    remote_code_files,
    resolve_model,
)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def input_device(model):
    """Where inputs must go: the embedding's device (right for device_map-sharded models)."""
    return model.get_input_embeddings().weight.device


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
    counts included) and stock MoE checkpoints load through grape.pruning.checkpoint.load_pruned; with
    `moe_only=False` any other causal LM (a dense one, for evaluation) loads as it is. `dtype`:
    a name from DTYPES or a torch.dtype; other keyword arguments go to ``from_pretrained``.
    Code from the model's folder never runs unless ``trust_remote_code=True``, and then only for
    a model type transformers does not have (and `moe_only=False`: GRAPE prunes built-in ones)."""
    import torch

    from grape.pruning.checkpoint import load_pruned
    from grape.errors import ArchitectureError

    path = resolve_model(path)  # a Hub id is looked up in the local cache only
    trust = bool(from_pretrained_kwargs.pop("trust_remote_code", False))
    config = check_model_dir(path, trust_remote_code=trust)
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
    if not model_code_files(config):  # a type transformers has: its classes, no remote code
        try:
            return load_pruned(path, **kwargs)
        except ArchitectureError:
            if moe_only:
                raise
    elif moe_only:
        raise ArchitectureError(f"model {path} has model type {config.get('model_type')!r}, which "
                                "transformers does not have; GRAPE prunes only built-in architectures")
    from transformers import AutoModelForCausalLM

    # trust_remote_code explicit either way: None would make transformers prompt on stdin
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust, **kwargs).eval()


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer saved in a model (or tokenizer) directory. A tokenizer class from the
    folder's own code (tokenizer_config.json's auto_map) runs only with `trust_remote_code`."""
    from transformers import AutoTokenizer

    path = resolve_model(path)
    if not path.is_dir() and not path.is_file():
        raise DataError(f"tokenizer {path} does not exist; pass --tokenizer DIR.")
    try:
        # explicit either way: None would make transformers prompt on stdin for remote code
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        files = remote_code_files(path) if path.is_dir() else []
        if files and not trust_remote_code:  # most likely why the built-in classes failed
            raise RemoteCodeError(f"the tokenizer in {path} loads only by running code from its "
                                  f"folder ({', '.join(files)}); GRAPE runs it only for `grape eval "
                                  "--trust-remote-code` (trust_remote_code=True in Python); or pass "
                                  "--tokenizer DIR holding a standard tokenizer.json") from None
        why = " ".join(str(exc).split())  # transformers' messages span lines; the CLI prints one
        raise DataError(f"no usable tokenizer in {path} ({why}); pass --tokenizer DIR holding "
                        "tokenizer.json.") from None
    # a folder without tokenizer files still "loads": transformers builds an empty tokenizer
    from grape.models.checks import check_tokenizer

    check_tokenizer(tokenizer, path)
    return tokenizer


__all__ = ["DTYPES", "device_map", "input_device", "load_model", "load_tokenizer"]
