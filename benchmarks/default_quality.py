"""The default, measured: what `grape run` with no flags chooses on each zoo model, against the
best uniform plan of every criterion, on the test split, with standard errors by document.

For each zoo model, calibration seed and budget this builds the run configuration exactly as
`grape run --model M --data CALIBRATION --budget B --seed S` builds it (the CLI's own parser and
settings resolution: calibration size, held-out search and confirmation documents, passes,
solver limits) and calls the pipeline's own stages: calibration with the search's documents
held out (grape.data.split), the solver, and the loss-verified search with its confirmation.
Calibration does not depend on the budget, so it runs once per model and seed. Nothing here is a
benchmark-only setting; the only thing not run is the pipeline's own evaluation and checkpoint
(they do not change the plan).

Then every plan is measured on the committed test split (grape/assets/heldout/*.test.jsonl) by
masked routing (the same NLL as removal, tests/test_apply.py): the default's choice and the
uniform plan under every criterion (reconstruction, reap_mass, frequency, reap, ean). The NLL
increase is the mean over domains; standard errors are by document (grape.evaluation.stats), paired
against the best uniform plan (the lowest uniform plan on the test split, chosen after the fact:
the strictest baseline).

    python benchmarks/default_quality.py                          # everything (hours on 2 cores)
    python benchmarks/default_quality.py --models olmoe-32x4 --budgets 0.25 0.5 --seeds 0

Results accumulate in benchmarks/results/default_quality.json (one record per model, seed and
budget; cells it already has are skipped, `--redo` measures them again and replaces them) and
default_quality.md is rewritten from all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from grape.outputs import atomic_write_text  # noqa: E402
from grape.evaluation.stats import domain_mean_se  # noqa: E402
from provenance import scrub  # noqa: E402

ZOO = ROOT / "benchmarks" / "zoo"
HELDOUT = ROOT / "grape" / "assets" / "heldout"
CALIBRATION = HELDOUT / "calibration.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("qwen3moe-32x4", "deepseekv3-32x4g", "mixtral-8x2", "mixtral-8x2-upcycled", "olmoe-32x4")
BUDGETS = (0.125, 0.25, 0.375, 0.5)
CRITERIA = ("reconstruction", "reap_mass", "frequency", "reap", "ean")
EVAL_SEQ_LEN = 256  # the zoo's context


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the default, as `grape run` builds it ---------------------------------------------------------
def default_config(model: str, budget: float, seed: int, out: Path):
    """The RunConfig of `grape run --model M --data CALIBRATION --budget B --seed S --out OUT`
    (the CLI's parser and settings resolution, nothing else)."""
    from grape.cli.main import build_parser
    from grape.cli.commands.run import resolve_settings, run_config

    argv = ["run", "--model", str(ZOO / "models" / model), "--data", str(CALIBRATION),
            "--budget", str(budget), "--seed", str(seed), "--out", str(out), "--no-progress"]
    args = build_parser().parse_args(argv)
    resolve_settings(args)
    return run_config(args), argv


def calibrated(model: str, seed: int, out: Path):
    """grape.pipeline.Calibrated (tokenizer, model, scores, held-out windows) by the pipeline's
    calibration stage."""
    from grape.pipeline import _calibrate_stage

    config, _ = default_config(model, 0.25, seed, out)
    return _calibrate_stage(config, searching=True)


def default_plan(model_name: str, budget: float, seed: int, loaded, out: Path):
    """(the plan `grape run` applies, the search result, the uniform plans, the argv)."""
    from dataclasses import replace

    from grape.pipeline import _search_stage
    from solvers.spec import build_problem, plan_for

    model, scores, held_out = loaded.model, loaded.scores, loaded.held_out
    config, argv = default_config(model_name, budget, seed, out)
    plans = {config.solve.solver: plan_for(scores, config.solve, build_problem(scores, config.solve))}
    found = _search_stage(config, model, scores, held_out, plans)
    uniform = {}
    for criterion in CRITERIA:
        if scores.has_criterion(criterion):
            cfg = replace(config.solve, solver="uniform", objective="additive", criterion=criterion)
            uniform[criterion] = plan_for(scores, cfg)
    return found.best.plan, found, uniform, argv


# -- the test split, by document ---------------------------------------------------------------------
def test_windows(tokenizer) -> dict:
    """domain -> grape.data.split.Windows over the whole test split (every document, uncapped)."""
    from grape.data.split import _tokenized, windows
    from grape.data.heldout import load_documents

    docs = load_documents([str(p) for p in sorted(HELDOUT.glob("*.test.jsonl"))])
    separator = tokenizer.eos_token_id
    return {domain: windows(_tokenized(texts, tokenizer, domain), EVAL_SEQ_LEN, 1 << 40, separator)
            for domain, texts in docs.items()}


def test_nll(model, plan, test: dict) -> dict:
    """domain -> per-window mean NLL under `plan` (None: unpruned), masked routing."""
    from contextlib import nullcontext

    from grape.searching.sensitivity import masked, sequence_nll

    with masked(model, plan) if plan is not None else nullcontext():
        return {d: sequence_nll(model, w.ids, 8) for d, w in test.items()}


def increase(nll: dict, base: dict, test: dict, reference: dict | None = None) -> tuple[float, float]:
    """Mean over domains of the NLL increase over `base` (or the difference to `reference`),
    with its standard error by document."""
    other = reference if reference is not None else base
    return domain_mean_se({d: (nll[d] - other[d], test[d].groups) for d in test})


# -- one cell -----------------------------------------------------------------------------------------
def measure_cell(name: str, budget: float, seed: int, loaded, test: dict, base: dict, work: Path) -> dict:
    start = time.perf_counter()
    plan, found, uniform, argv = default_plan(name, budget, seed, loaded, work / f"{name}-{seed}-{budget}")
    search_seconds = time.perf_counter() - start
    model = loaded.model
    nll = {"default": test_nll(model, plan, test)}
    nll.update({f"uniform {c}": test_nll(model, p, test) for c, p in uniform.items()})
    rows = {key: dict(zip(("increase", "se"), increase(v, base, test))) for key, v in nll.items()}
    best = min((k for k in rows if k.startswith("uniform ")), key=lambda k: rows[k]["increase"])
    diff, se = increase(nll["default"], base, test, reference=nll[best])
    return {"model": name, "seed": seed, "budget": budget, "argv": relative(argv[1:]), "rows": rows,
            "best_uniform": best, "default_minus_best": diff, "default_minus_best_se": se,
            "ratio_to_best": rows["default"]["increase"] / rows[best]["increase"],
            "ratio_to_reap": rows["default"]["increase"] / rows["uniform reap"]["increase"],
            "chosen": found.best.name, "role": found.best.role.value, "passes": found.passes,
            "computed_passes": round(found.computed_passes, 2), "search_tokens": found.tokens_per_pass,
            "confirm_tokens": found.confirm_tokens, "confirmed": len(found.confirmed),
            "versus_uniform_on_confirmation": found.versus_uniform, "notes": found.notes,
            "held_out": {k: found.held_out[k]["documents"] if found.held_out.get(k) else 0
                         for k in ("search", "confirmation")},
            "kept_per_layer": {str(k): v for k, v in plan.kept_counts().items()},
            # which experts (not only how many): the peers benchmark pairs its rows with this plan
            "kept_experts": {str(k): sorted(int(e) for e in v) for k, v in plan.kept.items()},
            "search_seconds": round(search_seconds, 1)}


def relative(argv: list[str]) -> list[str]:
    """The command line with this checkout's paths relative to it (no machine paths in results)."""
    return [scrub(a) for a in argv]


# -- tables -------------------------------------------------------------------------------------------
def verdict(cell: dict) -> bool:
    """No worse than the best uniform plan plus one standard error (by document)."""
    return cell["default_minus_best"] <= cell["default_minus_best_se"]


def table(cells: list[dict]) -> str:
    head = ("| model | seed | budget | default (`grape run`) | best uniform | default - best (SE) | "
            "x best | x uniform REAP | chosen | passes + confirmation |\n|---|---:|---:|---:|---|---:|---:|---:|---|---|")
    lines = [head]
    order = {m: i for i, m in enumerate(MODELS)}
    for c in sorted(cells, key=lambda c: (order.get(c["model"], 99), c["budget"], c["seed"])):
        d, b = c["rows"]["default"], c["rows"][c["best_uniform"]]
        mark = "" if verdict(c) else " **worse**"
        lines.append(f"| {c['model']} | {c['seed']} | {c['budget']:.1%} | {d['increase']:+.4f} ± {d['se']:.4f} | "
                     f"{c['best_uniform'][8:]} {b['increase']:+.4f} | {c['default_minus_best']:+.4f} "
                     f"({c['default_minus_best_se']:.4f}){mark} | {c['ratio_to_best']:.2f} | "
                     f"{c['ratio_to_reap']:.2f} | {c['chosen']} | {c['passes']} x {c['search_tokens']:,} + "
                     f"{c['confirmed']} x {c['confirm_tokens']:,} |")
    return "\n".join(lines)


def summary(cells: list[dict]) -> list[str]:
    ok = sum(verdict(c) for c in cells)
    half = [c for c in cells if c["budget"] == 0.5]
    reap = sum(c["ratio_to_reap"] <= 0.8 for c in half)
    best = {}
    for c in half:
        best.setdefault(c["model"], []).append(c["ratio_to_best"] <= 0.9)
    total = len(MODELS) * len(BUDGETS) * 2
    return [f"- no worse than the best uniform plan + 1 SE: **{ok} of {len(cells)}** cells",
            f"- at 50%: at most 0.8x uniform REAP in **{reap} of {len(half)}** cells; at most 0.9x the best "
            f"uniform plan in every measured seed on **{sum(all(v) for v in best.values())} of {len(best)}** models",
            f"- measured: {len(cells)} of {total} cells (5 models x 4 budgets x 2 seeds)" + (
                "" if len(cells) >= total else
                "; the rest is still to run (`python benchmarks/default_quality.py --models M --budgets B "
                "--seeds S` adds cells)")]


def write(cells: list[dict], env: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "default_quality.json", json.dumps({"environment": env, "cells": cells}, indent=1) + "\n")
    text = ["# The default, measured (benchmarks/default_quality.py)", "",
            "`grape run --model M --data grape/assets/heldout/calibration.jsonl --budget B --seed S` with "
            "nothing else: its calibration, held-out search and confirmation documents, passes and solver "
            "limits, through the pipeline's own stages. Test split (deduplicated against calibration), "
            "mean NLL increase over the three domains, standard errors by document. *Best uniform*: the "
            "lowest of the uniform plans under reconstruction, reap_mass, frequency, reap and ean on the "
            "test split itself (chosen after the fact).", "", *summary(cells), "", table(cells), "",
            f"Machine: {env['machine']}; {env['date']}."]
    atomic_write_text(RESULTS / "default_quality.md", "\n".join(text) + "\n")


def load_cells() -> list[dict]:
    path = RESULTS / "default_quality.json"
    return json.loads(path.read_text())["cells"] if path.is_file() else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--tables-only", action="store_true",
                        help="rewrite default_quality.md from default_quality.json, measuring nothing")
    parser.add_argument("--redo", action="store_true",
                        help="measure cells default_quality.json already has again (default: skip them)")
    args = parser.parse_args(argv)
    if args.tables_only:
        stored = json.loads((RESULTS / "default_quality.json").read_text())
        write(stored["cells"], stored["environment"])
        return 0
    import torch

    torch.manual_seed(0)
    env = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d")}
    cells = load_cells()
    with tempfile.TemporaryDirectory(prefix="grape-default-") as tmp:
        for name in args.models:
            for seed in args.seeds:
                done = {c["budget"] for c in cells if (c["model"], c["seed"]) == (name, seed)}
                budgets = [b for b in args.budgets if args.redo or b not in done]
                if not budgets:
                    continue
                log(f"{name} seed {seed}: calibrating (grape run's defaults)")
                start = time.perf_counter()
                loaded = calibrated(name, seed, Path(tmp) / f"{name}-{seed}")
                calibration_seconds = round(time.perf_counter() - start, 1)  # once per model and seed
                test = test_windows(loaded.tokenizer)
                base = test_nll(loaded.model, None, test)
                for budget in budgets:
                    cell = measure_cell(name, budget, seed, loaded, test, base, Path(tmp))
                    cell["calibration_seconds"] = calibration_seconds
                    log(f"{name} seed {seed} {budget:.1%}: default {cell['rows']['default']['increase']:+.4f}, "
                        f"{cell['best_uniform']} {cell['rows'][cell['best_uniform']]['increase']:+.4f}, "
                        f"diff {cell['default_minus_best']:+.4f} ± {cell['default_minus_best_se']:.4f} "
                        f"({cell['search_seconds']:.0f} s)")
                    cells = [c for c in cells if (c["model"], c["seed"], c["budget"]) != (name, seed, budget)]
                    cells.append(cell)
                    write(cells, env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
