"""Held-out documents for the search (grape.data.split) and standard errors by document (grape.evaluation.stats)."""

import json

import numpy as np
import pytest

from grape.data.split import (
    DOCUMENT_SHARE,
    MIN_CALIBRATION_ROWS,
    Targets,
    allocate,
    split_files,
    split_text,
)
from grape.errors import DataError
from grape.evaluation.stats import clustered_se, domain_mean_se


class WordTokenizer:
    """One token per whitespace word (ids from a hash), EOS 0: token counts are word counts."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[3 + hash(w) % 97 for w in t.split()] for t in texts]}


def _corpus(tmp_path, sizes, name="calib.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": " ".join(f"d{i}w{j}" for j in range(n))}) + "\n"
                            for i, n in enumerate(sizes)))
    return path


# -- allocation ------------------------------------------------------------------------------------
def test_enough_text_fills_every_target_in_turn():
    search, confirm, calib = allocate([50] * 100, Targets(search=400, confirm=800, calibration=1000), seq_len=10)
    assert (len(search), len(confirm), len(calib)) == (8, 16, 20)
    assert set(search).isdisjoint(confirm) and set(confirm).isdisjoint(calib)
    assert search == list(range(8))  # in the (shuffled) reading order


def test_short_text_holds_out_at_most_the_share_in_target_ratio():
    lengths = [100] * 20  # 2000 tokens: targets ask 400 + 1600 + 1000
    search, confirm, calib = allocate(lengths, Targets(search=400, confirm=1600, calibration=1000), seq_len=10)
    held = sum(lengths[i] for i in search + confirm)
    assert held <= 0.5 * sum(lengths) + 100  # one document past the share at most
    # 1000 held out: the search gets a quarter (more than its 400 : 1600 ratio), confirmation the rest
    assert len(search) == 3 and len(confirm) == 8
    assert calib == list(range(11, 20))


def test_one_long_document_gives_a_held_out_set_at_most_its_cap():
    lengths = [10_000] + [50] * 100
    search, _, _ = allocate(lengths, Targets(search=800, confirm=0, calibration=100), seq_len=10)
    assert len(search) > 1  # the long document counted as 800 / DOCUMENT_SHARE tokens only
    assert len(search) == 1 + -(-(800 - 800 // DOCUMENT_SHARE) // 50)


# -- splitting a text --------------------------------------------------------------------------------
def test_split_text_sets_are_whole_disjoint_documents(tmp_path):
    path = _corpus(tmp_path, [60 + 7 * i for i in range(40)])
    split = split_text([str(path)], WordTokenizer(), Targets(search=200, confirm=400, calibration=16 * 20),
                       seq_len=20, samples=16, seed=3)
    held = split.held_out
    search_docs = {d["sha256"] for d in held.search.documents}
    confirm_docs = {d["sha256"] for d in held.confirm.documents}
    assert search_docs.isdisjoint(confirm_docs)
    assert held.search.tokens == 200 and held.confirm.tokens == 400
    assert split.calibration.samples == 16 and split.calibration.input_ids.shape == (16, 20)
    # calibration rows hold no held-out token sequence: documents are disjoint, so the words differ
    held_rows = {tuple(r) for r in held.search.ids.tolist() + held.confirm.ids.tolist()}
    assert not held_rows & {tuple(r) for r in split.calibration.input_ids.tolist()}
    # each window is labelled with a document of its own set; several documents in each set
    assert held.search.num_documents >= 3 and held.confirm.num_documents >= 6
    record = held.record()
    assert record["search"]["documents"] == held.search.num_documents
    assert len(record["confirmation"]["by_document"]) == len(confirm_docs)


def test_split_text_is_seeded(tmp_path):
    path = _corpus(tmp_path, [80] * 40)
    goal = Targets(search=200, confirm=400, calibration=8 * 20)
    one = split_text([str(path)], WordTokenizer(), goal, seq_len=20, samples=8, seed=0)
    again = split_text([str(path)], WordTokenizer(), goal, seq_len=20, samples=8, seed=0)
    other = split_text([str(path)], WordTokenizer(), goal, seq_len=20, samples=8, seed=1)
    assert one.held_out.search.documents == again.held_out.search.documents
    assert one.held_out.search.documents != other.held_out.search.documents


def test_a_modest_text_calibrates_on_what_it_has_with_a_notice(tmp_path):
    path = _corpus(tmp_path, [50] * 30)  # 1,530 tokens with EOS; calibration asks 64 x 20
    split = split_text([str(path)], WordTokenizer(), Targets(search=200, confirm=800, calibration=64 * 20),
                       seq_len=20, samples=64, seed=0)
    assert MIN_CALIBRATION_ROWS <= split.calibration.samples < 64
    assert split.calibration.provenance["samples"] == split.calibration.samples
    assert any("not 64" in n for n in split.notes)
    assert any("less than" in n for n in split.held_out.notes)


def test_too_little_text_is_one_clear_error(tmp_path):
    path = _corpus(tmp_path, [30] * 6)
    with pytest.raises(DataError, match="too little calibration text.*--no-search"):
        split_text([str(path)], WordTokenizer(), Targets(search=100, confirm=100, calibration=64 * 20),
                   seq_len=20, samples=64)


def test_no_search_targets_give_all_text_to_calibration(tmp_path):
    path = _corpus(tmp_path, [50] * 30)
    split = split_text([str(path)], WordTokenizer(), Targets(0, 0, 100 * 20), seq_len=20, samples=100)
    assert split.held_out is None and split.calibration.samples == 1530 // 20


def test_search_data_files_split_by_document_per_domain(tmp_path):
    files = [_corpus(tmp_path, [70] * 30, name=f"{d}.validation.jsonl") for d in ("prose", "code")]
    held = split_files([str(f) for f in files], WordTokenizer(), Targets(search=400, confirm=800),
                       seq_len=20, seed=0)
    assert held.search.tokens == 400 and held.confirm.tokens == 800
    domains = [d["domain"] for d in held.search.documents]
    assert domains.count("prose") == domains.count("code")
    assert set(held.search.groups.tolist()).isdisjoint(held.confirm.groups.tolist())


# -- standard errors by document ------------------------------------------------------------------
def test_clustered_se_is_the_plain_se_for_singletons_and_grows_with_shared_documents():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    plain = x.std(ddof=1) / np.sqrt(200)
    assert clustered_se(x, np.arange(200)) == pytest.approx(plain, rel=0.01)
    # 20 documents of 10 windows that share their document's offset: the windows are one sample each
    doc_effect = np.repeat(rng.normal(size=20), 10)
    y = doc_effect + 0.1 * rng.normal(size=200)
    groups = np.repeat(np.arange(20), 10)
    assert clustered_se(y, groups) > 2.5 * clustered_se(y, None)
    assert clustered_se(y, groups) == pytest.approx(
        np.sqrt(20 / 19 * np.sum((np.bincount(groups, y - y.mean())) ** 2)) / 200)


def test_domain_mean_se_adds_independent_domains():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 0.0, 2.0, 2.0])
    mean, se = domain_mean_se({"a": (a, None), "b": (b, None)})
    assert mean == pytest.approx((2.5 + 1.0) / 2)
    assert se == pytest.approx(np.sqrt(clustered_se(a) ** 2 + clustered_se(b) ** 2) / 2)
