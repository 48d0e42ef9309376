"""grape.models.host_memory: a container's cgroup memory limit bounds what the whole-or-sequential
rule counts as free host memory (v1 and v2 layouts, parents' limits, reclaimable file cache, no
limit, unreadable files), and the placement rule uses it."""

from __future__ import annotations

from pathlib import Path

import pytest

from grape.models import host_memory, placement
from grape.calibration.distributed import World

GB = 10**9


def _write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)


def _proc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc_cgroup"
    path.write_text(text)
    return path


def test_v1_limit_less_usage_plus_inactive_file_cache(tmp_path):
    root = tmp_path / "cg"
    _write(root / "memory" / "job", memory__limit_in_bytes=str(4 * GB), memory__usage_in_bytes=str(3 * GB),
           memory__stat=f"cache 5\ntotal_inactive_file {GB // 2}\n")
    proc = _proc(tmp_path, "4:memory:/job\n3:cpu:/\n")
    assert host_memory.cgroup_headroom(root, proc) == GB + GB // 2


def test_v2_and_a_tighter_parent_limit(tmp_path):
    root = tmp_path / "cg"
    _write(root / "pod", memory__max=str(2 * GB), memory__current=str(GB), memory__stat="inactive_file 0\n")
    _write(root / "pod" / "container", memory__max="max", memory__current=str(GB))
    proc = _proc(tmp_path, "0::/pod/container\n")
    assert host_memory.cgroup_headroom(root, proc) == GB  # the parent's limit binds the child


@pytest.mark.parametrize("limit", ["max", str(9223372036854771712)])
def test_no_limit_or_nothing_readable_is_none(tmp_path, limit):
    root = tmp_path / "cg"
    _write(root, memory__max=limit, memory__current="1")
    assert host_memory.cgroup_headroom(root, _proc(tmp_path, "0::/\n")) is None
    assert host_memory.cgroup_headroom(root, tmp_path / "missing") is None
    _write(root / "memory" / "x", memory__limit_in_bytes="garbage", memory__usage_in_bytes="1")
    assert host_memory.cgroup_headroom(root, _proc(tmp_path, "4:memory:/x\n")) is None


def _machine(monkeypatch, available: int):
    """psutil's machine-wide figure, set by the test (change `.available` later)."""
    import psutil

    class Machine:
        pass

    Machine.available = available
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Machine)
    return Machine


def test_available_takes_the_smaller_and_says_so(tmp_path, monkeypatch):
    Machine = _machine(monkeypatch, 500 * GB)
    root = tmp_path / "cg"
    _write(root / "memory" / "job", memory__limit_in_bytes=str(16 * GB), memory__usage_in_bytes=str(GB))
    proc = _proc(tmp_path, "4:memory:/job\n")
    assert host_memory.available_bytes(root, proc) == (15 * GB, True)
    Machine.available = 8 * GB
    assert host_memory.available_bytes(root, proc) == (8 * GB, False)


def test_the_placement_rule_goes_layer_by_layer_under_a_container_limit(tmp_path, monkeypatch):
    """A 20 GB model on a 500 GB machine inside a 16 GB container: sequential, and the reason
    names the cgroup limit (psutil alone would have said whole, and the kernel would kill it)."""
    _machine(monkeypatch, 500 * GB)
    root = tmp_path / "cg"
    _write(root / "memory" / "pod", memory__limit_in_bytes=str(16 * GB), memory__usage_in_bytes=str(GB))
    proc = _proc(tmp_path, "4:memory:/pod\n")
    monkeypatch.setattr(host_memory, "CGROUP_ROOT", root)
    monkeypatch.setattr(host_memory, "PROC_CGROUP", proc)
    monkeypatch.setattr(host_memory.available_bytes, "__defaults__", (root, proc))
    capacity, where = placement.whole_capacity("cpu", World())
    assert capacity == 15 * GB and "cgroup memory limit" in where
    choice = placement.choose_mode("auto", 20 * GB, capacity, where, None)
    assert choice.mode == "sequential" and "cgroup memory limit" in choice.reason
