"""Streaming calibration data (grape.data.text): files are read lazily in seeded units, never whole;
--samples bounds what is read; Hub-style dataset folders (Parquet, JSONL with a dataset card,
save_to_disk) are read from their train split."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest

import grape.data.text
from grape.data.text import iter_documents, load_calibration_data
from grape.errors import DataError
from tests.test_data import CountingTokenizer, _words


class CountingOpener:
    """Stands in for `open` inside grape.data.text: records which files are opened and how many
    bytes are read from each."""

    def __init__(self):
        self.opened: list[Path] = []
        self.read: dict[Path, int] = {}

    def __call__(self, path, mode="r", *args, **kwargs):
        handle = builtins.open(path, mode, *args, **kwargs)
        path = Path(path)
        self.opened.append(path)
        self.read.setdefault(path, 0)
        opener = self

        class Counted:
            def __init__(self, inner):
                self.inner = inner

            def read(self, *a):
                data = self.inner.read(*a)
                opener.read[path] += len(data)
                return data

            def readline(self, *a):
                data = self.inner.readline(*a)
                opener.read[path] += len(data)
                return data

            def __getattr__(self, name):
                return getattr(self.inner, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.inner.close()

        return Counted(handle)


@pytest.fixture
def opener(monkeypatch):
    counting = CountingOpener()
    monkeypatch.setattr(grape.data.text, "open", counting, raising=False)
    return counting


def test_eight_sequences_from_a_200_file_corpus_open_only_the_files_needed(tmp_path, opener):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(200):
        (corpus / f"{i:03d}.txt").write_text(_words(300, i))
    tokenizer = CountingTokenizer()  # one token per character
    data = load_calibration_data(corpus, tokenizer, seq_len=64, samples=8, progress=False)
    assert data.input_ids.shape == (8, 64)
    # 512 tokens need two files of 300 characters: those two are opened, once each
    assert len(opener.opened) == len(set(opener.opened)) == 2
    used = {p.name for p in opener.opened}
    assert used != {"000.txt", "001.txt"}  # a seeded order, not the sorted one
    assert tokenizer.texts_seen == 2
    again = CountingOpener()
    grape.data.text.open = again
    load_calibration_data(corpus, CountingTokenizer(), seq_len=64, samples=8, progress=False)
    assert again.opened == opener.opened  # deterministic


def test_a_large_file_is_never_read_whole(tmp_path, opener):
    path = tmp_path / "big.jsonl"
    with builtins.open(path, "w") as handle:
        for i in range(4000):  # ~1 MB, 16 units of 64 KiB
            handle.write(json.dumps({"text": _words(250, i)}) + "\n")
    size = path.stat().st_size
    data = load_calibration_data(path, CountingTokenizer(), seq_len=100, samples=10, progress=False)
    assert data.input_ids.shape == (10, 100)
    assert sum(opener.read.values()) < size / 4


@pytest.mark.parametrize("kind", ["jsonl", "text"])
def test_units_partition_a_file(tmp_path, monkeypatch, kind):
    """Every line belongs to exactly one unit, whatever the unit size cuts: all documents are
    read exactly once."""
    monkeypatch.setattr(grape.data.text, "_UNIT_BYTES", 97)
    docs = [f"doc {i} " + _words(20 + 13 * (i % 7), i) for i in range(60)]
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        got = list(iter_documents(path, seed=3))
        assert sorted(got) == sorted(docs)
    else:
        path = tmp_path / "d.txt"
        path.write_text("\n\n".join(docs) + "\n")
        got = list(iter_documents(path, seed=3))
        paragraphs = [p.strip() for block in got for p in block.split("\n\n") if p.strip()]
        assert sorted(paragraphs) == sorted(d.strip() for d in docs)
    firsts = [int(block.split()[1]) for block in got]
    assert firsts != sorted(firsts)  # shuffled


def test_a_bad_line_far_into_a_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(grape.data.text, "_UNIT_BYTES", 64)
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": _words(30, i)}) for i in range(40)]
    lines[33] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:34 is not valid JSON"):
        list(iter_documents(path))
    (tmp_path / "latin.txt").write_bytes(b"ok\n" * 50 + b"caf\xe9\n")
    with pytest.raises(DataError, match=r"byte 153 \(line 51\)"):
        list(iter_documents(tmp_path / "latin.txt"))


def _parquet(path: Path, texts: list[str], column: str = "text") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path,
                   row_group_size=7)


def test_hub_parquet_folder_reads_its_train_split(tmp_path, opener):
    pytest.importorskip("pyarrow")
    hub = tmp_path / "hub"
    train = [f"train {i} " + _words(40, i) for i in range(30)]
    _parquet(hub / "data" / "train-00000-of-00002.parquet", train[:15])
    _parquet(hub / "data" / "train-00001-of-00002.parquet", train[15:])
    _parquet(hub / "data" / "test-00000-of-00001.parquet", ["test text " * 20] * 5)
    (hub / "README.md").write_text("---\nconfigs: []\n---\n# a dataset card, not text\n")
    docs = list(iter_documents(hub, seed=1))
    assert sorted(docs) == sorted(train)
    assert all(p.suffix == ".parquet" for p in opener.opened)
    with pytest.raises(DataError, match="no 'body' column"):
        list(iter_documents(hub, text_field="body"))


def test_hub_jsonl_folder_skips_the_dataset_card(tmp_path):
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("# card\n" * 100)
    (hub / "data" / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    (hub / "data" / "validation.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    assert sorted(iter_documents(hub)) == [f"row {i}" for i in range(5)]


def test_saved_to_disk_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": _words(40, i)} for i in range(12)]
    splits = {"train": datasets.Dataset.from_list(rows),
              "test": datasets.Dataset.from_list(rows[:2])}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dd")
    docs = list(iter_documents(tmp_path / "dd", seed=0))
    assert sorted(docs) == sorted(r["text"] for r in rows)
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "t")
    with pytest.raises(DataError, match="none named train"):
        list(iter_documents(tmp_path / "t"))


def test_every_path_is_checked_before_reading(tmp_path, opener):
    (tmp_path / "a.txt").write_text(_words(500, 0))
    with pytest.raises(DataError, match="does not exist"):
        load_calibration_data([tmp_path / "a.txt", tmp_path / "missing.txt"], CountingTokenizer(),
                              seq_len=8, samples=1, progress=False)
    assert opener.opened == []
