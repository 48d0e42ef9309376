"""One peer's pruning step, run inside that peer's own virtual environment (benchmarks/peers/.venvs/).

Called by benchmarks/peers/run.py, one process per (peer, model, budget), so the wall time and the
peak memory are the tool's alone (run.py measures the peak from outside, through
grape_side.timed: this process's own ru_maxrss would start at run.py's resident size). It imports nothing from GRAPE: the
calibration tokens arrive as a JSON file of input ids that run.py packed with GRAPE's own loader,
and the pruned checkpoint is written to --out for run.py to measure in GRAPE's environment.

    .venvs/llmcompressor/bin/python prune.py reap --model DIR --calib ids.json --sparsity 0.5 --out DIR
    .venvs/compressed-tensors/bin/python prune.py magnitude --model DIR --sparsity 0.5 --out DIR

Prints one JSON line (prefixed PEER_RESULT) with seconds, versions and the peer's
own record of what it kept; on failure the same line carries the exception's type and message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# the magnitude pruner works on safetensors names: router and expert tensors per family
# (the zoo's checkpoints keep one 2-D tensor per expert, as transformers saves them)
PATTERNS = {
    "qwen3_moe": (r"mlp\.gate\.weight$", r"mlp\.experts\.\d+\."),
    "olmoe": (r"mlp\.gate\.weight$", r"mlp\.experts\.\d+\."),
    "deepseek_v3": (r"mlp\.gate\.weight$", r"mlp\.experts\.\d+\."),
    "mixtral": (r"block_sparse_moe\.gate\.weight$", r"block_sparse_moe\.experts\.\d+\."),
}


def versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def reap(args) -> dict:
    """llm-compressor's REAPPruningModifier through oneshot (its documented entry point)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    ids = json.loads(Path(args.calib).read_text(encoding="utf-8"))
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    report = Path(args.out).with_suffix(".kept.json")
    prune_start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset,
            recipe=REAPPruningModifier(sparsity=args.sparsity, report_path=str(report)),
            num_calibration_samples=len(ids), max_seq_length=len(ids[0]),
            shuffle_calibration_samples=False, output_dir=args.out)
    seconds = time.perf_counter() - start
    kept = json.loads(report.read_text(encoding="utf-8")) if report.exists() else {}
    return {"seconds": seconds, "prune_seconds": seconds - (prune_start - start),
            "kept": {k: len(v) for k, v in kept.items()},
            "versions": versions("llmcompressor", "compressed-tensors", "transformers", "torch")}


def magnitude(args) -> dict:
    """compressed-tensors' data-free MagnitudeExpertPruner through convert_checkpoint."""
    import torch
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.magnitude_expert_pruner import (
        MagnitudeExpertPruner,
    )

    torch.set_num_threads(args.threads)
    model_type = json.loads((Path(args.model) / "config.json").read_text(encoding="utf-8"))["model_type"]
    if model_type not in PATTERNS:
        raise ValueError(f"no router/expert tensor patterns known for model_type {model_type!r}")
    router, expert = PATTERNS[model_type]
    start = time.perf_counter()
    pruner = MagnitudeExpertPruner.from_pretrained(args.model, router_pattern=router,
                                                   expert_pattern=expert, sparsity=args.sparsity)
    convert_checkpoint(args.model, args.out, pruner, device="cpu")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "prune_seconds": seconds,
            "kept": {k: len(v) for k, v in pruner.retained_experts.items()},
            "versions": versions("compressed-tensors", "transformers", "torch")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("peer", choices=("reap", "magnitude"))
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", help="JSON list of input-id rows (REAP only)")
    parser.add_argument("--sparsity", type=float, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        result = {"ok": True, **(reap(args) if args.peer == "reap" else magnitude(args))}
    except BaseException as exc:  # the exact reason a peer cannot run goes into the table
        traceback.print_exc()
        last = traceback.extract_tb(exc.__traceback__)[-1]
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}".strip(),
                  "where": f"{Path(last.filename).name}:{last.lineno}"}
    print("PEER_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
