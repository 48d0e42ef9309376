"""Input paths that are not regular files: refused, or read once with a size limit.

`/dev/zero` as a plan never ends (a JSON parser reads it forever, memory growing), and a pipe
(`grape inspect <(cat plan.json)`, a FIFO) can be read only once, so a loader that looks at the
content twice sees nothing the second time. Loaders call these first:

* `input_kind(path)`: 'missing', 'directory', 'file', 'pipe' or the kind of special file;
* `require_regular(path, what, error)`: anything but a regular file is refused (formats read
  with seeks, such as the scores archive);
* `read_input(path, what, error)`: a regular file's bytes, or a pipe's read once, up to
  PIPE_LIMIT bytes; devices and sockets are refused.
"""

from __future__ import annotations

import os
import stat

PIPE_LIMIT = 64 * 1024 * 1024  # a plan, recipe or summary is kilobytes; a pipe past this is wrong
_CHUNK = 1 << 20

_SPECIAL = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
            (stat.S_ISSOCK, "a socket"))


def input_kind(path: str | os.PathLike) -> str:
    """What `path` is, following links ('/dev/fd/63' of `<(...)` is a pipe)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "missing"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode):
        return "pipe"
    return next((name for test, name in _SPECIAL if test(mode)), "a special file")


def refuse_special(path: str | os.PathLike, what: str, error: type[Exception]) -> str:
    """The kind of `path` (input_kind); a device or socket is refused in one line."""
    kind = input_kind(path)
    if kind not in ("missing", "directory", "file", "pipe"):
        raise error(f"{str(path)!r} is {kind}, not a {what}; pass a regular file")
    return kind


def require_regular(path: str | os.PathLike, what: str, error: type[Exception]) -> None:
    """Refuse anything but a regular file that exists (the caller reports a missing one)."""
    kind = refuse_special(path, what, error)
    if kind == "pipe":
        raise error(f"{str(path)!r} is a pipe, not a {what}; a {what} is read with seeks, so "
                    "save it to a file first")


def read_input(path: str | os.PathLike, what: str, error: type[Exception],
               limit: int = PIPE_LIMIT) -> bytes:
    """The bytes of a regular file, or of a pipe read once (at most `limit` bytes)."""
    kind = refuse_special(path, what, error)
    if kind != "pipe":
        with open(path, "rb") as handle:
            return handle.read()
    chunks, size = [], 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise error(f"{str(path)!r} is a pipe carrying more than {limit >> 20} MiB; a "
                            f"{what} is smaller: pass the file itself")
            chunks.append(chunk)
    return b"".join(chunks)


__all__ = ["PIPE_LIMIT", "input_kind", "read_input", "refuse_special", "require_regular"]
