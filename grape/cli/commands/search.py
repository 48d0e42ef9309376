"""`grape search`: the loss-verified search as a stage of its own.

model + scores + budget (or a plan) + search data -> plan.json and search.json. Its flags are
`grape run`'s search flags (both come from :func:`add_search_arguments`, generated from
grape.searching.config.SearchConfig) and its problem flags those of `grape solve` with `grape
run`'s objective, so the same inputs give the plan `grape run` chose.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grape.outputs import DirOutput

HELP = "measure candidate plans on held-out text and keep the best (model + scores -> plan.json)"
DESCRIPTION = (
    "The loss-verified search of `grape run` on its own (docs/search.md): seed plans (the "
    "configured solver's, or --plan; the exact program on other objectives; the uniform plan "
    "under every criterion) are measured by forward passes over --search-data with the routers "
    "masked, then improved by measured NLL curves, criterion choice and level switches; the "
    "result is never worse than the best uniform plan on the search tokens unless a candidate "
    "beats it by --search-margin paired standard errors. Writes plan.json, search.json (every "
    "candidate, its role and NLL), search.cache.json (resume) and, when it measured NLL curves, "
    "scores.npz with them into --out. Given the scores a `grape run` started from and the same "
    "flags, it chooses the plan that run chose. A model that does not fit in memory (or --mode "
    "sequential) is measured one decoder layer at a time from its shards, with the same plans "
    "and NLLs."
)
# the flags of calibration's runtime that say how the model is held: --mode, --sequential and
# --hidden-states, declared once (grape.calibration.calibrate.CalibrationConfig) for both verbs
MODE_FIELDS = ("mode", "hidden_states")
OUTPUT = DirOutput(signature=("search.json",), what="a search folder",
                   inputs=("model", "tokenizer", "scores", "plan", "search_data"))


def add_search_arguments(group, data_help: str, required: bool = False) -> None:
    """The search flags of `grape search` and `grape run`: every flagged SearchConfig field
    (--search-passes, --search-tokens, --search-criteria, ...) and --search-data."""
    from grape.flags import add_config_arguments
    from grape.searching.config import SearchConfig

    add_config_arguments(group, SearchConfig)
    group.add_argument("--search-data", nargs="+", default=None, metavar="FILE", required=required,
                       help="files the search measures on, each weighted equally (e.g. one per "
                       f"domain of a validation split); {data_help}")


def search_config_from_args(args: argparse.Namespace):
    """The SearchConfig the parsed search flags describe (seed and progress from the verb's)."""
    from grape.flags import config_from_args
    from grape.searching.config import SearchConfig

    return config_from_args(SearchConfig, args, seed=args.seed, progress=not args.no_progress)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from grape.report.compare import solver_names
    from grape.cli.problem import add_problem_arguments
    from grape.models.loading import DTYPES
    from grape.models.files import MODEL_HELP

    io = parser.add_argument_group("model and data")
    io.add_argument("--model", type=Path, required=True, help=MODEL_HELP)
    io.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory; default: the model's")
    io.add_argument("--scores", type=Path, required=True,
                    help="scores file of this model (`grape calibrate`, or the one a `grape run` started from)")
    io.add_argument("--plan", type=Path, default=None,
                    help="start from this plan instead of the solver's (the budget defaults to its "
                    "removed count)")
    io.add_argument("--out", type=Path, required=True,
                    help="output directory: plan.json, search.json, search.cache.json")
    se = parser.add_argument_group("loss-verified allocation")
    add_search_arguments(se, data_help="required", required=True)
    parser.add_argument("--solver", default="exact", choices=solver_names(),
                        help="solver of the configured seed plan (as `grape run --solver`)")
    # objective curves: `grape run`'s default, so that the same flags give the same seeds
    add_problem_arguments(parser, objective="curves")
    rt = parser.add_argument_group("runtime")
    rt.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'")
    rt.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="'auto': float32 on CPU, the checkpoint's dtype on GPU")
    add_mode_arguments(rt)
    rt.add_argument("--seed", type=int, default=0, help="seed of the level-switch moves")
    rt.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_mode_arguments(group) -> None:
    """`grape calibrate`'s --mode, --sequential and --hidden-states (the search measures layer
    by layer where calibration would calibrate layer by layer)."""
    import dataclasses

    from grape.calibration.stage import add_calibration_arguments
    from grape.calibration.calibrate import CalibrationConfig

    others = tuple(f.name for f in dataclasses.fields(CalibrationConfig) if f.name not in MODE_FIELDS)
    add_calibration_arguments(group, skip=others)


def mode_config(args: argparse.Namespace):
    """The CalibrationConfig holding how the model is held (mode, hidden states, device, dtype);
    --sequential with --mode whole is refused here, before anything is read."""
    from grape.calibration.stage import calibration_config_from_args

    return calibration_config_from_args(args, device_map=args.device, dtype=args.dtype)


def _resolve(args: argparse.Namespace, scores, plan) -> tuple:
    """(SolveConfig, SearchConfig) from the flags; unset sizes as `grape run` sets them (small on
    the test-bed model), the budget from --plan when none is given."""
    from dataclasses import replace

    from grape import testbed
    from grape.cli.commands.sizes import LARGE, SMALL
    from grape.cli.problem import solve_config_from_args
    from grape.models.files import resolve_model
    from grape.searching.stage import sequence_length
    from solvers.spec import is_default_budget

    args.model = resolve_model(args.model)
    sizes = SMALL if Path(args.model).resolve() == Path(testbed.model_dir()).resolve() else LARGE
    if args.search_passes is None:
        args.search_passes = sizes["search_passes"]
    overrides = {"solver": args.solver}
    if plan is not None and is_default_budget(args.budget):
        overrides["budget"] = plan.num_removed  # the plan's own budget, as an expert count
    solve = solve_config_from_args(args, **overrides)
    if plan is not None:  # a plan the problem refuses fails now, before the model is loaded
        from grape.searching.algorithm import check_given_plan
        from solvers.spec import build_problem

        check_given_plan(plan, build_problem(scores, solve))
    search = search_config_from_args(args)
    search.check_names()
    return solve, replace(search, seq_len=sequence_length(scores, search))


def run(args: argparse.Namespace) -> int:
    from grape.models.loading import load_tokenizer
    from grape.searching.stage import (
        describe,
        held_out_from_files,
        open_model,
        run_search,
        search_mode,
    )
    from solvers.plan import Plan
    from solvers.scores import Scores

    scores = Scores.load(args.scores)  # read before the model: a bad file fails fast
    plan = Plan.load(args.plan) if args.plan is not None else None
    solve, search = _resolve(args, scores, plan)
    held = search_mode(args.model, mode_config(args), check_fit=False)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    held_out = held_out_from_files(args.search_data, tokenizer, search.seq_len, search)
    print(f"grape search: {held.mode} mode ({held.reason})", flush=True)
    model, identity = open_model(args.model, mode_config(args), held, scratch=args.out)
    scores.model.check_matches(identity)
    confirm = held_out.confirm
    print(f"searching: at most {search.max_passes} forward passes of {held_out.search.tokens:,} tokens "
          f"({held_out.search.num_documents} documents)" + (
              f", then the finalists on {confirm.tokens:,} tokens of {confirm.num_documents} other documents"
              if confirm is not None else ""), flush=True)
    found = run_search(model, scores, solve, held_out, search, out=args.out, plan=plan)
    print(describe(found))
    print(f"wrote {args.out / 'plan.json'} and {args.out / 'search.json'}")
    return 0


__all__ = ["DESCRIPTION", "HELP", "OUTPUT", "add_arguments", "add_mode_arguments", "add_search_arguments",
           "mode_config", "run", "search_config_from_args"]
