"""Calibration data: local text, JSONL, Parquet or a `datasets` object, tokenised and packed into
fixed-length sequences.

Streaming: files are never read whole. A source is cut into units (64 KiB byte ranges of its
text and JSONL files, a line belonging to the unit it starts in; whole Parquet files, read a row
group at a time), the units are shuffled with the seed and read one after another only while
the packer wants more text. So the sample is spread over the whole corpus and reading stops
near the last document used, however large the corpus.

Packing: documents are tokenised in order, joined with the tokenizer's EOS token, and cut into
`samples` rows of `seq_len` tokens. Every row is full (no padding), so every token position is a
real calibration token.

Sources:

* a ``.jsonl`` file: one JSON object per line, the text under ``text_field`` (default ``"text"``);
* a ``.parquet`` file: the ``text_field`` column;
* any other file: plain text (``.txt``, ``.md``, ``.rst``, ...), split into paragraph blocks;
* a directory: every ``.txt``/``.md``/``.rst``/``.jsonl`` file below it; a Hub-style dataset
  directory (Parquet files, or a dataset card beside JSONL files): its data files, the train
  split's when files are named by split; a ``save_to_disk`` directory: that dataset;
* an in-memory object: a ``datasets.Dataset`` (or any sequence of dicts / strings), or an iterable
  such as a ``datasets.IterableDataset`` (read in order, not shuffled).
"""

from __future__ import annotations

import itertools
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grape.errors import DataError, ShortTextError
from grape.data.jsonl import is_text, not_text, parse_line

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
    # every token of the calibration documents as one packed stream (the rows are its first
    # samples x seq_len tokens), where more was read than the rows take (grape.data.split);
    # None: the rows are all there is. A repair can fit on more of it than calibration used.
    stream: torch.Tensor | None = None

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


# -- reading documents, lazily ----------------------------------------------------------------
# Files are read in units: a byte range of a text or JSONL file (a line belongs to the unit in
# which it starts), or a whole Parquet file (read a row group at a time). A source's units are
# shuffled with the seed and read one after another only while the packer asks for more text.
_UNIT_BYTES = 1 << 16
_SPLIT_NAMES = ("train", "validation", "valid", "test")
# a folder written by datasets' save_to_disk
_SAVED_DATASET = ("dataset_info.json", "dataset_dict.json")
# a Hub dataset card: beside JSONL files it marks a dataset folder (the card is not text to read)
_CARDS = ("README.md", "readme.md")


@dataclass(frozen=True)
class _Unit:
    path: Path
    kind: str  # "text", "jsonl" or "parquet"
    start: int = 0  # byte range [start, stop) of a text / JSONL file
    stop: int = 0


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


def _line_number(path: Path, offset: int) -> int:
    """1-based number of the line holding byte `offset` (read only on an error path)."""
    with open(path, "rb") as handle:
        return handle.read(offset).count(b"\n") + 1


def _decode(raw: bytes, path: Path, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = offset + exc.start
        raise DataError(f"{path} is not UTF-8 text: byte {at} (line {_line_number(path, at)}) is "
                        f"0x{raw[exc.start]:02x}; convert the file to UTF-8 (e.g. iconv -t UTF-8) "
                        "or leave it out") from None


def read_utf8(path: Path) -> str:
    """A whole text file's contents; not UTF-8 is a DataError naming the byte offset."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise DataError(f"cannot read calibration file {str(path)!r}: {exc.strerror}") from None
    return _decode(raw, Path(path), 0)


def _unit_lines(unit: _Unit) -> list[tuple[int, bytes]]:
    """(byte offset, line) for every line starting in the unit's byte range."""
    try:
        handle = open(unit.path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read calibration file {str(unit.path)!r}: "
                        f"{exc.strerror}") from None
    lines = []
    with handle:
        at = unit.start
        handle.seek(max(unit.start - 1, 0))
        if unit.start > 0 and handle.read(1) != b"\n":
            at += len(handle.readline())  # the line in progress belongs to the unit before
        while at < unit.stop:
            line = handle.readline()
            if not line:
                break
            lines.append((at, line))
            at += len(line)
    return lines


def _jsonl_documents(unit: _Unit, text_field: str) -> list[str]:
    docs = []
    for offset, raw in _unit_lines(unit):
        # lines end at \n only: str.splitlines would also cut at U+2028 inside a JSON string
        record = parse_line(_decode(raw, unit.path, offset), text_field,
                            lambda: f"{unit.path}:{_line_number(unit.path, offset)}",  # noqa: B023
                            "pass --text-field with the name of the field holding the text")
        if record is not None and record[text_field]:
            docs.append(record[text_field])
    return docs


def _text_documents(unit: _Unit) -> list[str]:
    lines = _unit_lines(unit)
    if not lines:
        return []
    text = _decode(b"".join(line for _, line in lines), unit.path, lines[0][0])
    # a unit may start or end inside a blank line: no block starts or ends with a line break
    return [block.strip("\n") for block in _split_blocks(text)]


def _parquet_documents(unit: _Unit, text_field: str, rng: random.Random) -> Iterator[str]:
    """A Parquet file's texts, one row group at a time (row groups and rows shuffled)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - datasets brings pyarrow
        raise DataError(f"{unit.path}: reading Parquet needs pyarrow; "
                        "pip install datasets") from None
    with open(unit.path, "rb") as handle:
        try:
            table = pq.ParquetFile(handle)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds
            raise DataError(f"{unit.path} is not a Parquet file ({exc})") from None
        if text_field not in table.schema_arrow.names:
            raise DataError(f"{unit.path} has no {text_field!r} column (it has "
                            f"{table.schema_arrow.names}); pass --text-field with the column "
                            "holding the text")
        groups = list(range(table.num_row_groups))
        rng.shuffle(groups)
        for group in groups:
            texts = table.read_row_group(group, columns=[text_field]).column(0).to_pylist()
            rng.shuffle(texts)
            yield from (str(t) for t in texts if t)


def _split_of(path: Path, root: Path) -> str | None:
    """The Hub split of a data file, from its folder or file name (train/, train-0.parquet)."""
    parts = path.relative_to(root).parts
    for name in _SPLIT_NAMES:
        if name in parts[:-1] or re.match(rf"{name}([-_.]|$)", parts[-1]):
            return name
    return None


def _dataset_files(directory: Path) -> list[Path] | None:
    """The data files of a Hub-style dataset folder (Parquet files, or a dataset card beside
    JSONL files): the train split's when files are named by split. None for a plain corpus."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    data = [p for p in files if p.suffix.lower() in (".parquet",) + JSONL_SUFFIXES]
    has_card = any((directory / card).is_file() for card in _CARDS)
    if not any(p.suffix.lower() == ".parquet" for p in data) and not (has_card and data):
        return None
    train = [p for p in data if _split_of(p, directory) == "train"]
    return train or data


def _files_under(directory: Path) -> list[Path]:
    dataset = _dataset_files(directory)
    files = dataset if dataset is not None else [
        p for p in sorted(directory.rglob("*"))
        if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
    ]
    if not files:
        raise DataError(
            f"directory {str(directory)!r} holds no {'/'.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}"
            " files; point --data at text or JSONL files"
        )
    return files


def _file_units(path: Path) -> list[_Unit]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return [_Unit(path, "parquet")]
    kind = "jsonl" if suffix in JSONL_SUFFIXES else "text"
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot read calibration file {str(path)!r}: {exc.strerror}") from None
    return [_Unit(path, kind, start, min(start + _UNIT_BYTES, size))
            for start in range(0, max(size, 1), _UNIT_BYTES)]


def _saved_dataset(directory: Path):
    """A folder written by datasets' save_to_disk, memory-mapped (its train split)."""
    import datasets

    loaded = datasets.load_from_disk(str(directory))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{directory} holds the splits {sorted(loaded)}, none named train; "
                            f"pass one split's folder, e.g. {directory / sorted(loaded)[0]}")
        loaded = loaded["train"]
    return loaded


def _path_documents(path: Path, text_field: str, rng: random.Random) -> Iterator[str]:
    """A file's or folder's documents, read lazily in seeded unit order."""
    if path.is_dir() and any((path / name).is_file() for name in _SAVED_DATASET):
        yield from _indexable_documents(_saved_dataset(path), text_field, rng)
        return
    files = _files_under(path) if path.is_dir() else [path]
    units = [unit for file in files for unit in _file_units(file)]
    rng.shuffle(units)
    for unit in units:
        if unit.kind == "parquet":
            yield from _parquet_documents(unit, text_field, rng)
            continue
        docs = _jsonl_documents(unit, text_field) if unit.kind == "jsonl" else _text_documents(unit)
        rng.shuffle(docs)
        yield from docs


def _indexable_documents(source, text_field: str, rng: random.Random) -> Iterator[str]:
    where = f"dataset {type(source).__name__}"
    order = list(range(len(source)))
    rng.shuffle(order)
    for i in order:
        text = _row_text(source[i], text_field, where)
        if text:
            yield text


def _row_text(row: Any, text_field: str, where: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        if text_field not in row:
            raise DataError(
                f"{where} has no {text_field!r} column (it has {sorted(row)}); set "
                "text_field to the column holding the text"
            )
        if not is_text(row[text_field]):
            raise not_text(row[text_field], text_field, where)
        return row[text_field] or ""
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
    for source in sources:  # every path is checked before anything is read
        if _is_path(source) and not Path(source).exists():
            raise DataError(f"calibration data {str(source)!r} does not exist; pass text "
                            "files, .jsonl files or directories of them")
    rng = random.Random(seed)
    for source in sources:
        if _is_path(source):
            yield from _path_documents(Path(source), text_field, rng)
        elif isinstance(source, Mapping):
            raise DataError(
                f"got a dictionary with keys {sorted(map(str, source))}; pass one split "
                "of a DatasetDict (e.g. dataset['train']) or a list of texts"
            )
        elif hasattr(source, "__len__") and hasattr(source, "__getitem__"):
            yield from _indexable_documents(source, text_field, rng)
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
def tokenize_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, no special tokens (a batch call of the fast tokenizer)."""
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
    at_least: int | None = None,
) -> torch.Tensor:
    """Tokenise documents in order, join them with `separator` (if not None) and cut the stream into
    `samples` rows of `seq_len` tokens. Raises DataError if the text runs out first, unless it
    fills `at_least` rows (when given): then those it fills."""
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
    seen = {"chars": 0, "tokens": 0}  # tokenised so far: the characters-per-token estimate

    def flush() -> None:
        for text, ids in zip(pending, tokenize_texts(tokenizer, pending)):
            before = len(stream)
            stream.extend(ids)
            if separator is not None:
                stream.append(separator)
            seen["chars"] += len(text)
            seen["tokens"] += len(ids)
            bar.update(min(len(stream), needed) - min(before, needed))
        pending.clear()

    def enough_pending() -> bool:
        """Tokenise once the pending text probably holds what is still needed (one character
        per token until measured), so reading stops near the first document not needed."""
        if len(pending) >= _TOKENIZE_BATCH:
            return True
        per_token = seen["chars"] / seen["tokens"] if seen["tokens"] else 1.0
        return sum(map(len, pending)) >= (needed - len(stream)) * per_token

    try:
        for doc in documents:
            pending.append(doc)
            if enough_pending():
                flush()
                if len(stream) >= needed:
                    break
        if len(stream) < needed and pending:
            flush()
    finally:
        bar.close()
    if len(stream) < needed:
        full = len(stream) // seq_len
        if at_least is not None and full >= at_least:
            return torch.tensor(stream[:full * seq_len], dtype=torch.long).view(full, seq_len)
        raise ShortTextError(
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


def source_names(sources: Sequence[Any] | Any) -> list[str]:
    """What the provenance records of each source: a path as given, else the object's type."""
    return [str(s) if _is_path(s) else type(s).__name__
            for s in (sources if isinstance(sources, (list, tuple)) else [sources])]


def load_calibration_data(
    sources: Sequence[Any] | Any,
    tokenizer: Any,
    *,
    seq_len: int = 2048,
    samples: int = 1024,
    seed: int = 0,
    text_field: str = "text",
    progress: bool = True,
    at_least: int | None = None,
) -> CalibrationData:
    """Read, shuffle (with `seed`), tokenise and pack calibration text into a CalibrationData
    (`at_least`: fewer rows than `samples` are fine down to that many, see pack_documents)."""
    separator = getattr(tokenizer, "eos_token_id", None)
    documents = iter_documents(sources, text_field=text_field, seed=seed)
    input_ids = pack_documents(
        documents,
        tokenizer,
        seq_len=seq_len,
        samples=samples,
        separator=separator,
        progress=progress,
        at_least=at_least,
    )
    provenance = {
        "sources": source_names(sources),
        "seq_len": seq_len,
        "samples": int(input_ids.shape[0]),
        "seed": seed,
        "text_field": text_field,
    }
    return CalibrationData(input_ids=input_ids, provenance=provenance)
