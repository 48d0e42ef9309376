"""What the quality studies share (benchmarks/quality.py, reconstruction_study.py): the run's
settings, the trained zoo models, cached calibration and the evaluator on the held-out test split."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from solvers.scores import Scores  # noqa: E402


ZOO = ROOT / "benchmarks" / "zoo"
RESULTS = ROOT / "benchmarks" / "results"
ZOO_ORDER = ("qwen3moe-32x4", "deepseekv3-32x4g", "mixtral-8x2", "mixtral-8x2-upcycled", "olmoe-32x4")


# -- settings -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    mode: str
    budgets: tuple[float, ...] = (0.25, 0.5)
    calib_samples: int = 64  # packed calibration sequences
    calib_seq_len: int = 256
    subsample: int = 256  # tokens per layer on which every expert runs (similarity, cost curves)
    eval_tokens: int | None = None  # predicted tokens per domain (test split); None = all
    eval_batch: int = 8
    sensitivity_tokens: int | None = 16384  # per domain, validation split
    time_limit: float = 20.0  # seconds per solve
    curve_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)  # single-layer removals measured
    calibration_domain: str = "python"
    calibration_domain_budget: float = 0.5
    calibration_domain_all_models: bool = False  # False: the first model only
    lmeval: str = "some"  # none | some (first model, a few methods, 50%) | all
    lmeval_examples: int = 60  # per domain and task kind
    lmeval_kinds: tuple[str, ...] = ("scramble", "nextline", "cloze")
    lmeval_methods: tuple[str, ...] = ("uniform-reap", "global-ranking", "exact-measured", "grape-run")
    # the loss-verified search (method grape-run), as `grape run` on the test bed: search
    # sequences of 256 tokens from each domain's validation split, at most this many passes
    search_samples: int = 16
    search_passes: int = 100
    confirm_samples: int = 128  # the finalists are measured again on this many windows per domain

    def describe(self) -> list[tuple[str, str]]:
        cap = lambda n: "all" if n is None else f"{n:,}"
        lm = {"none": "off", "all": "every row",
              "some": f"first model, 50%, methods {', '.join(self.lmeval_methods)}"}[self.lmeval]
        return [
            ("mode", self.mode),
            ("budgets (fraction of routed experts removed)", ", ".join(f"{b:.0%}" for b in self.budgets)),
            ("calibration", (f"{self.calib_samples} sequences x {self.calib_seq_len} tokens from "
                             "`benchmarks/zoo/heldout/calibration.jsonl` (train split, mixed "
                             f"domains), seed 0; all-expert subsample {self.subsample} tokens "
                             "per layer")),
            ("single-domain calibration", f"same size, `{self.calibration_domain}` documents of "
                                          "calibration.jsonl only, "
                                          f"{self.calibration_domain_budget:.0%} budget, "
                                          + ("every model" if self.calibration_domain_all_models
                                             else "first model")),
            ("evaluation", (f"held-out test split, {cap(self.eval_tokens)} predicted tokens per "
                            "domain in windows of 256 tokens spread evenly over the whole split "
                            "(grape.evaluation.perplexity's packing), float32")),
            ("layer sensitivity / measured curves",
             (f"each layer alone loses {', '.join(f'{f:.0%}' for f in self.curve_fractions)} of "
              f"its experts (REAP's choice); validation split, {cap(self.sensitivity_tokens)} "
              "tokens per domain, same windowing")),
            ("loss-verified search (`grape-run`)",
             (f"grape.search defaults, at most {self.search_passes} forward passes over "
              f"{self.search_samples} x 256 tokens per domain of the validation split, the "
              f"finalists confirmed on {self.confirm_samples} x 256 per domain "
              "(grape.searching.stage.search_tokens, as `grape run` on the test bed)")),
            ("solver time limit", f"{self.time_limit:g} s per solve"),
            ("lm-eval (local tasks)", lm if self.lmeval == "none" else
             f"{lm}; kinds {', '.join(self.lmeval_kinds)}, {self.lmeval_examples} examples per "
             "domain and kind, accuracy = mean acc over the tasks"),
        ]


FAST = Settings(mode="fast")
FULL = Settings(
    mode="full", budgets=(0.125, 0.25, 0.375, 0.5), calib_samples=128, eval_tokens=None,
    sensitivity_tokens=None, time_limit=60.0, calibration_domain_all_models=True, lmeval="all",
    lmeval_examples=100, lmeval_kinds=("scramble", "nextline", "cloze"),
)


def log(msg: str) -> None:
    print(msg, flush=True)


# -- models, data, calibration --------------------------------------------------------------------
def finished(model_dir: Path) -> bool:
    """Weights present and, when the training summary is there, training finished (train.py
    writes intermediate checkpoints while a model is still training)."""
    if not (model_dir / "model.safetensors").exists():
        return False
    summary = model_dir / "zoo_train.json"
    if not summary.exists():
        return True
    try:
        return bool(json.loads(summary.read_text(encoding="utf-8")).get("finished", True))
    except json.JSONDecodeError:
        return False


def available_models() -> list[str]:
    present = [p.name for p in (ZOO / "models").iterdir() if finished(p)]
    return sorted(present, key=lambda n: (ZOO_ORDER.index(n) if n in ZOO_ORDER else 99, n))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def calibration_texts(domain: str | None) -> list[str]:
    rows = [json.loads(line) for line in (ZOO / "heldout" / "calibration.jsonl").read_text(
        encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows if domain is None or r.get("domain") == domain]


def cached_scores(model, tokenizer, name: str, calibration: str, settings: Settings,
                  cache_dir: Path) -> Scores:
    """Calibrate once per model and calibration set; the cache key includes the weights' hash."""
    import grape

    digest = file_digest(ZOO / "models" / name / "model.safetensors")
    # the reconstruction order's rows (CalibrationConfig's default) are part of what was measured
    key = (f"{name}-{calibration}-{settings.calib_samples}x{settings.calib_seq_len}"
           f"-sub{settings.subsample}-rec{grape.CalibrationConfig().reconstruction_tokens}-{digest}.npz")
    path = cache_dir / key
    if path.exists():
        log(f"  scores from cache: {path}")
        return Scores.load(path)
    start = time.perf_counter()
    texts = calibration_texts(None if calibration == "mixed" else calibration)
    config = grape.CalibrationConfig(samples=settings.calib_samples, seq_len=settings.calib_seq_len,
                                     subsample=settings.subsample, seed=0, progress=False)
    scores = grape.calibrate(model, [texts], config, tokenizer=tokenizer)  # one in-memory source
    scores.calibration["data_name"] = calibration
    scores.save(path)
    log(f"  calibrated [{calibration}] in {time.perf_counter() - start:.0f} s -> {path}")
    return scores


def _lengths(tokenizer, texts) -> list[int]:
    """Each document's token count, tokenised as grape.evaluation.perplexity.token_stream does."""
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]


def window_documents(lengths: list[int], stream_length: int, seq_len: int) -> list[int]:
    """The document that gives each window (pack_windows over token_stream's EOS-joined stream)
    most of its predicted tokens: the unit of the standard errors (grape.evaluation.stats), since
    windows of one document are not independent. A document owns its tokens and the EOS after
    them (predicting the EOS ends it); the leading EOS is never predicted."""
    separators = stream_length - sum(lengths)  # one EOS before each document and after the last
    if separators not in (0, len(lengths) + 1):
        raise ValueError(f"{stream_length} stream tokens do not match documents of {sum(lengths)} tokens")
    step = 1 if separators else 0
    owner = np.repeat(np.arange(len(lengths)), np.asarray(lengths) + step)
    if separators:
        owner = np.concatenate([[0], owner])
    return [int(np.bincount(owner[start + 1:start + seq_len + 1]).argmax())
            for start in range(0, max(stream_length - 1, 0), seq_len)]


class Evaluator:
    """NLL per domain on windows spread evenly over each domain's whole held-out stream, and
    (optionally) local lm-eval accuracy on tasks built from the same documents.

    The stream and windows follow grape.evaluation.perplexity's protocol (documents joined with EOS, windows
    of `seq_len` inputs overlapping by one token); a token cap keeps `ceil(cap / seq_len)`
    windows evenly spaced over the stream instead of the first documents only."""

    def __init__(self, tokenizer, docs, seq_len: int, max_tokens: int | None, batch: int,
                 settings: Settings, task_dir: Path):
        from grape.evaluation.perplexity import EvalConfig, pack_windows, spread_windows, token_stream

        self.tokenizer, self.docs, self.batch = tokenizer, docs, batch
        self.windows, self.documents = {}, {}  # domain -> windows, and each window's document
        for domain, texts in docs.items():
            stream, _ = token_stream(tokenizer, texts, None)
            windows = pack_windows(stream, seq_len)
            owners = window_documents(_lengths(tokenizer, texts), len(stream), seq_len)
            if max_tokens is not None and max_tokens < len(windows) * seq_len:
                take = spread_windows(range(len(windows)), math.ceil(max_tokens / seq_len))
                windows, owners = [windows[i] for i in take], [owners[i] for i in take]
            self.windows[domain], self.documents[domain] = windows, owners
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.task_config = EvalConfig(seq_len=seq_len, perplexity=False, tasks=("local",),
                                      local_task_kinds=settings.lmeval_kinds,
                                      local_task_examples=settings.lmeval_examples,
                                      local_task_dir=str(task_dir), batch_size=16, progress=False)
        self.task_seconds: list[float] = []

    @property
    def tokens(self) -> dict[str, int]:
        return {d: sum(len(w) - 1 for w in ws) for d, ws in self.windows.items()}

    def nll(self, model) -> tuple[dict[str, float], dict[str, list[float]]]:
        """Mean NLL per domain, and each window's mean NLL (for paired standard errors)."""
        from grape.evaluation.perplexity import input_device, window_losses

        device = input_device(model)
        was_training = model.training
        model.eval()
        means, per_window = {}, {}
        try:
            for domain, windows in self.windows.items():
                sums, counts = [], []
                for start in range(0, len(windows), self.batch):
                    s, c = window_losses(model, windows[start:start + self.batch], self.pad_id,
                                         device)
                    sums += s
                    counts += c
                means[domain] = sum(sums) / sum(counts)
                per_window[domain] = [round(s / c, 6) for s, c in zip(sums, counts)]
        finally:
            model.train(was_training)
        return means, per_window

    def tasks(self, model) -> dict[str, float]:
        from grape.evaluation.perplexity import evaluate

        for name in ("lm-eval", "lm_eval", "datasets", "transformers"):
            logging.getLogger(name).setLevel(logging.ERROR)
        start = time.perf_counter()
        result = evaluate(model, self.tokenizer, self.docs, self.task_config)
        self.task_seconds.append(time.perf_counter() - start)
        return {name: t.acc for name, t in result.tasks.items() if t.acc is not None}

