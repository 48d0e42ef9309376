"""Atomic file writes: nothing is ever half-written under the final name, and what is written
gets the permissions the umask allows (not the 0600 / 0700 of temporary files).

A write the disk refuses (full, over a file-size limit or quota, read-only, busy) becomes a
DiskError: one line naming the output, with the size against the free space where known; the
temporary file is gone by then. Temporary names are GRAPE's own (`.NAME.grape-HOST-PID-XXXXXXXX
.tmp` / `.old`), so the next run on the same output can remove what a killed run left, and
only that: this machine's, of processes that are gone."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import IO, Iterator

from solvers.errors import UserError


def umask() -> int:
    """The process umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: str | os.PathLike) -> None:
    """The permissions a plain open() / mkdir() would have given: 0666 / 0777 less the umask.
    Temporary files and folders (mkstemp, mkdtemp) are created 0600 / 0700."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~umask())


# -- writes the disk refuses ----------------------------------------------------------------
# a write or rename failing with one of these says something about the place, not the program
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EBUSY, errno.EXDEV,
                         errno.EACCES, errno.EPERM, errno.EROFS})
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the size needed and free helps here
_ADVICE = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up; free some space or write elsewhere",
    errno.EFBIG: "a file would pass the file-size limit (ulimit -f) or the filesystem's largest "
                 "file; raise the limit or write elsewhere",
    errno.EBUSY: "it is busy (a mount point, or a file in use); write elsewhere",
    errno.EXDEV: "a rename crossed filesystems; write elsewhere",
}


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # std::io::Error's text: "... (os error 28)"


class DiskError(UserError):
    """A write or rename the disk refused (full, over a size limit or quota, read-only, busy,
    not permitted); `cause` is the OSError. Raised from None: the CLI prints one line."""

    def __init__(self, message: str, cause: OSError):
        super().__init__(message)
        self.cause = cause


def disk_cause(exc: BaseException | None) -> OSError | None:
    """The OSError with a disk errno behind `exc`: itself, a DiskError's cause, the one a
    RuntimeError wraps (torch.save reports a failed write of its file object that way), or the
    one a Rust library names in its message (safetensors: "I/O error: ... (os error 27)")."""
    for _ in range(8):  # a chain is short; the bound only guards against a cycle
        if isinstance(exc, DiskError):
            return exc.cause
        if isinstance(exc, OSError):
            return exc if exc.errno in DISK_ERRNOS else None
        if not isinstance(exc, Exception) or isinstance(exc, UserError):
            return None  # Ctrl-C or SIGTERM while an earlier error was handled; a user error
        code = _RUST_OS_ERROR.search(str(exc))
        if code and int(code[1]) in DISK_ERRNOS:
            return OSError(int(code[1]), os.strerror(int(code[1])))
        if not isinstance(exc, RuntimeError):
            return None
        exc = exc.__cause__ or exc.__context__
    return None


def describe_disk_error(cause: OSError, path: str | os.PathLike | None = None,
                        needed: int | None = None) -> str:
    """One line: what could not be written (None: a write on an open file, whose name the error
    does not carry), why, and for space errors the size against the free space there."""
    why = cause.strerror or os.strerror(cause.errno)
    if path is None:
        return f"a write failed: {why}; {_ADVICE.get(cause.errno, 'choose a writable location')}"
    text = f"cannot write {str(path)!r}: {why}"
    if cause.errno in _SPACE_ERRNOS:
        text += _space_note(Path(path), needed, cause.errno)
    return f"{text}; {_ADVICE.get(cause.errno, 'choose a writable location')}"


def _space_note(path: Path, needed: int | None, errno_: int) -> str:
    from solvers.constraints.units import format_bytes

    parts = [f"needs about {format_bytes(needed)}"] if needed else []
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if errno_ != errno.EFBIG:  # a size limit: the free space is beside the point
        with contextlib.suppress(OSError):
            parts.append(f"{format_bytes(shutil.disk_usage(probe).free)} free there")
    return f" ({', '.join(parts)})" if parts else ""


def raise_disk_error(exc: BaseException, path: str | os.PathLike, needed: int | None = None,
                     ours: tuple[str | os.PathLike, ...] | None = None) -> None:
    """Raise a DiskError naming `path` when the disk refused the write behind `exc`; return
    otherwise (the caller re-raises `exc`). `ours`: the files and folders being written; an
    error naming another file (say, an unreadable input) keeps its own text. None: any."""
    cause = disk_cause(exc)
    if cause is None or ours is not None and not _names_ours(cause, ours):
        return
    raise DiskError(describe_disk_error(cause, path, needed), cause) from None


def _names_ours(cause: OSError, ours: tuple) -> bool:
    """The error is about a write of ours: it names no file (a write on an open file), or one of
    `ours`, a file inside one, or a staging file or folder."""
    names = [Path(os.fsdecode(n)) for n in (cause.filename, cause.filename2) if n is not None]
    mine = [Path(p) for p in ours]
    return not names or any(name in mine or any(p in name.parents for p in mine)
                            or any(is_staging_name(part) for part in name.parts) for name in names)


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike, needed: int | None = None) -> Iterator[None]:
    """Turn a write the disk refuses inside the block into a DiskError naming `path`."""
    try:
        yield
    except BaseException as exc:
        raise_disk_error(exc, path, needed)
        raise


# -- staging names: recognisably GRAPE's, with the writer's machine and process -------------
# host: a hash of the host name, so a folder shared between machines (NFS) is only cleaned by
# runs on the machine that wrote it, the only place its pid means anything
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# tempfile's random part is 8 of [a-z0-9_]; .tmp: being written, .old: an output moved aside
_STAGING = re.compile(r"\.(?P<name>.+)\.grape-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[a-z0-9_]{8}"
                      r"\.(?:tmp|old)")


def staging_prefix(name: str) -> str:
    """The start of a staging name for the output `name` (tempfile adds a random part and the
    suffix .tmp or .old): `.NAME.grape-HOST-PID-`."""
    return f".{name}.grape-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive, and not ours to judge
    except (OverflowError, ValueError):
        return False
    return True


def is_staging_name(entry: str) -> bool:
    """`entry` is named as GRAPE names what it stages (any machine, any process)."""
    return _STAGING.fullmatch(entry) is not None


def is_stale(entry: str, name: str | None = None) -> bool:
    """`entry` is a staging name (of the output `name`; None: of any) written on this machine
    by a process that is gone."""
    match = _STAGING.fullmatch(entry)
    return bool(match) and (name is None or match["name"] == name) and match["host"] == _HOST \
        and not _alive(int(match["pid"]))


def _stale_inside(folder: Path, depth: int) -> list[Path]:
    """Stale staging entries of any name inside `folder`, down to `depth` levels (a run folder's
    files, a checkpoint inside it, a mount point's staging folder)."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        level = len(Path(root).relative_to(folder).parts)
        found += [Path(root, f) for f in files if is_stale(f)]
        found += [Path(root, d) for d in dirs if is_stale(d)]
        dirs[:] = [d for d in dirs if not is_stale(d)] if level + 1 < depth else []
    return found


def _disk_size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def _restore(old: Path, target: Path) -> bool:
    """A run killed between moving the previous output aside and moving the new one in left the
    previous one in `old`: put it back rather than delete the only copy."""
    kept = old / target.name
    if old.suffix != ".old" or os.path.lexists(target) or not os.path.lexists(kept):
        return False
    os.replace(kept, target)
    return True


def remove_stale_staging(target: str | os.PathLike, depth: int = 3) -> tuple[list, list]:
    """Clean up after killed runs that wrote `target`: remove GRAPE's staging files and folders
    for it (beside it, and inside it when it is a directory) whose process is gone. Returns
    ([(path, bytes) removed], [paths of previous outputs put back])."""
    target = Path(target)
    found: list[Path] = []
    with contextlib.suppress(OSError):  # an unreadable folder: nothing to clean that we can see
        found += [target.parent / e for e in os.listdir(target.parent) if is_stale(e, target.name)]
        if target.is_dir() and not target.is_symlink():
            found += _stale_inside(target, depth)
    removed, restored = [], []
    for path in found:
        try:  # cleaning is a courtesy: a leftover that cannot be removed must not stop the run
            if _restore(path, target):
                restored.append(target)
            size = _disk_size(path)
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError:
            continue
        removed.append((path, size))
    return removed, restored


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path`; rename it onto `path` only if the block succeeds.
    On any failure the temporary file is removed; a write the disk refuses (full, over a size
    limit, read-only, ...) becomes a DiskError naming `path`."""
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=staging_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # only errors of this file: an unrelated OSError of the caller's block keeps its own text
        raise_disk_error(exc, path, ours=(tmp, path))
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


@contextlib.contextmanager
def quiet_stdout():
    """HiGHS prints a banner from C on every new instance; keep the command's output clean."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
