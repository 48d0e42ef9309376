"""Where a verb writes: checked before any work starts, and written so that nothing the tool did
not write is ever lost.

Each verb that writes declares its output with :class:`DirOutput` (a checkpoint, a run, an eval
or compare folder) or :class:`FileOutput` (a scores or plan file) as ``OUTPUT`` in its command
module; ``grape.cli`` adds ``--overwrite`` and calls :meth:`check` before the verb runs, so a bad
``--out`` fails in a second, not after calibration. The rules (docs/formats.md, "Outputs"):

* an output is never an input, inside one, or around one (``--out`` equal to ``--model``, or a
  folder inside the model, is refused: replacing it would destroy the source);
* an existing directory is used only when it is empty or was written by the same verb (it holds
  that verb's signature file); otherwise ``--overwrite`` is required, and an existing file is
  replaced only when it is a file of the same kind the tool wrote, or with ``--overwrite``;
* the place must be creatable: the nearest existing ancestor is a writable directory.

The library's own writers (``solvers._io``, ``grape.checkpoint``) give files and folders the
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
    parent = _nearest_existing(path.parent)
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


def check_not_input(out: Path, inputs: dict[str, Path], flag: str = "--out") -> None:
    """Refuse an output that is an input, lies inside one, or contains one."""
    for name, source in inputs.items():
        relation = _overlap(out, source)
        if relation:
            raise OutputError(f"{flag} {str(out)!r} {relation} the input {name} {str(source)!r}; "
                              "writing there would destroy it. Choose another output path")


def _as_path(item: object) -> Path | None:
    """An existing path named by a flag value; `DOMAIN=FILE` values name FILE."""
    text = str(item)
    for candidate in (text, text.split("=", 1)[-1]):
        if Path(candidate).exists():
            return Path(candidate)
    return None


def input_paths(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Path]:
    """The existing input paths among the flags `names` (single values or lists of them)."""
    found: dict[str, Path] = {}
    for name in names:
        value = getattr(args, name, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            path = None if item is None else _as_path(item)
            if path is not None:
                found[f"--{name.replace('_', '-')}"] = path
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
        if getattr(args, "overwrite", False):
            return
        if out.exists() and not self.ours(out):
            raise OutputError(f"{flag} {str(out)!r} exists and is not a {self.what} grape wrote; "
                              "choose another name, or pass --overwrite to replace it")
        recipe = out.with_name(f"{out.stem}.recipe.yaml")  # grape.recipe.config_path
        if recipe.exists() and not _is_resolved_recipe(recipe):
            raise OutputError(f"{flag} {str(out)!r}: the resolved configuration would replace "
                              f"{str(recipe)!r}, which grape did not write; choose another name, "
                              "or pass --overwrite")


def _is_resolved_recipe(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().startswith("# resolved configuration of `grape ")
    except (OSError, UnicodeDecodeError):
        return False


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
    "FileOutput",
    "OutputError",
    "PLAN_FILE",
    "SCORES_FILE",
    "add_overwrite_argument",
    "check_creatable",
    "check_not_input",
    "give_default_mode",
    "input_paths",
    "umask",
]
