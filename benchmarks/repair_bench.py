"""Prune, then repair (issue 27): how much of the NLL increase of a pruned zoo model each repair
method of grape.pruning.repair wins back, at what cost.

For each zoo model and budget, the uniform REAP-mass plan (solver `uniform`) is applied to a fresh
copy of the model with each repair method (none = plain removal), fitted on calibration rows of
grape/assets/heldout/calibration.jsonl, and evaluated on a held-out split (test by default):
NLL increase against the unpruned model per domain and on average (domains weighted equally),
with standard errors from per-document differences (each document is a block: its windows'
summed NLL against the unpruned model's on the same windows), plus fit seconds and the fit's
peak extra resident memory. Writes benchmarks/results/repair.md and repair.json.

    python benchmarks/repair_bench.py                                  # 3 models, 2 budgets
    python benchmarks/repair_bench.py --models qwen3moe-32x4 --split validation \\
        --methods none scale lstsq lstsq:0.01 lstsq:1 --out /tmp/ridge   # choose the ridges
    python benchmarks/repair_bench.py --models olmoe-32x4 qwen3moe-32x4 --max-docs 8 \\
        --methods none lstsq router lstsq+router --out /tmp/router   # the router re-fit
    python benchmarks/repair_bench.py --sequential-cost    # repair from the shards: memory, time

`--sequential-cost` (benchmarks/repair_cost.py) measures the layer-sequential repair of a 1.7 GB
random checkpoint against the streaming apply and the sequential calibration, and adds its
section to the results without touching the quality tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

ZOO = ROOT / "benchmarks" / "zoo"
HELDOUT = ROOT / "grape" / "assets" / "heldout"
DOMAINS = ("prose", "python", "c")
DEFAULT_MODELS = ("qwen3moe-32x4", "mixtral-8x2", "olmoe-32x4")

sys.path.insert(0, str(ROOT / "benchmarks"))
from repair_report import combine_methods, compact_defaults, render, render_all, render_defaults  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


# -- data -----------------------------------------------------------------------------------------
def documents(split: str, max_docs: int | None = None) -> dict[str, list[str]]:
    """Each domain's documents; `max_docs`: at most that many, evenly spaced (quick sweeps)."""
    out = {}
    for domain in DOMAINS:
        lines = (HELDOUT / f"{domain}.{split}.jsonl").read_text(encoding="utf-8").splitlines()
        texts = [json.loads(line)["text"] for line in lines if line.strip()]
        if max_docs is not None and max_docs < len(texts):
            texts = [texts[round(i * (len(texts) - 1) / max(max_docs - 1, 1))] for i in range(max_docs)]
        out[domain] = texts
    return out


def calibration_rows(tokenizer, rows: int, seq_len: int, seed: int) -> torch.Tensor:
    from grape.data.text import load_calibration_data

    return load_calibration_data([str(HELDOUT / "calibration.jsonl")], tokenizer, seq_len=seq_len,
                                 samples=rows, seed=seed, progress=False).input_ids


class DocumentEval:
    """Summed NLL and token count per document: each document is [EOS] + its tokens, cut into
    windows of seq_len inputs (grape.evaluation.perplexity's protocol, per document so that documents are
    the blocks of the standard errors)."""

    def __init__(self, tokenizer, docs: dict[str, list[str]], seq_len: int, batch: int = 16):
        from grape.evaluation.perplexity import pack_windows

        self.batch, self.pad = batch, tokenizer.pad_token_id or 0
        self.windows: list[tuple[str, int, list[int]]] = []  # (domain, document, window)
        for domain, texts in docs.items():
            for d, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
                for w in pack_windows([tokenizer.eos_token_id] + ids, seq_len):
                    self.windows.append((domain, d, w))
        self.windows.sort(key=lambda item: len(item[2]))  # similar lengths share a batch

    def run(self, model) -> dict[str, dict[int, tuple[float, int]]]:
        from grape.evaluation.perplexity import window_losses

        out: dict[str, dict[int, list[float]]] = {d: {} for d in DOMAINS}
        model.eval()
        for start in range(0, len(self.windows), self.batch):
            part = self.windows[start:start + self.batch]
            sums, counts = window_losses(model, [w for _, _, w in part], self.pad, torch.device("cpu"))
            for (domain, d, _), s, c in zip(part, sums, counts):
                acc = out[domain].setdefault(d, [0.0, 0])
                acc[0] += s
                acc[1] += c
        return {domain: {d: (v[0], v[1]) for d, v in docs.items()} for domain, docs in out.items()}


def increase(pruned: dict, base: dict) -> dict:
    """Per domain and mean: NLL increase (nats/token) and its standard error by document (a ratio
    estimator: sum of per-document NLL differences over the domain's tokens)."""
    out = {}
    for domain in DOMAINS:
        diffs = [(pruned[domain][d][0] - base[domain][d][0], base[domain][d][1]) for d in base[domain]]
        tokens = sum(c for _, c in diffs)
        mean = sum(x for x, _ in diffs) / tokens
        n = len(diffs)
        resid = sum((x - mean * c) ** 2 for x, c in diffs)
        se = math.sqrt(n / max(n - 1, 1) * resid) / tokens
        out[domain] = {"increase": mean, "se": se, "documents": n, "tokens": tokens}
    out["mean"] = {"increase": sum(out[d]["increase"] for d in DOMAINS) / len(DOMAINS),
                   "se": math.sqrt(sum(out[d]["se"] ** 2 for d in DOMAINS)) / len(DOMAINS)}
    return out


def paired(a: dict, b: dict) -> tuple[float, float]:
    """Mean (over domains) NLL of `a` minus `b` on the same documents, with its SE."""
    rows = [increase(a, b)[d] for d in DOMAINS]
    return (sum(r["increase"] for r in rows) / len(rows),
            math.sqrt(sum(r["se"] ** 2 for r in rows)) / len(rows))


# -- memory ------------------------------------------------------------------------------------------
class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 10 ms in a thread."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.extra_mb = (self.peak - self.start) / 1e6


# -- one model ----------------------------------------------------------------------------------------
def plan_for(model, tokenizer, budget: float, args, name: str = ""):
    """The uniform REAP-mass plan from a small calibration (routing statistics only), or with
    `--plans default:SEED` the plan `grape run` chose (benchmarks/results/default_quality.json)."""
    import grape

    if args.plans != "uniform":
        return default_plan(name, budget, int(args.plans.partition(":")[2] or 0), model)
    from grape.api import SolveConfig, build_problem
    from solvers.solve import solve

    key = ("scores", id(model))
    if key not in _CACHE:
        texts = [json.loads(x)["text"] for x in (HELDOUT / "calibration.jsonl").read_text().splitlines() if x.strip()]
        config = grape.CalibrationConfig(samples=args.calib_rows, seq_len=args.seq_len, subsample=0,
                                         similarity=(), cost_curves=False, reconstruction=False,
                                         seed=1, progress=False)
        _CACHE[key] = grape.calibrate(model, [texts], config, tokenizer=tokenizer)
    config = SolveConfig(budget=budget, solver="uniform", criterion="reap_mass")
    return solve(build_problem(_CACHE[key], config), solver="uniform", time_limit=60)


_CACHE: dict = {}


def default_plan(name: str, budget: float, seed: int, model):
    """The plan `grape run --model M --data CALIBRATION --budget B --seed S` chose: its kept
    experts, as benchmarks/default_quality.py recorded them."""
    from grape.models.adapters import get_adapter
    from solvers.plan import Plan

    cells = json.loads((ROOT / "benchmarks" / "results" / "default_quality.json").read_text())["cells"]
    cell = next((c for c in cells if c["model"] == name and c["seed"] == seed
                 and abs(c["budget"] - budget) < 1e-9), None)
    if cell is None:
        raise SystemExit(f"default_quality.json has no cell for {name} at {budget} with seed {seed}")
    adapter = get_adapter(model)
    kept = {int(k): v for k, v in cell["kept_experts"].items()}
    removed = {k: [e for e in range(adapter.num_experts(k)) if e not in set(v)] for k, v in kept.items()}
    return Plan(kept=kept, removed=removed, solver=f"grape run default (seed {seed}): {cell['chosen']}")


def run_rows(name: str, seed: int):
    """(the repair's rows, the confirmation windows) of `grape run --model M --data
    calibration.jsonl --seed SEED`: its calibration split (grape.pipeline) and the rows it cuts
    from it (grape.run_repair.repair_for_run), as the pipeline computes them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from default_quality import default_config
    from grape.models.loading import load_tokenizer
    from grape.pipeline import Calibrated, _fitted_calibration, _split
    from grape.run_repair import repair_for_run, repair_method

    config, _ = default_config(name, 0.25, seed, Path("/nonexistent-out"))  # the split ignores the budget
    tokenizer = load_tokenizer(config.model)
    split = _split(config, _fitted_calibration(config), tokenizer, searching=True)
    method, _ = repair_method(config, None)
    repair = repair_for_run(config, method, tokenizer, Calibrated(tokenizer, None, None, split.held_out, split.calibration))
    if repair.ids is None or repair.confirm is None:
        raise SystemExit(f"grape run would not fit or check a repair on {name} (seed {seed}): {repair.why}")
    return repair.ids, repair.confirm


def parse_method(text: str) -> tuple[str, float | None]:
    name, _, ridge = text.partition(":")
    return name, (float(ridge) if ridge else None)


def run_model(name: str, args, save=lambda result: None) -> dict:
    import grape
    from grape.pruning.apply import ApplyConfig
    from grape.pruning.repair import RepairSettings, prune_and_repair
    from grape.pruning.repair_check import held_out_nll, judge
    from transformers import AutoTokenizer

    path = ZOO / "models" / name
    tokenizer = AutoTokenizer.from_pretrained(ZOO / "tokenizer")
    base = grape.load(path, dtype=torch.float32)
    seq_len = min(args.seq_len, int(base.config.max_position_embeddings))
    evaluator = DocumentEval(tokenizer, documents(args.split, args.max_docs), seq_len)
    t0 = time.perf_counter()
    baseline = evaluator.run(base)
    eval_seconds = time.perf_counter() - t0
    fit_ids, confirm = calibration_rows(tokenizer, args.fit_rows, seq_len, seed=0), None
    if args.plans != "uniform":  # grape run's own rows and confirmation windows for that seed
        fit_ids, confirm = run_rows(name, int(args.plans.partition(":")[2] or 0))
    log(f"{name}: baseline evaluated in {eval_seconds:.0f} s on {len(evaluator.windows)} windows")
    result = {"model": name, "eval_seconds": eval_seconds, "budgets": {}, "fit_rows": int(fit_ids.shape[0]),
              "confirm_tokens": int(confirm.ids.numel()) if confirm is not None else 0}
    for budget in args.budgets:
        plan = plan_for(base, tokenizer, budget, args, name)
        rows, evals = {}, {}
        for text in args.methods:
            method, ridge = parse_method(text)
            model = copy.deepcopy(base)
            unrepaired = held_out_nll(base, confirm.ids, plan) if confirm is not None and method != "none" else None
            with PeakRSS() as memory:
                t = time.perf_counter()
                report = prune_and_repair(model, plan, ApplyConfig(repair=method), fit_ids,
                                          settings=RepairSettings(ridge=ridge, router_steps=args.router_steps,
                                                                  router_lr=args.router_lr))
                seconds = time.perf_counter() - t
            evals[text] = evaluator.run(model)
            rows[text] = {"nll_increase": increase(evals[text], baseline), "fit_seconds": seconds,
                          "fit_peak_extra_mb": memory.extra_mb, "repair": report.to_json()}
            if text != "none" and "none" in evals:
                rows[text]["vs_none"] = paired(evals[text], evals["none"])
            if unrepaired is not None:  # grape run's check: keep the repair only if it lowers this
                check = judge(unrepaired, held_out_nll(model, confirm.ids), confirm.groups, undo=True,
                              tokens=int(confirm.ids.numel()))
                rows[text]["check"] = check.to_json()
                log(f"  check on the confirmation windows: {check.difference:+.4f} ± {check.se:.4f}: "
                    f"{'kept' if check.kept else 'undone'}")
            inc = rows[text]["nll_increase"]["mean"]
            log(f"  {name} budget {budget} {text}: NLL +{inc['increase']:.4f} ± {inc['se']:.4f}, "
                f"fit {seconds:.1f} s, +{memory.extra_mb:.0f} MB; {report.line()}")
            del model
        result["budgets"][str(budget)] = {"kept_per_layer": plan.kept_counts(), "rows": rows}
        save(result)  # a long run leaves each finished budget behind
    return result


def sequential_cost(args) -> int:
    """Measure the layer-sequential repair (benchmarks/repair_cost.py) into the existing results."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import repair_cost

    path = args.out / "repair.json"
    data = json.loads(path.read_text()) if path.is_file() else {"settings": {}, "models": []}
    cost = repair_cost.run(args.cost_layers, args.cost_rows, args.seq_len, args.cost_method, args.cost_threads)
    if args.cost_method == "lstsq" or not data.get("sequential_cost"):
        data["sequential_cost"] = cost
    else:  # the lstsq record stays the section's first table; other methods follow it, one each
        others = [c for c in data.get("sequential_cost_other_methods", []) if c["method"] != cost["method"]]
        data["sequential_cost_other_methods"] = others + [cost]
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "repair.md").write_text(render_all(data))
    log(repair_cost.render(cost))
    return 0


def merge(files: list[Path], out: Path, sweeps: list[Path] | None = None) -> int:
    """One report from runs made in parallel (one model each, the same settings); `sweeps`:
    runs on the validation split that chose the ridges, appended as their own section."""
    runs = [json.loads(f.read_text()) for f in files]
    data = {"settings": runs[0]["settings"], "models": [m for r in runs for m in r["models"]]}
    if sweeps:
        data["ridge_sweeps"] = [json.loads(f.read_text()) for f in sweeps]
    data.update(_kept_sections(out))
    (out / "repair.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "repair.md").write_text(render_all(data))
    log(f"wrote {out / 'repair.md'}")
    return 0


def _kept_sections(out: Path) -> dict:
    """The sections already in `out` measured separately (the sequential cost, the default
    plans'), kept by a quality run."""
    path = out / "repair.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    return {k: old[k] for k in ("sequential_cost", "sequential_cost_other_methods", "default_plans") if old.get(k)}


def merge_defaults(files: list[Path], out: Path, sweeps: list[Path] | None = None) -> int:
    """Runs with `--plans default:SEED` (one per seed, or per model and seed) into the default
    plans' section of the results in `out`, the other sections kept; runs of the same seed made
    with other methods (`--methods none lstsq`, then `--methods none lstsq+experts`) are combined,
    each model and budget getting every method's row; `sweeps`: validation runs added to the
    ridge (and rows) sweeps."""
    path = out / "repair.json"
    data = json.loads(path.read_text()) if path.is_file() else {"settings": {}, "models": []}
    data["default_plans"] = combine_methods([json.loads(f.read_text()) for f in files])
    data["ridge_sweeps"] = data.get("ridge_sweeps", [])
    for run in (json.loads(f.read_text()) for f in sweeps or []):
        if run not in data["ridge_sweeps"]:  # merging again adds nothing twice
            data["ridge_sweeps"].append(run)
    path.write_text(json.dumps(data, indent=1) + "\n")
    (out / "repair.md").write_text(render_all(data))
    log(f"wrote {out / 'repair.md'}")
    return 0


def main(argv=None) -> int:
    from grape.pruning.repair_router import DEFAULT_LR, DEFAULT_STEPS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--methods", nargs="+", default=["none", "scale", "lstsq"],
                    help="repair methods, optionally with a ridge: lstsq:0.1")
    ap.add_argument("--router-steps", type=int, default=DEFAULT_STEPS,
                    help="Adam steps per layer of the router / lstsq+router repairs")
    ap.add_argument("--router-lr", type=float, default=DEFAULT_LR,
                    help="their step size (largest logit change per step, relative to the logits' spread)")
    ap.add_argument("--split", default="test", choices=("test", "validation"))
    ap.add_argument("--fit-rows", type=int, default=32)
    ap.add_argument("--plans", default="uniform",
                    help="uniform (REAP-mass) or default:SEED (the plans of default_quality.json)")
    ap.add_argument("--calib-rows", type=int, default=64, help="rows of the REAP-mass calibration")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-docs", type=int, default=None, help="documents per domain (quick sweeps)")
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="only combine these repair.json files (one run per model) into --out")
    ap.add_argument("--merge-defaults", nargs="+", type=Path, default=None,
                    help="only put these --plans default:SEED runs' repair.json into --out's default section")
    ap.add_argument("--sweeps", nargs="+", type=Path, default=None,
                    help="with --merge or --merge-defaults: validation runs that chose the ridges and rows (own section)")
    ap.add_argument("--sequential-cost", action="store_true",
                    help="only measure the layer-sequential repair's memory and time (repair_cost.py)")
    ap.add_argument("--cost-layers", type=int, default=8, help="decoder layers of its checkpoint (8: 1.7 GB)")
    ap.add_argument("--cost-rows", type=int, default=8, help="calibration rows of its repair")
    ap.add_argument("--cost-method", default="lstsq", choices=("scale", "lstsq", "lstsq+experts"))
    ap.add_argument("--cost-threads", type=int, default=1, help="torch threads of its processes")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    if args.sequential_cost:
        return sequential_cost(args)
    if args.merge_defaults:
        return merge_defaults(args.merge_defaults, args.out, args.sweeps)
    if args.merge:
        return merge(args.merge, args.out, args.sweeps)
    if args.methods[0] != "none":
        ap.error("--methods must start with none (the reference of every ratio)")
    data = {"settings": {"split": args.split, "max_docs": args.max_docs, "fit_rows": args.fit_rows, "seq_len": args.seq_len,
                         "plans": args.plans, "methods": args.methods,
                         "calib_rows": args.calib_rows, "threads": torch.get_num_threads(),
                         "router_steps": args.router_steps, "router_lr": args.router_lr,
                         "machine": f"{platform.machine()}, torch {torch.__version__}"},
            "models": []}
    args.out.mkdir(parents=True, exist_ok=True)
    data.update(_kept_sections(args.out))

    def save(result: dict) -> None:
        models = [m for m in data["models"] if m["model"] != result["model"]] + [result]
        done = {**data, "models": models}
        (args.out / "repair.json").write_text(json.dumps(done, indent=1) + "\n")
        (args.out / "repair.md").write_text(render_all(done))

    for name in args.models:
        data["models"].append(run_model(name, args, save))
        save(data["models"][-1])
    log(f"wrote {args.out / 'repair.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
