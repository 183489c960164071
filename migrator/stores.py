"""The seams between the migration engine and the filesystem.

`Source` (source.py) reads blocks and dirty sets through a `SourceFiles`, `DestSession`
(dest.py) writes blocks and its state file through a `DestFiles`.  The real ones are here:
a blkfs mount on each side.  The engine tests (tests/test_engine.py) run a whole migration
over an in-memory stream with files in memory instead, in milliseconds.

Whatever asks the daemon is async, over blkfs.control.AsyncControlClient: the engine runs
in trio's loop, and a daemon that stalls must stall nothing but the call that waits for it
(the loop's other tasks and timeouts go on; tests/test_architecture.py keeps the blocking
ControlClient out of the engine).
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
from collections.abc import Awaitable
from typing import Protocol

import numpy as np
import trio

from blkfs import ctlproto as cp
from blkfs.control import AsyncControlClient, ControlError, find_socket, flush_file
from blkfs.runtime import FSTYPE, DaemonInfo, mount_fstype

from . import ownership as own
from . import protocol as p
from .delta import file_digests
from .fileattrs import apply_attrs, file_attrs
from .space import SpaceNeed
from .transport import MigrationError
from .vmrecords import RESERVED, RecordDir, VMRecords, mount_relative
from .zeros import hole_runs

log = logging.getLogger(__name__)

# Writes into the page cache in pieces of this size: on this machine's ext4, 1 GiB written
# 256 KiB at a time took 0.27 s, in 1 MiB or 8 MiB pieces 1.3 s (scripts/bench_copy.py).
WRITE_CHUNK = 256 << 10

Extent = tuple[int, int]
HeatRuns = tuple[tuple[int, int, float], ...] | np.ndarray  # ctlproto.HEAT_RUN records
class SourceFiles(Protocol):
    """The migrated files on the source, by file id (their index in `names`)."""

    block_size: int
    page_size: int  # the unit of dirty tracking under a block (swap's extents are pages)
    names: list[str]
    writeback: bool  # writes reach tracking at writeback: freeze cannot hold them

    def size(self, file_id: int) -> int: ...

    def allocated(self, file_id: int) -> int:
        """The bytes the file takes on disk (its data; a thin image's is far below its size)."""
        ...

    def read(self, file_id: int, offset: int, length: int) -> bytes:
        """Bytes as the VM wrote them (short at the end of the file)."""
        ...

    def read_into(self, file_id: int, offset: int, buf: memoryview) -> int:
        """Like read, into a buffer the caller reuses (no new memory to fault in: reading
        1.25 GB for verification in 512 MiB bytes objects ran at 400 MB/s, into one
        reused 8 MiB buffer at 4 GB/s); returns the bytes read (short at the end)."""
        ...

    def data_ranges(self, file_id: int, start: int, end: int) -> list[tuple[int, int]]:
        """The [start, end) byte ranges of data (not holes) within [start, end), sorted."""
        ...

    async def swap(self, file_id: int) -> list[Extent]:
        """End the file's epoch: the pages written since the last swap."""
        ...

    async def swap_all(self, file_ids: list[int]) -> dict[int, list[Extent]]:
        """`swap` of each file, in one round trip where the store can."""
        ...

    def last_epoch(self, file_id: int) -> int | None:
        """The blkfs epoch this store's latest swap of the file ended (None before one)."""
        ...

    async def trust_lost(self) -> bool:
        """The daemon may have missed a write on this mount (its dirty sets prove nothing)."""
        ...

    async def clear(self, file_id: int, extents: list[Extent]) -> None:
        """Forget these blocks' dirty marks: they are about to be read."""
        ...

    async def heat(self, file_id: int, static_heat: float | None) -> tuple[HeatRuns, float]:
        """(first, count, heat) runs of written blocks, and the static threshold used."""
        ...

    async def flush(self) -> None:
        """Writes still in the page cache reach the tracker (the barrier before a swap)."""
        ...

    async def claim(self, migration: str, holder: str) -> None:
        """Take the VM's files on the mount until close(): a sync and a migrate of the same
        files (both take the dirty sets) never run at once; other VMs' go on beside."""
        ...

    @property
    def records(self) -> VMRecords:
        """This host's records of the mount's VMs."""
        ...

    def attrs(self) -> tuple[p.FileAttrs, ...]:
        """Each file's mode, owner, times and user xattrs now (at the suspend point: the
        destination sets them before the VM starts there)."""
        ...

    def close(self) -> None: ...


def data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The [start, end) byte ranges of data (not holes) of `fd` within [start, end)."""
    out, pos = [], start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # nothing but a hole up to the end of the file
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no SEEK_DATA here
                return [(start, end)]
            raise
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        out.append((data, min(hole, end)))
        pos = hole
    return out


class DestFiles(Protocol):
    """The destination's files of one incoming migration, by file id."""

    mount: str
    force: bool  # serve --force: overwrite the files of a VM that runs here

    async def prepare(self, manifest: p.Manifest, holder: str) -> None:
        """Take the mount for this migration (`holder` says who, to a second taker) and
        refuse what cannot work (names, space) before anything is written. Whose files they
        are is the engine's to ask (ownership.admit)."""
        ...

    async def reattach(self, manifest: p.Manifest, holder: str,
                       postcopy: str | None) -> cp.Reattached | None:
        """Take the mount again for a migration whose source reattached (its files exist);
        with `postcopy` (the spill area's migration id), have the daemon's paused post-copy
        fetch for this session again."""
        ...

    @property
    def records(self) -> VMRecords:
        """This host's records of the mount's VMs (the incoming one's among them)."""
        ...

    async def postcopy_absent(self) -> int:
        """Blocks an incoming post-copy on this mount still lacks (0 if none runs)."""
        ...

    def create(self, manifest: p.Manifest) -> None: ...

    def set_attrs(self, attrs: tuple[p.FileAttrs, ...]) -> list[str]:
        """Give the files the source's attributes (Commit.attrs); what could not be set, in
        words (the migration goes on: e.g. no chown for a serve that is not root)."""
        ...

    def write(self, file_id: int, offset: int, data: bytes | memoryview) -> None:
        """Sync (it may run in a worker thread): what the daemon must learn of it waits for
        `settle`."""
        ...

    def read(self, file_id: int, offset: int, length: int) -> bytes:
        """What the file holds here now (a block that pages were written into, for its
        digest)."""
        ...

    async def settle(self, only_if_many: bool = False) -> None:
        """Writes made so far are seen through the mount (and tracked) from now on: called
        before any frame that is not data, above all before the VM may start. With
        `only_if_many`, before data frames: only once many writes wait (bounds the list)."""
        ...

    def fresh(self, file_id: int) -> bool:
        """The file was created empty by this migration: its unwritten blocks are holes."""
        ...

    def held(self, file_id: int, block_size: int, first: int, count: int) -> list[int] | None:
        """xxh3 of blocks [first, first+count) of the file at its new size, if it existed
        before this migration with data (an older copy: the source sends only what differs);
        else None."""
        ...

    def held_holes(self, file_id: int, block_size: int, least: int) -> list[tuple[int, int]]:
        """(first, count) of the runs of at least `least` hole blocks of the file held here
        (an older copy): said as runs, not a digest each."""
        ...

    async def zero(self, file_id: int, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros (over data this migration wrote, or in a
        file that existed)."""
        ...

    async def own_swap(self, name: str) -> tuple[int, list[Extent]] | None:
        """End this mount's own blkfs epoch of a file (after settle): (the epoch ended, the
        extents written in it); None if there is no such file. Lineage: nobody wrote a
        replica since its sync if the next swap finds nothing."""
        ...

    def resize(self, file_id: int, size: int) -> None: ...

    async def sync(self) -> None:
        """Every written block durable."""
        ...

    async def aclose(self) -> None:
        """Pending writes told to the daemon (even when cancelled), then everything closed."""
        ...


# -- the source: a blkfs mount -------------------------------------------------------------------


class BlkfsSource:
    """Files under a source blkfs mount: dirty sets and heat from its daemon, data straight
    from the backing files (the daemon writes synchronously, so the backing file holds
    every write it has tracked). Made by `open`, which asks the daemon."""

    def __init__(self, mount: str, client: AsyncControlClient) -> None:
        self.mount = mount
        self.client = client
        self.fds: list[int] = []
        self.epochs: dict[int, int] = {}  # file id -> the epoch our latest swap ended
        self._records: RecordDir | None = None
        self.names: list[str] = []
        self.writeback = False
        self.block_size = 0
        self.page_size = 0

    @classmethod
    async def open(cls, mount: str, names: list[str], vm_name: str | None = None,
                   timeout: float = 60.0) -> BlkfsSource:
        """The files `names` (or those of VM `vm_name`) of a live mount, checked; `timeout`
        bounds each control call."""
        try:
            client = await AsyncControlClient.for_mount(mount, timeout=timeout)
        except ControlError as exc:
            raise MigrationError(str(exc)) from None
        self = cls(mount, client)
        try:
            info = await self._call(cp.Info())
            assert isinstance(info, cp.InfoReply)
            if not info.tracking:
                raise MigrationError(f"{mount} is mounted with --no-tracking: remount it "
                                     "with tracking to migrate from it")
            self.writeback = info.writeback
            self.block_size = info.block_size
            self._records = RecordDir(info.backing)
            if not names and vm_name:  # --vm NAME alone: the files that VM was named with
                try:
                    found = own.find_vm(self._records.all(), [], vm_name)
                except own.Refusal as exc:
                    raise MigrationError(str(exc)) from None
                names = found.files if found is not None else []
            self.names = [mount_relative(mount, n) for n in names]
            twice = sorted({n for n in self.names if self.names.count(n) > 1})
            if twice:
                raise MigrationError(f"{twice[0]} is named twice (the same file, by two "
                                     "paths?)")
            for rel in self.names:  # exists, is a regular file, inside the mount
                r = await self._call(cp.Dirty(rel, pages=True))
                assert isinstance(r, cp.DirtyReply)
                self.page_size = r.page_size
            for rel in self.names:
                self.fds.append(os.open(os.path.join(info.backing, rel),
                                        os.O_RDONLY | os.O_CLOEXEC))
        except BaseException:
            self.close()
            raise
        return self

    async def _call(self, req: cp.Request) -> object:
        """Cancellable: a reply lost to a cancellation (the migration ends) harms nothing the
        next one relies on (a lost swap moves the epoch on, which lineage notices)."""
        try:
            return await self.client.call(req, cancellable=True)
        except ControlError as exc:
            raise MigrationError(f"blkfs on {self.mount}: {exc}") from None

    def size(self, file_id: int) -> int:
        return os.fstat(self.fds[file_id]).st_size

    def allocated(self, file_id: int) -> int:
        return os.fstat(self.fds[file_id]).st_blocks * 512

    def attrs(self) -> tuple[p.FileAttrs, ...]:
        # (a few fstat and listxattr calls on the backing files: microseconds, in the downtime)
        out = []
        for file_id, fd in enumerate(self.fds):
            out.append(file_attrs(file_id, fd, self.names[file_id]))
        return tuple(out)

    def read(self, file_id: int, offset: int, length: int) -> bytes:
        return os.pread(self.fds[file_id], length, offset)

    def read_into(self, file_id: int, offset: int, buf: memoryview) -> int:
        return os.preadv(self.fds[file_id], [buf], offset)

    def data_ranges(self, file_id: int, start: int, end: int) -> list[tuple[int, int]]:
        return data_ranges(self.fds[file_id], start, end)

    async def swap(self, file_id: int) -> list[Extent]:
        return (await self.swap_all([file_id]))[file_id]

    async def swap_all(self, file_ids: list[int]) -> dict[int, list[Extent]]:
        try:  # (cancellable, as _call: a lost swap moves the epoch on, which lineage notices)
            got = await self.client.call_many(
                [cp.Dirty(self.names[fid], swap=True, pages=True) for fid in file_ids],
                cancellable=True)
        except ControlError as exc:
            raise MigrationError(f"blkfs on {self.mount}: {exc}") from None
        out: dict[int, list[Extent]] = {}
        for fid, r in zip(file_ids, got, strict=True):
            assert isinstance(r, cp.DirtyReply)
            self.epochs[fid] = r.epoch
            out[fid] = list(r.extents)
        return out

    def last_epoch(self, file_id: int) -> int | None:
        return self.epochs.get(file_id)

    async def trust_lost(self) -> bool:
        info = await self._call(cp.Info())
        assert isinstance(info, cp.InfoReply)
        return info.trust_lost

    async def clear(self, file_id: int, extents: list[Extent]) -> None:
        await self._call(cp.Clear(self.names[file_id], tuple(extents)))

    async def heat(self, file_id: int, static_heat: float | None) -> tuple[HeatRuns, float]:
        r = await self._call(cp.Heat(self.names[file_id], static_heat=static_heat))
        assert isinstance(r, cp.HeatReply)
        return r.heat_runs(), r.static_heat

    async def flush(self) -> None:
        for rel in self.names:
            await trio.to_thread.run_sync(flush_file, os.path.join(self.mount, rel))

    async def claim(self, migration: str, holder: str) -> None:
        try:
            await self.client.call(cp.Claim(migration, holder, tuple(self.names)),
                                   cancellable=True)
        except ControlError as exc:
            raise MigrationError(f"{exc} (stop that one first)") from None

    @property
    def records(self) -> RecordDir:
        assert self._records is not None
        return self._records

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if self._records is not None:
            self._records.close()
        self.client.close()


# -- the destination: files under a blkfs mount ---------------------------------------------------


def check_blkfs_mount(mount: str) -> None:
    """Refuse to write into anything but a live blkfs mount (never a bare directory)."""
    if mount_fstype(mount) != FSTYPE:
        raise MigrationError(f"{mount} is not a blkfs mount: mount it first with "
                             f"'blkfs mount BACKING {mount}'")


class MountDest:
    """Files under the destination's blkfs mount.

    Nothing runs on them here before the VM starts, so the data skips FUSE: it goes into the
    backing files directly (half the copy's CPU was the daemon serving FUSE writes), and the
    daemon is told which ranges changed (`written`: tracked as writes, the kernel's cached
    pages dropped) before any other frame is handled: a resize, the Commit that starts the
    VM, post-copy's lazy mode. Everything else (create, resize, punch) goes through the mount.
    """

    PENDING_MAX = 4096  # ranges waiting for one `written` call
    def __init__(self, mount: str, force: bool = False) -> None:
        self.mount = os.path.realpath(mount)
        self.force = force  # overwrite the files of a VM that runs here
        self.fds: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.fresh_ids: set[int] = set()  # files created empty by this migration
        self.client: AsyncControlClient | None = None  # holds the mount's migration slot
        self.backing: str | None = None  # the mount's backing directory, once claimed
        self._records: RecordDir | None = None
        self.direct: dict[int, int] = {}  # backing file fds, by file id
        self.readers: dict[int, int] = {}  # buffered fds through the mount, where no direct
        self.pending: dict[int, list[list[int]]] = {}  # written ranges the daemon must know
        self.npending = 0

    def _target(self, name: str) -> str:
        """The path for a manifest name: inside the mount, never a reserved name."""
        parts = name.split("/")
        if parts[0] in RESERVED:
            raise MigrationError(f"refusing file name {name!r}: reserved on the destination")
        full = os.path.realpath(os.path.join(self.mount, name))
        if os.path.commonpath([full, self.mount]) != self.mount or full == self.mount:
            raise MigrationError(f"refusing file name {name!r}: it leads outside {self.mount}")
        return full

    async def prepare(self, manifest: p.Manifest, holder: str) -> None:
        await self._claim(manifest, manifest.migration or "?", holder)
        have: dict[str, int] = {}
        for f in manifest.files:
            try:
                have[f.name] = os.stat(self._target(f.name)).st_blocks * 512
            except FileNotFoundError:
                have[f.name] = 0
        sv = os.statvfs(self.mount)
        space = SpaceNeed.of(manifest.files, have, sv.f_bavail * sv.f_frsize)
        if space.short:
            raise MigrationError(f"destination disk full: {space.words(self.mount)}")

    async def _claim(self, manifest: p.Manifest, migration: str,
                     holder: str) -> AsyncControlClient:
        check_blkfs_mount(self.mount)
        try:  # a live daemon, and the VM's files claimed, held until close()
            self.client = await AsyncControlClient.for_mount(self.mount)
            await self.client.call(cp.Claim(migration, holder,
                                            tuple(f.name for f in manifest.files)))
            info = await self.client.call(cp.Info())
        except ControlError as exc:
            raise MigrationError(str(exc)) from None
        self.backing = info.backing
        return self.client

    async def reattach(self, manifest: p.Manifest, holder: str,
                       postcopy: str | None) -> cp.Reattached | None:
        client = await self._claim(manifest, manifest.migration, holder)
        for f in manifest.files:
            self.names[f.file_id] = f.name
        if postcopy is None:
            return None
        try:
            out = await client.call(cp.LazyReattach(postcopy))
        except ControlError as exc:
            raise MigrationError(f"blkfs on {self.mount}: {exc}") from None
        assert isinstance(out, cp.Reattached)
        return out

    @property
    def records(self) -> RecordDir:
        """Sync: the backing directory is the claim's answer, or else the daemon's runtime
        file (a local file: no call into the daemon, which a property could not await)."""
        if self._records is None:
            backing = self.backing
            if backing is None:
                check_blkfs_mount(self.mount)
                try:
                    find_socket(self.mount)  # a live daemon, or the advice why not
                except ControlError as exc:
                    raise MigrationError(str(exc)) from None
                info = DaemonInfo.find(self.mount)
                if info is None:
                    raise MigrationError(f"the blkfs daemon of {self.mount} left no runtime "
                                         "file: mount it again")
                backing = info.backing
            self._records = RecordDir(backing)
        return self._records

    async def postcopy_absent(self) -> int:
        try:
            c = await AsyncControlClient.for_mount(self.mount, timeout=10)
            try:
                info = await c.call(cp.Info(), cancellable=True)
            finally:
                c.close()
        except ControlError as exc:
            raise MigrationError(str(exc)) from None
        return int(info.postcopy_absent)

    def create(self, manifest: p.Manifest) -> None:
        backing = self.backing if self.client is not None else None
        for f in manifest.files:
            path = self._target(f.name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_DIRECT, 0o600)
            self.fds[f.file_id] = fd
            self.names[f.file_id] = f.name
            if os.fstat(fd).st_size == 0:
                self.fresh_ids.add(f.file_id)  # sparse at its size: zero runs stay unwritten
            os.ftruncate(fd, f.size)
            if backing is not None:
                self._open_direct(f.file_id, fd, os.path.join(
                    backing, os.path.relpath(path, self.mount)))

    def set_attrs(self, attrs: tuple[p.FileAttrs, ...]) -> list[str]:
        problems = []
        for a in attrs:
            name = self.names.get(a.file_id)
            if name is not None:
                problems += apply_attrs(self._target(name), self.direct.get(
                    a.file_id, self.fds.get(a.file_id)), a, name)
        return problems

    def _open_direct(self, file_id: int, mount_fd: int, path: str) -> None:
        """The backing file, if it is the very file the mount shows (else: through FUSE)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return
        a, b = os.fstat(mount_fd), os.fstat(fd)
        if (a.st_ino, a.st_size) != (b.st_ino, b.st_size):
            os.close(fd)
            return
        self.direct[file_id] = fd

    async def settle(self, only_if_many: bool = False) -> None:
        """Tell the daemon every range written directly since the last call (not cut by a
        cancellation: a write it never learns of would be missing from its tracking); with
        `only_if_many`, only once PENDING_MAX of them wait."""
        if not self.npending or (only_if_many and self.npending < self.PENDING_MAX):
            return
        assert self.client is not None
        try:
            for file_id, ranges in self.pending.items():
                for i in range(0, len(ranges), self.PENDING_MAX):
                    await self.client.call(cp.Written(self.names[file_id], tuple(
                        (o, n) for o, n in ranges[i:i + self.PENDING_MAX])))
        except ControlError as exc:
            raise MigrationError(f"blkfs on {self.mount}: {exc}") from None
        self.pending.clear()
        self.npending = 0

    def read(self, file_id: int, offset: int, length: int) -> bytes:
        fd = self.direct.get(file_id)
        if fd is None:  # (the mount fd is O_DIRECT: it wants aligned buffers)
            fd = self.readers.get(file_id)
            if fd is None:
                fd = self.readers[file_id] = os.open(self._target(self.names[file_id]),
                                                     os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise MigrationError(f"cannot read {self.names[file_id]} back: "
                                 f"{exc.strerror}") from None

    def write(self, file_id: int, offset: int, data: bytes | memoryview) -> None:
        try:
            direct = self.direct.get(file_id)
            if direct is None:
                os.pwrite(self.fds[file_id], data, offset)
                return
            mv = memoryview(data)
            for i in range(0, len(mv), WRITE_CHUNK):
                os.pwrite(direct, mv[i:i + WRITE_CHUNK], offset + i)
            ranges = self.pending.setdefault(file_id, [])
            if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                ranges[-1][1] += len(data)
            else:
                ranges.append([offset, len(data)])
                self.npending += 1
        except OSError as exc:
            name = self.names[file_id]
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise MigrationError(f"destination disk full writing {name}") from None
            if exc.errno == errno.ENOTCONN:
                raise MigrationError(f"the destination's blkfs daemon of {self.mount} is gone "
                                     f"(writing {name}): mount it again") from None
            raise MigrationError(f"cannot write {name}: {exc.strerror}") from None

    def fresh(self, file_id: int) -> bool:
        return file_id in self.fresh_ids

    def held(self, file_id: int, block_size: int, first: int, count: int) -> list[int] | None:
        if file_id in self.fresh_ids:
            return None
        fd = self.direct.get(file_id)  # the backing file: no O_DIRECT alignment to keep
        if first == 0:
            os.fsync(self.fds[file_id])  # what the mount's cache holds is in the backing file
        own = fd is None
        if own:
            fd = os.open(self._target(self.names[file_id]), os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if first == 0 and not data_ranges(fd, 0, size):
                return None  # nothing but holes: nothing to spare (asked once, at the start)
            end = min(size, (first + count) * block_size)
            ranges = data_ranges(fd, first * block_size, end)
            return file_digests(lambda off, n: os.pread(fd, n, off), ranges, size, block_size,
                                first, count)
        finally:
            if own:
                os.close(fd)

    def held_holes(self, file_id: int, block_size: int, least: int) -> list[tuple[int, int]]:
        if file_id in self.fresh_ids:
            return []
        os.fsync(self.fds[file_id])  # what the mount's cache holds is in the backing file
        fd = self.direct.get(file_id)
        own = fd is None
        if own:
            fd = os.open(self._target(self.names[file_id]), os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            nblocks = -(-size // block_size)
            return [(b0, n) for b0, n, hole in hole_runs(data_ranges(fd, 0, size), 0, nblocks,
                                                         block_size, size)
                    if hole and n >= least]
        finally:
            if own:
                os.close(fd)

    async def zero(self, file_id: int, offset: int, length: int) -> None:
        """Punched by the daemon (its tracker and the kernel's cache stay coherent)."""
        assert self.client is not None
        try:
            await self.client.call(cp.Punch(self.names[file_id], offset, length))
        except ControlError as exc:
            raise MigrationError(f"blkfs on {self.mount}: {exc}") from None

    def resize(self, file_id: int, size: int) -> None:
        os.ftruncate(self.fds[file_id], size)

    async def own_swap(self, name: str) -> tuple[int, list[Extent]] | None:
        assert self.client is not None
        await self.settle()
        try:
            r = await self.client.call(cp.Dirty(name, swap=True))
        except ControlError:
            return None  # no such file (yet) here
        assert isinstance(r, cp.DirtyReply)
        return r.epoch, list(r.extents)

    async def sync(self) -> None:
        await self.settle()
        for fid, fd in self.fds.items():
            await trio.to_thread.run_sync(os.fsync, self.direct.get(fid, fd))

    async def aclose(self) -> None:
        try:
            with trio.CancelScope(shield=True):  # (each call is bounded by its timeout)
                await self.settle()
        except MigrationError as exc:  # the daemon is gone: it saves no state then anyway
            log.warning("%s: %s", self.mount, exc)
        for fd in [*self.fds.values(), *self.direct.values(), *self.readers.values()]:
            try:
                os.close(fd)
            except OSError:
                pass  # the daemon died under us (ENOTCONN): nothing more to release
        self.fds.clear()
        self.direct.clear()
        self.readers.clear()
        if self._records is not None:
            self._records.close()
        if self.client is not None:
            self.client.close()  # the mount's migration slot is free again
            self.client = None


async def opened(files: SourceFiles | Awaitable[SourceFiles]) -> SourceFiles:
    """What a SourceHooks.open_files gave: the real one opens asynchronously (it asks the
    daemon), a test's may hand its files over as they are."""
    return await files if inspect.isawaitable(files) else files
