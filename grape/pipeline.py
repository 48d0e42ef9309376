"""The whole pipeline as one library call: calibrate -> solve -> apply -> evaluate -> report.

    from grape.pipeline import RunConfig, run
    result = run(RunConfig(model="path/to/moe", out="runs/x", data=["corpus/"],
                           solve=SolveConfig(budget=0.25, objective="curves")))
    result.summary["nll"]          # held-out NLL per domain, before and after
    result.report                  # runs/x/report.md

`grape run` parses its flags into a RunConfig and calls :func:`run`; the stage configurations
are the library's own (CalibrationConfig, SolveConfig, ApplyConfig, EvalConfig). Everything is
written into `out`: scores.npz, plan.json (and plans/<baseline>.json), the pruned checkpoint,
eval/*.json, summary.json and report.md with plots.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from grape.calibration.calibrate import CalibrationConfig
from grape.evaluation.perplexity import EvalConfig
from grape.pruning.apply import ApplyConfig
from grape.run_repair import (RunRepair, apply_checked, judged_repaired, repair_for_run, repair_method,
                              repair_notes)
from grape.searching.config import SearchConfig
from solvers.errors import UserError
from solvers.spec import SolveConfig, check_budget

MASK_NOTE = ("method `mask` keeps every weight (the routers skip the removed experts), so no smaller "
             "checkpoint was written; use `--method remove` for one")


@dataclass
class RunConfig:
    """One pipeline run. `data`: calibration sources (ignored when `scores` is given);
    `eval_data`: held-out sources (None: the embedded test bed's test split)."""

    model: str | os.PathLike
    out: str | os.PathLike
    data: list[str] | None = None
    scores: str | os.PathLike | None = None
    tokenizer: str | os.PathLike | None = None
    eval_data: list[str] | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    solve: SolveConfig = field(default_factory=SolveConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    # how the checkpoint is written (method, streaming / in-memory / auto, shard size)
    # (repair 'auto': lstsq+experts where it can run, kept only if it lowers held-out NLL, docs/repair.md)
    apply: ApplyConfig = field(default_factory=lambda: ApplyConfig(repair="auto"))
    method: str | None = None  # shorthand for apply.method (remove | merge | mask)
    save: bool = True  # write the pruned checkpoint (never for mask)
    allow_lower_top_k: bool | None = None  # shorthand for apply.allow_lower_top_k
    baselines: tuple[str, ...] = ("uniform",)  # solvers whose plans are also applied and evaluated
    compare: bool = True  # the table of every solver on the same problem
    compare_time_limit: float = 10.0
    device: str = "auto"
    dtype: str = "auto"
    overwrite: bool = False  # replace an out/checkpoint GRAPE did not write
    # the loss-verified search (grape.searching.stage, the same stage as `grape search`); None:
    # apply the solver's plan as it is
    search: SearchConfig | None = field(default_factory=SearchConfig)
    # where the search and confirmation tokens come from: None: whole documents of `data` held
    # out of calibration (grape.data.split); else these files, split by document, each domain
    # weighing the same (e.g. a validation split shaped like the evaluation)
    search_data: list[str] | None = None
    # calibrate again on each half of the calibration rows and report how much of the chosen
    # plan survives (grape.searching.stability; one more calibration's cost)
    stability: bool = False
    # with a checked repair: the search's final choice made again on the repaired chosen plan and
    # this many best uniform finalists, each repaired (grape.run_repair.judge_repaired; 0: off)
    repair_rivals: int = 2

    def __post_init__(self) -> None:
        from grape.report.compare import solver_names

        self.model, self.out = Path(self.model), Path(self.out)
        shorthands = {"method": self.method, "allow_lower_top_k": self.allow_lower_top_k}
        self.apply = replace(self.apply, **{k: v for k, v in shorthands.items() if v is not None})
        self.method, self.allow_lower_top_k = self.apply.method, self.apply.allow_lower_top_k
        self.baselines = tuple(b for b in self.baselines if b != self.solve.solver)
        known = solver_names()
        for name in (self.solve.solver, *self.baselines):
            if name not in known:
                raise UserError(f"unknown solver {name!r}; choose from {', '.join(known)}")
        if self.repair_rivals < 0:
            raise UserError(f"--repair-rivals {self.repair_rivals} must be >= 0 (0: judge the plans "
                            "unrepaired)")
        if self.data is None and self.scores is None:
            raise UserError("RunConfig needs calibration data (data=...) or a scores file (scores=...)")
        self.calibration.validate()
        if self.search is not None:
            self.search.check_names()
            if self.search.seq_len is None:  # search windows as long as calibration's
                self.search = replace(self.search, seq_len=self.calibration.seq_len)

    @property
    def saves_checkpoint(self) -> bool:
        return self.save and self.method != "mask"


@dataclass
class RunResult:
    summary: dict[str, Any]
    report: Path


class Calibrated(NamedTuple):
    """What the calibration stage of a run hands on."""

    tokenizer: Any
    model: Any
    scores: Any  # None on a torchrun rank other than 0
    held_out: Any  # grape.data.split.HeldOut, or None without a search
    rows: Any = None  # the calibration rows (grape.data.text.CalibrationData) when calibrated here


class _Stages:
    """Numbered stage lines ([2/6] solving ...) and the wall seconds of each stage."""

    def __init__(self, total: int):
        self.seconds: dict[str, float] = {}
        self.n, self.total = 0, total

    def start(self, name: str, what: str) -> None:
        self.n += 1
        self.name, self.t0 = name, time.perf_counter()
        print(f"[{self.n}/{self.total}] {what}", flush=True)

    def stop(self) -> None:
        self.seconds[self.name] = self.seconds.get(self.name, 0.0) + time.perf_counter() - self.t0


def run(config: RunConfig) -> RunResult:
    """Run every stage; see the module docstring. Checks that need no model come first."""
    from grape.run_outputs import UNLOADED_NOTE, summary, write_eval, write_report
    from solvers._io import atomic_write_text

    docs = _checked_inputs(config)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    searching = config.search is not None and (config.scores is None or config.data is not None
                                               or config.search_data is not None)
    held = _held(config)  # a model that does not fit is never loaded: those stages are skipped
    # with a search, the solver's own plan is evaluated as a baseline too
    stages = _Stages(3 + 2 * held.fits + searching + config.saves_checkpoint
                     + (held.fits and bool(config.baselines or searching)))

    stages.start("calibrate", f"calibrating {config.model}" if config.scores is None else
                 f"reading scores {config.scores}")
    calibrated = _calibrate_stage(config, searching, load=held.fits)
    tokenizer, model, scores, held_out = calibrated[:4]
    if scores is None:  # a rank other than 0 of a torchrun calibration: rank 0 goes on alone
        return RunResult({}, out / "report.md")
    check_budget(config.solve.budget, sum(scores.model.experts_per_layer.values()))
    stages.stop()

    stages.start("solve", f"solving: budget {config.solve.budget}, objective {config.solve.objective}, "
                 f"solver {config.solve.solver}")
    plans, rows = _solve_stage(config, scores)
    stages.stop()

    solver, found = config.solve.solver, None
    if searching:  # the plan applied is the best measured candidate; the solver's becomes a baseline
        found = _searched(config, stages, calibrated, plans, held)
        solver = "search"
    elif config.search is not None:
        print("    no loss-verified search: it needs calibration text (--data) to hold tokens out of")

    method, why = repair_method(config, scores, loaded=held.fits)
    repair = RunRepair(method, None, None)
    if model is not None and method.repair != "none":
        repair = repair_for_run(config, method, tokenizer, calibrated)
    if why or repair.method.repair != method.repair:
        print(f"    repair: none ({why or repair.why})", flush=True)
    if found is not None and model is not None and config.repair_rivals and repair.confirm is not None:
        model = judged_repaired(config, found, repair, model, plans, scores, lambda: _load_model(config))
    base_eval, evals, checks = None, {}, {}
    if model is not None:
        calibrated = calibrated._replace(model=None)  # the apply may swap the model (repair check)
        model, base_eval, evals, checks = _evaluate_and_apply(config, stages, model, tokenizer, docs,
                                                              plans[solver], solver, repair)
    else:
        print(f"    note: {UNLOADED_NOTE}", flush=True)
    files = _files(config, searching, found)
    if config.saves_checkpoint:  # after its evaluation: evaluated in the loading dtype, saved in its own
        from grape.run_outputs import save_checkpoint

        stages.start("save", f"saving the pruned checkpoint to {out / 'checkpoint'}")
        undone = solver in checks and not checks[solver].kept
        save_checkpoint(model, config, plans[solver], tokenizer,
                        replace(repair.method, repair="none") if undone else repair.method, repair.ids)
        files["pruned checkpoint"] = "checkpoint/"
        stages.stop()
    del model, calibrated  # the baselines load fresh copies: free this one first

    baselines = [n for n in plans if n != solver] if held.fits else []
    if baselines:  # each from a fresh copy of the model
        stages.start("baselines", f"applying and evaluating the baselines ({', '.join(baselines)})")
        evals.update(_baselines(config, plans, baselines, repair, tokenizer, docs, checks))
        stages.stop()
    for name, result in evals.items():
        write_eval(out / "eval" / f"{name}.json", result, base_eval)
        files[f"eval ({name})"] = f"eval/{name}.json"
    if base_eval is not None:
        files["eval (unpruned)"] = "eval/unpruned.json"

    stages.start("report", "writing the report")
    notes = [MASK_NOTE] * (config.method == "mask") + [UNLOADED_NOTE] * (not held.fits)
    notes += repair_notes(repair, checks, found)
    path = write_report(config, scores, solver, plans, base_eval, evals, rows, files, stages.seconds, notes)
    stages.stop()
    record = summary(config, scores, plans, base_eval, evals, stages.seconds)
    if found is not None:
        record["search"] = found.to_json()
    if checks:
        record["repair_check"] = {name: check.to_json() for name, check in checks.items()}
    atomic_write_text(out / "summary.json", json.dumps(record, indent=2) + "\n")
    return RunResult(record, path)


def _evaluate_and_apply(config: RunConfig, stages: _Stages, model, tokenizer, docs, plan, solver: str,
                        repair: RunRepair):
    """The unpruned model evaluated, then `plan` applied to it (and repaired, and the repair
    checked) and evaluated again; (the pruned model: the same one, or a fresh copy where the
    check undid the repair; unpruned EvalResult, {solver: EvalResult}, {solver: RepairCheck})."""
    from grape.evaluation.perplexity import evaluate
    from grape.run_outputs import write_eval

    label = config.model.name
    stages.start("eval_before", "evaluating the unpruned model")
    base_eval = evaluate(model, tokenizer, docs, config.evaluation, name=f"{label} (unpruned)")
    write_eval(config.out / "eval" / "unpruned.json", base_eval)
    stages.stop()

    stages.start("apply_and_eval", f"applying the {solver} plan ({config.method}) and evaluating the "
                 "pruned model")
    model, check = apply_checked(config, model, plan, repair, lambda: _load_model(config))
    evals = {solver: evaluate(model, tokenizer, docs, config.evaluation, name=f"{label} ({solver})")}
    stages.stop()
    return model, base_eval, evals, {solver: check} if check is not None else {}


def _files(config: RunConfig, searching: bool, found) -> dict[str, str]:
    files = {"resolved configuration": "run.recipe.yaml", "plan": "plan.json", "summary": "summary.json"}
    if searching:
        files["search (every measured candidate)"] = "search.json"
    if config.scores is None or (found is not None and found.nll_curves is not None):
        files["scores"] = "scores.npz"
    return files


def _searched(config: RunConfig, stages: _Stages, calibrated: Calibrated, plans: dict, held):
    """The search stage (and stability, when asked) as the run shows it."""
    held_out = calibrated.held_out
    confirm = held_out.confirm
    stages.start("search", f"loss-verified allocation: at most {config.search.max_passes} forward "
                 f"passes of {held_out.search.tokens:,} held-out tokens ({held_out.search.num_documents} "
                 f"documents of the {held_out.source})" + (
                     f", then the finalists on {confirm.tokens:,} tokens of {confirm.num_documents} "
                     "other documents" if confirm is not None else ""))
    found = _search_stage(config, calibrated.model, calibrated.scores, held_out, plans, held)
    if config.stability and calibrated.model is None:
        print("    stability: skipped (it calibrates and measures the model loaded whole, which does "
              "not fit in memory)")
    elif config.stability:
        _stability(config, calibrated, found)
    stages.stop()
    return found


def _held(config: RunConfig):
    """How the run holds the model (grape.searching.stage.SearchMode): calibration's rule decides
    whether the search runs layer by layer and whether the model is loaded at all; a model that
    does not fit and a stage that needs it loaded (a repair, a merge, an in-memory apply) are
    refused now, before any work."""
    from grape.pruning.stage import streams
    from grape.calibration.distributed import launched_size
    from grape.models.files import read_config
    from grape.searching.stage import SearchMode, search_mode

    if launched_size() > 1:  # under torchrun the calibration stage places each rank's copy itself
        return SearchMode("whole", True, "a torchrun job")
    held = search_mode(config.model, config.calibration)
    if held.fits or not config.saves_checkpoint:
        return held
    method, _ = repair_method(config, None, loaded=False)
    # a repair runs layer by layer from the shards where the model does not fit (apply's rule)
    if not streams(config.model, read_config(config.model), method, config.dtype, say=lambda line: None):
        raise UserError(f"the model does not fit in memory ({held.reason}), and --method {config.method}"
                        f"{' with --repair ' + method.repair if method.repair != 'none' else ''} needs it "
                        "loaded; use --method remove or mask without --repair, or --no-save")
    return held


# -- stages -------------------------------------------------------------------------------------
def _checked_inputs(config: RunConfig):
    """The held-out documents, after the checks that need no model (budget, lm-eval tasks, a
    repair's text and model)."""
    from grape.pruning.stage import check_repair
    from grape.evaluation.perplexity import default_heldout_files, load_documents
    from grape.evaluation.lmeval_offline import check_eval_tasks
    from grape.models.files import read_config

    check_budget(config.solve.budget)
    check_repair(read_config(config.model), repair_method(config, None)[0], data_flag="--repair-data or --data")
    docs = load_documents(config.eval_data or [str(p) for p in default_heldout_files("test")])
    check_eval_tasks(config.evaluation, docs)  # an lm-eval task that cannot run fails before calibration
    return docs


def _baselines(config: RunConfig, plans, names, repair: RunRepair, tokenizer, docs, checks: dict) -> dict:
    """Each baseline plan applied (and repaired and checked, with a repair) to a fresh copy of
    the model and evaluated; each check is added to `checks`."""
    from grape.evaluation.perplexity import evaluate

    evals = {}
    for name in names:
        model, check = apply_checked(config, _load_model(config), plans[name], repair,
                                     lambda: _load_model(config))
        if check is not None:
            checks[name] = check
        evals[name] = evaluate(model, tokenizer, docs, config.evaluation, name=f"{config.model.name} ({name})")
        del model
    return evals


def _load_model(config: RunConfig):
    from grape.models.loading import load_model

    return load_model(config.model, config.device, config.dtype)


def _calibrate_stage(config: RunConfig, searching: bool, load: bool = True):
    """The stage's Calibrated (tokenizer, model, scores, held-out windows). Without --search-data the search's
    and the confirmation's documents are held out of the calibration text (grape.data.split).
    Scores None: a rank other than 0 of a torchrun job. `load` False: the model does not fit, so
    it is never loaded (model None; calibration runs layer by layer)."""
    from grape.models.adapters import get_adapter
    from grape.models.loading import load_tokenizer
    from solvers.scores import Scores

    tokenizer = load_tokenizer(config.tokenizer or config.model)
    cal = _fitted_calibration(config)
    split = _split(config, cal, tokenizer, searching)
    held_out = split.held_out if split is not None else None
    if searching and config.search_data is not None:
        from grape.searching.stage import held_out_from_files

        held_out = held_out_from_files(config.search_data, tokenizer, config.search.seq_len, config.search)
    for note in (split.notes if split is not None else ()):
        _indent(note)
    if config.scores is not None:
        scores = Scores.load(config.scores)  # read before the model: a bad file fails fast
        if split is not None and split.held_out is not None and "held_out_documents" not in scores.calibration:
            _indent("note: these scores were calibrated on all of their text (not by `grape run`): if it "
                    "was --data, the search's held-out documents were seen by calibration")
        model = _load_model(config) if load else None
        if model is not None:  # else the layer-sequential search checks it against the shards
            scores.model.check_matches(get_adapter(model).identity())
        return Calibrated(tokenizer, model, scores, held_out)
    model, scores = _calibrated(config, replace(cal, samples=split.calibration.samples), split.calibration,
                                load)
    return Calibrated(tokenizer, model, scores, held_out, split.calibration)


def _fitted_calibration(config: RunConfig) -> CalibrationConfig:
    """The calibration settings with the stage's sequence-length policy applied (the search
    windows are cut with the same policy)."""
    from grape.calibration.stage import fit_seq_len
    from grape.models.files import context_length, read_config

    model_config = read_config(config.model)
    cal = fit_seq_len(config.calibration, model_config, who="grape run")
    context = context_length(model_config)
    if config.search is not None and context is not None and (config.search.seq_len or 0) > context:
        config.search = replace(config.search, seq_len=context)  # the same policy for its windows
    return cal


def _split(config: RunConfig, cal: CalibrationConfig, tokenizer, searching: bool):
    """The calibration text split by document (grape.data.split): calibration rows (none when
    the scores are given) and, when the search holds its tokens out of it, the held-out sets."""
    from grape.data.split import Targets, split_text
    from grape.searching.stage import targets

    holding = searching and config.search_data is None
    fresh = config.scores is None
    if config.data is None or not (fresh or holding):
        return None
    calibration_tokens = cal.samples * cal.seq_len if fresh else 0
    goal = targets(config.search, calibration_tokens) if holding else Targets(0, 0, calibration_tokens)
    return split_text([str(p) for p in config.data], tokenizer, goal, seq_len=cal.seq_len,
                      samples=cal.samples, seed=cal.seed, text_field=cal.text_field,
                      window_len=config.search.seq_len if holding else None)


def _calibrated(config: RunConfig, cal: CalibrationConfig, data, load: bool = True):
    """(model, scores) by the calibration stage (grape.calibration.stage, as `grape calibrate`):
    whole mode on the model the later stages use, loaded first; sequential mode (asked for, or
    the model does not fit) layer by layer, the model loaded for the later stages after (never
    when `load` is False: it does not fit)."""
    from grape.calibration.stage import calibrate_checkpoint, resolve_mode
    from grape.calibration.distributed import launched_size

    calibration = data
    # under torchrun the stage places each rank's copy itself (one GPU per rank)
    whole = launched_size() == 1 and resolve_mode(config.model, cal).mode == "whole"
    model = _load_model(config) if whole else None
    scores = calibrate_checkpoint(config.model, calibration, cal, out=config.out / "scores.npz",
                                  model=model, say=_indent)
    if scores is not None and model is None and load:
        model = _load_model(config)
    return model, scores


def _search_stage(config: RunConfig, model, scores, held_out, plans: dict, held=None):
    """The search stage (grape.searching.stage, as `grape search`): the best measured candidate
    becomes plans["search"] and plan.json; the solver's plan moves to plans/<solver>.json.
    `held` (grape.searching.stage.SearchMode) 'sequential': the plans are measured layer by layer
    from the shards, whether or not `model` is loaded too."""
    from grape.searching.stage import describe, open_sequential, run_search

    if held is not None and held.mode == "sequential":
        _indent(f"searching layer by layer ({held.reason})")
        model = open_sequential(config.model, config.calibration, held.reason, scratch=config.out)
        scores.model.check_matches(model.identity())
    found = run_search(model, scores, config.solve, held_out, config.search, out=config.out)
    plans["search"] = found.best.plan
    plans[config.solve.solver].save(config.out / "plans" / f"{config.solve.solver}.json")
    print("    " + describe(found), flush=True)
    return found


def _stability(config: RunConfig, calibrated: Calibrated, found) -> None:
    """grape.searching.stability on the calibration rows of this run (recorded in search.json)."""
    from grape.searching import stability

    from grape.searching.stage import RESULT_FILE
    from solvers._io import atomic_write_text

    if calibrated.rows is None:
        print("    stability: skipped (it needs calibration text, --data, calibrated in this run)")
        return
    found.stability = stability.measure(calibrated.model, config.model, calibrated.rows, config.calibration,
                                        config.solve, found, calibrated.held_out, say=_indent)
    atomic_write_text(config.out / RESULT_FILE, json.dumps(found.to_json(), indent=2) + "\n")


def _solve_stage(config: RunConfig, scores):
    from grape.report.compare import compare_solvers, solver_names
    from solvers.spec import build_problem, plan_for

    solver, out = config.solve.solver, config.out
    problem = build_problem(scores, config.solve)
    plans = {solver: plan_for(scores, config.solve, problem)}
    plans[solver].save(out / "plan.json")
    for name in config.baselines:
        plans[name] = plan_for(scores, replace(config.solve, solver=name), problem)
        plans[name].save(out / "plans" / f"{name}.json")
    rows = []
    if config.compare:
        from tqdm.auto import tqdm

        known = solver_names()
        with tqdm(total=len(known), desc="every solver on this problem", unit="solver", leave=False,
                  disable=not config.calibration.progress) as bar:
            def progress(what: str) -> None:
                bar.set_postfix_str(what.split(" / ")[-1])
                bar.update(1)

            rows = compare_solvers(scores, replace(config.solve, time_limit=config.compare_time_limit),
                                   [config.solve.objective], known, progress)
    main = plans[solver]
    print(f"    {solver}: {main.status}, objective {main.objective:.6g}, removes "
          f"{main.num_removed} of {main.num_kept + main.num_removed} experts; kept per layer "
          + " ".join(str(v) for v in main.kept_counts().values()), flush=True)
    return plans, rows


def _indent(line: str) -> None:
    print("    " + line, flush=True)


run_pipeline = run  # the name the package exports (grape.run_pipeline)

__all__ = ["MASK_NOTE", "RunConfig", "RunResult", "run", "run_pipeline"]
