"""How a results file says where it came from: the command that regenerates it, from a clean
checkout, with no machine paths (this checkout's paths become relative, scratch folders OUT)."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def scrub(text: str) -> str:
    """`text` without this machine's paths: the checkout's prefix dropped, temporary folders
    (the system's temp dir, whatever the benchmark named inside it) written OUT."""
    text = text.replace(f"{ROOT}/", "").replace(str(ROOT), ".")
    scratch = re.escape(tempfile.gettempdir().rstrip("/"))
    return re.sub(rf"{scratch}/[^\s`'\",;)]*", "OUT", text)


def command_line(script: str, argv: list[str] | None = None) -> str:
    """`python benchmarks/SCRIPT ARGS` as the user typed it, scrubbed of machine paths."""
    args = sys.argv[1:] if argv is None else argv
    return scrub(" ".join([f"python benchmarks/{script}", *args]))


def commands(data: dict) -> list[str]:
    """Every command a results file's rows came from, oldest first: a partial rerun or a merge
    appends its own, flat, instead of nesting the earlier provenance in one string."""
    return list(data.get("commands") or [data["command"]])


def describe(data: dict) -> str:
    """The markdown phrase naming those commands."""
    ran = commands(data)
    if len(ran) == 1:
        return f"`{ran[0]}`"
    return "; then ".join(f"`{c}`" for c in ran) + " (a later command replaces the rows it measures)"
