"""The pyfuse3 Operations of blkfs: a passthrough that records writes.

Design (see docs/tracking.md):

* Every FUSE inode holds an ``O_PATH | O_NOFOLLOW`` fd on its backing object,
  as libfuse's passthrough_ll does.  Lookups are ``*at()`` calls relative to the
  parent's fd, so renaming a parent directory never strands a child, hard links
  are one inode, and no name can walk out of the backing tree (names with
  ``/``, ``.`` and ``..`` never resolve upwards from the root).
* Every FUSE open gets its own backing fd (QEMU opens an image read-only first,
  then read-write).  O_DIRECT and O_APPEND are stripped from the backing open:
  the kernel already did the O_DIRECT part and supplies the offsets.
* Writes are ``pwrite`` on the trio thread, then the tracker is marked: the
  mark happens after the data reached the backing file, and no await lies
  between the two, so a swap (also on the trio thread) can never split them.
* Handlers raise only ``FUSEError``: OS errors keep their errno, anything
  else is logged with context and answered EIO, and the daemon keeps serving.
* Extended attributes are off by default (ENOSYS, which the kernel remembers):
  answering getxattr costs a GETXATTR round trip before every write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from .lazy import BlockMissing, LazyMode
from .registry import Registry
from .settings import META_DIR
from .tracker import FileKey, FileTracker

log = logging.getLogger(__name__)

META_NAME = META_DIR.encode()  # hidden metadata dir at the backing root
SPILL_NAME = b".spill"  # read-only view of the spill area at the mount root
ATTR_TIMEOUT = 60.0  # the daemon is the only writer: cache attributes and entries
_STRIP_FLAGS = os.O_DIRECT | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOCTTY
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(ret: int) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _fchown_fd(fd: int, uid: int, gid: int) -> None:
    """chown the object an O_PATH fd refers to (symlinks included)."""
    _check(_libc.fchownat(fd, b"", uid, gid, _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW))


def _utimens_fd(fd: int, atime_ns: int, mtime_ns: int) -> None:
    """Set the times of the object an O_PATH fd refers to, a symlink itself included."""
    times = (_Timespec * 2)((atime_ns // 10**9, atime_ns % 10**9),
                            (mtime_ns // 10**9, mtime_ns % 10**9))
    _check(_libc.utimensat(fd, b"", times, _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW))


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def _invalidate_inode(ino: int) -> None:
    """Drop the kernel's cached pages of `ino` (from a worker thread, never the loop: it can
    block under the writeback cache)."""
    try:
        pyfuse3.invalidate_inode(ino, attr_only=False)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # the kernel does not know the inode: nothing cached
            raise


def _renameat2(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddir, old, newdir, new, ctypes.c_uint(flags)))


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def handler(fn: F) -> F:
    """Turn every failure of a FUSE handler into a FUSEError with the right errno."""

    @functools.wraps(fn)
    async def wrapper(self: BlkFS, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except FUSEError:
            raise
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            self.faults += 1
            log.exception("internal error in %s%r; answering EIO", fn.__name__, args)
            raise FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class Node:
    """A FUSE inode: an O_PATH fd on the backing object and its lookup count."""

    __slots__ = ("fd", "ino", "is_reg", "key", "lookups", "readonly", "tracker")

    def __init__(self, ino: int, fd: int, key: FileKey, mode: int, readonly: bool = False) -> None:
        self.ino = ino
        self.fd = fd
        self.key = key
        self.is_reg = stat.S_ISREG(mode)
        self.lookups = 0
        self.readonly = readonly  # inside the .spill view
        self.tracker: FileTracker | None = None


class OpenFile:
    __slots__ = ("fd", "tracker")

    def __init__(self, fd: int, tracker: FileTracker | None) -> None:
        self.fd = fd
        self.tracker = tracker


class DirHandle:
    __slots__ = ("entries", "node")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.entries: list[bytes] | None = None


class BlkFS(pyfuse3.Operations):
    """The FUSE handlers; tracking state lives in the Registry, post-copy in LazyMode."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, registry: Registry, *, xattr: bool = False,
                 spill_dir: str | None = None, writeback: bool = False) -> None:
        super().__init__()
        # The kernel's writeback cache (docs/tracking.md): writes reach write() at writeback.
        self.enable_writeback_cache = writeback
        self.registry = registry
        self.backing = registry.backing
        self.tracking = registry.tracking
        self.xattr = xattr
        self.faults = 0  # internal errors answered EIO
        self.lazy = LazyMode(registry.shift, self._invalidate, spill_dir)
        self.root_fd = os.open(self.backing, os.O_PATH | os.O_DIRECTORY)
        st = os.fstat(self.root_fd)
        self.root_dev = st.st_dev
        root = Node(pyfuse3.ROOT_INODE, self.root_fd, (st.st_dev, st.st_ino), st.st_mode)
        root.lookups = 1
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: root}
        self._by_key: dict[FileKey, int] = {root.key: pyfuse3.ROOT_INODE}
        self._next_foreign = 1 << 62  # inode numbers for objects on other devices
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._next_fh = 1

    # -- inodes -----------------------------------------------------------------

    def _nodeid(self, st: os.stat_result) -> int:
        # Stable numbers (the backing inode) where they cannot collide with the root.
        if st.st_dev == self.root_dev and st.st_ino != pyfuse3.ROOT_INODE:
            return st.st_ino
        self._next_foreign += 1
        return self._next_foreign

    def _node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            log.error("request for unknown inode %d", inode)
            raise FUSEError(errno.ESTALE) from None

    def _entry(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = ATTR_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = st.st_uid
        e.st_gid = st.st_gid
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _attach(self, dir_fd: int | None, name: bytes, st: os.stat_result,
                readonly: bool = False) -> Node:
        """The node for `name` in `dir_fd`, creating it (lookup count 0) if new."""
        key = (st.st_dev, st.st_ino)
        ino = self._by_key.get(key)
        if ino is not None:
            return self._nodes[ino]
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != key:  # replaced between stat and open
            os.close(fd)
            raise FUSEError(errno.EAGAIN)
        node = Node(self._nodeid(st), fd, key, st.st_mode, readonly)
        self._nodes[node.ino] = node
        self._by_key[key] = node.ino
        return node

    def _lookup_entry(
        self, dir_fd: int | None, name: bytes, st: os.stat_result, readonly: bool = False
    ) -> pyfuse3.EntryAttributes:
        node = self._attach(dir_fd, name, st, readonly)
        node.lookups += 1
        return self._entry(node.ino, st)

    def _drop(self, node: Node) -> None:
        if node.tracker is not None:
            try:
                gone = os.fstat(node.fd).st_nlink == 0
                self.registry.forget(node.key, None if gone else self._relpath(node.fd))
            except OSError:
                pass
        del self._nodes[node.ino]
        self._by_key.pop(node.key, None)
        os.close(node.fd)

    def _check_name(self, parent: int, name: bytes) -> None:
        if b"/" in name or name in (b"", b".", b".."):
            raise FUSEError(errno.EINVAL)
        if parent == pyfuse3.ROOT_INODE and (
                name == META_NAME or (name == SPILL_NAME and self.lazy.spill_dir)):
            raise FUSEError(errno.EPERM)
        if self._node(parent).readonly:
            raise FUSEError(errno.EROFS)

    def _spill_stat(self) -> os.stat_result | None:
        if not self.lazy.spill_dir:
            return None
        try:
            return os.stat(self.lazy.spill_dir)
        except OSError:
            return None

    def _relpath(self, fd: int) -> str:
        real = os.readlink(_proc(fd))
        return os.path.relpath(real, self.backing)

    # -- tracking -----------------------------------------------------------------

    def _tracker_of(self, node: Node) -> FileTracker | None:
        if not self.tracking or not node.is_reg or node.readonly:
            return None
        tr = node.tracker
        if tr is None:
            tr = node.tracker = self.registry.tracker_for(node.key, os.fstat(node.fd))
        return tr

    def live_fds(self) -> dict[FileKey, int]:
        """An fd on every inode the kernel still knows, by key (for saving the state)."""
        return {n.key: n.fd for n in self._nodes.values()}

    async def _invalidate(self, key: FileKey) -> None:
        """Drop the kernel's cached pages of a file (LazyMode changes files behind it)."""
        ino = self._by_key.get(key)
        if ino is not None:
            await trio.to_thread.run_sync(_invalidate_inode, ino)

    def _write_fault(self, of: OpenFile, what: str) -> None:
        """An internal error in a handler that may have changed a tracked file's content or
        size: the tracker cannot say what reached the backing file (invariant 5)."""
        if of.tracker is None:
            return
        try:
            size: int | None = os.fstat(of.fd).st_size
        except OSError:
            size = None
        self.registry.mark_unsafe(of.tracker, f"internal error in {what}", size)

    def _resized(self, tr: FileTracker, size: int) -> None:
        """The backing file was truncated or extended to `size`: tell its tracker."""
        try:
            tr.on_resize(size)
            if tr.lazy is not None:
                tr.lazy.resize(size, tr.nblocks)
        except Exception:
            self.registry.mark_unsafe(tr, f"internal error recording a resize to {size}", size)
            raise

    # -- FUSE: inodes and attributes ----------------------------------------------

    @handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        p = self._node(parent_inode)
        if name == b"." or (name == b".." and parent_inode == pyfuse3.ROOT_INODE):
            p.lookups += 1
            return self._entry(p.ino, os.fstat(p.fd))
        if parent_inode == pyfuse3.ROOT_INODE and name in (META_NAME, SPILL_NAME):
            sst = self._spill_stat() if name == SPILL_NAME else None
            if sst is None:
                raise FUSEError(errno.ENOENT)
            return self._lookup_entry(None, os.fsencode(self.lazy.spill_dir or ""), sst, True)
        st = os.stat(name, dir_fd=p.fd, follow_symlinks=False)
        return self._lookup_entry(p.fd, name, st, p.readonly)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            node = self._nodes.get(ino)
            if node is None or ino == pyfuse3.ROOT_INODE:
                continue
            node.lookups -= n
            if node.lookups <= 0:
                try:
                    self._drop(node)
                except Exception:
                    log.exception("forget of inode %d failed", ino)

    @handler
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        return self._entry(inode, os.fstat(node.fd))

    @handler
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: Any,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if node.readonly:
            raise FUSEError(errno.EROFS)
        path = _proc(node.fd)
        is_link = stat.S_ISLNK(os.fstat(node.fd).st_mode)
        if fields.update_size:
            tr = self._tracker_of(node)
            if tr is not None and tr.frozen:
                await self.registry.wait_thawed(tr)
            if tr is not None and tr.lazy is not None:
                # The block that the new end cuts keeps its head: install it first.
                await self.lazy.ensure(tr.lazy, attr.st_size, 1)
            of = self._files.get(fh) if fh is not None else None
            if of is not None:
                os.ftruncate(of.fd, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
            if tr is not None:
                self._resized(tr, attr.st_size)
        if fields.update_mode:
            if is_link:
                raise FUSEError(errno.EOPNOTSUPP)
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            _fchown_fd(node.fd, uid, gid)
        if fields.update_atime or fields.update_mtime:
            cur = os.fstat(node.fd)
            atime = attr.st_atime_ns if fields.update_atime else cur.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns
            if is_link:  # the link's own times, as ext4 sets them (utimensat on the O_PATH fd)
                _utimens_fd(node.fd, atime, mtime)
            else:
                os.utime(path, ns=(atime, mtime))
        return self._entry(inode, os.fstat(node.fd))

    @handler
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.readlink(b"", dir_fd=self._node(inode).fd)  # readlinkat(fd, "")

    @handler
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        sv = os.statvfs(_proc(self.root_fd))
        out = pyfuse3.StatvfsData()
        for attr in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(out, attr, getattr(sv, attr))
        return out

    # -- FUSE: directory entries --------------------------------------------------

    def _owner(self, parent: Node, ctx: Any) -> tuple[int, int]:
        """uid/gid for a new object: the caller's, or the parent's group if setgid."""
        pst = os.fstat(parent.fd)
        gid = pst.st_gid if pst.st_mode & stat.S_ISGID else ctx.gid
        return ctx.uid, gid

    def _set_owner(self, dir_fd: int, name: bytes, parent: Node, ctx: Any) -> None:
        if os.geteuid() != 0:
            return
        uid, gid = self._owner(parent, ctx)
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)

    def _make(self, parent_inode: int, name: bytes, ctx: Any,
              make: Callable[[int], None]) -> pyfuse3.EntryAttributes:
        """A new directory entry made by `make(dir_fd)`, owned by the caller."""
        self._check_name(parent_inode, name)
        p = self._node(parent_inode)
        make(p.fd)
        self._set_owner(p.fd, name, p, ctx)
        return self._lookup_entry(p.fd, name, os.stat(name, dir_fd=p.fd, follow_symlinks=False))

    @handler
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._make(parent_inode, name, ctx, lambda d: os.mkdir(name, mode, dir_fd=d))

    @handler
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._make(parent_inode, name, ctx,
                          lambda d: os.mknod(name, mode, rdev, dir_fd=d))

    @handler
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._make(parent_inode, name, ctx, lambda d: os.symlink(target, name, dir_fd=d))

    @handler
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        self._check_name(new_parent_inode, new_name)
        node = self._node(inode)
        if node.readonly:
            raise FUSEError(errno.EROFS)
        np = self._node(new_parent_inode)
        os.link(_proc(node.fd), new_name, dst_dir_fd=np.fd, follow_symlinks=True)
        node.lookups += 1
        return self._entry(inode, os.fstat(node.fd))

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._check_name(parent_inode, name)
        os.unlink(name, dir_fd=self._node(parent_inode).fd)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._check_name(parent_inode, name)
        os.rmdir(name, dir_fd=self._node(parent_inode).fd)

    @handler
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        self._check_name(parent_inode_old, name_old)
        self._check_name(parent_inode_new, name_new)
        old = self._node(parent_inode_old).fd
        new = self._node(parent_inode_new).fd
        if flags:
            _renameat2(old, name_old, new, name_new, flags)
        else:
            os.rename(name_old, name_new, src_dir_fd=old, dst_dir_fd=new)

    @handler
    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self._node(inode)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = DirHandle(node)
        return fh

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        dh = self._dirs[fh]
        node = dh.node
        if dh.entries is None or start_id == 0:
            names = os.listdir(os.fsencode(_proc(node.fd)))
            if node.ino == pyfuse3.ROOT_INODE:
                names = [n for n in names if n not in (META_NAME, SPILL_NAME)]
                if self._spill_stat() is not None:
                    names.append(SPILL_NAME)
            dh.entries = [b".", b"..", *names]
        entries = dh.entries
        for i in range(start_id, len(entries)):
            name = entries[i]
            try:
                if node.ino == pyfuse3.ROOT_INODE and name == SPILL_NAME:
                    sst = self._spill_stat()
                    if sst is None:
                        continue
                    child = self._attach(None, os.fsencode(self.lazy.spill_dir or ""), sst,
                                         True)
                    if not pyfuse3.readdir_reply(token, name, self._entry(child.ino, sst), i + 1):
                        if child.lookups == 0:
                            self._drop(child)
                        break
                    child.lookups += 1
                    continue
                st = os.stat(name, dir_fd=node.fd, follow_symlinks=False)
                if i < 2:
                    # The kernel never links "." and "..": no node, no lookup count.
                    if node.ino == pyfuse3.ROOT_INODE:  # ".." stays inside the mount
                        ino, st = node.ino, os.fstat(node.fd)
                    else:
                        ino = self._by_key.get((st.st_dev, st.st_ino), 0)
                    if not pyfuse3.readdir_reply(token, name, self._entry(ino, st), i + 1):
                        break
                    continue
                child = self._attach(node.fd, name, st, node.readonly)
            except (FileNotFoundError, FUSEError):
                continue  # gone since the listing
            if not pyfuse3.readdir_reply(token, name, self._entry(child.ino, st), i + 1):
                if child.lookups == 0:
                    self._drop(child)
                break
            child.lookups += 1

    @handler
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        dh = self._dirs[fh]
        fd = os.open(_proc(dh.node.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)

    # -- FUSE: open files ----------------------------------------------------------

    def _new_fh(self, fd: int, tr: FileTracker | None) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = OpenFile(fd, tr)
        return fh

    def _open_backing(self, path: str | bytes, flags: int, mode: int = 0o777,
                      dir_fd: int | None = None) -> int:
        """The backing fd of a FUSE open.  Under the writeback cache the kernel reads pages
        through any handle to fill a partial write, a write-only one too (passthrough_ll does
        the same): such opens get O_RDWR when the mode allows reading."""
        if self.enable_writeback_cache and flags & os.O_ACCMODE == os.O_WRONLY:
            try:
                return os.open(path, (flags & ~os.O_ACCMODE) | os.O_RDWR | os.O_CLOEXEC, mode,
                               dir_fd=dir_fd)
            except PermissionError:
                pass  # write-only for this daemon's user: partial-page writes may fail, as there
        return os.open(path, flags | os.O_CLOEXEC, mode, dir_fd=dir_fd)

    @handler
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.readonly and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
            raise FUSEError(errno.EROFS)
        tr = self._tracker_of(node)
        if flags & os.O_TRUNC and tr is not None and tr.frozen:
            await self.registry.wait_thawed(tr)
        fd = self._open_backing(_proc(node.fd), flags & ~_STRIP_FLAGS)
        if flags & os.O_TRUNC and tr is not None:
            self._resized(tr, 0)
        # keep_cache: another opener (a migrator, `cat`) must not drop the
        # pages a hypervisor has mapped; the daemon is the only writer.
        return pyfuse3.FileInfo(fh=self._new_fh(fd, tr), keep_cache=True)

    @handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_name(parent_inode, name)
        p = self._node(parent_inode)
        fd = self._open_backing(name, (flags & ~_STRIP_FLAGS) | os.O_CREAT | os.O_EXCL, mode,
                                p.fd)
        try:
            if os.geteuid() == 0:
                os.fchown(fd, *self._owner(p, ctx))
            st = os.fstat(fd)
            entry = self._lookup_entry(p.fd, name, st)
        except BaseException:
            os.close(fd)
            raise
        node = self._nodes[entry.st_ino]
        tr = None
        if self.tracking:
            tr = node.tracker = self.registry.new_file(node.key)
        return pyfuse3.FileInfo(fh=self._new_fh(fd, tr), keep_cache=True), entry

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            of = self._files[fh]
            tr = of.tracker
            if tr is not None and tr.lazy is not None and tr.lazy.absent.count:
                await self.lazy.ensure(tr.lazy, off, size)  # never a stale page
            return os.pread(of.fd, size, off)
        except FUSEError:
            raise
        except BlockMissing:
            raise FUSEError(errno.EIO) from None
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            self.faults += 1
            log.exception("internal error in read(fh=%d, off=%d, size=%d)", fh, off, size)
            raise FUSEError(errno.EIO) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        # The hot path: no logging, no allocation beyond what marking needs.
        try:
            of = self._files[fh]
            tr = of.tracker
            if tr is None:
                return os.pwrite(of.fd, buf, off)
            if tr.frozen:
                await self.registry.wait_thawed(tr)
            if tr.lazy is not None and tr.lazy.absent.count:
                # Install first: the write lands on the block's final content.
                await self.lazy.ensure(tr.lazy, off, len(buf))
            n = os.pwrite(of.fd, buf, off)
            tr.on_write(off, n)  # after the data reached the backing file
            return n
        except FUSEError:
            raise
        except BlockMissing:
            raise FUSEError(errno.EIO) from None
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            self.faults += 1
            log.exception("internal error in write(fh=%d, off=%d, len=%d)", fh, off, len(buf))
            of = self._files.get(fh)
            if of is not None:
                self._write_fault(of, f"write(fh={fh}, off={off}, len={len(buf)})")
            raise FUSEError(errno.EIO) from None

    @handler
    async def flush(self, fh: int) -> None:
        # close() semantics for the backing file (e.g. NFS close-to-open), on a dup.
        os.close(os.dup(self._files[fh].fd))

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        fd = self._files[fh].fd
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)

    @handler
    async def release(self, fh: int) -> None:
        of = self._files.pop(fh)
        os.close(of.fd)

    # -- FUSE: extended attributes (off unless --xattr) -------------------------------

    def _xattr_path(self, inode: int) -> str:
        if not self.xattr:
            raise FUSEError(errno.ENOSYS)
        return _proc(self._node(inode).fd)

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return os.getxattr(self._xattr_path(inode), name)

    @handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        path = self._xattr_path(inode)
        if self._node(inode).readonly:
            raise FUSEError(errno.EROFS)
        os.setxattr(path, name, value)

    @handler
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [os.fsencode(n) for n in os.listxattr(self._xattr_path(inode))]

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        path = self._xattr_path(inode)
        if self._node(inode).readonly:
            raise FUSEError(errno.EROFS)
        os.removexattr(path, name)

    # -- teardown -------------------------------------------------------------------

    def close_all(self) -> None:
        for of in self._files.values():
            os.close(of.fd)
        self._files.clear()
        for node in list(self._nodes.values()):
            if node.ino != pyfuse3.ROOT_INODE:
                os.close(node.fd)
        self._nodes = {pyfuse3.ROOT_INODE: self._nodes[pyfuse3.ROOT_INODE]}
