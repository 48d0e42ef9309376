"""Evaluate a (pruned) MoE language model: mean NLL and perplexity per domain on held-out text,
plus lm-evaluation-harness tasks run in-process and offline.

    from grape.evaluation.perplexity import EvalConfig, evaluate, load_documents
    docs = load_documents(["heldout/prose.test.jsonl", "code=my_file.py"])
    result = evaluate(model, tokenizer, docs, EvalConfig(seq_len=256, tasks=("local",)))
    print(result.to_markdown(baseline=unpruned_result))

Protocol (docs/evaluation.md): each domain's documents are tokenised in order, joined with the
EOS token into one stream, cut into windows of `seq_len` inputs that overlap by one token (so
every token after the first is predicted exactly once and no context crosses a window), and
scored by next-token cross entropy in float32. `max_tokens_per_domain` caps the predicted
tokens per domain by taking the first documents. Everything is deterministic. The documents
come from grape.data.heldout (re-exported here).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from grape.errors import DataError, UserError
from grape.flags import flag
from grape.data.heldout import Documents, default_heldout_files, load_documents  # re-exported
from grape.evaluation.lmeval_tasks import TaskScore
from grape.models.loading import input_device

RESULT_FORMAT = "grape-eval"
RESULT_VERSION = 1
_IGNORE = -100



# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate. Perplexity fields first, then lm-eval task fields."""

    # the flagged fields are also `grape eval` flags (grape/flags.py)
    seq_len: int = field(default=256, metadata=flag(
        "tokens per window (unset: 256); one longer than the model's context is capped at it, "
        "with a notice", unset=True))
    max_tokens_per_domain: int | None = field(default=65_536, metadata=flag(
        "predicted tokens per domain (0 = all)", name="max_tokens", type=int, zero_none=True))
    batch_size: int = field(default=8, metadata=flag("windows per forward pass"))
    eos_between_documents: bool = True  # join documents with EOS, as in training-time packing
    perplexity: bool = field(default=True, metadata=flag(
        "skip the NLL/perplexity pass (tasks only)", negate=True))
    tasks: tuple[str, ...] = field(default=(), metadata=flag(
        "comma-separated lm-eval tasks: 'local' (multiple-choice tasks built from the held-out "
        "text, see --task-kinds), names of tasks under --task-path, or built-in task names whose "
        "data is cached locally; empty: none. Every name is checked before the model is loaded",
        items=True, empty=""))
    task_paths: tuple[str, ...] = field(default=(), metadata=flag(
        "directories (or YAML files) with your own lm-eval task configs", name="task_path",
        nargs="+", metavar="DIR"))
    local_task_kinds: tuple[str, ...] = field(default=("scramble", "nextline", "cloze"), metadata=flag(
        "kinds of local tasks to build for --tasks local: scramble (true next line vs copies with "
        "two words swapped), nextline (true next line vs lines of other documents), cloze (last "
        "word of a line vs words of other documents)", name="task_kinds", items=True))
    local_task_examples: int = field(default=100, metadata=flag(
        "local task examples per domain and kind", name="task_examples"))
    local_task_dir: str | None = None  # where local tasks are written; None = a temporary dir
    task_limit: int | None = field(default=None, metadata=flag(
        "lm-eval limit: examples per task (quick checks only)", type=int))
    num_fewshot: int | None = field(default=None, metadata=flag("lm-eval few-shot count", type=int))
    seed: int = field(default=0, metadata=flag("seed of the local tasks and lm-eval"))
    progress: bool = field(default=True, metadata=flag("hide progress bars", negate=True))
    verbose: bool = field(default=False, metadata=flag(
        "show lm-eval's, datasets' and transformers' own logs and progress bars while tasks run "
        "(quiet by default)"))

    def __post_init__(self) -> None:
        # tuples, so a config built from lists (JSON, argparse) stays hashable and comparable
        for name in ("tasks", "task_paths", "local_task_kinds"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        checks = {
            "seq_len": self.seq_len >= 2,
            "batch_size": self.batch_size >= 1,
            "max_tokens_per_domain": self.max_tokens_per_domain is None
            or self.max_tokens_per_domain >= 1,
            "local_task_examples": self.local_task_examples >= 1,
            "task_limit": self.task_limit is None or self.task_limit >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise UserError(f"EvalConfig.{name}={getattr(self, name)!r} is out of range; "
                                f"use a positive value (seq_len >= 2).")
        if not self.perplexity and not self.tasks:
            raise UserError("nothing to evaluate: perplexity is off and no lm-eval tasks were "
                            "given; pass tasks (e.g. 'local') or turn perplexity on.")


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainNLL:
    """Mean next-token NLL of one domain. `tokens` counts predicted tokens."""

    domain: str
    nll: float  # nats per token
    tokens: int
    windows: int
    documents: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@dataclass
class EvalResult:
    model: str
    config: EvalConfig
    domains: dict[str, DomainNLL] = field(default_factory=dict)
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def mean_nll(self) -> float:
        """Mean over domains: every domain counts the same, whatever its size."""
        return sum(d.nll for d in self.domains.values()) / len(self.domains)

    @property
    def weighted_nll(self) -> float:
        """Token-weighted mean: total NLL over all predicted tokens."""
        total = sum(d.tokens for d in self.domains.values())
        return sum(d.nll * d.tokens for d in self.domains.values()) / total

    @property
    def tokens(self) -> int:
        return sum(d.tokens for d in self.domains.values())

    def nll_increase(self, baseline: EvalResult) -> dict[str, float]:
        """NLL of this model minus the baseline's (usually the unpruned model), per shared
        domain, plus "mean" and "weighted" over those domains."""
        shared = [d for d in self.domains if d in baseline.domains]
        if not shared:
            raise DataError(f"baseline result for {baseline.model!r} shares no domain with "
                            f"{sorted(self.domains)}; evaluate both on the same data.")
        out = {d: self.domains[d].nll - baseline.domains[d].nll for d in shared}
        out["mean"] = sum(out[d] for d in shared) / len(shared)
        weights = [self.domains[d].tokens for d in shared]
        out["weighted"] = sum(out[d] * w for d, w in zip(shared, weights)) / sum(weights)
        return out

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self, baseline: EvalResult | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": RESULT_FORMAT,
            "version": RESULT_VERSION,
            "model": self.model,
            "config": asdict(self.config),
            "perplexity": None,
            "tasks": {name: {"metrics": t.metrics, "samples": t.samples}
                      for name, t in self.tasks.items()},
            "seconds": self.seconds,
        }
        if self.domains:
            out["perplexity"] = {
                "domains": {d: {"nll": r.nll, "ppl": r.ppl, "tokens": r.tokens,
                                "windows": r.windows, "documents": r.documents}
                            for d, r in self.domains.items()},
                "mean_nll": self.mean_nll,
                "mean_ppl": math.exp(self.mean_nll),
                "weighted_nll": self.weighted_nll,
                "weighted_ppl": math.exp(self.weighted_nll),
                "tokens": self.tokens,
            }
            if baseline is not None and baseline.domains:
                out["perplexity"]["baseline_model"] = baseline.model
                out["perplexity"]["nll_increase"] = self.nll_increase(baseline)
        return out

    def to_json(self, baseline: EvalResult | None = None) -> str:
        return json.dumps(self.to_dict(baseline), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> EvalResult:
        if not isinstance(data, Mapping) or data.get("format") != RESULT_FORMAT:
            raise DataError(f"{source} is not a grape eval result (no \"format\": "
                            f"\"{RESULT_FORMAT}\"); pass the eval.json written by `grape eval`.")
        ppl = data.get("perplexity") or {}
        domains = {d: DomainNLL(d, float(r["nll"]), int(r["tokens"]), int(r["windows"]),
                                int(r["documents"]))
                   for d, r in ppl.get("domains", {}).items()}
        tasks = {n: TaskScore(n, {k: float(v) for k, v in t["metrics"].items()}, t.get("samples"))
                 for n, t in data.get("tasks", {}).items()}
        known = EvalConfig.__dataclass_fields__
        config = EvalConfig(**{k: v for k, v in data.get("config", {}).items() if k in known})
        return cls(str(data.get("model", "")), config, domains, tasks,
                   dict(data.get("seconds", {})))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> EvalResult:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"eval result {path} does not exist; run `grape eval --out DIR` "
                            "first and pass DIR/eval.json.") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read eval result {path}: {exc}") from None
        return cls.from_dict(data, source=str(path))

    def to_markdown(self, baseline: EvalResult | None = None) -> str:
        lines = [f"# Evaluation of `{self.model}`", ""]
        if self.domains:
            c = self.config
            cap = "all" if c.max_tokens_per_domain is None else f"{c.max_tokens_per_domain:,}"
            lines += [(f"Held-out NLL (nats/token), windows of {c.seq_len} tokens, "
                      f"at most {cap} predicted tokens per domain."), ""]
            increase = self.nll_increase(baseline) if baseline and baseline.domains else None
            head = "| domain | documents | tokens | NLL | perplexity |"
            rule = "|---|---:|---:|---:|---:|"
            if increase is not None:
                head += " NLL increase |"
                rule += "---:|"
            lines += [head, rule]
            rows = [(d, str(r.documents), f"{r.tokens:,}", r.nll, d)
                    for d, r in self.domains.items()]
            rows.append(("**mean over domains**", "", "", self.mean_nll, "mean"))
            rows.append(("**token-weighted**", "", f"{self.tokens:,}", self.weighted_nll,
                         "weighted"))
            for name, docs, toks, nll, key in rows:
                row = f"| {name} | {docs} | {toks} | {nll:.4f} | {math.exp(nll):.2f} |"
                if increase is not None:
                    row += f" {increase[key]:+.4f} |" if key in increase else " |"
                lines.append(row)
            if increase is not None:
                lines += ["", f"NLL increase is against `{baseline.model}`."]
            lines.append("")
        if self.tasks:
            lines += ["## lm-eval tasks", "", "| task | samples | acc | acc_norm |",
                      "|---|---:|---:|---:|"]
            def fmt(v: float | None) -> str:
                return "" if v is None else f"{v:.4f}"

            for name, t in self.tasks.items():
                samples = "" if t.samples is None else str(t.samples)
                lines.append(f"| {name} | {samples} | {fmt(t.acc)} | {fmt(t.acc_norm)} |")
            lines.append("")
        return "\n".join(lines)


# -- perplexity ------------------------------------------------------------------------------


def token_stream(tokenizer, documents: Sequence[str], max_tokens: int | None,
                 eos_between_documents: bool = True, chunk: int = 32) -> tuple[list[int], int]:
    """One domain's documents as a single token stream: [EOS] doc1 [EOS] doc2 [EOS] ...

    The leading EOS gives the first document a context, so all its tokens are predicted.
    Stops tokenising once `max_tokens + 1` tokens are there. Returns (stream, documents used).
    (verbose=False: documents longer than model_max_length are fine here, they get windowed.)
    """
    eos = tokenizer.eos_token_id if eos_between_documents else None
    stream: list[int] = [] if eos is None else [eos]
    need = None if max_tokens is None else max_tokens + 1
    used = 0
    for start in range(0, len(documents), chunk):
        batch = list(documents[start:start + chunk])
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            stream += ids + ([] if eos is None else [eos])
            used += 1
            if need is not None and len(stream) >= need:
                return stream[:need], used
    return stream, used


def spread_windows(windows: Sequence, count: int) -> list:
    """At most `count` of `windows`, evenly spaced from the first to the last, so a sample of a
    split covers all its documents instead of the first few."""
    import numpy as np

    take = np.unique(np.linspace(0, len(windows) - 1, min(count, len(windows))).round().astype(int))
    return [windows[i] for i in take]


def pack_windows(stream: Sequence[int], seq_len: int) -> list[list[int]]:
    """Windows of up to seq_len + 1 tokens with stride seq_len: a window's inputs are all but its
    last token and its labels all but its first, so each token after the first is predicted
    once. The last window may be shorter; a lone leftover token is dropped (nothing to predict)."""
    return [list(stream[i:i + seq_len + 1]) for i in range(0, max(len(stream) - 1, 0), seq_len)]


@torch.inference_mode()
def window_losses(model: torch.nn.Module, windows: Sequence[Sequence[int]], pad_id: int,
                  device: torch.device) -> tuple[list[float], list[int]]:
    """Summed next-token NLL (nats, float32 softmax) and predicted-token count of *each* window
    of a batch, right-padded; padded positions are masked out of attention and of the loss.
    Per-window sums let a benchmark pair windows across models (paired differences)."""
    width = max(len(w) for w in windows) - 1
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(windows), width), _IGNORE, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, window in enumerate(windows):
        n = len(window) - 1
        ids[row, :n] = torch.tensor(window[:-1])
        labels[row, :n] = torch.tensor(window[1:])
        mask[row, :n] = 1
    ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    labels = labels.to(logits.device)
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=_IGNORE,
                           reduction="none").view(len(windows), width)
    counts = (labels != _IGNORE).sum(dim=1)
    return loss.double().sum(dim=1).tolist(), counts.tolist()


def window_nll(model: torch.nn.Module, windows: Sequence[Sequence[int]], pad_id: int,
               device: torch.device) -> tuple[float, int]:
    """Summed next-token NLL and predicted-token count of a batch of windows (see window_losses)."""
    losses, counts = window_losses(model, windows, pad_id, device)
    return float(sum(losses)), int(sum(counts))


def domain_nll(model: torch.nn.Module, tokenizer, docs: Documents, config: EvalConfig
               ) -> dict[str, DomainNLL]:
    """Mean NLL per domain; one progress bar over all windows of all domains."""
    device = input_device(model)
    pad_id = _pad_id(tokenizer)
    packed = {}
    for domain, texts in docs.items():
        stream, used = token_stream(tokenizer, texts, config.max_tokens_per_domain,
                                    config.eos_between_documents)
        windows = pack_windows(stream, config.seq_len)
        if not windows:
            raise DataError(f"domain {domain!r} has fewer than 2 tokens of text; give it longer "
                            "documents or leave it out.")
        packed[domain] = (windows, used)
    was_training = model.training
    model.eval()
    results = {}
    try:
        bar = tqdm(total=sum(len(w) for w, _ in packed.values()), unit="window",
                   desc="perplexity", disable=not config.progress)
        with bar:
            for domain, (windows, used) in packed.items():
                bar.set_postfix_str(domain)
                total, count = 0.0, 0
                for start in range(0, len(windows), config.batch_size):
                    batch = windows[start:start + config.batch_size]
                    loss, n = window_nll(model, batch, pad_id, device)
                    total, count = total + loss, count + n
                    bar.update(len(batch))
                results[domain] = DomainNLL(domain, total / count, count, len(windows), used)
    finally:
        model.train(was_training)
    return results


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0  # padded positions are masked and ignored, so any valid id will do


def _fit_seq_len(model: torch.nn.Module, config: EvalConfig) -> EvalConfig:
    """Windows past the model's context are capped at it, with a notice (the one policy of
    grape.models.files.cap_seq_len, for every stage)."""
    from grape.models.files import cap_seq_len

    model_config = getattr(model, "config", None)
    if model_config is None or not hasattr(model_config, "to_dict"):
        return config
    seq_len = cap_seq_len(config.seq_len, model_config.to_dict(), "seq_len", "evaluate")
    return config if seq_len == config.seq_len else replace(config, seq_len=seq_len)


# -- the verb --------------------------------------------------------------------------------


def evaluate(model: torch.nn.Module, tokenizer, data: Mapping[str, Sequence[str]] | str
             | os.PathLike | Sequence[str | os.PathLike] | None = None,
             config: EvalConfig | None = None, name: str | None = None) -> EvalResult:
    """Evaluate `model` (an HF causal LM, possibly device_map-sharded) with `tokenizer` on `data`
    (anything load_documents takes; None = the test bed's held-out test split)."""
    config = _fit_seq_len(model, config or EvalConfig())
    docs = load_documents(default_heldout_files() if data is None else data)
    name = name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or
                       type(model).__name__)
    result = EvalResult(model=name, config=config)
    if config.tasks:  # a task that cannot run offline fails now, not after the perplexity pass
        from grape.evaluation.lmeval_offline import check_eval_tasks

        check_eval_tasks(config, docs)
    if config.perplexity:
        start = time.perf_counter()
        result.domains = domain_nll(model, tokenizer, docs, config)
        result.seconds["perplexity"] = time.perf_counter() - start
    if config.tasks:
        from grape.evaluation.lmeval_tasks import run_tasks  # lm_eval is optional and slow to import

        start = time.perf_counter()
        result.tasks = run_tasks(model, tokenizer, docs, config)
        result.seconds["tasks"] = time.perf_counter() - start
    return result


__all__ = [
    "DomainNLL",
    "EvalConfig",
    "EvalResult",
    "TaskScore",
    "default_heldout_files",
    "domain_nll",
    "evaluate",
    "load_documents",
    "pack_windows",
    "spread_windows",
    "window_losses",
    "token_stream",
]
