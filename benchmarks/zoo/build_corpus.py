"""Build the zoo's corpus from local text: English prose (Python docs, reST), Python (stdlib), C
(/usr/include). Split by document, deterministically (hash of the path), and write

  benchmarks/zoo/data/{domain}.{split}.jsonl       full splits (git-ignored, rebuildable)
  benchmarks/zoo/heldout/{domain}.{split}.jsonl    small committed copies of validation/test
  benchmarks/zoo/heldout/calibration.jsonl         small committed mixed-domain train sample

Every JSONL line is one document: {"text", "domain", "source"}. A missing source (e.g. the
Python documentation, package python3.11-doc) is refused in one line before anything is written.

The held-out files hold no near-copy of a calibration document, nor test/validation near-copies
of each other (dedupe.py: 8-word shingles, containment >= 0.5); a dropped document's room goes to
the next document of its split. To apply that rule to the committed files without a full rebuild
(refilling from the local sources of the domains this machine has):

    python benchmarks/zoo/build_corpus.py
    python benchmarks/zoo/build_corpus.py --dedupe-committed [--no-refill] [--dry-run]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

ZOO = Path(__file__).resolve().parent
sys.path.insert(0, str(ZOO.parents[1]))
sys.path.insert(0, str(ZOO))
from dedupe import HELDOUT_SPLITS, THRESHOLD, Drop, clean_heldout, head
from grape.outputs import atomic_open

DOMAINS = ("prose", "python", "c")
SPLITS = ("train", "validation", "test")
PROSE_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
C_ROOT = Path("/usr/include")
MAX_DOC_CHARS = 200_000  # skip generated giants (unicode tables, huge enum headers)
HELDOUT_DOC_CHARS = 6_000  # committed copies keep each document's head: more documents, same size
HELDOUT_BYTES = 140_000
CALIBRATION_BYTES = 350_000
PY_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def _fraction(key: str) -> float:
    """A stable number in [0, 1) from a string: the split and the order never depend on the OS."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12


def split_of(source: str, held_out: float = 0.05) -> str:
    u = _fraction("split:" + source)
    if u < held_out:
        return "validation"
    if u < 2 * held_out:
        return "test"
    return "train"


def prose_files() -> list[Path]:
    return sorted(PROSE_ROOT.rglob("*.txt"))


def python_files() -> list[Path]:
    root = Path(os.path.dirname(os.__file__))
    return sorted(p for p in root.rglob("*.py")
                  if not (set(p.relative_to(root).parts[:-1]) & PY_SKIP)
                  and not p.name.startswith("test_"))


def c_files() -> list[Path]:
    return sorted(p for p in C_ROOT.rglob("*.h") if p.is_file() and not p.is_symlink())


SOURCES = {"prose": prose_files, "python": python_files, "c": c_files}
# where each domain's text comes from and what installs it, for the error when it is missing
PROVIDERS = {
    "prose": (lambda: PROSE_ROOT, "the Python documentation sources: apt-get install python3.11-doc"),
    "python": (lambda: Path(os.path.dirname(os.__file__)), "the Python standard library (a full "
               "CPython install, not a stripped one)"),
    "c": (lambda: C_ROOT, "the C library headers: apt-get install libc6-dev"),
}


class MissingSource(Exception):
    """A domain whose source text is not on this machine: nothing is written."""


def check_source(domain: str) -> None:
    """The domain's source folder exists (cheap, before anything is read)."""
    root, package = PROVIDERS[domain][0](), PROVIDERS[domain][1]
    if not root.is_dir():
        raise MissingSource(f"no {domain} text: {root} does not exist; install {package}")


def check_documents(domain: str, by_split: dict[str, list[dict]]) -> None:
    """Every split of the domain has documents: an empty file would train and evaluate on
    nothing, silently."""
    root, package = PROVIDERS[domain][0](), PROVIDERS[domain][1]
    total = sum(len(docs) for docs in by_split.values())
    if total == 0:
        raise MissingSource(f"no {domain} documents of 200..{MAX_DOC_CHARS} characters under "
                            f"{root}; install {package}")
    empty = [split for split, docs in by_split.items() if not docs]
    if empty:
        raise MissingSource(f"{domain}: only {total} documents under {root}, so its {empty[0]} "
                            f"split would be empty; install {package}")


def read_documents(domain: str) -> list[dict]:
    docs = []
    for path in SOURCES[domain]():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.replace("\r\n", "\n").strip()
        if 200 <= len(text) <= MAX_DOC_CHARS:
            docs.append({"text": text, "domain": domain, "source": str(path)})
    # deterministic shuffle: the order of documents (and so any cap) depends only on paths
    docs.sort(key=lambda d: _fraction("order:" + d["source"]))
    return docs


def _cap(docs: list[dict], max_bytes: int, head_chars: int | None = None) -> list[dict]:
    out, total = [], 0
    for doc in docs:
        text = head(doc["text"], head_chars)
        size = len(text.encode()) + 100
        if total + size > max_bytes:
            continue
        out.append({**doc, "text": text})
        total += size
    return out


def write_jsonl(path: Path, docs: list[dict]) -> None:
    with atomic_open(path, "w") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")


def read_all() -> dict[str, dict[str, list[dict]]]:
    """domain -> split -> documents, every source checked first (MissingSource)."""
    for domain in DOMAINS:
        check_source(domain)
    out = {}
    for domain in DOMAINS:
        docs = read_documents(domain)
        out[domain] = {s: [d for d in docs if split_of(d["source"]) == s] for s in SPLITS}
        check_documents(domain, out[domain])
    return out


def read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _order(doc: dict) -> float:
    return _fraction("order:" + doc["source"])


def select_heldout(candidates: dict[str, list[dict]], calibration: list[dict],
                   committed: set[str] | None = None) -> tuple[dict[str, list[dict]], list[Drop]]:
    """The committed held-out documents: split -> documents of all domains, each domain's text cut
    to HELDOUT_DOC_CHARS per document and HELDOUT_BYTES per file, without near-copies of the
    calibration documents or of each other (dedupe.py); the drops are printed (with `committed`,
    the sources of the files being cleaned, each drop is marked as a committed document removed
    or a refill candidate skipped) and returned."""
    kept, drops = clean_heldout(candidates, calibration, max_bytes=HELDOUT_BYTES,
                                head_chars=HELDOUT_DOC_CHARS)
    print(f"near-duplicates dropped (8-word shingle containment >= {THRESHOLD}): {len(drops)}")
    for drop in drops:
        tag = "" if committed is None else \
            ("[removed] " if drop.source in committed else "[skipped refill] ")
        print("  " + tag + drop.line())
    return kept, drops


def _chars(docs: list[dict]) -> int:
    return sum(len(d["text"]) for d in docs)


def dedupe_committed(heldout: Path, refill: bool = True, dry_run: bool = False) -> int:
    """Apply the near-duplicate rule to the committed held-out files; calibration.jsonl is kept as
    it is. With `refill`, the candidates of a domain whose source is on this machine are the
    committed documents plus that domain's other documents of the same split (split_of), in the
    builder's order, so the result is what a rebuild from these sources gives (a committed
    document can also leave because an earlier one now takes its room: printed as "no room
    left"); otherwise only the committed documents (a dropped one's room stays empty)."""
    calibration = read_jsonl(heldout / "calibration.jsonl")
    before = {(domain, split): read_jsonl(heldout / f"{domain}.{split}.jsonl")
              for split in HELDOUT_SPLITS for domain in DOMAINS}
    candidates: dict[str, list[dict]] = {split: [] for split in HELDOUT_SPLITS}
    for domain in DOMAINS:
        raw: list[dict] = []
        if refill:
            try:
                check_source(domain)
                raw = read_documents(domain)
            except MissingSource as exc:
                print(f"{domain}: no refill ({exc})")
        for split in HELDOUT_SPLITS:
            committed = before[(domain, split)]
            known = {d["source"] for d in committed}
            extra = [d for d in raw if split_of(d["source"]) == split and d["source"] not in known]
            candidates[split] += sorted(committed + extra, key=_order)
    kept, drops = select_heldout(candidates, calibration,
                                 {d["source"] for docs in before.values() for d in docs})
    dropped = {d.source for d in drops}
    print(f"{'file':24s} {'docs before':>11s} {'after':>6s} {'chars before':>12s} {'after':>8s} "
          f"{'bytes':>7s}  added (refill) / removed for room")
    for split in HELDOUT_SPLITS:
        for domain in DOMAINS:
            old = before[(domain, split)]
            new = [d for d in kept[split] if d["domain"] == domain]
            old_src, new_src = {d["source"] for d in old}, {d["source"] for d in new}
            size = sum(len(json.dumps(d, ensure_ascii=False).encode()) + 1 for d in new)
            print(f"{domain + '.' + split + '.jsonl':24s} {len(old):11d} {len(new):6d} "
                  f"{_chars(old):12d} {_chars(new):8d} {size:7d}")
            for d in new:
                if d["source"] not in old_src:
                    print(f"  + {len(d['text']):6d} chars  {d['source']}")
            for d in old:
                if d["source"] not in new_src and d["source"] not in dropped:
                    print(f"  - {len(d['text']):6d} chars  {d['source']} (no room left)")
            if not dry_run and new != old:
                write_jsonl(heldout / f"{domain}.{split}.jsonl", new)
    if dry_run:
        print("dry run: nothing written")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-mb", type=float, default=8.0, help="cap on each domain's train text")
    parser.add_argument("--out", type=Path, default=ZOO / "data")
    parser.add_argument("--heldout", type=Path, default=ZOO / "heldout")
    parser.add_argument("--dedupe-committed", action="store_true",
                        help="only apply the near-duplicate rule to the committed held-out files "
                             "(calibration.jsonl unchanged) and refill them from local sources")
    parser.add_argument("--no-refill", action="store_true",
                        help="with --dedupe-committed: drop near-copies without refilling")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --dedupe-committed: write nothing")
    args = parser.parse_args(argv)
    if (args.no_refill or args.dry_run) and not args.dedupe_committed:
        parser.error("--no-refill and --dry-run go with --dedupe-committed")
    if args.dedupe_committed:
        return dedupe_committed(args.heldout, refill=not args.no_refill, dry_run=args.dry_run)
    try:
        splits = read_all()
    except MissingSource as exc:  # refuse before writing anything
        print(f"build_corpus.py: error: {exc}", file=sys.stderr)
        return 2

    calibration = []
    candidates: dict[str, list[dict]] = {split: [] for split in HELDOUT_SPLITS}
    for domain, by_split in splits.items():
        by_split["train"] = _cap(by_split["train"], int(args.train_mb * 1e6))
        for split, split_docs in by_split.items():
            write_jsonl(args.out / f"{domain}.{split}.jsonl", split_docs)
            mb = sum(len(d["text"].encode()) for d in split_docs) / 1e6
            print(f"{domain:7s} {split:10s} {len(split_docs):6d} docs {mb:7.2f} MB")
        for split in HELDOUT_SPLITS:
            candidates[split] += by_split[split]
        calibration += _cap(by_split["train"], CALIBRATION_BYTES // len(DOMAINS), HELDOUT_DOC_CHARS)
    calibration.sort(key=lambda d: _fraction("calib:" + d["source"]))
    heldout, _ = select_heldout(candidates, calibration)
    for domain in DOMAINS:
        for split in HELDOUT_SPLITS:
            write_jsonl(args.heldout / f"{domain}.{split}.jsonl",
                        [d for d in heldout[split] if d["domain"] == domain])
    write_jsonl(args.heldout / "calibration.jsonl", calibration)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
