"""`grape solve`: choose which experts to remove, globally, under a budget and constraints."""

from __future__ import annotations

import argparse

from grape.outputs import PLAN_FILE, FileOutput

HELP = "choose the experts to remove (scores file -> plan file)"
DESCRIPTION = """\
Read a scores file, build the allocation problem and solve it; write the plan (JSON, see
docs/formats.md) and print a summary. The plan passes an independent checker before it is written.

objectives (--objective, combine with weights: 'redundancy+0.5*additive'):
  additive     removed importance, sum of s_e over removed experts
  redundancy   GRAPE Eq. 4-5: sum over kept pairs of the similarity D_ij
  coverage     facility location: each removed expert is covered by its most similar kept
               expert at cost s_e (1 - sim); the assignment is written as the merge map
  curves       sum of measured per-layer cost curves c_l(n_l)

solvers (--solver):
  exact        integer program (OR-Tools/HiGHS): optimal with proof, or best plan + bound + gap
  greedy       ranking (additive), GRAPE Algorithm 1 (redundancy), marginal-gain otherwise
  ranking | grape | marginal   a specific greedy
  relaxation   CVXPY convex relaxation: a lower bound, then rounding + repair
  uniform      the same count removed in every layer (the local baseline)
  dp           dynamic program over per-layer curves (per-layer constraints, budget, uniform)

budget (--budget): 0.5 = remove half of all routed experts; 64 = remove exactly 64 experts;
  free:40GB = removed experts free at least 40 GB; keep:100GiB = kept experts use at most 100 GiB.
"""

OUTPUT = FileOutput(PLAN_FILE, inputs=("scores",), what="plan file")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag, and the description's own line breaks kept."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from solvers.objectives import TERMS

    parser.formatter_class = _HelpFormatter
    from solvers.scores import CRITERIA, NORMALIZATIONS

    io = parser.add_argument_group("input and output")
    io.add_argument(
        "--scores", required=True, metavar="FILE", help="scores file from calibrate or synth"
    )
    io.add_argument(
        "--out", default=None, metavar="FILE", help="plan file to write (JSON); omit to only print"
    )
    io.add_argument("--quiet", action="store_true", help="print only the summary line")

    what = parser.add_argument_group("what to optimise")
    what.add_argument(
        "--budget", required=True, help="fraction, expert count, free:SIZE or keep:SIZE"
    )
    what.add_argument(
        "--objective",
        default="additive",
        help=f"terms {', '.join(TERMS)}, optionally weighted and summed",
    )
    what.add_argument(
        "--criterion",
        default="reap_mass",
        choices=sorted(CRITERIA),
        help="per-expert importance from the scores",
    )
    what.add_argument(
        "--normalize",
        default="none",
        choices=sorted(NORMALIZATIONS),
        help="how layer scores are scaled before they meet globally",
    )
    what.add_argument(
        "--similarity",
        default="auto",
        help="similarity kind in the scores file (auto: cka if present)",
    )
    what.add_argument(
        "--similarity-top-m",
        type=int,
        default=None,
        metavar="M",
        help="keep only each expert's M most similar neighbours (others 0)",
    )
    what.add_argument(
        "--coverage-candidates",
        type=int,
        default=16,
        metavar="M",
        help="coverage integer program: candidate kept experts per expert",
    )

    how = parser.add_argument_group("how to solve")
    how.add_argument(
        "--solver",
        default="exact",
        choices=["exact", "greedy", "ranking", "grape", "marginal", "relaxation", "uniform", "dp"],
        help="exact: OR-Tools optimum or bound+gap; greedy: the objective's greedy (ranking, "
        "GRAPE Algorithm 1, marginal gain); relaxation: CVXPY bound + rounding; uniform: same "
        "count per layer; dp: exact DP for layer curves (see docs/solvers.md)",
    )
    how.add_argument(
        "--time-limit",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="wall-clock limit for the solver (exact: best plan + bound + gap at the limit)",
    )

    cons = parser.add_argument_group("constraints")
    cons.add_argument(
        "--min-kept",
        default="top_k",
        help="per-layer minimum kept: top_k (the router's k), a number, or none",
    )
    cons.add_argument(
        "--max-removed-fraction",
        type=float,
        default=None,
        metavar="F",
        help="remove at most this fraction of any layer",
    )
    cons.add_argument(
        "--uniform",
        action="store_true",
        help="same kept count in every layer (loads in vanilla transformers and vLLM)",
    )
    cons.add_argument(
        "--multiple-of",
        type=int,
        default=None,
        metavar="G",
        help="every layer keeps a multiple of G experts",
    )
    cons.add_argument(
        "--routing-groups",
        choices=["auto", "on", "off"],
        default="auto",
        help="DeepSeek-V3 group routing rules (auto: when the model has n_group > 1)",
    )
    cons.add_argument(
        "--must-keep", default=None, metavar="SPEC", help="experts to keep, 'LAYER:E1,E2;LAYER:E3'"
    )
    cons.add_argument(
        "--must-remove",
        default=None,
        metavar="SPEC",
        help="experts to remove, same syntax as --must-keep",
    )
    cons.add_argument(
        "--entropy-gamma",
        type=float,
        default=None,
        metavar="GAMMA",
        help="GRAPE entropy guard: allocation entropy >= (1 - GAMMA) log L",
    )
    cons.add_argument(
        "--memory-cap",
        default=None,
        metavar="SIZE",
        help="per-device cap on kept routed-expert bytes (with --pipeline or --expert-parallel)",
    )
    cons.add_argument(
        "--pipeline",
        type=int,
        default=None,
        metavar="D",
        help="placement for --memory-cap: D pipeline stages of contiguous layers",
    )
    cons.add_argument(
        "--expert-parallel",
        type=int,
        default=None,
        metavar="D",
        help="placement for --memory-cap: expert e on rank e*D//N in every layer",
    )


def constraints_from_args(args, scores) -> list:
    from solvers.constraints import (
        EntropyGuard,
        MaxRemovedFraction,
        MemoryCap,
        MultipleOf,
        MustKeep,
        MustRemove,
        Uniform,
        parse_bytes,
    )
    from solvers.errors import UserError

    out = []
    if args.max_removed_fraction is not None:
        out.append(MaxRemovedFraction(args.max_removed_fraction))
    if args.uniform:
        out.append(Uniform())
    if args.multiple_of is not None:
        out.append(MultipleOf(args.multiple_of))
    if args.must_keep:
        out.append(MustKeep.parse(args.must_keep))
    if args.must_remove:
        out.append(MustRemove.parse(args.must_remove))
    if args.entropy_gamma is not None:
        out.append(EntropyGuard(args.entropy_gamma))
    if args.memory_cap is not None:
        cap = parse_bytes(args.memory_cap)
        if (args.pipeline is None) == (args.expert_parallel is None):
            raise UserError(
                "--memory-cap needs exactly one placement: --pipeline D or --expert-parallel D"
            )
        if args.pipeline is not None:
            out.append(MemoryCap.pipeline(scores.model.moe_layers, args.pipeline, cap))
        else:
            out.append(
                MemoryCap.expert_parallel(scores.model.experts_per_layer, args.expert_parallel, cap)
            )
    elif args.pipeline is not None or args.expert_parallel is not None:
        raise UserError(
            "--pipeline/--expert-parallel only place a --memory-cap; give --memory-cap SIZE too"
        )
    return out


def run(args: argparse.Namespace) -> int:
    from solvers.constraints import format_bytes, parse_min_kept
    from solvers.objectives import Coverage, parse_objective
    from solvers.problem import build_problem
    from solvers.scores import Scores
    from solvers.solve import solve

    scores = Scores.load(args.scores)
    objective = parse_objective(args.objective)
    for _, term in objective.terms:
        if isinstance(term, Coverage):
            term.candidates = args.coverage_candidates
    min_kept = parse_min_kept(args.min_kept)
    routing = {"auto": "auto", "on": True, "off": False}[args.routing_groups]
    problem = build_problem(
        scores,
        args.budget,
        objective,
        constraints_from_args(args, scores),
        criterion=args.criterion,
        normalize=args.normalize,
        similarity=None if args.similarity == "none" else args.similarity,
        similarity_top_m=args.similarity_top_m,
        min_kept=min_kept,
        routing_groups=routing,
    )
    plan = solve(problem, args.solver, time_limit=args.time_limit)
    if args.out:
        plan.save(args.out)
    counts = plan.kept_counts()
    gap = "n/a" if plan.gap is None else f"{100 * plan.gap:.3f}%"
    bound = "n/a" if plan.bound is None else f"{plan.bound:.6g}"
    print(
        f"{plan.solver}: {plan.status}, objective {plan.objective:.6g}, bound {bound}, gap {gap}, "
        f"{plan.seconds:.2f} s" + (f" -> {args.out}" if args.out else "")
    )
    if not args.quiet:
        kept_bytes = sum(
            int(layer.expert_bytes[plan.kept[layer.index]].sum()) for layer in problem.layers
        )
        print(
            f"  objective: {problem.objective.describe()}; budget: {problem.budget.describe(problem)}"
        )
        for c in problem.constraints:
            print(f"  constraint: {c.describe(problem)}")
        print(
            f"  removed {plan.num_removed} of {problem.total_experts} experts; kept per layer "
            f"{min(counts.values())}..{max(counts.values())}"
            f"{' (uniform)' if plan.is_uniform else ''}; kept expert bytes {format_bytes(kept_bytes)}"
        )
        print(f"  method: {plan.provenance.get('method', '')}")
        if plan.provenance.get("repaired"):
            print(f"  repaired: {'; '.join(plan.provenance['repaired'])}")
    return 0
