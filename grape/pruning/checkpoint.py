"""Save a pruned model so that it reloads exactly, and load it back.

    save_pruned(model, "out/", plan=plan, tokenizer=tok, provenance={...})
    model = load_pruned("out/")

Layout of the output directory (see docs/checkpoints.md):

* ``config.json`` + ``model.safetensors`` (+ ``generation_config.json``): a standard
  transformers checkpoint. Every layer keeping the same number of experts: the stock config
  keys hold it, and vanilla ``AutoModelForCausalLM.from_pretrained`` (and vLLM) load it.
  Different counts per layer (or masked experts): the ``grape_pruning`` block lists them,
  ``auto_map`` points at ``modeling_grape_pruned.py`` (a small subclass that applies the block
  after ``__init__`` with the hook in ``grape_pruning.py``), so ``from_pretrained(path,
  trust_remote_code=True)`` works, and ``load_pruned(path)`` runs the same hook without remote
  code;
* ``README.md``: a model card saying how to load it;
* ``grape_plan.json``: the plan that was applied; ``grape_provenance.json``: source model,
  scores fingerprint, objective, solver, budget, method, versions;
* tokenizer files when a tokenizer is given.

The directory is written in a temporary sibling and renamed into place, so a crash never
leaves a half-written checkpoint under the final name. A mount point cannot be renamed over: it
is staged inside itself and its entries are replaced one by one. A write the disk refuses is
one DiskError naming the checkpoint, with its size against the free space; what a killed run
staged (``.NAME.grape-HOST-PID-XXXXXXXX.tmp`` / ``.old``) the next run removes (solvers._io).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

import grape
from grape.models.adapters import get_adapter
from grape.models.adapters.base import read_block
from grape.pruning.apply import APPLIED_METHOD_ATTR, APPLIED_PLAN_ATTR
from grape.models.checks import check_loaded
from grape.errors import UserError
from grape.outputs import PROVENANCE_FILE, check_not_input
from solvers._io import (
    atomic_write_text,
    disk_errors,
    give_default_mode,
    is_staging_name,
    raise_disk_error,
    staging_prefix,
)
from solvers.plan import Plan

PLAN_FILE = "grape_plan.json"
MODELING_FILE = "modeling_grape_pruned.py"
AUX_FILE = "grape_moe_aux.py"
PRUNING_FILE = "grape_pruning.py"  # the load hook, shared by grape.load and the remote-code class
CARD_FILE = "README.md"
REMOTE_CLASS = "GrapePrunedForCausalLM"


class CheckpointError(UserError):
    """A directory that is not a loadable GRAPE / transformers checkpoint."""


# -- saving ---------------------------------------------------------------------------------
def save_pruned(
    model: nn.Module,
    path: str | os.PathLike,
    plan: Plan | None = None,
    tokenizer: Any = None,
    provenance: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` (already pruned with apply_plan) to directory `path`; returns the path.

    `plan` defaults to the plan apply_plan recorded on the model. `provenance` entries are
    merged over the ones derived from the plan (source model, scores fingerprint, objective,
    solver, budget). An existing `path` is replaced as a whole when it is empty or a checkpoint
    GRAPE wrote; any other existing directory only with `overwrite=True`. The model's own source
    directory (or a folder inside or around it) is always refused.
    """
    adapter = get_adapter(model)
    plan = plan if plan is not None else getattr(model, APPLIED_PLAN_ATTR, None)
    adapter.sync_config()
    config = model.config
    non_uniform, needs_remote_code = layout(config)
    base_architecture = _stock_class_name(model)

    final = Path(path)
    _check_target(final, model, overwrite)
    saved_auto_map = getattr(config, "auto_map", None)
    try:
        with staged_directory(final, _state_bytes(model)) as tmp:
            if needs_remote_code:
                config.auto_map = {**(saved_auto_map or {}), "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{REMOTE_CLASS}"}
            elif saved_auto_map and "AutoModelForCausalLM" in saved_auto_map:
                config.auto_map = {k: v for k, v in saved_auto_map.items() if k != "AutoModelForCausalLM"} or None
            model.save_pretrained(tmp)
            _finish_config(tmp / "config.json", adapter, base_architecture)
            if needs_remote_code:
                _write_modeling_file(tmp / MODELING_FILE, base_architecture, adapter)
            if plan is not None:
                plan.save(tmp / PLAN_FILE)
            record = _provenance(model, plan, non_uniform, needs_remote_code) | dict(provenance or {})
            atomic_write_text(tmp / PROVENANCE_FILE, json.dumps(record, indent=2, default=str) + "\n")
            write_model_card(tmp, config, base_architecture, record)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        if saved_auto_map is None:
            with contextlib.suppress(AttributeError):
                delattr(config, "auto_map")
        else:
            config.auto_map = saved_auto_map
    return final


def _state_bytes(model: nn.Module) -> int:
    """About what the weights take on disk (for the message when they do not fit)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@contextlib.contextmanager
def staged_directory(final: Path, needed: int | None = None) -> Iterator[Path]:
    """A fresh staging folder that becomes `final` when the block succeeds. On any failure
    (Ctrl-C and SIGTERM too) it is removed, and a write the disk refused becomes one DiskError
    naming `final`, with `needed` bytes against the free space there."""
    with disk_errors(final, needed):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(final.name), suffix=".tmp",
                                    dir=_staging_home(final)))
    try:
        give_default_mode(tmp)  # mkdtemp makes it 0700; the checkpoint gets what the umask allows
        yield tmp
        for written in tmp.rglob("*"):  # save_pretrained writes its shards through temp files too
            give_default_mode(written)
        _replace_dir(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_disk_error(exc, final, needed, ours=(tmp, final))  # not an input's read error
        raise


def _staging_home(final: Path) -> Path:
    """Where `final` is staged: beside it, on the same filesystem, so that the last step is one
    atomic rename; inside it when it is a mount point, whose parent is another filesystem and
    which cannot be renamed over (EBUSY)."""
    return final if os.path.ismount(final) else final.parent


def _check_target(final: Path, model: nn.Module, overwrite: bool) -> None:
    """Refuse a target that would destroy data GRAPE did not write (see grape.outputs)."""
    source = str(getattr(model.config, "_name_or_path", "") or "")
    if source and Path(source).exists():
        check_not_input(final, {"model": Path(source)}, "checkpoint path")
    if not final.exists() or overwrite:
        return
    if not final.is_dir():
        raise CheckpointError(f"{str(final)!r} exists and is not a directory; choose another output path")
    if any(final.iterdir()) and not (final / PROVENANCE_FILE).is_file():
        raise CheckpointError(f"{str(final)!r} is a non-empty directory that is not a GRAPE checkpoint; "
                              "choose a new or empty directory, or pass overwrite=True (--overwrite) "
                              "to replace it")


def _stock_class_name(model: nn.Module) -> str:
    """The transformers class the model is (or derives from, e.g. after a remote-code load)."""
    import transformers

    for cls in type(model).__mro__:
        if getattr(transformers, cls.__name__, None) is cls:
            return cls.__name__
    raise CheckpointError(f"{type(model).__name__} is not a transformers model class; cannot save it")


def _finish_config(config_path: Path, adapter, base_architecture: str) -> None:
    """Write every key a family (or a server such as vLLM) may read the expert count from, and
    the stock class name (save_pretrained writes the class it was called on)."""
    data = json.loads(config_path.read_text())
    data["architectures"] = [base_architecture]
    count = getattr(adapter.config, adapter.expert_count_keys[0])
    for key in adapter.expert_count_keys:
        data[key] = count
    if data.get("auto_map") is None:
        data.pop("auto_map", None)
    atomic_write_text(config_path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_modeling_file(target: Path, base_architecture: str, adapter) -> None:
    template = resources.files("grape").joinpath("templates", MODELING_FILE).read_text()
    text = template.replace("__GRAPE_BASE_ARCHITECTURE__", base_architecture).replace(
        "__GRAPE_ROUTER_ATTR__", adapter.router_attr
    ).replace("__GRAPE_BLOCK_ATTR__", getattr(adapter, "block_attr", "mlp"))
    atomic_write_text(target, text)
    # the remote-code class imports the load hook and the per-layer balancing loss from siblings
    for sibling in (AUX_FILE, PRUNING_FILE):
        atomic_write_text(target.parent / sibling, resources.files("grape").joinpath("templates", sibling).read_text())


def layout(config) -> tuple[bool, bool]:
    """(non-uniform, needs remote code) of a synced config: layers of different sizes, or masked
    experts, which only GRAPE or the remote-code class re-applies."""
    block = read_block(config)
    non_uniform = bool(block["experts_per_layer"] or block["top_k_per_layer"])
    return non_uniform, non_uniform or bool(block["masked_experts"])


def write_model_card(directory: Path, config, base_architecture: str, record: dict) -> None:
    """README.md saying what was pruned and how to load it; a masked checkpoint warns that plain
    loaders (vLLM, transformers without remote code) silently give the unpruned model."""
    block = read_block(config)
    counts = block["experts_per_layer"] or {}
    lines = [
        "---", "library_name: transformers", "tags: [moe, expert-pruning, grape]", "---", "",
        f"# Expert-pruned {base_architecture}", "",
        f"Pruned by GRAPE {grape.__version__} from `{record.get('source_model') or 'unknown'}` with "
        f"method `{block['method'] or 'remove'}`; the plan is `{PLAN_FILE}`, how it was made "
        f"`{PROVENANCE_FILE}`.", "",
    ]
    if block["masked_experts"]:
        lines += ["**Masked experts.** Every weight is still here; the routers must skip the masked "
                  "experts listed in `config.json` (`grape_pruning.masked_experts`). Load with "
                  "`grape.load(path)` or `AutoModelForCausalLM.from_pretrained(path, "
                  "trust_remote_code=True)`. **vLLM, SGLang or transformers without remote code "
                  "ignore the mask and run the unpruned model.**", ""]
    elif counts:
        lines += [f"Layers keep different numbers of experts ({min(counts.values())}..."
                  f"{max(counts.values())}). Load with `grape.load(path)` or "
                  "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.", ""]
    else:
        lines += ["Every layer keeps the same number of experts: a standard checkpoint for "
                  "transformers, vLLM and SGLang.", ""]
    atomic_write_text(directory / CARD_FILE, "\n".join(lines))

def _provenance(model: nn.Module, plan: Plan | None, non_uniform: bool, remote_code: bool) -> dict:
    import transformers

    plan_provenance = dict(plan.provenance) if plan is not None else {}
    source = (plan.model.get("name_or_path") if plan is not None and plan.model else None) or str(
        getattr(model.config, "_name_or_path", "") or ""
    )
    return {
        "source_model": source,
        "scores_fingerprint": plan_provenance.get("scores_fingerprint"),
        "objective": plan_provenance.get("objective"),
        "solver": plan.solver if plan is not None else None,
        "budget": plan_provenance.get("budget"),
        "method": getattr(model, APPLIED_METHOD_ATTR, None),
        "experts_per_layer": {str(k): v for k, v in get_adapter(model).identity().experts_per_layer.items()},
        "uniform": not non_uniform,
        "needs_remote_code": remote_code,
        "objective_value": None if plan is None or plan.objective != plan.objective else plan.objective,
        "plan_status": plan.status if plan is not None else None,
        "plan_provenance": plan_provenance,
        "grape_version": grape.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def _replace_dir(tmp: Path, final: Path) -> None:
    if os.path.ismount(final):
        _replace_contents(tmp, final)
        return
    if not final.exists():
        os.replace(tmp, final)
        return
    if not final.is_dir():
        raise CheckpointError(f"{str(final)!r} exists and is not a directory; choose another output path")
    # os.replace cannot swap non-empty directories: move the old one aside first, and back when
    # the new one cannot be moved in (a kill in between: the next run puts it back, solvers._io)
    old = Path(tempfile.mkdtemp(prefix=staging_prefix(final.name), suffix=".old", dir=final.parent))
    try:
        os.replace(final, old / final.name)
        os.replace(tmp, final)
    except BaseException:
        if not os.path.lexists(final) and os.path.lexists(old / final.name):
            os.replace(old / final.name, final)
        raise
    finally:
        if final.exists():  # never remove the previous output while it is the only copy
            shutil.rmtree(old, ignore_errors=True)


def _replace_contents(tmp: Path, final: Path) -> None:
    """Replace a mount point's contents with the staged ones (a mount point cannot be renamed
    over): each staged entry is renamed into place (atomic per entry, same filesystem), then the
    previous output's other entries go. Staging entries, this run's or a live run's, stay."""
    staged = set(os.listdir(tmp))
    for name in sorted(staged):
        _remove_entry(final / name, keep_file=not (tmp / name).is_dir())
        os.replace(tmp / name, final / name)
    for name in os.listdir(final):
        if name not in staged and not is_staging_name(name):
            _remove_entry(final / name)
    tmp.rmdir()


def _remove_entry(path: Path, keep_file: bool = False) -> None:
    """Remove `path` if it exists; `keep_file`: a plain file stays, for os.replace to swap it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path) and not keep_file:
        path.unlink()


# -- loading --------------------------------------------------------------------------------
_PRUNED_CLASSES: dict[type, type] = {}


def pruned_class(base: type) -> type:
    """A subclass of the stock `base` class that shrinks each MoE layer after __init__ to the
    per-layer counts in its config (no remote code: GRAPE's adapter does the shrinking)."""
    if base not in _PRUNED_CLASSES:

        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            get_adapter(self).shrink_to_config()

        # the stock class's module: transformers applies a family's checkpoint renames (and its
        # other stock-code behaviour) only to classes defined under transformers.*
        _PRUNED_CLASSES[base] = type(f"GrapePruned{base.__name__}", (base,),
                                     {"__init__": __init__, "__module__": base.__module__})
    return _PRUNED_CLASSES[base]


def causal_lm_class(path: str | os.PathLike) -> tuple[Any, type]:
    """(config, the stock causal-LM class) of a checkpoint directory."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    # GRAPE's loader uses transformers' own classes only; explicit False: None would prompt on
    # stdin when config.json's auto_map names code of the model folder
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    try:
        return config, MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError as exc:
        raise CheckpointError(
            f"{str(path)!r}: model type {config.model_type!r} has no causal-LM class in this transformers"
        ) from exc


def load_pruned(path: str | os.PathLike, **from_pretrained_kwargs) -> nn.Module:
    """Load a checkpoint written by save_pruned (uniform or not) with stock transformers
    classes and no remote code. Extra keyword arguments go to `from_pretrained` (dtype,
    device_map, ...). Returns the model in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json; it is not a saved checkpoint")
    config, base = causal_lm_class(path)
    model, info = pruned_class(base).from_pretrained(path, config=config, output_loading_info=True,
                                                     **from_pretrained_kwargs)
    check_loaded(path, info)  # parameters the weights lack would run on random values
    # the subclass only shapes the layers at construction; afterwards the model is the stock class
    model.__class__ = base
    adapter = get_adapter(model)
    adapter.mask_from_config()
    adapter.sync_runtime()
    plan_file = path / PLAN_FILE
    if plan_file.is_file():
        setattr(model, APPLIED_PLAN_ATTR, Plan.load(plan_file))
    return model.eval()


def load_provenance(path: str | os.PathLike) -> dict:
    target = Path(path) / PROVENANCE_FILE
    return json.loads(target.read_text()) if target.is_file() else {}
