"""The Python API: one verb per stage, each a thin typed wrapper over the module that does the work.

    import grape

    model = grape.load("path/to/moe")                                    # any supported MoE checkpoint
    tok = grape.load_tokenizer("path/to/moe")
    scores = grape.calibrate(model, ["corpus/"], grape.CalibrationConfig(samples=256, seq_len=1024),
                             tokenizer=tok)                              # -> Scores (save: scores.save)
    problem = grape.build_problem(scores, grape.SolveConfig(budget=0.25, objective="redundancy"))
    plan = grape.solve(problem, grape.SolveConfig(solver="exact"))      # -> Plan (plan.save)
    found = grape.search(model, scores, ["val/prose.jsonl"], grape.SolveConfig(budget=0.25),
                         grape.SearchConfig(max_passes=100), tokenizer=tok)  # found.best.plan
    grape.apply(model, plan, grape.ApplyConfig("remove"))               # in place
    grape.save(model, "pruned/", plan=plan, tokenizer=tok)
    result = grape.evaluate(grape.load("pruned/"), tok, None, grape.EvalConfig(max_tokens_per_domain=8192))

Every function takes its inputs as arguments and returns its output; nothing is cached in
module state. Paths are accepted where an artifact is expected (a scores file, a plan file, a
checkpoint directory). The command line (`grape <verb>`) calls these same modules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from solvers.errors import UserError
from solvers.spec import BudgetError, SolveConfig, check_budget  # noqa: F401 - part of the API

if TYPE_CHECKING:  # pragma: no cover - only for annotations; the imports below are lazy
    import torch
    from torch import nn

    from grape.pruning.apply import ApplyConfig
    from grape.calibration.calibrate import CalibrationConfig
    from grape.searching.config import SearchConfig, SearchResult
    from grape.data.text import CalibrationData
    from grape.evaluation.perplexity import EvalConfig, EvalResult
    from solvers.plan import Plan
    from solvers.problem import Problem
    from solvers.scores import Scores


# -- artifacts from paths -------------------------------------------------------------------
def load_scores(scores: Scores | str | os.PathLike) -> Scores:
    """A Scores object, or the scores file at a path."""
    from solvers.scores import Scores

    return scores if isinstance(scores, Scores) else Scores.load(scores)


def load_plan(plan: Plan | str | os.PathLike) -> Plan:
    """A Plan object, or the plan file at a path."""
    from solvers.plan import Plan

    return plan if isinstance(plan, Plan) else Plan.load(plan)


def load(path: str | os.PathLike, device: str = "auto", dtype: Any = "auto",
         **from_pretrained_kwargs) -> nn.Module:
    """Load a model directory: a stock MoE checkpoint or one GRAPE pruned (per-layer expert
    counts included), in eval mode, without remote code, with the same defaults as every verb
    (grape.models.loading: float32 on the CPU, all GPUs in the checkpoint's dtype otherwise). Other
    keyword arguments go to ``from_pretrained``."""
    from grape.models.loading import load_model

    return load_model(path, device, dtype, **from_pretrained_kwargs)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a model (or tokenizer) directory."""
    from grape.models.loading import load_tokenizer as _load

    return _load(path)


# -- the verbs ------------------------------------------------------------------------------
def calibrate(
    model: nn.Module | str | os.PathLike,
    data: CalibrationData | torch.Tensor | Mapping[str, Any] | Sequence[Any] | str | os.PathLike,
    config: CalibrationConfig | None = None,
    *,
    tokenizer: Any = None,
    out: str | os.PathLike | None = None,
) -> Scores:
    """Measure `model` on calibration `data` and return its Scores.

    `model`: a model directory, calibrated by the stage `grape calibrate` runs
    (grape.calibration.stage: ``config.mode`` whole / sequential / auto, torchrun, the device
    map), or a loaded model (whole mode on it). `data` is a ``CalibrationData``, a 2-D tensor of
    input ids, a tokenizer's padded output (``tok(texts, padding=True, return_tensors="pt")``;
    padded positions are not counted), or raw sources (text / JSONL files, directories, a
    ``datasets.Dataset``, a list of strings), which are packed into ``config.samples``
    sequences of ``config.seq_len`` tokens (capped at the model's context, with a notice) with
    `tokenizer` (default: the one in the model directory when `model` is a path). `out`: write
    the scores file there, resuming from ``OUT.partial/`` as `grape calibrate --out` does."""
    from grape.calibration.stage import calibrate_checkpoint, fit_seq_len
    from grape.calibration.calibrate import CalibrationConfig, is_tokenized
    from grape.calibration.calibrate import calibrate as _calibrate
    from grape.data.text import load_calibration_data

    config = config or CalibrationConfig()
    config.validate()
    if isinstance(model, (str, os.PathLike)):
        return calibrate_checkpoint(model, data, config, tokenizer=tokenizer, out=out)
    if config.mode == "sequential":
        raise UserError("calibrate: mode 'sequential' reads the checkpoint one layer at a time; "
                        "pass the model directory instead of a loaded model")
    if not is_tokenized(data):
        if tokenizer is None:
            raise UserError("calibrate: raw text data needs a tokenizer; pass tokenizer=... or "
                            "pre-packed CalibrationData / input ids")
        config = fit_seq_len(config, model.config.to_dict())
        data = load_calibration_data(data, tokenizer, seq_len=config.seq_len, samples=config.samples,
                                     seed=config.seed, text_field=config.text_field,
                                     progress=config.progress)
    scores = _calibrate(model, data, config)
    if scores is not None and out is not None:  # None on the non-zero ranks of torchrun
        scores.save(Path(out))
    return scores


def build_problem(scores: Scores | str | os.PathLike, config: SolveConfig | None = None,
                  **overrides) -> Problem:
    """The allocation problem for `scores` (a Scores object or a scores file) under `config`;
    keyword arguments override config fields (``build_problem(scores, budget=0.5)``). The
    mapping is :func:`solvers.spec.build_problem` (torch-free)."""
    from solvers.spec import build_problem as _build

    return _build(load_scores(scores), config, **overrides)


def solve(problem: Problem | Scores | str | os.PathLike, config: SolveConfig | None = None,
          **overrides) -> Plan:
    """A checked Plan for `problem`; given scores (or a scores file) it builds the problem from
    `config` first. The solver and time limit come from `config`."""
    from solvers.problem import Problem
    from solvers.solve import solve as _solve

    config = replace(config or SolveConfig(), **overrides)
    if not isinstance(problem, Problem):
        problem = build_problem(problem, config)
    return _solve(problem, solver=config.solver, time_limit=config.time_limit)


def search(model: nn.Module | str | os.PathLike, scores: Scores | str | os.PathLike,
           data: torch.Tensor | str | os.PathLike | Sequence[str | os.PathLike],
           config: SolveConfig | None = None, search_config: SearchConfig | None = None, *,
           plan: Plan | str | os.PathLike | None = None, tokenizer: Any = None,
           out: str | os.PathLike | None = None,
           runtime: CalibrationConfig | str | None = None) -> SearchResult:
    """The loss-verified search (the stage `grape search` and `grape run` run): candidate plans
    measured on held-out `data` (search-data files, split by document into the search's
    `search_config.tokens` and the confirmation's `confirm_tokens`; or a 2-D tensor of input
    ids, each row its own document, no confirmation),
    from `plan` or `config`'s solver; `result.best.plan` is the choice. With `out`, writes
    plan.json, search.json and the resume cache there as `grape search --out` does.

    `model`: a loaded model (measured whole), or a model directory, held as `grape search` holds
    it (grape.searching.stage.open_model): `runtime` is calibration's runtime (a
    CalibrationConfig: its mode, hidden_states, device_map and dtype; a string is the mode),
    default mode 'auto' - loaded whole when it fits, else measured one decoder layer at a time
    from its shards (the same plans and NLLs); 'sequential' forces that, 'whole' loading. A
    directory's identity must match the scores'."""
    from grape.searching.config import SearchConfig
    from grape.searching.stage import (
        held_out_from_files,
        held_out_from_ids,
        open_model,
        run_search,
        sequence_length,
    )

    search_config = search_config or SearchConfig()
    search_config.check_names()
    runtime = _runtime(runtime)
    scores = load_scores(scores)
    plan = load_plan(plan) if plan is not None else None
    if config is None:  # a plan brings its own budget
        config = SolveConfig(budget=plan.num_removed) if plan is not None else SolveConfig()
    is_path = isinstance(model, (str, os.PathLike))
    if not is_path and runtime.mode == "sequential":
        raise UserError("search: mode 'sequential' reads the checkpoint one layer at a time; "
                        "pass the model directory instead of a loaded model")
    if _is_ids(data):
        held_out = held_out_from_ids(data)
    else:
        if tokenizer is None and is_path:
            tokenizer = load_tokenizer(model)
        if tokenizer is None:
            raise UserError("search: search-data files need a tokenizer; pass tokenizer=... or a "
                            "tensor of ids")
        files = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        held_out = held_out_from_files(files, tokenizer, sequence_length(scores, search_config), search_config)
    if is_path:  # after the data: a bad file fails before the model is read
        model, identity = open_model(model, runtime, scratch=Path(out) if out is not None else None)
        scores.model.check_matches(identity)
    return run_search(model, scores, config, held_out, search_config,
                      out=Path(out) if out is not None else None, plan=plan)


def _is_ids(data: Any) -> bool:
    return hasattr(data, "dim") and hasattr(data, "dtype")  # a tensor (without importing torch)


def _runtime(runtime) -> CalibrationConfig:
    """How a model directory is held: a CalibrationConfig, a mode name, or None (mode 'auto')."""
    from grape.calibration.calibrate import CalibrationConfig

    if runtime is None:
        return CalibrationConfig()
    if isinstance(runtime, str):
        return CalibrationConfig(mode=runtime)
    if not isinstance(runtime, CalibrationConfig):
        raise UserError("search: runtime must be a CalibrationConfig or a mode name, not "
                        f"{type(runtime).__name__}")
    return runtime


def apply(model: nn.Module | str | os.PathLike, plan: Plan | str | os.PathLike,
          config: ApplyConfig | str = "remove", merge_weights: Any = None, *,
          out: str | os.PathLike | None = None, dtype: str = "auto", tokenizer: Any = True,
          overwrite: bool = False) -> nn.Module | Path:
    """Apply `plan` (remove / merge / mask). To a loaded `model`: in place, returning it. To a
    model directory: the stage `grape apply` runs (grape.pruning.stage), writing the checkpoint to
    `out` and returning its path; ``config.mode`` 'auto' streams the shards where it can
    (remove / mask), so memory stays flat whatever the model's size. `merge_weights` (a Scores
    object or file, or {layer: weights}) weights a merge; with an ApplyConfig it is its field."""
    from grape.pruning.apply import ApplyConfig, apply_plan

    if not isinstance(config, ApplyConfig):
        config = ApplyConfig(config, merge_weights=load_scores(merge_weights)
                             if isinstance(merge_weights, (str, os.PathLike)) else merge_weights)
    if not isinstance(model, (str, os.PathLike)):
        return apply_plan(model, load_plan(plan), config)
    from grape.pruning.stage import apply_checkpoint, check_plan
    from grape.models.files import check_model_dir

    if out is None:
        raise UserError("apply: a model directory needs out=... (the checkpoint to write)")
    plan = load_plan(plan)
    check_plan(plan, check_model_dir(model), config)  # before any weight is read
    return apply_checkpoint(model, plan, out, config, dtype=dtype, tokenizer=tokenizer,
                            overwrite=overwrite).path


def save(model: nn.Module, path: str | os.PathLike, *, plan: Plan | None = None,
         tokenizer: Any = None, provenance: Mapping[str, Any] | None = None) -> Path:
    """Write a pruned model as a checkpoint directory that `load` (and transformers) reload."""
    from grape.pruning.checkpoint import save_pruned

    return save_pruned(model, path, plan=plan, tokenizer=tokenizer,
                       provenance=dict(provenance) if provenance else None)


def evaluate(model: nn.Module, tokenizer: Any,
             data: Mapping[str, Sequence[str]] | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
             config: EvalConfig | None = None, *, name: str | None = None) -> EvalResult:
    """Held-out NLL per domain (and lm-eval tasks if `config.tasks`); `data` None = the test
    bed's held-out test split."""
    from grape.evaluation.perplexity import evaluate as _evaluate

    return _evaluate(model, tokenizer, data, config, name=name)


__all__ = [
    "BudgetError",
    "SolveConfig",
    "apply",
    "build_problem",
    "calibrate",
    "check_budget",
    "evaluate",
    "load",
    "load_plan",
    "load_scores",
    "load_tokenizer",
    "save",
    "search",
    "solve",
]
