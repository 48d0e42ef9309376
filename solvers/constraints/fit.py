"""--fit SPEC: per-device memory caps from a GPU count and a size or a named GPU type.

``2x80GB``, ``8xH100``, ``4x141GB`` (and ``--kv-reserve 20%``: the part of every device kept
free for activations, and for the KV cache unless ``--max-seq-len`` counts it). The caps count
everything the scores file sizes: routed experts, the other parts of each layer, embeddings and
head, and the KV cache (solvers.constraints.memory; docs/solvers.md, "Fit a model on N GPUs").
"""

from __future__ import annotations

import math
import re

from solvers.constraints.units import parse_bytes
from solvers.errors import UserError

# Memory per device, as sold (powers of ten are how vendors quote them; close enough here).
GPU_MEMORY: dict[str, float] = {
    "H100": 80e9,
    "H100-80GB": 80e9,
    "H100-NVL": 94e9,
    "H200": 141e9,
    "GH200": 96e9,
    "A100": 80e9,
    "A100-80GB": 80e9,
    "A100-40GB": 40e9,
    "L40S": 48e9,
    "L40": 48e9,
    "L4": 24e9,
    "A10": 24e9,
    "A6000": 48e9,
    "RTX4090": 24e9,
    "B200": 192e9,
    "B100": 192e9,
    "GB200": 192e9,
    "MI300X": 192e9,
    "MI325X": 256e9,
    "MI250X": 128e9,
}


def parse_fit(spec: str) -> tuple[int, float]:
    """'4x80GB' -> (4, 80e9); '8xH100' -> (8, 80e9)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\S+)\s*", str(spec))
    if not m:
        raise UserError(f"--fit {spec!r}: write COUNTxSIZE or COUNTxGPU, e.g. 2x80GB or 8xH100")
    count, what = int(m.group(1)), m.group(2)
    if count < 1:
        raise UserError(f"--fit {spec!r}: the device count must be at least 1")
    named = {k.upper(): v for k, v in GPU_MEMORY.items()}
    if what.upper() in named:
        return count, named[what.upper()]
    if what[:1].isdigit() or what[:1] == ".":
        size = parse_bytes(what)
        if size <= 0:
            raise UserError(f"--fit {spec!r}: a device needs a positive memory size")
        return count, size
    known = ", ".join(sorted(GPU_MEMORY))
    raise UserError(f"--fit {spec!r}: unknown GPU {what!r}; give a size (80GB) or one of {known}")


def parse_reserve(text: str | float | None) -> float:
    """'20%' or '0.2' -> 0.2 (None -> 0): the fraction of each device kept free."""
    if text is None:
        return 0.0
    word = str(text).strip()
    try:
        value = float(word[:-1]) / 100 if word.endswith("%") else float(word)
    except ValueError:
        raise UserError(f"--kv-reserve {text!r}: write a percentage (20%) or a fraction (0.2)") from None
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise UserError(f"--kv-reserve {text!r} must lie in [0%, 100%)")
    return value


def fit_caps(spec: str, reserve: str | float | None = None) -> tuple[int, float]:
    """(devices, cap per device in whole bytes) for --fit SPEC --kv-reserve R."""
    devices, size = parse_fit(spec)
    return devices, float(math.floor(size * (1.0 - parse_reserve(reserve))))
