"""Reports: markdown tables and PNG plots of a pruning run or a solver comparison.

Plots are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch), so making a report never touches a notebook's or a GUI's matplotlib state.

* experts kept per layer: one bar group per MoE layer, one bar per plan;
* NLL before / after per domain: absolute NLL and the increase over the unpruned model;
* solver table: each solver's objective relative to the best plan found for that objective;
* memory per device (under a memory cap): routed experts, other parts and KV cache against the cap.

Nothing here imports torch; evaluation results are read through their attributes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grape.report.scoreplots import new_figure, plot_scores, save_figure
from solvers._io import atomic_write_text
from solvers.plan import Plan

PLOT_KEPT = "experts_per_layer.png"
PLOT_NLL = "nll_per_domain.png"
PLOT_SOLVERS = "solvers.png"
PLOT_MEMORY = "memory_per_device.png"


# -- solver comparison rows ------------------------------------------------------------------
@dataclass
class SolverRow:
    """One solver on one objective: the plan it found, or why it found none."""

    objective: str
    solver: str
    status: str = ""
    value: float | None = None  # objective of the plan (recomputed, lower is better)
    bound: float | None = None  # proven lower bound, when the solver gives one
    gap: float | None = None
    seconds: float = 0.0
    kept_min: int | None = None  # fewest / most experts kept in one layer
    kept_max: int | None = None
    uniform: bool | None = None
    error: str | None = None
    excess: float | None = None  # value / best value for this objective - 1
    kept_per_layer: dict[str, int] | None = None  # decoder-layer index -> experts the plan keeps

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fill_excess(rows: Sequence[SolverRow]) -> None:
    """Set each row's excess over the best plan found for its objective."""
    best: dict[str, float] = {}
    for r in rows:
        if r.value is not None:
            best[r.objective] = min(best.get(r.objective, math.inf), r.value)
    for r in rows:
        if r.value is None:
            continue
        b = best[r.objective]
        r.excess = 0.0 if r.value == b else (r.value - b) / max(abs(b), 1e-12)


def _num(x: float | None, digits: int = 6) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def solver_table(rows: Sequence[SolverRow]) -> str:
    """Markdown table of a comparison, one row per (objective, solver)."""
    lines = [("| objective | solver | status | objective value | vs best | lower bound | gap | "
              "seconds | kept per layer |"),
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.objective} | {r.solver} | n/a | - | - | - | - | {r.seconds:.2f} | "
                         f"{_escape(r.error)} |")
            continue
        excess = "best" if r.excess == 0 else (f"+{100 * r.excess:.2f}%" if r.excess is not None else "-")
        gap = "-" if r.gap is None else f"{100 * r.gap:.2f}%"
        kept = f"{r.kept_min}" if r.kept_min == r.kept_max else f"{r.kept_min}..{r.kept_max}"
        lines.append(f"| {r.objective} | {r.solver} | {r.status} | {_num(r.value)} | {excess} | "
                     f"{_num(r.bound)} | {gap} | {r.seconds:.2f} | {kept} |")
    return "\n".join(lines)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# -- plans -----------------------------------------------------------------------------------
def kept_table(plans: Mapping[str, Plan], original: Mapping[int, int]) -> str:
    """Markdown: experts kept per MoE layer under each plan."""
    names = list(plans)
    lines = ["| layer | experts | " + " | ".join(f"kept ({n})" for n in names) + " |",
             "|---:|---:|" + "---:|" * len(names)]
    for layer in sorted(original):
        cells = [str(plans[n].kept_counts().get(layer, "-")) for n in names]
        lines.append(f"| {layer} | {original[layer]} | " + " | ".join(cells) + " |")
    totals = [str(plans[n].num_kept) for n in names]
    lines.append(f"| **total** | {sum(original.values())} | " + " | ".join(totals) + " |")
    return "\n".join(lines)


# -- memory per device -----------------------------------------------------------------------
_GIB = 2**30


def plan_placement(plan: Plan, scores: Any, config: Any) -> list[dict]:
    """The plan's per-device table: its own (a solver's plan), or recomputed under `config`'s
    memory cap (a searched plan carries none); [] without a memory cap."""
    if plan.placement:
        return plan.placement
    if scores is None or config is None or (config.fit is None and config.memory_cap is None):
        return []
    from solvers.constraints import MemoryCap, kept_mask
    from solvers.spec import build_problem

    problem = build_problem(scores, config)
    caps = [c for c in problem.constraints if isinstance(c, MemoryCap)]
    masks = [kept_mask(plan, problem, p) for p in range(len(problem.layers))]
    return caps[0].placement_table(problem, masks)


def _parts(row: Mapping[str, Any]) -> tuple[int, int, int]:
    """(experts, other, kv) of a placement row; a row from before the breakdown is experts only."""
    return int(row.get("experts", row["bytes"])), int(row.get("other", 0)), int(row.get("kv", 0))


def placement_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: what each device holds against its cap."""
    from solvers.constraints.units import format_bytes

    lines = ["| device | layers | routed experts | other parts | KV cache | total | cap | used |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        layers = row["layers"]
        span = (f"{layers[0]}-{layers[-1]}" if layers else "-") + f" ({len(layers)})"
        cells = [format_bytes(v) for v in (*_parts(row), row["bytes"], row["cap"])]
        used = f"{100 * row['bytes'] / row['cap']:.1f}%" if row["cap"] else "-"
        lines.append(f"| {row['device']} | {span} | " + " | ".join(cells) + f" | {used} |")
    return "\n".join(lines)


def plot_placement(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Stacked bars per device (routed experts, other parts, KV cache) against its cap."""
    fig = new_figure(max(4.5, 0.9 * len(rows) + 2.5), 3.4)
    ax = fig.add_subplot()
    xs = list(range(len(rows)))
    parts = [[v / _GIB for v in _parts(row)] for row in rows]
    bottom = [0.0] * len(rows)
    for i, label in enumerate(("routed experts", "other parts", "KV cache")):
        heights = [p[i] for p in parts]
        if i == 0 or any(heights):
            ax.bar(xs, heights, bottom=bottom, width=0.6, label=label, color=f"C{i}")
            bottom = [b + h for b, h in zip(bottom, heights)]
    caps = [row["cap"] / _GIB for row in rows]
    ax.hlines(caps, [x - 0.4 for x in xs], [x + 0.4 for x in xs], color="black", linewidth=1.5,
              label="cap")
    ax.set_xticks(xs, [str(row["device"]) for row in rows])
    ax.set_ylim(0, max(caps + bottom) * 1.3)
    ax.set_xlabel("device")
    ax.set_ylabel("GiB")
    ax.set_title("Memory per device against its cap")
    ax.legend(fontsize="small", loc="upper right", ncol=4)
    return save_figure(fig, path)


# -- evaluation ------------------------------------------------------------------------------
def nll_table(base: Any, pruned: Mapping[str, Any]) -> str:
    """Markdown: NLL per domain of the unpruned model (`base`, an EvalResult) and each pruned
    one, with the increase over the base."""
    domains = list(base.domains)
    names = list(pruned)
    head = "| domain | NLL before | " + " | ".join(f"NLL {n} | increase {n}" for n in names) + " |"
    rule = "|---|---:|" + "---:|---:|" * len(names)
    lines = [head, rule]
    rows = [(d, base.domains[d].nll, {n: pruned[n].domains[d].nll for n in names if d in pruned[n].domains})
            for d in domains]
    rows.append(("**mean over domains**", base.mean_nll, {n: pruned[n].mean_nll for n in names}))
    for name, before, after in rows:
        cells = []
        for n in names:
            if n in after:
                cells += [f"{after[n]:.4f}", f"{after[n] - before:+.4f}"]
            else:
                cells += ["-", "-"]
        lines.append(f"| {name} | {before:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- plots -----------------------------------------------------------------------------------
def plot_kept_per_layer(plans: Mapping[str, Plan], original: Mapping[int, int],
                        path: str | os.PathLike) -> Path:
    layers = sorted(original)
    names = list(plans)
    fig = new_figure(max(6.0, 0.5 * len(layers) * max(1, len(names)) + 2), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        counts = plans[name].kept_counts()
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(layers))]
        ax.bar(xs, [counts.get(l, 0) for l in layers], width=width, label=name, color=f"C{i}")
    ax.set_ylim(0, max(original.values()) * 1.3)
    ax.step([j - 0.5 for j in range(len(layers) + 1)],
            [original[l] for l in layers] + [original[layers[-1]]], where="post",
            color="black", linewidth=1, label="before pruning")
    ax.set_xticks(range(len(layers)), [str(l) for l in layers])
    ax.set_xlabel("MoE layer (decoder index)")
    ax.set_ylabel("experts kept")
    ax.set_title("Experts kept per layer")
    ax.legend(fontsize="small", loc="upper right", ncol=len(names) + 1)
    return save_figure(fig, path)


def plot_nll(base: Any, pruned: Mapping[str, Any], path: str | os.PathLike) -> Path:
    domains = list(base.domains)
    names = list(pruned)
    fig = new_figure(max(7.0, 1.6 * len(domains) + 3), 3.6)
    left, right = fig.subplots(1, 2)
    series = [("before", base)] + [(n, pruned[n]) for n in names]
    width = 0.8 / len(series)
    for i, (name, result) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(domains))]
        left.bar(xs, [result.domains[d].nll if d in result.domains else 0 for d in domains],
                 width=width, label=name, color="0.6" if i == 0 else f"C{i - 1}")
    left.set_xticks(range(len(domains)), domains)
    left.set_ylabel("NLL (nats / token)")
    left.set_title("Held-out NLL per domain")
    left.set_ylim(0, max(r.nll for _, res in series for r in res.domains.values()) * 1.25)
    left.legend(fontsize="small", loc="upper right", ncol=len(series))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(domains))]
        right.bar(xs, [pruned[name].domains[d].nll - base.domains[d].nll
                       if d in pruned[name].domains else 0 for d in domains],
                  width=width, label=name, color=f"C{i}")
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xticks(range(len(domains)), domains)
    right.set_ylabel("NLL increase over before")
    right.set_title("Cost of pruning (lower is better)")
    if names:
        right.legend(fontsize="small")
    return save_figure(fig, path)


def plot_solvers(rows: Sequence[SolverRow], path: str | os.PathLike) -> Path:
    """One panel per objective: each solver's excess over the best plan found (%)."""
    objectives = list(dict.fromkeys(r.objective for r in rows))
    fig = new_figure(max(6.5, 4.0 * len(objectives)), 0.35 * max(len([r for r in rows if r.objective == o])
                                                               for o in objectives) + 1.6)
    axes = fig.subplots(1, len(objectives), squeeze=False)[0]
    for ax, objective in zip(axes, objectives):
        mine = [r for r in rows if r.objective == objective]
        labels = [r.solver for r in mine]
        values = [100 * r.excess if r.excess is not None else 0.0 for r in mine]
        ax.barh(range(len(mine)), values, color="C0")
        for y, r in enumerate(mine):
            if r.error:
                note = "n/a"
            elif r.excess == 0:
                note = "best, proven optimal" if r.status == "optimal" else "best"
            else:
                note = f"+{100 * r.excess:.2f}%" + (" (time limit)" if r.status == "time_limit" else "")
            ax.annotate(note, (values[y], y), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize="x-small")
        ax.set_yticks(range(len(mine)), labels)
        ax.invert_yaxis()
        ax.set_xlabel("objective above the best plan (%)")
        ax.set_title(objective, fontsize="medium")
        top = max(values + [1e-3])
        if top > 50:  # one far-off plan would flatten the rest: log scale past 1%
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(0, top * 4)
        else:
            ax.set_xlim(0, top * 1.35)
    fig.suptitle("Each solver's plan above the best plan found (lower is better)", fontsize="medium")
    return save_figure(fig, path)


def plot_kept_by_solver(rows: Sequence[SolverRow], path: str | os.PathLike) -> Path:
    """Side by side, one panel per objective: experts kept per layer (columns) by each solver's
    plan (rows), so allocations can be compared at a glance."""
    objectives = [o for o in dict.fromkeys(r.objective for r in rows)
                  if any(r.objective == o and r.kept_per_layer for r in rows)]
    layers = sorted({int(k) for r in rows if r.kept_per_layer for k in r.kept_per_layer})
    solvers = max(len([r for r in rows if r.objective == o and r.kept_per_layer]) for o in objectives)
    fig = new_figure(min(24.0, 1.5 + len(objectives) * (1.5 + 0.28 * len(layers))), 1.4 + 0.32 * solvers)
    axes = fig.subplots(1, len(objectives), squeeze=False, sharey=False)[0]
    top = max(v for r in rows if r.kept_per_layer for v in r.kept_per_layer.values())
    image = None
    for ax, objective in zip(axes, objectives):
        mine = [r for r in rows if r.objective == objective and r.kept_per_layer]
        grid = [[r.kept_per_layer.get(str(layer), 0) for layer in layers] for r in mine]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
        if len(layers) * len(mine) <= 400:  # numbers only where they stay legible
            for y, row in enumerate(grid):
                for x, value in enumerate(row):
                    ax.text(x, y, str(value), ha="center", va="center", fontsize="x-small",
                            color="white" if value < 0.6 * top else "black")
        step = max(1, len(layers) // 16)
        ax.set_xticks(range(0, len(layers), step), [str(l) for l in layers[::step]])
        ax.set_yticks(range(len(mine)), [r.solver for r in mine])
        ax.set_xlabel("MoE layer (decoder index)")
        ax.set_title(objective, fontsize="medium")
    fig.colorbar(image, ax=list(axes), label="experts kept")
    fig.suptitle("Experts kept per layer by each solver's plan", fontsize="medium")
    return save_figure(fig, path)


# -- the run report --------------------------------------------------------------------------
SCORE_PICTURES = (
    ("importance", "expert importance per layer",
     "Each expert's importance relative to its layer's mean (log scale; blank: never routed)."),
    ("similarity", "expert similarity per layer",
     "Each layer's expert similarity matrix: bright blocks are near-duplicate experts."),
    ("cost_curves", "layer cost curves",
     "Measured block-output error of keeping fewer experts, per layer: flat curves tolerate cuts."),
)


def _score_pictures(plots: Mapping[str, str]) -> list[str]:
    """The report section showing what calibration measured (grape.report.scoreplots)."""
    shown = [(key, alt, caption) for key, alt, caption in SCORE_PICTURES if key in plots]
    if not shown:
        return []
    lines = ["## What calibration measured", ""]
    for key, alt, caption in shown:
        lines += [caption, "", f"![{alt}]({plots[key]})", ""]
    return lines


@dataclass
class RunReport:
    """Everything `grape run` shows; `write` turns it into report.md plus plots."""

    model: str
    budget: str
    objective: str
    solver: str
    method: str
    original: dict[int, int]  # experts per MoE layer before pruning
    plans: dict[str, Plan]  # the chosen plan first, then the baselines
    base_eval: Any = None  # EvalResult of the unpruned model
    evals: dict[str, Any] = field(default_factory=dict)  # plan name -> EvalResult
    solver_rows: list[SolverRow] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # what -> path relative to the report
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> wall seconds
    notes: list[str] = field(default_factory=list)
    scores: Any = None  # the Scores the plans came from: its pictures go into the report
    placement: list[dict] = field(default_factory=list)  # the chosen plan's per-device table

    def write(self, out_dir: str | os.PathLike, name: str = "report.md") -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = {}
        if self.scores is not None:
            plots.update({k: p.name for k, p in plot_scores(self.scores, out_dir).items()})
        if self.plans:
            plots["kept"] = plot_kept_per_layer(self.plans, self.original, out_dir / PLOT_KEPT).name
        if self.base_eval is not None and self.evals:
            plots["nll"] = plot_nll(self.base_eval, self.evals, out_dir / PLOT_NLL).name
        if self.solver_rows:
            plots["solvers"] = plot_solvers(self.solver_rows, out_dir / PLOT_SOLVERS).name
        if self.placement:
            plots["memory"] = plot_placement(self.placement, out_dir / PLOT_MEMORY).name
        path = out_dir / name
        atomic_write_text(path, self.markdown(plots))
        return path

    def markdown(self, plots: Mapping[str, str] | None = None) -> str:
        plots = plots or {}
        main = next(iter(self.plans), None)
        total = sum(self.original.values())
        lines = [f"# GRAPE run: `{self.model}`", ""]
        if main is not None:
            plan = self.plans[main]
            lines += [
                f"Removed **{plan.num_removed} of {total}** routed experts "
                f"({100 * plan.num_removed / max(total, 1):.1f}%) with objective `{self.objective}`, "
                f"solver `{self.solver}` ({plan.status}"
                + (f", gap {100 * plan.gap:.2f}%" if plan.gap is not None else "")
                + f"), method `{self.method}`; budget `{self.budget}`. The plan keeps "
                + ("the same count in every layer (loads in vanilla transformers and vLLM)."
                   if plan.is_uniform else "different counts per layer (reload with "
                   "`grape.load` or `trust_remote_code=True`)."),
                "",
            ]
        if self.base_eval is not None and self.evals:
            lines += ["## Held-out NLL before and after", "", nll_table(self.base_eval, self.evals), ""]
            ev = self.base_eval.config
            cap = "all" if ev.max_tokens_per_domain is None else f"{ev.max_tokens_per_domain:,}"
            lines += [(f"NLL in nats per token on windows of {ev.seq_len} tokens, at most {cap} "
                       "predicted tokens per domain; lower is better."), ""]
            if "nll" in plots:
                lines += [f"![NLL per domain]({plots['nll']})", ""]
        if self.plans:
            lines += ["## Experts kept per layer", "", kept_table(self.plans, self.original), ""]
            if "kept" in plots:
                lines += [f"![experts kept per layer]({plots['kept']})", ""]
        lines += self._memory_section(plots)
        if self.solver_rows:
            lines += ["## Solvers on these scores", "",
                      ("Every solver on the same problem (budget, objective, constraints); objective "
                       "values are recomputed from the plans, lower is better; the lower bound is "
                       "proven where given."), "", solver_table(self.solver_rows), ""]
            if "solvers" in plots:
                lines += [f"![solver comparison]({plots['solvers']})", ""]
        if self.calibration:
            keys = ("tokens", "samples", "seq_len", "subsample", "similarity", "criterion", "sources")
            cal = ", ".join(f"{k} {self.calibration[k]}" for k in keys if k in self.calibration)
            lines += ["## Calibration", "", cal, ""]
        lines += _score_pictures(plots)
        if self.notes:
            lines += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        if self.files:
            lines += ["## Files", "", "| what | path |", "|---|---|",
                      *[f"| {k} | `{v}` |" for k, v in self.files.items()], ""]
        if self.seconds:
            lines += ["## Time", "", "| stage | seconds |", "|---|---:|",
                      *[f"| {k} | {v:.1f} |" for k, v in self.seconds.items()], ""]
        return "\n".join(lines)

    def _memory_section(self, plots: Mapping[str, str]) -> list[str]:
        if not self.placement:
            return []
        main = next(iter(self.plans), None)
        sizes = self.plans[main].provenance.get("sizes") if main is not None else None
        lines = ["## Memory per device", "",
                 ("What each device holds under the memory cap (`--fit` / `--memory-cap`): its kept "
                  "routed experts, the other parts of its layers (attention, norms, router, shared "
                  "experts; the embeddings and head where they live) and its KV cache"
                  + (f"; sizes {sizes}." if sizes else ".")), "", placement_table(self.placement), ""]
        if "memory" in plots:
            lines += [f"![memory per device]({plots['memory']})", ""]
        return lines


__all__ = [
    "RunReport",
    "SolverRow",
    "fill_excess",
    "kept_table",
    "nll_table",
    "placement_table",
    "plan_placement",
    "plot_kept_by_solver",
    "plot_kept_per_layer",
    "plot_nll",
    "plot_placement",
    "plot_solvers",
    "solver_table",
]
