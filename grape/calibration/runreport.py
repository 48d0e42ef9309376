"""What a calibration run cost: mode, wall time, tokens/s, peak device and host memory.

Printed by ``grape calibrate`` and stored in the scores file as ``calibration["run"]``. Peak
host memory is the process's peak resident set, so it includes loading the model;
peak device memory is the largest ``torch.cuda.max_memory_allocated`` over the GPUs this
process used since the run started (resident weights included), None on CPU. In a data-parallel
run both are the maximum over the ranks and tokens/s counts every rank's tokens.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch

from grape.calibration.distributed import World, maximum

GB = 1e9


def peak_host_bytes() -> int:
    """Peak resident set size of this process. On Linux VmHWM of /proc/self/status: getrusage's
    ru_maxrss survives exec, so a process started by a large parent would report the parent's
    size. Elsewhere ru_maxrss (macOS reports bytes, others KiB)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _cuda_indices(devices) -> list[int]:
    if not torch.cuda.is_available():
        return []
    found = {torch.device(d).index or 0 for d in devices if torch.device(d).type == "cuda"}
    return sorted(found)


@dataclass
class CalibrationReport:
    mode: str  # "whole" or "sequential"
    reason: str  # why that mode
    world_size: int
    seconds: float
    tokens: int
    peak_device_memory: int | None  # bytes on the busiest GPU; None on CPU
    peak_host_memory: int  # bytes
    hidden_states: str | None = None  # sequential mode: where the hidden states were kept

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": round(self.tokens_per_second, 1),
                "seconds": round(self.seconds, 3)}

    def line(self) -> str:
        device = ("n/a (CPU)" if self.peak_device_memory is None
                  else f"{self.peak_device_memory / GB:.2f} GB")
        where = f", hidden states on {self.hidden_states}" if self.hidden_states else ""
        ranks = f" on {self.world_size} ranks" if self.world_size > 1 else ""
        return (f"mode {self.mode} ({self.reason}){where}{ranks}: {self.tokens} tokens in "
                f"{self.seconds:.1f} s ({self.tokens_per_second:,.0f} tokens/s); peak device "
                f"memory {device}, peak host memory {self.peak_host_memory / GB:.2f} GB")


class Meter:
    """Started when a run starts; `report` at its end."""

    def __init__(self, devices):
        self.cuda = _cuda_indices(devices)
        for index in self.cuda:
            torch.cuda.reset_peak_memory_stats(index)
        self.start = time.perf_counter()

    def report(self, mode: str, reason: str, tokens: int, world: World,
               hidden_states: str | None = None) -> CalibrationReport:
        for index in self.cuda:
            torch.cuda.synchronize(index)
        seconds = maximum(time.perf_counter() - self.start, world)
        device = max((torch.cuda.max_memory_allocated(i) for i in self.cuda), default=None)
        device = None if device is None and not world.distributed else device
        if world.distributed:  # every rank takes part in the reductions
            reduced = maximum(-1.0 if device is None else float(device), world)
            device = None if reduced < 0 else int(reduced)
        host = int(maximum(float(peak_host_bytes()), world))
        return CalibrationReport(mode, reason, world.size, seconds, tokens, device, host,
                                 hidden_states)


__all__ = ["CalibrationReport", "Meter", "peak_host_bytes"]
