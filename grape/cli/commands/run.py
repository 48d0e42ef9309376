"""`grape run`: calibrate -> solve -> apply -> eval -> report, in one go."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from grape.cli.commands.sizes import LARGE, SMALL  # unset sizes: small on the test bed, else larger
from grape.errors import DataError
from grape.models.loading import DTYPES
from grape.outputs import DirOutput, clean_leftovers

TESTBED = "the embedded test-bed model (grape.testbed, a Qwen3-MoE with 32 experts per layer)"

# checked by the CLI when --out is given, and by run() once the default is resolved
OUTPUT = DirOutput(signature=("summary.json", "run.recipe.yaml"), what="a run folder",
                   inputs=("model", "tokenizer", "data", "eval_data", "scores", "search_data"))

HELP = "calibrate -> solve -> apply -> eval -> report in one go (default: the embedded test-bed model)"
DESCRIPTION = (
    "Run the whole pipeline on one model and write everything into --out: scores.npz, plan.json "
    "(and baseline plans), the pruned checkpoint (repaired by default: --repair auto re-fits the kept "
    "experts on the calibration documents where it can and keeps the repair only if it lowers the NLL of "
    "the held-out confirmation documents, docs/repair.md), evaluations of the model before and after "
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
    from grape.calibration.stage import add_calibration_arguments
    from grape.cli.commands.search import add_search_arguments
    from grape.cli.problem import add_problem_arguments
    from grape.evaluation.perplexity import EvalConfig
    from grape.flags import add_config_arguments
    from grape.models.files import MODEL_HELP
    from grape.pruning.apply import ApplyConfig

    io = parser.add_argument_group("model and data")
    io.add_argument("--model", type=Path, default=None,
                    help=f"{MODEL_HELP}; default: {TESTBED}")
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

    cal = parser.add_argument_group("calibration (as `grape calibrate`; unset sizes: small on the "
                                    "test-bed model, larger otherwise)")
    add_calibration_arguments(cal, skip=CALIBRATION_SHARED, rename=CALIBRATION_RENAMED,
                              unset=tuple(k for k in SMALL if k in CALIBRATION_SIZES))

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
    # and 50% when this default was chosen (the quality benchmark measures this properly).
    # --criterion and --normalize are calibration's too (one expert order for both stages)
    add_problem_arguments(parser, objective="curves")

    se = parser.add_argument_group("loss-verified allocation (the search stage, as `grape search`)")
    se.add_argument("--stability", action="store_true",
                    help="calibrate again on each half of the calibration rows and report how many of "
                    "the plan's removed experts each half would remove too, and their NLL (one more "
                    "calibration's cost; search.json 'stability')")
    se.add_argument("--no-search", action="store_true",
                    help="apply the solver's plan as it is, without measuring candidates")
    # --search-passes, --search-tokens, --search-data, ...: the flags of `grape search`
    add_search_arguments(se, data_help="unset: whole documents of --data held out of calibration "
                         "(docs/search.md)")

    ap = parser.add_argument_group("apply (as `grape apply`)")
    # repair auto: lstsq+experts where it can run, checked on held-out documents (docs/repair.md)
    add_config_arguments(ap, ApplyConfig, rename=APPLY_RENAMED, defaults={"repair": "auto"})
    ap.add_argument("--no-save", action="store_true", help="do not write the pruned checkpoint")
    ap.add_argument("--repair-rivals", type=int, default=2, metavar="N",
                    help="with a checked repair, make the search's final choice again on repaired plans: "
                         "the chosen plan and the N best other uniform finalists on the confirmation "
                         "documents are repaired and measured there (N + 1 more repairs); 0: judge the "
                         "plans unrepaired (docs/repair.md)")

    ev = parser.add_argument_group("evaluation (as `grape eval`; unset sizes: small on the test-bed "
                                   "model, larger otherwise)")
    add_config_arguments(ev, EvalConfig, skip=EVAL_SHARED, rename=EVAL_RENAMED,
                         unset=("seq_len", "max_tokens_per_domain"))

    rt = parser.add_argument_group("runtime (every stage)")
    rt.add_argument("--device", default="auto", help="device map of every stage: 'auto' (all GPUs, "
                    "else CPU), 'cpu', 'cuda', 'cuda:1' (calibration's --device-map)")
    rt.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="'auto': float32 on CPU, the checkpoint's dtype on GPU")
    rt.add_argument("--seed", type=int, default=0, help="calibration shuffle / subsample, search "
                    "and task seed")
    rt.add_argument("--no-progress", action="store_true", help="hide progress bars")


# Where two stages' fields share a name, `grape run` prefixes one (its flag is the stage's own
# name in the stage's verb); fields with one meaning for every stage get one runtime flag.
CALIBRATION_RENAMED = {"similarity": "calib_similarity"}  # solve's --similarity is the kind used
CALIBRATION_SHARED = ("progress", "seed", "criterion", "normalize", "device_map", "dtype")
CALIBRATION_SIZES = ("samples", "seq_len", "subsample")
APPLY_RENAMED = {"mode": "apply_mode"}  # calibration's --mode is the calibration's
EVAL_RENAMED = {"seq_len": "eval_seq_len", "batch_size": "eval_batch_size",
                "max_tokens_per_domain": "eval_tokens"}
# the run reports held-out NLL, so its evaluation always measures it
EVAL_SHARED = ("progress", "seed", "perplexity")


# -- settings -------------------------------------------------------------------------------
def resolve_settings(args: argparse.Namespace) -> None:
    """Fill the unset options in place (model, data, sizes), so the resolved recipe shows them."""
    from grape.models.loading import device_map
    from grape.models.files import check_model_dir, resolve_model, resolve_seq_len

    default_model = args.model is None
    if default_model:
        from grape import testbed

        args.model = testbed.model_dir()
    if args.out is None:  # named after the model as given (a Hub id's snapshot is a hash)
        args.out = Path("runs") / Path(str(args.model)).name
    args.model = resolve_model(args.model)
    model_config = check_model_dir(args.model)
    _check_architecture(model_config)
    if args.data is None and args.scores is None:
        from grape import testbed

        args.data = [str(testbed.calibration_file())]
    sizes = SMALL if default_model else LARGE
    for key, value in sizes.items():
        if key in ("seq_len", "eval_seq_len"):  # the one policy: capped at the context, with a notice
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
    from grape.models.adapters import supported_model_types
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
    from grape.flags import comma_list

    items = list(comma_list(text))
    return [] if items == ["none"] else items


# -- the verb -------------------------------------------------------------------------------
def run_config(args: argparse.Namespace):
    """The grape.pipeline.RunConfig the (resolved) flags describe: each stage's config from its
    own fields' flags (grape.flags), the shared runtime flags filled in."""
    from grape.calibration.stage import calibration_config_from_args
    from grape.cli.commands.apply import apply_config_from_args
    from grape.cli.commands.search import search_config_from_args
    from grape.cli.problem import solve_config_from_args
    from grape.evaluation.perplexity import EvalConfig
    from grape.flags import config_from_args
    from grape.pipeline import RunConfig

    progress = not args.no_progress
    calibration = calibration_config_from_args(
        args, rename=CALIBRATION_RENAMED, seed=args.seed, progress=progress, criterion=args.criterion,
        normalize=args.normalize, device_map=args.device, dtype=args.dtype)
    evaluation = config_from_args(EvalConfig, args, rename=EVAL_RENAMED, seed=args.seed, progress=progress)
    return RunConfig(
        model=args.model, out=args.out, data=args.data, scores=args.scores, tokenizer=args.tokenizer,
        eval_data=args.eval_data, calibration=calibration,
        solve=solve_config_from_args(args, solver=args.solver), evaluation=evaluation,
        apply=apply_config_from_args(args, rename=APPLY_RENAMED), save=not args.no_save,
        baselines=tuple(_names(args.baselines)), compare=not args.no_compare,
        compare_time_limit=args.compare_time_limit, device=args.device, dtype=args.dtype,
        search=None if args.no_search else search_config_from_args(args),
        search_data=args.search_data, overwrite=args.overwrite, stability=args.stability,
        repair_rivals=args.repair_rivals,
    )


def run(args: argparse.Namespace) -> int:
    from grape.pipeline import run as run_pipeline
    from grape.recipe import write_resolved

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this process reads local files only
    resolve_settings(args)
    OUTPUT.check(args)
    clean_leftovers(OUTPUT, args)  # --out may only be known now (the default runs/<model>)
    config = run_config(args)  # every flag is checked here, before the model is loaded
    args.out.mkdir(parents=True, exist_ok=True)
    write_resolved(args, "run")  # also on failure: the configuration is what one debugs first
    if config.method == "mask":
        from grape.pipeline import MASK_NOTE

        print(f"grape run: {MASK_NOTE}")
    result = run_pipeline(config)
    _print_result(result.summary, result.report)
    return 0


def _print_result(summary: dict, report: Path) -> None:
    if not summary["nll"]:  # a model that does not fit is not evaluated (the run said why)
        print(f"wrote {report}")
        return
    before = summary["nll"]["unpruned"]["mean"]
    parts = [f"unpruned {before:.4f}"] + [
        f"{name} {values['mean']:.4f} ({values['mean'] - before:+.4f})"
        for name, values in summary["nll"].items() if name != "unpruned"]
    print("mean held-out NLL: " + ", ".join(parts))
    print(f"wrote {report}")


__all__ = ["DESCRIPTION", "HELP", "OUTPUT", "add_arguments", "run"]
