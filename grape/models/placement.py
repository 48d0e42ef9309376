"""Where a calibration runs: the whole model on its devices, or layer by layer on one device.

``grape calibrate`` picks the mode with a simple size check made before any weight is read: the
model's parameters in the compute dtype (counted on the meta-device skeleton) against 85% of
the memory the whole-model placement would have (free memory of the GPUs it uses, else the
available host memory, bounded by a container's or job's cgroup memory limit:
grape.models.host_memory), the rest being left for activations and the subsample pass. A
checkpoint whose experts are stored quantised (FP8, MXFP4) always goes layer by layer: its
layers are dequantised one at a time, which the whole-model path cannot observe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from grape.calibration.distributed import World
from grape.errors import DataError

MODES = ("auto", "whole", "sequential")
HEADROOM = 0.85  # share of the free memory the weights may take in whole-model mode
_GB = 1e9


@dataclass(frozen=True)
class ModeChoice:
    mode: str  # "whole" or "sequential"
    reason: str  # one line for the terminal and the scores file


def choose_mode(requested: str, needed: int, capacity: int, where: str,
                quantization: str | None) -> ModeChoice:
    """The mode for a model of `needed` bytes when `where` has `capacity` bytes free."""
    if requested not in MODES:
        raise DataError(f"--mode {requested!r} is not one of {', '.join(MODES)}")
    if requested != "auto":
        return ModeChoice(requested, f"--mode {requested}")
    if quantization:
        return ModeChoice("sequential", f"the checkpoint is quantised ({quantization}); its "
                          "layers are dequantised one at a time")
    size = f"the model needs {needed / _GB:.2f} GB"
    if needed > HEADROOM * capacity:
        return ModeChoice("sequential", f"{size}, more than {HEADROOM:.0%} of the "
                          f"{capacity / _GB:.2f} GB free on {where}")
    return ModeChoice("whole", f"{size}; {where} has {capacity / _GB:.2f} GB free")


def _local_world_size() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def uses_cuda(spec) -> bool:
    """Whether a --device-map value puts the model on GPUs."""
    if isinstance(spec, dict):
        return any(str(v).startswith("cuda") or isinstance(v, int) for v in spec.values())
    return str(spec).startswith("cuda") or (
        str(spec) in ("auto", "balanced", "balanced_low_0", "sequential")
        and torch.cuda.is_available())


def whole_capacity(placement, world: World) -> tuple[int, str]:
    """(free bytes, a description) of what a whole-model load with `placement` would use."""
    if uses_cuda(placement):
        if world.distributed:  # each rank holds a copy on its own GPU
            indices = [torch.cuda.current_device()]
        elif isinstance(placement, str) and placement.startswith("cuda:"):
            indices = [int(placement.split(":")[1])]
        else:
            indices = list(range(torch.cuda.device_count()))
        free = sum(torch.cuda.mem_get_info(i)[0] for i in indices)
        return int(free), f"{len(indices)} GPU(s)"
    from grape.models.host_memory import available_bytes

    share = _local_world_size()  # ranks on this node each load a copy into host memory
    free, limited = available_bytes()  # the machine's, or a container's memory limit if tighter
    where = "host memory" + (" (this process's cgroup memory limit)" if limited else "")
    return int(free // share), where + (f" (1/{share} per rank)" if share > 1 else "")


def whole_placement(placement, world: World):
    """The device_map of the whole-model load: each rank of a data-parallel job on its own GPU."""
    if world.distributed and uses_cuda(placement) and not isinstance(placement, dict):
        return f"cuda:{torch.cuda.current_device()}"
    return placement


def sequential_device(placement, world: World) -> torch.device:
    """The one device of layer-sequential mode, from a --device-map value."""
    if isinstance(placement, dict) or str(placement) in ("balanced", "balanced_low_0",
                                                          "sequential", "disk"):
        raise DataError(f"layer-sequential calibration runs on one device, but --device-map is "
                        f"{placement!r}; pass --device-map cuda:N, cuda or cpu (under torchrun "
                        "each rank takes its LOCAL_RANK GPU)")
    if str(placement) == "auto":
        placement = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(placement)
    if device.type == "cuda" and (device.index is None or world.distributed):
        device = torch.device("cuda", torch.cuda.current_device())
    return device


__all__ = ["HEADROOM", "MODES", "ModeChoice", "choose_mode", "sequential_device", "uses_cuda",
           "whole_capacity", "whole_placement"]
