"""A migrated file's attributes (mode, owner, times, user.* xattrs): read on the source at
the suspend point, set on the destination before the VM starts (issue 26: files arrived
0600, owned by the serve, with the time of the copy)."""

from __future__ import annotations

import errno
import logging
import os
import stat

from . import protocol as p
from .protocol.codec import MAX_XATTR_VALUE, MAX_XATTRS

log = logging.getLogger(__name__)


def file_attrs(file_id: int, fd: int, name: str) -> p.FileAttrs:
    st = os.fstat(fd)
    return p.FileAttrs(file_id, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                       st.st_atime_ns, st.st_mtime_ns, user_xattrs(fd, name))


def user_xattrs(fd: int, name: str) -> tuple[tuple[str, bytes], ...]:
    """The user.* extended attributes of a file (none where the filesystem has none); those
    over the protocol's limits are left behind, and logged."""
    try:
        names = [n for n in os.listxattr(fd) if n.startswith("user.")]
        found = [(n, os.getxattr(fd, n)) for n in sorted(names)]
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.ENODATA):
            log.warning("%s: its extended attributes stay behind: %s", name, exc)
        return ()
    kept = [(n, v) for n, v in found if len(n) <= 255 and len(v) <= MAX_XATTR_VALUE]
    if len(kept) < len(found) or len(kept) > MAX_XATTRS:
        log.warning("%s: %d of its %d user xattrs stay behind (over the limits)", name,
                    len(found) - min(len(kept), MAX_XATTRS), len(found))
    return tuple(kept[:MAX_XATTRS])


def apply_attrs(path: str, fd: int | None, a: p.FileAttrs, name: str) -> list[str]:
    """Set `a` on the file at `path` (its xattrs through `fd`); what could not be set, in
    words. The owner first (a chown clears the set-id bits), the times last (nothing writes
    after them)."""
    steps = [("owner", lambda: os.chown(path, a.uid, a.gid)),
             ("mode", lambda: os.chmod(path, a.mode))]
    if fd is not None:
        steps += [(f"xattr {n}", lambda n=n, v=v: os.setxattr(fd, n, v))  # type: ignore[misc]
                  for n, v in a.xattrs]
    steps.append(("times", lambda: os.utime(path, ns=(a.atime_ns, a.mtime_ns))))
    problems = []
    for what, step in steps:
        try:
            step()
        except OSError as exc:
            problems.append(f"{name}: its {what} stays as made here ({exc.strerror})")
    return problems
