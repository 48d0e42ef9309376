"""`grape run`: calibrate -> solve -> apply -> eval -> report, in one go."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from grape.errors import DataError
from grape.outputs import DirOutput
from solvers.errors import UserError

TESTBED = "the embedded test-bed model (grape.testbed, a Qwen3-MoE with 32 experts per layer)"

# settings left unset on the command line and in the recipe: small on the embedded test-bed
# model (a few minutes on a 2-core CPU), larger on a model of your own
SMALL = {"samples": 32, "seq_len": 256, "subsample": 256, "eval_tokens": 8192, "eval_seq_len": 256}
LARGE = {"samples": 256, "seq_len": 2048, "subsample": 512, "eval_tokens": 65536, "eval_seq_len": 1024}

# checked by the CLI when --out is given, and by run() once the default is resolved
OUTPUT = DirOutput(signature=("summary.json", "run.recipe.yaml"), what="a run folder",
                   inputs=("model", "tokenizer", "data", "eval_data", "scores"))

MASK_NOTE = ("method `mask` keeps every weight (the routers skip the removed experts), so no smaller "
             "checkpoint was written; use `--method remove` for one")

HELP = "calibrate -> solve -> apply -> eval -> report in one go (default: the embedded test-bed model)"
DESCRIPTION = (
    "Run the whole pipeline on one model and write everything into --out: scores.npz, plan.json "
    "(and baseline plans), the pruned checkpoint, evaluations of the model before and after "
    "pruning, and report.md with PNG plots (experts kept per layer, held-out NLL before/after per "
    "domain, every solver on the same problem). Without --model it runs on the embedded test-bed "
    f"model (grape.testbed) with its committed calibration and held-out text, "
    "with small settings that finish in a few minutes on a 2-core CPU "
    f"({', '.join(f'{k} {v}' for k, v in SMALL.items())}); with --model the unset settings are "
    f"larger ({', '.join(f'{k} {v}' for k, v in LARGE.items())}), capped at the model's context. The problem flags are those of `grape solve`, except that the "
    "objective defaults to `curves` (measured per-layer output error), which gave the smallest "
    "held-out NLL increase on the test bed when this default was chosen (docs/results.md)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from grape.config import add_problem_arguments

    io = parser.add_argument_group("model and data")
    io.add_argument("--model", type=Path, default=None,
                    help=f"model directory; default: {TESTBED}")
    io.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory; default: the model's")
    io.add_argument("--data", nargs="+", default=None, metavar="PATH",
                    help="calibration text (text/JSONL files or directories); default: "
                    "the test bed's calibration text")
    io.add_argument("--eval-data", nargs="+", default=None, metavar="FILE",
                    help="held-out evaluation text (JSONL with text/domain, text files, DOMAIN=FILE); "
                    "default: the test bed's held-out test split")
    io.add_argument("--scores", type=Path, default=None,
                    help="reuse this scores file instead of calibrating (it must come from this model)")
    io.add_argument("--out", type=Path, default=None, help="output directory; default: runs/<model name>")

    cal = parser.add_argument_group("calibration (unset: small on the test-bed model, larger otherwise)")
    cal.add_argument("--samples", type=int, default=None, help="packed calibration sequences")
    cal.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sequence")
    cal.add_argument("--batch-size", type=int, default=4, help="calibration sequences per forward pass")
    cal.add_argument("--subsample", type=int, default=None,
                     help="tokens per layer on which every expert runs (similarity, cost curves)")
    cal.add_argument("--calib-similarity", default="cka,cosine,router",
                     help="similarity kinds to measure (comma-separated)")

    solve = parser.add_argument_group("solver")
    solve.add_argument("--solver", default="exact", help="solver for the plan that is applied")
    solve.add_argument("--baselines", default="uniform",
                       help="comma-separated solvers whose plans are also applied and evaluated "
                       "for comparison (e.g. uniform,greedy); 'none' for none")
    solve.add_argument("--no-compare", action="store_true",
                       help="skip the table of every solver on the same problem")
    solve.add_argument("--compare-time-limit", type=float, default=10.0,
                       help="seconds per solver in the comparison table")
    # default curves: the measured error of each layer's MoE output against its kept count. On
    # the test-bed model it gave the smallest held-out NLL increase of the four objectives at 25%
    # and 50% when this default was chosen (the quality benchmark measures this properly)
    add_problem_arguments(parser, objective="curves")

    ap = parser.add_argument_group("apply")
    ap.add_argument("--method", choices=("remove", "merge", "mask"), default="remove",
                    help="remove: slice experts out; merge: fold removed experts into kept ones "
                    "(weighted by calibration counts); mask: keep weights, never route to them")
    ap.add_argument("--no-save", action="store_true", help="do not write the pruned checkpoint")
    ap.add_argument("--allow-lower-top-k", action="store_true",
                    help="accept plans keeping fewer experts than top_k in a layer (top_k there "
                    "drops to the kept count); refused by default")

    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--eval-tokens", type=int, default=None,
                    help="predicted tokens per domain (0 = all)")
    ev.add_argument("--eval-seq-len", type=int, default=None, help="tokens per evaluation window")
    ev.add_argument("--eval-batch-size", type=int, default=8, help="windows per forward pass")
    ev.add_argument("--tasks", default="",
                    help="comma-separated lm-eval tasks ('local': next-line and cloze tasks from "
                    "the held-out text); empty: perplexity only")
    ev.add_argument("--task-limit", type=int, default=None, help="lm-eval examples per task")

    rt = parser.add_argument_group("runtime")
    rt.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'")
    rt.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="'auto': float32 on CPU, the checkpoint's dtype on GPU")
    rt.add_argument("--seed", type=int, default=0, help="calibration shuffle / subsample and task seed")
    rt.add_argument("--no-progress", action="store_true", help="hide progress bars")


# -- settings -------------------------------------------------------------------------------
def resolve_settings(args: argparse.Namespace) -> None:
    """Fill the unset options in place (model, data, sizes), so the resolved recipe shows them."""
    from grape.loading import device_map
    from grape.modelfiles import check_model_dir, resolve_seq_len

    default_model = args.model is None
    if default_model:
        from grape import testbed

        args.model = testbed.model_dir()
    model_config = check_model_dir(args.model)
    _check_architecture(model_config)
    if args.data is None and args.scores is None:
        from grape import testbed

        args.data = [str(testbed.calibration_file())]
    if args.out is None:
        args.out = Path("runs") / args.model.name
    sizes = SMALL if default_model else LARGE
    for key, value in sizes.items():
        if key in ("seq_len", "eval_seq_len"):  # an unset length is capped at the context
            flag = f"--{key.replace('_', '-')}"
            setattr(args, key, resolve_seq_len(getattr(args, key), value, model_config, flag, "grape run"))
        elif getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("samples", "seq_len", "eval_seq_len", "batch_size", "eval_batch_size"):
        if getattr(args, key) < 1:
            raise DataError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    device_map(args.device)  # a device this machine lacks fails now
    _check_min_kept(args, model_config)


def _check_architecture(model_config: dict) -> None:
    """Refuse an unsupported family from config.json, before any weights or data are read."""
    from grape.adapters import supported_model_types
    from grape.errors import ArchitectureError

    model_type = model_config.get("model_type")
    if model_type not in supported_model_types():
        raise ArchitectureError(f"model type {model_type!r} is not supported; GRAPE supports "
                                f"{', '.join(supported_model_types())} (see docs/extending.md to add one)")


def _check_min_kept(args: argparse.Namespace, model_config: dict) -> None:
    """A --min-kept below the router's top_k lets the plan lower top_k, which apply refuses unless
    --allow-lower-top-k: say so now rather than after calibration."""
    from solvers.constraints import parse_min_kept

    floor = parse_min_kept(args.min_kept)
    top_k = model_config.get("num_experts_per_tok") or model_config.get("experts_per_token")
    if args.allow_lower_top_k or floor == "top_k" or not isinstance(top_k, int):
        return
    if floor is None or floor < top_k:
        raise DataError(f"--min-kept {args.min_kept} lets a layer keep fewer experts than top_k "
                        f"({top_k}), which lowers top_k there; pass --allow-lower-top-k to accept "
                        "that, or keep --min-kept top_k")

def _names(text: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    return [] if items in ([], ["none"]) else items


# -- the verb -------------------------------------------------------------------------------
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


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only
    from grape.api import check_budget
    from grape.compare import compare_solvers, solver_names
    from grape.config import solve_config_from_args
    from grape.recipe import write_resolved
    from grape.report import RunReport
    from solvers._io import atomic_write_text

    resolve_settings(args)
    OUTPUT.check(args)
    known = solver_names()
    baselines = [b for b in _names(args.baselines) if b != args.solver]
    for name in [args.solver, *baselines]:
        if name not in known:
            raise UserError(f"unknown solver {name!r}; choose from {', '.join(known)}")
    # malformed problem flags fail now, not after calibration; the expert count once it is known
    config = solve_config_from_args(args, solver=args.solver)
    check_budget(args.budget, 1 << 62)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(args, "run")  # also on failure: the configuration is what one debugs first
    saving = not args.no_save and args.method != "mask"
    stages = _Stages(5 + saving + bool(baselines))

    # the checks that need no model go first: fail in a second, not after calibration
    from grape.evaluate import EvalConfig, default_heldout_files, load_documents

    eval_files = args.eval_data or [str(p) for p in default_heldout_files("test")]
    docs = load_documents(eval_files)
    eval_config = EvalConfig(seq_len=args.eval_seq_len, max_tokens_per_domain=args.eval_tokens or None,
                             batch_size=args.eval_batch_size,
                             tasks=tuple(_names(args.tasks)), task_limit=args.task_limit,
                             seed=args.seed, progress=not args.no_progress)
    from grape.calibrate import CalibrationConfig

    cal_config = CalibrationConfig(seq_len=args.seq_len, samples=args.samples, seed=args.seed,
                                   batch_size=args.batch_size, subsample=args.subsample,
                                   similarity=tuple(_names(args.calib_similarity)),
                                   criterion=args.criterion, normalize=args.normalize,
                                   progress=not args.no_progress)
    cal_config.validate()

    # 1. calibrate
    stages.start("calibrate", f"calibrating {args.model}" if args.scores is None else
                 f"reading scores {args.scores}")
    tokenizer, model, scores = _calibrate_stage(args, cal_config)
    check_budget(args.budget, sum(scores.model.experts_per_layer.values()))
    stages.stop()

    # 2. solve (+ baselines and the comparison table)
    stages.start("solve", f"solving: budget {args.budget}, objective {args.objective}, solver {args.solver}")
    plans, rows = _solve_stage(args, scores, config, baselines, known, compare_solvers)
    stages.stop()

    # 3. evaluate the unpruned model (before it is changed in place)
    from grape.evaluate import evaluate

    stages.start("eval_before", "evaluating the unpruned model")
    base_eval = evaluate(model, tokenizer, docs, eval_config, name=f"{args.model.name} (unpruned)")
    _write_eval(out / "eval" / "unpruned.json", base_eval)
    stages.stop()

    # 4. apply the chosen plan and evaluate the pruned model
    stages.start("apply_and_eval", f"applying the {args.solver} plan ({args.method}) and evaluating the "
                 "pruned model")
    from grape.apply import ApplyConfig, apply_plan

    method = ApplyConfig(args.method, merge_weights=scores if args.method == "merge" else None,
                         allow_lower_top_k=args.allow_lower_top_k)
    apply_plan(model, plans[args.solver], method)
    evals = {args.solver: evaluate(model, tokenizer, docs, eval_config, name=f"{args.model.name} ({args.solver})")}
    files = {"resolved configuration": "run.recipe.yaml", "plan": "plan.json", "summary": "summary.json"}
    if args.scores is None:
        files["scores"] = "scores.npz"
    stages.stop()

    # 5. save it (after its evaluation: evaluated in the loading dtype, saved in the checkpoint's own)
    if saving:
        stages.start("save", f"saving the pruned checkpoint to {out / 'checkpoint'}")
        _save_checkpoint(model, args, plans[args.solver], tokenizer)
        files["pruned checkpoint"] = "checkpoint/"
        stages.stop()
    del model

    # 6. the baselines: each from a fresh copy of the model
    if baselines:
        stages.start("baselines", f"applying and evaluating the baselines ({', '.join(baselines)})")
        for name in baselines:
            baseline_model = _load_model(args)
            apply_plan(baseline_model, plans[name], method)
            evals[name] = evaluate(baseline_model, tokenizer, docs, eval_config,
                                   name=f"{args.model.name} ({name})")
            del baseline_model
        stages.stop()
    for name, result in evals.items():
        _write_eval(out / "eval" / f"{name}.json", result, base_eval)
        files[f"eval ({name})"] = f"eval/{name}.json"
    files["eval (unpruned)"] = "eval/unpruned.json"

    # 7. report
    stages.start("report", "writing the report")
    report = RunReport(
        model=str(args.model), budget=str(args.budget), objective=args.objective, solver=args.solver,
        method=args.method, original=dict(scores.model.experts_per_layer), plans=plans,
        base_eval=base_eval, evals=evals, solver_rows=rows,
        calibration={"tokens": scores.tokens, **{k: v for k, v in scores.calibration.items()
                                                 if k in ("samples", "seq_len", "subsample", "similarity",
                                                          "criterion", "sources")}},
        files=files, seconds=stages.seconds,
        notes=[MASK_NOTE] if args.method == "mask" else [])
    path = report.write(out)
    stages.stop()
    summary = _summary(args, scores, plans, base_eval, evals, stages.seconds)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _print_result(summary, path)
    return 0


def _save_checkpoint(model, args, plan, tokenizer) -> None:
    from grape.checkpoint import save_pruned

    stored = _stored_dtype(args.model)
    if stored is not None and stored != next(model.parameters()).dtype:
        model.to(stored)  # the weights were widened to float32 for CPU work; write them as they came
    save_pruned(model, args.out / "checkpoint", plan=plan, tokenizer=tokenizer,
                provenance={"source_model": str(args.model), "run_dir": str(args.out)},
                overwrite=args.overwrite)


def _stored_dtype(model_dir: Path):
    import torch

    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    value = getattr(torch, str(name), None) if name else None
    return value if isinstance(value, torch.dtype) else None


def _load_model(args):
    from grape.loading import load_model

    return load_model(args.model, args.device, args.dtype)


def _calibrate_stage(args, cal_config):
    from grape.adapters import get_adapter
    from grape.calibrate import calibrate
    from grape.loading import load_tokenizer
    from grape.data import load_calibration_data
    from solvers.scores import Scores

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if args.scores is not None:
        scores = Scores.load(args.scores)  # read before the model: a bad file fails fast
        model = _load_model(args)
        scores.model.check_matches(get_adapter(model).identity())
        return tokenizer, model, scores
    data = load_calibration_data([str(p) for p in args.data], tokenizer, seq_len=cal_config.seq_len,
                                 samples=cal_config.samples, seed=cal_config.seed,
                                 text_field=cal_config.text_field, progress=cal_config.progress)
    model = _load_model(args)
    scores = calibrate(model, data, cal_config)
    scores.calibration["model_path"] = str(Path(args.model).resolve())
    scores.save(args.out / "scores.npz")
    return tokenizer, model, scores


def _solve_stage(args, scores, config, baselines, known, compare_solvers):
    from dataclasses import replace

    from grape.api import build_problem, solve

    problem = build_problem(scores, config)
    plans = {args.solver: solve(problem, config)}
    plans[args.solver].save(args.out / "plan.json")
    for name in baselines:
        plans[name] = solve(problem, replace(config, solver=name))
        plans[name].save(args.out / "plans" / f"{name}.json")
    rows = []
    if not args.no_compare:
        from tqdm.auto import tqdm

        with tqdm(total=len(known), desc="every solver on this problem", unit="solver", leave=False,
                  disable=args.no_progress) as bar:
            def progress(what: str) -> None:
                bar.set_postfix_str(what.split(" / ")[-1])
                bar.update(1)

            rows = compare_solvers(scores, replace(config, time_limit=args.compare_time_limit),
                                   [args.objective], known, progress)
    main = plans[args.solver]
    print(f"    {args.solver}: {main.status}, objective {main.objective:.6g}, removes "
          f"{main.num_removed} of {main.num_kept + main.num_removed} experts; kept per layer "
          + " ".join(str(v) for v in main.kept_counts().values()), flush=True)
    return plans, rows


def _write_eval(path: Path, result, baseline=None) -> None:
    from solvers._io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, result.to_json(baseline))


def _summary(args, scores, plans, base_eval, evals, seconds) -> dict:
    total = sum(scores.model.experts_per_layer.values())
    return {
        "model": str(args.model),
        "out": str(args.out),
        "budget": str(args.budget),
        "objective": args.objective,
        "solver": args.solver,
        "method": args.method,
        "experts": total,
        "plans": {name: {"status": p.status, "objective": p.objective, "bound": p.bound, "gap": p.gap,
                         "removed": p.num_removed, "uniform": p.is_uniform,
                         "kept_per_layer": {str(k): v for k, v in p.kept_counts().items()}}
                  for name, p in plans.items()},
        "nll": {"unpruned": {d: r.nll for d, r in base_eval.domains.items()} | {"mean": base_eval.mean_nll},
                **{name: {d: r.nll for d, r in e.domains.items()} | {"mean": e.mean_nll}
                   for name, e in evals.items()}},
        "eval": asdict(base_eval.config),
        "seconds": seconds,
    }


def _print_result(summary: dict, report: Path) -> None:
    before = summary["nll"]["unpruned"]["mean"]
    parts = [f"unpruned {before:.4f}"] + [
        f"{name} {values['mean']:.4f} ({values['mean'] - before:+.4f})"
        for name, values in summary["nll"].items() if name != "unpruned"]
    print("mean held-out NLL: " + ", ".join(parts))
    print(f"wrote {report}")


__all__ = ["DESCRIPTION", "HELP", "OUTPUT", "add_arguments", "run"]
