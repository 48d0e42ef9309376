"""The quality benchmark's report: verdicts, tables and plots rendered from quality.json
(benchmarks/quality.py writes the numbers; everything here only reads them)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from provenance import describe
from quality_methods import METHODS, PROBES, Row, paired_difference
from quality_setup import Settings

from grape.outputs import atomic_write_text


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


# -- report ---------------------------------------------------------------------------------------
def mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(v: float | None, spec: str = "+.4f") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _versus(a: Row, b: Row, documents: dict | None) -> str:
    """'beats' / 'loses to' / 'ties with' b, by the paired difference and twice its error."""
    diff, se = paired_difference(a, b, documents)
    if se is not None and abs(diff) <= 2 * se:  # equal plans give 0 <= 0: a tie
        word = "ties with"
    else:
        word = "beats" if diff < 0 else "loses to"
    err = "" if se is None else f" ± {se:.4f}"
    return f"{word} uniform REAP ({diff:+.4f}{err} nats)"


def verdicts(model: dict, budgets) -> list[str]:
    """Plain statements, generated from the numbers: who wins where. A difference counts only
    when it exceeds twice its paired standard error (by document where quality.json has each
    window's document)."""
    rows = [Row.from_json(r) for r in model["rows"] if r["calibration"] == "mixed"]
    documents = model.get("window_documents")
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
            line += f". Best global allocation `{g.method}` {_versus(g, reap, documents)}"
        exact = [r for r in table if r.solver == "exact"]
        if exact:
            e = min(exact, key=lambda r: r.mean_increase)
            line += f"; best exact integer program `{e.method}` {_versus(e, reap, documents)}"
        probes = [r for r in at if r.method not in main]
        if probes:
            p = min(probes, key=lambda r: r.mean_increase)
            line += f". Best probe `{p.method}` {_versus(p, reap, documents)}"
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
            diff, se = paired_difference(best, reap, model.get("window_documents"))
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
        diff, se = paired_difference(default, best, model.get("window_documents"))
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
               "the unpruned model; ± is the paired standard error by document (the windows of one "
               "document are one unit, grape.evaluation.stats). "
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
                 f"{mean_or_none(model['baseline_tasks'].values()):.3f}." if model["baseline_tasks"] else ""),
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
                cells.append(_fmt(mean_or_none(r.tasks.values()), ".3f") if r.tasks else "")
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
    note = ("Local lm-eval tasks (grape.evaluation.perplexity, `tasks=('local',)`: multiple-choice tasks built "
            "from the held-out test documents, run in-process and offline) are scored only on "
            + ("every row." if settings.lmeval == "all" else
               "the rows with a value in the `lm-eval acc` column: on this CPU one lm-eval pass "
               "takes about as long as ten NLL evaluations, so the fast mode scores a few "
               "methods at 50% on the first model; `--full` scores every row with 100 examples "
               "per task."))
    note += (" With few examples per task the accuracy has a standard error of several points, so "
             "NLL is the primary measure here.")
    return note + (f" Seconds per lm-eval pass: {mean_or_none(seconds):.0f}." if seconds else "")


def write_report(data: dict, settings: Settings, out_dir: Path) -> None:
    data["lmeval_note"] = lmeval_note(settings, data)
    atomic_write_text(out_dir / "quality.json", json.dumps(data, indent=1) + "\n")
    for model in data["models"]:
        plot(model, list(settings.budgets), out_dir)
    atomic_write_text(out_dir / "quality.md", render_markdown(data) + "\n")

