"""One decoder layer at a time from the safetensors shards: the model skeleton on the meta device,
real weights only for the layer being run.

    model = build_skeleton("/models/DeepSeek-V3", torch.bfloat16)     # no weights: meta device
    loader = LayerLoader(model, "/models/DeepSeek-V3", "cuda:0", torch.bfloat16)
    loader.load(loader.layer_keys[3])      # decoder layer 3 on cuda:0, as from_pretrained loads it
    loader.free(model.model.layers[3])

The skeleton is the class ``from_pretrained`` builds (a GRAPE checkpoint's per-layer expert
counts and router masks included), constructed under ``init_empty_weights`` so parameters take
no memory while buffers computed at construction (rotary frequencies) stay real. A layer's
tensors are read with ``pread`` from the byte ranges the shard headers give (no mmap: pages of
a 600 GB checkpoint are not kept resident) only when the loader asks for each one (a few at a
time, not the whole layer in host memory), dequantised when stored quantised (block FP8 and
MXFP4, with grape.models.quantized's exact dequantisers), and loaded through transformers' own
``convert_and_load_state_dict_in_model`` with the model's own conversion mapping (renamed keys,
per-expert tensors fused into ``gate_up_proj``), so a layer gets exactly the tensors a
whole-model load gives it.

Host memory between layers (glibc): :func:`release_memory` hands freed heap pages back after a
layer is dropped, :func:`bound_heap` / :func:`bounded_heap` keep a load's per-expert copies out
of the heap; the layer-sequential calibration, search and repair use them.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import torch
from torch import nn

from grape.errors import ArchitectureError
from grape.models.quantized import dequantize_fp8_blocks, dequantize_mxfp4, quant_method
from grape.models.shards import ShardError, StoredTensor, stored_tensors

# safetensors dtype names -> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# suffixes of the companion tensors of a quantised weight, stripped to find the weight's name
_QUANT_SUFFIXES = ("_scale_inv", "_blocks", "_scales")


def read_tensor(stored: StoredTensor) -> torch.Tensor:
    """A stored tensor read with pread into a fresh CPU tensor."""
    if stored.dtype not in DTYPES:
        raise ShardError(f"tensor {stored.name!r} has dtype {stored.dtype}, which layer-by-layer "
                         "loading does not read; calibrate this checkpoint with --mode whole")
    buffer = bytearray(stored.nbytes)
    view, at = memoryview(buffer), 0
    for piece in stored.pieces:
        fd = os.open(piece.file, os.O_RDONLY)
        try:
            done = 0
            while done < piece.length:
                count = os.preadv(fd, [view[at + done: at + piece.length]], piece.offset + done)
                if count <= 0:
                    raise ShardError(f"{piece.file} ended early (truncated?); re-download it")
                done += count
        finally:
            os.close(fd)
        at += piece.length
    if not buffer:
        return torch.empty(stored.shape, dtype=DTYPES[stored.dtype])
    return torch.frombuffer(buffer, dtype=DTYPES[stored.dtype]).reshape(stored.shape)


class LazyTensor:
    """A checkpoint tensor read (and dequantised) only when transformers' loader indexes it
    with ``[...]``, so a layer's tensors are not all in host memory at once: block FP8 ``W`` +
    ``W_scale_inv`` -> float32 ``W``; MXFP4 ``P_blocks`` + ``P_scales`` -> float32 ``P`` (gpt-oss's
    fused layout: the dequantised [E, out, in] transposed to the stored [E, in, out])."""

    def __init__(self, kind: str, parts: list[StoredTensor], block: tuple[int, int] = (128, 128)):
        self.kind, self.parts, self.block = kind, parts, block

    def __getitem__(self, index) -> torch.Tensor:
        tensors = [read_tensor(part) for part in self.parts]
        if self.kind == "fp8":
            value = dequantize_fp8_blocks(tensors[0], tensors[1], self.block)
        elif self.kind == "mxfp4":
            value = dequantize_mxfp4(tensors[0], tensors[1]).transpose(-1, -2).contiguous()
        else:
            value = tensors[0]
        return value[index]


def lazy_tensors(keys: list[str], stored: dict[str, StoredTensor],
                 config: dict) -> dict[str, LazyTensor]:
    """Checkpoint key -> LazyTensor for `keys`, quantised weights paired with their scales
    under the weight's key (the scale keys disappear)."""
    method = quant_method(config)
    if method not in (None, "fp8", "mxfp4"):
        raise ArchitectureError(f"quantisation {method!r} cannot be dequantised layer by layer; "
                                "calibrate this checkpoint with --mode whole")
    block = tuple((config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
    wanted, out = set(keys), {}
    for key in keys:
        if method == "fp8" and key.endswith("_scale_inv"):
            continue
        if method == "fp8" and key + "_scale_inv" in wanted:
            out[key] = LazyTensor("fp8", [stored[key], stored[key + "_scale_inv"]], block)
        elif method == "mxfp4" and key.endswith("_blocks"):
            stem = key[: -len("_blocks")]
            out[stem] = LazyTensor("mxfp4", [stored[key], stored[stem + "_scales"]])
        elif not (method == "mxfp4" and key.endswith("_scales")):
            out[key] = LazyTensor("plain", [stored[key]])
    return out


def build_skeleton(model_dir: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The model from_pretrained would build for `model_dir`, in `dtype`, with every parameter
    on the meta device (buffers real), router masks re-installed; eval mode."""
    from accelerate import init_empty_weights
    from transformers.modeling_utils import local_torch_dtype

    from grape.models.adapters import get_adapter
    from grape.pruning.checkpoint import causal_lm_class, pruned_class

    config, base = causal_lm_class(model_dir)
    with init_empty_weights(include_buffers=False), local_torch_dtype(dtype, base.__name__):
        model = pruned_class(base)(config)
    model.__class__ = base  # as load_pruned: the subclass only shapes the layers
    model.config.name_or_path = str(model_dir)  # as from_pretrained: the identity reads it
    adapter = get_adapter(model)
    adapter.mask_from_config()
    adapter.sync_runtime()
    return model.eval()


class PassThrough(nn.Module):
    """Stands in for a decoder layer: returns its input unchanged and, given `record`, calls it
    with the arguments the layer was called with. Attribute reads go to the real layer (a
    model's forward may read e.g. `attention_type` from its layers)."""

    def __init__(self, layer: nn.Module, record=None):
        super().__init__()
        self.record = record
        object.__setattr__(self, "_wrapped", layer)  # not a submodule: no parameters here

    def forward(self, hidden_states, *args, **kwargs):
        if self.record is not None:
            self.record(args, kwargs)
        return hidden_states

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers (model.model.layers in every supported family)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ArchitectureError(f"{type(model).__name__} has no model.layers; layer-by-layer "
                                "calibration needs a decoder-only causal LM")
    return layers


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' loader draws a progress bar per call; one per layer is noise."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


class LayerLoader:
    """Reads the checkpoint tensors of one module group at a time into a skeleton model."""

    def __init__(self, model: nn.Module, model_dir: str | os.PathLike, device, dtype: torch.dtype):
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.directory = Path(model_dir)
        self.config = model.config.to_dict()
        self.stored = stored_tensors(self.directory)
        self.mapping = get_model_conversion_mapping(model)
        self.names = self._module_names()
        names = {id(module): name for name, module in model.named_modules()}
        self.layer_names = [names[id(layer)] for layer in decoder_layers(model)]
        self.layer_keys = [self.keys_under(name) for name in self.layer_names]

    def _module_names(self) -> dict[str, str]:
        """Checkpoint key -> the model tensor name it loads into (quantisation companions take
        their weight's name; keys the model does not have are left out)."""
        from transformers.core_model_loading import rename_source_key

        from grape.models.adapters.stored import _renames

        renamings, converters = _renames(self.model)
        present = self.model.state_dict()
        prefix = getattr(self.model, "base_model_prefix", None)
        suffixes = _QUANT_SUFFIXES if quant_method(self.config) else ()
        out = {}
        for key in self.stored:
            base = next((key[: -len(s)] for s in suffixes if key.endswith(s)), key)
            name, _ = rename_source_key(base, renamings, converters, prefix, present)
            if name in present:
                out[key] = name
        return out

    def keys_under(self, module_name: str) -> list[str]:
        """Checkpoint keys loading into module `module_name` (and its children)."""
        stem = f"{module_name}."
        return sorted(k for k, name in self.names.items() if name.startswith(stem))

    def load(self, keys: list[str], module: nn.Module, what: str) -> nn.Module:
        """Materialise `module` on the device from checkpoint `keys`; every tensor of the
        module must be found (a checkpoint missing one is an error naming it)."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        tensors = lazy_tensors(keys, self.stored, self.config)
        load_config = LoadStateDictConfig(
            pretrained_model_name_or_path=str(self.directory), device_map={"": str(self.device)},
            dtype=self.dtype, dtype_plan=self.model._get_dtype_plan(self.dtype),
            weight_mapping=self.mapping)
        with _quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(self.model, tensors, load_config)
        if info.mismatched_keys or info.conversion_errors:
            bad = sorted(info.mismatched_keys) or sorted(info.conversion_errors)
            raise ArchitectureError(f"{self.directory}: {what} does not load ({bad[0]} has "
                                    "another shape than config.json says); check the checkpoint")
        missing = [n for n, t in _tensors(module) if t.device.type == "meta"]
        if missing:
            raise ArchitectureError(f"{self.directory}: the checkpoint has no tensor for {what} "
                                    f"{missing[0]} ({len(missing)} missing); check the checkpoint")
        return module.to(self.device)

    def load_layer(self, index: int) -> nn.Module:
        layer = decoder_layers(self.model)[index]
        return self.load(self.layer_keys[index], layer, f"decoder layer {index}")

    @staticmethod
    def free(module: nn.Module) -> None:
        """Give the module's memory back: its tensors return to the meta device."""
        module.to_empty(device="meta")

    def module_bytes(self, module: nn.Module) -> int:
        """Bytes of `module`'s parameters and buffers in the compute dtype."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
                   for _, t in _tensors(module))


def _tensors(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


# -- host memory between layers ------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _glibc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): its allocator is left as it is
        return None


def release_memory() -> None:
    """Hand freed heap pages back to the system; call it after a layer's weights are dropped.
    glibc keeps the chunks a layer's load (per-expert tensors, below its mmap threshold) and
    its computations freed, so without this the resident memory of a layer-by-layer run
    carries about half a layer into the next one and grows layer by layer (measured on a
    0.4 GB float32 layer: 0.85 GB above the baseline after three loads and frees, none with
    it). No-op without glibc."""
    trim = getattr(_glibc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def bound_heap() -> None:
    """Serve every allocation from 64 KiB up with its own mapping, returned when freed: a layer's
    load makes ~1 MB per-expert copies that glibc's heap (its threshold rises to 32 MB) keeps
    fragmented, so the peak of a load was 2.6 layers above the baseline, 1.6 with this (0.4 GB
    float32 layer: 1.50 GB -> 1.09 GB peak, the same CPU time). Process-wide and for good: set
    by the layer-sequential search, whose process exists to hold little; see bounded_heap."""
    mallopt = getattr(_glibc(), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _SMALL_MMAP)  # fixed from now on: no dynamic rise


_M_MMAP_THRESHOLD = -3
_SMALL_MMAP, _LARGE_MMAP = 64 * 1024, 32 * 1024 * 1024  # the range of glibc's dynamic threshold


@contextlib.contextmanager
def bounded_heap():
    """bound_heap for the block only (a layer's load); afterwards allocations up to 32 MB come
    from the heap again (the threshold glibc's dynamic rule would reach, fixed). Under
    bound_heap a forward pass maps and faults in fresh pages for every tensor it makes: on the
    1.07 GB benchmark checkpoint, layer-sequential calibration took 63 s of CPU with it for the
    whole run (24 s of them system time), 44 s with it around the loads only (as without it),
    at about the same peak RSS (1.74 GB / 1.80 GB; 2.38 GB with none of these helpers)."""
    mallopt = getattr(_glibc(), "mallopt", None)
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, _SMALL_MMAP)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _LARGE_MMAP)


def model_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the whole model's parameters in `dtype` (a skeleton counts as loaded)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * (size if p.is_floating_point() else p.element_size())
               for p in model.parameters())


__all__ = ["DTYPES", "LayerLoader", "LazyTensor", "bound_heap", "bounded_heap", "build_skeleton",
           "decoder_layers", "lazy_tensors", "model_bytes", "read_tensor", "release_memory"]
