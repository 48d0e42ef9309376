"""Layer-sequential search: the same plans and NLLs as the whole-model search, and a search on a
checkpoint larger than the memory it is allowed.

(a) Zoo: each zoo model present under benchmarks/zoo/models/ is calibrated once (`grape
    calibrate`, small settings) and searched twice with the same flags, `grape search --mode
    whole` and `grape search --mode sequential`, each in a fresh process under `/usr/bin/time -v`.
    Recorded: the same plan.json (aside from the seed solver's wall time and the provenance's
    `computed_passes`: a generation may run layers the whole-model search reused), the same NLL for every candidate and finalist, wall
    time and peak RSS of each mode.
(b) Random checkpoint: a random-weight Qwen3-MoE of about 1.6 GB (bf16; the shapes of
    benchmarks/streaming_bench.py, 8 layers x 64 experts, hidden 1024) is calibrated layer by
    layer (`grape calibrate --mode sequential`) and searched layer by layer, each in a fresh
    process held below a resident-memory cap under the checkpoint's size: a watchdog reads the
    process's RSS every 20 ms and kills it above the cap, and /usr/bin/time -v reports the exact
    peak (which must stay under the cap too). Then `grape run`, end to end and with no --mode,
    runs in a memory cgroup of the same limit (where the machine lets one be made), as in a
    container: it must see the limit (grape.models.host_memory), choose layer by layer, and
    stream the pruned checkpoint. An
    address-space cap (RLIMIT_AS) is no use here: the Python + torch + transformers process maps
    about 1.3 GB of address space before reading a weight, and building the meta-device skeleton
    reserves (never touches) each parameter's size once. Recorded: completion, wall time, peak RSS.

    python benchmarks/search_sequential_bench.py                     # both parts
    python benchmarks/search_sequential_bench.py --models olmoe-32x4 --skip-random

Everything is written under a temporary folder (or --workdir) and deleted afterwards; results go
to benchmarks/results/search_sequential.{json,md} (a part not run keeps its earlier record).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from provenance import command_line, scrub  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ZOO = ROOT / "benchmarks" / "zoo"
HELDOUT = ROOT / "grape" / "assets" / "heldout"
MODELS = ("qwen3moe-32x4", "deepseekv3-32x4g", "mixtral-8x2", "mixtral-8x2-upcycled", "olmoe-32x4")
SEARCH_DATA = [str(HELDOUT / f"{d}.validation.jsonl") for d in ("prose", "python", "c")]
CALIBRATE = ["--samples", "32", "--seq-len", "128", "--subsample", "64", "--no-reconstruction",
             "--no-progress", "--device-map", "cpu"]
SEARCH = ["--budget", "0.25", "--search-passes", "24", "--search-tokens", "1024", "--confirm-tokens", "2048",
          "--time-limit", "10", "--no-progress", "--device", "cpu"]
RANDOM_SEARCH = ["--budget", "0.25", "--search-passes", "12", "--search-tokens", "512",
                 "--confirm-tokens", "1024", "--time-limit", "10", "--no-progress", "--device", "cpu"]
# `grape run` on the random checkpoint: the search's flags and small calibration settings, every
# default statistic (reconstruction included), no --mode: it picks layer by layer by itself
RANDOM_RUN = ["--samples", "8", "--seq-len", "128", "--subsample", "64", *RANDOM_SEARCH]
GB = 1e9


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _watch(process: subprocess.Popen, limit: int, over: list) -> None:
    """Kill `process` (and what it started) when their resident memory passes `limit` bytes."""
    import psutil

    root = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            rss = 0
        if rss > limit:
            over.append(rss)
            for p in root.children(recursive=True):
                p.kill()
            return
        time.sleep(0.02)


def grape(argv: list[str], limit: int | None = None, prefix: tuple[str, ...] = ()) -> dict:
    """`python -m grape ARGV` in a fresh process under /usr/bin/time -v (and, with `limit`, a
    resident-memory cap in bytes; `prefix`: a command it runs under, memory_cgroup's): exit code,
    wall seconds, CPU seconds, peak RSS, whether it stayed under the cap, the last lines it
    printed and those that name the mode it chose."""
    start = time.perf_counter()
    process = subprocess.Popen([*prefix, "/usr/bin/time", "-v", sys.executable, "-m", "grape", *argv], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    over: list[int] = []
    watchdog = threading.Thread(target=_watch, args=(process, limit, over), daemon=True) if limit else None
    if watchdog is not None:
        watchdog.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    peak_bytes = int(peak.group(1)) * 1024 if peak else None
    cpu = [float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", stderr)]
    tail = [line for line in (stdout + stderr).splitlines() if line.strip()
            and not line.startswith("\t") and "Command being timed" not in line][-12:]
    under = not over and (limit is None or (peak_bytes is not None and peak_bytes <= limit))
    modes = [line.strip() for line in stdout.splitlines() if "mode (" in line or "layer by layer (" in line]
    return {"rc": process.returncode if under else -9, "wall_s": round(wall, 1), "cpu_s": round(sum(cpu), 1),
            "peak_rss_bytes": peak_bytes, "under_cap": under, "output": [scrub(line) for line in tail],
            "modes": [scrub(line) for line in modes]}


@contextlib.contextmanager
def memory_cgroup(limit: int):
    """A fresh memory cgroup limited to `limit` bytes (v1 memory.limit_in_bytes or v2 memory.max:
    what Docker, Kubernetes and Slurm set), yielding the command prefix that starts a process in
    it; None where this machine lets no cgroup be made (then the step is skipped, and says so)."""
    name = f"grape-bench-{os.getpid()}"
    choices = [(Path("/sys/fs/cgroup/memory") / name, "memory.limit_in_bytes"),
               (Path("/sys/fs/cgroup") / name, "memory.max")]
    made = None
    for folder, limit_file in choices:
        try:
            folder.mkdir()
        except OSError:
            continue
        try:
            (folder / limit_file).write_text(str(limit))
            made = folder
            break
        except OSError:
            folder.rmdir()
    try:
        yield None if made is None else ("bash", "-c", 'echo $$ > "$0"; exec "$@"', str(made / "cgroup.procs"))
    finally:
        if made is not None:
            for _ in range(50):  # the kernel frees the group once its last process is reaped
                try:
                    made.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def must(step: dict, what: str) -> dict:
    if step["rc"] != 0:
        raise SystemExit(f"{what} failed ({step['rc']}):\n" + "\n".join(step["output"]))
    return step


def same_search(whole: Path, layers: Path) -> dict:
    """Plan files equal (the seed solver's wall time and the layers run aside) and every measured
    NLL equal, bit for bit."""
    def plan(folder: Path) -> dict:
        data = json.loads((folder / "plan.json").read_text())
        data.pop("seconds", None)
        data["provenance"]["search"].pop("computed_passes", None)
        return data

    a, b = (json.loads((d / "search.json").read_text()) for d in (whole, layers))
    return {"same_plan": plan(whole) == plan(layers),
            "same_candidate_nlls": [c["nll"] for c in a["candidates"]] == [c["nll"] for c in b["candidates"]],
            "same_confirmation": a["confirmed"] == b["confirmed"],
            "candidates": len(a["candidates"]), "passes": a["passes"], "chosen": a["chosen"],
            "computed_passes": {"whole": a["computed_passes"], "sequential": b["computed_passes"]}}


# -- (a) the zoo -----------------------------------------------------------------------------------
def zoo_present(name: str) -> bool:
    """A committed zoo model with real weights (not a Git LFS pointer)."""
    weights = ZOO / "models" / name / "model.safetensors"
    return weights.is_file() and weights.stat().st_size > 4096


def zoo_case(name: str, work: Path) -> dict:
    model = ZOO / "models" / name
    scores = work / f"{name}.scores.npz"
    log(f"{name}: calibrating")
    must(grape(["calibrate", "--model", str(model), "--data", str(HELDOUT / "calibration.jsonl"),
                "--out", str(scores), *CALIBRATE]), f"{name} calibration")
    runs = {}
    for mode in ("whole", "sequential"):
        log(f"{name}: searching, --mode {mode}")
        runs[mode] = must(grape(["search", "--model", str(model), "--scores", str(scores), "--search-data",
                                 *SEARCH_DATA, "--out", str(work / f"{name}.{mode}"), "--mode", mode, *SEARCH]),
                          f"{name} search ({mode})")
    record = {"model": name, **same_search(work / f"{name}.whole", work / f"{name}.sequential")}
    record.update({f"{mode}_{key}": runs[mode][key] for mode in runs for key in ("wall_s", "cpu_s", "peak_rss_bytes")})
    return record


# -- (b) the random checkpoint ---------------------------------------------------------------------
def random_case(work: Path, layers: int, limit_share: float) -> dict:
    import streaming_bench

    cfg = streaming_bench.config(layers)
    source = work / "random"
    log(f"writing a random {layers}-layer checkpoint")
    written = streaming_bench.write_checkpoint(cfg, source, 200 * 2**20)
    limit = int(written["bytes"] * limit_share)  # a resident-memory cap below the checkpoint
    tokenizer = ZOO / "tokenizer"
    scores = work / "random.scores.npz"
    log(f"calibrating layer by layer under a {limit / GB:.2f} GB resident-memory cap")
    calibration = must(grape(["calibrate", "--model", str(source), "--tokenizer", str(tokenizer), "--data",
                              str(HELDOUT / "calibration.jsonl"), "--out", str(scores), "--mode", "sequential",
                              "--samples", "8", "--seq-len", "128", "--subsample", "64", "--no-reconstruction",
                              "--no-progress", "--device-map", "cpu"], limit), "random calibration")
    log(f"searching layer by layer under a {limit / GB:.2f} GB resident-memory cap")
    searched = must(grape(["search", "--model", str(source), "--tokenizer", str(tokenizer), "--scores", str(scores),
                           "--search-data", *SEARCH_DATA, "--out", str(work / "random.search"), "--mode",
                           "sequential", *RANDOM_SEARCH], limit), "random search")
    found = json.loads((work / "random.search" / "search.json").read_text())
    return {"layers": layers, "experts": cfg.num_experts, "hidden": cfg.hidden_size,
            "checkpoint_bytes": written["bytes"], "shards": written["shards"],
            "whole_fp32_bytes": 2 * written["bytes"], "rss_cap_bytes": limit,
            "calibration": calibration, "search": searched, "passes": found["passes"],
            "computed_passes": found["computed_passes"], "chosen": found["chosen"],
            "candidates": len(found["candidates"]), "tokens_measured": found["tokens_measured"],
            "run": run_in_cgroup(source, work, limit)}


def run_in_cgroup(source: Path, work: Path, limit: int) -> dict:
    """`grape run` end to end (no --mode) in a memory cgroup of `limit` bytes, as in a container:
    it must see the limit, go layer by layer by itself, search, and stream the pruned checkpoint."""
    with memory_cgroup(limit) as prefix:
        if prefix is None:
            log("no memory cgroup can be made here: the end-to-end `grape run` step is skipped")
            return {"skipped": "no writable memory cgroup on this machine (cgroup v1 or v2)"}
        log(f"`grape run` end to end in a memory cgroup limited to {limit / GB:.2f} GB")
        out = work / "random.run"
        step = must(grape(["run", "--model", str(source), "--tokenizer", str(ZOO / "tokenizer"), "--data",
                           str(HELDOUT / "calibration.jsonl"), "--search-data", *SEARCH_DATA, "--out", str(out),
                           *RANDOM_RUN], prefix=prefix), "random grape run")
    pruned = out / "checkpoint"
    config = json.loads((pruned / "config.json").read_text())
    return {**step, "cgroup_limit_bytes": limit,
            "pruned_bytes": sum(f.stat().st_size for f in pruned.glob("*.safetensors")),
            "pruned_experts": config.get("num_experts"),
            "chosen": json.loads((out / "plan.json").read_text())["provenance"]["search"]["chosen"]}


# -- results ----------------------------------------------------------------------------------------
def _gb(value) -> str:
    return "-" if value is None else f"{value / GB:.2f} GB"


def markdown(record: dict) -> str:
    env = record["environment"]
    lines = ["# Layer-sequential search: same plans, any size of model", "",
             f"`python benchmarks/search_sequential_bench.py` on {env['machine']}, {env['cpus']} CPUs, "
             f"Python {env['python']}, "
             f"torch {env['torch']} (the machine was shared with other jobs: wall times are indicative, "
             "CPU seconds less so).", ""]
    zoo = record.get("zoo") or []
    if record.get("zoo_note"):
        lines += [record["zoo_note"], ""]
    if zoo:
        lines += ["## (a) Zoo: `grape search --mode whole` against `--mode sequential`", "",
                  f"`{record.get('zoo_command', '')}`", "",
                  f"Search flags: `{' '.join(SEARCH)}`, search data: the three validation files; "
                  f"calibration: `{' '.join(CALIBRATE)}`.", "",
                  "| model | same plan.json | same candidate NLLs | same confirmation | candidates | chosen "
                  "| computed passes whole / seq. | wall whole / seq. | CPU whole / seq. | peak RSS whole / seq. |",
                  "|---|---|---|---|---:|---|---|---|---|---|"]
        for z in zoo:
            lines.append(f"| {z['model']} | {_yes(z['same_plan'])} | {_yes(z['same_candidate_nlls'])} | "
                         f"{_yes(z['same_confirmation'])} | {z['candidates']} | {z['chosen']} | "
                         f"{z['computed_passes']['whole']} / {z['computed_passes']['sequential']} | "
                         f"{z['whole_wall_s']} s / {z['sequential_wall_s']} s | "
                         f"{z['whole_cpu_s']} s / {z['sequential_cpu_s']} s | "
                         f"{_gb(z['whole_peak_rss_bytes'])} / {_gb(z['sequential_peak_rss_bytes'])} |")
        lines.append("")
    big = record.get("random")
    if big:
        lines += ["## (b) A checkpoint larger than the memory allowed", "", f"`{big.get('command', '')}`", "",
                  f"Random Qwen3-MoE, {big['layers']} layers x {big['experts']} experts, hidden {big['hidden']}, "
                  f"bf16: {_gb(big['checkpoint_bytes'])} in {big['shards']} shards ({_gb(big['whole_fp32_bytes'])} "
                  f"loaded whole in float32, the CPU compute dtype). Calibration and search ran in fresh "
                  f"processes held under a resident-memory cap of {_gb(big['rss_cap_bytes'])}, below the "
                  "checkpoint's size (a watchdog kills a process above the cap; the peak is /usr/bin/time's); "
                  "`grape run` ran end to end in a memory cgroup of the same limit, as in a container (the "
                  "kernel kills it above the limit), with no --mode: it sees the limit and goes layer by "
                  "layer by itself.", "",
                  "| step | cap | completed | wall | CPU | peak RSS |", "|---|---|---|---:|---:|---:|"]
        steps = [("calibration", "grape calibrate --mode sequential", _gb(big["rss_cap_bytes"])),
                 ("search", "grape search --mode sequential", _gb(big["rss_cap_bytes"]))]
        run = big.get("run") or {}
        if "rc" in run:
            steps.append(("run", "grape run", f"cgroup {_gb(run['cgroup_limit_bytes'])}"))
        for step, command, cap in steps:
            s = big[step] if step != "run" else run
            lines.append(f"| `{command}` | {cap} | {_yes(s['rc'] == 0)} | {s['wall_s']} s | {s['cpu_s']} s | "
                         f"{_gb(s['peak_rss_bytes'])} |")
        lines += ["", f"Search flags: `{' '.join(RANDOM_SEARCH)}`; {big['passes']} passes "
                  f"({big['computed_passes']} computed), {big['candidates']} candidates, chose {big['chosen']}.", ""]
        if "rc" in run:
            lines += [f"`grape run` flags: `{' '.join(RANDOM_RUN)}` (every default statistic, reconstruction "
                      f"included); its mode lines: " + "; ".join(f"\"{m}\"" for m in run.get("modes", [])) + ". "
                      f"It chose {run['chosen']} and streamed a {_gb(run['pruned_bytes'])} pruned checkpoint "
                      "(no evaluation: the model does not fit).", ""]
        elif run.get("skipped"):
            lines += [f"`grape run` in a memory cgroup: skipped ({run['skipped']}).", ""]
    return "\n".join(lines) + "\n"


def _yes(flag: bool) -> str:
    return "**yes**" if flag else "**NO**"


def environment() -> dict:
    import torch

    return {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="zoo models (default: all five)")
    parser.add_argument("--skip-zoo", action="store_true")
    parser.add_argument("--skip-random", action="store_true")
    parser.add_argument("--layers", type=int, default=8, help="layers of the random checkpoint (8: about 1.6 GB)")
    parser.add_argument("--limit-share", type=float, default=0.8,
                        help="resident-memory cap as a share of the random checkpoint's size")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="grape-search-seq-", dir=args.workdir))
    saved = RESULTS / "search_sequential.json"
    record = json.loads(saved.read_text()) if saved.is_file() else {}  # the part not run stays
    command = command_line("search_sequential_bench.py", argv)
    record["environment"] = environment()
    try:
        if not args.skip_zoo:
            record.pop("zoo_note", None)
            present = [m for m in args.models if zoo_present(m)]
            missing = [m for m in args.models if m not in present]
            if missing:
                record["zoo_note"] = f"Skipped (no weights here): {', '.join(missing)}."
                log(record["zoo_note"])
            record["zoo"] = [zoo_case(m, work) for m in present]
            record["zoo_command"] = command
        if not args.skip_random:
            record["random"] = {**random_case(work, args.layers, args.limit_share), "command": command}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "search_sequential.md").write_text(markdown(record))
    log(f"wrote {RESULTS / 'search_sequential.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
