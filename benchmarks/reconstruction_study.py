"""How much the `reconstruction` criterion depends on what calibration text it sees.

The criterion makes E-1 greedy choices per layer from the calibration rows, so it can fit the
documents it saw. This study calibrates each zoo model twice with the *same number* of tokens
(64 x 256, the quality benchmark's size) and compares uniform plans at one budget:

* `packed`  - grape's calibration packing: shuffled documents joined and cut into rows, so 64
              rows of 256 tokens cover the first dozen or so shuffled documents;
* `spread`  - 64 windows of 256 tokens spread evenly over the whole calibration file
              (grape.searching.stage.search_tokens), so they cover nearly every document.

Each row: the NLL increase of the uniform plan by `reconstruction` and by REAP, on the whole
test split (mean over domains; benchmarks/quality.py's evaluation), and their ratio. Usage:

    python benchmarks/reconstruction_study.py [--models NAME ...] [--budget 0.5]

Writes benchmarks/results/reconstruction.md and reconstruction.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_setup import FAST, ZOO, Evaluator, available_models, calibration_texts

from grape.outputs import atomic_write_text

RESULTS = ROOT / "benchmarks" / "results"


def calibrate(model, tokenizer, how: str):
    """Scores from 64 x 256 calibration tokens, packed as the quality benchmark packs them or
    spread over the whole file."""
    import grape
    from grape.searching.stage import search_tokens

    config = grape.CalibrationConfig(samples=FAST.calib_samples, seq_len=FAST.calib_seq_len,
                                     subsample=FAST.subsample, seed=0, progress=False)
    if how == "spread":
        ids = search_tokens([ZOO / "heldout" / "calibration.jsonl"], tokenizer, FAST.calib_seq_len,
                            FAST.calib_samples)
        return grape.calibrate(model, ids, config)
    return grape.calibrate(model, [calibration_texts(None)], config, tokenizer=tokenizer)


def study(name: str, budget: float) -> list[dict]:
    import numpy as np
    import torch

    import grape
    from grape.evaluation.perplexity import default_heldout_files, load_documents
    from grape.searching.sensitivity import masked, uniform_plan

    path = ZOO / "models" / name
    model = grape.load(path, dtype=torch.float32).eval()
    tokenizer = grape.load_tokenizer(path)
    test = Evaluator(tokenizer, load_documents(default_heldout_files("test")), 256, None, 8, FAST,
                     RESULTS / "cache" / "lmeval_tasks")
    base, _ = test.nll(model)

    def increase(plan) -> float:
        with masked(model, plan):
            nll, _ = test.nll(model)
        return float(np.mean([nll[d] - base[d] for d in nll]))

    rows = []
    for how in ("packed", "spread"):
        scores = calibrate(model, tokenizer, how)
        found = {c: increase(uniform_plan(scores, budget, c)) for c in ("reconstruction", "reap")}
        rows.append({"model": name, "calibration": how, "budget": budget, "tokens": int(scores.tokens),
                     "reconstruction": found["reconstruction"], "reap": found["reap"],
                     "ratio": found["reconstruction"] / found["reap"]})
        print(rows[-1], flush=True)
    return rows


def render(data: dict) -> str:
    lines = ["# The reconstruction criterion and the calibration text", "",
             (f"`{data['command']}` on {data['date']} ({data['minutes']:.0f} min). Do not edit by hand: "
              "rerun the script. Both calibrations have the same number of tokens; `packed` covers the "
              "first shuffled documents (grape's calibration packing), `spread` windows spread over the "
              "whole calibration file. NLL increase of the uniform plan on the test split, mean over "
              "domains."), "",
             "| model | calibration | budget | uniform reconstruction | uniform REAP | ratio |",
             "|---|---|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['model']} | {r['calibration']} | {r['budget']:.0%} | {r['reconstruction']:+.4f} | "
                     f"{r['reap']:+.4f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help="zoo models (default: every trained one)")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = [r for name in (args.models or available_models()) for r in study(name, args.budget)]
    from provenance import command_line

    data = {"command": command_line("reconstruction_study.py", argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "minutes": (time.perf_counter() - start) / 60, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "reconstruction.json", json.dumps(data, indent=1) + "\n")
    atomic_write_text(args.out / "reconstruction.md", render(data) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
