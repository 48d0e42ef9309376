"""Units of the constraint flags: byte sizes and the per-layer minimum, parsed and printed."""

from __future__ import annotations

import math
import re

from solvers.errors import UserError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def over_cap(used: float, cap: float) -> bool:
    """Byte caps are exact (kept bytes are integers); the tiny slack only absorbs float round-off."""
    return used > cap + 1e-9 * max(1.0, abs(cap))


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def parse_min_kept(text: str | int | None) -> int | str | None:
    """The --min-kept value: 'top_k' (the router's k), 'none' (no floor) or a whole number >= 0."""
    if text is None or isinstance(text, int) and not isinstance(text, bool):
        if text is not None and text < 0:
            raise UserError(f"--min-kept {text} must not be negative; give top_k, a number >= 0, or none")
        return text
    word = str(text).strip().lower()
    if word in ("none", "top_k"):
        return None if word == "none" else "top_k"
    try:
        value = int(word)
    except ValueError:
        raise UserError(f"--min-kept {text!r}: write top_k, a whole number >= 0, or none") from None
    if value < 0:
        raise UserError(f"--min-kept {value} must not be negative; give top_k, a number >= 0, or none")
    return value


def parse_bytes(text: str) -> float:
    """'40GB', '12.5 GiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"cannot read {text!r} as a size; write e.g. 40GB, 12.5GiB or 1e9")
    try:
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    except ValueError as exc:
        raise UserError(f"cannot read {text!r} as a size; write e.g. 40GB or 12.5GiB") from exc
    if not math.isfinite(value) or value < 0:
        raise UserError(f"size {text!r} must be a finite, non-negative number of bytes (e.g. 40GB)")
    return value


def parse_caps(text: str) -> float | list[float]:
    """The --memory-cap value: one size for every device ('80GB') or one per device
    ('80GB,80GB,40GB')."""
    parts = [part for part in str(text).split(",")]
    if len(parts) == 1:
        return parse_bytes(parts[0])
    if any(not part.strip() for part in parts):
        raise UserError(f"--memory-cap {text!r}: an empty entry; write e.g. 80GB,80GB,40GB")
    return [parse_bytes(part) for part in parts]
