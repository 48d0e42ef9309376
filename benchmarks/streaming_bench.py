"""Peak memory of `grape apply`: streaming (the default for remove / mask) vs loading the model.

A random-weight Qwen3-MoE checkpoint of about 2 GB (bf16, 200 MB shards, the per-expert key
layout transformers' save_pretrained writes) is written shard by shard, never built in memory;
a 50% uniform plan is applied twice as a subprocess under `/usr/bin/time -v`:

* streaming  - `grape apply --max-shard-size 200MB` (the default path);
* in memory  - `grape apply --in-memory` (load the model, slice, save_pretrained).

Both outputs are compared tensor by tensor (sha256 of each tensor's bytes, read one tensor at a
time). Acceptance (issue 14): streaming peak RSS < 1 GB and outputs equal. Everything is written
under a temporary folder in /tmp (or --workdir) and deleted afterwards. Usage:

    python benchmarks/streaming_bench.py [--layers 10] [--keep-files]

Writes benchmarks/results/streaming.md and streaming.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from provenance import scrub  # noqa: E402

MODEL = dict(hidden_size=1024, moe_intermediate_size=512, intermediate_size=2048, num_experts=64,
             num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
             vocab_size=8192, max_position_embeddings=2048, norm_topk_prob=True,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def config(layers: int):
    import transformers as T

    return T.Qwen3MoeConfig(**MODEL, num_hidden_layers=layers, dtype="bfloat16")


def stored_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor save_pretrained writes for `cfg` (per-expert layout), from
    the model built on the meta device (no memory)."""
    import transformers as T

    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg)
    out = {}
    for name, tensor in model.state_dict().items():
        match = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)", name)
        if not match:
            out[name] = tuple(tensor.shape)
            continue
        experts, rows, cols = tensor.shape
        for e in range(experts):
            if match.group(2) == "down_proj":
                out[f"{match.group(1)}.{e}.down_proj.weight"] = (rows, cols)
            else:
                out[f"{match.group(1)}.{e}.gate_proj.weight"] = (rows // 2, cols)
                out[f"{match.group(1)}.{e}.up_proj.weight"] = (rows // 2, cols)
    return out


def write_checkpoint(cfg, target: Path, shard_bytes: int) -> dict:
    """Random bf16 weights written shard by shard (at most one shard in memory)."""
    from safetensors.torch import save_file

    target.mkdir(parents=True)
    cfg.save_pretrained(target)
    shapes = stored_shapes(cfg)
    generator = torch.Generator().manual_seed(0)
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in names:
            scale = 1.0 if name.endswith("norm.weight") else 0.02
            shard[name] = (torch.randn(shapes[name], generator=generator) * scale).to(torch.bfloat16)
        save_file(shard, str(target / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del shard
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"bytes": total, "shards": len(groups), "tensors": len(shapes)}


def write_plan(cfg, path: Path, keep_fraction: float = 0.5) -> dict:
    from solvers.plan import Plan

    rng = random.Random(0)
    n = cfg.num_experts
    kept = {layer: sorted(rng.sample(range(n), int(n * keep_fraction)))
            for layer in range(cfg.num_hidden_layers)}
    removed = {layer: [e for e in range(n) if e not in keep] for layer, keep in kept.items()}
    Plan(kept=kept, removed=removed, solver="benchmark").save(path)
    return {"kept": sum(map(len, kept.values())), "total": n * cfg.num_hidden_layers}


def run_apply(model: Path, plan: Path, out: Path, extra: list[str]) -> dict:
    """`grape apply` in a fresh process under /usr/bin/time -v: wall time and peak RSS."""
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "grape", "apply", "--model", str(model),
               "--plan", str(plan), "--out", str(out), "--no-tokenizer", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"grape apply failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    line = [x for x in done.stdout.splitlines() if x.startswith("grape apply:")][-1]
    return {"peak_rss_bytes": peak_kb * 1024, "wall_s": round(wall, 1), "message": scrub(line),
            "output_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
            "output_shards": len(list(out.glob("*.safetensors")))}


def import_baseline() -> int:
    """Peak RSS of a process that only imports what streaming apply imports."""
    code = ("import torch, transformers, grape.pruning.streaming, grape.pruning.checkpoint; "
            "from transformers import Qwen3MoeForCausalLM")
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True,
                          text=True, cwd=ROOT, check=True)
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) * 1024


def tensor_digests(directory: Path) -> dict[str, tuple[str, list[int], str]]:
    """name -> (dtype, shape, sha256 of the bytes), one tensor in memory at a time."""
    from grape.models.shards import stored_tensors

    out = {}
    for name, tensor in stored_tensors(directory).items():
        digest = hashlib.sha256()
        piece = tensor.pieces[0]
        with open(piece.file, "rb") as handle:
            handle.seek(piece.offset)
            remaining = piece.length
            while remaining:
                chunk = handle.read(min(remaining, 16 << 20))
                digest.update(chunk)
                remaining -= len(chunk)
        out[name] = (tensor.dtype, tensor.shape, digest.hexdigest())
    return out


def report(result: dict) -> str:
    gb = 1e9
    s, m, src = result["streaming"], result["in_memory"], result["source"]
    rows = [("streaming (default)", s), ("in memory (`--in-memory`)", m)]
    lines = [
        "# Streaming apply: peak memory",
        "",
        f"`python benchmarks/streaming_bench.py` on {result['machine']}. Random-weight Qwen3-MoE "
        f"checkpoint: {result['layers']} layers x {MODEL['num_experts']} experts, hidden "
        f"{MODEL['hidden_size']}, expert intermediate {MODEL['moe_intermediate_size']}, bf16, "
        f"{src['bytes'] / gb:.2f} GB in {src['shards']} shards of <= 200 MB ({src['tensors']} "
        f"tensors). Plan: uniform 50% ({result['plan']['kept']}/{result['plan']['total']} experts "
        "kept). `grape apply` run as a subprocess under `/usr/bin/time -v`.",
        "",
        "| path | peak RSS | wall time | output | shards |",
        "|---|---|---|---|---|",
    ]
    for label, r in rows:
        lines.append(f"| {label} | {r['peak_rss_bytes'] / gb:.2f} GB | {r['wall_s']:.1f} s | "
                     f"{r['output_bytes'] / gb:.2f} GB | {r['output_shards']} |")
    lines.append(f"| baseline: imports only | {result['import_baseline_bytes'] / gb:.2f} GB | | | |")
    verdict = "yes" if result["outputs_equal"] else "NO"
    ok = s["peak_rss_bytes"] < 1e9 and result["outputs_equal"]
    lines += [
        "",
        f"Outputs equal tensor for tensor (names, dtypes, shapes, sha256 of the bytes): **{verdict}** "
        f"({result['tensors_compared']} tensors).",
        f"Acceptance (streaming peak RSS < 1 GB and equal outputs): **{'pass' if ok else 'FAIL'}**.",
        "",
        "Streaming reads safetensors headers, builds the model on the `meta` device with its real "
        "router tensors (to validate the plan and write the config exactly as the in-memory path "
        "does) and copies byte ranges in 16 MB chunks, so its peak is the Python + torch + "
        "transformers baseline plus the router tensors, whatever the checkpoint's size. The "
        "in-memory path holds the whole model (and transformers' save buffers).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10, help="decoder layers (10: about 2 GB)")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: /tmp)")
    parser.add_argument("--keep-files", action="store_true", help="do not delete the checkpoints")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grape-streaming-bench.", dir=args.workdir))
    try:
        cfg = config(args.layers)
        source = write_checkpoint(cfg, work / "source", 200_000_000)
        plan = write_plan(cfg, work / "plan.json")
        print(f"wrote {source['bytes'] / 1e9:.2f} GB in {source['shards']} shards", flush=True)
        streaming = run_apply(work / "source", work / "plan.json", work / "streamed",
                              ["--max-shard-size", "200MB"])
        print(f"streaming: {streaming['peak_rss_bytes'] / 1e9:.2f} GB peak", flush=True)
        in_memory = run_apply(work / "source", work / "plan.json", work / "in_memory", ["--in-memory"])
        print(f"in memory: {in_memory['peak_rss_bytes'] / 1e9:.2f} GB peak", flush=True)
        mine, theirs = tensor_digests(work / "streamed"), tensor_digests(work / "in_memory")
        result = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                       f"{platform.python_version()}, torch {torch.__version__}",
            "layers": args.layers, "source": source, "plan": plan,
            "streaming": streaming, "in_memory": in_memory,
            "outputs_equal": mine == theirs, "tensors_compared": len(mine),
            "import_baseline_bytes": import_baseline(),
        }
    finally:
        if not args.keep_files:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "streaming.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "streaming.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
