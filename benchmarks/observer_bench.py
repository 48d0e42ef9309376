"""Observer overhead: a calibration pass under ExpertObserver vs a plain forward pass.

Same model, same batches, same call (`model(input_ids, use_cache=False, logits_to_keep=1)`, as
grape.calibration.calibrate makes it). Measured:

* plain          - the model's own experts backend (grouped_mm);
* stats          - per-expert statistics + output energy (the one-pass observer); target <= 1.2x;
* stats+sample   - the same, also keeping the redundancy subsample rows;
* redundancy     - the post-pass on the subsample (every expert on `subsample` tokens per layer,
                   CKA, cosine, router similarity, cost curves), reported separately;
* peak memory    - extra peak memory of one pass over the memory after loading (CPU: peak RSS
                   measured in a fresh process per mode; CUDA: max_memory_allocated).

Repeats are interleaved; wall time is the fastest repeat, CPU time the median (on CPU the run is
single-threaded by default, so process CPU time is not inflated by spinning OpenMP threads when
the machine is shared). Usage:

    python benchmarks/observer_bench.py [--device cpu|cuda] [--dtype float32|bfloat16] [--quick]

Writes (or updates this device's section of) benchmarks/results/observer.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import re
import resource
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "observer.md"
MODEL = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=4096,
    norm_topk_prob=True,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


def build(device: str, dtype: torch.dtype, batches: int, batch_size: int, seq_len: int):
    import transformers as T

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.Qwen3MoeConfig(**MODEL))
    with torch.no_grad():  # decisive routing, as in a trained model
        for block in (layer.mlp for layer in model.model.layers):
            block.gate.weight.normal_(0.0, 0.2)
    model = model.to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, MODEL["vocab_size"], (batches * batch_size, seq_len), generator=g)
    return model, [b.to(device) for b in data.split(batch_size)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _Clock:
    """Wall and process-CPU seconds (CPU time is robust to other jobs on a shared machine)."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_pass(model, batches, mode: str, subsample: int, device: str) -> tuple[float, float]:
    """(wall, cpu) seconds of one pass of `mode` over all batches (redundancy: post-pass only)."""
    from grape.models.adapters import get_adapter
    from grape.calibration.calibrate import CalibrationConfig, layer_scores
    from grape.calibration.observer import ExpertObserver, per_call_quota

    adapter = get_adapter(model)
    with torch.no_grad():
        if mode == "plain":
            with _Clock(device) as clock:
                for b in batches:
                    model(input_ids=b, use_cache=False, logits_to_keep=1)
            return clock.wall, clock.cpu
        sample = subsample if mode in ("stats+sample", "redundancy") else 0
        observer = ExpertObserver(
            model,
            adapter,
            sample_tokens=sample,
            sample_per_call=per_call_quota(sample, len(batches)),
        )
        with observer:
            with _Clock(device) as clock:
                for b in batches:
                    model(input_ids=b, use_cache=False, logits_to_keep=1)
            if mode != "redundancy":
                return clock.wall, clock.cpu
            observer.pause()
            observations = observer.results()
            config = CalibrationConfig(subsample=subsample, progress=False)
            tokens = sum(b.numel() for b in batches)
            with _Clock(device) as clock:
                for layer, obs in observations.items():
                    layer_scores(adapter, layer, obs, config, tokens)
            return clock.wall, clock.cpu


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory_child(args, mode, queue) -> None:
    torch.set_num_threads(args.threads) if args.threads else None
    model, batches = build(
        "cpu", getattr(torch, args.dtype), args.batches, args.batch_size, args.seq_len
    )
    run_pass(model, [batches[0][:1, :16]], mode, 4, "cpu")  # imports and lazy state, not the peak
    base = _rss_now()
    _reset_peak_rss()  # the peak of building the model is not the pass's
    run_pass(model, batches, mode, args.subsample, "cpu")
    queue.put(max(_peak_rss() - base, 0))


def peak_memory(args, mode: str) -> int:
    if args.device.startswith("cuda"):
        model, batches = build(
            args.device, getattr(torch, args.dtype), args.batches, args.batch_size, args.seq_len
        )
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_pass(model, batches, mode, args.subsample, args.device)
        return torch.cuda.max_memory_allocated() - base
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(args, mode, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--subsample", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default); 1 keeps CPU time meaningful "
        "on a shared machine, where idle OpenMP threads spin",
    )
    parser.add_argument("--quick", action="store_true", help="1 repeat, no memory (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    dtype = getattr(torch, args.dtype)
    model, batches = build(args.device, dtype, args.batches, args.batch_size, args.seq_len)
    modes = ("plain", "stats", "stats+sample", "redundancy")
    for mode in modes:  # warm-up: kernels, allocator, lazy imports
        run_pass(model, batches[:1], mode, min(args.subsample, 16), args.device)
    times = {mode: [] for mode in modes}
    for r in range(repeats):
        order = modes if r % 2 == 0 else modes[::-1]  # interleave, so drift hits every mode alike
        for mode in order:
            times[mode].append(run_pass(model, batches, mode, args.subsample, args.device))
    wall = {mode: min(w for w, _ in v) for mode, v in times.items()}
    cpu = {mode: statistics.median(c for _, c in v) for mode, v in times.items()}
    on_cpu = not args.device.startswith("cuda")
    memory = {} if args.quick else {mode: peak_memory(args, mode) for mode in modes}

    tokens = args.batches * args.batch_size * args.seq_len
    device_name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    label = f"{args.device} {args.dtype}"
    lines = [
        f"<!-- section:{label} -->",
        f"## {label}: {device_name}",
        "",
        f"Model: Qwen3-MoE config, hidden {MODEL['hidden_size']}, "
        f"{MODEL['num_hidden_layers']} layers, "
        f"{MODEL['num_experts']} experts top-{MODEL['num_experts_per_tok']}, expert inter "
        f"{MODEL['moe_intermediate_size']}; {args.batches} batches x {args.batch_size} x "
        f"{args.seq_len} "
        f"= {tokens} tokens; subsample {args.subsample} tokens/layer; {repeats} interleaved "
        f"repeats per mode; torch {torch.__version__}.",
        "",
        "| mode | wall s / pass (min) | tokens / s | wall ratio | CPU s / pass (median) "
        "| CPU ratio "
        "| extra peak memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in modes:
        mem = f"{memory[mode] / 2**20:.1f}" if mode in memory else "-"
        rate = f"{tokens / wall[mode]:,.0f}" if mode != "redundancy" else "-"
        cpu_cells = f"{cpu[mode]:.3f} | {cpu[mode] / cpu['plain']:.3f}" if on_cpu else "- | -"
        lines.append(
            f"| {mode} | {wall[mode]:.3f} | {rate} | {wall[mode] / wall['plain']:.3f} | "
            f"{cpu_cells} | {mem} |"
        )
    ratio = (cpu["stats"] / cpu["plain"]) if on_cpu else (wall["stats"] / wall["plain"])
    basis = "process CPU time (median)" if on_cpu else "wall time (min)"
    lines += [
        "",
        f"Per-expert statistics overhead: **{ratio:.3f}x** the plain forward by {basis} "
        f"(target <= 1.2x: {'met' if ratio <= 1.2 else 'NOT met'}). The redundancy row is the "
        "separate post-pass (every expert on the subsample, similarity and cost curves), not "
        "part of the ratio; its ratio compares it with one plain pass over all the batches. "
        "Wall times use the fastest repeat, the least disturbed by other jobs.",
        f"<!-- end:{label} -->",
    ]
    section = "\n".join(lines)
    print(section)

    header = (
        "# Observer benchmark\n\nWritten by `benchmarks/observer_bench.py`; one section per "
        "device and dtype (re-running replaces that section only).\n"
    )
    text = args.out.read_text() if args.out.exists() else header
    pattern = re.compile(
        rf"<!-- section:{re.escape(label)} -->.*?<!-- end:{re.escape(label)} -->", re.S
    )
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section + "\n"
    )
    from grape.outputs import atomic_write_text

    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
