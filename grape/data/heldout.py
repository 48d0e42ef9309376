"""Held-out documents for evaluation and search: files, directories, DOMAIN=PATH specs and the
embedded test bed's splits, grouped by domain in a fixed order (docs/evaluation.md).

    docs = load_documents(["heldout/prose.test.jsonl", "code=my_file.py"])   # {domain: [text]}
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from grape.errors import DataError
from grape.data.jsonl import parse_line

Documents = dict[str, list[str]]  # domain -> documents, in a fixed order


def default_heldout_files(split: str = "test", root: str | os.PathLike | None = None) -> list[Path]:
    """Held-out files {domain}.{split}.jsonl under `root`; without a root, the embedded test
    bed's (grape.testbed)."""
    if root is None:
        from grape.testbed import heldout_files

        return heldout_files(split)
    files = sorted(Path(root).glob(f"*.{split}.jsonl"))
    if not files:
        raise DataError(f"no held-out files {root}/*.{split}.jsonl; pass evaluation files "
                        "(--data) explicitly.")
    return files


def load_documents(sources: Mapping[str, Sequence[str]] | str | os.PathLike
                   | Sequence[str | os.PathLike]) -> Documents:
    """Documents grouped by domain, from any of:

    - a dict domain -> list of texts (returned as a copy);
    - JSONL files, one document a line with a "text" field and an optional "domain" field
      (default: the file name up to its first dot, so prose.test.jsonl -> "prose");
    - plain-text files, one document each, domain from the file name;
    - "DOMAIN=PATH" to set the domain of a file explicitly;
    - directories: every *.jsonl and *.txt file inside, sorted.
    Empty documents are dropped; the order of files and lines is kept.
    """
    if isinstance(sources, Mapping):
        docs = {str(d): [t for t in texts if isinstance(t, str) and t.strip()]
                for d, texts in sources.items()}
        return _check_documents({d: t for d, t in docs.items() if t}, "the given documents")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    docs: Documents = {}
    for spec in sources:
        domain, path = _split_spec(spec)
        for file in _expand(path):
            for doc_domain, text in _read_file(file, domain):
                docs.setdefault(doc_domain, []).append(text)
    names = ", ".join(str(s) for s in sources)
    return _check_documents(docs, names or "no files")


def _split_spec(spec: str | os.PathLike) -> tuple[str | None, Path]:
    text = os.fspath(spec)
    if "=" in text and not Path(text).exists():
        domain, _, path = text.partition("=")
        if domain and path:
            return domain, Path(path)
    return None, Path(text)


def _expand(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".txt") and p.is_file())
        if not files:
            raise DataError(f"evaluation data directory {path} holds no *.jsonl or *.txt files.")
        return files
    if not path.is_file():
        raise DataError(f"evaluation data file {path} does not exist; pass JSONL files with "
                        "\"text\" (and \"domain\") fields, plain-text files, or DOMAIN=PATH.")
    return [path]


def _read_file(path: Path, domain: str | None) -> list[tuple[str, str]]:
    default_domain = domain or path.name.split(".")[0]
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read evaluation data file {path}: {exc}") from None
    if path.suffix != ".jsonl":
        return [(default_domain, content)] if content.strip() else []
    out = []
    # split on \n only: str.splitlines would also cut at U+2028 etc. inside JSON strings
    for number, line in enumerate(content.split("\n"), 1):
        record = parse_line(line, "text", lambda: f"{path}:{number}",  # noqa: B023
                            "every line must be an object like {\"text\": ..., \"domain\": ...}")
        if record is not None and (record["text"] or "").strip():
            out.append((domain or str(record.get("domain") or default_domain), record["text"]))
    return out


def _check_documents(docs: Documents, where: str) -> Documents:
    if not docs:
        raise DataError(f"no non-empty documents in {where}; evaluation needs held-out text.")
    return docs


__all__ = ["Documents", "default_heldout_files", "load_documents"]
