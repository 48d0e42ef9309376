"""lm-evaluation-harness, in-process and offline: local multiple-choice tasks built from held-out
documents, and any task the user has locally, passed through by name.

Local task kinds (one lm-eval task per domain and kind, named grape_{kind}_{domain}, all tagged
`grape_local`):

- scramble: context = up to 4 lines of a document; choices = the true next line and 3 copies of
  it with two words swapped (minimal pairs: the words are the same, only their order differs).
- nextline: context = up to 4 lines of a document; choices = the true next line and 3 lines
  drawn from other documents of the same domain.
- cloze: context = the text of a document up to the last word of a line; choices = that word
  and 3 words drawn from other documents of the same domain (by occurrence, so frequent words
  are frequent distractors).

Everything is drawn from a random.Random seeded by (seed, kind, domain): the same documents and
seed give byte-identical task files.

`quiet_lm_eval()` silences lm-eval's, datasets' and transformers' logs and progress bars while
tasks run (grape eval --verbose keeps them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from grape.errors import DataError
from grape.models.loading import input_device
from solvers._io import atomic_write_text

LOCAL_TASKS = "local"  # in EvalConfig.tasks: build multiple-choice tasks from the eval documents
LOCAL_TAG = "grape_local"
N_CHOICES = 4
CONTEXT_LINES = 4
MAX_CONTEXT_CHARS = 600  # about 150-250 tokens: fits small models; lm-eval cuts longer ones from the left
MIN_LINE_CHARS, MAX_LINE_CHARS = 8, 160
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")


@dataclass(frozen=True)
class TaskScore:
    """One lm-eval task (or group): its numeric metrics, e.g. {"acc": .., "acc_norm": ..}."""

    name: str
    metrics: dict[str, float]
    samples: int | None = None

    @property
    def acc(self) -> float | None:
        return self.metrics.get("acc")

    @property
    def acc_norm(self) -> float | None:
        return self.metrics.get("acc_norm")


@dataclass(frozen=True)
class Example:
    context: str
    choices: list[str]
    label: int


@dataclass(frozen=True)
class LocalTaskKind:
    """How one kind of local task is built and presented to lm-eval."""

    name: str
    make: Callable[[list[str], int, random.Random], list[Example]]
    target_delimiter: str  # put between context and each choice
    needs: str  # what a domain must contain, for the error message when it yields no example


LOCAL_TASK_KINDS: dict[str, LocalTaskKind] = {}


def register_kind(kind: LocalTaskKind) -> LocalTaskKind:
    LOCAL_TASK_KINDS[kind.name] = kind
    return kind


# -- example builders ------------------------------------------------------------------------


def _good_line(line: str) -> bool:
    return MIN_LINE_CHARS <= len(line.strip()) <= MAX_LINE_CHARS


def _spread(candidates: list[tuple[int, Any]], n: int, rng: random.Random) -> list[tuple[int, Any]]:
    """Up to n candidates (doc index, payload), spread over documents: shuffle each document's
    candidates, then take round-robin over documents in a shuffled order."""
    by_doc: dict[int, list] = {}
    for doc, payload in candidates:
        by_doc.setdefault(doc, []).append(payload)
    order = sorted(by_doc)
    rng.shuffle(order)
    for doc in order:
        rng.shuffle(by_doc[doc])
    picked, depth = [], 0
    while len(picked) < n and any(depth < len(by_doc[d]) for d in order):
        picked += [(d, by_doc[d][depth]) for d in order if depth < len(by_doc[d])]
        depth += 1
    return picked[:n]


def _distractors(true: str, pool: list[tuple[int, str]], doc: int, rng: random.Random,
                 key: Callable[[str], str] = str.strip) -> list[str] | None:
    """N_CHOICES - 1 distinct items of `pool` from documents other than `doc`, all different
    from `true` (compared by `key`); None if the pool cannot supply them."""
    seen, out = {key(true)}, []
    for _ in range(50 * N_CHOICES):
        other_doc, item = pool[rng.randrange(len(pool))]
        if other_doc != doc and key(item) not in seen:
            seen.add(key(item))
            out.append(item)
            if len(out) == N_CHOICES - 1:
                return out
    return None


def _assemble(context: str, true: str, distractors: list[str], rng: random.Random) -> Example:
    label = rng.randrange(N_CHOICES)
    choices = list(distractors)
    choices.insert(label, true)
    return Example(context, choices, label)


def _clip_context(text: str) -> str:
    """The last MAX_CONTEXT_CHARS characters, cut at a line start when one is available."""
    if len(text) <= MAX_CONTEXT_CHARS:
        return text
    tail = text[-MAX_CONTEXT_CHARS:]
    cut = tail.find("\n")
    return tail[cut + 1:] if 0 <= cut < len(tail) - 1 else tail


def nextline_examples(documents: list[str], n: int, rng: random.Random) -> list[Example]:
    lines = [doc.split("\n") for doc in documents]
    pool = [(d, line) for d, doc in enumerate(lines) for line in doc if _good_line(line)]
    candidates = [(d, i) for d, doc in enumerate(lines) for i in range(1, len(doc))
                  if _good_line(doc[i])
                  and any(_good_line(c) for c in doc[max(0, i - CONTEXT_LINES):i])]
    examples = []
    for d, i in _spread(candidates, n, rng):
        true = lines[d][i]
        others = _distractors(true, pool, d, rng)
        if others is not None:
            context = _clip_context("\n".join(lines[d][max(0, i - CONTEXT_LINES):i]))
            examples.append(_assemble(context, true, others, rng))
    return examples


def cloze_examples(documents: list[str], n: int, rng: random.Random) -> list[Example]:
    pool = [(d, m.group()) for d, doc in enumerate(documents) for m in _WORD.finditer(doc)]
    candidates = []
    for d, doc in enumerate(documents):
        offset = 0
        for line in doc.split("\n"):
            words = list(_WORD.finditer(line)) if len(line.strip()) >= 12 else []
            # the last word of the line, with something before it on the line
            if words and words[-1].start() > 0:
                candidates.append((d, (offset + words[-1].start(), words[-1].group())))
            offset += len(line) + 1
    examples = []
    for d, (start, word) in _spread(candidates, n, rng):
        others = _distractors(word, pool, d, rng, key=lambda w: w)
        if others is not None:
            examples.append(_assemble(_clip_context(documents[d][:start]), word, others, rng))
    return examples


_TOKEN = re.compile(r"\S+")


def _swap(line: str, i: int, j: int, spans: list[tuple[int, int]]) -> str:
    """`line` with its i-th and j-th whitespace-separated tokens exchanged (spacing kept)."""
    (a0, a1), (b0, b1) = spans[i], spans[j]
    return line[:a0] + line[b0:b1] + line[a1:b0] + line[a0:a1] + line[b1:]


def scramble_examples(documents: list[str], n: int, rng: random.Random) -> list[Example]:
    """Minimal pairs: the true next line against 3 copies of it with two of its words swapped.
    The choices share their words, so a word's own frequency cancels out and only the model's
    sense of order (syntax, idiom) decides."""
    lines = [doc.split("\n") for doc in documents]
    candidates = [(d, i) for d, doc in enumerate(lines) for i in range(1, len(doc))
                  if _good_line(doc[i]) and len(set(_TOKEN.findall(doc[i]))) >= 4
                  and any(_good_line(c) for c in doc[max(0, i - CONTEXT_LINES):i])]
    examples = []
    for d, i in _spread(candidates, n, rng):
        true = lines[d][i]
        spans = [m.span() for m in _TOKEN.finditer(true)]
        variants: list[str] = []
        for _ in range(50):
            a, b = sorted(rng.sample(range(len(spans)), 2))
            variant = _swap(true, a, b, spans)
            if variant != true and variant not in variants:
                variants.append(variant)
                if len(variants) == N_CHOICES - 1:
                    break
        if len(variants) == N_CHOICES - 1:
            context = _clip_context("\n".join(lines[d][max(0, i - CONTEXT_LINES):i]))
            examples.append(_assemble(context, true, variants, rng))
    return examples


register_kind(LocalTaskKind("nextline", nextline_examples, target_delimiter="\n",
                            needs="lines of 8-160 characters"))
register_kind(LocalTaskKind("cloze", cloze_examples, target_delimiter="",
                            needs="lines of 12+ characters ending in a word of 3+ letters"))
register_kind(LocalTaskKind("scramble", scramble_examples, target_delimiter="\n",
                            needs="lines of 8-160 characters with 4+ distinct words"))


# -- task files ------------------------------------------------------------------------------


def task_name(kind: str, domain: str) -> str:
    return f"grape_{kind}_{re.sub(r'[^a-z0-9_]+', '_', domain.lower()).strip('_') or 'text'}"


def task_yaml(name: str, data_file: Path, kind: LocalTaskKind, info: Mapping[str, Any]) -> str:
    config = {
        "task": name,
        "tag": [LOCAL_TAG],
        "dataset_path": "json",
        # absolute: lm-eval resolves relative data_files against the current directory
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",  # field names: lm-eval reads the field, no template involved
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": kind.target_delimiter,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0, **info},
    }
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def build_local_tasks(docs_by_domain: Mapping[str, Sequence[str]], out_dir: str | os.PathLike,
                      n_per_domain: int = 100, seed: int = 0,
                      kinds: Sequence[str] = ("scramble", "nextline", "cloze")) -> list[str]:
    """Write one lm-eval multiple-choice task per (kind, domain) into out_dir as
    {name}.jsonl + {name}.yaml (absolute data paths), and return the task names.
    Load them with lm_eval.tasks.TaskManager(include_path=out_dir)."""
    unknown = [k for k in kinds if k not in LOCAL_TASK_KINDS]
    if unknown:
        raise DataError(f"unknown local task kind(s) {unknown}; choose from "
                        f"{sorted(LOCAL_TASK_KINDS)}.")
    out = Path(out_dir).resolve()
    names = []
    for kind_name in kinds:
        kind = LOCAL_TASK_KINDS[kind_name]
        for domain, documents in docs_by_domain.items():
            rng = random.Random(f"grape-local:{seed}:{kind_name}:{domain}")
            examples = kind.make([d for d in documents if d.strip()], n_per_domain, rng)
            if not examples:
                raise DataError(f"cannot build a {kind_name!r} task for domain {domain!r}: it "
                                f"needs at least 2 documents with {kind.needs}.")
            name = task_name(kind_name, domain)
            if name in names:
                raise DataError(f"domains map to the same task name {name!r}; rename a domain.")
            data_file = out / f"{name}.jsonl"
            atomic_write_text(data_file, "".join(
                json.dumps({"context": e.context, "choices": e.choices, "label": e.label},
                           ensure_ascii=False) + "\n" for e in examples))
            info = {"domain": domain, "kind": kind_name, "seed": seed, "examples": len(examples)}
            atomic_write_text(out / f"{name}.yaml", task_yaml(name, data_file, kind, info))
            names.append(name)
    return names


# -- running lm-eval -------------------------------------------------------------------------


def force_offline() -> None:
    """No hub or dataset downloads: set the env flags, and the flags of already-imported
    libraries (they read the environment once, at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import sys

    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_DATASETS_OFFLINE = True


def task_manager(names: Sequence[str], include_paths: Sequence[str | os.PathLike]):
    """A TaskManager that knows `names`. The built-in registry (about 10 s to index) is
    included only when a name is not found in the include paths."""
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).resolve()) for p in include_paths]
    for p in paths:
        if not Path(p).exists():
            raise DataError(f"lm-eval task path {p} does not exist; pass a directory (or YAML "
                            "file) holding lm-eval task configs.")
    manager = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
    if manager is None or any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=paths or None, include_defaults=True)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        raise DataError(f"unknown lm-eval task(s) {missing}: not built in and not found under "
                        f"{paths or 'any include path'}; pass the directory holding their YAML "
                        "with --task-path, or 'local' for tasks built from the held-out text.")
    return manager


def _scores(results: Mapping[str, Any]) -> dict:
    samples = results.get("n-samples", {})
    out = {}
    for name, entry in results.get("results", {}).items():
        metrics = {}
        for key, value in entry.items():
            metric, _, filt = key.partition(",")
            if filt and "_stderr" not in metric and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and math.isfinite(value):
                # "acc,none" -> "acc"; other filters keep their name
                metrics[metric if filt == "none" else key] = float(value)
        n = samples.get(name, {}).get("effective")
        out[name] = TaskScore(name, metrics, None if n is None else int(n))
    return out


def run_lm_eval(model, tokenizer, tasks: Sequence[str], include_paths: Sequence[str] = (),
                batch_size: int = 8, limit: int | None = None, num_fewshot: int | None = None,
                seed: int = 0, verbose: bool = False, progress: bool = True) -> dict:
    """Run lm-eval tasks in-process on a model object; returns {task or group: TaskScore}.
    lm-eval's own logs and bars are silenced unless `verbose` (its request bar shows when
    `progress`)."""
    force_offline()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    try:
        with quiet_lm_eval(quiet=not verbose, progress=progress):
            manager = task_manager(tasks, include_paths)
            # pass the tokenizer object: given only the model, HFLM would fetch one from the hub
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                      device=str(input_device(model)))
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=False,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed)
    except (ConnectionError, FileNotFoundError) as exc:
        raise DataError(f"lm-eval could not load the data of {list(tasks)} offline ({exc}); "
                        "use tasks whose datasets are on this machine (local JSON files or the "
                        "HF datasets cache).") from None
    return _scores(results)


def run_tasks(model, tokenizer, docs_by_domain: Mapping[str, Sequence[str]], config) -> dict:
    """EvalConfig.tasks, with "local" expanded to tasks built from `docs_by_domain`."""
    names = [t for t in config.tasks if t != LOCAL_TASKS]
    paths = list(config.task_paths)
    with tempfile.TemporaryDirectory(prefix="grape-tasks-") as tmp:
        if LOCAL_TASKS in config.tasks:
            out = config.local_task_dir or tmp
            local = build_local_tasks(docs_by_domain, out, config.local_task_examples,
                                      config.seed, config.local_task_kinds)
            names, paths = local + names, [out, *paths]
        return run_lm_eval(model, tokenizer, names, paths, config.batch_size, config.task_limit,
                           config.num_fewshot, config.seed, verbose=config.verbose,
                           progress=config.progress)


# -- quiet ------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_lm_eval(quiet: bool = True, progress: bool = False) -> Iterator[None]:
    """While lm-eval runs: its loggers (and datasets' and transformers') at ERROR, dataset
    preparation bars off, and its per-request bar only when `progress`. Everything is restored
    afterwards, so the caller's logging set-up is untouched. quiet=False changes nothing."""
    with contextlib.ExitStack() as undo:
        if quiet:
            for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
                logger = logging.getLogger(name)
                undo.callback(logger.setLevel, logger.level)
                logger.setLevel(logging.ERROR)
            _silence_bars(undo, progress)
        yield


def _silence_bars(undo: contextlib.ExitStack, progress: bool) -> None:
    """Swap the tqdm of lm-eval's task building and tokenising (and, unless `progress`, of its
    request loop) for a disabled one, and turn datasets' bars off; `undo` puts both back.
    lm-eval has no switch of its own for these bars."""
    import importlib

    modules = ["lm_eval.api.task", "lm_eval.api.model"]
    modules += [] if progress else ["lm_eval.models.huggingface"]
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "tqdm"):
            undo.callback(setattr, module, "tqdm", module.tqdm)
            module.tqdm = _silent_tqdm(module.tqdm)
    try:
        from datasets.utils import logging as datasets_logging
    except ImportError:
        return
    if datasets_logging.is_progress_bar_enabled():
        datasets_logging.disable_progress_bar()
        undo.callback(datasets_logging.enable_progress_bar)


def _silent_tqdm(tqdm_class):
    def make(*args, **kwargs):
        kwargs["disable"] = True
        return tqdm_class(*args, **kwargs)

    return make


__all__ = [
    "LOCAL_TAG",
    "LOCAL_TASKS",
    "LOCAL_TASK_KINDS",
    "LocalTaskKind",
    "TaskScore",
    "build_local_tasks",
    "force_offline",
    "quiet_lm_eval",
    "register_kind",
    "run_lm_eval",
    "run_tasks",
    "task_manager",
    "task_name",
]
