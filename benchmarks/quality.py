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

Writes benchmarks/results/quality.md, quality.json and quality_*.png (matplotlib, Agg); the
settings, zoo models and evaluator are in quality_setup.py, the report in quality_report.py.
Calibration scores are cached in benchmarks/results/cache/ (git-ignored).

    python benchmarks/quality.py                    # fast: whole test split, 2 budgets, lm-eval on
                                                    # a few rows (~20 min on 2 CPU cores)
    python benchmarks/quality.py --full             # more calibration, 4 budgets, lm-eval on every
                                                    # row, whole validation split (hours on CPU)
    python benchmarks/quality.py --models qwen3moe-32x4 --no-lmeval
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from fidelity import fidelity
from provenance import command_line, commands
from quality_methods import (
    CALIBRATION_DOMAIN_METHODS,
    METHODS,
    PROBES,
    Method,
    Row,
    measure_layer_curves,
    run_table,
)
from quality_report import mean_or_none, verdicts, write_report
from quality_setup import (
    FAST,
    FULL,
    RESULTS,
    ZOO,
    ZOO_ORDER,
    Evaluator,
    Settings,
    available_models,
    cached_scores,
    file_digest,
    log,
)

from grape.outputs import atomic_write_text
from grape.searching.stage import search_tokens
from solvers.scores import Scores


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


# -- one model ------------------------------------------------------------------------------------
def searcher(base, scores: Scores, search_ids, settings: Settings, confirm_ids=None):
    """SolveConfig -> the loss-verified search's plan on `base` (method `grape-run`)."""
    from grape.searching.algorithm import SearchConfig, search

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
    from grape.searching.sensitivity import masked, mean_nll

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
    from grape.evaluation.perplexity import default_heldout_files, load_documents

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
        "window_documents": test.documents,  # the unit of every paired standard error
        "eval_tokens": test.tokens,
        "baseline_tasks": baseline_tasks,
        "rows": [r.to_json() for r in rows],
        "sensitivity": sensitivity,
        "fidelity": fidelity_entries,
        "layer_curves": {str(k): v.tolist() for k, v in measured.items()},
        "layer_measurements": records,
        "lmeval_seconds": mean_or_none(test.task_seconds),
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


def backfill_documents(data: dict, settings: Settings) -> None:
    """Each window's document for model entries of a quality.json written before they were
    recorded: the test windows are rebuilt from the model's tokenizer and the committed test
    split (no model runs), and kept only if they match the recorded windows one for one."""
    import grape
    from grape.evaluation.perplexity import default_heldout_files, load_documents

    for model in data["models"]:
        path = ZOO / "models" / model["name"]
        if model.get("window_documents") or not (path / "config.json").exists():
            continue
        context = json.loads((path / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings", 256)
        test = Evaluator(grape.load_tokenizer(path), load_documents(default_heldout_files("test")),
                         min(256, int(context)), settings.eval_tokens, settings.eval_batch, settings,
                         RESULTS / "cache" / "lmeval_tasks")
        recorded = model.get("baseline_windows", {})
        if {d: len(w) for d, w in test.documents.items()} == {d: len(w) for d, w in recorded.items()}:
            model["window_documents"] = test.documents
        else:
            log(f"{model['name']}: the rebuilt test windows differ from quality.json's; its "
                "standard errors stay by window")


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
    backfill_documents(data, settings)
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
        settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["settings"].items()})
        backfill_documents(data, settings)
        write_report(data, settings, args.out)
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
