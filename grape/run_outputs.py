"""What `grape run` (grape.pipeline) writes at the end of its stages: the pruned checkpoint,
the evaluations, report.md and summary.json. Separate from the stage order so the pipeline
module stays about the order."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

# a model that does not fit in memory: the stages that need it loaded are skipped, this says so
UNLOADED_NOTE = ("the model does not fit in memory, so the search ran layer by layer and the "
                 "evaluations (before and after pruning, baselines, stability) were skipped; evaluate "
                 "the pruned checkpoint with `grape eval` where it fits")


def say(line: str) -> None:
    print("    " + line, flush=True)


def save_checkpoint(model, config, plan, tokenizer, method, repair_ids=None) -> None:
    """The pruned checkpoint, by the rule of `grape apply` (grape.pruning.stage): streamed from
    the source shards where it can, else saved from the model pruned in memory (`model` None:
    a model that does not fit, refused before the run when it cannot stream). `repair_ids`: the
    rows the in-memory repair fitted on, so a streamed repair fits on the same."""
    from grape.pruning.stage import apply_checkpoint, streams
    from grape.pruning.checkpoint import save_pruned
    from grape.models.files import read_config

    out, provenance = config.out / "checkpoint", {"run_dir": str(config.out)}
    # a model already pruned and repaired in memory is saved as it is: no "repairing it" line
    told = say if model is None or method.repair == "none" else (lambda line: None)
    if streams(config.model, read_config(config.model), method, config.dtype, say=told):
        written = apply_checkpoint(config.model, plan, out, method, dtype=config.dtype, tokenizer=tokenizer,
                                   provenance=provenance, overwrite=config.overwrite, repair_ids=repair_ids)
        print(f"    wrote {written.path}{written.note}", flush=True)
        return
    stored = stored_dtype(config.model)
    if stored is not None and stored != next(model.parameters()).dtype:
        model.to(stored)  # the weights were widened to float32 for CPU work; write them as they came
    save_pruned(model, out, plan=plan, tokenizer=tokenizer,
                provenance={"source_model": str(config.model), **provenance}, overwrite=config.overwrite)


def stored_dtype(model_dir: Path):
    import torch

    try:
        stored = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    name = stored.get("dtype") or stored.get("torch_dtype")
    value = getattr(torch, str(name), None) if name else None
    return value if isinstance(value, torch.dtype) else None


def write_eval(path: Path, result, baseline=None) -> None:
    from solvers._io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, result.to_json(baseline))


def write_report(config, scores, solver: str, plans, base_eval, evals, rows, files, seconds,
                 notes: list[str]) -> Path:
    from grape.report.tables import RunReport, plan_placement

    report = RunReport(
        model=str(config.model), budget=str(config.solve.budget), objective=config.solve.objective,
        solver=solver, method=config.method, original=dict(scores.model.experts_per_layer), plans=plans,
        base_eval=base_eval, evals=evals, solver_rows=rows,
        calibration={"tokens": scores.tokens, **{k: v for k, v in scores.calibration.items()
                                                 if k in ("samples", "seq_len", "subsample", "similarity",
                                                          "criterion", "sources")}},
        files=files, seconds=seconds, notes=notes, scores=scores,
        placement=plan_placement(plans[solver], scores, config.solve))
    return report.write(config.out)


def summary(config, scores, plans, base_eval, evals, seconds) -> dict:
    """summary.json; without evaluations (a model that does not fit) "nll" is empty."""
    from grape.report.inspect_runs import RUN_FORMAT

    def per_domain(result) -> dict:
        return {d: r.nll for d, r in result.domains.items()} | {"mean": result.mean_nll}

    nll = {} if base_eval is None else {"unpruned": per_domain(base_eval),
                                        **{name: per_domain(e) for name, e in evals.items()}}
    return {
        "format": RUN_FORMAT,
        "model": str(config.model),
        "out": str(config.out),
        "budget": str(config.solve.budget),
        "objective": config.solve.objective,
        "solver": config.solve.solver,
        "method": config.method,
        "experts": sum(scores.model.experts_per_layer.values()),
        "plans": {name: {"status": p.status, "objective": p.objective, "bound": p.bound, "gap": p.gap,
                         "removed": p.num_removed, "uniform": p.is_uniform,
                         "kept_per_layer": {str(k): v for k, v in p.kept_counts().items()}}
                  for name, p in plans.items()},
        "nll": nll,
        "solve_config": config.solve.to_json(),
        "eval": asdict(config.evaluation) if base_eval is None else asdict(base_eval.config),
        "seconds": seconds,
    }


__all__ = ["UNLOADED_NOTE", "save_checkpoint", "stored_dtype", "summary", "write_eval", "write_report"]
