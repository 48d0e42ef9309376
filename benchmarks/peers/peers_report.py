"""The markdown report of benchmarks/peers/run.py, from its JSON: formatting only, every number
comes from the JSON (so `run.py --report-only` rewrites the table without measuring anything)."""

from __future__ import annotations

HEADER = ("Mean over domains (prose, python, c) of the NLL increase against the unpruned model on the "
          "committed test split (`grape/assets/heldout/*.test.jsonl`, every document, 256-token windows, "
          "pure cross-entropy: benchmarks/default_quality.py's `test_windows` and `test_nll`), ± its "
          "standard error by document (grape.evaluation.stats); uniform = same count in every layer. GRAPE's rows "
          "are benchmarks/results/default_quality.json's seed-0 cells: the default of `grape run` with no flags, "
          "and the lowest uniform plan over five criteria on the test split (chosen after the fact). "
          "*vs GRAPE default*: this row's increase minus the default's, paired by document against the "
          "default's plan rebuilt by default_quality's own functions (negative: the row loses less). "
          "Seconds and peak memory: the tool's pruning step (the peers: one process each, load + "
          "calibrate + prune + save, peak RSS; GRAPE: the loss-verified search as default_quality.json "
          "records it, calibration not included; its memory is not recorded).")


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
    sec = f"{r['seconds']:.1f}" if r.get("seconds") is not None else ("not recorded" if r.get("peer") is None else "")
    mem = "not recorded" if r.get("peer") is None else f"{r['peak_mib']:.0f}"
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
        notes.append("† not paired: GRAPE's default plan was not rebuilt for this cell, so the SE is "
                     "sqrt(SE_row² + SE_default²), which overstates the paired one.")
    stale = [r for r in rows if r.get("rebuilt", {}).get("reproduced") is False]
    for r in stale:
        notes.append(f"`{r['model']}` {r['budget']:.0%}: the rebuilt default plan gave "
                     f"{r['rebuilt']['increase']:+.4f}, not the cell's {r['increase']:+.4f}; "
                     "the pairing is against the rebuilt plan.")
    for model in data["models"]:
        for budget in data["budgets"]:
            at = [r for r in model["rows"] if r["budget"] == budget]
            if at and not any(r["tool"].startswith("GRAPE") for r in at):
                notes.append(f"`{model['name']}` {budget:.0%}: no GRAPE rows: default_quality.json has no "
                             f"seed-0 cell yet (`python benchmarks/default_quality.py --models {model['name']} "
                             f"--budgets {budget} --seeds 0` adds it; then `python benchmarks/peers/run.py "
                             "--no-rebuild` picks it up).")
    fresh = [r for r in rows if (r.get("from") or "").startswith("rebuilt")]
    for r in fresh:
        notes.append(f"`{r['model']}` {r['budget']:.0%}: no default_quality.json cell yet; GRAPE's default "
                     "row is the plan rebuilt here by default_quality's functions (no best-uniform row).")
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
    calib = data.get("calibration", {})
    lines += [f"- calibration of llm-compressor's REAP: {calib.get('samples')} x {calib.get('seq_len')} tokens "
              f"packed from `{calib.get('file')}` by grape.data.text.load_calibration_data, seed 0 (the text "
              "GRAPE's default calibrates and searches on; GRAPE's default uses up to 256 rows of it, minus "
              "its held-out documents); the magnitude pruner uses no data",
              f"- threads: {data.get('threads')} per peer process",
              "- GRAPE rows: `benchmarks/results/default_quality.json` (seed 0); per-window NLLs of the "
              "default's plan rebuilt by `default_quality.calibrated` + `default_plan` + `test_nll`:"]
    for m in data["models"]:
        for r in m["rows"]:
            if r.get("rebuilt"):
                state = {True: "reproduces the cell", False: "differs from the cell",
                         None: "no cell yet"}[r["rebuilt"]["reproduced"]]
                lines.append(f"  - `{m['name']}` {r['budget']:.0%}: {r['rebuilt']['chosen']}, "
                             f"{r['rebuilt']['increase']:+.4f} ({state})")
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
