#!/usr/bin/env python3
"""Compare the installed packages with requirements/lock.txt (standard library only).

    python scripts/check_lock.py [LOCK] [--no-project] [--quiet]
    python scripts/check_lock.py [LOCK] --summary            # one line: the key locked versions
    python scripts/check_lock.py --write-lock FREEZE [LOCK]  # rewrite LOCK from `pip freeze` output

Exit status: 0 when every locked package is installed at its locked version (and, unless
--no-project, this checkout is the one installed in editable mode), 1 when any differs or is
missing (each is printed), 2 when the lock cannot be read. Packages installed but not in the lock
are ignored. Names are compared PEP 503-normalised; a locked version without a local label
matches an installed one with any (torch==2.13.0 matches 2.13.0+cpu), as pip's `==` does.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import platform
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LOCK = ROOT / "requirements" / "lock.txt"
PROJECT = "grape-moe"
# The packages whose versions matter most to GRAPE's results; test.sh prints these.
KEY_PACKAGES = ["torch", "transformers", "lm-eval", "cvxpy", "ortools", "numpy", "scipy",
                "accelerate", "safetensors"]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """{normalised name: version} from a lock of `name==version` lines and # comments."""
    pins: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = PIN.match(line)
        if not m:
            raise ValueError(f"{path}:{n}: not a `name==version` pin: {raw!r}")
        name = normalize(m.group(1))
        if name in pins:
            raise ValueError(f"{path}:{n}: {m.group(1)} pinned twice")
        pins[name] = m.group(2)
    return pins


def installed() -> dict[str, md.Distribution]:
    """{normalised name: distribution}, the first on sys.path winning (as imports do)."""
    dists: dict[str, md.Distribution] = {}
    for d in md.distributions():
        name = d.metadata["Name"]
        if name:
            dists.setdefault(normalize(name), d)
    return dists


def same_version(locked: str, have: str) -> bool:
    if locked == have:
        return True
    if "+" not in locked and have.split("+", 1)[0] == locked:
        return True
    try:  # equal under PEP 440 normalisation (1.0 == 1.0.0, 1.0-post1 == 1.0.post1)
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return False
    try:
        a, b = Version(locked), Version(have)
    except InvalidVersion:
        return False
    return a == b or (a.local is None and Version(b.public) == a)


def project_problem(dists: dict[str, md.Distribution], root: Path) -> str | None:
    """Why this checkout is not the editable install of the project, or None when it is."""
    d = dists.get(PROJECT)
    if d is None:
        return f"{PROJECT}: not installed"
    text = d.read_text("direct_url.json")
    info = json.loads(text) if text else {}
    url = info.get("url", "")
    where = Path(unquote(urlparse(url).path)) if url.startswith("file:") else None
    if not info.get("dir_info", {}).get("editable") or where is None:
        return f"{PROJECT}: installed, but not in editable mode from a local checkout"
    if where.resolve() != root.resolve():
        return f"{PROJECT}: editable install points at {where}, not this checkout {root}"
    return None


def check(lock: Path, root: Path | None) -> list[str]:
    """One line per difference between the environment and the lock; empty when they match."""
    dists = installed()
    problems = []
    for name, version in read_lock(lock).items():
        d = dists.get(name)
        if d is None:
            problems.append(f"{name}: locked {version}, not installed")
        elif not same_version(version, d.version):
            problems.append(f"{name}: locked {version}, installed {d.version}")
    if root is not None:
        p = project_problem(dists, root)
        if p:
            problems.append(p)
    return problems


def summary(lock: Path) -> str:
    pins = read_lock(lock)
    return " ".join(f"{n}=={pins.get(n, '?')}" for n in KEY_PACKAGES)


def write_lock(freeze: Path, lock: Path) -> int:
    """Rewrite `lock` from `pip freeze --exclude-editable` output, keeping the usual header."""
    pins, torch = [], None
    for raw in freeze.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        if not m:  # -e lines, `name @ url` (a local/VCS install cannot be locked by version)
            raise ValueError(f"{freeze}: cannot lock {line!r}")
        name, version = m.groups()
        if normalize(name) == PROJECT:
            continue
        if normalize(name) == "torch":
            version = version.split("+", 1)[0]
            torch = version
        pins.append(f"{name}=={version}")
    if torch is None:
        raise ValueError(f"{freeze}: no torch in the freeze")
    pins.sort(key=str.lower)
    today = datetime.date.today().isoformat()
    py = f"{platform.python_implementation()} {platform.python_version()}"
    header = f"""\
# GRAPE dependency lock: the exact versions the test suite is run against.
# Used as a pip constraints file: `pip install -c requirements/lock.txt -e ".[test]"`
# (scripts/setup.sh does that; scripts/test.sh checks the installed set against it first).
#
# How it was made ({today}, {py}, {platform.system()} {platform.machine()}, CPU-only torch):
#   python -m venv /tmp/lockenv
#   /tmp/lockenv/bin/pip install torch=={torch}          # CPU build ({torch}+cpu)
#   /tmp/lockenv/bin/pip install -e ".[test]"
#   /tmp/lockenv/bin/pip freeze --exclude-editable      # then torch=={torch}+cpu -> torch=={torch}
# torch is written without its "+cpu" local label so that `-c` accepts any local build of {torch}.
#
# How to refresh it: `bash scripts/upgrade-check.sh --write-lock` (a fresh venv with the newest
# allowed releases, runs the suite there, rewrites this file from that venv), or repeat the
# commands above by hand. Then check that tests/test_lock.py passes and commit the file.
"""
    lock.write_text(header + "\n".join(pins) + "\n")
    read_lock(lock)  # what we wrote must parse
    print(f"wrote {lock} ({len(pins)} pins)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lock", nargs="?", type=Path, default=DEFAULT_LOCK)
    ap.add_argument("--no-project", action="store_true",
                    help="only compare the locked packages, not where the project is installed")
    ap.add_argument("--quiet", action="store_true", help="print nothing when everything matches")
    ap.add_argument("--summary", action="store_true",
                    help="print the key locked versions on one line and exit")
    ap.add_argument("--write-lock", type=Path, metavar="FREEZE",
                    help="rewrite LOCK from this `pip freeze --exclude-editable` output")
    args = ap.parse_args(argv)
    try:
        if args.write_lock:
            return write_lock(args.write_lock, args.lock)
        if args.summary:
            print(summary(args.lock))
            return 0
        problems = check(args.lock, None if args.no_project else ROOT)
        n = len(read_lock(args.lock))
    except (OSError, ValueError) as e:
        print(f"check_lock: {e}", file=sys.stderr)
        return 2
    if problems:
        what = f"{n} locked packages" + ("" if args.no_project else " and the project install")
        print(f"environment differs from {args.lock} ({len(problems)} of {what}):")
        for p in problems:
            print(f"  {p}")
        return 1
    if not args.quiet:
        print(f"environment matches {args.lock} ({n} locked packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
