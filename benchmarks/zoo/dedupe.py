"""Near-duplicate detection for the zoo's corpus splits (standard library only).

A held-out document (test or validation) must not be a near-copy of a calibration document, and
test and validation must not share near-copies either; otherwise "held-out" NLL partly measures
text the calibration (or the search, on validation) has already seen. The corpus has such copies:
per-architecture copies of OpenSSL's headers (`/usr/include/node/openssl/archs/<arch>/<variant>/`)
and generated codec tables (`encodings/mac_*.py`, `encodings/cp*.py`).

The rule (`THRESHOLD`, `SHINGLE_WORDS`):

* a document's **shingles** are its 8-word windows (words = whitespace-split tokens, so layout
  does not matter), each hashed to 64 bits (blake2b: the same on every machine and process);
* ``containment(a, b) = |S(a) & S(b)| / |S(a)|``: the share of a's shingles found in b;
* a held-out document is **dropped** when its containment in any *single* calibration document is
  >= 0.5 (calibration is never changed: it drives every calibration in the project);
* a validation document is dropped when it and a kept test document reach >= 0.5 in either
  direction (test is processed first and kept: it is the split every benchmark reports);
* within one split, a document is dropped when >= 0.5 of its shingles are in one earlier kept
  document of the same **family** (`source_family`: same directory, OpenSSL's per-architecture
  trees counted as one): of a pair of copies the first in the split's order is kept. Only copies
  of one family count here, and only the later document's share, so a header that merely shares
  a licence text with a shorter one of its split is kept (a duplicate inside a split leaks
  nothing; it only weighs that text twice).

Everything compares the text as committed (each document's head, `head()`), the text that is
evaluated. `clean_heldout` applies the rule while filling each domain's size budget, so a
dropped document's room goes to the next document of the split (the builder's order).
`check_clean` lists every violation of the rule in a set of files (the test uses it).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePosixPath

SHINGLE_WORDS = 8
THRESHOLD = 0.5
HELDOUT_SPLITS = ("test", "validation")  # processing order: test documents win over validation


@lru_cache(maxsize=4096)
def shingles(text: str, n: int = SHINGLE_WORDS) -> frozenset[int]:
    """The hashed n-word windows of a text (one window of all words when it has fewer than n);
    cached, since the same documents are compared again and again."""
    words = text.split()
    if not words:
        return frozenset()
    grams = [" ".join(words)] if len(words) < n else \
        (" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    return frozenset(int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
                     for g in grams)


def containment(a: frozenset[int], b: frozenset[int]) -> float:
    """Share of a's shingles that are also b's (0 for an empty a)."""
    return len(a & b) / len(a) if a else 0.0


def source_family(source: str) -> str:
    """The directory of a source path, with `.../archs/<arch>/<variant>/` as `.../archs/*/*/`, so
    the per-architecture copies of one OpenSSL header are one family."""
    parts = list(PurePosixPath(source).parts[:-1])
    if "archs" in parts:
        i = parts.index("archs")
        parts[i + 1:i + 3] = ["*", "*"][:len(parts[i + 1:i + 3])]
    return "/".join(parts)


def head(text: str, head_chars: int | None) -> str:
    """A document's first ~head_chars characters, cut at a line end (as the committed files)."""
    if head_chars is None or len(text) <= head_chars:
        return text
    cut = text.rfind("\n", 0, head_chars)
    return text[:cut] if cut != -1 else text[:head_chars]


@dataclass(frozen=True)
class Drop:
    split: str
    domain: str
    source: str
    chars: int
    reason: str       # "calibration", "test" (a kept test document) or "same split"
    match: str        # the source of the document it nearly copies
    score: float      # the containment that decided (test pairs: the larger direction)

    def line(self) -> str:
        return (f"{self.split:10s} {self.domain:6s} {self.chars:6d} chars  {self.source}\n"
                f"{'':18s}{self.score:.2f} ~ {self.reason}: {self.match}")


class _Index:
    """Documents' shingle sets with an inverted index: the best containment of a query against
    all of them costs one pass over the query's shingles, not one set intersection per document."""

    def __init__(self, docs: list[tuple[str, frozenset[int]]] = ()):
        self.sources: list[str] = []
        self.sizes: list[int] = []
        self.postings: dict[int, list[int]] = defaultdict(list)
        for source, sh in docs:
            self.add(source, sh)

    def add(self, source: str, sh: frozenset[int]) -> None:
        for g in sh:
            self.postings[g].append(len(self.sources))
        self.sources.append(source)
        self.sizes.append(len(sh))

    def nearest(self, sh: frozenset[int], both: bool) -> tuple[float, str]:
        """The largest containment of `sh` in one document (`both`: or of one document in `sh`)
        and that document's source; the first document wins a tie."""
        counts: dict[int, int] = defaultdict(int)
        for g in sh:
            for i in self.postings.get(g, ()):
                counts[i] += 1
        best, match = 0.0, ""
        for i in sorted(counts):
            score = counts[i] / len(sh)
            if both:
                score = max(score, counts[i] / self.sizes[i])
            if score > best:
                best, match = score, self.sources[i]
        return best, match


def clean_heldout(candidates: dict[str, list[dict]], calibration: list[dict], *,
                  max_bytes: int | None = None, head_chars: int | None = None,
                  threshold: float = THRESHOLD) -> tuple[dict[str, list[dict]], list[Drop]]:
    """Held-out documents without near-copies (module docstring's rule).

    candidates: split ("test", "validation") -> documents ({"text", "domain", "source"}) in the
    split's order of preference. Each document is cut to `head_chars`; one that would take its
    domain's text in the split past `max_bytes` (UTF-8 bytes + 100 per document, the builder's
    rule) is skipped, as the builder's cap does; of the rest, near-copies are dropped (and
    returned as `Drop`s), the others kept. Calibration documents are compared as given.
    """
    cal = _Index([(d["source"], shingles(d["text"])) for d in calibration])
    kept: dict[str, list[dict]] = {}
    drops: list[Drop] = []
    test_refs = _Index()
    for split in HELDOUT_SPLITS:
        out, used = [], defaultdict(int)
        family_refs: dict[str, _Index] = defaultdict(_Index)
        for doc in candidates.get(split, []):
            text = head(doc["text"], head_chars)
            size = len(text.encode()) + 100
            if max_bytes is not None and used[doc["domain"]] + size > max_bytes:
                continue
            sh = shingles(text)
            family = source_family(doc["source"])
            checks = [("calibration", cal, False)]
            if split == "validation":
                checks.append(("test", test_refs, True))
            checks.append(("same split", family_refs[family], False))
            for reason, refs, both in checks:
                score, match = refs.nearest(sh, both)
                if score >= threshold:
                    drops.append(Drop(split, doc["domain"], doc["source"], len(text), reason,
                                      match, score))
                    break
            else:
                out.append({**doc, "text": text})
                used[doc["domain"]] += size
                family_refs[family].add(doc["source"], sh)
                if split == "test":
                    test_refs.add(doc["source"], sh)
        kept[split] = out
    return kept, drops


def check_clean(heldout: dict[str, list[dict]], calibration: list[dict],
                threshold: float = THRESHOLD) -> list[str]:
    """Every violation of the rule in committed files (split -> documents): empty when clean."""
    cal = _Index([(d["source"], shingles(d["text"])) for d in calibration])
    sh = {split: [(d["source"], shingles(d["text"])) for d in docs]
          for split, docs in heldout.items()}
    problems = []
    for split, docs in sh.items():
        families: dict[str, _Index] = defaultdict(_Index)
        for source, s in docs:
            score, match = cal.nearest(s, both=False)
            if score >= threshold:
                problems.append(f"{split} {source}: {score:.2f} of its shingles in "
                                f"calibration {match}")
            score, match = families[source_family(source)].nearest(s, both=False)
            if score >= threshold:
                problems.append(f"{split} {source}: {score:.2f} near-copy of {match} "
                                "(same split and family)")
            families[source_family(source)].add(source, s)
    test = _Index(sh.get("test", []))
    for source, s in sh.get("validation", []):
        score, match = test.nearest(s, both=True)
        if score >= threshold:
            problems.append(f"validation {source}: {score:.2f} near-copy of test {match}")
    return problems


__all__ = ["Drop", "HELDOUT_SPLITS", "SHINGLE_WORDS", "THRESHOLD", "check_clean", "clean_heldout",
           "containment", "head", "shingles", "source_family"]
