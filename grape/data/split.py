"""Calibration text split by document: calibration rows, search windows, confirmation windows.

The loss-verified search (grape.searching.algorithm) judges plans on tokens calibration did not see,
and makes its final choice on a second, larger set it did not select on. Both sets are whole
documents of the text, never rows of a packed stream: a document cut in two would sit on both
sides, and windows of one document are one sample, not many (grape.evaluation.stats).

    split = split_text(["corpus/"], tokenizer, Targets(search=16384, confirm=65536,
                       calibration=256 * 2048), seq_len=2048, seed=0)
    split.calibration            # CalibrationData: the rows calibration measures
    split.held_out.search.ids    # (windows, seq_len) input ids; .groups: the document of each

How the documents are shared (docs/search.md):

1. the documents are read in the seeded shuffled order of grape.data.text (the same order calibration
   reads them in) and tokenised once;
2. with enough text, the first documents fill the search set up to its token target, the next
   the confirmation set, the rest calibration up to its rows; reading stops there;
3. with less, the held-out sets together get at most `share` (half) of the text, divided in the
   ratio of their targets, and calibration the rest, as many rows as it gives (a notice says
   so; below MIN_CALIBRATION_ROWS rows the run stops with a one-line error);
4. one held-out document gives at most 1/DOCUMENT_SHARE of its set's tokens (its first part),
   so one long file cannot be the whole sample.

--search-data files are split the same way, without calibration: per domain, equal token
targets, the documents shuffled with the seed, search first and confirmation after.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from grape.errors import DataError

HELD_OUT_SHARE = 0.5  # at most this share of a short text is held out of calibration
DOCUMENT_SHARE = 8  # a held-out document gives at most 1/8 of its set's tokens
MIN_CALIBRATION_ROWS = 8  # fewer calibration sequences than this: refuse (too little text)
_READ_BATCH = 64  # documents tokenised per call


@dataclass(frozen=True)
class Targets:
    """Token targets: the search and confirmation sets (0: none) and calibration's rows x length."""

    search: int
    confirm: int = 0
    calibration: int = 0
    share: float = HELD_OUT_SHARE

    def __post_init__(self) -> None:
        if min(self.search, self.confirm, self.calibration) < 0 or not 0 < self.share <= 1:
            raise DataError(f"held-out targets must be >= 0 and the share in (0, 1], got {self}")


@dataclass(frozen=True)
class Windows:
    """Held-out windows of `seq_len` tokens, each labelled with the document it mostly comes from."""

    ids: Any  # torch.LongTensor (windows, seq_len)
    groups: np.ndarray  # (windows,) document index, the unit of every standard error
    documents: tuple[dict, ...]  # per document: sha256 of its text (12 hex), tokens used, domain

    @property
    def tokens(self) -> int:
        return int(self.ids.numel())

    @property
    def num_documents(self) -> int:
        return int(np.unique(self.groups).size)

    def record(self) -> dict:
        return {"windows": int(self.ids.shape[0]), "tokens": self.tokens,
                "documents": self.num_documents, "by_document": list(self.documents)}


@dataclass(frozen=True)
class HeldOut:
    """The search's windows and the confirmation's (None: no confirmation set)."""

    search: Windows
    confirm: Windows | None
    notes: tuple[str, ...] = ()
    source: str = "calibration text"  # or "search data"

    def record(self) -> dict:
        """Which documents went where (search.json's "held_out")."""
        return {"source": self.source, "search": self.search.record(),
                "confirmation": self.confirm.record() if self.confirm is not None else None,
                "notes": list(self.notes)}


@dataclass(frozen=True)
class Split:
    calibration: Any  # grape.data.text.CalibrationData, or None when calibration takes nothing
    held_out: HeldOut | None
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class _Doc:
    sha: str
    ids: list[int]
    domain: str | None = None


# -- the allocation (pure: token counts in, document indices out) ---------------------------------
def allocate(lengths: Sequence[int], targets: Targets, seq_len: int) -> tuple[list[int], list[int], list[int]]:
    """(search, confirmation, calibration) document indices for documents of `lengths` tokens,
    in order: the sets fill in turn up to their targets, a held-out document counting at most
    its cap; when the text is too short for every target, the held-out sets share at most
    `targets.share` of it and calibration gets the rest (see the module docstring)."""
    sets, complete = _fill(lengths, targets.search, targets.confirm, targets.calibration, seq_len)
    if complete or not (targets.search or targets.confirm):
        return sets
    # short text: whole documents count (what calibration loses), at most the share of it
    held = min(targets.search + targets.confirm, int(targets.share * sum(lengths)))
    # in the targets' ratio, but the search keeps at least a quarter (it has to find the plan)
    search = min(targets.search, max(round(held * targets.search / (targets.search + targets.confirm)),
                                     held // 4))
    sets, _ = _fill(lengths, search, held - search, 1 << 62, seq_len, capped=False)
    return sets


def _fill(lengths, search: int, confirm: int, calibration: int, seq_len: int, capped: bool = True):
    out: tuple[list[int], list[int], list[int]] = ([], [], [])
    wanted, got = (search, confirm, calibration), [0, 0, 0]
    caps = [_cap(search, seq_len), _cap(confirm, seq_len)] if capped else [1 << 62] * 2
    caps.append(1 << 62)
    for index, length in enumerate(lengths):
        side = next((s for s in range(3) if got[s] < wanted[s]), None)
        if side is None:
            break
        out[side].append(index)
        got[side] += min(length, caps[side])
    return out, all(g >= w for g, w in zip(got, wanted))


def _cap(target: int, seq_len: int) -> int:
    """The most tokens one document gives a held-out set of `target` tokens (at least a window)."""
    return max(target // DOCUMENT_SHARE, seq_len + 1)


# -- reading --------------------------------------------------------------------------------------
def _tokenized(texts: list[str], tokenizer, domain: str | None = None) -> list[_Doc]:
    from grape.data.text import tokenize_texts

    return [_Doc(hashlib.sha256(t.encode("utf-8")).hexdigest()[:12], ids, domain)
            for t, ids in zip(texts, tokenize_texts(tokenizer, texts))]


def _read_until(documents: Iterator[str], tokenizer, targets: Targets, seq_len: int) -> list[_Doc]:
    """Documents in order, tokenised, until every target is met or the text runs out."""
    docs: list[_Doc] = []
    while True:
        # batches grow with what is read (a quarter more each time): the check below walks
        # every document read so far, so a fixed batch would make a long read quadratic
        batch = [text for _, text in zip(range(max(_READ_BATCH, len(docs) // 4)), documents)]
        if not batch:
            return docs
        docs += _tokenized(batch, tokenizer)
        if _fill([len(d.ids) for d in docs], targets.search, targets.confirm,
                              targets.calibration, seq_len)[1]:
            return docs


def windows(docs: Sequence[_Doc], seq_len: int, target: int, separator: int | None, offset: int = 0) -> Windows:
    """The documents joined (each capped, `separator` after each) and cut into windows of
    `seq_len`, at most ceil(target / seq_len) of them; each window's group is the document
    that gives most of its tokens (numbered from `offset`)."""
    import torch

    cap = _cap(target, seq_len)
    stream: list[int] = []
    owner: list[int] = []
    used = []
    for number, doc in enumerate(docs):
        piece = doc.ids[:cap] + ([separator] if separator is not None else [])
        stream += piece
        owner += [number + offset] * len(piece)
        used.append({"sha256": doc.sha, "tokens": min(len(doc.ids), cap), "domain": doc.domain})
    count = min(len(stream) // seq_len, -(-target // seq_len))
    ids = torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)
    owners = np.asarray(owner[: count * seq_len], dtype=np.int64).reshape(count, seq_len)
    groups = np.array([np.bincount(row - offset).argmax() + offset for row in owners], dtype=np.int64)
    return Windows(ids, groups, tuple(used))


def _calibration_rows(docs: Sequence[_Doc], seq_len: int, samples: int, separator, provenance: dict):
    """Calibration rows packed from `docs` as grape.data.text packs them: as many as asked, or as the
    text gives (>= MIN_CALIBRATION_ROWS); (CalibrationData, notes)."""
    import torch

    from grape.data.text import CalibrationData

    stream = [t for d in docs for t in d.ids + ([separator] if separator is not None else [])]
    rows = min(samples, len(stream) // seq_len)
    if rows < min(samples, MIN_CALIBRATION_ROWS):  # fewer than asked, and fewer than the minimum
        raise DataError(f"too little calibration text: after holding documents out for the search it "
                        f"gives {len(stream)} tokens, {rows} sequences of {seq_len} (at least "
                        f"{MIN_CALIBRATION_ROWS} needed); add text, lower --seq-len, or pass --no-search")
    notes = () if rows == samples else (
        f"calibration: {rows} sequences of {seq_len} tokens, not {samples}: that is what the text "
        "gives after the held-out documents (add text for more)",)
    whole = torch.tensor(stream, dtype=torch.long)
    ids = whole[: rows * seq_len].view(rows, seq_len)
    return CalibrationData(ids, {**provenance, "samples": rows}, stream=whole), notes


# -- the two entry points -------------------------------------------------------------------------
def split_text(sources, tokenizer, targets: Targets, *, seq_len: int, samples: int, seed: int = 0,
               text_field: str = "text", window_len: int | None = None) -> Split:
    """Calibration rows of `seq_len` and held-out windows of `window_len` (default: the same)
    from one calibration text (module docstring). `targets.calibration`: samples x seq_len, 0
    for none (the held-out sets only); with no held-out target the whole text is calibration's
    (its rows adapt to the text likewise)."""
    window_len = window_len or seq_len
    from grape.data.text import iter_documents, source_names

    documents = iter_documents(sources, text_field=text_field, seed=seed)
    docs = _read_until(documents, tokenizer, targets, window_len)
    search, confirm, calibration = allocate([len(d.ids) for d in docs], targets, window_len)
    separator = getattr(tokenizer, "eos_token_id", None)
    held, notes = None, []
    if targets.search:
        held, notes = _held_out([docs[i] for i in search], [docs[i] for i in confirm], targets,
                                window_len, separator, "calibration text")
    provenance = {"sources": source_names(sources), "seq_len": seq_len, "seed": seed,
                  "text_field": text_field, "documents": len(calibration),
                  "held_out_documents": len(search) + len(confirm)}
    if not targets.calibration:  # held-out sets only (the scores exist already)
        return Split(None, held, tuple(notes))
    data, more = _calibration_rows([docs[i] for i in calibration], seq_len, samples, separator, provenance)
    return Split(data, held, tuple(notes) + more)


def split_check(sources, tokenizer, confirm: int, *, seq_len: int, samples: int, at_least: int,
                seed: int = 0, text_field: str = "text") -> tuple[Any, Windows | None, tuple[str, ...]]:
    """Rows to fit on and held-out windows to check the fit with, from one text split by document
    (a repair's text on `grape apply --repair auto`, grape.pruning.stage): the first documents
    give up to `confirm` tokens of windows of `seq_len` (at most `share` of a short text, as the
    search's sets), the rest up to `samples` rows of `seq_len`. Returns ((rows, seq_len) ids,
    the windows or None when the text leaves no whole window for them, notes); a text that fills
    fewer than `at_least` rows once the windows are held out: nothing is held out."""
    import torch

    from grape.data.text import iter_documents
    from grape.errors import ShortTextError

    targets = Targets(0, confirm, samples * seq_len)
    docs = _read_until(iter_documents(sources, text_field=text_field, seed=seed), tokenizer, targets, seq_len)
    _, held, rest = allocate([len(d.ids) for d in docs], targets, seq_len)
    separator = getattr(tokenizer, "eos_token_id", None)
    for fit, check in ((rest, held), (sorted(rest + held), [])):  # without the check if need be
        stream = [t for i in fit for t in docs[i].ids + ([separator] if separator is not None else [])]
        rows = min(samples, len(stream) // seq_len)
        windows_ = windows([docs[i] for i in check], seq_len, confirm, separator) if check else None
        if rows >= at_least and (windows_ is None or windows_.ids.shape[0] > 0):
            ids = torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)
            notes = () if windows_ is not None else (
                "the text is too short to hold documents out for the repair check",)
            if windows_ is not None and windows_.tokens < confirm:
                notes = (f"repair check on {windows_.tokens:,} held-out tokens ({windows_.num_documents} "
                         f"documents), less than the {confirm:,} asked: the text is short",)
            return ids, windows_, notes
    raise ShortTextError(f"the text fills fewer than {at_least} rows of {seq_len} tokens")


def _held_out(search_docs, confirm_docs, targets: Targets, seq_len: int, separator, source: str,
              offset: int = 0) -> tuple[HeldOut, list[str]]:
    if not search_docs:
        raise DataError("no document left for the search: the text is too short; add text or pass --no-search")
    search = windows(search_docs, seq_len, targets.search, separator, offset)
    confirm = (windows(confirm_docs, seq_len, targets.confirm, separator, offset + len(search_docs))
               if confirm_docs and targets.confirm else None)
    if search.ids.shape[0] == 0:
        raise DataError(f"the search documents hold fewer than {seq_len} tokens; add text or lower --seq-len")
    notes = []
    if search.tokens < targets.search or (targets.confirm and (confirm is None or confirm.tokens < targets.confirm)):
        notes.append(f"held out of the {source}: {search.tokens:,} search tokens ({search.num_documents} "
                     f"documents) and {confirm.tokens if confirm else 0:,} confirmation tokens "
                     f"({confirm.num_documents if confirm else 0} documents), less than the "
                     f"{targets.search:,} + {targets.confirm:,} asked: the text is short")
    if confirm is not None and confirm.ids.shape[0] == 0:
        confirm = None
    return HeldOut(search, confirm, tuple(notes), source), notes


def split_files(files: Sequence[str | os.PathLike], tokenizer, targets: Targets, *, seq_len: int,
                seed: int = 0) -> HeldOut:
    """Search and confirmation windows from --search-data files (grape.data.heldout formats): per
    domain (each weighs the same) its documents shuffled with `seed`, the search's share first."""
    from grape.data.heldout import load_documents

    domains = load_documents([str(f) for f in files])
    share = Targets(targets.search // len(domains), targets.confirm // len(domains), 0, 1.0)
    separator = getattr(tokenizer, "eos_token_id", None)
    parts, notes, offset = [], [], 0
    for domain, texts in domains.items():
        texts = list(texts)
        random.Random(seed).shuffle(texts)
        docs = _tokenized(texts, tokenizer, domain)
        search, confirm, _ = allocate([len(d.ids) for d in docs], share, seq_len)
        held, more = _held_out([docs[i] for i in search], [docs[i] for i in confirm], share, seq_len,
                               separator, f"search data ({domain})", offset)
        parts.append(held)
        notes += more
        offset += len(search) + len(confirm)
    search = _joined([p.search for p in parts])
    confirms = [p.confirm for p in parts if p.confirm is not None]
    confirm = _joined(confirms) if targets.confirm and len(confirms) == len(parts) else None
    return HeldOut(search, confirm, tuple(notes), "search data")


def _joined(parts: Sequence[Windows]) -> Windows:
    import torch

    return Windows(torch.cat([p.ids for p in parts]), np.concatenate([p.groups for p in parts]),
                   tuple(d for p in parts for d in p.documents))


__all__ = ["DOCUMENT_SHARE", "HELD_OUT_SHARE", "HeldOut", "MIN_CALIBRATION_ROWS", "Split", "Targets",
           "Windows", "allocate", "split_check", "split_files", "split_text", "windows"]
