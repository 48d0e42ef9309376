"""GRAPE against the tools a user would pick instead, each run from its own released code.

Peers (each in its own virtual environment, built by benchmarks/peers/setup.sh from its lock file):

* ``reap``: llm-compressor 0.14.0.1, ``oneshot(model, dataset, recipe=REAPPruningModifier(sparsity=s))``;
* ``magnitude``: compressed-tensors 0.19.0, data-free ``MagnitudeExpertPruner`` via ``convert_checkpoint``.

REAP's own repository and EvoESAP's were tried and cannot run here; NOT_RUN gives the exact reason.

For every zoo model and budget, each peer prunes in a subprocess of its own venv
(benchmarks/peers/prune.py: wall time and peak RSS of that process); llm-compressor's REAP
calibrates on exactly the rows GRAPE's default calibrates on (`grape run`'s own split of the
calibration text: grape.pipeline._split). GRAPE's default is `grape run --model M --data TEXT
--budget B` in a process of its own, timed and measured the same way (benchmarks/peers/grape_side.py).
Every pruned checkpoint, GRAPE's included, is then loaded and measured here, in GRAPE's
environment, exactly as benchmarks/default_quality.py measures plans: its test windows (the whole
committed test split by document), its test_nll (pure cross-entropy from the logits, never
``.loss``) and its standard errors by document; every row is compared with GRAPE's default paired
by document. The best uniform plan's row is default_quality.json's seed-0 cell.

Writes benchmarks/results/peers.json and peers.md (the README's table between
``<!-- results:peers -->`` markers, copied by benchmarks/update_readme.py). Pruned checkpoints,
logs, per-window NLLs and rebuilt plans are kept in benchmarks/results/cache/peers/
(git-ignored); a step already there is reused unless --fresh (NLLs: while the windows' digest holds).

    python benchmarks/peers/run.py                          # setup + every zoo model, 25% and 50%
    python benchmarks/peers/run.py --models qwen3moe-32x4   # one model
    python benchmarks/peers/run.py --only peers             # fill the cache only (no results written);
    python benchmarks/peers/run.py --only grape             #   the two can run side by side
    python benchmarks/peers/run.py --no-setup --no-grape-run    # the table from what is cached
    python benchmarks/peers/run.py --dry-run                # what would run; needs no venv
    python benchmarks/peers/run.py --report-only            # peers.md from peers.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ZOO = ROOT / "benchmarks" / "zoo"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "cache" / "peers"
VENVS = HERE / ".venvs"
CALIBRATION = ROOT / "grape" / "assets" / "heldout" / "calibration.jsonl"  # grape run's default text
ZOO_ORDER = ("qwen3moe-32x4", "deepseekv3-32x4g", "mixtral-8x2", "mixtral-8x2-upcycled", "olmoe-32x4")
FORMAT = "grape.peers-benchmark/2"  # per-window NLLs on default_quality's test windows

PEERS = {
    "reap": {"label": "llm-compressor REAP", "venv": "llmcompressor", "data": True,
             "types": "REAPPruningModifier(sparsity=s) in oneshot(model, dataset, recipe)"},
    "magnitude": {"label": "compressed-tensors magnitude", "venv": "compressed-tensors", "data": False,
                  "types": "convert_checkpoint(model, out, MagnitudeExpertPruner.from_pretrained("
                           "model, router_pattern, expert_pattern, sparsity=s))"},
}

# Tried and not runnable here (CPU only, PyPI only, no network beyond it); read from their pinned sources.
NOT_RUN = [
    {"tool": "REAP (its own repository)", "repo": "CerebrasResearch/reap",
     "commit": "1970473c51ca3caeb98c10392f15b3a08a672974",
     "reason": "its pins cannot be installed on a CPU from PyPI: pyproject.toml requires Python >= 3.12, "
               "torch==2.7.1, transformers==4.55.0 and vllm==0.10.0 (PyPI's only vllm 0.10.0 wheel is the "
               "CUDA build, requiring xformers==0.0.31), plus evalplus, livecodebench, crfm-helm and "
               "evalscope from git submodules (`[tool.uv.sources]` paths under third-party/); "
               "`reap.prune` imports `reap.eval` (vllm, lm_eval, evalplus) and `reap.data` (`from vllm "
               "import TokensPrompt`) at import time; calibration data come only from DATASET_REGISTRY's "
               "Hugging Face Hub datasets; MODEL_ATTRS covers Qwen3Moe and Mixtral of our families "
               "(no OlmoeForCausalLM, DeepseekV2 but not DeepseekV3)"},
    {"tool": "EvoESAP", "repo": "ZongfangLiu/EvoESAP", "commit": "6933bd6d29bfdacb360d57ee6c0519f231bebfa7",
     "reason": "a fork of REAP's repository with the same blockers and more: pyproject.toml pins "
               "transformers==5.0.0dev (not a release on PyPI), vllm==0.13.0, flash-attn>=2.8.3 (CUDA "
               "build only), torch==2.7.1, and four editable git-submodule packages; requirements.txt "
               "marks vllm 'GPU-only'; its search script (experiments/search-pruning-cli.sh -> "
               "src/reap/non_uni_prune.py) passes a vLLM server port and sets CUDA_VISIBLE_DEVICES"},
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def zoo_models() -> list[str]:
    names = [p.name for p in (ZOO / "models").iterdir() if (p / "model.safetensors").exists()]
    return sorted(names, key=lambda n: (ZOO_ORDER.index(n) if n in ZOO_ORDER else 99, n))


def dq():
    """benchmarks/default_quality.py as a module: its windows, NLL and SE code, unchanged."""
    import default_quality

    return default_quality


# -- peers' pruning steps -------------------------------------------------------------------------
def calibration_ids(name: str) -> Path:
    """The rows GRAPE's default calibrates on, as a JSON list of input-id rows: `grape run`'s own
    split of the calibration text (grape.pipeline._split with its settings: whole documents held
    out for the search and its confirmation, the rest packed), so llm-compressor's REAP sees the
    same calibration text and size as GRAPE's calibration."""
    from grape.models.loading import load_tokenizer
    from grape.pipeline import _fitted_calibration, _split

    path = CACHE / name / "calib.json"
    if not path.exists():
        config, _ = dq().default_config(name, 0.25, 0, CACHE / name / "split")
        split = _split(config, _fitted_calibration(config), load_tokenizer(config.model), searching=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(split.calibration.input_ids.tolist()), encoding="utf-8")
    return path


def calibration_shape(path: Path) -> tuple[int, int]:
    rows = json.loads(path.read_text(encoding="utf-8"))
    return len(rows), len(rows[0])


def prune_step(peer: str, name: str, budget: float, calib: Path, threads: int, fresh: bool) -> dict:
    """Run the peer in its venv (or reuse the step's result); returns prune.py's JSON line."""
    out = CACHE / name / f"{PEERS[peer]['venv']}-{peer}-{round(budget * 100)}"
    record = out.with_suffix(".json")
    if record.exists() and not fresh:
        result = json.loads(record.read_text(encoding="utf-8"))
        if not result.get("ok") or (out / "config.json").exists():
            log(f"  {peer} {budget:.0%}: reused {record.relative_to(ROOT)}")
            return {**result, "checkpoint": str(out)}
    python = VENVS / PEERS[peer]["venv"] / "bin" / "python"
    cmd = [str(python), str(HERE / "prune.py"), peer, "--model", str(ZOO / "models" / name),
           "--sparsity", str(budget), "--out", str(out), "--threads", str(threads)]
    if PEERS[peer]["data"]:
        cmd += ["--calib", str(calib)]
    log(f"  {peer} {budget:.0%}: {' '.join(cmd[1:3])} ... (log {out.with_suffix('.log').relative_to(ROOT)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    from grape_side import timed

    code, _, peak = timed(cmd, out.with_suffix(".log"), dict(os.environ))
    output = out.with_suffix(".log").read_text(encoding="utf-8")
    lines = [ln for ln in output.splitlines() if ln.startswith("PEER_RESULT ")]
    result = json.loads(lines[-1][len("PEER_RESULT "):]) if lines else {
        "ok": False, "error": f"prune.py exited {code}: {output.strip().splitlines()[-1:]}"}
    # the process's own peak, measured from outside (prune.py's getrusage would include this
    # process's resident size at the fork: see grape_side._LAUNCHER)
    result["peak_mib"] = round(peak, 1)
    record.write_text(json.dumps(result) + "\n", encoding="utf-8")
    return {**result, "checkpoint": str(out)}


# -- measuring ------------------------------------------------------------------------------------
def cached_nll(path: Path, digest: str, compute, fresh: bool = False) -> dict:
    """domain -> per-window NLL list, from `path` when made on the same windows, else computed."""
    if path.is_file() and not fresh:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("windows_digest") == digest:
            return record["nll"]
    nll = {d: [round(float(x), 6) for x in v] for d, v in compute().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"windows_digest": digest, "nll": nll}) + "\n", encoding="utf-8")
    return nll


class _LoadReport(logging.Handler):
    """Keeps transformers' load-report warnings: their MISMATCH / MISSING / UNEXPECTED lines are the exact reason a pruned
    checkpoint does not load (its RuntimeError only says 'see the above report')."""

    STATES = ("MISMATCH", "MISSING", "UNEXPECTED")

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines += [" ".join(ln.replace("|", " ").split()) for ln in record.getMessage().splitlines()
                       if any(f" {s} " in ln for s in self.STATES) and not ln.startswith("-")]


def checkpoint_nll(checkpoint: str, test: dict) -> dict:
    """default_quality.test_nll of a checkpoint loaded as GRAPE loads one (float32 on CPU)."""
    import torch

    import grape

    report = _LoadReport()
    logging.getLogger("transformers").addHandler(report)
    try:
        model = grape.load(checkpoint, dtype=torch.float32)
    except Exception as exc:
        if not report.lines:
            raise
        lines = "; ".join(sorted(set(report.lines)))
        # transformers' own text only points at the report: its lines are the reason
        text = lines if "above report" in str(exc) else f"{exc} [{lines}]"
        raise RuntimeError(f"{type(exc).__name__}: {text}") from exc
    finally:
        logging.getLogger("transformers").removeHandler(report)
    try:
        return dq().test_nll(model, None, test)
    finally:
        del model


def transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def arrays(nll: dict) -> dict:
    import numpy as np

    return {d: np.asarray(v, dtype=np.float64) for d, v in nll.items()}


class Measure:
    """One model's windows and unpruned NLLs; the increase (and paired difference) of any NLLs."""

    def __init__(self, name: str, tokenizer, fresh: bool):
        from grape_side import windows_digest

        self.name, self.test = name, dq().test_windows(tokenizer)
        self.digest = windows_digest(self.test)
        self._base, self.fresh = None, fresh

    @property
    def base(self) -> dict:
        if self._base is None:
            self._base = cached_nll(CACHE / self.name / "unpruned.nll.json", self.digest,
                                    lambda: checkpoint_nll(str(ZOO / "models" / self.name), self.test))
        return self._base

    def increase(self, nll: dict, reference: dict | None = None) -> tuple[float, float]:
        """default_quality.increase: mean over domains, SE by document."""
        return dq().increase(arrays(nll), arrays(self.base), self.test,
                             None if reference is None else arrays(reference))

    def groups(self) -> dict:
        return {d: [int(g) for g in w.groups] for d, w in self.test.items()}


# llm-compressor 0.14 saves a Mixtral's experts under its own per-expert linear names; Mixtral's
# released checkpoints (and transformers' loading conversion) use these
_MOE = r"\.(?:mlp|block_sparse_moe)"
MIXTRAL_NAMES = ((re.compile(_MOE + r"\.experts\.(\d+)\.gate_proj\."), r".block_sparse_moe.experts.\1.w1."),
                 (re.compile(_MOE + r"\.experts\.(\d+)\.down_proj\."), r".block_sparse_moe.experts.\1.w2."),
                 (re.compile(_MOE + r"\.experts\.(\d+)\.up_proj\."), r".block_sparse_moe.experts.\1.w3."),
                 (re.compile(r"\.mlp\.gate\."), r".block_sparse_moe.gate."))
RENAMED_NOTE = ("it saves a Mixtral's experts as experts.N.{gate,up,down}_proj, names transformers' Mixtral "
                "conversion (from w1/w2/w3) does not map, so transformers loads that checkpoint with every "
                "expert randomly initialised; measured after renaming them to Mixtral's released names "
                "(block_sparse_moe.experts.N.w1/w3/w2), values unchanged")


def llmcompressor_mixtral_names(checkpoint: Path) -> bool:
    """Whether `checkpoint` is a Mixtral saved with llm-compressor's expert names (reads the
    shards' headers only)."""
    from safetensors import safe_open

    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    return config.get("model_type") == "mixtral" and any(
        MIXTRAL_NAMES[0][0].search(k) for f in checkpoint.glob("*.safetensors") for k in safe_open(str(f), "pt").keys())


def released_names(checkpoint: Path) -> Path:
    """A Mixtral checkpoint with llm-compressor's tensor names, renamed (MIXTRAL_NAMES) into a copy
    next to it, values unchanged; any other checkpoint as it is."""
    import shutil

    from safetensors.torch import load_file, save_file

    if not llmcompressor_mixtral_names(checkpoint):
        return checkpoint

    def renamed(key: str) -> str:
        for pattern, name in MIXTRAL_NAMES:
            key = pattern.sub(name, key)
        return key

    out = checkpoint.with_name(checkpoint.name + "-released-names")
    if out.exists():
        shutil.rmtree(out)  # this script's own copy
    shutil.copytree(checkpoint, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    for shard in sorted(checkpoint.glob("*.safetensors")):
        save_file({renamed(k): v for k, v in load_file(str(shard)).items()}, str(out / shard.name),
                  metadata={"format": "pt"})
    for index in checkpoint.glob("*.safetensors.index.json"):
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {renamed(k): v for k, v in data["weight_map"].items()}
        (out / index.name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return out


def peer_row(peer: str, name: str, budget: float, step: dict, meter: Measure) -> dict:
    row = {"model": name, "budget": budget, "tool": PEERS[peer]["label"], "peer": peer,
           "ok": bool(step.get("ok")), "seconds": step.get("seconds"), "peak_mib": step.get("peak_mib"),
           "versions": step.get("versions", {}), "kept": step.get("kept", {})}
    if row["ok"]:
        checkpoint = Path(step["checkpoint"])
        if llmcompressor_mixtral_names(checkpoint):
            row["renamed"] = RENAMED_NOTE
        try:  # the renamed copy is written only when the NLL is measured, not from the cache
            nll = cached_nll(CACHE / name / f"{checkpoint.name}.nll.json", meter.digest,
                             lambda: checkpoint_nll(str(released_names(checkpoint)), meter.test), meter.fresh)
        except Exception as exc:  # pruned, but the checkpoint does not load or run
            row.update(ok=False, error=f"the pruned checkpoint does not load (transformers "
                                       f"{transformers_version()}): {exc}")
        else:
            inc, se = meter.increase(nll)
            row.update(increase=inc, se=se, windows=nll)
            log(f"  {peer} {budget:.0%}: dNLL {inc:+.4f} ± {se:.4f}, {row['seconds']:.1f} s, "
                f"{row['peak_mib']:.0f} MiB")
    if not row["ok"]:
        from provenance import scrub  # no machine paths in the results

        row["error"] = scrub(row.get("error") or step.get("error", "unknown"))
        log(f"  {peer} {budget:.0%}: cannot run: {row['error'][:300]}")
    return row


def versus_default(rows: list[dict], meter: Measure) -> None:
    """Each row's increase minus GRAPE default's: paired by document when the default's per-window
    NLLs exist (its rebuilt plan), else unpaired (independent SEs)."""
    default = next((r for r in rows if r["tool"].startswith("GRAPE default")), None)
    if default is None:
        return
    for r in rows:
        if r is default or not r["ok"] or "vs_default" in r:
            continue
        if default.get("windows") and r.get("windows"):
            diff, se = meter.increase(r["windows"], reference=default["windows"])
            r["vs_default"] = {"diff": diff, "se": se, "paired": True}
        else:
            r["vs_default"] = {"diff": r["increase"] - default["increase"],
                               "se": math.hypot(r["se"], default["se"]), "paired": False}


# -- one model ------------------------------------------------------------------------------------
def grape_cell(name: str, budget: float, meter: Measure, args) -> dict | None:
    """GRAPE's default for one budget: the cached `grape run` record on these windows, else (unless
    --no-grape-run) `grape run` in its own process, its checkpoint measured like a peer's."""
    import shutil

    import grape_side

    found = grape_side.cached_run(CACHE, name, budget, meter.digest)
    if args.no_grape_run or (found is not None and not args.fresh):
        return found
    out = CACHE / name / f"grape-run-{round(budget * 100)}"
    if out.exists():
        shutil.rmtree(out)  # this script's own run directory
    argv = ["run", "--model", str(ZOO / "models" / name), "--data", str(CALIBRATION), "--budget", str(budget)]
    record = grape_side.grape_run(argv, out, args.threads, log)
    nll = checkpoint_nll(record["checkpoint"], meter.test)
    inc, se = meter.increase(nll)
    log(f"  GRAPE {budget:.0%}: dNLL {inc:+.4f} ± {se:.4f}, {grape_side.pruning_seconds(record['stages']):.1f} s its pruning step "
        f"({record['process_seconds']:.1f} s in all), {record['peak_mib']:.0f} MiB")
    from provenance import scrub

    record = {**record, "argv": [scrub(a) for a in argv], "checkpoint": scrub(record["checkpoint"]),
              "windows_digest": meter.digest, "model": name, "seed": grape_side.SEED, "budget": budget,
              "nll": {d: [round(float(x), 6) for x in v] for d, v in nll.items()}}
    return grape_side.store_run(CACHE, name, budget, record)


def run_model(name: str, args, only: str | None) -> dict | None:
    """Peers' steps, GRAPE's `grape run` and the rows of one model; `only` fills the cache with one
    side and returns None."""
    import grape
    import grape_side

    tokenizer = grape.load_tokenizer(ZOO / "models" / name)
    meter = Measure(name, tokenizer, args.fresh)
    log(f"== {name}: {sum(w.ids.shape[0] for w in meter.test.values())} test windows "
        f"(digest {meter.digest})")
    steps = {}
    if only != "grape":
        calib = calibration_ids(name)
        for budget in args.budgets:
            for peer in args.peers:
                steps[budget, peer] = peer_row(peer, name, budget, prune_step(
                    peer, name, budget, calib, args.threads, args.fresh), meter)
    runs = {}
    if only != "peers":
        for budget in sorted(args.budgets, reverse=True):  # 50% first: the acceptance's budget
            runs[budget] = grape_cell(name, budget, meter, args)
    if only is not None:
        return None
    cells = grape_side.cells(RESULTS)
    rows = []
    for budget in args.budgets:
        at = [steps[budget, p] for p in args.peers]
        at += grape_side.rows(cells.get((name, budget)), runs.get(budget), name, budget, meter.increase)
        versus_default(at, meter)
        rows += at
    rows_shape = calibration_shape(CACHE / name / "calib.json") if (CACHE / name / "calib.json").exists() else None
    return {"name": name, "windows_digest": meter.digest, "groups": meter.groups(),
            "calibration_rows": rows_shape, "baseline": meter.base, "rows": rows}


# -- command line ---------------------------------------------------------------------------------
def write(data: dict, out: Path) -> None:
    from peers_report import render

    text = json.dumps(data, indent=1)
    # lists of numbers (per-window NLLs, documents) on one line each: a readable, diffable file
    text = re.sub(r"\[\n\s+([-0-9.e,\s]+?)\n\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    (out / "peers.json").write_text(text + "\n", encoding="utf-8")
    (out / "peers.md").write_text(render(data, PEERS) + "\n", encoding="utf-8")


def dry_run(models: list[str], args) -> None:
    for name in models:
        for budget in args.budgets:
            if args.only != "grape":
                for peer in args.peers:
                    log(f"{name} {budget:.0%} {peer}: {VENVS / PEERS[peer]['venv'] / 'bin/python'} prune.py {peer}")
            if args.only != "peers":
                how = "cached `grape run` only (else default_quality.json's cell)" if args.no_grape_run else \
                    f"grape run --model {name} --data {CALIBRATION.relative_to(ROOT)} --budget {budget}, unless cached"
                log(f"{name} {budget:.0%} grape: {how}")


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="zoo model names (default: every one on disk)")
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.25, 0.5])
    parser.add_argument("--peers", nargs="*", choices=sorted(PEERS), default=list(PEERS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every step (default 1)")
    parser.add_argument("--only", choices=("peers", "grape"),
                        help="fill the cache with one side only and write no results")
    parser.add_argument("--no-grape-run", action="store_true",
                        help="do not run `grape run` (calibration + search, minutes per cell): use the "
                             "cached runs, else default_quality.json's cells (unpaired, no memory)")
    parser.add_argument("--fresh", action="store_true", help="prune and measure again even if cached")
    parser.add_argument("--no-setup", action="store_true", help="do not run setup.sh first")
    parser.add_argument("--dry-run", action="store_true", help="list the steps; needs no venv")
    parser.add_argument("--report-only", action="store_true", help="rewrite peers.md from peers.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    models = args.models or zoo_models()
    if args.report_only:
        from peers_report import render

        data = json.loads((args.out / "peers.json").read_text(encoding="utf-8"))
        (args.out / "peers.md").write_text(render(data, PEERS) + "\n", encoding="utf-8")
        return 0
    if args.dry_run:
        dry_run(models, args)
        return 0
    if not args.no_setup and args.only != "grape":
        subprocess.run(["bash", str(HERE / "setup.sh"), *sorted({PEERS[p]["venv"] for p in args.peers})],
                       check=True)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = {"format": FORMAT,
            "command": " ".join(["python benchmarks/peers/run.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "threads": args.threads, "budgets": args.budgets,
            "calibration": {"file": str(CALIBRATION.relative_to(ROOT)),
                            "rows": "grape run's own calibration rows (grape.pipeline._split), per model"},
            "not_run": NOT_RUN, "models": []}
    old = args.out / "peers.json"
    previous = json.loads(old.read_text(encoding="utf-8")) if old.exists() else {}
    others = [m for m in previous.get("models", []) if previous.get("format") == FORMAT and m["name"] not in models]
    for name in models:
        model = run_model(name, args, args.only)
        if model is None:
            continue
        data["models"] = sorted([*(m for m in data["models"] if m["name"] != name), model, *others],
                                key=lambda m: ZOO_ORDER.index(m["name"]) if m["name"] in ZOO_ORDER else 99)
        others = []
        write(data, args.out)
    log("cache filled" if args.only else f"wrote {args.out / 'peers.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
