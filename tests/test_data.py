"""Calibration data: every source packs into full fixed-length rows; bad input, a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grape.data.text import CalibrationData, iter_documents, load_calibration_data, pack_documents
from grape.errors import DataError, UserError

_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # newlines too: paragraph blocks hold them


def char_tokenizer():
    """A real (fast) character-level tokenizer with a 99-token vocabulary: fits the tiny models."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(_CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]", bos_token="<s>"
    )


class CountingTokenizer:
    """Duck-typed tokenizer: one id per character; counts the texts it was asked to encode."""

    eos_token_id = 2

    def __init__(self):
        self.texts_seen = 0

    def __call__(self, texts, add_special_tokens=False):
        self.texts_seen += len(texts)
        return {"input_ids": [[3 + (ord(c) % 90) for c in t] for t in texts]}


def _words(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    letters = torch.randint(0, 26, (n,), generator=g)
    return "".join(chr(97 + int(c)) if i % 7 else " " for i, c in enumerate(letters))


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(_words(3000, 1))
    (d / "sub" / "b.md").write_text("\n\n".join(_words(400, s) for s in range(2, 8)))
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    with open(d / "c.jsonl", "w") as f:
        for s in range(10):
            f.write(json.dumps({"text": _words(200, 100 + s), "id": s}) + "\n")
    return d


def test_directory_packs_full_rows(corpus):
    # 60 x 64 tokens: more than the largest file (3000 characters), so several documents
    data = load_calibration_data([corpus], char_tokenizer(), seq_len=64, samples=60, progress=False)
    assert isinstance(data, CalibrationData)
    assert data.input_ids.shape == (60, 64) and data.input_ids.dtype == torch.long
    assert data.tokens == 60 * 64
    # documents are joined by EOS, and nothing is padding / unknown
    assert (data.input_ids == 2).sum() >= 1
    assert (data.input_ids == 0).sum() == 0
    assert [b.shape[0] for b in data.batches(16)] == [16, 16, 16, 12] and data.num_batches(16) == 4
    assert data.provenance["seq_len"] == 64 and data.provenance["sources"] == [str(corpus)]


def test_seed_controls_order_and_is_deterministic(corpus):
    tok = char_tokenizer()
    a = load_calibration_data(corpus, tok, seq_len=32, samples=20, seed=0, progress=False)
    b = load_calibration_data(corpus, tok, seq_len=32, samples=20, seed=0, progress=False)
    c = load_calibration_data(corpus, tok, seq_len=32, samples=20, seed=1, progress=False)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_jsonl_custom_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": _words(100, s)}) for s in range(5)) + "\n\n")
    data = load_calibration_data(
        path, CountingTokenizer(), seq_len=10, samples=40, text_field="body", progress=False
    )
    assert data.input_ids.shape == (40, 10)
    with pytest.raises(DataError, match="no 'text' field.*--text-field"):
        load_calibration_data(path, CountingTokenizer(), seq_len=10, samples=4, progress=False)


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2 is not valid JSON"):
        load_calibration_data(path, CountingTokenizer(), seq_len=2, samples=1, progress=False)


def test_in_memory_datasets():
    datasets = pytest.importorskip("datasets")
    rows = [{"text": _words(50, s)} for s in range(20)]
    ds = datasets.Dataset.from_list(rows)
    a = load_calibration_data(ds, CountingTokenizer(), seq_len=16, samples=50, progress=False)
    b = load_calibration_data([rows], CountingTokenizer(), seq_len=16, samples=50, progress=False)
    assert torch.equal(a.input_ids, b.input_ids)  # a Dataset and a list of dicts read alike
    strings = [r["text"] for r in rows]
    c = load_calibration_data(
        [iter(strings)], CountingTokenizer(), seq_len=16, samples=50, progress=False
    )
    assert c.input_ids.shape == (50, 16)
    with pytest.raises(DataError, match="pass one split"):
        load_calibration_data(
            datasets.DatasetDict({"train": ds}),
            CountingTokenizer(),
            seq_len=4,
            samples=1,
            progress=False,
        )
    with pytest.raises(DataError, match="no 'content' column"):
        load_calibration_data(
            ds, CountingTokenizer(), seq_len=4, samples=1, text_field="content", progress=False
        )


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_calibration_data(tmp_path / "nope.txt", CountingTokenizer(), seq_len=4, samples=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        load_calibration_data(tmp_path / "empty", CountingTokenizer(), seq_len=4, samples=1)
    with pytest.raises(DataError, match="no calibration data"):
        load_calibration_data([], CountingTokenizer(), seq_len=4, samples=1)
    assert issubclass(DataError, UserError)  # the CLI prints it without a traceback


def test_too_little_text_says_how_much_it_fills(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 99)  # 99 tokens + 1 EOS = 100 = 3 full rows of 32
    with pytest.raises(DataError, match=r"gives 100 tokens.*need 128.*fills 3\)"):
        load_calibration_data(path, CountingTokenizer(), seq_len=32, samples=4, progress=False)


def test_tokenisation_stops_when_enough():
    tok = CountingTokenizer()
    docs = (_words(100, s) for s in range(10_000))
    ids = pack_documents(docs, tok, seq_len=50, samples=4, separator=2, progress=False)
    assert ids.shape == (4, 50)
    assert tok.texts_seen <= 64  # one tokeniser batch, not the whole corpus


@settings(deadline=None, derandomize=True, max_examples=30)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=12), seq_len=st.integers(1, 17))
def test_packing_is_the_eos_joined_stream(lengths, seq_len):
    """Packing never drops or reorders tokens: rows are the EOS-joined stream, cut in order."""
    docs = ["a" * n for n in lengths]
    stream = []
    for n in lengths:
        stream += [3 + ord("a") % 90] * n + [2]
    samples = len(stream) // seq_len
    if samples == 0:
        with pytest.raises(DataError):
            pack_documents(
                docs, CountingTokenizer(), seq_len=seq_len, samples=1, separator=2, progress=False
            )
        return
    ids = pack_documents(
        docs, CountingTokenizer(), seq_len=seq_len, samples=samples, separator=2, progress=False
    )
    assert ids.flatten().tolist() == stream[: samples * seq_len]


def test_plain_text_is_split_into_shuffleable_blocks(tmp_path):
    path = tmp_path / "big.txt"
    paragraphs = [f"paragraph {i} " + _words(3000, i) for i in range(20)]
    path.write_text("\n\n".join(paragraphs))
    docs = list(iter_documents(path, seed=0))
    assert len(docs) > 1
    assert sorted("\n\n".join(docs).split("\n\n")) == sorted(paragraphs)  # nothing lost
