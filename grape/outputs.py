"""Where a verb writes: checked before any work starts, and written so that nothing the tool did
not write is ever lost.

Each verb that writes declares its output with :class:`DirOutput` (a checkpoint, a run, an eval
or compare folder) or :class:`FileOutput` (a scores or plan file) as ``OUTPUT`` in its command
module; ``grape.cli.main`` adds ``--overwrite`` and calls :meth:`check` before the verb runs, so a bad
``--out`` fails in a second, not after calibration. The rules (docs/formats.md, "Outputs"):

* an output is never an input, inside one, or around one (``--out`` equal to ``--model``, or a
  folder inside the model, is refused: replacing it would destroy the source);
* an existing directory is used only when it is empty or was written by the same verb (it holds
  that verb's signature file); otherwise ``--overwrite`` is required, and an existing file is
  replaced only when it is a file of the same kind the tool wrote, or with ``--overwrite``;
* the place must be creatable: the nearest existing ancestor is a writable directory (a mount
  point: itself, since it is written into, not renamed over);
* a resolved recipe is never written over a recipe grape did not write, even with --overwrite.

A write the disk refuses is a :class:`DiskError` (one line, with the size against the free
space); :func:`clean_leftovers` removes what killed runs staged for the same output.

The library's own writers (``solvers._io``, ``grape.pruning.checkpoint``) give files and folders the
permissions the umask allows (0644 / 0755 by default), not the 0600 / 0700 of temporary files.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# re-exported: the public names of the atomic writers every GRAPE output goes through
from solvers._io import atomic_open, atomic_write_text, give_default_mode, umask  # noqa: F401
from solvers._io import DiskError, remove_stale_staging  # noqa: F401
from solvers.errors import UserError


class OutputError(UserError):
    """An output location that cannot or must not be written."""


# -- the checks -------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_creatable(path: Path, flag: str = "--out") -> None:
    """`path` can be created or replaced: the nearest existing folder above it is a directory in
    which this process can really create a file (tried with a temporary file, since permission
    bits say nothing for root, read-only mounts or /proc)."""
    # a mount point is written into (grape.pruning.checkpoint stages inside it), not renamed over
    parent = path if os.path.ismount(path) else _nearest_existing(path.parent)
    if not parent.is_dir():
        raise OutputError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a directory; "
                          "choose another output path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".grape-write-check.", dir=parent)
    except OSError as exc:
        raise OutputError(f"{flag} {str(path)!r}: cannot write in {str(parent)!r} "
                          f"({exc.strerror}); choose a writable output path") from None
    os.close(fd)
    os.unlink(probe)


def _overlap(out: Path, source: Path) -> str | None:
    out, source = out.resolve(), source.resolve()
    if out == source:
        return "is"
    if source in out.parents:
        return "is inside"
    if out in source.parents:
        return "contains"
    return None


# An input folder is walked to find the files it really reads; past this many entries the rest
# is not looked at (a model folder holds tens of files, a dataset folder at most thousands).
_WALK_LIMIT = 50_000


def _entries(path: Path):
    """The files (and linked folders) an input reads: itself, or what lies under the folder."""
    if not path.is_dir():
        yield path
        return
    seen = 0
    for root, dirs, files in os.walk(path):  # links to folders are listed, not entered
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            seen += 1
            if seen > _WALK_LIMIT:
                return
            yield Path(root, name)


def _real_files(inputs: dict[str, Path]) -> tuple[dict[Path, str], dict[tuple[int, int], str]]:
    """Where each input's files really are: realpath -> the input flag, and for files with
    several hard links, (device, inode) -> the input flag."""
    real: dict[Path, str] = {}
    inodes: dict[tuple[int, int], str] = {}
    for name, source in inputs.items():
        for entry in _entries(source):
            try:
                info = entry.stat()
            except OSError:  # a dangling link reads nothing
                continue
            real.setdefault(Path(os.path.realpath(entry)), name)
            if info.st_nlink > 1 and not entry.is_dir():
                inodes.setdefault((info.st_dev, info.st_ino), name)
    return real, inodes


def _shared_inode(out: Path, inodes: dict[tuple[int, int], str]) -> tuple[Path, str] | None:
    """A file under `out` that is a hard link of an input's file."""
    if not inodes or not out.exists():
        return None
    for entry in _entries(out):
        try:
            info = entry.stat()
        except OSError:
            continue
        name = inodes.get((info.st_dev, info.st_ino))
        if name is not None:
            return entry, name
    return None


def check_not_input(out: Path, inputs: dict[str, Path], flag: str = "--out") -> None:
    """Refuse an output that is an input, lies inside one, or contains one; compared on the
    files the inputs really read, so links are followed: a model folder of symlinks (the Hugging
    Face cache's snapshots/ -> blobs/) protects the blobs, and hard links are found by inode."""
    for name, source in inputs.items():
        relation = _overlap(out, source)
        if relation:
            raise OutputError(f"{flag} {str(out)!r} {relation} the input {name} {str(source)!r}; "
                              "writing there would destroy it. Choose another output path")
    real, inodes = _real_files(inputs)
    target = out.resolve()
    for path, name in real.items():
        if path == target or target in path.parents:
            raise OutputError(f"{flag} {str(out)!r} holds {str(path)!r}, a file the input {name} "
                              f"{str(inputs[name])!r} reads through a link; writing there would "
                              "destroy it. Choose another output path")
    shared = _shared_inode(out, inodes)
    if shared is not None:
        entry, name = shared
        raise OutputError(f"{flag} {str(out)!r}: {str(entry)!r} is a hard link of a file the input "
                          f"{name} {str(inputs[name])!r} reads; writing there would destroy it. "
                          "Choose another output path")


def _as_path(item: object) -> Path | None:
    """An existing path named by a flag value; `DOMAIN=FILE` values name FILE, and a Hub id
    (owner/name) names its snapshot in the local cache."""
    text = str(item)
    for candidate in (text, text.split("=", 1)[-1]):
        if Path(candidate).exists():
            return Path(candidate)
    from grape.models.files import _HUB_ID, cached_model

    if not _HUB_ID.match(text):
        return None
    try:
        return cached_model(text)  # the local cache only; nothing is downloaded
    except (OSError, ValueError, UserError):
        return None


def input_paths(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Path]:
    """The existing input paths among the flags `names` (single values or lists of them; the
    items of a list are told apart as --flag[i])."""
    found: dict[str, Path] = {}
    for name in names:
        value = getattr(args, name, None)
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(items):
            path = None if item is None else _as_path(item)
            if path is not None:
                flag = f"--{name.replace('_', '-')}"
                found[flag if len(items) == 1 else f"{flag}[{i}]"] = path
    return found


@dataclass(frozen=True)
class DirOutput:
    """A verb writing a directory. `signature`: a file whose presence marks a directory this
    verb wrote (and may therefore write again); `inputs`: the flags naming its inputs."""

    signature: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    flag: str = "out"
    what: str = "output directory"
    replaces: bool = False  # the verb replaces the directory as a whole (a checkpoint)

    def path(self, args: argparse.Namespace) -> Path | None:
        value = getattr(args, self.flag, None)
        return None if value is None else Path(value)

    def check(self, args: argparse.Namespace) -> None:
        out = self.path(args)
        if out is None:
            return
        flag = f"--{self.flag}"
        check_not_input(out, input_paths(args, self.inputs), flag)
        check_creatable(out, flag)
        if not out.exists():
            return
        if not out.is_dir():
            raise OutputError(f"{flag} {str(out)!r} exists and is not a directory; choose a "
                              "directory path")
        verb = getattr(args, "verb", None)
        if verb and not self.replaces:  # written into: a recipe of yours there would be replaced
            _check_recipe(out, out / f"{verb}.recipe.yaml", flag)
        if getattr(args, "overwrite", False) or self.owns(out):
            return
        if any(out.iterdir()):
            raise OutputError(f"{flag} {str(out)!r} is a non-empty directory that grape did not "
                              f"write as {self.what}; choose a new or empty directory, or pass "
                              "--overwrite to replace it")

    def owns(self, path: Path) -> bool:
        return any((path / name).is_file() for name in self.signature)


def _is_scores_file(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return "__meta__.npy" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _is_json_of(kind: str) -> Callable[[Path], bool]:
    def check(path: Path) -> bool:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("format") == kind

    return check


SCORES_FILE = _is_scores_file
PLAN_FILE = _is_json_of("grape.plan")
# the file every checkpoint GRAPE writes holds (source model, plan, method, versions): grape
# apply's output signature, and how inspect tells a GRAPE-pruned checkpoint
PROVENANCE_FILE = "grape_provenance.json"


@dataclass(frozen=True)
class FileOutput:
    """A verb writing one file (and its resolved recipe beside it). `ours` recognises a file of
    the same kind that grape wrote, which may be replaced without --overwrite."""

    ours: Callable[[Path], bool]
    inputs: tuple[str, ...] = ()
    flag: str = "out"
    what: str = "file"

    def check(self, args: argparse.Namespace) -> None:
        value = getattr(args, self.flag, None)
        if value is None:
            return
        out, flag = Path(value), f"--{self.flag}"
        check_not_input(out, input_paths(args, self.inputs), flag)
        check_creatable(out, flag)
        if out.is_dir():
            raise OutputError(f"{flag} {str(out)!r} is a directory; give the path of the {self.what} "
                              "to write")
        # --overwrite replaces the output, never a file of yours beside it
        _check_recipe(out, out.with_name(f"{out.stem}.recipe.yaml"), flag)  # recipe.config_path
        if getattr(args, "overwrite", False):
            return
        if out.exists() and not self.ours(out):
            raise OutputError(f"{flag} {str(out)!r} exists and is not a {self.what} grape wrote; "
                              "choose another name, or pass --overwrite to replace it")


def _check_recipe(out: Path, recipe: Path, flag: str) -> None:
    """Refuse to write the resolved configuration over `recipe` unless grape wrote it, whatever
    --overwrite says: that flag is about the output, and a hand-written recipe is not part of it."""
    if os.path.lexists(recipe) and not _is_resolved_recipe(recipe):
        raise OutputError(f"{flag} {str(out)!r}: the resolved configuration would replace "
                          f"{str(recipe)!r}, which grape did not write; choose another output "
                          "name, or move that file away")


def _is_resolved_recipe(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().startswith("# resolved configuration of `grape ")
    except (OSError, UnicodeDecodeError):
        return False


# -- leftovers of killed runs ------------------------------------------------------------------
def clean_leftovers(output: DirOutput | FileOutput, args: argparse.Namespace,
                    say: Callable[[str], None] = print) -> None:
    """Remove what killed runs staged for this --out (solvers._io.remove_stale_staging: GRAPE's
    own names, this machine, processes that are gone) and say so in one line."""
    value = getattr(args, output.flag, None)
    if value is None:
        return
    out = Path(value)
    removed, restored = remove_stale_staging(out)
    if isinstance(output, FileOutput):  # and its resolved recipe's (recipe.config_path)
        removed += remove_stale_staging(out.with_name(f"{out.stem}.recipe.yaml"))[0]
    verb = getattr(args, "verb", None) or "grape"
    for path in restored:
        say(f"grape {verb}: put back {str(path)!r}, which a killed run had moved aside")
    if removed:
        from solvers.constraints.units import format_bytes

        total = format_bytes(sum(size for _, size in removed))
        names = ", ".join(str(path) for path, _ in removed)
        say(f"grape {verb}: removed {len(removed)} leftover(s) of killed runs ({total}): {names}")


def add_overwrite_argument(parser: argparse.ArgumentParser, output: DirOutput | FileOutput) -> None:
    what = ("replace an existing --out file that grape did not write" if isinstance(output, FileOutput)
            else "replace a non-empty --out directory that grape did not write, as a whole"
            if output.replaces else "write into a non-empty --out directory that grape did not "
            "write (files of the same names are replaced, others left alone)")
    parser.add_argument("--overwrite", action="store_true", help=what + "; never an input")


__all__ = [
    "atomic_open",
    "atomic_write_text",
    "DirOutput",
    "DiskError",
    "FileOutput",
    "OutputError",
    "PLAN_FILE",
    "PROVENANCE_FILE",
    "SCORES_FILE",
    "add_overwrite_argument",
    "check_creatable",
    "check_not_input",
    "clean_leftovers",
    "give_default_mode",
    "input_paths",
    "umask",
]
