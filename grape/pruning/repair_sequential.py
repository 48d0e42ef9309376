"""Repair at any size: prune and repair a checkpoint from its shards, one decoder layer at a time.

    repaired = stream_repair("/models/Qwen3-235B-A22B", plan, "pruned/", ApplyConfig(repair="lstsq"),
                             input_ids)
    repaired.path, repaired.report.line()

The in-memory repair (grape.pruning.repair.prune_and_repair) holds the whole model. This one holds one
decoder layer plus the calibration hidden states, as the layer-sequential calibration does, and
reuses its machinery (grape.calibration.sequential: the meta-device skeleton, the LayerLoader that reads one
layer from the shards, HiddenStates kept on the device, in host memory or in a file, the
arguments the model's forward gives each layer):

1. the plan is checked and the pruned checkpoint's tensors laid out exactly as the streaming
   apply does (grape.pruning.streaming: routers read, plan applied to a skeleton, every stored tensor
   mapped to its pruned form as byte ranges) - before any layer is read;
2. the calibration tokens are embedded once;
3. up to the last pruned layer, each decoder layer is read from the shards and, if pruned, its
   MoE block's inputs captured, then pruned and repaired by the very code the in-memory repair
   runs (grape.pruning.repair.LayerPass and repair_layer: the ORIGINAL experts' output on those inputs
   is the target; the inputs come from the pruned, repaired layers below, as in memory); the
   tokens go on through the repaired layer, and the layer is freed;
4. each repaired layer's changed tensors (the kept experts' down projections, and their biases
   where the family has them; the router's weight rows and bias with ``router`` /
   ``lstsq+router``) are turned back into the checkpoint's own stored names and layout
   (transformers' ``revert_weight_conversion``, checked against the stored bytes of the original
   layer) and written as a small safetensors file;
5. the checkpoint is written shard by shard as ``grape apply --mode streaming`` writes it, those
   tensors replacing the plainly pruned ones; every other tensor is copied byte for byte.

Same batches, same layer arguments, same kernels: on the same device and dtype the repaired
tensors equal the in-memory repair's bit for bit (tests/test_repair_sequential.py). The compute
dtype is float32 on the CPU (the checkpoint's on a GPU), as for the sequential calibration; the
repaired tensors are written in the stored dtype.

Resumable: the progress lives in ``OUT.partial/`` beside the output (grape.calibration.resume) - after each
layer the hidden states, the finished layers' fit records and repaired tensors - so a run
interrupted and started again with the same command and data continues after the last finished
layer and writes the same checkpoint; the folder is removed once the checkpoint is written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from grape.errors import ArchitectureError, PlanError
from grape.pruning.apply import ApplyConfig
from grape.pruning.repair import LayerPass, LayerRepair, RepairReport, RepairSettings, repair_layer, settings_for
from grape.models.layerwise import release_memory
from grape.models.shards import Piece, StoredTensor
from solvers.plan import Plan

WHO = "grape apply"
_FORMAT = 1  # of the resume folder's contents; another value starts over


@dataclass(frozen=True)
class Repaired:
    path: Path  # the checkpoint written
    report: RepairReport
    hidden_states: str  # where the hidden states lived: device, cpu or disk
    resumed_at: int  # decoder layers already done by an earlier, interrupted run


@dataclass(frozen=True)
class _Target:
    """The pruned checkpoint as the streaming apply lays it out, before repair."""

    model: nn.Module  # meta-device skeleton with the plan applied: the output's config
    stored: dict[str, StoredTensor]  # the source checkpoint's tensors
    tensors: list[StoredTensor]  # the pruned checkpoint's tensors, in stored order
    dropped: int  # stored tensors of layers the config does not have

    def pruned(self) -> dict[str, StoredTensor]:
        return {t.name: t for t in self.tensors}


def _target(model_dir: Path, plan: Plan, allow_lower_top_k: bool) -> _Target:
    """What stream_apply computes before writing (the same calls, in the same order): routers
    read, plan validated and applied to the skeleton (its config is the output's), stored
    tensors mapped to their pruned form and their shapes checked against the pruned model."""
    from grape.models.adapters import get_adapter
    from grape.pruning.apply import apply_plan
    from grape.models.shards import stored_tensors
    from grape.pruning.streaming import check_shapes, load_skeleton, pruned_tensors

    stored = stored_tensors(model_dir)
    model, layouts = load_skeleton(model_dir, stored)
    apply_plan(model, plan, ApplyConfig("remove", allow_lower_top_k=allow_lower_top_k))
    for layer, layout in layouts.items():
        layout.keep = sorted(plan.kept[layer])
        layout.new_index = {expert: i for i, expert in enumerate(layout.keep)}
    tensors, dropped = pruned_tensors(stored, layouts, int(model.config.num_hidden_layers))
    check_shapes(model, get_adapter(model), layouts, tensors)
    return _Target(model, stored, tensors, len(dropped))


# -- the repaired tensors in the checkpoint's own names and layout ----------------------------------
_CHANGED = ("down_proj", "down_proj_bias")  # all grape.pruning.repair_fit changes


def _changed_tensors(model: nn.Module, adapter, layer: int, method: str = "lstsq") -> dict[str, torch.Tensor]:
    """The tensors `method` may change, under their model names: the experts' down projections
    first (check_layout compares the first value for value), then the experts' other tensors if
    one of its stages is the experts re-fit, the router's parameters if one is the router re-fit."""
    from grape.pruning.repair import STAGES
    from grape.pruning.repair_router import router_parameters

    experts = adapter.experts(layer)
    names = {id(m): n for n, m in model.named_modules()}
    out = {f"{names[id(experts)]}.{t}": getattr(experts, t).detach() for t in _CHANGED
           if isinstance(getattr(experts, t, None), torch.Tensor)}
    if "experts" in STAGES.get(method, ()):  # every expert tensor (the down projections stay first)
        out.update({f"{names[id(experts)]}.{n}": t.detach() for n, t in experts.named_parameters()
                    if f"{names[id(experts)]}.{n}" not in out})
    if "router" in STAGES.get(method, ()):
        router = names[id(adapter.router(layer))]
        out.update({f"{router}.{n}": t.detach() for n, t in router_parameters(adapter, layer).items()})
    return out


def _stored_form(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (model names) under the checkpoint's names and layout, as save_pretrained
    writes them (per-expert tensors split out again, renamed, transposed back)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


def _unmatched(layer: int, name: str) -> ArchitectureError:
    return ArchitectureError(f"layer {layer}: the repaired expert tensor {name} does not match this "
                             "checkpoint's stored layout; repair it with --mode in-memory")


def check_layout(model: nn.Module, adapter, layer: int, stored: dict[str, StoredTensor],
                 method: str = "lstsq") -> None:
    """The loaded (not yet pruned) layer's tensors `method` changes (down projections, router),
    turned back into stored form, are the checkpoint's tensors: every name and shape, and the
    first one value for value (a transposed square matrix would pass a shape check)."""
    from grape.models.layerwise import DTYPES, read_tensor

    form = _stored_form(model, _changed_tensors(model, adapter, layer, method))
    for position, (name, value) in enumerate(form.items()):
        source = stored.get(name)
        if source is None or list(value.shape) != list(source.shape):
            raise _unmatched(layer, name)
        if position == 0 and not torch.equal(value.cpu().to(DTYPES[source.dtype]), read_tensor(source)):
            raise _unmatched(layer, name)


def repaired_tensors(model: nn.Module, adapter, layer: int, pruned: dict[str, StoredTensor],
                     method: str = "lstsq") -> dict[str, torch.Tensor]:
    """The repaired layer's changed tensors under their pruned-checkpoint names, in the stored dtype."""
    from grape.models.layerwise import DTYPES

    out = {}
    for name, value in _stored_form(model, _changed_tensors(model, adapter, layer, method)).items():
        target = pruned.get(name)
        if target is None or list(value.shape) != list(target.shape) or target.dtype not in DTYPES:
            raise _unmatched(layer, name)
        out[name] = value.to(DTYPES[target.dtype])
    return out


def substituted(tensors: list[StoredTensor], files: list[Path]) -> list[StoredTensor]:
    """`tensors` with those the safetensors `files` hold replaced by their byte ranges there."""
    from grape.models.files import read_header

    replacing: dict[str, StoredTensor] = {}
    for file in files:
        header, data_start, _ = read_header(file)
        header.pop("__metadata__", None)
        for name, info in header.items():
            start, stop = (int(v) for v in info["data_offsets"])
            replacing[name] = StoredTensor(name, str(info["dtype"]), [int(d) for d in info["shape"]],
                                           [Piece(file, data_start + start, stop - start)])
    missing = set(replacing) - {t.name for t in tensors}
    if missing:
        raise PlanError(f"repaired tensor {sorted(missing)[0]} is not in the pruned checkpoint")
    return [replacing.get(t.name, t) for t in tensors]


# -- the hidden states, batch by batch ----------------------------------------------------------------
class StoredBatches:
    """grape.pruning.repair.MemoryBatches' batches (rows of `batch_size`), their hidden states in a
    grape.calibration.sequential.HiddenStates and their layer arguments from its cache."""

    def __init__(self, hidden, ids: torch.Tensor, mask: torch.Tensor | None, batch_size: int,
                 arguments):
        self.hidden, self.cache = hidden, arguments
        self.rows = [slice(r, r + batch_size) for r in range(0, ids.shape[0], batch_size)]
        self.ids = [ids[rows] for rows in self.rows]
        self.masks = [None if mask is None else mask[rows] for rows in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, batch: int) -> torch.Tensor:
        return self.hidden.get(self.rows[batch])

    def put(self, batch: int, value: torch.Tensor) -> None:
        self.hidden.put(self.rows[batch], value)

    def arguments(self, batch: int, index: int) -> tuple[tuple, dict]:
        return self.cache.get(self.ids[batch], self.masks[batch])[index]


# -- one run -------------------------------------------------------------------------------------------
@dataclass
class _Run:
    """Everything the layer loop holds: the compute skeleton and its loader, the tokens'
    hidden states, the resume folder, and what the plan and the repair ask for."""

    model: nn.Module
    adapter: Any
    loader: Any  # grape.models.layerwise.LayerLoader
    passes: LayerPass
    store: Any  # grape.calibration.resume.CalibrationCheckpoint
    plan: Plan
    pruned: list[int]
    method: str
    settings: RepairSettings
    target: _Target
    report: RepairReport

    def embed(self) -> None:
        """The calibration tokens through the embedding table, once (as grape.calibration.sequential)."""
        embed = self.model.get_input_embeddings()
        names = {id(m): n for n, m in self.model.named_modules()}
        self.loader.load(self.loader.keys_under(names[id(embed)]), embed, "the embeddings")
        batches = self.passes.batches
        with torch.no_grad():
            for b in range(len(batches)):
                batches.put(b, embed(batches.ids[b].to(self.loader.device)))
        self.loader.free(embed)

    def layer(self, index: int) -> None:
        """Decoder layer `index` from the shards: repaired if pruned, the tokens moved on
        through it unless it is the last pruned one, then freed."""
        layer = self.loader.load_layer(index)
        if index in self.pruned:
            check_layout(self.model, self.adapter, index, self.target.stored, self.method)
            x = self.passes.block_inputs(index, layer)
            fit = repair_layer(self.adapter, index, self.plan.kept[index], x, self.method, self.settings)
            del x
            self.report.layers.append(fit)
            self.store.save_tensors(_tensors_name(index), repaired_tensors(
                self.model, self.adapter, index, self.target.pruned(), self.method))
        if index < self.pruned[-1]:
            self.passes.forward(index, layer)
        self.loader.free(layer)
        release_memory()

    # -- resume --------------------------------------------------------------------------------
    def save(self, done: int) -> None:
        """Commit 'the first `done` decoder layers are finished' (the hidden states after them
        only while a layer is left to run)."""
        if done <= self.pruned[-1]:
            self.passes.batches.hidden.save(self.store.run_path(f"hidden-{done}.bin"))
        self.store.commit({"layers_done": done, "repairs": [r.to_json() for r in self.report.layers]})
        self.store.run_path(f"hidden-{done - 1}.bin").unlink(missing_ok=True)

    def restore(self) -> int:
        """Decoder layers an earlier run finished (0: start over), their state loaded."""
        progress = self.store.progress() or {}
        done = int(progress.get("layers_done", 0))
        hidden = self.store.run_path(f"hidden-{done}.bin")
        files = [self.store.tensors_file(_tensors_name(i)) for i in self.pruned if i < done]
        if done == 0 or None in files or (done <= self.pruned[-1] and not hidden.is_file()):
            return 0
        if done <= self.pruned[-1]:
            self.passes.batches.hidden.load(hidden)
        self.report.layers = [LayerRepair(**r) for r in progress.get("repairs", [])]
        return done

    def files(self) -> list[Path]:
        """The repaired tensors of every pruned layer (each written before its layer was committed)."""
        files = [self.store.tensors_file(_tensors_name(i)) for i in self.pruned]
        missing = [i for i, file in zip(self.pruned, files) if file is None]
        if missing:
            raise PlanError(f"{self.store.directory} lacks the repaired tensors of layer {missing[0]} "
                            "(removed while the run was going on?); delete the folder and run again")
        return files


def _tensors_name(layer: int) -> str:
    return f"layer{layer}.repaired.safetensors"


def _loop(run: _Run, done: int, progress: bool, on_layer: Callable[[int], None] | None) -> None:
    from tqdm.auto import tqdm

    stop = run.pruned[-1] + 1  # nothing above the last pruned layer changes
    if done == 0:
        run.embed()
    for index in tqdm(range(done, stop), total=stop - done, desc="repairing layer by layer",
                      disable=not progress, leave=False):
        run.layer(index)
        run.save(index + 1)
        if on_layer is not None:
            on_layer(index)


# -- the verb ------------------------------------------------------------------------------------------
def stream_repair(model_dir: str | os.PathLike, plan: Plan, out: str | os.PathLike, config: ApplyConfig,
                  input_ids, attention_mask=None, *, settings: RepairSettings | None = None,
                  device: str | torch.device = "auto", hidden_states: str = "auto",
                  checkpoint: str | os.PathLike | None = None, tokenizer: Any = None,
                  provenance: dict | None = None, overwrite: bool = False, progress: bool = False,
                  say: Callable[[str], None] = print,
                  on_layer: Callable[[int], None] | None = None) -> Repaired:
    """Apply `plan` to the checkpoint in `model_dir` with ``config.repair``, fitted on the
    calibration tokens `input_ids`, one decoder layer at a time, and write the pruned, repaired
    checkpoint to `out` shard by shard (see the module docstring). `checkpoint`: the resume
    folder (default ``OUT.partial`` beside `out`); `hidden_states`: 'auto', 'device', 'cpu' or
    'disk' (grape.calibration.sequential.choose_storage); `on_layer(index)`: called after each finished
    layer is saved (tests interrupt the run there)."""
    from grape.calibration.resume import discard, partial_dir
    from grape.pruning.streaming import write_checkpoint

    start = time.perf_counter()
    job = _prepare(Path(model_dir), plan, Path(out), config, input_ids, attention_mask,
                   settings_for(config, settings), hidden_states, overwrite)
    ids, mask = job.ids, job.mask
    report = RepairReport(config.repair, tokens=int(ids.numel() if mask is None else mask.sum()))
    folder = Path(checkpoint) if checkpoint is not None else partial_dir(out)
    done = _Layers("none", 0, [])
    if job.pruned:
        done = _repair_layers(job, report, _Where(device, hidden_states, folder), progress, say, on_layer)
    report.seconds = time.perf_counter() - start
    path = write_checkpoint(job.target.model, plan, substituted(job.target.tensors, done.files), Path(out),
                            tokenizer=tokenizer, provenance=_record(job, report, done, provenance),
                            max_shard_size=config.max_shard_size, overwrite=overwrite,
                            source=job.model_dir, progress=progress)
    if job.pruned:
        discard(folder)  # the checkpoint is written: its progress is no longer needed
    return Repaired(Path(path), report, done.storage, done.resumed_at)


@dataclass(frozen=True)
class _Job:
    """One repair's inputs, checked."""

    model_dir: Path
    plan: Plan
    config: ApplyConfig
    settings: RepairSettings
    ids: torch.Tensor
    mask: torch.Tensor | None
    target: _Target
    pruned: tuple[int, ...]  # the MoE layers the plan removes experts from, in order


@dataclass(frozen=True)
class _Layers:
    """What the layer loop hands back."""

    storage: str  # where the hidden states lived ('none': no layer is pruned)
    resumed_at: int
    files: list[Path]  # the repaired tensors, one safetensors file per pruned layer


@dataclass(frozen=True)
class _Where:
    device: str | torch.device  # 'auto': a GPU if there is one
    hidden_states: str  # grape.calibration.sequential.STORAGE
    folder: Path  # the resume folder


def _prepare(model_dir: Path, plan: Plan, out: Path, config: ApplyConfig, input_ids, attention_mask,
             settings: RepairSettings, hidden_states: str, overwrite: bool) -> _Job:
    """Everything checked before any layer is read: the request, the plan (routers only), the
    model (not quantised), the output path, the tokens."""
    from grape.pruning.checkpoint import _check_target
    from grape.errors import DataError
    from grape.pruning.repair import check_repairable, check_tokens
    from grape.calibration.sequential import STORAGE

    if config.repair == "none" or config.method != "remove":
        raise PlanError(f"stream_repair fits a repair after --method remove; got --method "
                        f"{config.method} with --repair {config.repair} (use grape.pruning.streaming.stream_apply)")
    if hidden_states not in STORAGE:
        raise DataError(f"hidden_states {hidden_states!r} is not one of {', '.join(STORAGE)}")
    target = _target(model_dir, plan, config.allow_lower_top_k)
    check_repairable(target.model, config)
    _check_target(out, target.model, overwrite)  # a refused --out fails now, not after the fits
    vocab = int(target.model.config.get_text_config().vocab_size)
    ids, mask = check_tokens(input_ids, attention_mask, vocab)
    pruned = tuple(layer for layer in plan.layers if plan.removed[layer])
    return _Job(model_dir, plan, config, settings, ids, mask, target, pruned)


def _record(job: _Job, report: RepairReport, done: _Layers, provenance: dict | None) -> dict:
    """The provenance stream_apply writes, plus the repair's (the caller's "repair" entries,
    e.g. the data it read, merged in)."""
    record = {"apply_mode": "streaming", "max_shard_size": str(job.config.max_shard_size)}
    if job.target.dropped:
        record["dropped_tensors"] = job.target.dropped
    extra = dict(provenance or {})
    record.update({k: v for k, v in extra.items() if k != "repair"})
    record["repair"] = {**report.to_json(), "layer_sequential": True, "hidden_states": done.storage,
                        "rows": int(job.ids.shape[0]), "seq_len": int(job.ids.shape[1]),
                        **(extra.get("repair") or {})}
    return record


def _repair_layers(job: _Job, report: RepairReport, where: _Where, progress: bool, say,
                   on_layer) -> _Layers:
    """The layer loop on a meta-device skeleton, from the resume folder's progress."""
    from grape.models.adapters import get_adapter
    from grape.models.layerwise import LayerLoader, build_skeleton, decoder_layers
    from grape.models.placement import sequential_device
    from grape.calibration.sequential import (HiddenStates, LayerArguments, choose_storage, final_norm_name,
                                  place_position_modules, resolve_dtype)

    device = sequential_device(str(where.device), _world())
    model = build_skeleton(job.model_dir, resolve_dtype("auto", device, job.target.model.config))
    if final_norm_name(model.model) is None:
        raise ArchitectureError(f"layer-sequential repair does not handle this {model.config.model_type} "
                                "model (no final norm where grape.calibration.sequential expects one); repair it "
                                "with --mode in-memory")
    dtype = next(model.parameters()).dtype
    store = _open_store(job, where.folder, dtype, device, say)
    loader = LayerLoader(model, job.model_dir, device, dtype)
    shape = (int(job.ids.shape[0]), int(job.ids.shape[1]), int(model.config.hidden_size))
    nbytes = shape[0] * shape[1] * shape[2] * torch.empty((), dtype=dtype).element_size()
    largest = max(loader.module_bytes(layer) for layer in decoder_layers(model))
    storage = choose_storage(where.hidden_states, nbytes, device, largest)
    hidden = HiddenStates(shape, dtype, storage, device, store.directory)
    place_position_modules(model, device)
    adapter = get_adapter(model)
    batches = StoredBatches(hidden, job.ids, job.mask, job.settings.batch_size,
                            LayerArguments(model, device, dtype))
    run = _Run(model, adapter, loader, LayerPass(adapter, batches), store, job.plan, list(job.pruned),
               job.config.repair, job.settings, job.target, report)
    try:
        done = run.restore()
        if done:
            say(f"{WHO}: repair resumes after decoder layer {done - 1} ({store.directory})")
        _loop(run, done, progress, on_layer)
    finally:
        hidden.close()
    return _Layers(storage, done, run.files())


def _world():
    from grape.calibration.distributed import World

    return World()  # one process: the repair runs on one device


def _open_store(job: _Job, folder: Path, dtype: torch.dtype, device: torch.device, say):
    """The resume folder, keyed by everything that changes the repaired tensors."""
    from grape.calibration.resume import CalibrationCheckpoint, run_key, weight_files_key
    from grape.pruning.repair import STAGES

    method = job.config.repair
    settings = {"what": "layer-sequential repair", "format": _FORMAT, "method": method,
                "ridge": job.settings.ridge_for(method), "sweeps": job.settings.sweeps,
                "batch_size": job.settings.batch_size, "dtype": str(dtype), "device": device.type,
                "kept": {str(k): list(v) for k, v in sorted(job.plan.kept.items())},
                "allow_lower_top_k": job.config.allow_lower_top_k,
                "weights": weight_files_key(job.model_dir)}
    if "router" in STAGES.get(method, ()):  # only then (earlier runs' keys stay the same)
        settings["router"] = {"steps": job.settings.router_steps, "lr": job.settings.router_lr}
    if "experts" in STAGES.get(method, ()):
        from grape.pruning.repair_experts import MAX_EPOCHS

        settings["experts"] = {"steps": job.settings.experts_steps, "lr": job.settings.experts_lr,
                               "batch": job.settings.experts_batch, "max_epochs": MAX_EPOCHS}
    key = run_key(settings, [job.ids, job.mask])
    return CalibrationCheckpoint.open(folder, key, _world(), say=say, who=WHO)


__all__ = ["Repaired", "StoredBatches", "check_layout", "repaired_tensors", "stream_repair",
           "substituted"]
