"""Host memory this process may still take: the kernel's available memory, bounded by the memory
limit of the process's control group.

In a container (Docker, Kubernetes) or under a job scheduler (Slurm, systemd), the limit that
gets a process OOM-killed is its cgroup's (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`),
while `psutil.virtual_memory().available` reports the whole machine's. Deciding "the model fits"
from the machine's figure loads a model whole into a 16 GB pod on a 512 GB node and dies, so the
whole-or-layer-by-layer rule (grape.models.placement) reads both and takes the smaller.

A cgroup's headroom is its limit less its usage, plus the inactive file cache it counts (page
cache of the shards just read: the kernel reclaims it before it kills anything), taken over the
process's cgroup and every ancestor visible under the mount (a parent's limit binds too).
"""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned 64-bit value; anything this large is none
_UNLIMITED = 1 << 60
# (files of a version: limit, usage, and the memory.stat key of inactive file cache)
_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
_V2 = ("memory.max", "memory.current", "inactive_file")


def available_bytes(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> tuple[int, bool]:
    """(bytes this process may still take, whether a cgroup limit is what bounds it)."""
    import psutil

    free = int(psutil.virtual_memory().available)
    headroom = cgroup_headroom(root, proc_cgroup)
    if headroom is not None and headroom < free:
        return headroom, True
    return free, False


def cgroup_headroom(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """The smallest headroom of the memory limits over the process's cgroup and its ancestors;
    None when there is no limit or nothing can be read (no cgroups: not Linux, a sandbox)."""
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":  # the v2 unified hierarchy
            mounts, files = [root, root / "unified"], _V2
        elif "memory" in controllers.split(","):
            mounts, files = [root / "memory"], _V1
        else:
            continue
        for mount in mounts:
            found += [h for d in _ancestors(mount, path) if (h := _headroom(d, files)) is not None]
    return min(found) if found else None


def _ancestors(mount: Path, path: str) -> list[Path]:
    """The cgroup's folder under `mount` and its parents up to the mount, those that exist."""
    here = mount / path.strip("/")
    out = []
    while True:
        if here.is_dir():
            out.append(here)
        if here == mount or mount not in here.parents:
            return out
        here = here.parent


def _headroom(folder: Path, files: tuple[str, str, str]) -> int | None:
    limit_file, usage_file, inactive_key = files
    try:
        limit_text = (folder / limit_file).read_text(encoding="utf-8").strip()
        if limit_text == "max" or int(limit_text) >= _UNLIMITED:
            return None
        usage = int((folder / usage_file).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
    inactive = 0
    try:
        for line in (folder / "memory.stat").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    except (OSError, ValueError):
        pass
    return max(0, int(limit_text) - usage + inactive)


__all__ = ["available_bytes", "cgroup_headroom"]
