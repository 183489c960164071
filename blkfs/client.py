"""The blocking client of a blkfs daemon's control socket, for CLIs and scripts (light: no trio,
none of the daemon; `blkfs status` and friends import this and the wire format alone)."""

from __future__ import annotations

import ctypes
import os
import socket
from typing import Any

from . import ctlproto as cp
from .ctlproto import ControlError
from .runtime import FSTYPE, DaemonInfo, mount_fstype

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_WHOLE = 1 | 2 | 4  # SYNC_FILE_RANGE_WAIT_BEFORE | _WRITE | _WAIT_AFTER


def flush_file(path: str) -> None:
    """Push the page-cache writes of a file under a mount into the daemon, and wait.

    The barrier before a swap: writes through a shared mmap sit in the kernel
    page cache until writeback.  sync_file_range on the FUSE file writes them
    back and waits for the daemon's replies (so they are marked), without the
    FSYNC that would make the daemon flush the backing file to disk.  syncfs
    is not a barrier for them.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.sync_file_range(fd, 0, 0, _SYNC_WHOLE) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
    finally:
        os.close(fd)


class DaemonNotRunning(ControlError):
    pass


def find_socket(mountpoint: str) -> str:
    """The control socket serving `mountpoint`, or DaemonNotRunning with advice."""
    mnt = os.path.abspath(mountpoint)
    if not os.path.isdir(mnt) and mount_fstype(mnt) is None:
        raise DaemonNotRunning(f"{mountpoint} does not exist: give the blkfs mount point")
    fstype = mount_fstype(mnt)
    if fstype is None:
        raise DaemonNotRunning(
            f"{mountpoint} is not mounted: mount it with 'blkfs mount BACKING {mountpoint}'"
        )
    if fstype != FSTYPE:
        raise DaemonNotRunning(f"{mountpoint} is a {fstype} mount, not blkfs")
    info = DaemonInfo.find(mnt)
    if info is None or not info.alive():
        raise DaemonNotRunning(
            f"the blkfs daemon of {mountpoint} is not running (crashed?): "
            f"run 'fusermount3 -u {mountpoint}', then mount it again"
        )
    return info.control


def connect_error(path: str, exc: OSError) -> ControlError:
    """What a failed connect to the control socket means, for both clients alike."""
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        return DaemonNotRunning(f"no blkfs daemon answers on {path}: is it still running? "
                                "(look for blkfs in ps; remount if it died)")
    if isinstance(exc, PermissionError):
        return ControlError(
            f"permission denied on {path}: only the daemon's owner and root may use it")
    return DaemonNotRunning(f"cannot reach the blkfs daemon on {path}: {exc}")


class ControlClient:
    """Blocking client: one connection, one request at a time. For CLIs and scripts only:
    in trio code it would stop the event loop while the daemon thinks (use
    AsyncControlClient there; tests/test_architecture.py holds the rule)."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise connect_error(path, exc) from None
        self._buf = bytearray()

    @classmethod
    def for_mount(cls, mountpoint: str, timeout: float = 60.0) -> ControlClient:
        return cls(find_socket(mountpoint), timeout)

    def call(self, req: cp.Request) -> Any:
        """Send `req`, return its typed reply; ControlError with the daemon's message."""
        try:
            self.sock.sendall(cp.encode_request(req))
            while (reply := cp.take_reply(self._buf)) is None:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise ControlError(f"the blkfs daemon on {self.path} closed the connection")
                self._buf += data
        except OSError as exc:
            raise ControlError(f"talking to the blkfs daemon on {self.path}: {exc}") from None
        line, data = reply
        return cp.decode_reply(line, req, data)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
