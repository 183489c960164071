"""The kernel's per-mount dirty budget for a writeback mount (its "bdi" knobs in sysfs).

With FUSE's writeback cache, writes land in the page cache and reach the daemon at
writeback.  The kernel keeps a FUSE mount on a short leash by default: ``strict_limit`` 1
and ``max_ratio`` 1 % of the dirty threshold (tens of MiB), so a writer is throttled to the
daemon's speed after a few MiB and the cache buys little.  A ``--writeback`` mount lifts the
strict limit and gives the mount a bounded budget instead (``max_bytes``, or on kernels
without it the ``max_ratio`` nearest to the budget).  The knobs belong to the mount: the
kernel drops them with it at unmount, so there is nothing to restore.

Parsing is pure (``bdi_name``, ``ratio_for``); ``apply_budget`` is the small I/O shell.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .runtime import unescape_mount_path
from .settings import DEFAULT_DIRTY_LIMIT as DEFAULT_DIRTY_LIMIT

SYSFS_BDI = "/sys/class/bdi"


def bdi_name(mountinfo: str, mountpoint: str) -> str | None:
    """The bdi ("MAJOR:MINOR") of the mount at `mountpoint`, from /proc/self/mountinfo text
    (the last mount there wins: it is the one on top).  Reading mountinfo never sends a
    request to the filesystem, so the daemon may call this before it serves."""
    found = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and unescape_mount_path(fields[4]) == mountpoint:
            found = fields[2]
    return found


def ratio_for(budget: int, threshold: int) -> int:
    """The whole max_ratio (1..100 % of the system's dirty threshold) nearest above `budget`."""
    if threshold <= 0:
        return 100
    return max(1, min(100, -(-budget * 100 // threshold)))


@dataclass(frozen=True)
class Budget:
    bdi: str
    limit: int  # bytes asked for
    how: str  # "max_bytes", "max_ratio N%", or why nothing was set


def apply_budget(mountpoint: str, limit: int, sysfs: str = SYSFS_BDI) -> Budget:
    """Lift the strict limit of the mount at `mountpoint` and bound it by `limit` bytes.
    Raises OSError (with the knob's path) when the knobs exist but cannot be written."""
    with open("/proc/self/mountinfo") as f:
        name = bdi_name(f.read(), mountpoint)
    if name is None:
        raise OSError(f"{mountpoint} is not in /proc/self/mountinfo")
    d = os.path.join(sysfs, name)
    if not os.path.isdir(d):
        return Budget(name, limit, f"no {d}: the kernel's default dirty limit applies")
    if os.path.exists(os.path.join(d, "max_bytes")):
        _write(os.path.join(d, "max_bytes"), limit)
        how = "max_bytes"
    else:
        ratio = ratio_for(limit, _dirty_threshold())
        _write(os.path.join(d, "max_ratio"), ratio)
        how = f"max_ratio {ratio}%"
    _write(os.path.join(d, "strict_limit"), 0)
    return Budget(name, limit, how)


def _write(path: str, value: int) -> None:
    try:
        with open(path, "w") as f:
            f.write(f"{value}\n")
    except OSError as exc:
        raise OSError(exc.errno, f"{path}: {exc.strerror}") from None


def _dirty_threshold() -> int:
    """The system's dirty threshold in bytes (vm.dirty_bytes, else dirty_ratio of memory)."""
    try:
        with open("/proc/sys/vm/dirty_bytes") as f:
            n = int(f.read())
        if n:
            return n
        with open("/proc/sys/vm/dirty_ratio") as f:
            ratio = int(f.read())
    except (OSError, ValueError):
        return 0
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * ratio // 100
