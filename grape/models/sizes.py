"""A model's sizes as its checkpoint stores them, for the scores file (solvers.sizes.ModelSizes).

The bytes come from the safetensors headers of the directory the model was loaded from (each
tensor's dtype, shape and byte range), so they are the stored ones - bf16, fp8 weights with
their block scales, MXFP4 blocks with their exponents - whatever dtype calibration ran in. A
model built in memory, or changed since it was loaded (its expert counts differ from the
files'), is sized from its parameters in memory instead.

Tensor names are sorted by where they sit, not by family: ``...layers.L.<rest>`` belongs to
decoder layer L (a name past the last decoder layer, such as DeepSeek-V3's multi-token
prediction layer, is not served and not counted); within a MoE layer a ``experts.`` segment
(``experts.E.`` for one expert, else fused with the expert on dim 0) is a routed expert and
everything else (attention, norms, router, shared experts) the layer's other parts; outside the
layers the embeddings go to ``embed`` and the rest (lm head, final norm) to ``head``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from solvers.scores import ModelIdentity
from solvers.sizes import KVShape, ModelSizes, Part

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"(?:^|\.)experts\.(?:(\d+)\.)?")
_EMBED = re.compile(r"(?:^|\.)(?:embed_tokens|wte|tok_embeddings|word_embeddings)\.")
_SCALE = re.compile(r"(?:_scale_inv|_scales|weight_scale|input_scale)$")  # quantisation scales
_HEADER_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                  "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U8": "uint8",
                  "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool"}
_FLOATS = ("float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True)
class Stored:
    """One tensor: its name, dtype name, shape and bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def params(self) -> int:
        """Parameters it holds: quantisation scales hold none, MXFP4 blocks two per byte."""
        if _SCALE.search(self.name):
            return 0
        count = math.prod(self.shape)
        return 2 * count if self.dtype == "uint8" and self.name.endswith("_blocks") else count


def checkpoint_tensors(directory: Path) -> list[Stored]:
    """Every tensor of a checkpoint directory, from its safetensors headers."""
    from grape.models.files import safetensors_header, weight_files

    out = []
    for file in weight_files(directory):
        for name, info in safetensors_header(file).items():
            if name == "__metadata__":
                continue
            start, stop = (int(v) for v in info["data_offsets"])
            out.append(Stored(name, _HEADER_DTYPES.get(str(info["dtype"]), str(info["dtype"]).lower()),
                              tuple(int(v) for v in info["shape"]), stop - start))
    return out


def parameter_tensors(model) -> list[Stored]:
    """Every parameter and persistent buffer of a model in memory (tied weights once)."""
    persistent = set(model.state_dict(keep_vars=True))
    seen, out = set(), []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name not in persistent or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out.append(Stored(name, str(tensor.dtype).replace("torch.", ""), tuple(tensor.shape),
                          tensor.numel() * tensor.element_size()))
    return out


def _add(part: list[int], tensor: Stored) -> None:
    part[0] += tensor.nbytes
    part[1] += tensor.params


def classify(tensors: list[Stored], identity: ModelIdentity, config: dict[str, Any], source: str,
             quantization: str | None) -> tuple[ModelSizes, dict[int, np.ndarray]] | None:
    """(sizes, MoE layer -> (N,) bytes per routed expert), or None when the tensors do not hold
    the identity's experts (a model changed since its files were written)."""
    experts = identity.experts_per_layer
    n_layers = identity.num_hidden_layers
    expert_bytes = {layer: np.zeros(n, np.int64) for layer, n in experts.items()}
    expert_params = {layer: np.zeros(n, np.int64) for layer, n in experts.items()}
    other = {layer: [0, 0] for layer in range(n_layers)}
    embed, head, seen = [0, 0], [0, 0], {layer: set() for layer in experts}
    for tensor in tensors:
        where = _LAYER.search(tensor.name)
        if where is None:
            _add(embed if _EMBED.search(tensor.name) else head, tensor)
            continue
        layer = int(where.group(1))
        if layer >= n_layers:
            continue  # not part of the served model (e.g. multi-token prediction)
        expert = _EXPERT.search(where.group(2)) if layer in experts else None
        if expert is None:
            _add(other[layer], tensor)
            continue
        n = experts[layer]
        if expert.group(1) is not None:  # one expert's tensor
            e = int(expert.group(1))
            if e >= n:
                return None
            expert_bytes[layer][e] += tensor.nbytes
            expert_params[layer][e] += tensor.params
            seen[layer].add(e)
            continue
        if not tensor.shape or tensor.shape[0] != n:  # fused, expert on dim 0
            return None
        for total, array, index in ((tensor.nbytes, expert_bytes, 0), (tensor.params, expert_params, 1)):
            each, rest = divmod(total, n)
            array[layer] += each
            other[layer][index] += rest  # never happens for real layouts; keeps totals exact
        seen[layer].update(range(n))
    if any(len(seen[layer]) != n for layer, n in experts.items()):
        return None
    tied = bool(config.get("tie_word_embeddings")) and not any("lm_head" in t.name for t in tensors)
    sizes = ModelSizes(dtype=_float_dtype(tensors), quantization=quantization, source=source,
                       layers={k: Part(*v) for k, v in other.items()}, embed=Part(*embed),
                       head=Part(*head), tied=tied, kv=kv_shape(config, n_layers),
                       expert_params=expert_params)
    return sizes, expert_bytes


def _float_dtype(tensors: list[Stored]) -> str:
    """The float dtype holding the most bytes (the unquantised weights' dtype)."""
    totals: dict[str, int] = {}
    for tensor in tensors:
        if tensor.dtype in _FLOATS and not _SCALE.search(tensor.name):
            totals[tensor.dtype] = totals.get(tensor.dtype, 0) + tensor.nbytes
    return max(totals, key=totals.get) if totals else "bfloat16"


def kv_shape(config: dict[str, Any], n_layers: int) -> KVShape | None:
    """K and V elements one token adds per decoder layer, from the model config (MLA caches its
    latent and rotary key, kv_lora_rank + qk_rope_head_dim, as vLLM does); None if unknown."""
    if config.get("kv_lora_rank"):
        per, heads = int(config["kv_lora_rank"]) + int(config.get("qk_rope_head_dim") or 0), 1
    else:
        q_heads = config.get("num_attention_heads")
        if not q_heads:
            return None
        heads = int(config.get("num_key_value_heads") or q_heads)
        dim = int(config.get("head_dim") or config["hidden_size"] // q_heads)
        per = 2 * heads * dim
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == n_layers:
        windows = [window if kind == "sliding_attention" and window else None for kind in types]
    elif window and config.get("use_sliding_window", True):
        windows = [int(window)] * n_layers
    else:
        windows = [None] * n_layers
    return KVShape((per,) * n_layers, tuple(windows), heads)


def model_sizes(model, identity: ModelIdentity, directory: str | Path | None = None
                ) -> tuple[ModelSizes, dict[int, np.ndarray]] | None:
    """The sizes of `model` as stored in `directory` (default: the directory it was loaded
    from), else as its parameters are in memory."""
    from grape.models.adapters.stored import checkpoint_dir
    from grape.models.files import read_config, resolve_model
    from grape.models.quantized import quant_method
    from solvers.errors import UserError

    config = model.config.to_dict()
    if directory is None:
        directory = checkpoint_dir(model)
    if directory is not None:
        try:
            directory = resolve_model(directory)
            files_config = read_config(directory)
            tensors = checkpoint_tensors(directory)
        except (OSError, UserError, KeyError, TypeError, ValueError):
            tensors = []  # unreadable files only cost the stored sizes: size what is in memory
        if tensors:
            found = classify(tensors, identity, {**config, **files_config}, "checkpoint",
                             quant_method(files_config))
            if found is not None:
                return found
    return classify(parameter_tensors(model), identity, config, "parameters", quant_method(config))


__all__ = ["Stored", "checkpoint_tensors", "classify", "kv_shape", "model_sizes",
           "parameter_tensors"]
