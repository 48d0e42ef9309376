"""GRAPE against the tools a user would pick instead, each run from its own released code.

Peers (each in its own virtual environment, built by benchmarks/peers/setup.sh from its lock file):

* ``reap``: llm-compressor 0.14.0.1, ``oneshot(model, dataset, recipe=REAPPruningModifier(sparsity=s))``;
* ``magnitude``: compressed-tensors 0.19.0, data-free ``MagnitudeExpertPruner`` via ``convert_checkpoint``.

For every zoo model and budget, each peer prunes in a subprocess of its own venv
(benchmarks/peers/prune.py: wall time and peak RSS of that process), calibrating on the quality
benchmark's calibration tokens (64 x 256 from benchmarks/zoo/heldout/calibration.jsonl, seed 0,
packed here by grape.data.load_calibration_data); the pruned checkpoint is then measured here,
in GRAPE's environment, with the quality benchmark's NLL code and test windows (pure
cross-entropy from the logits, never ``.loss``). GRAPE's rows (``grape-run``, the default of
``grape run``, and the best uniform plan) come from benchmarks/results/quality.json when it holds
the same model (same weights digest), budget and windows.

Writes benchmarks/results/peers.json and peers.md (the README's table between
``<!-- results:peers -->`` markers, copied by benchmarks/update_readme.py). Pruned checkpoints and
per-step logs are kept in benchmarks/results/cache/peers/ (git-ignored); a step already there is
reused unless --fresh.

    python benchmarks/peers/run.py                          # setup + every zoo model, 25% and 50%
    python benchmarks/peers/run.py --models qwen3moe-32x4   # one model
    python benchmarks/peers/run.py --dry-run                # what would run; needs no venv
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ZOO = ROOT / "benchmarks" / "zoo"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "cache" / "peers"
VENVS = HERE / ".venvs"
ZOO_ORDER = ("qwen3moe-32x4", "deepseekv3-32x4g", "mixtral-8x2", "mixtral-8x2-upcycled", "olmoe-32x4")
CALIB_SAMPLES, CALIB_SEQ_LEN = 64, 256  # the quality benchmark's calibration (Settings, fast mode)

PEERS = {
    "reap": {"label": "llm-compressor REAP", "venv": "llmcompressor", "data": True,
             "types": "REAPPruningModifier(sparsity=s) in oneshot(model, dataset, recipe)"},
    "magnitude": {"label": "compressed-tensors magnitude", "venv": "compressed-tensors", "data": False,
                  "types": "convert_checkpoint(model, out, MagnitudeExpertPruner.from_pretrained("
                           "model, router_pattern, expert_pattern, sparsity=s))"},
}


def log(msg: str) -> None:
    print(msg, flush=True)


def zoo_models() -> list[str]:
    names = [p.name for p in (ZOO / "models").iterdir() if (p / "model.safetensors").exists()]
    return sorted(names, key=lambda n: (ZOO_ORDER.index(n) if n in ZOO_ORDER else 99, n))


def quality_entry(name: str, digest: str) -> dict | None:
    path = RESULTS / "quality.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    settings = data.get("settings", {})
    if settings.get("eval_tokens") is not None or settings.get("calib_samples") != CALIB_SAMPLES \
            or settings.get("calib_seq_len") != CALIB_SEQ_LEN:
        return None
    for model in data["models"]:
        if model["name"] == name and model.get("digest") == digest:
            return {**model, "_command": data["command"], "_date": data["date"]}
    return None


def paired_se(windows: dict[str, list[float]], baseline: dict[str, list[float]]) -> float | None:
    """Standard error of the mean-over-domains NLL increase, from per-window differences against
    the unpruned model on the same windows (as quality_methods.paired_difference)."""
    if set(windows) != set(baseline) or any(len(windows[d]) != len(baseline[d]) for d in baseline):
        return None
    var = 0.0
    for d in baseline:
        import numpy as np

        w = np.asarray(windows[d]) - np.asarray(baseline[d])
        var += float(w.var(ddof=1)) / w.size
    return math.sqrt(var) / len(baseline)


def increase(nll: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    out = {d: nll[d] - baseline[d] for d in baseline}
    out["mean"] = sum(out.values()) / len(out)
    return out


def calibration_ids(name: str, tokenizer) -> Path:
    from grape.data import load_calibration_data

    path = CACHE / name / "calib.json"
    if not path.exists():
        texts = [json.loads(line)["text"] for line in (ZOO / "heldout" / "calibration.jsonl").read_text(
            encoding="utf-8").splitlines() if line.strip()]
        data = load_calibration_data([texts], tokenizer, seq_len=CALIB_SEQ_LEN, samples=CALIB_SAMPLES,
                                     seed=0, progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data.input_ids.tolist()), encoding="utf-8")
    return path


def prune_step(peer: str, name: str, budget: float, calib: Path, threads: int, fresh: bool) -> dict:
    """Run the peer in its venv (or reuse the step's result); returns prune.py's JSON line."""
    tag = f"{PEERS[peer]['venv']}-{peer}-{round(budget * 100)}"
    out = CACHE / name / tag
    record = out.with_suffix(".json")
    if record.exists() and not fresh:
        result = json.loads(record.read_text(encoding="utf-8"))
        if not result.get("ok") or (out / "config.json").exists():
            log(f"  {peer} {budget:.0%}: reused {record.relative_to(ROOT)}")
            return {**result, "checkpoint": str(out)}
    python = VENVS / PEERS[peer]["venv"] / "bin" / "python"
    cmd = [str(python), str(HERE / "prune.py"), peer, "--model", str(ZOO / "models" / name),
           "--sparsity", str(budget), "--out", str(out), "--threads", str(threads)]
    if PEERS[peer]["data"]:
        cmd += ["--calib", str(calib)]
    log(f"  {peer} {budget:.0%}: {' '.join(cmd[1:3])} ... (log {out.with_suffix('.log').relative_to(ROOT)})")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out.with_suffix(".log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEER_RESULT ")]
    result = json.loads(lines[-1][len("PEER_RESULT "):]) if lines else {
        "ok": False, "error": f"prune.py exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    record.write_text(json.dumps(result) + "\n", encoding="utf-8")
    return {**result, "checkpoint": str(out)}


def evaluator(name: str):
    from quality import FAST, Evaluator

    import grape
    from grape.evaluation import default_heldout_files, load_documents

    tokenizer = grape.load_tokenizer(ZOO / "models" / name)
    return tokenizer, Evaluator(tokenizer, load_documents(default_heldout_files("test")), 256,
                                FAST.eval_tokens, FAST.eval_batch, FAST, CACHE / "lmeval_tasks")


def measure(checkpoint: str, test) -> tuple[dict, dict]:
    import torch

    import grape

    model = grape.load(checkpoint, dtype=torch.float32)
    try:
        return test.nll(model)  # pure cross-entropy from the logits (grape.evaluation.window_losses)
    finally:
        del model


def run_model(name: str, budgets, peers, threads: int, fresh: bool) -> dict:
    import torch

    from quality import file_digest

    torch.manual_seed(0)
    digest = file_digest(ZOO / "models" / name / "model.safetensors")
    tokenizer, test = evaluator(name)
    quality = quality_entry(name, digest)
    if quality is not None and quality.get("eval_tokens") == test.tokens:
        baseline, baseline_windows = quality["baseline_nll"], quality["baseline_windows"]
        log(f"== {name}: unpruned NLL and GRAPE rows from benchmarks/results/quality.json ({quality['_date']})")
    else:
        quality = None
        baseline, baseline_windows = measure(str(ZOO / "models" / name), test)
        log(f"== {name}: unpruned NLL measured {json.dumps({d: round(v, 4) for d, v in baseline.items()})}")
    calib = calibration_ids(name, tokenizer)
    rows = []
    for budget in budgets:
        for peer in peers:
            step = prune_step(peer, name, budget, calib, threads, fresh)
            row = {"model": name, "budget": budget, "tool": PEERS[peer]["label"], "peer": peer,
                   "ok": bool(step.get("ok")), "seconds": step.get("seconds"),
                   "peak_mib": step.get("peak_mib"), "versions": step.get("versions", {}),
                   "kept": step.get("kept", {})}
            if row["ok"]:
                try:
                    nll, windows = measure(step["checkpoint"], test)
                except Exception as exc:  # pruned, but the checkpoint does not load or run
                    row.update(ok=False, error=f"pruned checkpoint does not load in GRAPE's "
                                               f"environment: {type(exc).__name__}: {exc}")
                else:
                    row.update(nll=nll, nll_increase=increase(nll, baseline), windows=windows,
                               se=paired_se(windows, baseline_windows))
                    log(f"  {peer} {budget:.0%}: dNLL {row['nll_increase']['mean']:+.4f} "
                        f"± {row['se']:.4f}, {row['seconds']:.1f} s, {row['peak_mib']:.0f} MiB")
            if not row["ok"]:
                row["error"] = row.get("error") or step.get("error", "unknown")
                log(f"  {peer} {budget:.0%}: cannot run: {row['error']}")
            rows.append(row)
        if quality is not None:
            rows += grape_rows(quality, budget, baseline_windows)
    return {"name": name, "digest": digest, "baseline_nll": baseline, "eval_tokens": test.tokens,
            "grape_source": "benchmarks/results/quality.json" if quality else None, "rows": rows}


def grape_rows(quality: dict, budget: float, baseline_windows) -> list[dict]:
    at = [r for r in quality["rows"] if r["calibration"] == "mixed" and abs(r["budget"] - budget) < 1e-9
          and r["apply"] == "remove"]
    out = []
    default = [r for r in at if r["method"] == "grape-run"]
    uniform = sorted((r for r in at if r["family"] == "uniform"), key=lambda r: r["nll_increase"]["mean"])
    for label, row in (("GRAPE default (`grape run`)", default[0] if default else None),
                       ("GRAPE best uniform", uniform[0] if uniform else None)):
        if row is None:
            continue
        out.append({"model": quality["name"], "budget": budget, "tool": label, "peer": None, "ok": True,
                    "method": row["method"], "nll": row["nll"], "nll_increase": row["nll_increase"],
                    "windows": row["windows"], "se": paired_se(row["windows"], baseline_windows),
                    "seconds": row["solve_seconds"], "peak_mib": None, "kept": row["kept"],
                    "from": "quality.json"})
    return out


# -- report ---------------------------------------------------------------------------------------
def render(data: dict) -> str:
    lines = ["# GRAPE against the tools you would use instead", "",
             f"Written by `{data['command']}` on {data['date']} ({data['machine']}).", "",
             "<!-- readme -->",
             "Mean over domains (prose, python, c) of the test-split NLL increase against the unpruned "
             "model (nats/token, pure cross-entropy, the quality benchmark's windows), ± its paired "
             "standard error over windows; uniform = same count in every layer. Seconds and peak "
             "memory are those of the tool's pruning step (the peers: one process each, load + "
             "calibrate + prune + save, peak RSS; GRAPE: the loss-verified search recorded in "
             "quality.json, calibration not included, memory not recorded).", "",
             "| model | removed | tool | dNLL ± SE | vs GRAPE default | kept per layer | seconds | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for model in data["models"]:
        for budget in data["budgets"]:
            rows = [r for r in model["rows"] if r["budget"] == budget]
            default = next((r for r in rows if r["tool"].startswith("GRAPE default")), None)
            for r in rows:
                if not r["ok"]:
                    lines.append(f"| `{model['name']}` | {budget:.0%} | {r['tool']} | cannot run | | | | |")
                    continue
                vs = ""
                if default is not None and r is not default:
                    diff = r["nll_increase"]["mean"] - default["nll_increase"]["mean"]
                    se = paired_se(r["windows"], default["windows"])
                    vs = f"{diff:+.4f}" + ("" if se is None else f" ± {se:.4f}")
                kept = sorted(set(r["kept"].values())) if r["kept"] else []
                kept_text = "/".join(str(k) for k in r["kept"].values()) if len(kept) > 1 else \
                    (f"{kept[0]} each" if kept else "")
                se = "" if r["se"] is None else f" ± {r['se']:.4f}"
                mem = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
                sec = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
                lines.append(f"| `{model['name']}` | {budget:.0%} | {r['tool']} | "
                             f"{r['nll_increase']['mean']:+.4f}{se} | {vs} | {kept_text} | {sec} | {mem} |")
    lines += ["", "_vs GRAPE default: this row's increase minus GRAPE default's, with the paired "
              "standard error (negative: the row loses less)._", "<!-- /readme -->", ""]
    failures = [r for m in data["models"] for r in m["rows"] if not r["ok"]]
    if failures:
        lines += ["## Peers that cannot run", "", "| model | removed | tool | exact reason |", "|---|---|---|---|"]
        for r in failures:
            lines.append(f"| `{r['model']}` | {r['budget']:.0%} | {r['tool']} | `{r['error'][:400]}` |")
        lines.append("")
    lines += ["## Versions and settings", ""]
    for peer, info in PEERS.items():
        vers = next((r["versions"] for m in data["models"] for r in m["rows"] if r.get("peer") == peer
                     and r.get("versions")), {})
        lines.append(f"- {info['label']}: `{info['types']}`; "
                     + ", ".join(f"{k} {v}" for k, v in vers.items()))
    lines += [f"- calibration (REAP and GRAPE): {CALIB_SAMPLES} x {CALIB_SEQ_LEN} tokens packed from "
              "`benchmarks/zoo/heldout/calibration.jsonl` by grape.data.load_calibration_data, seed 0; "
              "the magnitude pruner uses no data",
              "- GRAPE rows: " + "; ".join(f"`{m['name']}` from {m['grape_source'] or 'not available'}"
                                           for m in data["models"]), ""]
    return "\n".join(lines)


def write(data: dict, out: Path) -> None:
    (out / "peers.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (out / "peers.md").write_text(render(data) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="zoo model names (default: every one on disk)")
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.25, 0.5])
    parser.add_argument("--peers", nargs="*", choices=sorted(PEERS), default=list(PEERS))
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--fresh", action="store_true", help="prune again even if a step is cached")
    parser.add_argument("--no-setup", action="store_true", help="do not run setup.sh first")
    parser.add_argument("--dry-run", action="store_true", help="list the steps; needs no venv")
    parser.add_argument("--report-only", action="store_true", help="rewrite peers.md from peers.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = args.models or zoo_models()
    if args.report_only:
        data = json.loads((args.out / "peers.json").read_text(encoding="utf-8"))
        (args.out / "peers.md").write_text(render(data) + "\n", encoding="utf-8")
        return 0
    if args.dry_run:
        for name in models:
            for budget in args.budgets:
                for peer in args.peers:
                    log(f"{name} {budget:.0%} {peer}: {VENVS / PEERS[peer]['venv'] / 'bin/python'} prune.py {peer}")
        return 0
    if not args.no_setup:
        subprocess.run(["bash", str(HERE / "setup.sh"), *sorted({PEERS[p]["venv"] for p in args.peers})],
                       check=True)
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = {"format": "grape.peers-benchmark",
            "command": "python benchmarks/peers/run.py" + ("" if not (argv or sys.argv[1:]) else
                                                          " " + " ".join(argv or sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "budgets": args.budgets, "models": []}
    old = args.out / "peers.json"
    kept = {m["name"]: m for m in json.loads(old.read_text(encoding="utf-8"))["models"]} if old.exists() else {}
    for name in models:
        data["models"].append(run_model(name, args.budgets, args.peers, args.threads, args.fresh))
        kept.pop(name, None)
        data["models"] += [m for m in kept.values() if m["name"] not in models and
                           m not in data["models"]]
        data["models"].sort(key=lambda m: ZOO_ORDER.index(m["name"]) if m["name"] in ZOO_ORDER else 99)
        data["seconds"] = time.perf_counter() - start
        write(data, args.out)
    log(f"wrote {args.out / 'peers.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
