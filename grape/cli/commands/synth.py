"""`grape synth`: synthetic scores of a real model shape, in the scores-file format calibration writes."""

from __future__ import annotations

import argparse

from grape.outputs import SCORES_FILE, FileOutput

HELP = "write synthetic scores of a real model shape (for trying solvers without a model)"
DESCRIPTION = (
    "Write a scores file (the same .npz format `grape calibrate` writes; see docs/formats.md) "
    "filled with synthetic statistics shaped like real ones: heavy-tailed routing, depth trends, "
    "block-structured expert similarity and per-layer cost curves. Seeded and reproducible."
)

OUTPUT = FileOutput(SCORES_FILE, what="scores file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from solvers.synth import SHAPES

    parser.add_argument(
        "--shape", default=None, metavar="NAME", help=f"real model shape: {', '.join(SHAPES)}"
    )
    parser.add_argument("--out", default=None, metavar="FILE", help="scores file to write (.npz)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--tokens", type=int, default=1 << 21, help="calibration tokens to pretend")
    parser.add_argument(
        "--no-similarity",
        action="store_true",
        help="omit the expert similarity matrices (additive/curves objectives only; far smaller "
        "files: kimi-k2 1.3 MB instead of 66 MB, see docs/formats.md)",
    )
    parser.add_argument(
        "--no-cost-curve", action="store_true", help="omit the per-layer cost curves"
    )
    parser.add_argument("--list", action="store_true", help="list the shapes and exit")


def run(args: argparse.Namespace) -> int:
    from solvers.errors import UserError
    from solvers.synth import SHAPES, get_shape, synth_scores

    if args.list:
        print(f"{'shape':<20} {'MoE layers':>10} {'experts':>8} {'top-k':>6} {'total':>7}")
        for s in SHAPES.values():
            print(
                f"{s.name:<20} {len(s.moe_layers):>10} {s.experts:>8} {s.top_k:>6} {s.total_experts:>7}"
            )
        return 0
    if not args.shape or not args.out:
        raise UserError("give --shape NAME and --out FILE (or --list to see the shapes)")
    shape = get_shape(args.shape)
    scores = synth_scores(
        shape,
        seed=args.seed,
        tokens=args.tokens,
        similarity=not args.no_similarity,
        cost_curve=not args.no_cost_curve,
    )
    scores.save(args.out)
    print(
        f"wrote synthetic scores of {shape.name} ({len(shape.moe_layers)} MoE layers x "
        f"{shape.experts} experts, seed {args.seed}) to {args.out}"
    )
    return 0
