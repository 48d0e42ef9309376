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
  free:40GB = removed experts free at least 40 GB; keep:100GiB = kept experts use at most 100 GiB
  (expert sizes as the checkpoint stores them, or as --deploy-dtype bf16|fp16|fp32|fp8|mxfp4).

fit to hardware: --fit 4x80GB (or 8xH100, 4xH200 ...) --kv-reserve 10% caps each of 4 pipeline
  stages at 80 GB less 10%, counting every parameter a device holds (routed experts, attention,
  norms, router, shared experts, embeddings / head); --max-seq-len 32768 --batch 8 adds the KV
  cache. --memory-cap 80GB,80GB,40GB --pipeline 3 gives one cap per device. The plan records
  the per-device table (placement) and this command prints it.
"""

OUTPUT = FileOutput(PLAN_FILE, inputs=("scores",), what="plan file")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag, and the description's own line breaks kept."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from grape.cli.problem import add_problem_arguments
    from grape.report.compare import solver_names

    parser.formatter_class = _HelpFormatter
    io = parser.add_argument_group("input and output")
    io.add_argument("--scores", required=True, metavar="FILE", help="scores file from calibrate or synth")
    io.add_argument("--out", default=None, metavar="FILE", help="plan file to write (JSON); omit to only print")
    io.add_argument("--quiet", action="store_true", help="print only the summary line")
    parser.add_argument("--solver", default="exact", choices=solver_names(),
                        help="exact: OR-Tools optimum or bound+gap; greedy: the objective's greedy "
                        "(ranking, GRAPE Algorithm 1, marginal gain); relaxation: CVXPY bound + "
                        "rounding; uniform: same count per layer; dp: exact DP for layer curves "
                        "(see docs/solvers.md)")
    add_problem_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from grape.api import build_problem, load_scores
    from grape.cli.problem import solve_config_from_args
    from solvers.constraints import format_bytes
    from solvers.plan import format_placement
    from solvers.solve import solve

    config = solve_config_from_args(args, solver=args.solver)  # bad flags fail before the file is read
    scores = load_scores(args.scores)
    problem = build_problem(scores, config)
    plan = solve(problem, config.solver, time_limit=config.time_limit)
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
        if plan.placement:
            print(format_placement(plan.placement, plan.provenance.get("sizes") or ""))
        if plan.provenance.get("repaired"):
            print(f"  repaired: {'; '.join(plan.provenance['repaired'])}")
    return 0

