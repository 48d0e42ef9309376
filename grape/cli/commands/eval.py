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
    "optionally lm-evaluation-harness tasks run in-process and offline: every task name is "
    "checked before the model is loaded, and --list-tasks prints the tasks that can run here. "
    "Writes eval.json, eval.md and eval_config.json into --out. See docs/evaluation.md."
)
RESULT_JSON, RESULT_MD, CONFIG_JSON = "eval.json", "eval.md", "eval_config.json"
OUTPUT = DirOutput(signature=(CONFIG_JSON, RESULT_JSON), what="an evaluation folder",
                   inputs=("model", "tokenizer", "data", "baseline", "task_path"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from grape.evaluation.perplexity import EvalConfig
    from grape.flags import add_config_arguments
    from grape.models.loading import DTYPES
    from grape.models.files import MODEL_HELP

    parser.add_argument("--model", type=Path, default=None,
                        help=MODEL_HELP + " (required unless --list-tasks)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer directory; when not given, the model directory")
    parser.add_argument("--data", nargs="+", default=None, metavar="FILE",
                        help="held-out text: JSONL files with 'text'/'domain' fields, plain-text "
                        "files, DOMAIN=FILE, or directories; when not given, the test bed's "
                        "held-out split (grape.testbed)")
    parser.add_argument("--split", default="test", choices=("test", "validation"),
                        help="held-out split used when --data is not given")
    parser.add_argument("--list-tasks", action="store_true",
                        help="print the lm-eval tasks that can run here (local ones, those under "
                        "--task-path, installed ones whose data is cached) and exit")
    add_config_arguments(parser, EvalConfig)  # every flagged EvalConfig field (grape/flags.py)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="eval.json of the unpruned model: adds the NLL increase per domain")
    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', or "
                        "'balanced' (device_map over all GPUs)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="'auto': float32 on CPU, the checkpoint's dtype on GPU")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (required unless --list-tasks)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the .py files that the model's or tokenizer's "
                        "auto_map names (config.json, tokenizer_config.json), as "
                        "trust_remote_code=True does; they are listed first. Needed only for a "
                        "model type transformers does not have; without it such a model is refused")


def config_from_args(args: argparse.Namespace):
    from grape.evaluation.perplexity import EvalConfig
    from grape.flags import config_from_args as build

    return build(EvalConfig, args)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub when loading files
    from grape.evaluation.perplexity import EvalConfig, EvalResult, evaluate, load_documents
    from grape.evaluation.lmeval_offline import check_eval_tasks
    from grape.models.loading import device_map, load_model, load_tokenizer
    from grape.models.files import check_model_dir, resolve_model, resolve_seq_len

    if args.list_tasks:
        return list_tasks(args)
    for flag in ("model", "out"):
        if getattr(args, flag) is None:
            raise DataError(f"grape eval needs --{flag} (or --list-tasks to see the tasks that run here)")
    # everything that needs no weights first: bad settings fail in a second
    args.model = resolve_model(args.model)
    model_config = check_model_dir(args.model, trust_remote_code=args.trust_remote_code)
    if args.trust_remote_code:
        _announce_remote_code(args.model, args.tokenizer)
    default_seq_len = EvalConfig().seq_len  # the default lives in the dataclass
    if not args.no_perplexity:
        args.seq_len = resolve_seq_len(args.seq_len, default_seq_len, model_config, who="grape eval")
    args.seq_len = args.seq_len or default_seq_len
    device_map(args.device)  # a device this machine lacks fails now, as in grape run
    config = config_from_args(args)
    data = _data(args)
    docs = load_documents(data)  # bad data fails before the model is loaded
    baseline = EvalResult.from_json(args.baseline) if args.baseline else None
    for p in config.task_paths:
        if not Path(p).exists():
            raise DataError(f"lm-eval task path {p} does not exist; pass a directory holding "
                            "lm-eval task YAML files.")
    check_eval_tasks(config, docs)  # a task that cannot run offline fails before any model work
    tokenizer = load_tokenizer(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, args.device, args.dtype, moe_only=False,
                       trust_remote_code=args.trust_remote_code)
    resolved = {"model": str(args.model.resolve()),
                "tokenizer": str((args.tokenizer or args.model).resolve()),
                "data": [str(d) for d in data], "device": args.device, "dtype": args.dtype,
                "baseline": str(args.baseline) if args.baseline else None,
                "trust_remote_code": args.trust_remote_code,
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


def _announce_remote_code(model: Path, tokenizer: Path | None) -> None:
    """With --trust-remote-code, say in one line which files of the folders transformers may
    run (what their auto_maps name), before any of them is loaded."""
    from grape.models.files import remote_code_files, resolve_model

    folders = [model] + ([resolve_model(tokenizer)] if tokenizer else [])
    named = [f"{folder / f}" for folder in dict.fromkeys(folders) if folder.is_dir()
             for f in remote_code_files(folder)]
    if named:
        print(f"grape eval: --trust-remote-code: transformers may run {', '.join(named)}")


def _data(args: argparse.Namespace) -> list:
    from grape.evaluation.perplexity import default_heldout_files

    return args.data if args.data else default_heldout_files(args.split)


def list_tasks(args: argparse.Namespace) -> int:
    """`grape eval --list-tasks`: what --tasks can name on this machine, offline."""
    from grape.evaluation.perplexity import load_documents
    from grape.flags import comma_list
    from grape.evaluation.lmeval_offline import available_tasks, builtin_task_dir, cache_roots

    domains = list(load_documents(_data(args)))
    kinds = list(comma_list(args.task_kinds))
    found = available_tasks(args.task_path, domains, kinds)
    hub, datasets = cache_roots()
    print(f"local: built from the held-out text ({', '.join(domains)}); --tasks local runs them all")
    print("  " + " ".join(found["local"]))
    if args.task_path:
        print(f"under --task-path: {' '.join(found['task path']) or '(none with their data here)'}")
    if builtin_task_dir() is None:
        print("lm-eval is not installed (pip install 'grape-moe[eval]'): no task can run")
        return 0
    print(f"installed lm-eval tasks whose data is cached ({datasets}, {hub}):")
    print("  " + (" ".join(found["cached"]) or "(none: download a dataset first, e.g. "
                  "`hf download --repo-type dataset allenai/ai2_arc`, for arc_easy)"))
    return 0


__all__ = [
    "DESCRIPTION",
    "HELP",
    "add_arguments",
    "config_from_args",
    "list_tasks",
    "run",
]
