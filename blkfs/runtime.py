"""Where a running daemon can be found: the runtime registry and mount table.

Each daemon writes ``<runtime>/<key>.json`` (pid, mountpoint, backing,
control socket, block size), where ``key`` is a digest of the mountpoint's
real path.  Clients find the control socket of a mountpoint from it.  The
runtime directory is 0700: only its owner (and root) can reach the sockets.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import xxhash

FSTYPE = "fuse.blkfs"


def runtime_dir() -> str:
    if d := os.environ.get("BLKFS_RUNTIME_DIR"):
        return d
    if os.geteuid() == 0:
        return "/run/blkfs"
    if x := os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(x, "blkfs")
    return f"/tmp/blkfs-{os.geteuid()}"


def ensure_runtime_dir() -> str:
    d = runtime_dir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def mount_key(real_mountpoint: str) -> str:
    # No realpath() here: inside the daemon, a stat of its own mount point would
    # wait for the daemon itself.  Callers pass a path they already resolved.
    return xxhash.xxh64_hexdigest(real_mountpoint.encode())


def default_socket(mountpoint: str) -> str:
    return os.path.join(runtime_dir(), mount_key(mountpoint) + ".sock")


@dataclass
class DaemonInfo:
    pid: int
    mountpoint: str
    backing: str
    control: str
    block_size: int
    tracking: bool
    writeback: bool = False
    dirty_limit: int = 0  # the dirty budget the kernel gave a writeback mount, 0 = its default

    @property
    def path(self) -> str:
        return os.path.join(runtime_dir(), mount_key(self.mountpoint) + ".json")

    def write(self) -> None:
        ensure_runtime_dir()
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f)
        os.rename(tmp, self.path)

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    @classmethod
    def find(cls, mountpoint: str) -> DaemonInfo | None:
        path = os.path.join(runtime_dir(), mount_key(os.path.realpath(mountpoint)) + ".json")
        try:
            with open(path) as f:
                return cls(**json.load(f))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def alive(self) -> bool:
        return not process_gone(self.pid)


def unescape_mount_path(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_fstype(path: str) -> str | None:
    """The filesystem type mounted exactly at `path`, or None if it is not a mount point.

    Read from /proc/self/mountinfo so that a dead FUSE mount (daemon gone,
    every stat failing with ENOTCONN) is still recognised.
    """
    target = os.path.abspath(path)
    try:
        real = os.path.realpath(target)
    except OSError:
        real = target
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) < 5:
                continue
            mnt = unescape_mount_path(fields[4])
            if mnt in (target, real):
                found = right.split()[0]  # the last mount on a path wins
    return found


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True
