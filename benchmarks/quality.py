"""Method comparison on the zoo: which expert-pruning method loses the least quality, and why.

For each trained zoo model (benchmarks/zoo/models/) and each budget (25% and 50% of the routed
experts removed), every method of benchmarks/quality_methods.py is solved from one calibration,
applied to a fresh copy of the model and evaluated on the committed held-out *test* split:
NLL increase per domain against the unpruned model, experts kept per layer, solve time, and
(for a few rows) offline lm-eval accuracy on local tasks built from the same held-out text.
Then two studies on top:

* calibration domain: a few methods recalibrated on Python text only (50% budget);
* layer sensitivity (why global allocation wins or loses): each layer alone pruned by 50%
  (REAP's choice within the layer), NLL increase on the *validation* split, against what each
  objective predicts for that layer.

Writes benchmarks/results/quality.md, quality.json and quality_*.png (matplotlib, Agg).
Calibration scores are cached in benchmarks/results/cache/ (git-ignored).

    python benchmarks/quality.py                    # fast: whole test split, 2 budgets, lm-eval on
                                                    # a few rows (~20 min on 2 CPU cores)
    python benchmarks/quality.py --full             # more calibration, 4 budgets, lm-eval on every
                                                    # row, whole validation split (hours on CPU)
    python benchmarks/quality.py --models qwen3moe-32x4 --no-lmeval
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
from fidelity import fidelity
from provenance import command_line, commands, describe
from quality_methods import (
    CALIBRATION_DOMAIN_METHODS,
    METHODS,
    PROBES,
    Method,
    Row,
    measure_layer_curves,
    paired_difference,
    run_table,
)

from grape.outputs import atomic_write_text
from grape.search_stage import search_tokens
from solvers.scores import Scores

ZOO = ROOT / "benchmarks" / "zoo"
RESULTS = ROOT / "benchmarks" / "results"
ZOO_ORDER = ("qwen3moe-32x4", "deepseekv3-32x4g", "mixtral-8x2", "mixtral-8x2-upcycled", "olmoe-32x4")


# -- settings -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    mode: str
    budgets: tuple[float, ...] = (0.25, 0.5)
    calib_samples: int = 64  # packed calibration sequences
    calib_seq_len: int = 256
    subsample: int = 256  # tokens per layer on which every expert runs (similarity, cost curves)
    eval_tokens: int | None = None  # predicted tokens per domain (test split); None = all
    eval_batch: int = 8
    sensitivity_tokens: int | None = 16384  # per domain, validation split
    time_limit: float = 20.0  # seconds per solve
    curve_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)  # single-layer removals measured
    calibration_domain: str = "python"
    calibration_domain_budget: float = 0.5
    calibration_domain_all_models: bool = False  # False: the first model only
    lmeval: str = "some"  # none | some (first model, a few methods, 50%) | all
    lmeval_examples: int = 60  # per domain and task kind
    lmeval_kinds: tuple[str, ...] = ("scramble", "nextline", "cloze")
    lmeval_methods: tuple[str, ...] = ("uniform-reap", "global-ranking", "exact-measured", "grape-run")
    # the loss-verified search (method grape-run), as `grape run` on the test bed: search
    # sequences of 256 tokens from each domain's validation split, at most this many passes
    search_samples: int = 16
    search_passes: int = 100
    confirm_samples: int = 128  # the finalists are measured again on this many windows per domain

    def describe(self) -> list[tuple[str, str]]:
        cap = lambda n: "all" if n is None else f"{n:,}"
        lm = {"none": "off", "all": "every row",
              "some": f"first model, 50%, methods {', '.join(self.lmeval_methods)}"}[self.lmeval]
        return [
            ("mode", self.mode),
            ("budgets (fraction of routed experts removed)", ", ".join(f"{b:.0%}" for b in self.budgets)),
            ("calibration", (f"{self.calib_samples} sequences x {self.calib_seq_len} tokens from "
                             "`benchmarks/zoo/heldout/calibration.jsonl` (train split, mixed "
                             f"domains), seed 0; all-expert subsample {self.subsample} tokens "
                             "per layer")),
            ("single-domain calibration", f"same size, `{self.calibration_domain}` documents of "
                                          "calibration.jsonl only, "
                                          f"{self.calibration_domain_budget:.0%} budget, "
                                          + ("every model" if self.calibration_domain_all_models
                                             else "first model")),
            ("evaluation", (f"held-out test split, {cap(self.eval_tokens)} predicted tokens per "
                            "domain in windows of 256 tokens spread evenly over the whole split "
                            "(grape.evaluation's packing), float32")),
            ("layer sensitivity / measured curves",
             (f"each layer alone loses {', '.join(f'{f:.0%}' for f in self.curve_fractions)} of "
              f"its experts (REAP's choice); validation split, {cap(self.sensitivity_tokens)} "
              "tokens per domain, same windowing")),
            ("loss-verified search (`grape-run`)",
             (f"grape.search defaults, at most {self.search_passes} forward passes over "
              f"{self.search_samples} x 256 tokens per domain of the validation split, the "
              f"finalists confirmed on {self.confirm_samples} x 256 per domain "
              "(grape.search_stage.search_tokens, as `grape run` on the test bed)")),
            ("solver time limit", f"{self.time_limit:g} s per solve"),
            ("lm-eval (local tasks)", lm if self.lmeval == "none" else
             f"{lm}; kinds {', '.join(self.lmeval_kinds)}, {self.lmeval_examples} examples per "
             "domain and kind, accuracy = mean acc over the tasks"),
        ]


FAST = Settings(mode="fast")
FULL = Settings(
    mode="full", budgets=(0.125, 0.25, 0.375, 0.5), calib_samples=128, eval_tokens=None,
    sensitivity_tokens=None, time_limit=60.0, calibration_domain_all_models=True, lmeval="all",
    lmeval_examples=100, lmeval_kinds=("scramble", "nextline", "cloze"),
)


def log(msg: str) -> None:
    print(msg, flush=True)


# -- models, data, calibration --------------------------------------------------------------------
def finished(model_dir: Path) -> bool:
    """Weights present and, when the training summary is there, training finished (train.py
    writes intermediate checkpoints while a model is still training)."""
    if not (model_dir / "model.safetensors").exists():
        return False
    summary = model_dir / "zoo_train.json"
    if not summary.exists():
        return True
    try:
        return bool(json.loads(summary.read_text(encoding="utf-8")).get("finished", True))
    except json.JSONDecodeError:
        return False


def available_models() -> list[str]:
    present = [p.name for p in (ZOO / "models").iterdir() if finished(p)]
    return sorted(present, key=lambda n: (ZOO_ORDER.index(n) if n in ZOO_ORDER else 99, n))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def calibration_texts(domain: str | None) -> list[str]:
    rows = [json.loads(line) for line in (ZOO / "heldout" / "calibration.jsonl").read_text(
        encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows if domain is None or r.get("domain") == domain]


def cached_scores(model, tokenizer, name: str, calibration: str, settings: Settings,
                  cache_dir: Path) -> Scores:
    """Calibrate once per model and calibration set; the cache key includes the weights' hash."""
    import grape

    digest = file_digest(ZOO / "models" / name / "model.safetensors")
    # the reconstruction order's rows (CalibrationConfig's default) are part of what was measured
    key = (f"{name}-{calibration}-{settings.calib_samples}x{settings.calib_seq_len}"
           f"-sub{settings.subsample}-rec{grape.CalibrationConfig().reconstruction_tokens}-{digest}.npz")
    path = cache_dir / key
    if path.exists():
        log(f"  scores from cache: {path}")
        return Scores.load(path)
    start = time.perf_counter()
    texts = calibration_texts(None if calibration == "mixed" else calibration)
    config = grape.CalibrationConfig(samples=settings.calib_samples, seq_len=settings.calib_seq_len,
                                     subsample=settings.subsample, seed=0, progress=False)
    scores = grape.calibrate(model, [texts], config, tokenizer=tokenizer)  # one in-memory source
    scores.calibration["data_name"] = calibration
    scores.save(path)
    log(f"  calibrated [{calibration}] in {time.perf_counter() - start:.0f} s -> {path}")
    return scores


class Evaluator:
    """NLL per domain on windows spread evenly over each domain's whole held-out stream, and
    (optionally) local lm-eval accuracy on tasks built from the same documents.

    The stream and windows follow grape.evaluation's protocol (documents joined with EOS, windows
    of `seq_len` inputs overlapping by one token); a token cap keeps `ceil(cap / seq_len)`
    windows evenly spaced over the stream instead of the first documents only."""

    def __init__(self, tokenizer, docs, seq_len: int, max_tokens: int | None, batch: int,
                 settings: Settings, task_dir: Path):
        from grape.evaluation import EvalConfig, pack_windows, spread_windows, token_stream

        self.tokenizer, self.docs, self.batch = tokenizer, docs, batch
        self.windows = {}
        for domain, texts in docs.items():
            stream, _ = token_stream(tokenizer, texts, None)
            windows = pack_windows(stream, seq_len)
            if max_tokens is not None and max_tokens < len(windows) * seq_len:
                windows = spread_windows(windows, math.ceil(max_tokens / seq_len))
            self.windows[domain] = windows
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.task_config = EvalConfig(seq_len=seq_len, perplexity=False, tasks=("local",),
                                      local_task_kinds=settings.lmeval_kinds,
                                      local_task_examples=settings.lmeval_examples,
                                      local_task_dir=str(task_dir), batch_size=16, progress=False)
        self.task_seconds: list[float] = []

    @property
    def tokens(self) -> dict[str, int]:
        return {d: sum(len(w) - 1 for w in ws) for d, ws in self.windows.items()}

    def nll(self, model) -> tuple[dict[str, float], dict[str, list[float]]]:
        """Mean NLL per domain, and each window's mean NLL (for paired standard errors)."""
        from grape.evaluation import input_device, window_losses

        device = input_device(model)
        was_training = model.training
        model.eval()
        means, per_window = {}, {}
        try:
            for domain, windows in self.windows.items():
                sums, counts = [], []
                for start in range(0, len(windows), self.batch):
                    s, c = window_losses(model, windows[start:start + self.batch], self.pad_id,
                                         device)
                    sums += s
                    counts += c
                means[domain] = sum(sums) / sum(counts)
                per_window[domain] = [round(s / c, 6) for s, c in zip(sums, counts)]
        finally:
            model.train(was_training)
        return means, per_window

    def tasks(self, model) -> dict[str, float]:
        from grape.evaluation import evaluate

        for name in ("lm-eval", "lm_eval", "datasets", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
        start = time.perf_counter()
        result = evaluate(model, self.tokenizer, self.docs, self.task_config)
        self.task_seconds.append(time.perf_counter() - start)
        return {name: t.acc for name, t in result.tasks.items() if t.acc is not None}


# -- layer sensitivity ----------------------------------------------------------------------------
def sensitivity_table(scores: Scores, records: list[dict]) -> list[dict]:
    """The single-layer measurements, next to what each objective's per-layer term charges for
    the same removal."""
    out = []
    for rec in records:
        layer, removed = rec["layer"], rec["removed"]
        ls = scores.layers[layer]
        out.append({
            "layer": layer,
            "fraction": rec["fraction"],
            "removed": len(removed),
            "nll_increase": rec["nll_increase"],
            "removed_reap_mass": float(scores.importance("reap_mass")[layer][removed].sum()),
            "removed_reap_mass_energy": float(
                scores.importance("reap_mass", "layer_energy")[layer][removed].sum()),
            "removed_reap": float(scores.importance("reap")[layer][removed].sum()),
            "removed_frequency": float(scores.importance("frequency")[layer][removed].sum()),
            "cost_curve": None if ls.cost_curve is None else float(ls.cost_curve[rec["kept"]]),
            "output_energy": float(ls.output_energy),
        })
    return out


PREDICTORS = {  # column of a sensitivity record -> what it stands for
    "removed_reap_mass": "additive (reap_mass)",
    "removed_reap_mass_energy": "additive (reap_mass / layer RMS)",
    "removed_reap": "raw REAP sum",
    "removed_frequency": "frequency sum",
    "cost_curve": "measured block-output error (curves)",
}


def rank_correlation(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


# -- one model ------------------------------------------------------------------------------------
def searcher(base, scores: Scores, search_ids, settings: Settings, confirm_ids=None):
    """SolveConfig -> the loss-verified search's plan on `base` (method `grape-run`)."""
    from grape.loss_search import SearchConfig, search

    def run(config):
        result = search(base, scores, config, search_ids,
                        SearchConfig(max_passes=settings.search_passes, progress=False), confirm_ids=confirm_ids)
        plan = result.best.plan
        plan.seconds = result.seconds
        # the cost in passes of 16,384 tokens (the unit), confirmation included
        plan.provenance = {**plan.provenance, "search": {"passes": math.ceil(result.tokens_measured / 16384),
                                                         "chosen": result.best.name}}
        log(f"  search: {result.best.name} after {result.passes} passes + {len(result.confirmed)} "
            f"confirmations ({result.tokens_measured:,} tokens), {result.seconds:.0f} s")
        return plan

    return run


def masked_nll(base, ids):
    """Plan -> mean NLL of `base` routed only among the plan's experts, on `ids`."""
    from grape.sensitivity import masked, mean_nll

    def measure(plan):
        with masked(base, plan):
            return mean_nll(base, ids, 8)

    return measure


def run_model(name: str, settings: Settings, first: bool, methods: list[Method],
              out_dir: Path, previous: dict | None = None) -> dict:
    """Every method on one zoo model. `previous`: this model's entry of an earlier run with the
    same settings; then only `methods` are run and every other row, the layer study and the
    single-domain rows are kept from it (the unpruned NLL is measured again and must match)."""
    import torch

    import grape
    from grape.evaluation import default_heldout_files, load_documents

    torch.manual_seed(0)
    path = ZOO / "models" / name
    base = grape.load(path, dtype=torch.float32)
    tokenizer = grape.load_tokenizer(path)
    seq_len = min(256, int(getattr(base.config, "max_position_embeddings", 256)))
    cache_dir = out_dir / "cache"
    task_dir = cache_dir / "lmeval_tasks"
    test = Evaluator(tokenizer, load_documents(default_heldout_files("test")), seq_len,
                     settings.eval_tokens, settings.eval_batch, settings, task_dir)
    validation = Evaluator(tokenizer, load_documents(default_heldout_files("validation")), seq_len,
                           settings.sensitivity_tokens, settings.eval_batch, settings, task_dir)
    lmeval_on = settings.lmeval == "all" or (settings.lmeval == "some" and first)

    def tasks_for(method: Method, budget: float) -> bool:
        if settings.lmeval == "all":
            return True
        return lmeval_on and budget == 0.5 and method.name in settings.lmeval_methods

    start = time.perf_counter()
    baseline_nll, baseline_windows = test.nll(base)
    if previous is not None:
        _same_baseline(previous, baseline_nll)
    baseline_tasks = test.tasks(base) if lmeval_on and previous is None else (previous or {}).get(
        "baseline_tasks", {})
    log(f"{name}: unpruned NLL {json.dumps({d: round(v, 4) for d, v in baseline_nll.items()})}"
        f" ({time.perf_counter() - start:.0f} s)")
    mixed = cached_scores(base, tokenizer, name, "mixed", settings, cache_dir)
    # per-layer end-to-end curves on the validation split: the sensitivity study, and the
    # cost curves of the `exact-measured` probe
    if previous is None:
        validation_baseline, _ = validation.nll(base)
        measured, records = measure_layer_curves(base, mixed, validation.nll, validation_baseline,
                                                 settings.curve_fractions, settings.time_limit, log)
    else:
        import numpy as np

        measured = {int(k): np.asarray(v) for k, v in previous["layer_curves"].items()}
        records = previous["layer_measurements"]
    search_ids = search_tokens(default_heldout_files("validation"), tokenizer, seq_len, settings.search_samples)
    confirm_ids = search_tokens(default_heldout_files("validation"), tokenizer, seq_len, settings.confirm_samples)
    rows = run_table(base, mixed, settings.budgets, methods, test.nll, baseline_nll,
                     model_name=name, calibration="mixed", time_limit=settings.time_limit,
                     measured=measured, search=searcher(base, mixed, search_ids, settings, confirm_ids),
                     evaluate_tasks=test.tasks if lmeval_on else None, tasks_for=tasks_for, log=log)
    if previous is not None:
        rows = _with_kept_rows(rows, previous, {m.name for m in methods})
    removal_rows = [r for r in rows if r.calibration == "mixed" and r.apply == "remove"]
    fidelity_entries = fidelity(mixed, removal_rows, measured, measure=masked_nll(base, search_ids))
    if (first or settings.calibration_domain_all_models) and previous is None:
        domain = settings.calibration_domain
        single = cached_scores(base, tokenizer, name, domain, settings, cache_dir)
        rows += run_table(base, single, [settings.calibration_domain_budget],
                          list(CALIBRATION_DOMAIN_METHODS), test.nll, baseline_nll,
                          model_name=name, calibration=domain, time_limit=settings.time_limit,
                          log=log)
    sensitivity = sensitivity_table(mixed, records)
    identity = mixed.model
    return {
        "name": name,
        "model_type": identity.model_type,
        "experts_per_layer": {str(k): v for k, v in identity.experts_per_layer.items()},
        "top_k": {str(k): v for k, v in identity.top_k.items()},
        "n_group": identity.n_group,
        "baseline_nll": baseline_nll,
        "baseline_windows": baseline_windows,
        "eval_tokens": test.tokens,
        "baseline_tasks": baseline_tasks,
        "rows": [r.to_json() for r in rows],
        "sensitivity": sensitivity,
        "fidelity": fidelity_entries,
        "layer_curves": {str(k): v.tolist() for k, v in measured.items()},
        "layer_measurements": records,
        "lmeval_seconds": _mean(test.task_seconds),
        "seconds": time.perf_counter() - start,
    }


def _same_baseline(previous: dict, baseline_nll: dict[str, float]) -> None:
    """A partial rerun keeps rows measured earlier: only if the unpruned model measures the same."""
    old = previous["baseline_nll"]
    if set(old) != set(baseline_nll) or any(abs(old[d] - baseline_nll[d]) > 1e-6 for d in old):
        raise SystemExit(f"{previous['name']}: the unpruned NLL differs from the previous run "
                         f"({old} vs {baseline_nll}); rerun every method")


def _with_kept_rows(rows: list[Row], previous: dict, rerun: set[str]) -> list[Row]:
    """The new rows plus the previous run's rows of the methods not rerun, in table order."""
    known = {m.name for m in (*METHODS, *PROBES, *CALIBRATION_DOMAIN_METHODS)}
    kept = [Row.from_json(r) for r in previous["rows"]
            if (r["method"] not in rerun or r["calibration"] != "mixed") and r["method"] in known]
    order = {m.name: i for i, m in enumerate((*METHODS, *PROBES))}
    both = kept + rows
    return sorted(both, key=lambda r: (r.calibration != "mixed", r.budget, order.get(r.method, len(order))))


# -- report ---------------------------------------------------------------------------------------
def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(v: float | None, spec: str = "+.4f") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _versus(a: Row, b: Row) -> str:
    """'beats' / 'loses to' / 'ties with' b, by the paired difference and twice its error."""
    diff, se = paired_difference(a, b)
    if se is not None and abs(diff) <= 2 * se:  # equal plans give 0 <= 0: a tie
        word = "ties with"
    else:
        word = "beats" if diff < 0 else "loses to"
    err = "" if se is None else f" ± {se:.4f}"
    return f"{word} uniform REAP ({diff:+.4f}{err} nats)"


def verdicts(model: dict, budgets) -> list[str]:
    """Plain statements, generated from the numbers: who wins where. A difference counts only
    when it exceeds twice its paired standard error over the evaluation windows."""
    rows = [Row.from_json(r) for r in model["rows"] if r["calibration"] == "mixed"]
    main = {m.name for m in METHODS}
    out = []
    for budget in budgets:
        at = [r for r in rows if r.budget == budget]
        if not at:
            continue
        table = [r for r in at if r.method in main]
        best = min(table, key=lambda r: r.mean_increase)
        reap = next((r for r in at if r.method == "uniform-reap"), None)
        line = (f"**{model['name']}, {budget:.0%} removed:** best of the method table "
                f"`{best.method}` ({best.mean_increase:+.4f})")
        if reap is None:
            out.append(line + ".")
            continue
        line += f"; uniform REAP {reap.mean_increase:+.4f}"
        globals_ = [r for r in table if r.family == "global"]
        if globals_:
            g = min(globals_, key=lambda r: r.mean_increase)
            line += f". Best global allocation `{g.method}` {_versus(g, reap)}"
        exact = [r for r in table if r.solver == "exact"]
        if exact:
            e = min(exact, key=lambda r: r.mean_increase)
            line += f"; best exact integer program `{e.method}` {_versus(e, reap)}"
        probes = [r for r in at if r.method not in main]
        if probes:
            p = min(probes, key=lambda r: r.mean_increase)
            line += f". Best probe `{p.method}` {_versus(p, reap)}"
        out.append(line + ".")
    return out


def summary_rows(model: dict, budgets) -> list[str]:
    rows = [Row.from_json(r) for r in model["rows"] if r["calibration"] == "mixed"]
    main = {m.name for m in METHODS}
    out = []
    for budget in budgets:
        at = [r for r in rows if r.budget == budget and r.method in main]
        reap = next((r for r in at if r.method == "uniform-reap"), None)
        if reap is None:
            continue
        cells = [model["name"], f"{budget:.0%}", f"{reap.mean_increase:+.4f}"]
        for pick in (lambda r: r.family == "global", lambda r: r.solver == "exact"):
            chosen = [r for r in at if pick(r)]
            if not chosen:
                cells += ["", ""]
                continue
            best = min(chosen, key=lambda r: r.mean_increase)
            diff, se = paired_difference(best, reap)
            cells += [f"`{best.method}` {best.mean_increase:+.4f}",
                      f"{diff:+.4f}" + ("" if se is None else f" ± {se:.4f}")]
        out.append("| " + " | ".join(cells) + " |")
    return out


UNIFORM_BASELINES = ("uniform-frequency", "uniform-reap", "uniform-reap-mass")


def default_rows(model: dict, budgets) -> list[str]:
    """The acceptance table of the default (`grape-run`): against the best uniform baseline
    (the lowest of uniform frequency / REAP / reap_mass at that budget) with the paired standard
    error, and its ratio to uniform REAP's increase."""
    rows = [Row.from_json(r) for r in model["rows"] if r["calibration"] == "mixed"]
    out = []
    for budget in budgets:
        at = {r.method: r for r in rows if r.budget == budget}
        default, reap = at.get("grape-run"), at.get("uniform-reap")
        uniform = [at[m] for m in UNIFORM_BASELINES if m in at]
        if default is None or not uniform:
            continue
        best = min(uniform, key=lambda r: r.mean_increase)
        diff, se = paired_difference(default, best)
        ok = diff <= (se or 0.0)
        ratio = default.mean_increase / reap.mean_increase if reap and reap.mean_increase > 0 else None
        if budget == 0.5 and ratio is not None:
            ok = ok and ratio <= 0.8
        cells = [model["name"], f"{budget:.0%}", f"`{best.method}` {best.mean_increase:+.4f}",
                 f"{default.mean_increase:+.4f}",
                 f"{diff:+.4f}" + ("" if se is None else f" ± {se:.4f}"),
                 _fmt(ratio, ".2f"), str(default.passes), "yes" if ok else "**no**"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def fidelity_section(data: dict, budgets) -> list[str]:
    from fidelity import render

    models = [m for m in data["models"] if m.get("fidelity")]
    if not models:
        return []
    lines = ["## Objective fidelity: which proxy ranks plans like the model does", "",
             ("Spearman rank correlation, over the plans of the method table at one budget (mixed "
              "calibration, experts removed), between what each objective predicts for a plan and "
              "the plan's measured NLL increase on the test split. 1: the proxy orders the plans as "
              "the model does; 0: unrelated; negative: backwards. The last kind of row is the "
              "loss-verified search's own yardstick, NLL on its validation-split search tokens "
              "(benchmarks/fidelity.py)."), "",
             "| model | predictor | " + " | ".join(f"{b:.0%}" for b in budgets) + " | mean | plans |",
             "|---|---|" + "---:|" * (len(budgets) + 2)]
    for model in models:
        lines += render(model["name"], model["fidelity"], budgets)
    return lines + [""]


def render_markdown(data: dict) -> str:
    settings = data["settings"]
    budgets = settings["budgets"]
    lines = [
        "# Method comparison on the zoo",
        "",
        (f"Generated by {describe(data)} on {data['date']} ({data['machine']}); "
         f"{data['seconds'] / 60:.1f} minutes. Do not edit by hand: rerun the script."),
        "Minutes per model: " + ", ".join(
            f"{m['name']} {m.get('seconds', 0.0) / 60:.1f}" + (" (reused from an earlier run with the same "
                                                      "weights and settings, `--reuse`)"
                                                      if m.get("reused") else "")
            for m in data["models"]) + ".",
        "Analysis: [docs/results.md](../../docs/results.md).",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in data["settings_text"]],
        "",
        ("NLL increase = NLL of the pruned model minus the unpruned model's, nats per token, per "
         "domain; `mean` is the unweighted mean over the three domains. Lower is better. "
         "`kept per layer` lists the routed experts each MoE layer keeps."),
        "",
        "## Methods",
        "",
        "| method | family | what it does | settings |",
        "|---|---|---|---|",
    ]
    for m in (*METHODS, *PROBES):
        tag = " (probe)" if m in PROBES else ""
        lines.append(f"| `{m.name}` | {m.family}{tag} | {m.about} | {m.describe()} |")
    lines.append("")
    lines += ["## Who wins where", "", "<!-- readme -->",
              ("**The default (`grape run`: loss-verified search) against the best uniform "
               "baseline** (the lowest of uniform frequency / REAP / reap_mass at that budget). "
               "Acceptance: no worse than the best uniform plus one paired standard error, and at "
               "50% at most 0.8x uniform REAP's increase."), "",
              ("| model | removed | best uniform | `grape run` default | vs best uniform | "
               "/ uniform REAP | passes of 16k tokens | meets |"),
              "|---|---:|---|---:|---:|---:|---:|---|",
              *[line for model in data["models"] for line in default_rows(model, budgets)], "",
              ("Mean NLL increase on held-out test text (nats/token, lower is better) against "
               "the unpruned model; ± is the paired standard error over the evaluation windows. "
               "Mixed-domain calibration."), "",
              ("| model | removed | uniform REAP | best global allocation | vs uniform REAP | "
               "best exact program | vs uniform REAP |"),
              "|---|---:|---:|---|---:|---|---:|"]
    for model in data["models"]:
        lines += summary_rows(model, budgets)
    lines += ["", *[f"- {v}" for model in data["models"] for v in verdicts(model, budgets)],
              "<!-- /readme -->", ""]
    lines += fidelity_section(data, budgets)
    for model in data["models"]:
        lines += _model_section(model, budgets, data)
    if data.get("lmeval_note"):
        lines += ["## lm-eval", "", data["lmeval_note"], ""]
    return "\n".join(lines)


def _model_section(model: dict, budgets, data: dict) -> list[str]:
    rows = [Row.from_json(r) for r in model["rows"]]
    domains = list(model["baseline_nll"])
    experts = sorted(set(model["experts_per_layer"].values()))
    top_k = sorted(set(model["top_k"].values()))
    lines = [
        f"## {model['name']}",
        "",
        f"`{model['model_type']}`, {len(model['experts_per_layer'])} MoE layers x "
        f"{'/'.join(map(str, experts))} routed experts, top-{'/'.join(map(str, top_k))}"
        + (f", {model['n_group']} routing groups" if model.get("n_group") else "")
        + ". Unpruned NLL: " + ", ".join(f"{d} {v:.4f}" for d, v in model["baseline_nll"].items())
        + f" (test tokens per domain: {', '.join(f'{d} {n:,}' for d, n in model.get('eval_tokens', {}).items())})"
        + "." + (f" Unpruned lm-eval accuracy (mean of {len(model['baseline_tasks'])} local tasks): "
                 f"{_mean(model['baseline_tasks'].values()):.3f}." if model["baseline_tasks"] else ""),
        "",
        (f"![kept per layer](quality_kept_{model['name']}.png) "
         f"![NLL against budget](quality_nll_{model['name']}.png)"),
        "",
    ]
    has_tasks = any(r.tasks for r in rows)
    for budget in budgets:
        at = sorted((r for r in rows if r.calibration == "mixed" and r.budget == budget),
                    key=lambda r: r.mean_increase)
        if not at:
            continue
        head = ("| rank | method | apply | kept per layer | solve s | status | "
                + " | ".join(domains) + " | mean |" + (" lm-eval acc |" if has_tasks else ""))
        lines += [f"### {budget:.0%} of routed experts removed (mixed calibration), best first", "",
                  head, "|" + "---|" * (head.count("|") - 1)]
        for rank, r in enumerate(at, 1):
            name = f"`{r.method}`" + (" (probe)" if r.method in {p.name for p in PROBES} else "") \
                + (f" ({r.passes} passes)" if r.passes else "")
            cells = [str(rank), name, r.apply, " ".join(map(str, r.kept.values())),
                     f"{r.solve_seconds:.2f}", r.status,
                     *[_fmt(r.nll_increase[d]) for d in domains], f"**{r.mean_increase:+.4f}**"]
            if has_tasks:
                cells.append(_fmt(_mean(r.tasks.values()), ".3f") if r.tasks else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    single = [r for r in rows if r.calibration != "mixed"]
    if single:
        domain = single[0].calibration
        budget = single[0].budget
        lines += [f"### Calibration domain: mixed vs `{domain}` only ({budget:.0%} removed)", "",
                  "| method | calibration | " + " | ".join(domains) + " | mean |",
                  "|---|---|" + "---:|" * (len(domains) + 1)]
        for r_single in single:
            mixed = next((r for r in rows if r.calibration == "mixed" and r.budget == budget
                          and r.method == r_single.method), None)
            for r in (mixed, r_single):
                if r is None:
                    continue
                lines.append(f"| `{r.method}` | {r.calibration} | "
                             + " | ".join(_fmt(r.nll_increase[d]) for d in domains)
                             + f" | {r.mean_increase:+.4f} |")
        lines.append("")
    sens = model.get("sensitivity") or []
    if sens:
        lines += ["### Layer sensitivity: one layer at a time loses part of its experts", "",
                  ("Measured: mean NLL increase on the validation split when only that layer is "
                   "pruned (REAP's choice of experts); these points are also the cost curves of "
                   "the `exact-measured` probe. The other columns are what each objective "
                   "charges for the same removal; a good cross-layer objective ranks the layers "
                   "like the measured column."), ""]
        for fraction in sorted({s["fraction"] for s in sens}):
            at = [s for s in sens if s["fraction"] == fraction]
            lines += [f"**{fraction:.0%} of one layer's experts removed**", "",
                      "| layer | removed | measured dNLL | " + " | ".join(PREDICTORS.values()) + " |",
                      "|---:|---:|---:|" + "---:|" * len(PREDICTORS)]
            for s in at:
                lines.append(f"| {s['layer']} | {s['removed']} | {s['nll_increase']:+.4f} | "
                             + " | ".join(_fmt(s[k], ".4g") for k in PREDICTORS) + " |")
            measured = [s["nll_increase"] for s in at]
            corr = []
            for key, label in PREDICTORS.items():
                if all(s[key] is not None for s in at):
                    c = rank_correlation([s[key] for s in at], measured)
                    corr.append(f"{label} {_fmt(c, '+.2f')}")
            lines += ["", "Spearman rank correlation with the measured column: "
                      + "; ".join(corr) + ".", ""]
        total = {f: sum(s["nll_increase"] for s in sens if s["fraction"] == f)
                 for f in sorted({s["fraction"] for s in sens})}
        uniform = {r.budget: r for r in rows if r.calibration == "mixed"
                   and r.method == "uniform-reap"}
        pairs = [f"{f:.0%}: sum of single layers {total[f]:+.4f} vs all layers together "
                 f"{uniform[f].mean_increase:+.4f}" for f in total if f in uniform]
        if pairs:
            lines += ["Additivity check (uniform REAP; single layers on validation, all layers "
                      "on test): " + "; ".join(pairs) + ".", ""]
    return lines


def plot(model: dict, budgets, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [Row.from_json(r) for r in model["rows"] if r["calibration"] == "mixed"]
    names = [m.name for m in (*METHODS, *PROBES) if m.apply == "remove"]
    colors = {n: plt.cm.tab20(i % 20) for i, n in enumerate(names)}
    written = []
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.5), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for r in rows:
            if r.budget != budget or r.apply != "remove":
                continue
            layers = list(r.kept)
            style = "--" if r.family == "uniform" else "-"
            ax.plot(range(len(layers)), list(r.kept.values()), style, marker="o", ms=3,
                    color=colors[r.method], label=r.method, alpha=0.85)
            ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_title(f"{model['name']}: {budget:.0%} removed")
        ax.set_xlabel("MoE layer (decoder index)")
        ax.set_ylabel("routed experts kept")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path = out_dir / f"quality_kept_{model['name']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # left: every method; right: zoom on the ones near uniform REAP (the redundancy objectives
    # and merges are far above and would flatten the rest)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    reap_top = max((r.mean_increase for r in rows if r.method == "uniform-reap"), default=None)
    for ax, zoom in zip(axes, (False, True)):
        for m in (*METHODS, *PROBES):
            pts = sorted((r.budget, r.mean_increase) for r in rows if r.method == m.name)
            if not pts:
                continue
            if zoom and reap_top is not None and pts[-1][1] > 2.0 * reap_top:
                continue
            xs, ys = zip(*([(0.0, 0.0)] + pts))
            style = ":" if m.apply == "merge" else ("--" if m.family == "uniform" else "-")
            base_name = m.name.replace("+merge", "")
            ax.plot(xs, ys, style, marker="o", ms=3, label=m.name,
                    color=colors.get(base_name, "black"), alpha=0.85)
        ax.set_xlabel("fraction of routed experts removed")
        ax.set_ylabel("mean NLL increase on held-out test (nats/token)")
        ax.set_title("methods within 2x of uniform REAP" if zoom else
                     f"{model['name']}: all methods (dashed: uniform, dotted: merge)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = out_dir / f"quality_nll_{model['name']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def lmeval_note(settings: Settings, data: dict) -> str:
    if settings.lmeval == "none":
        return ("lm-eval was switched off for this run (`--no-lmeval`); the NLL columns are the "
                "quality measure.")
    seconds = [m.get("lmeval_seconds") for m in data["models"] if m.get("lmeval_seconds")]
    note = ("Local lm-eval tasks (grape.evaluation, `tasks=('local',)`: multiple-choice tasks built "
            "from the held-out test documents, run in-process and offline) are scored only on "
            + ("every row." if settings.lmeval == "all" else
               "the rows with a value in the `lm-eval acc` column: on this CPU one lm-eval pass "
               "takes about as long as ten NLL evaluations, so the fast mode scores a few "
               "methods at 50% on the first model; `--full` scores every row with 100 examples "
               "per task."))
    note += (" With few examples per task the accuracy has a standard error of several points, so "
             "NLL is the primary measure here.")
    return note + (f" Seconds per lm-eval pass: {_mean(seconds):.0f}." if seconds else "")


def write_report(data: dict, settings: Settings, out_dir: Path) -> None:
    data["lmeval_note"] = lmeval_note(settings, data)
    atomic_write_text(out_dir / "quality.json", json.dumps(data, indent=1) + "\n")
    for model in data["models"]:
        plot(model, list(settings.budgets), out_dir)
    atomic_write_text(out_dir / "quality.md", render_markdown(data) + "\n")


def reusable(path: Path, settings: Settings) -> dict[str, dict]:
    """Model entries of a previous quality.json made with the same settings and method table."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    same = (old.get("settings") == json.loads(json.dumps(asdict(settings)))
            and old.get("methods") == json.loads(json.dumps([asdict(m) for m in (*METHODS, *PROBES)])))
    return {m["name"]: m for m in old.get("models", [])} if same else {}


def ensure_cache(out_dir: Path) -> None:
    cache = out_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    ignore = cache / ".gitignore"
    if not ignore.exists():
        atomic_write_text(ignore, "# calibration scores and lm-eval task files: rebuilt by "
                                  "benchmarks/quality.py\n*\n!.gitignore\n")


def refresh_fidelity(data: dict, dirs: list[Path]) -> None:
    """Recompute each model's proxy fidelity from its cached mixed-calibration scores (found in
    DIR/cache/), so a fix to the predictor table needs no rerun; models without a cache keep theirs."""
    import numpy as np
    from fidelity import refresh

    for model in data["models"]:
        found = [p for d in dirs for p in sorted((d / "cache").glob(f"{model['name']}-mixed-*.npz"))
                 if p.name.endswith(f"-{model.get('digest', '')}.npz")]
        if not found or not model.get("fidelity"):
            continue
        rows = [Row.from_json(r) for r in model["rows"] if r["calibration"] == "mixed" and r["apply"] == "remove"]
        curves = {int(k): np.asarray(v) for k, v in model.get("layer_curves", {}).items()} or None
        model["fidelity"] = refresh(model["fidelity"], Scores.load(found[0]), rows, curves)


def merge(out: Path, others: list[Path]) -> int:
    """OUT/quality.json plus the models of each other run (same settings and method table)."""
    data = json.loads((out / "quality.json").read_text(encoding="utf-8"))
    for other in others:
        extra = json.loads((other / "quality.json").read_text(encoding="utf-8"))
        if extra["settings"] != data["settings"] or extra["methods"] != data["methods"]:
            raise SystemExit(f"{other / 'quality.json'}: other settings or methods than {out / 'quality.json'}; "
                             "rerun it with the same command")
        names = {m["name"] for m in extra["models"]}
        data["models"] = [m for m in data["models"] if m["name"] not in names] + extra["models"]
        data["commands"] = commands(data) + commands(extra)
        data["seconds"] += extra["seconds"]
    order = {name: i for i, name in enumerate(ZOO_ORDER)}
    data["models"].sort(key=lambda m: order.get(m["name"], len(order)))
    refresh_fidelity(data, [out, *others])
    settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["settings"].items()})
    write_report(data, settings, out)
    log(f"merged {len(data['models'])} models into {out / 'quality.json'}")
    return 0


def _previous_run(out: Path, settings: Settings, only: list[str] | None,
                  methods: list[Method]) -> dict | None:
    """For --only: OUT/quality.json, which must share the settings (None without --only)."""
    if not only:
        return None
    unknown = sorted(set(only) - {m.name for m in methods})
    if unknown:
        raise SystemExit(f"--only: unknown methods {unknown}; see benchmarks/quality_methods.py")
    path = out / "quality.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if old.get("settings") != json.loads(json.dumps(asdict(settings))):
        raise SystemExit(f"--only needs {path} from a run with the same settings; run every method")
    return old


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the long run (see the module doc)")
    parser.add_argument("--models", nargs="*", help="zoo model names (default: every trained one)")
    parser.add_argument("--budgets", type=float, nargs="*", help="fractions to remove")
    parser.add_argument("--no-lmeval", action="store_true", help="NLL only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the results of models already in OUT/quality.json whose weights "
                             "and settings are unchanged; run only the others")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads (default: up to 2)")
    parser.add_argument("--no-first-studies", action="store_true",
                        help="no model counts as the first one (whose extra studies, single-domain "
                             "calibration and lm-eval, run in the fast mode): for a second process "
                             "running more models beside another, merged later with --merge")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="DIR",
                        help="add the models of DIR/quality.json (same settings and methods) to "
                             "OUT/quality.json, in zoo order, and rewrite the report; run nothing")
    parser.add_argument("--only", nargs="+", default=None, metavar="METHOD",
                        help="run only these methods (e.g. after a change to one of them) and keep "
                             "every other row of OUT/quality.json, which must have the same "
                             "settings; the unpruned NLL is measured again and must match")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite quality.md and the plots from OUT/quality.json; run nothing")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.out, args.merge)
    if args.report_only:
        data = json.loads((args.out / "quality.json").read_text(encoding="utf-8"))
        write_report(data, Settings(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in data["settings"].items()}), args.out)
        log(f"rewrote {args.out / 'quality.md'} from quality.json")
        return 0

    settings = FULL if args.full else FAST
    if args.budgets:
        settings = replace(settings, budgets=tuple(args.budgets))
    if args.no_lmeval:
        settings = replace(settings, lmeval="none")
    models = args.models or available_models()
    missing = [m for m in models if not (ZOO / "models" / m / "model.safetensors").exists()]
    if missing or not models:
        parser.error(f"no trained zoo model {missing or ''}; train with benchmarks/zoo/train.py")
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ensure_cache(args.out)
    command = command_line("quality.py", argv)
    data = {
        "format": "grape.quality-benchmark",
        "command": command,
        "commands": [command],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch "
                   f"{torch.__version__}, {torch.get_num_threads()} threads",
        "settings": asdict(settings),
        "settings_text": settings.describe(),
        "methods": [asdict(m) for m in (*METHODS, *PROBES)],
        "models": [],
        "seconds": 0.0,
    }
    start = time.perf_counter()
    methods = [*METHODS, *PROBES]
    previous = reusable(args.out / "quality.json", settings) if args.reuse else {}
    previous_run = _previous_run(args.out, settings, args.only, methods)
    earlier = {m["name"]: m for m in previous_run["models"]} if previous_run else {}
    before = 0.0  # seconds spent on the rows a partial rerun keeps
    if previous_run:
        data["commands"] = commands(previous_run) + [command]
        before = previous_run.get("seconds", 0.0)
        methods = [m for m in methods if m.name in args.only]
    for i, name in enumerate(models):
        digest = file_digest(ZOO / "models" / name / "model.safetensors")
        if name in previous and previous[name].get("digest") == digest \
                and previous[name].get("first") == (i == 0):
            log(f"== {name}: reused from the previous run (same weights and settings)")
            data["models"].append({**previous[name], "reused": True})
        else:
            log(f"== {name}")
            first = i == 0 and not args.no_first_studies
            if name in earlier:  # a partial rerun keeps the model's role (its extra studies)
                first = bool(earlier[name].get("first", first))
            result = run_model(name, settings, first, methods, args.out, earlier.get(name))
            data["models"].append({**result, "digest": digest, "first": first})
        data["seconds"] = before + time.perf_counter() - start
        write_report(data, settings, args.out)  # after every model: a partial run still reports
    log(f"wrote {args.out / 'quality.md'} in {data['seconds'] / 60:.1f} min")
    for model in data["models"]:
        for line in verdicts(model, settings.budgets):
            log(line.replace("**", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
