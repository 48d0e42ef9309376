"""`grape eval`: held-out NLL / perplexity per domain and lm-eval tasks for one checkpoint."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from grape.errors import DataError
from grape.outputs import DirOutput
from solvers._io import atomic_write_text

HELP = "evaluate a checkpoint: held-out NLL/perplexity per domain and lm-eval tasks"
DESCRIPTION = (
    "Evaluate a model directory (a pruned GRAPE checkpoint, uniform or not, or any transformers "
    "causal LM) on held-out text: mean NLL (nats/token) and perplexity per domain, and "
    "optionally lm-evaluation-harness tasks run in-process and offline. Writes eval.json, "
    "eval.md and eval_config.json into --out. See docs/evaluation.md."
)
RESULT_JSON, RESULT_MD, CONFIG_JSON = "eval.json", "eval.md", "eval_config.json"
DEFAULT_SEQ_LEN = 256
OUTPUT = DirOutput(signature=(CONFIG_JSON, RESULT_JSON), what="an evaluation folder",
                   inputs=("model", "tokenizer", "data", "baseline", "task_path"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help="checkpoint directory (config.json + weights)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer directory; when not given, the model directory")
    parser.add_argument("--data", nargs="+", default=None, metavar="FILE",
                        help="held-out text: JSONL files with 'text'/'domain' fields, plain-text "
                        "files, DOMAIN=FILE, or directories; when not given, the test bed's "
                        "held-out split (grape.testbed)")
    parser.add_argument("--split", default="test", choices=("test", "validation"),
                        help="held-out split used when --data is not given")
    parser.add_argument("--tasks", default="",
                        help="comma-separated lm-eval tasks: 'local' (multiple-choice tasks "
                        "built from the held-out text, see --task-kinds), names of tasks under --task-path, "
                        "or built-in task names whose data is cached locally; empty: none")
    parser.add_argument("--task-path", nargs="+", default=[], metavar="DIR",
                        help="directories (or YAML files) with your own lm-eval task configs")
    parser.add_argument("--task-kinds", default="scramble,nextline,cloze",
                        help="kinds of local tasks to build for --tasks local: scramble (true "
                        "next line vs copies with two words swapped), nextline (true next line "
                        "vs lines of other documents), cloze (last word of a line vs words of "
                        "other documents)")
    parser.add_argument("--task-examples", type=int, default=100,
                        help="local task examples per domain and kind")
    parser.add_argument("--task-limit", type=int, default=None,
                        help="lm-eval limit: examples per task (quick checks only)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot count")
    parser.add_argument("--no-perplexity", action="store_true",
                        help="skip the NLL/perplexity pass (tasks only)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"tokens per window; unset: {DEFAULT_SEQ_LEN}, capped at the model's "
                        "context (a longer explicit value is an error)")
    parser.add_argument("--max-tokens", type=int, default=65_536,
                        help="predicted tokens per domain (0 = all)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="eval.json of the unpruned model: adds the NLL increase per domain")
    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', or "
                        "'balanced' (device_map over all GPUs)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16",
                                                            "float16"),
                        help="'auto': float32 on CPU, the checkpoint's dtype on GPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the local tasks and lm-eval")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--out", required=True, type=Path, help="output directory")


def config_from_args(args: argparse.Namespace):
    from grape.evaluate import EvalConfig

    return EvalConfig(
        seq_len=args.seq_len,
        max_tokens_per_domain=args.max_tokens or None,
        batch_size=args.batch_size,
        perplexity=not args.no_perplexity,
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        task_paths=tuple(str(p) for p in args.task_path),
        local_task_kinds=tuple(k.strip() for k in args.task_kinds.split(",") if k.strip()),
        local_task_examples=args.task_examples,
        task_limit=args.task_limit,
        num_fewshot=args.num_fewshot,
        seed=args.seed,
        progress=not args.no_progress,
    )


def check_device(device: str) -> None:
    """--device names a device this machine has (checked before anything is loaded)."""
    from grape.loading import device_map

    device_map(device)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub when loading files
    from grape.evaluate import EvalResult, default_heldout_files, evaluate, load_documents

    from grape.modelfiles import resolve_seq_len

    # everything that needs no weights first: bad settings fail in a second
    from grape.loading import load_model, load_tokenizer
    from grape.modelfiles import check_model_dir

    model_config = check_model_dir(args.model)
    if not args.no_perplexity:
        args.seq_len = resolve_seq_len(args.seq_len, DEFAULT_SEQ_LEN, model_config, who="grape eval")
    args.seq_len = args.seq_len or DEFAULT_SEQ_LEN
    check_device(args.device)
    config = config_from_args(args)
    data = args.data if args.data else default_heldout_files(args.split)
    docs = load_documents(data)  # bad data fails before the model is loaded
    baseline = EvalResult.from_json(args.baseline) if args.baseline else None
    for p in config.task_paths:
        if not Path(p).exists():
            raise DataError(f"lm-eval task path {p} does not exist; pass a directory holding "
                            "lm-eval task YAML files.")
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_model(args.model, args.device, args.dtype, moe_only=False)
    resolved = {"model": str(args.model.resolve()),
                "tokenizer": str((args.tokenizer or args.model).resolve()),
                "data": [str(d) for d in data], "device": args.device, "dtype": args.dtype,
                "baseline": str(args.baseline) if args.baseline else None,
                "eval": asdict(config)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / CONFIG_JSON, json.dumps(resolved, indent=2) + "\n")
    result = evaluate(model, tokenizer, docs, config, name=str(args.model))
    atomic_write_text(args.out / RESULT_JSON, result.to_json(baseline))
    markdown = result.to_markdown(baseline)
    atomic_write_text(args.out / RESULT_MD, markdown)
    print(markdown)
    print(f"wrote {args.out / RESULT_JSON} and {args.out / RESULT_MD}")
    return 0


__all__ = [
    "DESCRIPTION",
    "HELP",
    "add_arguments",
    "check_device",
    "config_from_args",
    "run",
]
