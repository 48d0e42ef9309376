"""The apply stage: a checkpoint + a plan -> a smaller checkpoint.

    written = apply_checkpoint("path/to/moe", plan, "pruned/", ApplyConfig("remove"))
    written.path, written.streamed

`grape apply`, `grape run` (grape.pipeline) and the Python API (`grape.apply` given a model
directory and `out=`) all call :func:`apply_checkpoint`, so the runtime choices of
:class:`~grape.pruning.apply.ApplyConfig` hold whichever way the stage is called: ``mode`` 'auto'
streams the safetensors shard by shard (grape.pruning.streaming: memory stays flat whatever the model's
size, quantised experts stay quantised) where it can — remove / mask, no dtype conversion — and
loads the whole model otherwise; 'streaming' refuses what cannot stream; 'in-memory' always loads.
With a repair, 'auto' loads the model when it fits in memory and otherwise (like 'streaming')
prunes and repairs it from the shards one decoder layer at a time (grape.pruning.repair_sequential).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from grape.errors import PlanError
from grape.pruning.apply import AUTO_REPAIR, AUTO_REPAIR_LAYERWISE, ApplyConfig


@dataclass(frozen=True)
class Applied:
    path: Path  # the checkpoint written
    streamed: bool  # shard by shard (True) or from the model loaded in memory
    note: str = ""  # for the summary line: how it was written


def check_plan(plan, model_config: dict, config: ApplyConfig, plan_name: str = "the plan",
               skip_model_check: bool = False) -> None:
    """What config.json and the plan's recorded model identity can tell before any weights are
    read: the plan records its model (else refused unless `skip_model_check`), the same model
    family, no layer left with fewer experts than its top_k, and a method the format supports."""
    from grape.models.quantized import check_method

    precheck_plan(plan, model_config, config.allow_lower_top_k)
    require_model_block(plan, plan_name, skip_model_check)
    check_method(model_config, config.method)
    check_repair(model_config, config)


# --repair auto fits on as many rows as the text fills, down to this many (fewer: no repair)
AUTO_MIN_ROWS = 16
# held-out tokens that check an auto repair on `grape apply` (grape run's confirmation target)
REPAIR_CHECK_TOKENS = 65536


def check_repair(model_config: dict, config: ApplyConfig, data_flag: str = "--repair-data") -> None:
    """A repair (grape.pruning.repair) needs calibration text and an unquantised model: refused here,
    before any weight is read (``auto`` falls back to none instead). `data_flag`: the flag that
    gives the text."""
    from grape.errors import DataError
    from grape.models.quantized import describe
    from grape.pruning.repair import resolve_repair

    config, _ = resolve_repair(model_config, config)
    if config.repair == "none":
        return
    if not config.repair_data:
        raise DataError(f"--repair {config.repair} fits on calibration text; pass {data_flag} PATH "
                        "(text / JSONL files or folders), or --repair none")
    missing = [p for p in config.repair_data if not Path(p).exists()]
    if missing:
        raise DataError(f"{data_flag} {missing[0]} does not exist; give existing text / JSONL files "
                        "or folders")
    quant = describe(model_config)
    if quant:
        raise PlanError(f"--repair changes expert weights, which this checkpoint stores quantised "
                        f"({quant}); apply it without --repair")
    from grape.pruning.repair import layerwise_refusal

    refusal = layerwise_refusal(model_config.get("model_type"))
    if refusal:
        raise PlanError(refusal)


def precheck_plan(plan, model_config: dict, allow_lower_top_k: bool) -> None:
    """The same model family, and no layer left with fewer experts than its top_k."""
    from grape.pruning.apply import check_top_k

    recorded = plan.model or {}
    planned_type, model_type = recorded.get("model_type"), model_config.get("model_type")
    if planned_type and model_type and planned_type != model_type:
        raise PlanError(f"the plan was made for a different model: a {planned_type} model, but --model "
                        f"is a {model_type} model; make the plan from scores measured on this model")
    try:
        top_k = {int(k): int(v) for k, v in recorded.get("top_k", {}).items()}
    except (TypeError, ValueError, AttributeError):
        top_k = {}  # an unreadable identity is reported by apply_plan with the model at hand
    if not allow_lower_top_k:
        check_top_k(plan, top_k)


def require_model_block(plan, path: str, skip: bool) -> None:
    """A plan without its `model` block cannot be checked against the model (type, expert counts,
    router fingerprint), so a plan for another model of the same shape would apply silently:
    refused unless `skip` (--skip-model-check) says the check is knowingly skipped."""
    if not plan.model and not skip:
        raise PlanError(f"plan file {path} records no model (its `model` block is missing or "
                        "empty), so it cannot be checked against --model; make the plan with "
                        "`grape solve`, or pass --skip-model-check to apply it unchecked")


def streams(model_dir, model_config: dict, config: ApplyConfig, dtype: str = "auto",
            say=print) -> bool:
    """Whether the checkpoint is written by streaming (the rule every caller shares)."""
    from grape.pruning.streaming import streaming_unavailable

    if config.mode == "in-memory":
        return False
    reason = streaming_unavailable(model_dir, model_config, config.method, dtype)
    if reason is not None:
        if config.mode == "streaming":
            raise PlanError(f"apply mode 'streaming': {reason}; use mode 'auto' or 'in-memory'")
        if config.method != "merge":  # merge always loads the model: nothing to tell
            say(f"grape apply: {reason}; loading the model in memory instead")
        return False
    if config.repair == "none" or config.mode == "streaming":
        return True
    # auto with a repair: in memory where the model fits (one load), else layer by layer
    choice = repair_placement(model_dir)
    if choice.mode == "whole":
        say(f"grape apply: --repair {config.repair}: {choice.reason}; repairing it in memory")
        return False
    say(f"grape apply: --repair {config.repair}: {choice.reason}; pruning and repairing it layer by "
        "layer from the shards")
    return True


def repair_placement(model_dir):
    """grape.models.placement's whole-or-sequential choice for a repair on this machine's host memory
    (the in-memory apply loads the model there, in its stored dtype: its bytes on disk)."""
    from grape.calibration.distributed import World
    from grape.models.files import weight_files
    from grape.models.placement import choose_mode, whole_capacity

    needed = sum(file.stat().st_size for file in weight_files(Path(model_dir)))
    capacity, where = whole_capacity("cpu", World())
    return choose_mode("auto", needed, capacity, where, None)


def apply_checkpoint(model_dir: str | os.PathLike, plan, out: str | os.PathLike,
                     config: ApplyConfig | None = None, *, dtype: str = "auto", tokenizer: Any = True,
                     provenance: dict | None = None, overwrite: bool = False, progress: bool = False,
                     say=print, repair_ids=None) -> Applied:
    """Apply `plan` (a Plan, already checked with :func:`check_plan`) to the checkpoint in
    `model_dir` and write the result to `out`. `tokenizer`: True copies the model's own (if it
    has one), None writes none, or a tokenizer object. `repair_ids`: the repair's rows when the
    caller has them (grape run: cut from its calibration rows, and checks them itself); None:
    read from repair_data, which under ``repair='auto'`` in memory also gives the held-out
    documents that check the repair (:func:`auto_repair_split`)."""
    from grape.models.files import check_model_dir
    from grape.pruning.repair import resolve_repair

    config = config or ApplyConfig()
    model_config = check_model_dir(model_dir)
    auto = config.repair == "auto"
    config, why = resolve_repair(model_config, config)
    if tokenizer is True:
        tokenizer = model_tokenizer(model_dir, say)
    confirm = None  # held-out windows that check an auto repair in memory
    if auto and why is None and repair_ids is None:
        if streams(model_dir, model_config, config, dtype, say=lambda line: None):
            config, repair_ids, why = auto_repair_rows(model_dir, config, tokenizer, say)
        else:
            config, repair_ids, confirm, why = auto_repair_split(model_dir, config, tokenizer, say)
    if why:
        say(f"grape apply: --repair auto: no repair ({why})")
    provenance = {"source_model": str(model_dir), **(provenance or {})}
    if streams(model_dir, model_config, config, dtype, say):
        if auto and config.repair == AUTO_REPAIR:  # layer by layer: the lighter fit (apply.py)
            config = replace(config, repair=AUTO_REPAIR_LAYERWISE)
            say(f"grape apply: --repair auto: {AUTO_REPAIR_LAYERWISE} (layer by layer from the shards, "
                f"{AUTO_REPAIR}'s experts re-fit needs more memory than that)")
        if config.repair != "none":
            return _streamed_repair(model_dir, plan, out, config, tokenizer, provenance, overwrite,
                                    progress, say, repair_ids)
        return _streamed(model_dir, plan, out, config, tokenizer, provenance, overwrite, progress)
    return _in_memory(model_dir, plan, out, config, dtype, tokenizer, provenance, overwrite, say, repair_ids,
                      confirm)


def _streamed(model_dir, plan, out, config: ApplyConfig, tokenizer, provenance, overwrite,
              progress) -> Applied:
    from grape.models.files import read_config
    from grape.models.quantized import describe
    from grape.pruning.streaming import stream_apply

    path = stream_apply(model_dir, plan, out, config.method, tokenizer=tokenizer, provenance=provenance,
                        allow_lower_top_k=config.allow_lower_top_k,
                        max_shard_size=config.max_shard_size, overwrite=overwrite, progress=progress)
    quant = describe(read_config(model_dir))
    return Applied(Path(path), True, "; streamed shard by shard"
                   + (f", quantisation kept ({quant})" if quant else ""))


def _streamed_repair(model_dir, plan, out, config: ApplyConfig, tokenizer, provenance, overwrite,
                     progress, say, input_ids=None) -> Applied:
    """Pruned and repaired one decoder layer at a time from the shards (grape.pruning.repair_sequential),
    resumable from OUT.partial; the repair's text is read first (too little fails at once)."""
    from grape.pruning.repair_sequential import stream_repair

    if input_ids is None:
        input_ids = repair_tokens(model_dir, config, tokenizer, say)
    repaired = stream_repair(model_dir, plan, out, config, input_ids, tokenizer=tokenizer,
                             provenance={**provenance, "repair": {"data": list(config.repair_data)}},
                             overwrite=overwrite, progress=progress, say=say)
    say(f"grape apply: {repaired.report.line()} (layer by layer, hidden states in "
        f"{repaired.hidden_states})")
    return Applied(repaired.path, True, f"; streamed shard by shard, {repaired.report.line()}")


def _in_memory(model_dir, plan, out, config: ApplyConfig, dtype: str, tokenizer, provenance,
               overwrite, say, input_ids=None, confirm=None) -> Applied:
    import torch

    from grape.pruning.checkpoint import load_pruned, save_pruned
    from grape.pruning.apply import apply_plan

    # the repair's text first: too little of it fails before the weights are read
    if config.repair != "none" and input_ids is None:
        input_ids = repair_tokens(model_dir, config, tokenizer, say)

    def load():
        return load_pruned(model_dir, dtype="auto" if dtype == "auto" else getattr(torch, dtype))

    model = load()
    if config.method == "merge" and config.merge_weights is None:
        say("grape apply: no --scores given; merged experts are averaged with equal weights")
    if config.method == "merge" and not plan.merge_map:
        say("grape apply: the plan has no merge map; each removed expert is merged into the kept "
            "expert with the most similar weights (cosine)")
    note = ""
    if config.repair != "none":
        model, record, note = _repair_in_memory(model, plan, config, input_ids, confirm, load, say)
        provenance = {**provenance, **record}
    else:
        apply_plan(model, plan, config)
    path = save_pruned(model, out, plan=plan, tokenizer=tokenizer, provenance=provenance,
                       overwrite=overwrite)
    return Applied(Path(path), False, note)


def _repair_in_memory(model, plan, config: ApplyConfig, input_ids, confirm, load, say):
    """`plan` applied to the loaded `model` with config's repair; with held-out windows
    `confirm` (--repair auto), checked on them and undone - the model read again by `load` and
    pruned plainly - when it does not lower their NLL (grape.pruning.repair_check.checked_apply).
    Returns (the model to save, its provenance entries, the summary's note)."""
    from grape.pruning.repair_check import checked_apply

    model, check, report = checked_apply(model, plan, config, input_ids, confirm, load, undo=True,
                                         say=lambda line: say(f"grape apply: {line}"))
    record = {**report.to_json(), "data": list(config.repair_data), "rows": int(input_ids.shape[0]),
              "seq_len": int(input_ids.shape[1])}
    if check is None:
        return model, {"repair": record}, f"; {report.line()}"
    if check.kept:
        return model, {"repair": {**record, "check": check.to_json()}}, f"; {report.line()}, checked"
    record = {"repair_check": {**check.to_json(), "method": config.repair}}
    return model, record, "; repair undone by its check"


def repair_tokens(model_dir, config: ApplyConfig, tokenizer, say=print, at_least: int | None = None):
    """The repair's calibration rows: config.repair_data packed into repair_samples rows of
    repair_seq_len tokens (capped at the model's context) with the model's tokenizer; fewer
    rows down to `at_least` (when given) if the text fills no more."""
    from grape.data.text import load_calibration_data
    from grape.errors import DataError
    from grape.models.files import cap_seq_len, read_config

    if tokenizer is None or tokenizer is True:
        tokenizer = model_tokenizer(model_dir, say)
    if tokenizer is None:
        raise DataError(f"--repair needs the model's tokenizer to read --repair-data; {model_dir} has "
                        "none that loads")
    seq_len = cap_seq_len(config.repair_seq_len, read_config(model_dir), "--repair-seq-len", "grape apply")
    try:
        data = load_calibration_data(list(config.repair_data), tokenizer, seq_len=seq_len,
                                     samples=config.repair_samples, seed=0, progress=False,
                                     at_least=at_least)
    except DataError as exc:  # its advice names the calibration flags
        raise type(exc)(str(exc).replace("--samples", "--repair-samples")
                        .replace("--seq-len", "--repair-seq-len")) from exc
    return data.input_ids


def repair_rows(calibration_ids, model_dir, config: ApplyConfig, say=print):
    """The repair's rows cut from a run's calibration tokens (its rows, or the whole packed
    stream of its calibration documents, grape.data.split): `repair_samples` rows of
    `repair_seq_len` tokens (capped at the model's context), or as many as they fill. None when
    they fill fewer than AUTO_MIN_ROWS and fewer than asked (the caller reads the text instead).
    Fitting on these keeps the run's held-out documents unseen by the repair, so they can judge
    it (grape.pruning.repair_check)."""
    from grape.models.files import cap_seq_len, read_config

    seq_len = cap_seq_len(config.repair_seq_len, read_config(model_dir), "--repair-seq-len", "grape run")
    stream = calibration_ids.reshape(-1)
    rows = min(config.repair_samples, stream.numel() // seq_len)
    if rows < min(AUTO_MIN_ROWS, config.repair_samples):
        return None
    if rows < config.repair_samples:
        say(f"repair: fitting on {rows} rows of {seq_len} tokens, all the calibration documents fill "
            f"({config.repair_samples} asked)")
    return stream[: rows * seq_len].reshape(rows, seq_len).clone()


def auto_repair_rows(model_dir, config: ApplyConfig, tokenizer, say=print):
    """For ``--repair auto`` (already resolved): fit on as many of repair_samples rows as the text
    fills, down to AUTO_MIN_ROWS; fewer, or no tokenizer to read it with: no repair. Returns the
    config (its repair_samples what the text gives), the rows read (None without a repair: the
    caller fits on these, the text is read once) and, when it fell back to none, why."""
    from grape.errors import ShortTextError

    if config.repair == "none":
        return config, None, None
    if tokenizer is None or tokenizer is True:
        tokenizer = model_tokenizer(model_dir, say)
    if tokenizer is None:
        return replace(config, repair="none"), None, "the model has no tokenizer to read the calibration text with"
    try:
        ids = repair_tokens(model_dir, config, tokenizer, say, at_least=AUTO_MIN_ROWS)
    except ShortTextError:
        return replace(config, repair="none"), None, (f"the calibration text fills fewer than {AUTO_MIN_ROWS} "
                                                      f"rows of {config.repair_seq_len} tokens")
    rows = int(ids.shape[0])
    if rows < config.repair_samples:
        say(f"repair: fitting on {rows} rows of {config.repair_seq_len} tokens, all the calibration text "
            f"fills ({config.repair_samples} asked)")
    return replace(config, repair_samples=rows), ids, None


def auto_repair_split(model_dir, config: ApplyConfig, tokenizer, say=print, who: str = "grape apply"):
    """auto_repair_rows for a repair in memory, which can be checked: the text split by document
    (grape.data.split.split_check) into the rows the fit uses and REPAIR_CHECK_TOKENS of held-out
    windows that judge it. Returns (config, rows or None, windows or None, why no repair)."""
    from grape.data.split import split_check
    from grape.errors import ShortTextError
    from grape.models.files import cap_seq_len, read_config

    if config.repair == "none":
        return config, None, None, None
    if tokenizer is None or tokenizer is True:
        tokenizer = model_tokenizer(model_dir, say)
    if tokenizer is None:
        why = "the model has no tokenizer to read the calibration text with"
        return replace(config, repair="none"), None, None, why
    seq_len = cap_seq_len(config.repair_seq_len, read_config(model_dir), "--repair-seq-len", who)
    try:
        ids, confirm, notes = split_check(list(config.repair_data), tokenizer, REPAIR_CHECK_TOKENS,
                                          seq_len=seq_len, samples=config.repair_samples,
                                          at_least=AUTO_MIN_ROWS)
    except ShortTextError:
        why = f"the calibration text fills fewer than {AUTO_MIN_ROWS} rows of {seq_len} tokens"
        return replace(config, repair="none"), None, None, why
    for line in notes:
        say(f"repair: {line}")
    rows = int(ids.shape[0])
    if rows < config.repair_samples:
        say(f"repair: fitting on {rows} rows of {seq_len} tokens, all the calibration text fills once "
            f"documents are held out for its check ({config.repair_samples} asked)")
    return replace(config, repair_samples=rows), ids, confirm, None


def model_tokenizer(path, say=print):
    """The model's tokenizer if it has one; a model directory without one is fine."""
    from transformers import AutoTokenizer

    from grape.models.files import remote_code_files

    try:
        # explicit False: None would prompt on stdin for a tokenizer class of the folder's own code
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError):
        files = remote_code_files(path)
        why = f" that loads without running its code ({', '.join(files)})" if files else ""
        say(f"grape apply: no tokenizer found at {path}{why}; the checkpoint has none")
        return None


__all__ = ["Applied", "REPAIR_CHECK_TOKENS", "apply_checkpoint", "auto_repair_split", "check_plan",
           "check_repair", "repair_tokens", "model_tokenizer", "precheck_plan", "repair_placement",
           "repair_rows", "require_model_block", "streams"]
