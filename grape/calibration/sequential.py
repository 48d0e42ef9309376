"""Layer-sequential calibration: any size of model on one device, one decoder layer at a time.

    scores = calibrate_sequential("/models/DeepSeek-V3", data, CalibrationConfig(), device="cuda:0")

1. The model is built on the meta device (grape.models.layerwise): no weights in memory.
2. The calibration tokens are embedded once (only the embedding table is loaded).
3. For each decoder layer: its weights are read from the safetensors shards onto the device
   (quantised experts dequantised), every batch runs through it under the same
   grape.calibration.observer.ExpertObserver as a whole-model pass, and its outputs replace its inputs as
   the next layer's inputs. A MoE layer's similarity and cost curves are measured while its
   weights are there. Then the layer is freed.

Peak device memory is one layer plus the hidden states of the calibration set (kept on the
device when they fit, else in host memory, else in a memory-mapped file). Host memory holds
one layer too: a layer's load runs under grape.models.layerwise.bounded_heap and the freed
heap goes back to the system after each load and each layer (release_memory), else glibc
keeps the loader's per-expert copies and the resident set grows layer by layer.

Each layer gets the
arguments the model's own forward gives it - rotary position embeddings, position ids, the
causal (or sliding-window, per layer type) mask - because they are taken from the model's own
forward run with every decoder layer replaced by a stub that records its arguments
(:func:`layer_arguments`); so a family needs no code here. Same observer, same tokens, same
batches, same kernels: the statistics equal the whole-model pass's (the tests check every
family). With a checkpoint folder (grape.calibration.resume) each finished layer is saved with the hidden
states after it, so an interrupted run resumes at the last finished layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from grape.models.adapters import get_adapter
from grape.calibration.calibrate import (
    BatchPlan,
    CalibrationConfig,
    _progress,
    assemble_scores,
    layer_scores,
    mask_kwargs,
    merge_layers,
    open_checkpoint,
    plan_batches,
    prepare_input,
    run_settings,
)
from grape.calibration.distributed import (
    World,
    current_world,
    gather_to_main,
    maximum,
    owner,
    reduce_layer,
)
from grape.errors import ArchitectureError, DataError
from grape.models.layerwise import (
    LayerLoader,
    PassThrough,
    bounded_heap,
    build_skeleton,
    decoder_layers,
    release_memory,
)
from grape.models.sizes import model_sizes
from grape.calibration.observer import ExpertObserver
from grape.calibration.resume import CalibrationCheckpoint, layer_scores_from_state, layer_scores_state
from grape.calibration.runreport import Meter
from solvers._io import atomic_open, staging_prefix
from solvers.scores import Scores

STORAGE = ("auto", "device", "cpu", "disk")
_GB = 1e9


# -- where the hidden states live ----------------------------------------------------------
def choose_storage(requested: str, nbytes: int, device: torch.device, layer_bytes: int) -> str:
    """'device' when the hidden states fit the device beside the largest layer (twice, for the
    conversion's transient copies) with 10% to spare; else 'cpu' when they fit in 80% of the
    available host memory; else 'disk' (a memory-mapped file)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes + 2 * layer_bytes < 0.9 * free:
            return "device"
    from grape.models.host_memory import available_bytes

    if nbytes < 0.8 * available_bytes()[0]:  # a container's memory limit bounds it too
        return "cpu"
    return "disk"


class HiddenStates:
    """This rank's hidden states between two layers, (sequences, seq_len, hidden) in the compute
    dtype, written back in place batch by batch (a layer's output replaces its input)."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype, where: str,
                 device: torch.device, scratch: Path):
        self.where, self.device, self.file = where, device, None
        numel = shape[0] * shape[1] * shape[2]
        if where == "disk":  # a file in the checkpoint folder (else the temporary folder)
            scratch.mkdir(parents=True, exist_ok=True)
            # a GRAPE staging name: a killed run's scratch is removed by the next run resuming here
            fd, name = tempfile.mkstemp(prefix=staging_prefix("hidden"), suffix=".tmp", dir=scratch)
            os.close(fd)
            self.file = Path(name)
            self.data = torch.from_file(str(self.file), shared=True, size=numel,
                                        dtype=dtype).view(shape)
        elif where == "cpu":
            pin = torch.cuda.is_available() and device.type == "cuda"
            self.data = torch.empty(shape, dtype=dtype, pin_memory=pin)
        else:
            self.data = torch.empty(shape, dtype=dtype, device=device)

    def get(self, rows: slice) -> torch.Tensor:
        return self.data[rows].to(self.device, non_blocking=True)

    def put(self, rows: slice, value: torch.Tensor) -> None:
        self.data[rows].copy_(value)

    def save(self, path: Path) -> None:
        """Raw bytes, sequence by sequence (bounded extra memory), renamed into place (the
        temporary file removed on failure; a refused write is one line naming `path`)."""
        with atomic_open(path, "wb") as handle:
            for row in self.data:
                handle.write(row.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())

    def load(self, path: Path) -> None:
        width = self.data[0].numel() * self.data.element_size()
        with open(path, "rb") as handle:
            for row in self.data:
                raw = bytearray(handle.read(width))
                if len(raw) != width:
                    raise DataError(f"{path} is truncated; delete the checkpoint folder and rerun")
                row.copy_(torch.frombuffer(raw, dtype=self.data.dtype).view(row.shape))

    def close(self) -> None:
        del self.data
        if self.file is not None:
            self.file.unlink(missing_ok=True)


# -- the arguments the model's forward gives each layer ------------------------------------
# the decoder's final norm by the names the families give it, and the position modules (rotary
# or other) the layers' arguments are computed with, outside the decoder layers
FINAL_NORMS = ("norm", "norm_f", "final_layernorm", "embedding_norm")
POSITION_MODULES = ("rotary_emb", "pos_emb")


def final_norm_name(inner: nn.Module) -> str | None:
    return next((name for name in FINAL_NORMS if isinstance(getattr(inner, name, None), nn.Module)), None)


@contextlib.contextmanager
def _stubbed(model: nn.Module):
    layers, inner = decoder_layers(model), model.model
    sink: dict = {}
    name = final_norm_name(inner)
    originals, norm = list(layers), getattr(inner, name) if name else None
    try:
        for index, layer in enumerate(originals):
            layers[index] = PassThrough(layer, lambda args, kwargs, i=index: sink.__setitem__(i, (args, kwargs)))
        if norm is not None:
            setattr(inner, name, nn.Identity())  # its weight stays on meta; its output is not used
        yield sink
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
        if norm is not None:
            setattr(inner, name, norm)


def layer_arguments(model: nn.Module, shape: tuple[int, int], mask: torch.Tensor | None,
                    device: torch.device, dtype: torch.dtype) -> list[tuple[tuple, dict]]:
    """(args, kwargs) each decoder layer receives from the model's forward of a batch of this
    shape and mask (the embeddings' values do not enter them, so zeros stand in)."""
    hidden = model.config.hidden_size
    embeds = torch.zeros(*shape, hidden, dtype=dtype, device=device)
    with torch.no_grad(), _stubbed(model) as sink:
        model.model(inputs_embeds=embeds, use_cache=False, **mask_kwargs(mask, device))
    return [sink[index] for index in range(len(decoder_layers(model)))]


class _Arguments:
    """layer_arguments per batch, remembered for the few distinct (shape, mask) there are."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, size: int = 4):
        self.model, self.device, self.dtype, self.size = model, device, dtype, size
        self.cache: OrderedDict = OrderedDict()

    def get(self, batch: torch.Tensor, mask: torch.Tensor | None) -> list:
        key = (tuple(batch.shape), None if mask is None else
               hashlib.sha1(mask.to(torch.uint8).numpy().tobytes()).hexdigest())
        if key not in self.cache:
            self.cache[key] = layer_arguments(self.model, tuple(batch.shape), mask, self.device,
                                              self.dtype)
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        return self.cache[key]


# the public name of the cache (grape.pruning.repair_sequential moves its tokens with it too)
LayerArguments = _Arguments


def place_position_modules(model: nn.Module, device: torch.device) -> None:
    """The position modules' buffers, computed at init (no weights to load), to the device."""
    for name in POSITION_MODULES:
        module = getattr(model.model, name, None)
        if isinstance(module, nn.Module):
            module.to(device)


# -- the run ----------------------------------------------------------------------------------
def resolve_dtype(dtype, device: torch.device, config) -> torch.dtype:
    """'auto': float32 on the CPU (half precision is slow there), the checkpoint's on GPUs."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return getattr(torch, str(dtype))
    if device.type == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return stored if isinstance(stored, torch.dtype) else getattr(torch, str(stored or "float32"))


@dataclass
class _Run:
    """Everything one sequential calibration holds between layers."""

    model: nn.Module
    loader: LayerLoader
    observer: ExpertObserver
    plan: BatchPlan
    rows: dict[int, slice]  # batch -> its sequences in this rank's hidden states
    hidden: HiddenStates
    arguments: _Arguments
    config: CalibrationConfig
    tokens: int
    world: World
    store: CalibrationCheckpoint | None
    moe_layers: list[int]

    def embed(self) -> None:
        """The calibration tokens through the embedding table, once."""
        embed = self.model.get_input_embeddings()
        names = {id(m): n for n, m in self.model.named_modules()}
        self.loader.load(self.loader.keys_under(names[id(embed)]), embed, "the embeddings")
        with torch.no_grad():
            for b, batch, _ in self.plan.masked_batches():
                self.hidden.put(self.rows[b], embed(batch.to(self.loader.device)))
        self.loader.free(embed)
        release_memory()  # the table's load copies, kept by glibc otherwise

    def run_layer(self, index: int) -> tuple[dict, dict]:
        """Decoder layer `index` over every batch of this rank; for a MoE layer also its scores
        (on its owner rank) and its subsample size. Returns ({layer: scores}, {layer: rows})."""
        with bounded_heap():  # the load's per-expert copies mapped apart, not left in the heap
            layer = self.loader.load_layer(index)
        release_memory()  # what the load freed in the heap all the same
        moe = index in self.moe_layers
        if moe:
            self.observer.set_recording(True, [index])
        with torch.no_grad():
            for b, batch, mask in self.plan.masked_batches():
                args, kwargs = self.arguments.get(batch, mask)[index]
                self.observer.plan_call(b + 1, self.plan.sample_rows[b])
                self.observer.set_token_mask(mask)
                out = layer(self.hidden.get(self.rows[b]), *args, **kwargs)
                self.hidden.put(self.rows[b], _hidden_out(out, index))
            self.observer.set_token_mask(None)
            scores, sampled = self._moe_scores(index) if moe else ({}, {})
        self.loader.free(layer)
        # the layer's pages and the scoring's transients back to the system: glibc would keep
        # them, and the resident memory would grow layer by layer (as in the sequential search)
        release_memory()
        return scores, sampled

    def _moe_scores(self, index: int) -> tuple[dict, dict]:
        state = self.observer.layer_state(index)
        reduce_layer(state, self.world, self.loader.device)
        self.observer.pause([index])
        sampled = {index: state.sampled}
        scores = {}
        if owner(self.moe_layers.index(index), self.world) == self.world.rank:
            adapter = self.observer.adapter
            result = self.observer.result(index)
            scores[index] = layer_scores(adapter, index, result, self.config, self.tokens)
            if self.store is not None:
                self.store.save(f"layer{index}.scores.pt",
                                {"scores": layer_scores_state(scores[index]), "sampled": sampled})
        self.observer.release(index)
        return scores, sampled

    def save(self, done: int) -> None:
        """Commit 'the first `done` decoder layers are finished'."""
        if self.store is None:
            return
        tag = self.world.tag()
        # raw bytes, no room for the run key inside: it is in the file's name
        self.hidden.save(self.store.run_path(f"{tag}.hidden-{done}.bin"))
        self.store.commit({"layers_done": done})
        self.store.run_path(f"{tag}.hidden-{done - 1}.bin").unlink(missing_ok=True)

    def restore(self) -> tuple[int, dict, dict]:
        """(decoder layers already done, their scores owned here, subsample rows); every rank
        resumes from the same layer, or all start over."""
        done, scores, sampled = self._restore_here()
        if -maximum(-float(done), self.world) != done:  # a rank cannot resume: nobody does
            return 0, {}, {}
        return done, scores, sampled

    def _restore_here(self) -> tuple[int, dict, dict]:
        progress = self.store.progress() if self.store is not None else None
        done = int(progress["layers_done"]) if progress else 0
        hidden_file = self.store.run_path(f"{self.world.tag()}.hidden-{done}.bin") if done else None
        if done == 0 or not hidden_file.is_file():
            return 0, {}, {}
        self.hidden.load(hidden_file)
        scores, sampled = {}, {}
        for position, index in enumerate(i for i in self.moe_layers if i < done):
            saved = self.store.load(f"layer{index}.scores.pt")
            if owner(position, self.world) == self.world.rank:
                if saved is None:
                    return 0, {}, {}
                scores[index] = layer_scores_from_state(saved["scores"])
            if saved is not None:
                sampled.update({int(k): int(v) for k, v in saved["sampled"].items()})
        return done, scores, sampled


def _hidden_out(out, index: int) -> torch.Tensor:
    """A decoder layer's hidden states; a layer that returns more for the next one (the
    adapter should have declared sequential_refusal) stops the run instead of dropping it."""
    if not isinstance(out, (tuple, list)):
        return out
    if len(out) > 1 and any(isinstance(o, torch.Tensor) for o in out[1:]):
        raise ArchitectureError(f"decoder layer {index} returns {len(out)} tensors, not the hidden "
                                "states alone: a layer-sequential run would drop what it hands the next "
                                "layer; use --mode whole")
    return out[0]


def _local_rows(plan: BatchPlan) -> dict[int, slice]:
    rows, at = {}, 0
    for b in plan.mine:
        rows[b] = slice(at, at + int(plan.batches[b].shape[0]))
        at += int(plan.batches[b].shape[0])
    return rows


def _identity(loader: LayerLoader, adapter):
    """The model identity (router fingerprint included) with only the routers loaded."""
    names = {id(m): n for n, m in loader.model.named_modules()}
    routers = [adapter.router(layer) for layer in sorted(adapter.moe_blocks())]
    for layer, router in zip(sorted(adapter.moe_blocks()), routers):
        loader.load(loader.keys_under(names[id(router)]), router, f"the router of layer {layer}")
    identity = adapter.identity()
    for router in routers:
        loader.free(router)
    return identity


def calibrate_sequential(
    model_dir: str | os.PathLike,
    data,
    config: CalibrationConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "auto",
    checkpoint: str | os.PathLike | None = None,
    hidden_states: str = "auto",
    reason: str = "--mode sequential",
) -> Scores | None:
    """Calibrate the checkpoint in `model_dir` one decoder layer at a time on `device` (see the
    module docstring); the same Scores as `grape.calibration.calibrate.calibrate` on the loaded model.
    `hidden_states`: 'auto', 'device', 'cpu' or 'disk' (a file in the checkpoint folder).
    In a torch.distributed job rank 0 returns the Scores, the other ranks None."""
    config = config or CalibrationConfig()
    if hidden_states not in STORAGE:
        raise DataError(f"hidden_states {hidden_states!r} is not one of {', '.join(STORAGE)}")
    device = torch.device(device)
    model = build_skeleton(model_dir, resolve_dtype(dtype, device, _config(model_dir)))
    refuse_unhandled(model)
    dtype = next(model.parameters()).dtype
    input_ids, mask, provenance, tokens = prepare_input(data, config, model.config.to_dict())
    world, meter = current_world(), Meter([device])
    adapter = get_adapter(model)
    loader = LayerLoader(model, model_dir, device, dtype)
    identity = _identity(loader, adapter)
    plan = plan_batches(input_ids, mask, config, world)
    store = open_checkpoint(checkpoint, run_settings(config, "sequential", world, dtype, identity),
                            input_ids, mask, world)
    shape = (sum(int(plan.batches[b].shape[0]) for b in plan.mine), int(input_ids.shape[1]),
             int(model.config.hidden_size))
    nbytes = shape[0] * shape[1] * shape[2] * torch.empty((), dtype=dtype).element_size()
    largest = max(loader.module_bytes(layer) for layer in decoder_layers(model))
    where = choose_storage(hidden_states, nbytes, device, largest)
    scratch = Path(checkpoint) if checkpoint else Path(tempfile.gettempdir())
    hidden = HiddenStates(shape, dtype, where, device, scratch)
    place_position_modules(model, device)
    quota = config.sample_quota
    try:
        with ExpertObserver(model, adapter, sample_tokens=quota, seed=config.seed) as observer:
            run = _Run(model, loader, observer, plan, _local_rows(plan), hidden,
                       _Arguments(model, device, dtype), config, tokens, world, store,
                       sorted(adapter.moe_blocks()))
            layers, sampled = _run_layers(run)
    finally:
        hidden.close()
    report = meter.report("sequential", reason, tokens, world, hidden_states=where)
    if not world.main:
        return None
    return assemble_scores(identity, layers, tokens, provenance, config, dtype, input_ids,
                           sampled, report, sizes=model_sizes(model, identity, model_dir))


def _run_layers(run: _Run) -> tuple[dict | None, dict]:
    observer = run.observer
    observer.pause()  # each MoE layer records only while it runs
    done, scores, sampled = run.restore()
    if done == 0:
        run.embed()
    count = len(decoder_layers(run.model))
    for index in _progress(range(done, count), count - done, "calibrating layer by layer",
                           run.config.progress):
        layer_scores_, layer_sampled = run.run_layer(index)
        scores.update(layer_scores_)
        sampled.update(layer_sampled)
        run.save(index + 1)
    return merge_layers(gather_to_main(scores, run.world)), sampled


def refuse_unhandled(model: nn.Module) -> None:
    """Outside the decoder layers, a sequential run stands in for the decoder's final norm (one of
    FINAL_NORMS) while it records each layer's arguments, and moves the position modules to the
    device: a model whose final norm has another name would run weights that were never loaded."""
    why = getattr(get_adapter(model), "sequential_refusal", None)
    if why:
        raise ArchitectureError(f"layer-sequential runs do not handle {model.config.model_type} models: "
                                f"{why}; use --mode whole")
    if final_norm_name(model.model) is None:
        raise ArchitectureError(f"layer-sequential calibration does not handle this "
                                f"{model.config.model_type} model yet: its final norm is none of "
                                f"model.model.{{{','.join(FINAL_NORMS)}}}; use --mode whole")


def _config(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)  # never prompt


__all__ = ["HiddenStates", "LayerArguments", "STORAGE", "calibrate_sequential", "choose_storage",
           "layer_arguments", "place_position_modules", "resolve_dtype"]
