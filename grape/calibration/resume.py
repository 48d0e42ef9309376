"""Resumable calibration: checkpoints in a folder beside the scores file (``OUT.partial/``).

A calibration that is interrupted (Ctrl-C, a killed job, a lost node) and started again with the
same command continues where its last checkpoint left off and writes the same scores file. The
folder records a *run key*: a hash of every setting that changes the result and of the packed
calibration tokens. Another key (other settings, other data, another world size) means the
checkpoint belongs to another run: it is discarded with a notice and the run starts over.

Files (every write goes to a temporary name and is renamed into place, so a kill never leaves a
half-written checkpoint under its final name):

* ``grape_calibration_checkpoint.json`` - the run key (written first; marks the folder as ours);
* whole-model mode: ``rank{r}-of-{n}.observer.pt`` - each rank's accumulators and how many of its
  batches they cover, every `checkpoint_every` batches;
* layer-sequential mode: ``layer{i}.scores.pt`` (a finished MoE layer), per rank
  ``rank{r}-of-{n}.hidden-{k}.bin`` (hidden states after k decoder layers) and
  ``progress.json`` (k), committed by rank 0 once every rank has written its part.

`grape apply`'s layer-by-layer repair (grape.pruning.repair_sequential) keeps its progress the same way
in ``OUT.partial/`` beside the checkpoint: ``progress.json`` (layers done and their fit records),
the hidden states after them, and ``layer{i}.repaired.safetensors`` (the run key in the file's
metadata: :meth:`CalibrationCheckpoint.save_tensors`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grape.calibration.distributed import World, barrier
from grape.errors import DataError
from solvers._io import disk_errors, remove_stale_staging, staging_prefix

MANIFEST = "grape_calibration_checkpoint.json"
PROGRESS = "progress.json"


def partial_dir(out: str | os.PathLike) -> Path:
    """The checkpoint folder of the scores file `out`: ``OUT.partial`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def run_key(settings: dict, tensors: Iterable[torch.Tensor | None]) -> str:
    """A hash of the settings (JSON-able) and the exact calibration tokens."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for tensor in tensors:
        if tensor is None:
            digest.update(b"none")
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:24]


def weight_files_key(model_dir: str | os.PathLike | None) -> str:
    """A hash of a model folder's config and weight files (name, size, modification time), read
    without opening them; "" when `model_dir` is not a folder (a model built in memory)."""
    if not model_dir or not Path(model_dir).is_dir():
        return ""
    digest = hashlib.sha256()
    for pattern in ("config.json", "*.safetensors", "*.bin"):
        for file in sorted(Path(model_dir).glob(pattern)):
            info = file.stat()
            digest.update(f"{file.name}:{info.st_size}:{info.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    # a GRAPE staging name (solvers._io), so the next run removes what a killed one left; a
    # write the disk refuses becomes one line naming the checkpoint file
    with disk_errors(path):
        fd, name = tempfile.mkstemp(prefix=staging_prefix(path.name), suffix=".tmp",
                                    dir=path.parent)
        os.close(fd)
        try:
            write(Path(name))
            os.replace(name, path)
        finally:
            Path(name).unlink(missing_ok=True)


def _torch_save(obj: Any, path: Path) -> None:
    # through a Python file: a refused write then keeps its OSError (as the RuntimeError's
    # context), which torch's own file writer reduces to "unexpected pos"
    with open(path, "wb") as handle:
        torch.save(obj, handle)


@dataclass
class CalibrationCheckpoint:
    """The checkpoint folder of one run; every rank opens it (rank 0 prepares it)."""

    directory: Path
    key: str
    world: World
    who: str = "grape calibrate"  # the command its notices name (grape apply's repair uses one too)

    @classmethod
    def open(cls, directory: str | os.PathLike, key: str, world: World,
             say: Callable[[str], None] = print, who: str = "grape calibrate") -> "CalibrationCheckpoint":
        """Use `directory` for this run: kept when it holds this run's checkpoint, emptied
        (with a notice) when it holds another run's. A folder GRAPE did not write is refused."""
        directory = Path(directory)
        if world.main:
            _prepare(directory, key, say, who)
        barrier(world)
        return cls(directory, key, world, who)

    def path(self, name: str) -> Path:
        return self.directory / name

    def run_path(self, name: str) -> Path:
        """A raw file of this run (no room for the key inside it): the key is in its name."""
        return self.directory / f"{self.key}-{name}"

    # -- tensors and objects ----------------------------------------------------------------
    # Every saved state carries the run key: two commands with other settings writing to the
    # same --out share this folder, and the manifest alone cannot stop one of them saving its
    # state after the other took the folder over.
    def save(self, name: str, obj: Any) -> None:
        """torch.save `obj` (tensors, numbers, lists, dicts) atomically, with the run key."""
        keyed = {"run_key": self.key, "state": obj}
        _atomic(self.path(name), lambda tmp: _torch_save(keyed, tmp))

    def load(self, name: str) -> Any | None:
        """What `save` wrote under `name` in this run; None (with a notice) for another run's."""
        path = self.path(name)
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - an unreadable file is a checkpoint we lack
            say_bad = f"{path} cannot be read ({exc.__class__.__name__}); it is ignored"
            print(f"{self.who}: {say_bad}")
            return None
        return self._own(saved, path, "state")

    def _own(self, saved: Any, path: Path, field: str) -> Any | None:
        if isinstance(saved, dict) and saved.get("run_key") == self.key and field in saved:
            return saved[field]
        print(f"{self.who}: {path} was saved by another run (other settings or data); it is "
              "ignored and that part is measured again")
        return None

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    # -- tensors as safetensors files (byte ranges another writer can copy) --------------------
    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        """A safetensors file of `tensors`, the run key in its metadata, written atomically."""
        from safetensors.torch import save_file

        path = self.path(name)
        plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _atomic(path, lambda tmp: save_file(plain, str(tmp), metadata={"run_key": self.key}))
        return path

    def tensors_file(self, name: str) -> Path | None:
        """The safetensors file `save_tensors` wrote under `name` in this run, or None (absent,
        unreadable or another run's)."""
        from grape.models.files import read_header

        path = self.path(name)
        try:
            header, _, _ = read_header(path) if path.is_file() else ({}, 0, 0)
        except (OSError, ValueError):
            return None
        return path if (header.get("__metadata__") or {}).get("run_key") == self.key else None

    # -- committed progress (layer-sequential) ------------------------------------------------
    def commit(self, progress: dict) -> None:
        """Record `progress` once every rank has written its files (rank 0 writes)."""
        barrier(self.world)
        if self.world.main:
            text = json.dumps({"run_key": self.key, "progress": progress}, sort_keys=True)
            _atomic(self.path(PROGRESS), lambda tmp: tmp.write_text(text))
        barrier(self.world)

    def progress(self) -> dict | None:
        """The committed progress of this run; None when there is none (or another run's)."""
        path = self.path(PROGRESS)
        try:
            saved = json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return None
        return None if saved is None else self._own(saved, path, "progress")


def discard(directory: str | os.PathLike) -> None:
    """Remove a checkpoint folder grape calibrate wrote (a folder without its manifest stays)."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        shutil.rmtree(directory, ignore_errors=True)


def _prepare(directory: Path, key: str, say: Callable[[str], None], who: str = "grape calibrate") -> None:
    manifest = directory / MANIFEST
    if directory.exists():
        if not directory.is_dir() or not manifest.is_file():
            where = "the scores" if who == "grape calibrate" else "the output"
            raise DataError(f"{directory} exists and is not a checkpoint {who} wrote; "
                            f"remove it or write {where} elsewhere (--out)")
        try:
            found = json.loads(manifest.read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            found = None
        if found == key:
            say(f"{who}: resuming from the checkpoint in {directory}")
            _remove_leftovers(directory, say, who)
            return
        say(f"{who}: {directory} holds the checkpoint of another run (other settings "
            "or data); starting over")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    _atomic(manifest, lambda tmp: tmp.write_text(json.dumps({"key": key}) + "\n"))


def _remove_leftovers(directory: Path, say: Callable[[str], None], who: str = "grape calibrate") -> None:
    """Temporary files a killed run left in the checkpoint folder (a hidden-states scratch file
    can be as large as the calibration set's activations)."""
    removed, _ = remove_stale_staging(directory)
    if removed:
        from solvers.constraints.units import format_bytes

        say(f"{who}: removed {len(removed)} temporary file(s) of a killed run "
            f"({format_bytes(sum(size for _, size in removed))}) from {directory}")


# -- layer scores as plain tensors (loadable with weights_only=True) ---------------------------
def layer_scores_state(scores) -> dict:
    """A solvers.scores.LayerScores as a dict of tensors and numbers."""
    def tensor(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

    return {"layer": int(scores.layer), "stats": {k: tensor(v) for k, v in scores.stats.items()},
            "expert_bytes": tensor(np.asarray(scores.expert_bytes)),
            "output_energy": float(scores.output_energy),
            "similarity": {k: tensor(v) for k, v in scores.similarity.items()},
            "cost_curve": tensor(scores.cost_curve)}


def layer_scores_from_state(state: dict):
    from solvers.scores import LayerScores

    def array(t):
        return None if t is None else t.numpy()

    return LayerScores(layer=int(state["layer"]),
                       stats={k: array(v) for k, v in state["stats"].items()},
                       expert_bytes=array(state["expert_bytes"]),
                       output_energy=float(state["output_energy"]),
                       similarity={k: array(v) for k, v in state["similarity"].items()},
                       cost_curve=array(state["cost_curve"]))


__all__ = ["CalibrationCheckpoint", "MANIFEST", "discard", "layer_scores_from_state",
           "layer_scores_state", "partial_dir", "run_key", "weight_files_key"]
