"""`grape apply`: turn a plan into a smaller checkpoint."""

from __future__ import annotations

import argparse

HELP = "apply a plan to a model (remove / merge / mask experts) and save the checkpoint"
DESCRIPTION = (
    "Load MODEL, apply PLAN with the chosen method and write a checkpoint to OUT. A plan keeping "
    "the same number of experts in every layer gives a standard checkpoint (transformers, vLLM); "
    "a non-uniform plan gives per-layer counts in config.json plus a small remote-code class "
    "(load with grape.load_pruned, or from_pretrained(..., trust_remote_code=True))."
)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory or hub id (offline cache)")
    parser.add_argument("--plan", required=True, help="plan JSON written by `grape solve`")
    parser.add_argument("--method", choices=("remove", "merge", "mask"), default="remove",
                        help="remove: slice experts out; merge: fold removed experts into kept "
                        "ones, then remove; mask: keep weights, router never selects them")
    parser.add_argument("--out", required=True, help="output checkpoint directory (replaced if it exists)")
    parser.add_argument("--scores", default=None,
                        help="scores file whose token counts weight the merge average (merge only)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="dtype to load and save the weights in")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="do not copy the model's tokenizer into OUT")


def run(args: argparse.Namespace) -> int:
    import torch

    from grape.apply import ApplyConfig, apply_plan
    from grape.checkpoint import load_pruned, save_pruned
    from grape.errors import PlanError
    from solvers.plan import Plan
    from solvers.scores import Scores

    plan = Plan.load(args.plan)
    if args.scores and args.method != "merge":
        raise PlanError("--scores only weights a merge; drop it or use --method merge")
    merge_weights = Scores.load(args.scores) if args.scores else None
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)

    model = load_pruned(args.model, dtype=dtype)
    tokenizer = None if args.no_tokenizer else _tokenizer(args.model)
    if args.method == "merge" and merge_weights is None:
        print("grape apply: no --scores given; merged experts are averaged with equal weights")
    if args.method == "merge" and not plan.merge_map:
        print("grape apply: the plan has no merge map; each removed expert is merged into the kept "
              "expert with the most similar weights (cosine)")
    apply_plan(model, plan, ApplyConfig(args.method, merge_weights=merge_weights))
    provenance = {"source_model": args.model, "plan_file": args.plan}
    if args.scores:
        provenance["merge_scores_file"] = args.scores
        provenance["merge_scores_fingerprint"] = merge_weights.fingerprint()
    out = save_pruned(model, args.out, plan=plan, tokenizer=tokenizer, provenance=provenance)
    kept, total = plan.num_kept, plan.num_kept + plan.num_removed
    layout = "standard (uniform)" if plan.is_uniform else "per-layer counts (non-uniform)"
    if args.method == "mask":
        layout = "all weights kept, routers masked"
    print(f"grape apply: {args.method}: kept {kept}/{total} experts; wrote {out} ({layout})")
    return 0


def _tokenizer(path: str):
    """The model's tokenizer if it has one; a model directory without one is fine."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError):
        print(f"grape apply: no tokenizer found at {path}; the checkpoint has none")
        return None
