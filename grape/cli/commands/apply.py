"""`grape apply`: turn a plan into a smaller checkpoint."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from grape.models.loading import DTYPES
from grape.outputs import PROVENANCE_FILE, DirOutput

HELP = "apply a plan to a model (remove / merge / mask experts) and save the checkpoint"
DESCRIPTION = (
    "Apply PLAN to MODEL with the chosen method and write a checkpoint to OUT. remove and mask "
    "stream the safetensors shard by shard (memory stays flat whatever the model's size; "
    "quantised FP8 / MXFP4 experts stay quantised); merge, and --in-memory, load the model. --repair "
    "fits the pruned layers in memory when the model fits, else (and with --mode streaming) one "
    "decoder layer at a time from the shards, resumable from OUT.partial/ (docs/repair.md). A plan keeping "
    "the same number of experts in every layer gives a standard checkpoint (transformers, vLLM); "
    "a non-uniform plan gives per-layer counts in config.json plus a small remote-code class "
    "(load with grape.load_pruned, or from_pretrained(..., trust_remote_code=True))."
)

OUTPUT = DirOutput(signature=(PROVENANCE_FILE,), inputs=("model", "plan", "scores"), what="a checkpoint",
                   replaces=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from grape.flags import add_config_arguments
    from grape.models.files import MODEL_HELP
    from grape.pruning.apply import ApplyConfig

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
    # --method, --allow-lower-top-k, --mode, --max-shard-size: every ApplyConfig field
    add_config_arguments(parser, ApplyConfig)
    parser.add_argument("--in-memory", action="store_true", help="same as --mode in-memory")


def apply_config_from_args(args: argparse.Namespace, rename: dict[str, str] | None = None,
                           **overrides):
    """The ApplyConfig the flags describe (--in-memory: short for --mode in-memory)."""
    from grape.flags import config_from_args
    from grape.pruning.apply import ApplyConfig

    if getattr(args, "in_memory", False):
        overrides.setdefault("mode", "in-memory")
    return config_from_args(ApplyConfig, args, rename=rename, **overrides)


def run(args: argparse.Namespace) -> int:
    from grape.pruning.stage import apply_checkpoint, check_plan
    from grape.errors import PlanError
    from grape.models.files import check_model_dir, resolve_model
    from solvers.plan import Plan
    from solvers.scores import Scores

    # everything that needs no weights first: a bad plan or model directory fails in a second
    args.model = str(resolve_model(args.model))  # a Hub id: its snapshot in the local cache
    model_config = check_model_dir(args.model)
    plan = Plan.load(args.plan)
    config = apply_config_from_args(args)
    check_plan(plan, model_config, config, args.plan, args.skip_model_check)
    if args.scores and config.method != "merge":
        raise PlanError("--scores only weights a merge; drop it or use --method merge")
    provenance = {"plan_file": args.plan}
    if args.scores:
        merge_weights = Scores.load(args.scores)
        config = replace(config, merge_weights=merge_weights)
        provenance.update(merge_scores_file=args.scores, merge_scores_fingerprint=merge_weights.fingerprint())
    written = apply_checkpoint(args.model, plan, args.out, config, dtype=args.dtype,
                               tokenizer=None if args.no_tokenizer else True, provenance=provenance,
                               overwrite=args.overwrite, progress=sys.stderr.isatty())
    _summary(config.method, plan, written.path, written.note)
    return 0


def _summary(method: str, plan, out, how: str) -> None:
    kept, total = plan.num_kept, plan.num_kept + plan.num_removed
    layout = "standard (uniform)" if plan.is_uniform else "per-layer counts (non-uniform)"
    if method == "mask":
        layout = "all weights kept, routers masked"
    print(f"grape apply: {method}: kept {kept}/{total} experts; wrote {out} ({layout}{how})")
