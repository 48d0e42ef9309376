"""`grape inspect` for what the composite verbs write: a run (its folder or summary.json), a
comparison (its folder or compare.json), a resolved recipe, the JSON settings files beside outputs (eval_config.json,
grape_provenance.json) and the markdown reports.

Each kind has a summarize function (a JSON-able dict with "kind") and a render function (text
lines); grape.report.inspect dispatches to them (and summarizes a folder of plans or eval results, a
run's plans/ and eval/, itself). Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RUN_FORMAT = "grape.run-summary"  # "format" of a run's summary.json
COMPARE_FORMAT = "grape.compare"  # "format" of a comparison's compare.json
RUN_FILES = ("report.md", "scores.npz", "plan.json", "checkpoint", "eval", "plans", "summary.json",
             "run.recipe.yaml", "experts_per_layer.png", "nll_per_domain.png", "solvers.png",
             "importance.png", "similarity.png", "cost_curves.png")


# -- recognising ------------------------------------------------------------------------------
def is_run_summary(data: Any) -> bool:
    """summary.json of `grape run` (files written before it carried a format have its keys)."""
    return isinstance(data, dict) and (data.get("format") == RUN_FORMAT
                                       or {"plans", "nll", "solve_config"} <= set(data))


def is_compare(data: Any) -> bool:
    return isinstance(data, dict) and (data.get("format") == COMPARE_FORMAT
                                       or {"rows", "scores_fingerprint"} <= set(data))


def settings_kind(name: str, data: Any) -> str | None:
    """The JSON settings files GRAPE writes beside its outputs, by name and content."""
    if not isinstance(data, dict):
        return None
    if name == "eval_config.json" or {"eval", "data", "device"} <= set(data):
        return "evaluation settings (grape eval)"
    if name == "grape_provenance.json" or {"source_model", "grape_version"} <= set(data):
        return "checkpoint provenance"
    return None


def is_resolved_recipe(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().startswith("# resolved configuration of `grape ")
    except (OSError, UnicodeDecodeError):
        return False


# -- summaries --------------------------------------------------------------------------------
def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def summarize_run(path: Path) -> dict[str, Any]:
    """A run folder or its summary.json: the headline numbers and the files beside them."""
    folder = path if path.is_dir() else path.parent
    data = _load(folder / "summary.json" if path.is_dir() else path)
    present = [name + ("/" if (folder / name).is_dir() else "") for name in RUN_FILES
               if (folder / name).exists()]
    return {"kind": "run", "path": str(path), "folder": str(folder), "summary": data, "files": present}


def summarize_compare(path: Path) -> dict[str, Any]:
    folder = path if path.is_dir() else path.parent
    data = _load(folder / "compare.json" if path.is_dir() else path)
    return {"kind": "compare", "path": str(path), "scores": data.get("scores"),
            "scores_fingerprint": data.get("scores_fingerprint"), "config": data.get("config", {}),
            "rows": data.get("rows", []),
            "pictures": [p.name for p in sorted(folder.glob("*.png"))]}


def summarize_recipe(path: Path) -> dict[str, Any]:
    from grape.recipe import load_recipe

    data = load_recipe(path)
    verbs = [k for k, v in data.items() if isinstance(v, dict)]
    return {"kind": "recipe", "path": str(path), "verbs": verbs,
            "options": {k: v for k, v in data.items() if not isinstance(v, dict)},
            "sections": {k: data[k] for k in verbs}}


def summarize_settings(path: Path, what: str) -> dict[str, Any]:
    return {"kind": "settings", "path": str(path), "what": what, "values": _load(path)}


def summarize_markdown(path: Path) -> dict[str, Any]:
    return {"kind": "markdown", "path": str(path), "text": path.read_text(encoding="utf-8")}


# -- text -------------------------------------------------------------------------------------
def render_run(s: dict[str, Any]) -> list[str]:
    d = s["summary"]
    lines = [f"run {s['folder']}",
             (f"  model {d.get('model')}; {d.get('experts')} routed experts; budget {d.get('budget')}, "
              f"objective {d.get('objective')}, solver {d.get('solver')}, method {d.get('method')}"),
             "", "| plan | status | removed | same count per layer | kept per layer |",
             "|---|---|---:|---|---|"]
    for name, p in d.get("plans", {}).items():
        kept = " ".join(str(v) for v in p.get("kept_per_layer", {}).values())
        lines.append(f"| {name} | {p.get('status')} | {p.get('removed')} | "
                     f"{'yes' if p.get('uniform') else 'no'} | {kept} |")
    lines += _nll_lines(d.get("nll", {}))
    if s["files"]:
        lines += ["", "files: " + ", ".join(s["files"])]
    return lines


def _nll_lines(nll: dict[str, dict[str, float]]) -> list[str]:
    """Held-out NLL per domain: the unpruned model, then each plan with its increase."""
    if "unpruned" not in nll:
        return []
    base = nll["unpruned"]
    names = [n for n in nll if n != "unpruned"]
    lines = ["", "| domain | unpruned | " + " | ".join(f"{n} (increase)" for n in names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for domain, before in base.items():
        cells = [f"{nll[n][domain]:.4f} ({nll[n][domain] - before:+.4f})" if domain in nll[n] else "-"
                 for n in names]
        label = "**mean over domains**" if domain == "mean" else domain
        lines.append(f"| {label} | {before:.4f} | " + " | ".join(cells) + " |")
    return lines


def render_compare(s: dict[str, Any]) -> list[str]:
    from dataclasses import fields

    from grape.report.tables import SolverRow, solver_table

    known = {f.name for f in fields(SolverRow)}
    rows = [SolverRow(**{k: v for k, v in r.items() if k in known}) for r in s["rows"]]
    config = s["config"]
    lines = [f"comparison {s['path']}",
             (f"  scores {s['scores']} (statistics {s['scores_fingerprint']}); budget "
              f"{config.get('budget')}, criterion {config.get('criterion')}, time limit "
              f"{config.get('time_limit')} s"), "", solver_table(rows)]
    if s["pictures"]:
        lines += ["", "pictures: " + ", ".join(s["pictures"])]
    return lines


def render_recipe(s: dict[str, Any]) -> list[str]:
    lines = [f"recipe {s['path']}" + (f" (sections: {', '.join(s['verbs'])})" if s["verbs"] else "")]
    lines += [f"  {k}: {v}" for k, v in s["options"].items()]
    for verb, options in s["sections"].items():
        set_ = {k: v for k, v in options.items() if v not in (None, False, [])}
        lines += [f"  {verb}:"] + [f"    {k}: {v}" for k, v in set_.items()]
    return lines


def render_settings(s: dict[str, Any]) -> list[str]:
    lines = [f"{s['what']} {s['path']}"]
    for key, value in s["values"].items():
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        lines.append(f"  {key}: {text if len(text) <= 160 else text[:157] + '...'}")
    return lines


def render_markdown(s: dict[str, Any]) -> list[str]:
    return [s["text"].rstrip("\n")]


RENDER = {"run": render_run, "compare": render_compare, "recipe": render_recipe,
          "settings": render_settings, "markdown": render_markdown}

__all__ = ["COMPARE_FORMAT", "RENDER", "RUN_FORMAT", "is_compare", "is_resolved_recipe",
           "is_run_summary", "settings_kind", "summarize_compare", "summarize_markdown",
           "summarize_recipe", "summarize_run", "summarize_settings"]
