"""Streaming apply: prune a checkpoint of any size shard by shard, without loading the model.

    stream_apply("/models/Qwen3-235B-A22B", plan, "pruned/", method="remove")

Removing experts is slicing tensors, so ``grape apply`` (``remove`` and ``mask``) reads the
checkpoint's safetensors headers, decides for every stored tensor what the pruned checkpoint
holds, and copies bytes (grape/shards.py): memory stays at a few hundred MB whatever the size.

* routed-expert tensors in the Hub layouts: per expert (``<block>.experts.N.<...>``, e.g.
  ``mlp.experts.N.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.N.w1.weight``, FP8
  ``...weight_scale_inv``) are dropped or renumbered to the kept order; fused
  (``<block>.experts.<name>`` with the expert on dim 0: gpt-oss ``gate_up_proj``,
  ``down_proj``, biases, MXFP4 ``*_blocks`` / ``*_scales``) keep the kept experts' rows;
* router rows, router bias and ``e_score_correction_bias`` keep the kept experts' rows;
* everything else is copied byte for byte; tensors of decoder layers the config does not have
  (DeepSeek-V3's multi-token-prediction layer) are dropped, as transformers' load drops them.

What is not weights comes from the code the in-memory path uses: the model is built on the
``meta`` device (no memory) with its real router tensors read from the checkpoint, so
``grape.pruning.apply_plan`` validates the plan exactly as on a loaded model (layers, expert
counts, top_k, family rules, router fingerprint) and updates the config; then config,
generation config, modeling file (non-uniform or masked), plan, provenance and tokenizer are
written as ``grape.checkpoint.save_pruned`` writes them. Quantised checkpoints stay quantised
and keep their ``quantization_config``. ``merge`` needs the weights in memory: use apply_plan.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grape.errors import PlanError
from grape.shards import DEFAULT_MAX_SHARD_SIZE, StoredTensor, parse_size, stored_tensors, write_weights
from solvers.plan import Plan

STREAMING_METHODS = ("remove", "mask")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class StreamingError(PlanError):
    """A checkpoint whose expert tensors cannot be told apart or sliced."""


@dataclass
class MoELayout:
    """Where one MoE layer's tensors are in the checkpoint, and which experts stay."""

    layer: int
    prefix: str  # stored key prefix of the MoE block, e.g. model.layers.3.mlp
    num_experts: int
    router_keys: set[str]
    keep: list[int] = field(default_factory=list)
    new_index: dict[int, int] = field(default_factory=dict)  # original expert -> kept position
    seen: set[int] = field(default_factory=set)


# -- when streaming applies ----------------------------------------------------------------
def streaming_unavailable(model_dir: str | Path, config: dict[str, Any], method: str,
                          dtype: str = "auto") -> str | None:
    """Why `grape apply` cannot stream this checkpoint (the in-memory path is used), or None."""
    if method not in STREAMING_METHODS:
        return f"--method {method} needs the weights in memory"
    family = family_refusal(config.get("model_type"))
    if family is not None:
        return family
    if not list(Path(model_dir).glob("*.safetensors")):
        return "the checkpoint has no safetensors files"
    stored = config.get("dtype") or config.get("torch_dtype")
    if dtype != "auto" and dtype != stored:
        return f"--dtype {dtype} converts the weights (config.json says {stored})"
    return None


def family_refusal(model_type) -> str | None:
    """Why this family's checkpoints cannot be streamed (its adapter's declaration), or None."""
    from grape.adapters.base import adapter_class

    why = getattr(adapter_class(model_type), "streaming_refusal", None)
    return f"{model_type} checkpoints cannot be pruned shard by shard: {why}" if why else None


# -- the verb ---------------------------------------------------------------------------------
def stream_apply(
    model_dir: str | Path,
    plan: Plan,
    out: str | Path,
    method: str = "remove",
    *,
    tokenizer: Any = None,
    provenance: dict | None = None,
    allow_lower_top_k: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Apply `plan` to the checkpoint in `model_dir` and write the pruned checkpoint to `out`,
    streaming the weights (see the module docstring); returns the output path. The output is
    what ``apply_plan`` + ``save_pruned`` write, except that the weights keep their stored
    dtypes and the shards are cut at `max_shard_size`. `progress`: a progress bar (bytes)."""
    from grape.pruning import ApplyConfig, apply_plan

    if method not in STREAMING_METHODS:
        raise PlanError(f"streaming apply does {' and '.join(STREAMING_METHODS)}; {method!r} needs the "
                        "model in memory (grape.pruning.apply_plan)")
    parse_size(max_shard_size)
    model_dir = Path(model_dir)
    stored = stored_tensors(model_dir)
    model, layouts = load_skeleton(model_dir, stored)
    apply_plan(model, plan, ApplyConfig(method, allow_lower_top_k=allow_lower_top_k))
    for layer, layout in layouts.items():
        layout.keep = sorted(plan.kept[layer]) if method == "remove" else list(range(layout.num_experts))
        layout.new_index = {expert: i for i, expert in enumerate(layout.keep)}
    tensors, dropped = pruned_tensors(stored, layouts, int(model.config.num_hidden_layers))
    _check_routers(model, layouts, tensors)
    record = {"apply_mode": "streaming", "max_shard_size": str(max_shard_size)}
    if dropped:
        record["dropped_tensors"] = len(dropped)
    record.update(provenance or {})
    return write_checkpoint(model, plan, tensors, Path(out), tokenizer=tokenizer, provenance=record,
                            max_shard_size=max_shard_size, overwrite=overwrite, source=model_dir,
                            progress=progress)


# -- the model skeleton -------------------------------------------------------------------------
def load_skeleton(model_dir: Path, stored: dict[str, StoredTensor]):
    """The model built on the meta device from config.json (shrunk to a GRAPE checkpoint's
    per-layer counts, masks re-installed, as load_pruned does) with its router tensors read
    from the checkpoint; and where each MoE layer's tensors are stored."""
    import torch

    from grape.adapters import get_adapter
    from grape.checkpoint import causal_lm_class, pruned_class

    config, base = causal_lm_class(model_dir)
    with torch.device("meta"):
        model = pruned_class(base)(config)
    model.__class__ = base
    adapter = get_adapter(model)
    refusal = family_refusal(model.config.model_type)
    if refusal is not None:
        raise StreamingError(f"{refusal}; pass --in-memory")
    adapter.mask_from_config()
    if getattr(model.config, "dtype", None) is None:
        first = next((t.dtype for t in stored.values() if t.dtype in _FLOAT_DTYPES), None)
        model.config.dtype = _FLOAT_DTYPES.get(first)
    return model, _load_routers(model, adapter, model_dir, stored)


def _load_routers(model, adapter, model_dir: Path, stored: dict[str, StoredTensor]) -> dict[int, MoELayout]:
    from safetensors import safe_open

    from grape.adapters.fused import _per_expert_tensors, _replace_tensor
    from grape.adapters.stored import stored_names

    module_names = {id(module): name for name, module in model.named_modules()}
    wanted: dict[str, tuple[int, str]] = {}
    for layer in sorted(adapter.moe_blocks()):
        router = adapter.router(layer)
        for local in _per_expert_tensors(router, adapter.num_experts(layer)):
            wanted[f"{module_names[id(router)]}.{local}"] = (layer, local)
        _refuse_unsliced(adapter, layer, module_names)
    keys = stored_names(model, set(wanted), list(stored))
    missing = sorted(set(wanted) - set(keys))
    if missing:
        raise StreamingError(f"{model_dir}: router tensor {missing[0]} is not in the checkpoint "
                             f"({len(missing)} missing); it cannot be pruned shard by shard. Pass "
                             "--in-memory to load the model instead")
    layouts: dict[int, MoELayout] = {}
    for name, (layer, local) in sorted(wanted.items()):
        key = keys[name]
        tensor = stored[key]
        with safe_open(str(tensor.pieces[0].file), framework="pt") as handle:
            _replace_tensor(adapter.router(layer), local, handle.get_tensor(key))
        prefix = key.rsplit(".", 2)[0]
        layout = layouts.setdefault(layer, MoELayout(layer, prefix, adapter.num_experts(layer), set()))
        if layout.prefix != prefix:
            raise StreamingError(f"layer {layer}: router tensors are stored under {layout.prefix!r} and "
                                 f"{prefix!r}; pass --in-memory")
        layout.router_keys.add(key)
    return layouts


def _refuse_unsliced(adapter, layer: int, module_names: dict[int, str]) -> None:
    """A per-expert value outside the router's own tensors and the experts module (a block's
    selection bias, a router child's) would be copied unsliced: a checkpoint that does not
    load, or routes wrongly. An adapter declares such a family (streaming_refusal); this
    catches one that does not."""
    from grape.adapters.fused import _per_expert_tensors

    n = adapter.num_experts(layer)
    block, router, experts = adapter.block(layer), adapter.router(layer), adapter.experts(layer)
    sliced = {id(t) for t in _per_expert_tensors(router, n).values()}
    sliced |= {id(t) for t in list(experts.parameters()) + list(experts.buffers())}
    for name, tensor in list(block.named_parameters()) + list(block.named_buffers()):
        if id(tensor) not in sliced and n > 1 and tensor.numel() == n:  # one value per expert
            raise StreamingError(f"layer {layer}: {module_names[id(block)]}.{name} holds one "
                                 "value per expert outside the router's own tensors; streaming "
                                 "would copy it unsliced. Pass --in-memory")


# -- what each stored tensor becomes --------------------------------------------------------
def pruned_tensors(stored: dict[str, StoredTensor], layouts: dict[int, MoELayout],
                   num_layers: int) -> tuple[list[StoredTensor], list[str]]:
    """(tensors of the pruned checkpoint, in stored order; names dropped as not part of the
    model). Expert tensors are recognised by `<block prefix>.experts.`; an index after it means
    one tensor per expert, anything else a fused tensor with the expert on dim 0."""
    routers = {key: layout for layout in layouts.values() for key in layout.router_keys}
    blocks = {f"{layout.prefix}.experts.": layout for layout in layouts.values()}
    out: list[StoredTensor] = []
    dropped: list[str] = []
    for name, tensor in stored.items():
        match = _LAYER.match(name)
        if match and int(match.group(1)) >= num_layers:
            dropped.append(name)
            continue
        if name in routers:
            out.append(_rows(tensor, routers[name]))
            continue
        cut = name.find(".experts.")
        layout = blocks.get(name[:cut + len(".experts.")]) if cut >= 0 else None
        if layout is None:
            out.append(tensor)
            continue
        head, _, tail = name[cut + len(".experts."):].partition(".")
        if head.isdigit() and tail:
            renamed = _per_expert(tensor, layout, int(head), tail)
            if renamed is not None:
                out.append(renamed)
        else:
            out.append(_rows(tensor, layout))
            layout.seen.update(range(layout.num_experts))
    for layout in layouts.values():
        if layout.seen != set(range(layout.num_experts)):
            absent = sorted(set(range(layout.num_experts)) - layout.seen)
            raise StreamingError(f"layer {layout.layer}: no tensors under {layout.prefix}.experts. for "
                                 f"experts {absent[:5]} (of {layout.num_experts}); this checkpoint's "
                                 "expert layout is not recognised. Pass --in-memory")
    return out, dropped


def _rows(tensor: StoredTensor, layout: MoELayout) -> StoredTensor:
    if not tensor.shape or tensor.shape[0] != layout.num_experts:
        raise StreamingError(f"{tensor.name}: expected {layout.num_experts} experts on dim 0, the "
                             f"tensor has shape {tensor.shape}; pass --in-memory")
    if layout.keep == list(range(layout.num_experts)):
        return tensor
    return tensor.rows(layout.keep)


def _per_expert(tensor: StoredTensor, layout: MoELayout, expert: int, tail: str) -> StoredTensor | None:
    if expert >= layout.num_experts:
        raise StreamingError(f"{tensor.name}: expert {expert} does not exist (layer {layout.layer} has "
                             f"{layout.num_experts} experts)")
    layout.seen.add(expert)
    new = layout.new_index.get(expert)
    if new is None:
        return None
    return tensor if new == expert else tensor.renamed(f"{layout.prefix}.experts.{new}.{tail}")


def _check_routers(model, layouts: dict[int, MoELayout], tensors: list[StoredTensor]) -> None:
    """The streamed router tensors have as many rows as apply_plan left the skeleton's layers."""
    from grape.adapters import get_adapter

    adapter = get_adapter(model)
    by_name = {t.name: t for t in tensors}
    for layer, layout in layouts.items():
        expected = adapter.num_experts(layer)
        for key in sorted(layout.router_keys):
            if len(layout.keep) != expected or by_name[key].shape[0] != expected:
                raise StreamingError(f"{key}: {by_name[key].shape[0]} rows streamed, but the pruned "
                                     f"layer {layer} has {expected} experts")


# -- writing --------------------------------------------------------------------------------
def write_checkpoint(model, plan: Plan | None, tensors: list[StoredTensor], final: Path, *,
                     tokenizer: Any, provenance: dict, max_shard_size: str | int, overwrite: bool,
                     source: Path, progress: bool = False) -> Path:
    """Write the pruned checkpoint as save_pruned does, with the weights from `tensors`."""
    from grape.adapters import get_adapter
    from grape.checkpoint import (
        MODELING_FILE,
        PLAN_FILE,
        REMOTE_CLASS,
        _check_target,
        _finish_config,
        _provenance,
        _stock_class_name,
        _write_modeling_file,
        layout,
        staged_directory,
        write_model_card,
    )
    from grape.outputs import PROVENANCE_FILE
    from solvers._io import atomic_write_text

    adapter = get_adapter(model)
    adapter.sync_config()
    config = model.config
    non_uniform, needs_remote_code = layout(config)
    base_architecture = _stock_class_name(model)
    _check_target(final, model, overwrite)
    with staged_directory(final, sum(t.nbytes for t in tensors)) as tmp:
        _set_auto_map(config, needs_remote_code, f"{MODELING_FILE[:-3]}.{REMOTE_CLASS}")
        config.architectures = [base_architecture]
        config.save_pretrained(tmp)
        _save_generation_config(model, source, tmp)
        _copy_remote_code(config, source, tmp)
        _write_weights(tmp, tensors, max_shard_size, progress)
        _finish_config(tmp / "config.json", adapter, base_architecture)
        if needs_remote_code:
            _write_modeling_file(tmp / MODELING_FILE, base_architecture, adapter)
        if plan is not None:
            plan.save(tmp / PLAN_FILE)
        record = _provenance(model, plan, non_uniform, needs_remote_code) | dict(provenance)
        atomic_write_text(tmp / PROVENANCE_FILE, json.dumps(record, indent=2, default=str) + "\n")
        write_model_card(tmp, config, base_architecture, record)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return final


def _write_weights(tmp: Path, tensors: list[StoredTensor], max_shard_size, progress: bool) -> None:
    from tqdm.auto import tqdm

    total = sum(t.nbytes for t in tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing shards", disable=not progress,
              leave=False) as bar:
        write_weights(tmp, tensors, max_shard_size, progress=bar.update)


def _copy_remote_code(config, source: Path, target: Path) -> None:
    """The source's own code files that the kept auto_map entries name (e.g. DeepSeek-V3's
    configuration_deepseek.py), so `trust_remote_code=True` still finds them; GRAPE's own
    modeling file is written separately. Only files directly in the model folder are copied: a
    config is input, and an entry such as "../../x.Class" or "/abs/x.Class" must not carry a
    file from elsewhere on this machine into the output."""
    for reference in (getattr(config, "auto_map", None) or {}).values():
        for item in reference if isinstance(reference, (list, tuple)) else [reference]:
            module = str(item).split("--")[-1].rsplit(".", 1)[0] if item else ""
            if module and not _plain_module_name(module):
                print(f"grape apply: auto_map entry {str(item)!r} names a file outside the model "
                      "folder; not copied")
                continue
            file = source / f"{module}.py"
            if module and file.is_file() and not (target / file.name).exists():
                shutil.copyfile(file, target / file.name)


def _plain_module_name(module: str) -> bool:
    """A file name in the model folder itself: no folder part, not absolute, not `..`. Checked
    by name, not by resolving links: the Hub cache's files are links into its blob store."""
    return module not in (".", "..") and "/" not in module and "\\" not in module \
        and not Path(module).is_absolute() and Path(module).name == module


def _set_auto_map(config, needs_remote_code: bool, remote: str) -> None:
    """As save_pruned: point AutoModelForCausalLM at the modeling file, or drop a stale entry."""
    saved = getattr(config, "auto_map", None)
    if needs_remote_code:
        config.auto_map = {**(saved or {}), "AutoModelForCausalLM": remote}
    elif saved and "AutoModelForCausalLM" in saved:
        config.auto_map = {k: v for k, v in saved.items() if k != "AutoModelForCausalLM"} or None


def _save_generation_config(model, source: Path, target: Path) -> None:
    """The source's generation_config.json as transformers re-saves it (or the one derived
    from the model config, as a loaded model has), like save_pretrained writes it."""
    from transformers import GenerationConfig

    if not model.can_generate():
        return
    try:
        generation = GenerationConfig.from_pretrained(source)
    except OSError:
        generation = model.generation_config
    if generation is not None:
        generation.save_pretrained(target)
