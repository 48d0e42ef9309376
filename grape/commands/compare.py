"""`grape compare`: every solver and every objective on one scores file -> table + plot.

Also home of the problem flags (budget, objective, constraints) that `grape compare` and
`grape run` share, and of :func:`compare_solvers`, which both use. Pure optimisation: no torch.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from grape.outputs import DirOutput
from solvers._io import atomic_write_text
from solvers.errors import InfeasibleError, UserError

HELP = "run every solver on every objective for one scores file; write a table and a plot"
DESCRIPTION = (
    "Build the allocation problem from a scores file (written by `grape calibrate` or `grape "
    "synth`) once per objective, run every solver on it under the same budget, constraints and "
    "time limit, and write compare.md (objective value, excess over the best plan, proven lower "
    "bound, gap, seconds, kept-count range per solver), compare.json, compare.png and every plan "
    "into --out. Objectives the scores cannot support (no similarity, no cost curves) are "
    "listed as skipped. No model is loaded: this runs on a laptop."
)
ALL = "all"
OBJECTIVES = ("additive", "redundancy", "coverage", "curves")
OUTPUT = DirOutput(signature=("compare.json",), inputs=("scores",), what="a comparison folder")


# -- flags shared with `grape run` (the same names as `grape solve`'s) -----------------------
def add_problem_arguments(parser: argparse.ArgumentParser, *, objective: str | None = "additive",
                          time_limit: float = 60.0) -> None:
    """Budget, objective and constraint flags, named as in `grape solve`; read them back with
    :func:`solve_config`."""
    from solvers.objectives import TERMS
    from solvers.scores import CRITERIA, NORMALIZATIONS

    what = parser.add_argument_group("what to optimise")
    what.add_argument("--budget", default="0.25",
                      help="what to remove: a fraction of all routed experts (0.25), an expert "
                      "count (64), free:SIZE (free at least SIZE bytes, e.g. free:40GB) or keep:SIZE")
    if objective:
        what.add_argument("--objective", default=objective,
                          help=f"terms {', '.join(TERMS)}, optionally weighted and summed, e.g. "
                          "redundancy+0.5*additive (docs/solvers.md)")
    what.add_argument("--criterion", default="reap_mass", choices=sorted(CRITERIA),
                      help="per-expert importance read from the scores")
    what.add_argument("--normalize", default="none", choices=sorted(NORMALIZATIONS),
                      help="how each layer's importance is rescaled before layers meet")
    what.add_argument("--similarity", default="auto",
                      help="similarity kind for redundancy/coverage: auto (cka if present), cka, "
                      "cosine, router, or none")
    what.add_argument("--similarity-top-m", type=int, default=None, metavar="M",
                      help="keep only each expert's M most similar neighbours (others 0)")
    what.add_argument("--coverage-candidates", type=int, default=16, metavar="M",
                      help="coverage integer program: candidate kept experts per expert")
    what.add_argument("--time-limit", type=float, default=time_limit, metavar="SECONDS",
                      help="seconds per solver run (exact: best plan, bound and gap at the limit)")

    cons = parser.add_argument_group("constraints (as in `grape solve`)")
    cons.add_argument("--min-kept", default="top_k",
                      help="per-layer minimum kept: top_k (the router's k), a number, or none")
    cons.add_argument("--max-removed-fraction", type=float, default=None, metavar="F",
                      help="remove at most this fraction of any layer")
    cons.add_argument("--uniform", action="store_true",
                      help="same kept count in every layer (loads in vanilla transformers and vLLM)")
    cons.add_argument("--multiple-of", type=int, default=None, metavar="G",
                      help="every layer keeps a multiple of G experts")
    cons.add_argument("--routing-groups", choices=["auto", "on", "off"], default="auto",
                      help="DeepSeek-V3 group routing rules (auto: when the model has n_group > 1)")
    cons.add_argument("--must-keep", default=None, metavar="SPEC",
                      help="experts to keep, 'LAYER:E1,E2;LAYER:E3'")
    cons.add_argument("--must-remove", default=None, metavar="SPEC",
                      help="experts to remove, same syntax as --must-keep")
    cons.add_argument("--entropy-gamma", type=float, default=None, metavar="GAMMA",
                      help="GRAPE entropy guard: allocation entropy >= (1 - GAMMA) log L")
    cons.add_argument("--memory-cap", default=None, metavar="SIZE",
                      help="per-device cap on kept routed-expert bytes (with --pipeline or --expert-parallel)")
    cons.add_argument("--pipeline", type=int, default=None, metavar="D",
                      help="placement for --memory-cap: D pipeline stages of contiguous layers")
    cons.add_argument("--expert-parallel", type=int, default=None, metavar="D",
                      help="placement for --memory-cap: expert e on rank e*D//N in every layer")


def solve_config(args: argparse.Namespace, scores, objective: str | None = None, solver: str = "exact"):
    """The grape.api.SolveConfig the problem flags describe (constraints built by `grape solve`'s
    own parser of them, which needs the scores for memory-cap placements)."""
    from grape.api import SolveConfig
    from grape.commands.solve import constraints_from_args
    from solvers.constraints import parse_min_kept

    similarity = None if str(args.similarity).lower() == "none" else args.similarity
    return SolveConfig(
        budget=args.budget,
        objective=objective or getattr(args, "objective", "additive"),
        solver=solver,
        time_limit=args.time_limit,
        criterion=args.criterion,
        normalize=args.normalize,
        similarity=similarity,
        similarity_top_m=args.similarity_top_m,
        coverage_candidates=args.coverage_candidates,
        min_kept=parse_min_kept(args.min_kept),
        routing_groups={"auto": "auto", "on": True, "off": False}[args.routing_groups],
        constraints=tuple(constraints_from_args(args, scores)),
    )


# -- the comparison ------------------------------------------------------------------------
def solver_names() -> list[str]:
    import solvers.solve  # noqa: F401 - registers every solver
    from solvers.registry import SOLVERS

    return sorted(SOLVERS)


def compare_solvers(scores, config, objectives, solvers, progress=None, plan_dir: Path | None = None):
    """Rows of :class:`grape.report.SolverRow`: each solver on each objective.

    An objective the scores cannot support (a UserError while building its problem) is skipped
    with a row saying why, unless it is the only one asked for; an infeasible budget or
    constraint set raises, since no solver could do anything about it. A solver that cannot
    handle the problem gets a row with its message. `plan_dir` receives every plan as
    ``<objective>.<solver>.json``."""
    from dataclasses import replace

    from grape.api import BudgetError, build_problem
    from grape.report import SolverRow, fill_excess
    from solvers.constraints import precheck
    from solvers.solve import solve

    rows = []
    for objective in objectives:
        try:
            problem = build_problem(scores, replace(config, objective=objective))
            precheck(problem)
        except (InfeasibleError, BudgetError):
            raise
        except UserError as exc:
            if len(objectives) == 1:
                raise
            rows.append(SolverRow(objective, "(all)", error=f"skipped: {exc}"))
            continue
        for name in solvers:
            if progress:
                progress(f"{objective} / {name}")
            start = time.perf_counter()
            try:
                plan = solve(problem, solver=name, time_limit=config.time_limit)
            except InfeasibleError:
                raise
            except UserError as exc:
                rows.append(SolverRow(objective, name, error=str(exc),
                                      seconds=time.perf_counter() - start))
                continue
            counts = list(plan.kept_counts().values())
            rows.append(SolverRow(objective, name, status=plan.status, value=plan.objective,
                                  bound=plan.bound, gap=plan.gap, seconds=plan.seconds,
                                  kept_min=min(counts), kept_max=max(counts), uniform=plan.is_uniform))
            if plan_dir is not None:
                plan.save(Path(plan_dir) / f"{_safe(objective)}.{name}.json")
    fill_excess(rows)
    return rows


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def _split(text: str, known: list[str] | tuple[str, ...], what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if items == [ALL]:
        return list(known)
    if not items:
        raise UserError(f"--{what} is empty; give {ALL} or a comma-separated list")
    if what == "solvers":
        unknown = [t for t in items if t not in known]
        if unknown:
            raise UserError(f"unknown solver {unknown[0]!r}; choose from {', '.join(known)}")
    return items


# -- the verb ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, type=Path,
                        help="scores file (.npz) from `grape calibrate` or `grape synth`")
    parser.add_argument("--out", required=True, type=Path,
                        help="output directory: compare.md, compare.json, compare.png, plans/")
    parser.add_argument("--objectives", default=ALL,
                        help=f"comma-separated objectives (weighted sums allowed), or {ALL}: "
                        f"{', '.join(OBJECTIVES)}")
    parser.add_argument("--solvers", default=ALL,
                        help=f"comma-separated solver names, or {ALL} (see `grape solve --help`)")
    parser.add_argument("--no-plans", action="store_true", help="do not write every plan into OUT/plans/")
    add_problem_arguments(parser, objective=None, time_limit=10.0)


def run(args: argparse.Namespace) -> int:
    from grape.api import check_budget, load_scores
    from grape.recipe import dump_json
    from grape.report import plot_solvers, solver_table

    scores = load_scores(args.scores)
    check_budget(args.budget, sum(scores.model.experts_per_layer.values()))
    objectives = _split(args.objectives, OBJECTIVES, "objectives")
    names = _split(args.solvers, solver_names(), "solvers")
    config = solve_config(args, scores)
    total = len(objectives) * len(names)
    done = [0]

    def progress(what: str) -> None:
        done[0] += 1
        print(f"[{done[0]}/{total}] {what}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    rows = compare_solvers(scores, config, objectives, names, progress,
                           plan_dir=None if args.no_plans else args.out / "plans")
    table = solver_table(rows)
    header = (f"# Solver comparison: `{args.scores}`\n\n"
              f"{scores.model.model_type}, {len(scores.layers)} MoE layers, "
              f"{sum(scores.model.experts_per_layer.values())} routed experts; budget "
              f"`{args.budget}`, criterion `{args.criterion}`, time limit {args.time_limit:g} s per "
              "run. Objective values are recomputed from each plan (lower is better); "
              "'vs best' is the excess over the best plan found for that objective.\n\n")
    atomic_write_text(args.out / "compare.md", header + table + "\n\n![solvers](compare.png)\n")
    atomic_write_text(args.out / "compare.json", dump_json({
        "scores": str(args.scores), "scores_fingerprint": scores.fingerprint(),
        "config": config.to_json(), "rows": [r.to_json() for r in rows]}))
    if any(r.value is not None for r in rows):
        plot_solvers(rows, args.out / "compare.png")
    print(table)
    print(f"wrote {args.out / 'compare.md'}, compare.json and compare.png")
    return 0


__all__ = [
    "DESCRIPTION",
    "HELP",
    "add_arguments",
    "add_problem_arguments",
    "compare_solvers",
    "run",
    "solve_config",
    "solver_names",
]
