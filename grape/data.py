"""Calibration data: local text, JSONL or a `datasets` object, tokenised and packed into
fixed-length sequences.

Packing: documents are shuffled with the seed, tokenised one batch at a time, joined with the
tokenizer's EOS token, and cut into `samples` rows of `seq_len` tokens. Tokenisation stops as soon
as enough tokens are gathered, so a large corpus costs only what is used. Every row is full (no
padding), so every token position is a real calibration token.

Sources:

* a ``.jsonl`` file: one JSON object per line, the text under ``text_field`` (default ``"text"``);
* any other file: plain text (``.txt``, ``.md``, ``.rst``, ...), split into paragraph blocks so long
  files shuffle at a finer grain than whole files;
* a directory: every ``.txt``/``.md``/``.rst``/``.jsonl`` file below it, in sorted order;
* an in-memory object: a ``datasets.Dataset`` (or any sequence of dicts / strings), or an iterable
  such as a ``datasets.IterableDataset`` (read in order, not shuffled).
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grape.errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)
# Plain-text files are split at blank lines into blocks of about this many characters, so that a
# single large file still yields many documents to shuffle.
_BLOCK_CHARS = 16_000
# Documents are tokenised this many at a time (fast tokenizers parallelise a batch).
_TOKENIZE_BATCH = 64


@dataclass
class CalibrationData:
    """Packed calibration sequences, every row full: input_ids is (samples, seq_len) int64."""

    input_ids: torch.Tensor
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        for start in range(0, self.samples, batch_size):
            yield self.input_ids[start : start + batch_size]

    def num_batches(self, batch_size: int) -> int:
        return -(-self.samples // batch_size)


# -- reading documents ------------------------------------------------------------------------
def _split_blocks(text: str) -> list[str]:
    """Split plain text at blank lines into blocks of roughly _BLOCK_CHARS characters."""
    blocks, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= _BLOCK_CHARS:
            blocks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        blocks.append("\n\n".join(current))
    return [b for b in blocks if b.strip()]


def read_utf8(path: Path) -> str:
    """A text file's contents; a file that is not UTF-8 is a DataError naming the byte offset."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read calibration file {str(path)!r}: {exc.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path} is not UTF-8 text: byte {exc.start} (line {line}) is "
                        f"0x{raw[exc.start]:02x}; convert the file to UTF-8 (e.g. iconv -t UTF-8) "
                        "or leave it out") from None


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    # split at \n only: str.splitlines would also cut at U+2028 inside a JSON string
    for lineno, line in enumerate(read_utf8(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno} is not valid JSON ({exc.msg}); each line of a "
                ".jsonl file must be one JSON object"
            ) from exc
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{path}:{lineno} has no {text_field!r} field (it has {keys}); "
                "pass --text-field with the name of the field holding the text"
            )
        if record[text_field]:
            docs.append(str(record[text_field]))
    return docs


def _read_text(path: Path) -> list[str]:
    return _split_blocks(read_utf8(path))


def _files_under(directory: Path) -> list[Path]:
    files = [
        p
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
    ]
    if not files:
        raise DataError(
            f"directory {str(directory)!r} holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}"
            " files; point --data at text or JSONL files"
        )
    return files


def _documents_from_path(path: Path, text_field: str) -> list[str]:
    if not path.exists():
        raise DataError(
            f"calibration data {str(path)!r} does not exist; pass text files, .jsonl "
            "files or directories of them"
        )
    if path.is_dir():
        return [doc for f in _files_under(path) for doc in _documents_from_path(f, text_field)]
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _read_jsonl(path, text_field)
    return _read_text(path)


def _row_text(row: Any, text_field: str, where: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if text_field not in row:
            raise DataError(
                f"{where} has no {text_field!r} column (it has {sorted(row)}); set "
                "text_field to the column holding the text"
            )
        return str(row[text_field] or "")
    raise DataError(
        f"{where} yields {type(row).__name__} rows; expected dicts with a "
        f"{text_field!r} field or strings"
    )


def _is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


def iter_documents(
    sources: Sequence[Any] | Any, text_field: str = "text", seed: int = 0
) -> Iterator[str]:
    """Yield calibration documents from every source, shuffled with `seed` where that is possible
    (files and indexable datasets); iterable datasets are streamed in their own order."""
    if _is_path(sources) or not isinstance(sources, (list, tuple)):
        sources = [sources]
    if not sources:
        raise DataError(
            "no calibration data given; pass at least one text file, .jsonl file, "
            "directory or dataset"
        )
    rng = random.Random(seed)
    for source in sources:
        if _is_path(source):
            docs = _documents_from_path(Path(source), text_field)
            rng.shuffle(docs)
            yield from docs
        elif isinstance(source, Mapping):
            raise DataError(
                f"got a dictionary with keys {sorted(map(str, source))}; pass one split "
                "of a DatasetDict (e.g. dataset['train']) or a list of texts"
            )
        elif hasattr(source, "__len__") and hasattr(source, "__getitem__"):
            where = f"dataset {type(source).__name__}"
            order = list(range(len(source)))
            rng.shuffle(order)
            for i in order:
                text = _row_text(source[i], text_field, where)
                if text:
                    yield text
        elif isinstance(source, Iterable):
            where = f"dataset {type(source).__name__}"
            for row in source:
                text = _row_text(row, text_field, where)
                if text:
                    yield text
        else:
            raise DataError(
                f"cannot read calibration data from a {type(source).__name__}; pass a "
                "path, a datasets.Dataset or an iterable of texts"
            )


# -- tokenising and packing -------------------------------------------------------------------
def _tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    encoded = tokenizer(texts, add_special_tokens=False)
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    return [list(map(int, row)) for row in ids]


def pack_documents(
    documents: Iterable[str],
    tokenizer: Any,
    *,
    seq_len: int,
    samples: int,
    separator: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Tokenise documents in order, join them with `separator` (if not None) and cut the stream into
    `samples` rows of `seq_len` tokens. Raises DataError if the text runs out first."""
    if seq_len < 1 or samples < 1:
        raise DataError(f"seq_len and samples must be at least 1 (got {seq_len}, {samples})")
    needed = seq_len * samples
    stream: list[int] = []
    # read the first source before the progress bar starts: a file that cannot be read fails
    # with its one-line error alone, not under a half-drawn bar
    documents = iter(documents)
    first = next(documents, None)
    documents = itertools.chain([] if first is None else [first], documents)
    bar = _progress_bar(needed, progress)
    pending: list[str] = []

    def flush() -> None:
        for ids in _tokenize(tokenizer, pending):
            before = len(stream)
            stream.extend(ids)
            if separator is not None:
                stream.append(separator)
            bar.update(min(len(stream), needed) - min(before, needed))
        pending.clear()

    try:
        for doc in documents:
            pending.append(doc)
            if len(pending) >= _TOKENIZE_BATCH:
                flush()
                if len(stream) >= needed:
                    break
        if len(stream) < needed and pending:
            flush()
    finally:
        bar.close()
    if len(stream) < needed:
        full = len(stream) // seq_len
        raise DataError(
            f"too little calibration text: it gives {len(stream)} tokens, but {samples} samples of "
            f"{seq_len} tokens need {needed}. Add more text, or lower --samples (this text fills "
            f"{full}) or --seq-len."
        )
    return torch.tensor(stream[:needed], dtype=torch.long).view(samples, seq_len)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc="tokenising calibration text",
        unit="tok",
        unit_scale=True,
        disable=not enabled,
        leave=False,
    )


def load_calibration_data(
    sources: Sequence[Any] | Any,
    tokenizer: Any,
    *,
    seq_len: int = 2048,
    samples: int = 1024,
    seed: int = 0,
    text_field: str = "text",
    progress: bool = True,
) -> CalibrationData:
    """Read, shuffle (with `seed`), tokenise and pack calibration text into a CalibrationData."""
    separator = getattr(tokenizer, "eos_token_id", None)
    documents = iter_documents(sources, text_field=text_field, seed=seed)
    input_ids = pack_documents(
        documents,
        tokenizer,
        seq_len=seq_len,
        samples=samples,
        separator=separator,
        progress=progress,
    )
    names = [
        str(s) if _is_path(s) else type(s).__name__
        for s in (sources if isinstance(sources, (list, tuple)) else [sources])
    ]
    provenance = {
        "sources": names,
        "seq_len": seq_len,
        "samples": samples,
        "seed": seed,
        "text_field": text_field,
    }
    return CalibrationData(input_ids=input_ids, provenance=provenance)
