"""Streaming apply: prune a checkpoint of any size shard by shard, without loading the model.

    stream_apply("/models/Qwen3-235B-A22B", plan, "pruned/", method="remove")

Removing experts is slicing tensors, so ``grape apply`` (``remove`` and ``mask``) reads the
checkpoint's safetensors headers, decides for every stored tensor what the pruned checkpoint
holds, and copies bytes (grape/models/shards.py): memory stays at a few hundred MB whatever the size.

* every stored copy of a per-expert tensor keeps the kept experts' slices along its expert
  axis, whatever its stored name: router rows, router bias and correction bias (EXAONE's
  stored beside the router), a block's own selection bias (MiniMax-M2, LFM2-MoE), ERNIE-4.5's
  [1, E] bias in a router child, fused experts (gpt-oss ``gate_up_proj``, Granite's
  ``input_linear``; MXFP4 ``*_blocks`` / ``*_scales``). Which tensors those are comes from the
  model and its adapter, their stored names from transformers' load renames
  (grape/pruning/stream_layout.py);
* experts stored one tensor per expert (``<block>.experts.N.<...>``, e.g.
  ``mlp.experts.N.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.N.w1.weight``, FP8
  ``...weight_scale_inv``) are dropped or renumbered to the kept order;
* everything else is copied byte for byte; tensors of decoder layers the config does not have
  (DeepSeek-V3's multi-token-prediction layer) are dropped, as transformers' load drops them.

What is not weights comes from the code the in-memory path uses: the model is built on the
``meta`` device (no memory) with its real router tensors read from the checkpoint, so
``grape.pruning.apply.apply_plan`` validates the plan exactly as on a loaded model (layers, expert
counts, top_k, family rules, router fingerprint) and updates the config; then config,
generation config, modeling file (non-uniform or masked), plan, provenance and tokenizer are
written as ``grape.pruning.checkpoint.save_pruned`` writes them. Quantised checkpoints stay quantised
and keep their ``quantization_config``. ``merge`` needs the weights in memory: use apply_plan.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from grape.errors import PlanError
from grape.models.shards import DEFAULT_MAX_SHARD_SIZE, StoredTensor, parse_size, stored_tensors, write_weights
from grape.pruning.stream_layout import (  # noqa: F401 - StreamingError and MoELayout re-exported
    Loaded,
    MoELayout,
    StreamingError,
    check_shapes,
    expert_layouts,
    loaded_names,
    pruned_tensors,
    tensor_at,
)
from solvers.plan import Plan

STREAMING_METHODS = ("remove", "mask")
_FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


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
    from grape.models.adapters import adapter_class

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
    from grape.models.adapters import get_adapter
    from grape.pruning.apply import ApplyConfig, apply_plan

    if method not in STREAMING_METHODS:
        raise PlanError(f"streaming apply does {' and '.join(STREAMING_METHODS)}; {method!r} needs the "
                        "model in memory (grape.pruning.apply.apply_plan)")
    parse_size(max_shard_size)
    model_dir = Path(model_dir)
    stored = stored_tensors(model_dir)
    model, layouts = load_skeleton(model_dir, stored)
    apply_plan(model, plan, ApplyConfig(method, allow_lower_top_k=allow_lower_top_k))
    for layer, layout in layouts.items():
        layout.keep = sorted(plan.kept[layer]) if method == "remove" else list(range(layout.num_experts))
        layout.new_index = {expert: i for i, expert in enumerate(layout.keep)}
    tensors, dropped = pruned_tensors(stored, layouts, int(model.config.num_hidden_layers))
    check_shapes(model, get_adapter(model), layouts, tensors)
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
    from the checkpoint; and where each MoE layer's tensors are stored (grape/pruning/stream_layout.py)."""
    import torch

    from grape.models.adapters import get_adapter
    from grape.pruning.checkpoint import causal_lm_class, pruned_class

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
    names = loaded_names(model, list(stored))
    layouts = expert_layouts(model, adapter, stored, names)
    _load_routers(model, adapter, model_dir, stored, names)
    return model, layouts


def _load_routers(model, adapter, model_dir: Path, stored: dict[str, StoredTensor],
                  names: dict[str, Loaded]) -> None:
    """The router tensors the plan's fingerprint hashes (adapter.router_tensors), read from the
    checkpoint into the meta model; the rest of the model stays on meta."""
    from safetensors import safe_open

    from grape.models.adapters.fused import _replace_tensor

    module_names = {id(module): name for name, module in model.named_modules()}
    keys = {loaded.name: key for key, loaded in names.items() if not loaded.merged}
    wanted = [f"{module_names[id(adapter.router(layer))]}.{local}"
              for layer in sorted(adapter.moe_blocks()) for local in adapter.router_tensors(layer)]
    missing = [name for name in wanted if name not in keys]
    if missing:
        raise StreamingError(f"{model_dir}: router tensor {missing[0]} is not in the checkpoint "
                             f"({len(missing)} missing); it cannot be pruned shard by shard. Pass "
                             "--in-memory to load the model instead")
    for name in wanted:
        key = keys[name]
        parent, _, leaf = name.rpartition(".")
        if list(tensor_at(model, name).shape) != stored[key].shape:
            raise StreamingError(f"{key}: stored with shape {stored[key].shape}, but it loads into "
                                 f"{name} of shape {list(tensor_at(model, name).shape)}; pass --in-memory")
        with safe_open(str(stored[key].pieces[0].file), framework="pt") as handle:
            _replace_tensor(model.get_submodule(parent), leaf, handle.get_tensor(key))


# -- writing --------------------------------------------------------------------------------
def write_checkpoint(model, plan: Plan | None, tensors: list[StoredTensor], final: Path, *,
                     tokenizer: Any, provenance: dict, max_shard_size: str | int, overwrite: bool,
                     source: Path, progress: bool = False) -> Path:
    """Write the pruned checkpoint as save_pruned does, with the weights from `tensors`."""
    from grape.models.adapters import get_adapter
    from grape.pruning.checkpoint import (
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
