"""Would judging the search's finalists *repaired* change what `grape run` applies (issue 27)?

`grape run` chooses its plan on the confirmation documents among the search's finalist and
every uniform seed, each measured plainly pruned (masked routing), and then repairs the plan it
chose. This benchmark takes, per zoo model, budget and calibration seed, the plan `grape run`
chose (benchmarks/results/default_quality.json) and the uniform plan of every criterion from the
same run's scores (the pipeline's own calibration stage), repairs each exactly as `--repair auto`
does (the run's own fitting rows, its check on the confirmation documents), and reports:

* each plan's confirmation NLL plain and repaired (what a repaired judgement would compare),
* the plan a repaired judgement would choose (the lowest confirmation NLL after the check),
* its NLL increase on the whole test split against the applied plan's, both as `grape run`
  keeps them, paired by document.

    python benchmarks/repair_ranking.py [--models M ...] [--budgets 0.5] [--seeds 0 1] [--out DIR]
    python benchmarks/repair_ranking.py --merge A.json B.json ... [--out DIR]

Writes DIR/repair_ranking.json and DIR/repair_ranking.md (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from default_quality import CRITERIA, calibrated, increase, test_nll, test_windows  # noqa: E402
from grape.evaluation.stats import domain_mean_se  # noqa: E402
from grape.outputs import atomic_write_text  # noqa: E402
from repair_bench import default_plan, run_rows  # noqa: E402

MODELS = ("qwen3moe-32x4", "deepseekv3-32x4g", "mixtral-8x2", "mixtral-8x2-upcycled", "olmoe-32x4")
RESULTS = ROOT / "benchmarks" / "results"
MARGIN_SE = 2.0  # SearchConfig.margin_se's default
RIVALS = 2  # RunConfig.repair_rivals's default


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def candidate_plans(name: str, budget: float, seed: int, loaded) -> dict:
    """('default': the plan grape run applied, and 'uniform C' for every criterion the run's
    scores have, a uniform plan equal to one already listed left out; whether the default plan
    is a uniform plan itself)."""
    from dataclasses import replace

    from default_quality import default_config
    from solvers.spec import plan_for

    config, _ = default_config(name, budget, seed, Path("/nonexistent-out"))
    plans = {"default": default_plan(name, budget, seed, loaded.model)}
    uniform_default = False  # the default plan is one of the uniform plans
    for criterion in CRITERIA:
        if loaded.scores.has_criterion(criterion):
            plan = plan_for(loaded.scores, replace(config.solve, solver="uniform", objective="additive",
                                                   criterion=criterion))
            if all(plan.kept != p.kept for p in plans.values()):
                plans[f"uniform {criterion}"] = plan
            elif plan.kept == plans["default"].kept:
                uniform_default = True
    return plans, uniform_default


def measure_plan(base, plan, fit_ids, confirm, test: dict) -> dict:
    """The plan plain and repaired on the confirmation windows, the check's verdict, and the
    test split's per-window NLL of what grape run keeps (repaired, or plain where undone)."""
    from grape.pruning.apply import AUTO_REPAIR, ApplyConfig
    from grape.pruning.repair import prune_and_repair
    from grape.pruning.repair_check import held_out_nll, judge

    plain = held_out_nll(base, confirm.ids, plan)
    model = copy.deepcopy(base)
    start = time.perf_counter()
    prune_and_repair(model, plan, ApplyConfig(repair=AUTO_REPAIR), fit_ids)
    seconds = time.perf_counter() - start
    repaired = held_out_nll(model, confirm.ids)
    check = judge(plain, repaired, confirm.groups, undo=True, tokens=int(confirm.ids.numel()))
    kept_test = test_nll(model, None, test) if check.kept else test_nll(base, plan, test)
    del model
    kept = repaired if check.kept else plain
    return {"confirm_plain": float(plain.mean()), "confirm_repaired": float(repaired.mean()),
            "kept": check.kept, "confirm_kept": float(kept.mean()), "fit_seconds": seconds,
            "confirm_windows": {"plain": plain.tolist(), "kept": kept.tolist()},
            "test": {d: v.tolist() for d, v in kept_test.items()}}


def seed_rule(rows: dict, which: str, groups, uniform_default: bool, rivals: int | None = None) -> str:
    """The search's final rule (grape.searching.algorithm._choose_seed) on the confirmation
    windows, plain or as kept: the best uniform plan is the incumbent; the default plan replaces
    it only when lower by MARGIN_SE paired standard errors (by document). `rivals`: only the
    default and that many other uniform plans, the best on plain confirmation NLL first, take
    part (grape run's --repair-rivals); None: every one."""
    from grape.evaluation.stats import mean_and_se

    values = {r: np.asarray(row["confirm_windows"][which]) for r, row in rows.items()}
    others = sorted((r for r in rows if r != "default"), key=lambda r: rows[r]["confirm_plain"])
    uniform = others[:rivals] + (["default"] if uniform_default else [])
    best = min(uniform, key=lambda r: values[r].mean())
    if best == "default":
        return best
    diff, se = mean_and_se(values["default"] - values[best], groups)
    return "default" if diff < -MARGIN_SE * se and diff < 0 else best


def measure_cell(name: str, budget: float, seed: int, loaded, fit_ids, confirm, test: dict, base_test: dict,
                 base) -> dict:
    plans, uniform_default = candidate_plans(name, budget, seed, loaded)
    rows = {}
    for label, plan in plans.items():
        rows[label] = measure_plan(base, plan, fit_ids, confirm, test)
        inc = increase({d: torch.tensor(v).numpy() for d, v in rows[label]["test"].items()}, base_test, test)
        rows[label]["test_increase"] = list(inc)
        log(f"  {name} {budget} seed {seed} {label}: confirm {rows[label]['confirm_plain']:.4f} -> "
            f"{rows[label]['confirm_repaired']:.4f} ({'kept' if rows[label]['kept'] else 'undone'}), "
            f"test +{inc[0]:.4f} ± {inc[1]:.4f}, fit {rows[label]['fit_seconds']:.0f} s")
    nll = {label: {d: torch.tensor(v).numpy() for d, v in row["test"].items()} for label, row in rows.items()}
    for label, row in rows.items():  # each plan's test NLL minus the default's, paired by document
        row["test_minus_default"] = list(domain_mean_se({d: (nll[label][d] - nll["default"][d], test[d].groups)
                                                         for d in test}))
        del row["test"]
    cell = {"model": name, "budget": budget, "seed": seed, "rows": rows, "uniform_default": uniform_default,
            "confirm_groups": np.asarray(confirm.groups).tolist()}
    return {**cell, **picks(cell)}


def challenge_rule(rows: dict, groups, rivals: int) -> str:
    """grape run's repaired judgement (grape.run_repair.repaired_pick, its own rule): the default
    plan is the incumbent; the best of the `rivals` best other uniform plans on plain
    confirmation NLL, repaired, replaces it only when lower by MARGIN_SE paired standard errors."""
    from grape.run_repair import repaired_pick

    kept = {r: np.asarray(row["confirm_windows"]["kept"]) for r, row in rows.items()}
    pool = sorted((r for r in rows if r != "default"), key=lambda r: rows[r]["confirm_plain"])[:rivals]
    return repaired_pick(kept, "default", pool, groups, MARGIN_SE)[0] if pool else "default"


def picks(cell: dict) -> dict:
    """The plain pick (should be the default), the search's rule replayed on the repaired plans
    (every uniform plan), and grape run's repaired judgement (RIVALS), each with its test NLL
    minus the default's."""
    rows, groups, uniform_default = cell["rows"], np.asarray(cell["confirm_groups"]), cell["uniform_default"]
    out = {"plain_pick": seed_rule(rows, "plain", groups, uniform_default),
           "repaired_pick": seed_rule(rows, "kept", groups, uniform_default),
           "rivals_pick": challenge_rule(rows, groups, RIVALS)}
    for key in ("repaired_pick", "rivals_pick"):
        out[f"{key}_minus_default"] = _minus_default(cell, out[key])
    return out


def _minus_default(cell: dict, pick: str) -> list[float] | None:
    """`pick`'s test NLL minus the default's (paired, SE by document); files written before each
    plan's difference was kept have only the repaired pick's (None for another plan)."""
    if pick == "default":
        return [0.0, 0.0]
    if "test_minus_default" in cell["rows"][pick]:
        return cell["rows"][pick]["test_minus_default"]
    return cell.get("repaired_pick_minus_default") if pick == cell.get("repaired_pick") else None


def run(args) -> list[dict]:
    import grape

    cells = []
    for name in args.models:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as work:
                loaded = calibrated(name, seed, Path(work))
            base = grape.load(ROOT / "benchmarks" / "zoo" / "models" / name, dtype=torch.float32).eval()
            test = test_windows(loaded.tokenizer)
            base_test = test_nll(base, None, test)
            fit_ids, confirm = run_rows(name, seed)
            for budget in args.budgets:
                cells.append(measure_cell(name, budget, seed, loaded, fit_ids, confirm, test, base_test, base))
                save(cells, args.out / f"repair_ranking.{'-'.join(map(str, args.seeds))}.json")
    return cells


def save(cells: list[dict], path: Path) -> None:
    """The cells, each plan's per-window confirmation NLL rounded to 1e-5 nats (the picks are
    recomputed from them by --merge)."""
    for cell in cells:
        for row in cell["rows"].values():
            row["confirm_windows"] = {k: [round(x, 5) for x in v] for k, v in row["confirm_windows"].items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"cells": cells}, separators=(",", ":")) + "\n")


def _diff(value) -> str:
    return f"{value[0]:+.4f} ± {value[1]:.4f}" if value is not None else "n/a"


def render(cells: list[dict]) -> str:
    lines = ["# Judging the finalists repaired: would `grape run` choose another plan?", "",
             "`python benchmarks/repair_ranking.py` (see its docstring). Per cell: the plan `grape run` chose on "
             "plain NLL (*default*, benchmarks/results/default_quality.json) and the uniform plan of every "
             "criterion, each repaired as `--repair auto` does and checked on the run's confirmation documents "
             "(what `grape run` keeps: repaired, or plain where the check undid it). *Pick*: the search's final "
             f"rule (the best uniform plan unless the default is lower by {MARGIN_SE:g} paired SEs) on the "
             "confirmation NLL: plain (as the search judges; it gives the default) and, as kept after repair, "
             "among every uniform plan (*search's rule*); *grape run*: its repaired judgement (`--repair-rivals "
             f"{RIVALS}`): the default stays unless the best of the {RIVALS} best other uniform plans on plain "
             f"confirmation NLL is lower repaired by {MARGIN_SE:g} paired SEs. *Test*: NLL increase on the "
             "whole test split of what `grape run` keeps, mean over domains, SE by document; *- default*: the "
             "pick's test NLL minus the default's, paired by document (negative: judging repaired did better).",
             "",
             "| model | budget | seed | default: confirm plain -> kept | best uniform kept: confirm | pick plain | "
             f"pick repaired, search's rule | pick repaired, grape run | default test | search's rule - default | "
             "grape run - default |",
             "|---|---:|---:|---|---|---|---|---|---:|---:|---:|"]
    for c in sorted(cells, key=lambda c: (c["model"], c["budget"], c["seed"])):
        rows = c["rows"]
        d = rows["default"]
        uniform = [r for r in rows if r != "default"]
        best = min(uniform, key=lambda r: rows[r]["confirm_kept"]) if uniform else None
        lines.append(
            f"| {c['model']} | {c['budget']:.1%} | {c['seed']} | {d['confirm_plain']:.4f} -> {d['confirm_kept']:.4f} | "
            + (f"{best}: {rows[best]['confirm_kept']:.4f}" if best else "-")
            + f" | {c['plain_pick']} | {c['repaired_pick']} | {c['rivals_pick']} | "
            f"+{d['test_increase'][0]:.4f} ± {d['test_increase'][1]:.4f} | "
            f"{_diff(c['repaired_pick_minus_default'])} | {_diff(c['rivals_pick_minus_default'])} |")
    lines.append("")
    for key, what in (("repaired_pick", "by the search's rule"), ("rivals_pick", "as grape run makes it")):
        changed = [c for c in cells if c[key] != "default"]
        diffs = [c[f"{key}_minus_default"] for c in changed]
        better = sum(1 for v in diffs if v is not None and v[0] + v[1] < 0)
        worse = sum(1 for v in diffs if v is not None and v[0] - v[1] > 0)
        lines.append(f"- repaired judgement {what}: another plan than the default in {len(changed)} of "
                     f"{len(cells)} cells; lower on the test split beyond one SE in {better}, higher beyond one "
                     f"SE in {worse}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--merge", nargs="+", type=Path, help="only combine these partial json files")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.merge:
        cells = [c for f in args.merge for c in json.loads(f.read_text())["cells"]]
        cells = [{**c, **picks(c)} for c in cells]
    else:
        torch.manual_seed(0)
        cells = run(args)
    save(cells, args.out / "repair_ranking.json")
    env = (f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, one "
           f"thread per run; {time.strftime('%Y-%m-%d')}.")
    atomic_write_text(args.out / "repair_ranking.md", render(cells) + "\n" + env + "\n")
    log(f"wrote {args.out / 'repair_ranking.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
