"""Data-parallel calibration over torch.distributed ranks (torchrun: gloo on CPU, NCCL on GPUs).

    torchrun --nproc-per-node 8 -m grape calibrate --model M --data TEXT --out scores.npz

Every rank holds the same packed sequences and cuts them into the batches of the single-process
run; rank r takes a contiguous share of those *batches* (:func:`share`). A batch is therefore
the same forward on whichever rank runs it, and its subsample rows are drawn with the same
generator (seeded by the global batch number, see ExpertObserver.plan_call), so after

* an all-reduce of each MoE layer's accumulators (sums and counts: SUM; ``norm_max``: MAX), and
* an all-gather of the subsample rows, put back in global batch order,

every rank holds what the single-process observer would have held. The similarity / cost-curve
pass of each layer then runs on one rank (layers dealt round robin) and rank 0 gathers the
layer scores and writes the file. No launcher of our own: torchrun sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR (see docs/calibration.md for several nodes).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from grape.errors import DataError


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank `rank` of `size` (1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" / "nccl" when distributed

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def tag(self) -> str:
        """A file-name tag unique to this rank within this world size."""
        return f"rank{self.rank}-of-{self.size}"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def current_world() -> World:
    """The initialised process group's world, or the single-process world."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                 dist.get_backend())


def launched_size() -> int:
    """WORLD_SIZE set by torchrun (1 when started plainly)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise DataError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; start "
                        "several processes with torchrun --nproc-per-node N") from None


def init_from_env(use_cuda: bool) -> World:
    """Join the job torchrun describes in the environment: NCCL when the ranks compute on GPUs
    (each on GPU LOCAL_RANK), gloo on CPU. A plain single process gets World()."""
    dist = _dist()
    if launched_size() <= 1 or dist is None:
        return current_world()
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            if local >= torch.cuda.device_count():
                raise DataError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} "
                                "GPU(s); pass torchrun --nproc-per-node at most the GPU count")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return current_world()


def shutdown() -> None:
    dist = _dist()
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


def share(count: int, world: World) -> range:
    """This rank's contiguous block of `count` items; block sizes differ by at most one."""
    base, extra = divmod(count, world.size)
    start = world.rank * base + min(world.rank, extra)
    return range(start, start + base + (1 if world.rank < extra else 0))


def owner(position: int, world: World) -> int:
    """The rank that computes the similarity / cost curves of the `position`-th MoE layer."""
    return position % world.size


def _wire(world: World) -> torch.device:
    """Where collective tensors must live for the backend."""
    return torch.device("cuda", torch.cuda.current_device()) if world.backend == "nccl" else \
        torch.device("cpu")


def _reduce(tensor: torch.Tensor, world: World, op: str) -> torch.Tensor:
    dist = _dist()
    wire = tensor.to(_wire(world))
    dist.all_reduce(wire, op=getattr(dist.ReduceOp, op))
    return wire.to(tensor.device)


def reduce_layer(state, world: World, device: torch.device) -> None:
    """Make one MoE layer's observer state (grape.calibration.observer._LayerState) the whole job's: sums,
    counts and energy summed, norm_max maximised, subsample rows gathered in call order."""
    if not world.distributed:
        return
    state.ensure_accumulators(device)
    state.sums = _reduce(state.sums, world, "SUM")
    state.norm_max = _reduce(state.norm_max, world, "MAX")
    state.energy = _reduce(state.energy, world, "SUM")
    tokens = torch.tensor([state.energy_tokens], dtype=torch.int64)
    state.energy_tokens = int(_reduce(tokens, world, "SUM").item())
    mine = [(call, rows.detach().cpu()) for call, rows in zip(state.sample_calls, state.samples)]
    pieces = sorted((p for part in all_gather(mine, world) for p in part), key=lambda p: p[0])
    state.sample_calls = [call for call, _ in pieces]
    state.samples = [rows.to(device) for _, rows in pieces]
    state.sampled = sum(int(rows.shape[0]) for rows in state.samples)


def all_gather(obj: Any, world: World) -> list[Any]:
    """`obj` of every rank, in rank order (picklable objects; small ones)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    _dist().all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any, world: World) -> list[Any] | None:
    """`obj` of every rank on rank 0 (None on the others)."""
    if not world.distributed:
        return [obj]
    out: list[Any] | None = [None] * world.size if world.main else None
    _dist().gather_object(obj, out, dst=0)
    return out


def maximum(value: float, world: World) -> float:
    """The largest `value` over the ranks."""
    if not world.distributed:
        return value
    return float(_reduce(torch.tensor([float(value)], dtype=torch.float64), world, "MAX").item())


def barrier(world: World) -> None:
    if world.distributed:
        if world.backend == "nccl":
            _dist().barrier(device_ids=[torch.cuda.current_device()])
        else:
            _dist().barrier()


def from_main(fn: Callable[[], Any], world: World) -> Any:
    """Run `fn` on rank 0 only and hand its result to every rank; an exception it raises is
    raised on every rank (so a data error stops the whole job with one message, no hang)."""
    if not world.distributed:
        return fn()
    payload: list[Any] = [None]
    if world.main:
        try:
            payload = [("ok", fn())]
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            payload = [("error", exc)]
    _dist().broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        raise value
    return value


__all__ = ["World", "all_gather", "barrier", "current_world", "from_main", "gather_to_main",
           "init_from_env", "launched_size", "maximum", "owner", "reduce_layer", "share",
           "shutdown"]
