"""`grape apply`: turn a plan into a smaller checkpoint."""

from __future__ import annotations

import argparse
import sys

from grape.outputs import DirOutput

PROVENANCE_FILE = "grape_provenance.json"  # grape.checkpoint.PROVENANCE_FILE (no torch import here)

HELP = "apply a plan to a model (remove / merge / mask experts) and save the checkpoint"
DESCRIPTION = (
    "Apply PLAN to MODEL with the chosen method and write a checkpoint to OUT. remove and mask "
    "stream the safetensors shard by shard (memory stays flat whatever the model's size; "
    "quantised FP8 / MXFP4 experts stay quantised); merge, and --in-memory, load the model. A plan keeping "
    "the same number of experts in every layer gives a standard checkpoint (transformers, vLLM); "
    "a non-uniform plan gives per-layer counts in config.json plus a small remote-code class "
    "(load with grape.load_pruned, or from_pretrained(..., trust_remote_code=True))."
)

DTYPES = ("auto", "float32", "bfloat16", "float16")
OUTPUT = DirOutput(signature=(PROVENANCE_FILE,), inputs=("model", "plan", "scores"), what="a checkpoint",
                   replaces=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from grape.flags import add_config_arguments
    from grape.modelfiles import MODEL_HELP
    from grape.pruning import ApplyConfig

    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--plan", required=True, help="plan JSON written by `grape solve`")
    parser.add_argument("--out", required=True, help="output checkpoint directory: new, empty, or a checkpoint grape wrote "
                        "(replaced as a whole); never the model itself or a folder inside it")
    parser.add_argument("--scores", default=None,
                        help="scores file whose token counts weight the merge average (merge only)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="dtype to load and save the weights in")
    parser.add_argument("--no-tokenizer", action="store_true",
                        help="do not copy the model's tokenizer into OUT")
    parser.add_argument("--skip-model-check", action="store_true",
                        help="apply a plan that records no model (no `model` block, e.g. written "
                        "by hand) without checking it was made for --model; refused by default")
    add_config_arguments(parser, ApplyConfig)  # --method, --allow-lower-top-k (grape/flags.py)
    parser.add_argument("--in-memory", action="store_true",
                        help="load the whole model and save it (as merge does) instead of streaming "
                        "the checkpoint shard by shard for remove / mask")
    parser.add_argument("--max-shard-size", default="50GB",
                        help="largest output shard when streaming (e.g. 5GB, 200MB; transformers' "
                        "default); a single larger tensor gets a shard of its own")


def run(args: argparse.Namespace) -> int:
    import torch

    from grape.pruning import ApplyConfig, apply_plan
    from grape.checkpoint import load_pruned, save_pruned
    from grape.errors import PlanError
    from grape.modelfiles import check_model_dir, resolve_model
    from grape.quantized import check_method
    from grape.shards import parse_size
    from grape.streaming import streaming_unavailable
    from solvers.plan import Plan
    from solvers.scores import Scores

    # everything that needs no weights first: a bad plan or model directory fails in a second
    args.model = str(resolve_model(args.model))  # a Hub id: its snapshot in the local cache
    model_config = check_model_dir(args.model)
    plan = Plan.load(args.plan)
    precheck_plan(plan, model_config, args.allow_lower_top_k)
    require_model_block(plan, args.plan, args.skip_model_check)
    if args.scores and args.method != "merge":
        raise PlanError("--scores only weights a merge; drop it or use --method merge")
    check_method(model_config, args.method)
    parse_size(args.max_shard_size)
    if not args.in_memory:
        reason = streaming_unavailable(args.model, model_config, args.method, args.dtype)
        if reason is None:
            return _run_streaming(args, plan)
        if args.method != "merge":
            print(f"grape apply: {reason}; loading the model in memory instead")
    merge_weights = Scores.load(args.scores) if args.scores else None
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)

    model = load_pruned(args.model, dtype=dtype)
    tokenizer = None if args.no_tokenizer else _tokenizer(args.model)
    if args.method == "merge" and merge_weights is None:
        print("grape apply: no --scores given; merged experts are averaged with equal weights")
    if args.method == "merge" and not plan.merge_map:
        print("grape apply: the plan has no merge map; each removed expert is merged into the kept "
              "expert with the most similar weights (cosine)")
    apply_plan(model, plan, ApplyConfig(args.method, merge_weights=merge_weights,
                                        allow_lower_top_k=args.allow_lower_top_k))
    provenance = {"source_model": args.model, "plan_file": args.plan}
    if args.scores:
        provenance["merge_scores_file"] = args.scores
        provenance["merge_scores_fingerprint"] = merge_weights.fingerprint()
    out = save_pruned(model, args.out, plan=plan, tokenizer=tokenizer, provenance=provenance,
                      overwrite=args.overwrite)
    _summary(args, plan, out, "")
    return 0


def _run_streaming(args: argparse.Namespace, plan) -> int:
    """remove / mask without loading the model: grape.streaming slices the shards."""
    from grape.modelfiles import read_config
    from grape.quantized import describe
    from grape.streaming import stream_apply

    tokenizer = None if args.no_tokenizer else _tokenizer(args.model)
    out = stream_apply(args.model, plan, args.out, args.method, tokenizer=tokenizer,
                       provenance={"source_model": args.model, "plan_file": args.plan},
                       allow_lower_top_k=args.allow_lower_top_k, max_shard_size=args.max_shard_size,
                       overwrite=args.overwrite, progress=sys.stderr.isatty())
    quant = describe(read_config(args.model))
    _summary(args, plan, out, "; streamed shard by shard" + (f", quantisation kept ({quant})" if quant else ""))
    return 0


def _summary(args: argparse.Namespace, plan, out, how: str) -> None:
    kept, total = plan.num_kept, plan.num_kept + plan.num_removed
    layout = "standard (uniform)" if plan.is_uniform else "per-layer counts (non-uniform)"
    if args.method == "mask":
        layout = "all weights kept, routers masked"
    print(f"grape apply: {args.method}: kept {kept}/{total} experts; wrote {out} ({layout}{how})")


def precheck_plan(plan, model_config: dict, allow_lower_top_k: bool) -> None:
    """What config.json and the plan's recorded model identity can tell before any weights are
    read: the same model family, and no layer left with fewer experts than its top_k."""
    from grape.pruning import check_top_k
    from grape.errors import PlanError

    recorded = plan.model or {}
    planned_type, model_type = recorded.get("model_type"), model_config.get("model_type")
    if planned_type and model_type and planned_type != model_type:
        raise PlanError(f"the plan was made for a different model: a {planned_type} model, but --model "
                        f"is a {model_type} model; make the plan from scores measured on this model")
    try:
        top_k = {int(k): int(v) for k, v in recorded.get("top_k", {}).items()}
    except (TypeError, ValueError, AttributeError):
        top_k = {}  # an unreadable identity is reported by apply_plan with the model at hand
    if not allow_lower_top_k:
        check_top_k(plan, top_k)


def require_model_block(plan, path: str, skip: bool) -> None:
    """A plan without its `model` block cannot be checked against the model (type, expert counts,
    router fingerprint), so a plan for another model of the same shape would apply silently:
    refused unless --skip-model-check says the check is knowingly skipped."""
    from grape.errors import PlanError

    if not plan.model and not skip:
        raise PlanError(f"plan file {path} records no model (its `model` block is missing or "
                        "empty), so it cannot be checked against --model; make the plan with "
                        "`grape solve`, or pass --skip-model-check to apply it unchecked")


def _tokenizer(path: str):
    """The model's tokenizer if it has one; a model directory without one is fine."""
    from transformers import AutoTokenizer

    from grape.modelfiles import remote_code_files

    try:
        # explicit False: None would prompt on stdin for a tokenizer class of the folder's own code
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError):
        files = remote_code_files(path)
        why = f" that loads without running its code ({', '.join(files)})" if files else ""
        print(f"grape apply: no tokenizer found at {path}{why}; the checkpoint has none")
        return None
