"""Summaries of every file GRAPE writes, for `grape inspect` and the Python API:

    summary = inspect_path("scores.npz")     # a dict; render(summary) is the text `grape inspect` prints

Scores files, plans, eval results and checkpoint directories are recognised by their content;
runs, comparisons, recipes and settings files are in grape.report.inspect_runs; a folder of plans or
eval results (a run's plans/ and eval/) is summarized here, one headline per file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from grape.report.inspect_runs import (
    RENDER,
    is_compare,
    is_run_summary,
    settings_kind,
    summarize_compare,
    summarize_markdown,
    summarize_recipe,
    summarize_run,
    summarize_settings,
)
from solvers.errors import UserError
from solvers.inputfiles import input_kind, read_input, require_regular


class InspectError(UserError):
    """A path that is none of the things `grape inspect` summarises."""


ACCEPTED = ("a scores file, a plan, an eval result, a run or comparison (folder, summary.json or "
            "compare.json), a resolved recipe or a checkpoint directory")


def detect(path: Path) -> str:
    """What `path` holds: 'scores', 'plan', 'eval', 'checkpoint', 'run', 'compare', 'folder' (of
    plans or eval results), 'recipe', 'settings' or 'markdown'; InspectError otherwise."""
    if not path.exists():
        raise InspectError(f"{str(path)!r} does not exist; pass {ACCEPTED}")
    if path.is_dir():
        return _detect_dir(path)
    # a device (/dev/zero) would be read forever; a pipe only once (see readable_once)
    require_regular(path, "file GRAPE wrote", InspectError)
    if zipfile.is_zipfile(path):
        return "scores"
    if path.suffix.lower() == ".png":
        raise InspectError(f"{str(path)!r} is a picture; open it in an image viewer")
    if path.suffix.lower() == ".md":
        return "markdown"
    if path.suffix.lower() in (".yaml", ".yml", ".toml"):
        return "recipe"
    return _detect_json(path, _read_json(path))


def _detect_dir(path: Path) -> str:
    for marker, kind in (("config.json", "checkpoint"), ("summary.json", "run"),
                         ("compare.json", "compare"), ("eval.json", "eval")):
        if (path / marker).is_file():
            return kind
    if folder_kind(path):
        return "folder"
    raise InspectError(f"{str(path)!r} is a directory GRAPE did not write (no config.json, "
                       f"summary.json, compare.json, eval.json, plans or eval results); pass {ACCEPTED}")


def _detect_json(path: Path, data: Any) -> str:
    if isinstance(data, dict):
        fmt = data.get("format")
        if fmt == "grape.plan" or (fmt is None and "kept" in data and "removed" in data):
            return "plan"
        if fmt == "grape-eval":
            return "eval"
    if is_run_summary(data):
        return "run"
    if is_compare(data):
        return "compare"
    if settings_kind(path.name, data):
        return "settings"
    raise InspectError(f"{str(path)!r} is not a file GRAPE wrote (unrecognised content); pass "
                       f"{ACCEPTED}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InspectError(f"{str(path)!r} is neither a scores file (.npz) nor JSON (a plan or an "
                           "eval result)") from None
    except OSError as exc:
        raise InspectError(f"cannot read {str(path)!r}: {exc.strerror}") from None


# -- summaries ------------------------------------------------------------------------------
def summarize_scores(path: Path, criterion: str | None = None) -> dict[str, Any]:
    from solvers.scores import CRITERIA, Scores

    scores = Scores.load(path)
    criterion = criterion or scores.calibration.get("criterion") or "reap_mass"
    importance = scores.importance(criterion)
    layers = []
    for idx, ls in sorted(scores.layers.items()):
        values = importance[idx]
        layers.append({
            "layer": idx,
            "experts": ls.num_experts,
            "top_k": scores.model.top_k.get(idx),
            "never_routed": int((ls.stats["count"] == 0).sum()),
            f"{criterion}_min": float(values.min()),
            f"{criterion}_median": float(np.median(values)),
            f"{criterion}_max": float(values.max()),
            "output_energy": float(ls.output_energy),
            "similarity": sorted(ls.similarity),
            "cost_curve": ls.cost_curve is not None,
        })
    cal = scores.calibration
    return {
        "kind": "scores",
        "path": str(path),
        "model": scores.model.to_json(),
        "tokens": scores.tokens,
        "created_by": scores.created_by,
        "fingerprint": scores.fingerprint(),
        "criterion": criterion,
        "criteria": [c for c in CRITERIA if scores.has_criterion(c)],  # what --criterion may name
        "calibration": {k: cal[k] for k in ("sources", "samples", "seq_len", "subsample", "seed",
                                             "dtype", "model_path", "synthetic", "shape") if k in cal},
        "total_experts": sum(scores.model.experts_per_layer.values()),
        "expert_bytes": int(sum(int(ls.expert_bytes.sum()) for ls in scores.layers.values())),
        "other_bytes": None if scores.sizes is None else scores.sizes.other_bytes(),
        "sizes": ("routed experts only, at the calibration dtype (scores format version 1)"
                  if scores.sizes is None else scores.sizes.describe()),
        "layers": layers,
    }


def summarize_plan(path: Path) -> dict[str, Any]:
    from solvers.plan import Plan

    plan = Plan.load(path)
    return _plan_summary(plan, str(path))


def _plan_summary(plan, where: str) -> dict[str, Any]:
    prov = plan.provenance
    counts = plan.kept_counts()
    total = plan.num_kept + plan.num_removed
    return {
        "kind": "plan",
        "path": where,
        "solver": plan.solver,
        "status": plan.status,
        "objective_value": None if plan.objective != plan.objective else plan.objective,
        "bound": plan.bound,
        "gap": plan.gap,
        "seconds": plan.seconds,
        "objective": prov.get("objective"),
        "budget": prov.get("budget"),
        "constraints": prov.get("constraints", []),
        "scores_fingerprint": prov.get("scores_fingerprint"),
        "model_type": plan.model.get("model_type"),
        "model": plan.model.get("name_or_path"),
        "kept": plan.num_kept,
        "removed": plan.num_removed,
        "total": total,
        "uniform": plan.is_uniform,
        "merge_map": bool(plan.merge_map),
        "kept_per_layer": {str(k): v for k, v in counts.items()},
        "experts_per_layer": {str(k): len(plan.kept[k]) + len(plan.removed[k]) for k in plan.layers},
        "placement": plan.placement,
        "sizes": prov.get("sizes") or "",
        "deploy_dtype": prov.get("deploy_dtype"),
    }


def summarize_eval(path: Path) -> dict[str, Any]:
    from grape.evaluation.perplexity import EvalResult  # imports torch; only for eval results

    result = EvalResult.from_json(path)
    return {
        "kind": "eval",
        "path": str(path),
        "model": result.model,
        "domains": {d: {"nll": r.nll, "ppl": r.ppl, "tokens": r.tokens} for d, r in result.domains.items()},
        "mean_nll": result.mean_nll if result.domains else None,
        "tasks": {n: t.metrics for n, t in result.tasks.items()},
    }


_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def summarize_checkpoint(path: Path) -> dict[str, Any]:
    config = _read_json(path / "config.json")
    if not isinstance(config, dict):
        raise InspectError(f"{str(path / 'config.json')!r} is not a JSON object")
    from grape.models.files import model_code_files
    from grape.outputs import PROVENANCE_FILE
    from grape.templates.grape_pruning import read_block  # no torch: only the config is read

    block = read_block(config)
    per_layer = block["experts_per_layer"]
    count = next((config[k] for k in _EXPERT_COUNT_KEYS if isinstance(config.get(k), int)), None)
    provenance = _read_json(path / PROVENANCE_FILE) if (path / PROVENANCE_FILE).is_file() else {}
    plan = None
    if (path / "grape_plan.json").is_file():
        from solvers.plan import Plan

        plan = _plan_summary(Plan.load(path / "grape_plan.json"), str(path / "grape_plan.json"))
    experts = ({str(k): int(v) for k, v in per_layer.items()} if per_layer
               else provenance.get("experts_per_layer") or {})
    masked = block["masked_experts"]
    auto_map = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    return {
        "kind": "checkpoint",
        "path": str(path),
        "model_type": config.get("model_type"),
        "architecture": (config.get("architectures") or [None])[0],
        "layers": config.get("num_hidden_layers"),
        "experts": count,
        "top_k": config.get("num_experts_per_tok"),
        "experts_per_layer": experts,
        "uniform": not per_layer,
        "masked_experts": sum(len(v) for v in masked.values()),
        "needs_trust_remote_code": bool(auto_map),
        "remote_code_files": model_code_files(config),  # only its own code loads it: GRAPE refuses
        "loads_in_vllm": not per_layer and not masked,
        "pruned_by_grape": bool(provenance),
        "provenance": {k: provenance.get(k) for k in ("source_model", "method", "solver", "objective",
                                                      "budget", "scores_fingerprint", "grape_version")
                       if provenance.get(k) is not None},
        "plan": plan,
        "weight_files": len(weights),
        "weight_bytes": sum(os.path.getsize(w) for w in weights),
        "tokenizer": (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file(),
    }


def _summarize_settings(path: Path) -> dict[str, Any]:
    return summarize_settings(path, settings_kind(path.name, _read_json(path)))


def folder_kind(path: Path) -> str | None:
    """'folder' when a directory holds plans or eval results (a run's plans/ and eval/, a
    comparison's plans/), else None."""
    for file in sorted(path.glob("*.json")):
        try:
            if detect(file) in ("plan", "eval"):
                return "folder"
        except (InspectError, OSError):
            continue
    return None


def summarize_folder(path: Path) -> dict[str, Any]:
    """A folder of plans and eval results: one headline per file."""
    entries = []
    for file in sorted(path.glob("*.json")):
        try:
            kind = detect(file)
        except InspectError:
            continue
        if kind == "plan":
            p = summarize_plan(file)
            entries.append({"file": file.name, "kind": kind, "headline": (
                f"{p['solver']} ({p['status']}): removes {p['removed']} of {p['total']}, "
                f"{'same count per layer' if p['uniform'] else 'counts differ per layer'}")})
        elif kind == "eval":
            e = summarize_eval(file)
            entries.append({"file": file.name, "kind": kind, "headline": (
                f"{e['model']}: mean NLL {_num(e['mean_nll'])} over {len(e['domains'])} domains")})
    return {"kind": "folder", "path": str(path), "entries": entries}


def render_folder(s: dict[str, Any]) -> list[str]:
    return [f"folder {s['path']}", *[f"  {e['file']}: {e['kind']} {e['headline']}" for e in s["entries"]]]


SUMMARIES = {"scores": summarize_scores, "plan": summarize_plan, "eval": summarize_eval,
             "checkpoint": summarize_checkpoint, "run": summarize_run, "compare": summarize_compare,
             "recipe": summarize_recipe, "markdown": summarize_markdown, "folder": summarize_folder,
             "settings": _summarize_settings}


@contextlib.contextmanager
def readable_once(path: str | os.PathLike) -> Iterator[Path]:
    """`path` itself, or for a pipe (`<(cat plan.json)`, a FIFO) a temporary regular file holding
    what it carried, read once and at most PIPE_LIMIT bytes: detecting the kind and then loading
    it look at the content twice, and a pipe gives it only once."""
    if input_kind(path) != "pipe":
        yield Path(path)
        return
    data = read_input(path, "file GRAPE wrote", InspectError)
    with tempfile.TemporaryDirectory(prefix="grape-inspect-") as tmp:
        copy = Path(tmp) / Path(path).name
        copy.write_bytes(data)
        yield copy


def inspect_path(path: str | os.PathLike, criterion: str | None = None) -> dict[str, Any]:
    """A JSON-able summary of whatever `path` holds (its "kind" says what it is)."""
    with readable_once(path) as readable:
        summary = _inspect(readable, criterion)
    if summary.get("path") == str(readable):  # a pipe's copy: name the path given
        summary["path"] = str(path)
    return summary


def _inspect(path: Path, criterion: str | None) -> dict[str, Any]:
    kind = detect(path)
    if kind == "scores":
        return summarize_scores(path, criterion)
    if kind == "eval" and path.is_dir():
        path = path / "eval.json"
    return SUMMARIES[kind](path)


def scores_path(path: str | os.PathLike) -> Path:
    """The scores file behind `path`: the file itself, or a run folder's scores.npz."""
    path = Path(path)
    kind = detect(path)
    if kind == "scores":
        return path
    folder = path if path.is_dir() else path.parent
    if kind == "run" and (folder / "scores.npz").is_file():
        return folder / "scores.npz"
    raise InspectError(f"--plot draws a scores file's pictures; {str(path)!r} is a {kind}, not a "
                       "scores file (or a run folder holding scores.npz)")


# -- text -----------------------------------------------------------------------------------
def _num(x: Any, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)


def _size(n: int) -> str:
    from solvers.constraints import format_bytes

    return format_bytes(n)


def _sizes_line(summary: dict[str, Any]) -> str:
    """'  sizes as stored in the checkpoint (bfloat16): routed experts 10 MiB + other parts 3 MiB'."""
    other = summary.get("other_bytes")
    if other is None:
        return f"  sizes: {summary.get('sizes') or '-'}"
    total = summary["expert_bytes"] + other
    return (f"  sizes {summary['sizes']}: routed experts {_size(summary['expert_bytes'])} + other "
            f"parts {_size(other)} = {_size(total)}")


def render(summary: dict[str, Any]) -> str:
    kind = summary["kind"]
    renderers = {**RENDER, "folder": render_folder}
    if kind in renderers:
        return "\n".join(renderers[kind](summary))
    lines = []
    if kind == "scores":
        m = summary["model"]
        cal = ", ".join(f"{k} {v}" for k, v in summary["calibration"].items())
        lines += [f"scores file {summary['path']}",
                  (f"  model: {m['model_type']} {m.get('name_or_path') or ''}, {m['num_hidden_layers']} "
                   f"layers, {len(summary['layers'])} MoE layers, {summary['total_experts']} routed experts "
                   f"({_size(summary['expert_bytes'])}), router fingerprint {m.get('fingerprint') or '-'}"),
                  f"  calibration: {summary['tokens']} tokens; {cal or '-'}",
                  f"  criteria: {', '.join(summary['criteria'])}",
                  _sizes_line(summary),
                  f"  created by {summary['created_by']}; statistics fingerprint {summary['fingerprint']}",
                  "", (f"| layer | experts | top_k | never routed | {summary['criterion']} min | median | max "
                       "| output energy | similarity | cost curve |"),
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        c = summary["criterion"]
        for r in summary["layers"]:
            lines.append(f"| {r['layer']} | {r['experts']} | {_fmt(r['top_k'])} | {r['never_routed']} | "
                         f"{_fmt(r[c + '_min'])} | {_fmt(r[c + '_median'])} | {_fmt(r[c + '_max'])} | "
                         f"{_fmt(r['output_energy'])} | {','.join(r['similarity']) or '-'} | "
                         f"{'yes' if r['cost_curve'] else 'no'} |")
    elif kind == "plan":
        lines += _render_plan(summary)
    elif kind == "eval":
        lines += [f"eval result {summary['path']} for {summary['model']}",
                  "| domain | NLL | perplexity | tokens |", "|---|---:|---:|---:|"]
        for d, r in summary["domains"].items():
            lines.append(f"| {d} | {r['nll']:.4f} | {r['ppl']:.2f} | {r['tokens']} |")
        if summary["mean_nll"] is not None:
            lines.append(f"| **mean** | {summary['mean_nll']:.4f} | | |")
        for name, metrics in summary["tasks"].items():
            lines.append(f"task {name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))
    else:
        s = summary
        grape_line = ("pruned by GRAPE: " + ", ".join(f"{k} {v}" for k, v in s["provenance"].items())
                      if s["pruned_by_grape"] else "not a GRAPE-pruned checkpoint (no grape_provenance.json)")
        if s.get("remote_code_files"):
            loads = (f"model type not in transformers: loading runs the folder's own code "
                     f"({', '.join(s['remote_code_files'])}); grape refuses it (eval with "
                     "--trust-remote-code only)")
        elif s["needs_trust_remote_code"]:
            loads = ("per-layer expert counts: load with grape.load / load_pruned, or "
                     "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True); not vLLM")
        else:
            loads = "standard layout: loads in vanilla transformers and vLLM"
        lines += [f"checkpoint {s['path']}",
                  (f"  {s['architecture']} ({s['model_type']}), {s['layers']} layers, "
                   f"{_fmt(s['experts'])} experts per MoE layer"
                   f"{' (the largest layer; per-layer counts below)' if not s['uniform'] else ''}, "
                   f"top_k {_fmt(s['top_k'])}"),
                  f"  {loads}",
                  (f"  weights: {s['weight_files']} file(s), {_size(s['weight_bytes'])}; tokenizer: "
                   f"{'yes' if s['tokenizer'] else 'no'}"),
                  f"  {grape_line}"]
        if s["masked_experts"]:
            lines.append(f"  {s['masked_experts']} experts are masked (kept in the weights, never routed)")
        if s["experts_per_layer"]:
            lines.append("  experts per layer: " + ", ".join(f"{k}:{v}" for k, v in s["experts_per_layer"].items()))
        if s["plan"]:
            lines += [""] + _render_plan(s["plan"])
    return "\n".join(lines)


def _render_plan(p: dict[str, Any]) -> list[str]:
    gap = "-" if p["gap"] is None else f"{100 * p['gap']:.2f}%"
    lines = [f"plan {p['path']}",
             (f"  solver {p['solver']} ({p['status']}), objective {p['objective'] or '-'} = "
              f"{_fmt(p['objective_value'])}, lower bound {_fmt(p['bound'])}, gap {gap}, "
              f"{p['seconds']:.2f} s"),
             f"  budget: {p['budget'] or '-'}; constraints: {', '.join(p['constraints']) or 'none'}",
             f"  model: {p['model_type'] or '-'} {p['model'] or ''}; scores {p['scores_fingerprint'] or '-'}",
             *([f"  sizes: {p['sizes']}"] if p.get("sizes") else []),
             f"  removes {p['removed']} of {p['total']} experts ({100 * p['removed'] / max(p['total'], 1):.1f}%), "
             f"keeps {p['kept']}; " + ("the same count in every layer (standard checkpoint)"
                                        if p["uniform"] else "different counts per layer")
             + ("; has a merge map" if p["merge_map"] else ""),
             "", "| layer | experts | kept | removed |", "|---:|---:|---:|---:|"]
    for layer, kept in p["kept_per_layer"].items():
        n = p["experts_per_layer"][layer]
        lines.append(f"| {layer} | {n} | {kept} | {n - kept} |")
    if p.get("placement"):
        from solvers.plan import format_placement

        lines += ["", *format_placement(p["placement"], p.get("sizes") or "").splitlines()]
    return lines


__all__ = ["SUMMARIES", "InspectError", "detect", "inspect_path", "render", "scores_path"]
