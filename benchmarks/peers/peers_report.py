"""The markdown report of benchmarks/peers/run.py, from its JSON: formatting only, every number
comes from the JSON (so `run.py --report-only` rewrites the table without measuring anything)."""

from __future__ import annotations

HEADER = ("Mean over domains (prose, python, c) of the NLL increase against the unpruned model on the "
          "committed test split (`grape/assets/heldout/*.test.jsonl`, every document, 256-token windows, "
          "pure cross-entropy: benchmarks/default_quality.py's `test_windows` and `test_nll`), ± its "
          "standard error by document (grape.evaluation.stats); uniform = same count in every layer. "
          "*GRAPE default*: `grape run --model M --data calibration.jsonl --budget B`, no other flag, its "
          "pruned checkpoint loaded and measured by the same code as every peer's; *GRAPE best uniform*: "
          "benchmarks/results/default_quality.json's seed-0 cell, the lowest uniform plan over five criteria "
          "on the test split (chosen after the fact). llm-compressor's REAP calibrates on exactly the rows "
          "GRAPE calibrates on. *vs GRAPE default*: this row's increase minus the default's, paired by "
          "document (negative: the row loses less). Seconds and peak memory: one process per tool, model and "
          "budget (load + calibrate + prune + save, peak RSS); GRAPE's seconds are its calibrate, solve, search, "
          "apply (timed with the pruned model's evaluation) and save stages, leaving out the unpruned model's "
          "evaluation, the other solvers' comparison and the report `grape run` also makes (the process total "
          "is in peers.json); its peak RSS is the whole process's.")


def _kept(kept: dict) -> str:
    counts = list(kept.values()) if kept else []
    if not counts:
        return ""
    return f"{counts[0]} each" if len(set(counts)) == 1 else "/".join(str(c) for c in counts)


def _vs(row: dict) -> str:
    vs = row.get("vs_default")
    if not vs:
        return ""
    mark = "" if vs.get("paired", True) else " †"
    return f"{vs['diff']:+.4f} ± {vs['se']:.4f}{mark}"


def _line(model: str, budget: float, r: dict) -> str:
    if not r["ok"]:
        return f"| `{model}` | {budget:.0%} | {r['tool']} | cannot run (below) | | | | |"
    sec = f"{r['seconds']:.1f}" if r.get("seconds") is not None else "not recorded"
    mem = f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "not recorded"
    return (f"| `{model}` | {budget:.0%} | {r['tool']} | {r['increase']:+.4f} ± {r['se']:.4f} | {_vs(r)} | "
            f"{_kept(r.get('kept'))} | {sec} | {mem} |")


def main_table(data: dict) -> list[str]:
    lines = ["| model | removed | tool | dNLL ± SE | vs GRAPE default | kept per layer | seconds | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for model in data["models"]:
        for budget in data["budgets"]:
            for r in (r for r in model["rows"] if r["budget"] == budget):
                lines.append(_line(model["name"], budget, r))
    return lines


def footnotes(data: dict) -> list[str]:
    rows = [r for m in data["models"] for r in m["rows"]]
    notes = []
    if any(r.get("vs_default", {}).get("paired") is False for r in rows):
        notes.append("† not paired: no per-window NLLs of GRAPE's default for this cell (no `grape run` "
                     "measured), so the SE is sqrt(SE_row² + SE_default²), which overstates the paired one.")
    for r in rows:
        cell = r.get("cell")
        if cell and not cell["reproduced"]:
            notes.append(f"`{r['model']}` {r['budget']:.0%}: `grape run`'s checkpoint gave {r['increase']:+.4f} "
                         f"({r['chosen']}), default_quality.json's cell {cell['increase']:+.4f} ({cell['chosen']}); "
                         "the best uniform row is compared with `grape run`'s checkpoint unpaired.")
    renamed: dict[tuple[str, str], list[str]] = {}  # (tool, note) -> the cells it applies to
    for r in rows:
        if r.get("renamed"):
            renamed.setdefault((r["tool"], r["renamed"]), []).append(f"`{r['model']}` {r['budget']:.0%}")
    for (tool, note), where in renamed.items():
        notes.append(f"{tool} on {', '.join(where)}: {note}.")
    for model in data["models"]:
        for budget in data["budgets"]:
            at = [r for r in model["rows"] if r["budget"] == budget]
            if at and not any(r["tool"].startswith("GRAPE") for r in at):
                notes.append(f"`{model['name']}` {budget:.0%}: no GRAPE rows: neither a `grape run` nor a "
                             "default_quality.json seed-0 cell was measured.")
    return [f"_{n}_" for n in notes]


def not_run_table(data: dict) -> list[str]:
    lines = ["Not run here (their own code, at a pinned commit):", "",
             "| tool | pinned at | exact reason |", "|---|---|---|"]
    for item in data.get("not_run", []):
        lines.append(f"| {item['tool']} | `{item['repo']}@{item['commit'][:12]}` | {item['reason']} |")
    return lines


def failures(data: dict) -> list[str]:
    failed = [r for m in data["models"] for r in m["rows"] if not r["ok"]]
    if not failed:
        return []
    lines = ["## Peers that cannot run", "", "| model | removed | tool | exact reason |", "|---|---|---|---|"]
    for r in failed:
        reason = r["error"].replace("|", "\\|").replace("\n", " ")[:700]
        lines.append(f"| `{r['model']}` | {r['budget']:.0%} | {r['tool']} | `{reason}` |")
    return lines + [""]


def settings(data: dict, peers: dict) -> list[str]:
    lines = ["## Versions and settings", ""]
    for peer, info in peers.items():
        vers = next((r["versions"] for m in data["models"] for r in m["rows"]
                     if r.get("peer") == peer and r.get("versions")), {})
        lines.append(f"- {info['label']}: `{info['types']}`; " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    lines += ["- calibration of llm-compressor's REAP: the rows `grape run` calibrates on (its own split of "
              f"`{data.get('calibration', {}).get('file')}`: whole documents held out for the search and its "
              "confirmation, the rest packed; grape.pipeline._split), per model: "
              + ", ".join(f"`{m['name']}` {m['calibration_rows'][0]} x {m['calibration_rows'][1]}"
                          for m in data["models"] if m.get("calibration_rows"))
              + "; the magnitude pruner uses no data",
              f"- threads: {data.get('threads')} per process (peers and `grape run`)",
              "- GRAPE default: `grape run --model M --data CALIBRATION --budget B --out DIR --no-progress` "
              "(seed 0, every other setting its default); what it chose, against default_quality.json's "
              "seed-0 cell (the same defaults through the stage functions):"]
    for m in data["models"]:
        for r in m["rows"]:
            if r.get("from") == "grape run":
                cell = r.get("cell")
                state = "no cell" if not cell else (
                    "reproduces the cell" if cell["reproduced"] else f"the cell: {cell['increase']:+.4f}")
                lines.append(f"  - `{m['name']}` {r['budget']:.0%}: {r['chosen']}, {r['increase']:+.4f} ({state}); "
                             f"{r.get('process_seconds', 0):.0f} s in all with its evaluations")
    return lines + [""]


def render(data: dict, peers: dict) -> str:
    lines = ["# GRAPE against the tools you would use instead", "",
             f"Written by `{data['command']}` on {data['date']} ({data['machine']}).", "",
             "<!-- readme -->", HEADER, "", *main_table(data), ""]
    notes = footnotes(data)
    if notes:
        lines += [*notes, ""]
    lines += [*not_run_table(data), "<!-- /readme -->", ""]
    lines += failures(data) + settings(data, peers)
    return "\n".join(lines)
