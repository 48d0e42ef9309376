"""requirements/lock.txt (issue 9, reproducible installs): it parses, pins every direct
dependency within pyproject's ranges, and scripts/check_lock.py tells a matching environment
from a differing one."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements" / "lock.txt"
CHECK = REPO / "scripts" / "check_lock.py"

_spec = importlib.util.spec_from_file_location("check_lock", CHECK)
check_lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_lock)


def direct_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in
            project["dependencies"] + project["optional-dependencies"]["test"]]


def run_check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_lock_parses_into_exact_pins():
    pins = check_lock.read_lock(LOCK)
    assert len(pins) > 50
    for name, version in pins.items():
        assert name == check_lock.normalize(name)
        Version(version)  # every pin is a valid PEP 440 version
    assert "+" not in pins["torch"], "torch pinned without a local label so +cpu builds match"
    assert check_lock.PROJECT not in pins


def test_lock_rejects_what_is_not_a_pin(tmp_path):
    bad = tmp_path / "lock.txt"
    bad.write_text("numpy==2.0.0\nscipy>=1.11\n")
    with pytest.raises(ValueError, match="scipy"):
        check_lock.read_lock(bad)
    assert run_check(bad).returncode == 2


def test_every_direct_dependency_is_pinned_within_pyproject_ranges():
    pins = check_lock.read_lock(LOCK)
    for req in direct_requirements():
        name = check_lock.normalize(req.name)
        assert name in pins, f"{req.name} is a direct dependency but not in the lock"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"lock pins {req.name}=={pins[name]}, outside pyproject's {req}"


def test_check_lock_reports_a_fabricated_mismatch(tmp_path):
    text = LOCK.read_text()
    assert re.search(r"(?m)^numpy==", text)
    fake = tmp_path / "lock.txt"
    fake.write_text(re.sub(r"(?m)^numpy==.*$", "numpy==0.0.1", text)
                    + "not-a-grape-dependency==1.0\n")
    proc = run_check(fake, "--no-project")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"numpy: locked 0.0.1, installed {md.version('numpy')}" in proc.stdout
    assert "not-a-grape-dependency: locked 1.0, not installed" in proc.stdout


def test_check_lock_accepts_the_installed_versions_and_a_local_label(tmp_path):
    torch = md.version("torch")
    lock = tmp_path / "lock.txt"
    lock.write_text(f"# comment\n\nNumPy=={md.version('numpy')}\n"
                    f"torch=={torch.split('+')[0]}  # local label dropped\n")
    proc = run_check(lock, "--no-project")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "matches" in proc.stdout


def test_installed_environment_matches_the_lock():
    """What scripts/test.sh guarantees before it runs pytest (scripts/upgrade-check.sh, which
    tests other versions on purpose, deselects this one)."""
    proc = run_check(LOCK, "--no-project")
    assert proc.returncode == 0, proc.stdout + proc.stderr
