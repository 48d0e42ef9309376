"""Calibration at scale: layer-sequential vs whole-model on CPU, equality on the zoo models, and
the projected device memory of DeepSeek-V3 / Kimi-K2.

* bench     - `grape calibrate` on a zoo model and on a ~1 GB random-weight Qwen3-MoE
              checkpoint, `--mode whole` and `--mode sequential`, each a fresh subprocess
              (peak host memory = the process's peak RSS; fastest of --repeats runs);
* equality  - on every zoo model: `--sequential`, and 2-process gloo `torchrun` runs (whole and
              sequential), against the single-process whole-model pass: counts exactly, the
              largest relative difference of the float statistics, and of the similarity
              matrices and cost curves relative to their largest entry;
* projection - one decoder layer (bf16, dequantised from FP8) and the hidden states of
              1024 x 2048 calibration tokens for DeepSeek-V3 and Kimi-K2, counted on the meta
              device from their real configurations.
* cost (--cost, a separate run) - what the `reconstruction` criterion costs: runs
              benchmarks/reconstruction_cost.py (see there; it writes its own results).

Subprocesses run single-threaded (OMP_NUM_THREADS=1) so that a shared machine gives stable
numbers. Usage:

    python benchmarks/calibration_bench.py [--skip-equality] [--repeats 2] [--report-only]
    python benchmarks/calibration_bench.py --cost [--repeats 3] [--report-only]

Writes benchmarks/results/calibration.md and calibration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ZOO = ROOT / "benchmarks" / "zoo" / "models"
DATA = ROOT / "grape" / "assets" / "heldout" / "calibration.jsonl"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SETTINGS = ["--seq-len", "256", "--samples", "32", "--batch-size", "4", "--subsample", "256"]
# the ~1 GB random checkpoint measures memory: fewer tokens keep its runs short on a CPU
SYNTHETIC = ["--seq-len", "256", "--samples", "8", "--batch-size", "4", "--subsample", "64"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
GB = 1e9


def calibrate(model: Path, out: Path, *extra: str, ranks: int = 1,
              settings: list[str] = SETTINGS) -> dict:
    """`grape calibrate` as a subprocess (under torchrun for several ranks); the run report."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(ranks)] if ranks > 1 else [sys.executable]
    argv = [*launcher, "-m", "grape", "calibrate", "--model", str(model), "--data", str(DATA),
            "--out", str(out), *settings, "--device-map", "cpu", "--no-progress",
            "--checkpoint-every", "0", "--overwrite", *extra]
    done = subprocess.run(argv, env=ENV, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    from solvers.scores import Scores

    return Scores.load(out).calibration["run"]


# -- equality ----------------------------------------------------------------------------------
def differences(got, expected) -> dict:
    """Counts equal? Largest relative difference of the statistics and the energy; of the
    similarities and cost curves relative to their largest entry."""
    from solvers.scores import STAT_NAMES

    counts, stats, scaled, order = True, 0.0, 0.0, True
    for layer, ls in expected.layers.items():
        other = got.layers[layer]
        counts &= bool(np.array_equal(other.stats["count"], ls.stats["count"]))
        if "reconstruction" in ls.stats:  # the greedy's choices, not only its values
            order &= bool(np.array_equal(np.argsort(other.stats["reconstruction"], kind="stable"),
                                         np.argsort(ls.stats["reconstruction"], kind="stable")))
            a, b = other.stats["reconstruction"], ls.stats["reconstruction"]
            stats = max(stats, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300))))
        for name in STAT_NAMES:
            a, b = other.stats[name], ls.stats[name]
            stats = max(stats, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300))))
        stats = max(stats, abs(other.output_energy - ls.output_energy) / ls.output_energy)
        arrays = [(other.similarity[k], v) for k, v in ls.similarity.items()]
        arrays.append((other.cost_curve, ls.cost_curve))
        for a, b in arrays:
            scaled = max(scaled, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)))
    return {"counts_equal": counts, "stats_rel": stats, "matrices_rel": scaled, "order_equal": order,
            "identity_equal": got.model == expected.model and got.tokens == expected.tokens}


def equality(workdir: Path) -> list[dict]:
    from solvers.scores import Scores

    rows = []
    for model in sorted(p for p in ZOO.iterdir() if (p / "config.json").is_file()):
        reference_path = workdir / f"{model.name}.whole.npz"
        calibrate(model, reference_path, "--mode", "whole")
        reference = Scores.load(reference_path)
        runs = {"sequential": (("--mode", "sequential"), 1),
                "torchrun 2 x gloo, whole": (("--mode", "whole"), 2),
                "torchrun 2 x gloo, sequential": (("--mode", "sequential"), 2)}
        for name, (extra, ranks) in runs.items():
            path = workdir / f"{model.name}.{ranks}.{extra[1]}.npz"
            calibrate(model, path, *extra, ranks=ranks)
            rows.append({"model": model.name, "run": name,
                         **differences(Scores.load(path), reference)})
            print(rows[-1], flush=True)
    return rows


# -- time and memory -----------------------------------------------------------------------------
def synthetic_checkpoint(target: Path) -> dict:
    """A ~1 GB random bf16 Qwen3-MoE checkpoint (streaming_bench's writer) with the zoo's
    tokenizer (its 4096 ids fit the 8192-token vocabulary)."""
    from streaming_bench import config, write_checkpoint

    info = write_checkpoint(config(5), target, 200 * 10**6)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ZOO / "qwen3moe-32x4" / name, target / name)
    return info


def bench(workdir: Path, repeats: int) -> list[dict]:
    synthetic = workdir / "synthetic"
    info = synthetic_checkpoint(synthetic)
    models = {"qwen3moe-32x4 (zoo, 13 MB bf16)": (ZOO / "qwen3moe-32x4", SETTINGS, repeats),
              f"random Qwen3-MoE, 5 layers x 64 experts ({info['bytes'] / GB:.2f} GB bf16)":
              (synthetic, SYNTHETIC, 1)}
    rows = []
    for label, (path, settings, count) in models.items():
        for mode in ("whole", "sequential"):
            runs = [calibrate(path, workdir / f"bench.{mode}.npz", "--mode", mode,
                              settings=settings) for _ in range(count)]
            best = min(runs, key=lambda r: r["seconds"])
            rows.append({"model": label, "settings": " ".join(settings), "mode": mode,
                         "runs": count, "seconds": best["seconds"],
                         "tokens": best["tokens"], "tokens_per_second": best["tokens_per_second"],
                         "peak_host_memory": max(r["peak_host_memory"] for r in runs),
                         "hidden_states": best.get("hidden_states")})
            print(rows[-1], flush=True)
    shutil.rmtree(synthetic)
    return rows


# -- projection ------------------------------------------------------------------------------------
REAL = {
    "DeepSeek-V3": dict(n_routed_experts=256, num_attention_heads=128, vocab_size=129280,
                        n_group=8, topk_group=4, first_k_dense_replace=3, num_hidden_layers=61),
    "Kimi-K2": dict(n_routed_experts=384, num_attention_heads=64, vocab_size=163840, n_group=1,
                    topk_group=1, first_k_dense_replace=1, num_hidden_layers=61),
}
SHARED = dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
              num_experts_per_tok=8, n_shared_experts=1, kv_lora_rank=512, q_lora_rank=1536,
              qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)


def projection(samples: int = 1024, seq_len: int = 2048, subsample: int = 256,
               batch_size: int = 4, reconstruction: int = 2048) -> list[dict]:
    """Device memory of sequential mode, bf16, for the real shapes (counted on meta)."""
    import transformers as T
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

    rows = []
    for name, extra in REAL.items():
        config = T.DeepseekV3Config(**SHARED, **{k: v for k, v in extra.items()})
        with torch.device("meta"):
            layer = DeepseekV3DecoderLayer(config, layer_idx=extra["first_k_dense_replace"])
        layer_bytes = 2 * sum(p.numel() for p in layer.parameters())
        experts = extra["n_routed_experts"]
        hidden = 2 * samples * seq_len * config.hidden_size
        # loading stacks the per-expert tensors into the fused ones: both exist for a moment
        routed = 2 * sum(p.numel() for p in layer.mlp.experts.parameters())
        # the subsample pass: every expert's output on the subsample rows (bf16) and the
        # per-token Gram matrices of the cost curves (float64)
        post = 2 * experts * subsample * config.hidden_size + 8 * subsample * experts ** 2 * 2
        # the reconstruction order: its kept rows and the outputs it caches for them (bf16, ~20
        # experts per row: top-8 and the next ones of its ranking), their Gram entries, ~70 bytes
        # of routing state per row and expert, and ~32 MB of float64 working chunks
        cached = 8 + 12
        post = max(post, 2 * reconstruction * config.hidden_size * (1 + cached)
                   + 8 * reconstruction * cached ** 2 + 70 * reconstruction * experts + 2 ** 25)
        batch = 4 * batch_size * seq_len * config.hidden_size * 8  # activations, generous
        rows.append({"model": name, "layer_gb": layer_bytes / GB, "hidden_gb": hidden / GB,
                     "load_transient_gb": routed / GB, "post_pass_gb": post / GB,
                     "batch_gb": batch / GB,
                     "peak_on_device_gb": (layer_bytes + routed + hidden + max(post, batch)) / GB,
                     "peak_hidden_on_host_gb": (layer_bytes + routed + max(post, batch)) / GB})
    return rows


# -- report ----------------------------------------------------------------------------------------
def report(result: dict) -> str:
    lines = ["# Calibration at scale: layer-sequential vs whole-model", "",
             f"`python benchmarks/calibration_bench.py` on {result['machine']}. "
             "Each run is `grape calibrate` in a fresh single-threaded process (OMP_NUM_THREADS=1) "
             "on grape/assets/heldout/calibration.jsonl, whole-model then layer-sequential "
             "(float32 on the CPU); the fastest of the runs; peak host memory is the process's "
             "peak RSS (model loading included). Wall time is the calibration itself, as "
             "reported in the scores file: whole-model from after the model is loaded, "
             "sequential including every layer's read from the shards; tokenising excluded.", "",
             "| model | settings | mode | runs | wall time | tokens/s | peak host memory | "
             "hidden states |", "|---|---|---|---:|---:|---:|---:|---|"]
    for row in result["bench"]:
        lines.append(f"| {row['model']} | `{row['settings']}` | {row['mode']} | {row['runs']} | "
                     f"{row['seconds']:.1f} s | "
                     f"{row['tokens_per_second']:,.0f} | {row['peak_host_memory'] / GB:.2f} GB | "
                     f"{row['hidden_states'] or '-'} |")
    if result.get("equality"):
        lines += ["", "## Equality with the single-process whole-model pass (zoo models)", "",
                  "Counts compared exactly; statistics (the `reconstruction` criterion included) "
                  "and output energy: largest relative difference; similarity matrices and cost "
                  "curves: largest difference relative to the largest entry; reconstruction "
                  "order: the greedy's removal order in every layer. Acceptance: counts and "
                  "orders equal, floats within 1e-5.", "",
                  "| model | run | counts equal | identity equal | reconstruction order equal | "
                  "statistics | similarity, cost curves | acceptance |",
                  "|---|---|---|---|---|---:|---:|---|"]
        for row in result["equality"]:
            order = row.get("order_equal", "-")
            ok = row["counts_equal"] and row["identity_equal"] and order is not False and \
                max(row["stats_rel"], row["matrices_rel"]) <= 1e-5
            lines.append(f"| {row['model']} | {row['run']} | {row['counts_equal']} | "
                         f"{row['identity_equal']} | {order} | {row['stats_rel']:.1e} | "
                         f"{row['matrices_rel']:.1e} | {'pass' if ok else 'FAIL'} |")
    lines += ["", "## Projected device memory of sequential mode (bf16, 1024 x 2048 tokens)", "",
              "One MoE decoder layer (FP8 experts dequantised to bf16) counted on the meta device "
              "from the real configuration; loading briefly holds the per-expert tensors and "
              "their fused stack; hidden states of 1024 x 2048 tokens in bf16; the subsample "
              "pass (256 tokens; the reconstruction order's 2048 rows with the ~20 expert "
              "outputs per row it caches) or one batch of activations, whichever is larger.", "",
              "| model | layer | + loading transient | hidden states | subsample pass | "
              "peak, hidden states on the GPU | peak, hidden states in host memory |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["projection"]:
        lines.append(f"| {row['model']} | {row['layer_gb']:.1f} GB | "
                     f"{row['load_transient_gb']:.1f} GB | {row['hidden_gb']:.1f} GB | "
                     f"{row['post_pass_gb']:.1f} GB | {row['peak_on_device_gb']:.0f} GB | "
                     f"{row['peak_hidden_on_host_gb']:.0f} GB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-equality", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite calibration.md from calibration.json (with --cost: its results)")
    parser.add_argument("--cost", action="store_true",
                        help="the reconstruction criterion's cost: benchmarks/reconstruction_cost.py")
    args = parser.parse_args()
    if args.cost:  # the command its results file used to name keeps working
        from reconstruction_cost import cost

        cost(args.repeats, args.report_only)
        return
    if args.report_only:  # the projection is recounted (meta device, seconds)
        result = {**json.loads((RESULTS / "calibration.json").read_text()), "projection": projection()}
        (RESULTS / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "calibration.md").write_text(report(result))
        return
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                         f"{platform.python_version()}, torch {torch.__version__}",
              "repeats": args.repeats, "projection": projection()}
    with tempfile.TemporaryDirectory(prefix="calibration_bench.") as tmp:
        workdir = Path(tmp)
        result["bench"] = bench(workdir, args.repeats)
        if not args.skip_equality:
            result["equality"] = equality(workdir)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "calibration.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
