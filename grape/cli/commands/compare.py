"""`grape compare`: every solver and every objective on one scores file -> table + plot.
The work is grape.report.compare.compare_solvers; this module parses, calls and writes."""

from __future__ import annotations

import argparse
from pathlib import Path

from grape.report.compare import ALL, objective_names
from grape.flags import comma_list
from grape.outputs import DirOutput
from solvers._io import atomic_write_text
from solvers.errors import UserError

HELP = "run every solver on every objective for one scores file; write a table and a plot"
DESCRIPTION = (
    "Build the allocation problem from a scores file (written by `grape calibrate` or `grape "
    "synth`) once per objective, run every solver on it under the same budget, constraints and "
    "time limit, and write compare.md (objective value, excess over the best plan, proven lower "
    "bound, gap, seconds, kept-count range per solver), compare.json, compare.png (each solver "
    "against the best plan), kept_per_layer.png (each plan's experts per layer, side by side) and "
    "every plan into --out. Objectives the scores cannot support (no similarity, no cost curves) are "
    "listed as skipped. No model is loaded: this runs on a laptop. The problem flags are those of "
    "`grape solve`; the time limit defaults to 10 s because every solver runs on every objective."
)
OUTPUT = DirOutput(signature=("compare.json",), inputs=("scores",), what="a comparison folder")
PLOT_KEPT = "kept_per_layer.png"


def _split(text: str, known: list[str] | tuple[str, ...], what: str) -> list[str]:
    items = list(comma_list(text))
    if items == [ALL]:
        return list(known)
    if not items:
        raise UserError(f"--{what} is empty; give {ALL} or a comma-separated list")
    if what == "solvers":
        unknown = [t for t in items if t not in known]
        if unknown:
            raise UserError(f"unknown solver {unknown[0]!r}; choose from {', '.join(known)}")
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from grape.cli.problem import add_problem_arguments

    parser.add_argument("--scores", required=True, type=Path,
                        help="scores file (.npz) from `grape calibrate` or `grape synth`")
    parser.add_argument("--out", required=True, type=Path,
                        help="output directory: compare.md, compare.json, compare.png, plans/")
    parser.add_argument("--objectives", default=ALL,
                        help=f"comma-separated objectives (weighted sums allowed), or {ALL}: "
                        f"{', '.join(objective_names())} (every registered term, --plugin ones included); "
                        "--objective X is the same as --objectives X")
    parser.add_argument("--solvers", default=ALL,
                        help=f"comma-separated solver names, or {ALL} (see `grape solve --help`)")
    parser.add_argument("--no-plans", action="store_true", help="do not write every plan into OUT/plans/")
    add_problem_arguments(parser, objective=None, time_limit=10.0)


def run(args: argparse.Namespace) -> int:
    from grape.api import check_budget, load_scores
    from grape.report.compare import compare_solvers, solver_names
    from grape.cli.problem import solve_config_from_args
    from grape.report.inspect_runs import COMPARE_FORMAT
    from grape.recipe import dump_json
    from grape.report.tables import plot_kept_by_solver, plot_solvers, solver_table

    objectives = _split(args.objective or args.objectives, objective_names(), "objectives")
    names = _split(args.solvers, solver_names(), "solvers")
    config = solve_config_from_args(args, objective=objectives[0])  # bad flags fail first
    scores = load_scores(args.scores)
    check_budget(config.budget, sum(scores.model.experts_per_layer.values()))
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
              f"`{config.budget}`, criterion `{args.criterion}`, time limit {args.time_limit:g} s per "
              "run. Objective values are recomputed from each plan (lower is better); "
              "'vs best' is the excess over the best plan found for that objective.\n\n")
    atomic_write_text(args.out / "compare.md", header + table + "\n\n![solvers](compare.png)\n\n"
                      f"![experts kept per layer]({PLOT_KEPT})\n")
    atomic_write_text(args.out / "compare.json", dump_json({
        "format": COMPARE_FORMAT, "scores": str(args.scores), "scores_fingerprint": scores.fingerprint(),
        "config": config.to_json(), "rows": [r.to_json() for r in rows]}))
    if any(r.value is not None for r in rows):
        plot_solvers(rows, args.out / "compare.png")
        plot_kept_by_solver(rows, args.out / PLOT_KEPT)
    print(table)
    print(f"wrote {args.out / 'compare.md'}, compare.json, compare.png and {PLOT_KEPT}")
    return 0


__all__ = ["DESCRIPTION", "HELP", "OUTPUT", "add_arguments", "run"]
