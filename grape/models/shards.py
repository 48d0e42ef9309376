"""Raw safetensors shards: read headers, describe tensors as byte ranges, write new shards.

Streaming apply (grape/pruning/streaming.py) never materialises a tensor: every output tensor is a list
of byte ranges of the source files (a whole tensor, or the slices of the experts a layer keeps
along the tensor's expert dimension), copied in bounded chunks into new shards. So memory stays
flat whatever the checkpoint's size, any dtype is handled (float8, packed MXFP4 blocks, E8M0
scales), and copied tensors are byte-identical. No torch here.

Output files follow what transformers' ``save_pretrained`` writes: ``model.safetensors`` when
everything fits one shard, else ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json``; shards are filled in order and closed before ``max_shard_size``
would be passed (a larger tensor gets a shard of its own), as huggingface_hub splits them.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from grape.models.files import INDEX_FILE, read_header, weight_files
from solvers.constraints.units import parse_bytes
from solvers.errors import UserError

SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers v5 save_pretrained's default
_CHUNK = 16 << 20  # bytes copied per read
# bytes per element, for ordering tensors in a file (largest first keeps every tensor aligned,
# as the safetensors library does); unknown dtypes count as 1
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
             "I16": 2, "U16": 2}


class ShardError(UserError):
    """A safetensors file or index that cannot be streamed."""


@dataclass(frozen=True)
class Piece:
    """`length` bytes at absolute offset `offset` of `file`."""

    file: Path
    offset: int
    length: int


@dataclass
class StoredTensor:
    """A tensor as a list of byte ranges: one range for a stored tensor, several for a slice."""

    name: str
    dtype: str
    shape: list[int]
    pieces: list[Piece] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(p.length for p in self.pieces)

    def renamed(self, name: str) -> "StoredTensor":
        return StoredTensor(name, self.dtype, list(self.shape), list(self.pieces))

    def rows(self, keep: list[int]) -> "StoredTensor":
        """The sub-tensor holding rows `keep` (sorted) of dim 0, as byte ranges."""
        return self.take(keep, 0)

    def take(self, keep: list[int], axis: int = 0) -> "StoredTensor":
        """The sub-tensor holding indices `keep` (sorted) of dimension `axis`, as byte ranges:
        for every index of the dimensions before `axis`, one range per run of consecutive
        kept indices (a [1, E] per-expert bias on axis 1 is one range per run, as on dim 0)."""
        if not self.shape or not -len(self.shape) <= axis < len(self.shape):
            raise ShardError(f"tensor {self.name!r} of shape {self.shape} has no dimension {axis}")
        axis %= len(self.shape)
        n, outer = self.shape[axis], _product(self.shape[:axis])
        if len(self.pieces) != 1 or outer * n == 0 or self.nbytes % (outer * n):
            raise ShardError(f"tensor {self.name!r} cannot be sliced on dimension {axis}")
        for index in keep:
            if not 0 <= index < n:
                raise ShardError(f"tensor {self.name!r} has {n} entries on dimension {axis}; "
                                 f"{index} does not exist")
        step = self.nbytes // (outer * n)  # bytes of one index of `axis` (the dims after it)
        base = self.pieces[0]
        pieces: list[Piece] = []
        for block in range(outer):
            for index in keep:
                _extend(pieces, Piece(base.file, base.offset + (block * n + index) * step, step))
        shape = list(self.shape)
        shape[axis] = len(keep)
        return StoredTensor(self.name, self.dtype, shape, pieces)


def _product(dims: list[int]) -> int:
    out = 1
    for dim in dims:
        out *= dim
    return out


def _extend(pieces: list[Piece], piece: Piece) -> None:
    """Append `piece`, merged into the last one when it continues it (fewer, longer reads)."""
    last = pieces[-1] if pieces else None
    if last is not None and last.file == piece.file and last.offset + last.length == piece.offset:
        pieces[-1] = Piece(last.file, last.offset, last.length + piece.length)
    else:
        pieces.append(piece)


# -- reading ----------------------------------------------------------------------------------
def stored_tensors(directory: Path) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint in `directory`, in file order (by file, then offset).
    Files and headers are read by grape.models.files (a missing shard or a bad header is an error)."""
    out: dict[str, StoredTensor] = {}
    for file in weight_files(Path(directory)):
        header, data_start, _ = read_header(file)
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            start, stop = (int(v) for v in info["data_offsets"])
            if name in out:
                raise ShardError(f"tensor {name!r} is stored twice ({out[name].pieces[0].file.name} "
                                 f"and {file.name})")
            out[name] = StoredTensor(name, str(info["dtype"]), [int(d) for d in info["shape"]],
                                     [Piece(file, data_start + start, stop - start)])
    return out


# -- writing ----------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """Bytes in '200MB', '5GB', '2GiB' or a plain integer (KB/MB/GB are powers of 1000, as in
    transformers' max_shard_size): the units of every size flag (solvers' parse_bytes)."""
    try:
        size = int(parse_bytes(str(text)))
    except UserError:
        raise ShardError(f"shard size {text!r} is not a size; write e.g. 200MB, 5GB or 2GiB") from None
    if size < 1:
        raise ShardError(f"shard size {text!r} must be at least one byte")
    return size


def split_shards(tensors: list[StoredTensor], max_bytes: int) -> list[list[StoredTensor]]:
    """Consecutive groups of `tensors`, each under `max_bytes` unless one tensor alone is larger."""
    shards: list[list[StoredTensor]] = []
    current: list[StoredTensor] = []
    size = 0
    for tensor in tensors:
        if current and size + tensor.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def write_shard(path: Path, tensors: Iterable[StoredTensor], metadata: dict | None = None,
                progress=None) -> None:
    """Write one safetensors file from byte ranges, copying `_CHUNK` bytes at a time;
    `progress(nbytes)` after each tensor."""
    ordered = sorted(tensors, key=lambda t: (-_ITEMSIZE.get(t.dtype, 1), t.name))
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for tensor in ordered:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": tensor.shape,
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    handles: dict[Path, int] = {}
    try:
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for tensor in ordered:
                for piece in tensor.pieces:
                    _copy(piece, handles, out)
                if progress is not None:
                    progress(tensor.nbytes)
    finally:
        for fd in handles.values():
            os.close(fd)


def _copy(piece: Piece, handles: dict[Path, int], out) -> None:
    if piece.file not in handles:
        handles[piece.file] = os.open(piece.file, os.O_RDONLY)
    fd, done = handles[piece.file], 0
    while done < piece.length:
        chunk = os.pread(fd, min(_CHUNK, piece.length - done), piece.offset + done)
        if not chunk:
            raise ShardError(f"{piece.file} ended early (truncated?); re-download the checkpoint")
        out.write(chunk)
        done += len(chunk)


def write_weights(directory: Path, tensors: list[StoredTensor], max_shard_size: str | int,
                  progress=None) -> list[str]:
    """Write `tensors` into `directory` as transformers does (one file, or shards + index);
    returns the file names. `progress(nbytes)` is called after each tensor."""
    shards = split_shards(tensors, parse_size(max_shard_size))
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_shard(directory / name, shard, progress=progress)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names
