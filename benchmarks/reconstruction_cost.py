"""What the `reconstruction` criterion costs (issue 23): on random Qwen3-MoE checkpoints of 32,
128 and 384 experts per layer (hidden 256, 2 MoE layers, top-8), `grape calibrate` (every
default statistic) against `--no-reconstruction` and against a plain forward pass over the same
tokens, each in a fresh single-threaded process, interleaved, with the ratios per round; the
greedy alone on one such layer, before (every row re-routed for every trial) and after (only the
rows a removal changes), and on DeepSeek-V3's group-limited router; and the projected wall time
on one H100 for Qwen3-30B-A3B, DeepSeek-V3 and Kimi-K2 from the measured ratios.

    python benchmarks/reconstruction_cost.py [--repeats 3] [--report-only]
    python benchmarks/calibration_bench.py --cost [--repeats 3] [--report-only]   # the same

Writes benchmarks/results/calibration_cost.md and calibration_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the same paths and single-threaded subprocess environment as the calibration benchmark
from calibration_bench import DATA, ENV, RESULTS, ROOT, ZOO  # noqa: E402


COST_EXPERTS = (32, 128, 384)
COST_SETTINGS = ["--seq-len", "256", "--samples", "8", "--batch-size", "4"]
# hidden 256, 2 MoE layers, top-8; expert width / hidden 0.5 (Qwen3-30B-A3B: 768 / 2048)
COST_MODEL = dict(hidden_size=256, moe_intermediate_size=128, intermediate_size=512, num_hidden_layers=2,
                  num_experts_per_tok=8, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  vocab_size=4096, max_position_embeddings=2048, norm_topk_prob=True,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
VARIANTS = ("forward", "none", "default")
# MoE layers, routed experts, active parameters per token: the real models projected
REAL_COST = {"Qwen3-30B-A3B": (48, 128, 3.3e9), "DeepSeek-V3": (58, 256, 37e9), "Kimi-K2": (60, 384, 32e9)}
H100_BF16, MFU = 989e12, 0.4  # dense bf16 peak, and the fraction a forward pass is assumed to reach
CALIBRATION_TOKENS = 1024 * 2048  # CalibrationConfig's samples x seq_len
ROWS = 2048  # CalibrationConfig.reconstruction_tokens: the rows the greedy runs on, per layer
# kernel launches at ~10 us: ~50 per greedy step now, ~20 per trial before (routing + error)
STEP_LAUNCH, TRIAL_LAUNCH = 50 * 10e-6, 20 * 10e-6


def cost_checkpoint(target: Path, experts: int) -> Path:
    """A random bf16 Qwen3-MoE checkpoint (streaming_bench's writer) with the zoo's tokenizer."""
    import transformers as T
    from streaming_bench import write_checkpoint

    write_checkpoint(T.Qwen3MoeConfig(**COST_MODEL, num_experts=experts, dtype="bfloat16"), target,
                     200 * 10**6)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ZOO / "qwen3moe-32x4" / name, target / name)
    return target


def timed(argv: list[str]) -> tuple[str, float, float]:
    """A subprocess's stdout, wall seconds and CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=ENV, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return done.stdout, wall, cpu


def cost_run(model: Path, out: Path, variant: str) -> dict:
    """One variant in a fresh process: `forward` (a plain forward pass over the tokens calibrate
    packs), `none` (--no-reconstruction) or `default`: the calibration's own seconds (after
    loading, as the run report gives them), the process's wall and CPU seconds."""
    if variant == "forward":
        stdout, wall, cpu = timed([sys.executable, str(Path(__file__)), "--forward-pass", str(model)])
        return {**json.loads(stdout.strip().splitlines()[-1]), "wall": wall, "cpu": cpu}
    extra = ["--no-reconstruction"] if variant == "none" else []
    stdout, wall, cpu = timed([sys.executable, "-m", "grape", "calibrate", "--model", str(model),
                               "--data", str(DATA), "--out", str(out), *COST_SETTINGS,
                               "--device-map", "cpu", "--mode", "whole", "--no-progress",
                               "--checkpoint-every", "0", "--overwrite", *extra])
    from solvers.scores import Scores

    return {"seconds": Scores.load(out).calibration["run"]["seconds"], "wall": wall, "cpu": cpu}


def forward_pass(model: Path) -> None:
    """The cost benchmark's plain forward (its own process): the tokens `grape calibrate`
    packs with COST_SETTINGS, batch by batch, in float32 as calibration runs on a CPU, timed
    after loading; prints one JSON line."""
    import transformers as T

    from grape.data.text import load_calibration_data
    from grape.models.loading import load_tokenizer

    settings = dict(zip(COST_SETTINGS[::2], COST_SETTINGS[1::2]))
    data = load_calibration_data([str(DATA)], load_tokenizer(model), seq_len=int(settings["--seq-len"]),
                                 samples=int(settings["--samples"]), progress=False)
    net = T.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    batch = int(settings["--batch-size"])
    start = time.perf_counter()
    with torch.no_grad():
        for row in range(0, data.input_ids.shape[0], batch):
            net(data.input_ids[row:row + batch])
    print(json.dumps({"seconds": time.perf_counter() - start, "tokens": int(data.input_ids.numel())}))


def cost_rounds(model: Path, workdir: Path, repeats: int, experts: int) -> dict:
    """`repeats` rounds of the three variants back to back (the order alternating), and per
    round the ratios, so the machine's load cancels as far as it can."""
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for round_ in range(repeats):
        for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
            runs[variant].append(cost_run(model, workdir / "cost.npz", variant))
            print(experts, variant, runs[variant][-1], flush=True)
    row: dict = {"experts": experts, "runs": runs}
    for measure in ("seconds", "wall", "cpu"):
        for variant in VARIANTS:
            row[f"{variant}_{measure}"] = statistics.median(r[measure] for r in runs[variant])
        row[f"ratio_{measure}"] = statistics.median(
            d[measure] / n[measure] for d, n in zip(runs["default"], runs["none"]))
    for variant in ("none", "default"):  # against the plain forward, calibration seconds
        row[f"{variant}_over_forward"] = statistics.median(
            v["seconds"] / f["seconds"] for v, f in zip(runs[variant], runs["forward"]))
    return row


def _old_trial_seconds(adapter, layer: int, rows: torch.Tensor, grams: torch.Tensor, count: int) -> float:
    """CPU seconds of one trial of the greedy as it was (grape.calibration.reconstruction.full_reconstruction_order:
    every row re-routed around the removal, its error from the per-token Gram matrices)."""
    from grape.calibration.layer_outputs import _bilinear_errors
    from grape.calibration.reconstruction import _ProjectionMemo

    full_index, full_weight = adapter.route(layer, rows)
    full_weight = full_weight.to(torch.float64)
    memo = _ProjectionMemo()
    start = time.process_time()
    for expert in range(count):
        with memo:
            index, weight = adapter.route_masked(layer, rows, [expert])
        both = torch.cat([full_index, index], dim=1)
        float(_bilinear_errors(both, torch.cat([full_weight, -weight.to(torch.float64)], dim=1), grams).mean())
    return (time.process_time() - start) / count


def _layer_model(experts: int, grouped: bool):
    """One MoE decoder layer of COST_MODEL's shape: Qwen3-MoE, or DeepSeek-V3's router
    (sigmoid, correction bias, 8 groups of which 4 are eligible per token)."""
    import transformers as T

    torch.manual_seed(0)
    if not grouped:
        return T.AutoModelForCausalLM.from_config(
            T.Qwen3MoeConfig(**{**COST_MODEL, "num_hidden_layers": 1}, num_experts=experts)).eval()
    config = T.DeepseekV3Config(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=experts,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=0,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
        kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=64, head_dim=16,
        vocab_size=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.gate.e_score_correction_bias.normal_(0.0, 0.01)
    return model


def greedy_alone(experts: int, whole: bool, grouped: bool = False) -> dict:
    """The greedy on its own, CPU seconds for one MoE layer on ROWS random rows: after
    (reconstruction_order) and before (the per-token Gram matrices, then every row re-routed
    for each of the E(E+1)/2 - 1 trials: measured `whole`, else from 64 trials, which all cost
    the same); and the layer's forward over ROWS tokens, the unit of the projection."""
    from grape.models.adapters import get_adapter
    from grape.calibration.layer_outputs import expert_grams
    from grape.calibration.reconstruction import full_reconstruction_order, reconstruction_order

    model = _layer_model(experts, grouped)
    adapter = get_adapter(model)
    layer = min(adapter.moe_blocks())
    rows = torch.randn(ROWS, COST_MODEL["hidden_size"], generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 4096, (ROWS // 256, 256), generator=torch.Generator().manual_seed(0))
    out = {"experts": experts, "router": "DeepSeek-V3, 8 groups" if grouped else "Qwen3-MoE",
           "trials": experts * (experts + 1) // 2 - 1}
    with torch.no_grad():
        out["forward"] = min(_seconds(lambda: [model(ids[i:i + 4]) for i in range(0, len(ids), 4)])
                             for _ in range(2))
        out["after"] = _seconds(lambda: out.__setitem__("order", reconstruction_order(adapter, layer, rows)[0]))
        out["grams"] = _seconds(lambda: out.__setitem__("g", expert_grams(adapter, layer, rows)))
        out["per_trial"] = _old_trial_seconds(adapter, layer, rows, out["g"], min(64, experts))
        out["before_projected"] = out["grams"] + out["trials"] * out["per_trial"]
        if whole:
            old = []
            out["before"] = out["grams"] + _seconds(lambda: old.append(
                full_reconstruction_order(adapter, layer, rows, out["g"], exact_ties=True)[0]))
            out["same_order"] = old[0].tolist() == out["order"].tolist()
    del out["g"], out["order"]
    out["speedup"] = out.get("before", out["before_projected"]) / out["after"]
    print(out, flush=True)
    return out


def _seconds(work) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def _at(rows: list[dict], experts: int, key) -> float:
    """key(row) at `experts`, interpolated linearly in log E between measured sizes."""
    import math

    points = sorted((r["experts"], key(r)) for r in rows)
    for (e0, v0), (e1, v1) in zip(points, points[1:]):
        if e0 <= experts <= e1:
            t = (math.log(experts) - math.log(e0)) / (math.log(e1) - math.log(e0))
            return v0 + t * (v1 - v0)
    raise ValueError(f"{experts} experts is outside the measured {points[0][0]}-{points[-1][0]}")


def cost_projection(rows: list[dict], greedy: list[dict]) -> list[dict]:
    """Calibration wall time on one H100: the forward pass over CALIBRATION_TOKENS, plus per
    MoE layer the no-reconstruction post-pass and the greedy, each the multiple of one layer's
    forward over the benchmark's tokens that the CPU measured at the model's expert count."""
    out = []
    for name, (layers, experts, active) in REAL_COST.items():
        forward = 2 * active * CALIBRATION_TOKENS / (MFU * H100_BF16)
        layer = 2 * active / layers * ROWS / (MFU * H100_BF16)  # one layer, the greedy's rows
        post = _at(rows, experts, lambda r: (r["none_seconds"] - r["forward_seconds"]) / r["forward_seconds"])
        recon = _at(rows, experts, lambda r: (r["default_seconds"] - r["none_seconds"]) / r["forward_seconds"])
        # the greedy alone against its layer's forward; DeepSeek-V3's groups measured apart
        alone = [g for g in greedy if g["router"] == "Qwen3-MoE"]
        old = _at(alone, experts, lambda g: g.get("before", g["before_projected"]) / g["forward"])
        if name == "DeepSeek-V3":
            grouped = next(g for g in greedy if g["router"] != "Qwen3-MoE")
            recon, old = grouped["after"] / grouped["forward"], grouped["before_projected"] / grouped["forward"]
        none = forward + layers * post * layer
        # a GPU cannot go below its kernel launches: the greedy's E steps, the old trials
        now = max(recon * layer, experts * STEP_LAUNCH)
        before = max(old * layer, (experts * (experts + 1) // 2 - 1) * TRIAL_LAUNCH)
        out.append({"model": name, "layers": layers, "experts": experts, "active": active,
                    "forward_s": forward, "post_ratio": post, "greedy_ratio": recon, "old_ratio": old,
                    "none_s": none, "default_s": none + layers * now, "before_s": none + layers * before})
    return out


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def cost_report(result: dict) -> str:
    lines = ["# What the `reconstruction` criterion costs", "",
             f"`python benchmarks/reconstruction_cost.py --repeats {result['repeats']}` (or "
             f"`python benchmarks/calibration_bench.py --cost --repeats {result['repeats']}`) on "
             f"{result['machine']}, every process single-threaded. Random Qwen3-MoE checkpoints "
             "(hidden 256, expert width 128, 2 MoE layers, top-8, bf16 on disk, float32 in "
             f"memory), `{' '.join(COST_SETTINGS)}` ({ROWS} tokens: the greedy runs on all of "
             "them, its default `--reconstruction-tokens`). Each round runs a plain forward pass "
             "over the same packed tokens, `grape calibrate --no-reconstruction` and `grape "
             "calibrate` (every default statistic) in fresh processes, back to back; medians of "
             "the rounds, and the median of each round's ratio. *Calibration* is the time the "
             "run report gives (after loading); *process* is the whole command, Python start, "
             "loading and writing included.", "", "<!-- readme -->",
             "| experts | forward | `--no-reconstruction` | default | default / `--no-reconstruction`, "
             "calibration | same, process wall | same, process CPU | default / forward | target |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rounds"]:
        lines.append(f"| {r['experts']} | {r['forward_seconds']:.2f} s | {r['none_seconds']:.2f} s | "
                     f"{r['default_seconds']:.2f} s | {r['ratio_seconds']:.2f}x | {r['ratio_wall']:.2f}x | "
                     f"{r['ratio_cpu']:.2f}x | {r['default_over_forward']:.1f}x | {_verdict(r)} |")
    lines += ["", "Projected on one H100 (derivation: benchmarks/results/calibration_cost.md):", "",
              "| model | MoE layers x experts | forward, 1024 x 2048 tokens | `--no-reconstruction` | "
              "default | default with the greedy as before |", "|---|---|---:|---:|---:|---:|"]
    for p in result["projection"]:
        lines.append(f"| {p['model']} | {p['layers']} x {p['experts']} | {_hours(p['forward_s'])} | "
                     f"{_hours(p['none_s'])} | {_hours(p['default_s'])} | {_hours(p['before_s'])} |")
    lines += ["<!-- /readme -->", ""]
    return "\n".join(lines) + "\n" + _cost_details(result)


def _verdict(row: dict) -> str:
    """The issue's acceptance (at most 1.5x at 128 experts, 2x at 384) by each measure."""
    target = {128: 1.5, 384: 2.0}.get(row["experts"])
    if target is None:
        return "-"
    met = [name for name, key in (("calibration", "ratio_seconds"), ("wall", "ratio_wall"))
           if row[key] <= target]
    return f"<= {target}x: " + (" and ".join(met) + " met" if met else "not met")


def _cost_details(result: dict) -> str:
    lines = ["## The greedy alone, before and after", "",
             f"One MoE layer of the same shape, {ROWS} random rows, CPU seconds in this process "
             "(single-threaded). Before: the per-token Gram matrices of every expert's outputs "
             "(T x E x E), then every row re-routed for each of the E(E+1)/2 - 1 trials; measured "
             "whole at 32 experts, and from the Gram matrices plus 64 timed trials (every trial "
             "costs the same) at every size. After: `grape.calibration.reconstruction.reconstruction_order`. Layer "
             f"forward: the one-layer model over {ROWS} tokens, the projection's unit.", "",
             "| router | experts | layer forward | before, measured | before, Grams + trials x "
             "one trial | after | speedup | same order |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for g in result["greedy"]:
        before = f"{g['before']:.1f} s" if "before" in g else "-"
        lines.append(f"| {g['router']} | {g['experts']} | {g['forward']:.2f} s | {before} | "
                     f"{g['before_projected']:.1f} s | {g['after']:.2f} s | {g['speedup']:.0f}x | "
                     f"{g.get('same_order', '-')} |")
    lines += ["", "## How the projection is made", "",
              f"Forward: 2 x active parameters x {CALIBRATION_TOKENS:,} tokens (the default "
              f"1024 x 2048) at {MFU:.0%} of the H100's {H100_BF16 / 1e12:.0f} TFLOPS dense bf16. "
              "Each MoE layer then adds the post-pass (similarity, cost curves on 256 rows) and "
              f"the greedy (on {ROWS} rows): the CPU measured each as a multiple of one layer's "
              f"forward over the benchmark's {ROWS} tokens, at the model's expert count (256: "
              "interpolated in log E between 128 and 384), and the projection scales the same "
              f"multiple of one real layer's forward over {ROWS} tokens (2 x active parameters "
              f"/ layers x {ROWS} at the same rate). The post-pass and Qwen3-30B-A3B's and "
              "Kimi-K2's greedy (no groups; Kimi-K2's sigmoid router takes the same path) come "
              "from the calibration rounds (against half the 2-layer forward); DeepSeek-V3's "
              "greedy from its own router, group-limited, which the router itself evaluates "
              "trial by trial (the table above); the greedy before from the table above. A GPU "
              "cannot run a greedy step below its kernel launches, so the greedy takes at least "
              f"{STEP_LAUNCH * 1e3:.1f} ms per step (E steps per layer), and the old trials "
              f"{TRIAL_LAUNCH * 1e3:.1f} ms each. Not counted: loading or streaming the weights "
              "(sequential mode reads DeepSeek-V3's and Kimi-K2's ~1-2 TB once), and the "
              "CPU-to-GPU difference in what is memory- rather than compute-bound: these are "
              "orders of magnitude, not measurements.", "",
              "| model | active parameters | post-pass / layer forward | greedy / layer forward, "
              "now | before |", "|---|---:|---:|---:|---:|"]
    for p in result["projection"]:
        lines.append(f"| {p['model']} | {p['active'] / 1e9:.1f} B | {p['post_ratio']:.1f} | "
                     f"{p['greedy_ratio']:.1f} | {p['old_ratio']:.0f} |")
    lines += ["", "## Every round", "", "| experts | variant | calibration | process wall | process CPU |",
              "|---:|---|---:|---:|---:|"]
    for r in result["rounds"]:
        for variant in VARIANTS:
            for run in r["runs"][variant]:
                lines.append(f"| {r['experts']} | {variant} | {run['seconds']:.2f} s | {run['wall']:.1f} s | "
                             f"{run['cpu']:.1f} s |")
    return "\n".join(lines) + "\n"


def cost(repeats: int, report_only: bool) -> None:
    """The --cost benchmark: writes calibration_cost.json and .md."""
    if report_only:
        result = json.loads((RESULTS / "calibration_cost.json").read_text())
    else:
        torch.set_num_threads(1)
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                             f"{platform.python_version()}, torch {torch.__version__}",
                  "repeats": repeats, "rounds": []}
        with tempfile.TemporaryDirectory(prefix="calibration_cost.") as tmp:
            for experts in COST_EXPERTS:
                model = cost_checkpoint(Path(tmp) / f"qwen3moe-{experts}", experts)
                result["rounds"].append(cost_rounds(model, Path(tmp), repeats, experts))
                shutil.rmtree(model)
        result["greedy"] = [greedy_alone(experts, whole=experts <= 32) for experts in COST_EXPERTS]
        result["greedy"].append(greedy_alone(256, whole=False, grouped=True))
    result["projection"] = cost_projection(result["rounds"], result["greedy"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calibration_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "calibration_cost.md").write_text(cost_report(result))
    print(cost_report(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite calibration_cost.md from calibration_cost.json")
    parser.add_argument("--forward-pass", type=Path, help=argparse.SUPPRESS)  # cost_run's own subprocess
    args = parser.parse_args()
    if args.forward_pass:
        forward_pass(args.forward_pass)
        return
    cost(args.repeats, args.report_only)


if __name__ == "__main__":
    main()
