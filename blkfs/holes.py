"""Punching holes in backing files (fallocate(2) through ctypes: Python's os has no
fallocate with modes). The daemon does it, never a client behind its back, so its tracker
and the kernel's page cache stay coherent (control op `punch`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Make [offset, offset+length) read as zeros and free its space, keeping the size.
    Where the filesystem cannot punch, zeros are written instead (False)."""
    if length <= 0:
        return True
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    chunk = bytes(min(length, 1 << 20))
    end = offset + length
    while offset < end:
        n = os.pwrite(fd, chunk[: min(len(chunk), end - offset)], offset)
        offset += n
    return False
