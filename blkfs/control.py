"""The control socket: a Unix stream socket speaking the protocol of blkfs.ctlproto.

Only the daemon's owner and root may talk to it (invariant 6): the socket is
0600 inside a 0700 runtime directory, and every connection's peer
credentials (SO_PEERCRED) are checked before anything is read.

The server runs in the daemon's trio loop, on the same thread as the FUSE
handlers, so an op sees the trackers between two handler steps, never in the
middle of one.  It talks to the tracking state (Registry) and to lazy mode,
never to the FUSE class.  Two clients share the codec: a blocking one for CLIs
and scripts, a trio one for the migrator.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import PurePosixPath
from typing import Any

import trio

from . import ctlproto as cp
from .bitmap import block_runs, page_runs
from .client import ControlClient as ControlClient
from .client import DaemonNotRunning as DaemonNotRunning
from .client import connect_error, find_socket
from .client import flush_file as flush_file
from .ctlproto import ControlError
from .holes import punch_hole
from .lazy import LazyError, LazyMode
from .registry import META_NAME, Registry
from .runtime import DaemonInfo
from .spill import SpillArea, SpillError, unpack_refs
from .tracker import FileKey, FileTracker

log = logging.getLogger(__name__)

HOTTEST = 5


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class Connection:
    """One client of the control socket, for ops whose effect lasts as long as it does."""

    def __init__(self, number: int) -> None:
        self.number = number


class Controller:
    """The ops of the control socket, over a mount's Registry and LazyMode."""

    def __init__(self, registry: Registry, lazy: LazyMode, info: DaemonInfo,
                 faults: Callable[[], int] = lambda: 0,
                 invalidate: Callable[[FileKey], Awaitable[None]] | None = None) -> None:
        self.registry = registry
        self.lazy = lazy
        self.invalidate = invalidate  # drops the kernel's cached pages of a file (fs)
        self.info = info
        self.faults = faults
        self.claims: dict[Connection, cp.Claim] = {}  # the migrations running, by connection

    def closed(self, conn: Connection) -> None:
        """A client went away: what it held is released; a post-copy it ran goes on alone."""
        claim = self.claims.pop(conn, None)
        if claim is not None:
            log.info("migration %s: its migrator closed the connection", claim.migration)
            # The post-copies over its files (all of them if it claimed the whole mount, or
            # if no claim is left)
            mine = {os.path.normpath(f) for f in claim.files}
            self.lazy.orphan("its migrator went away", None if not mine or not self.claims else [
                mid for mid, pc in self.lazy.running.items()
                if mine & {os.path.normpath(lf.rel) for lf in pc.files.values()}])

    # -- helpers -------------------------------------------------------------

    def _resolve(self, rel: str) -> tuple[str, FileTracker]:
        if not rel:
            raise ControlError("a FILE relative to the mount is required")
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts:
            raise ControlError(f"{rel!r}: give the file relative to the mount, without '..'")
        if p.parts and p.parts[0] == META_NAME:
            raise ControlError(f"no such file {rel!r} under {self.info.mountpoint}")
        backing = self.registry.backing
        full = os.path.realpath(os.path.join(backing, rel))
        if os.path.commonpath([full, backing]) != backing:
            raise ControlError(f"{rel!r} leads outside the mount")
        try:
            st = os.stat(full)
        except FileNotFoundError:
            raise ControlError(
                f"no such file {rel!r} under {self.info.mountpoint}: "
                f"give a path relative to the mount (see: blkfs status {self.info.mountpoint})"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise ControlError(f"{rel!r} is not a regular file: only regular files are tracked")
        self._need_tracking()
        relpath = os.path.relpath(full, backing)
        return relpath, self.registry.tracker_for((st.st_dev, st.st_ino), st, relpath)

    def _need_tracking(self) -> None:
        if not self.registry.tracking:
            raise ControlError(
                f"{self.info.mountpoint} is mounted with --no-tracking: "
                "remount without it to track writes"
            )

    def _threshold(self, t: float | None) -> float:
        return self.registry.static_heat if t is None else t

    def _trackers(self, files: tuple[str, ...]) -> list[FileTracker] | None:
        return [self._resolve(f)[1] for f in files] if files else None

    # -- ops -----------------------------------------------------------------

    def info_reply(self) -> dict[str, Any]:
        reg = self.registry
        return {"pid": os.getpid(), "mountpoint": self.info.mountpoint,
                "backing": reg.backing, "block_size": reg.block_size,
                "tracking": reg.tracking, "half_life": reg.half_life,
                "static_heat": reg.static_heat, "frozen_all": reg.frozen_all,
                "faults": self.faults(), "trust_lost": reg.trust_lost,
                "writeback": self.info.writeback, "dirty_limit": self.info.dirty_limit,
                **self._postcopy_state()}

    def _postcopy_state(self) -> dict[str, Any]:
        pcs = list(self.lazy.running.values())
        if not pcs:
            return {}
        return {"postcopy_absent": sum(pc.remaining for pc in pcs),
                "postcopy_missing": sum(len(lf.missing) for pc in pcs
                                        for lf in pc.files.values()),
                "postcopy_paused": next((pc.paused for pc in pcs if pc.paused), None)}

    def op_info(self, req: cp.Info, conn: Connection) -> cp.InfoReply:
        return cp.InfoReply(**self.info_reply())

    def op_status(self, req: cp.Status, conn: Connection) -> cp.StatusReply:
        threshold = self._threshold(req.static_heat)
        self.registry.settle_heat()
        now = time.monotonic()
        files = []
        for rel, st, tr in self.registry.tracked_files():
            if tr is None:
                files.append(cp.FileStatus(rel, st.st_size))
                continue
            static, dynamic = tr.heat.split(tr.nblocks, threshold, now)
            files.append(cp.FileStatus(
                rel, st.st_size, block_size=tr.block_size, blocks=tr.nblocks,
                epoch=tr.bitmap.epoch, dirty=tr.bitmap.count(), static=static, dynamic=dynamic,
                hottest=tuple((b, round(h, 3)) for b, h in tr.heat.hottest(HOTTEST, now)),
                writes=tr.writes, frozen=tr.frozen, restored=tr.restored))
        return cp.StatusReply(**{**self.info_reply(), "static_heat": threshold},
                              files=tuple(files))

    def op_dirty(self, req: cp.Dirty, conn: Connection) -> cp.DirtyReply:
        rel, tr = self._resolve(req.file)
        if req.swap:
            epoch, masks = tr.swap_bitmap()
        else:
            epoch, masks = tr.bitmap.epoch, tr.bitmap.masks
        if req.pages:
            return cp.DirtyReply(rel, epoch, tr.block_size, tr.size, cp.pack_extents(
                *page_runs(masks, tr.pages_per_block)), tr.page_size)
        return cp.DirtyReply(rel, epoch, tr.block_size, tr.size,
                             cp.pack_extents(*block_runs(masks)))

    def op_clear(self, req: cp.Clear, conn: Connection) -> cp.ClearReply:
        """Clear the dirty marks of some blocks before reading them (see FileTracker.clear)."""
        rel, tr = self._resolve(req.file)
        tr.clear(list(req.extents))
        return cp.ClearReply(rel, tr.bitmap.epoch)

    def op_heat(self, req: cp.Heat, conn: Connection) -> cp.HeatReply:
        rel, tr = self._resolve(req.file)
        threshold = self._threshold(req.static_heat)
        now = time.monotonic()
        tr.settle_heat(now)
        static, dynamic = tr.heat.split(tr.nblocks, threshold, now)
        listed = tr.heat.dynamic_extents(tr.nblocks, threshold, now, cp.MAX_LISTED)
        return cp.HeatReply(
            rel, tr.block_size, tr.nblocks, self.registry.half_life, threshold, static,
            dynamic, tuple(listed), cp.pack_heat_runs(*tr.heat.runs(now)))

    def op_freeze(self, req: cp.Freeze, conn: Connection) -> cp.Count:
        self._need_tracking()
        if self.info.writeback:
            raise ControlError(
                f"{self.info.mountpoint} is a --writeback mount: writes land in the kernel's "
                "page cache before blkfs could hold them, so freeze cannot stop a writer; "
                "suspend the VM itself (migrator --suspend pid:PID or qemu:QMP_SOCKET)")
        return cp.Count(self.registry.freeze(self._trackers(req.files)))

    def op_thaw(self, req: cp.Thaw, conn: Connection) -> cp.Count:
        self._need_tracking()
        return cp.Count(self.registry.thaw(self._trackers(req.files)))

    # -- spill area and post-copy (docs/spill.md) ---------------------------------

    def op_spill(self, req: cp.Spill, conn: Connection) -> cp.SpillReply:
        path = self.lazy.spill_dir
        if not path:
            raise ControlError(f"{self.info.mountpoint} has no spill area: mount with --spill DIR, "
                               "or start a post-copy migration")
        pc = self.lazy.current
        running: dict[str, Any] = {} if pc is None else {
            "postcopy_migration": pc.migration, "postcopy": pc.report(),
            "postcopy_paused": pc.paused}
        try:
            area = SpillArea.open(path)
        except SpillError as exc:
            return cp.SpillReply(path, exists=False, error=str(exc), **running)
        try:
            headers: tuple[tuple[int, int, int, int, int], ...] = ()
            if req.slots:
                headers = tuple((i, h.file_id, h.block, h.generation, h.flags)
                                for i, h in enumerate(area.scan()) if h.generation)
            return cp.SpillReply(exists=True, **area.summary(), slot_headers=headers, **running)
        finally:
            area.close()

    async def op_lazy_begin(self, req: cp.LazyBegin, conn: Connection) -> cp.Remaining:
        todo = []
        for f in req.files:
            rel, tr = self._resolve(f.file)
            todo.append((f.file_id, rel, tr, list(f.extents)))
        pc = await self.lazy.begin(self.registry.backing, req.migration, req.block_size,
                                   req.spill, todo,
                                   bytes.fromhex(req.spill_key) if req.spill_key else None)
        return cp.Remaining(pc.remaining)

    def op_lazy_refs(self, req: cp.LazyRefs, conn: Connection) -> cp.Remaining:
        pc = self.lazy.require(req.migration)
        try:
            pc.add_refs(unpack_refs(req.data))
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        return cp.Remaining(pc.remaining)

    def op_lazy_install(self, req: cp.LazyInstall, conn: Connection) -> cp.Installed:
        pc = self.lazy.require(req.migration)
        try:
            n = pc.install_fetched(req.file_id, req.first_block, req.data)
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        return cp.Installed(n, pc.remaining)

    async def op_lazy_wait(self, req: cp.LazyWait, conn: Connection) -> cp.News:
        return await self.lazy.require(req.migration).wait_news(req.timeout)

    def op_lazy_report(self, req: cp.LazyReport, conn: Connection) -> cp.LazyReportReply:
        pc = self.lazy.require(req.migration)
        return cp.LazyReportReply(pc.report(), pc.digests() if req.digests else ())

    async def op_lazy_source_lost(self, req: cp.LazySourceLost,
                                  conn: Connection) -> cp.SourceLostReply:
        pc = self.lazy.require(req.migration)
        self.lazy.orphan("the source is out of reach", [pc.migration])
        found, news = await pc.lose_source()
        return cp.SourceLostReply(found, news)

    def op_lazy_give_up(self, req: cp.LazyGiveUp, conn: Connection) -> cp.Count:
        pcs = ([self.lazy.require(req.migration)] if req.migration is not None else
               [pc for pc in self.lazy.running.values() if not pc.done])
        return cp.Count(sum(pc.give_up("given up by request") for pc in pcs))

    def op_lazy_reattach(self, req: cp.LazyReattach, conn: Connection) -> cp.Reattached:
        pc = self.lazy.running.get(req.migration)
        if pc is None:
            raise ControlError(f"no post-copy {req.migration} on this mount")
        if conn not in self.claims:
            raise ControlError("lazy_reattach: claim the mount on this connection first")
        pc.reattach()
        return cp.Reattached(pc.remaining, pc.given_up)

    async def op_punch(self, req: cp.Punch, conn: Connection) -> cp.Count:
        rel, tr = self._resolve(req.file)
        if tr.lazy is not None and tr.lazy.absent.count:
            raise ControlError(f"{rel} has post-copy blocks still absent: not now")
        if tr.frozen:
            await self.registry.wait_thawed(tr)
        path = os.path.join(self.registry.backing, rel)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            length = max(0, min(req.length, size - req.offset))
            if length:
                await trio.to_thread.run_sync(punch_hole, fd, req.offset, length)
                # A write like any other (invariant 1), but no heat: heat orders the copy of
                # data, and a hole travels as a Zero run whatever its heat (a 1 TiB hole's
                # heat would be 128 MiB of it).
                tr.on_write(req.offset, length, heat=False)
        finally:
            os.close(fd)
        if length and self.invalidate is not None:
            await self.invalidate(tr.key)  # no cached page of the old data is served
        return cp.Count(1 if length else 0)

    async def op_written(self, req: cp.Written, conn: Connection) -> cp.Count:
        rel, tr = self._resolve(req.file)
        # Present blocks of a post-copy file may be written beside the mount (post-copy's
        # warm set arrives while lazy mode turns on); an absent one only through it, where
        # the write waits for the block's content first.
        lazy = tr.lazy
        if lazy is not None and any(lazy.absent.absent_in(o, n) for o, n in req.ranges if n):
            raise ControlError(f"{rel}: a write beside the mount into post-copy blocks still "
                               "absent; write it through the mount")
        if tr.frozen:
            await self.registry.wait_thawed(tr)
        marked = 0
        for offset, length in req.ranges:
            if length:
                tr.on_write(offset, length)  # a write like any other (invariant 1)
                marked += 1
        if marked and self.invalidate is not None:
            await self.invalidate(tr.key)  # no page cached before the write is served
        return cp.Count(marked)

    def op_claim(self, req: cp.Claim, conn: Connection) -> cp.Claimed:
        mine = {os.path.normpath(f) for f in req.files}
        for other, held in self.claims.items():
            if other is conn:
                continue
            theirs = {os.path.normpath(f) for f in held.files}
            both = sorted(mine & theirs) if mine and theirs else None
            if both is None:  # (one of them claims the whole mount)
                whose = "this one would take" if not mine else "that one holds"
                raise ControlError(f"{self.info.mountpoint} is taken by migration "
                                   f"{held.migration} ({held.holder}): one migration at a time "
                                   f"per VM, and {whose} the whole mount")
            if both:
                more = f" (and {len(both) - 1} more)" if len(both) > 1 else ""
                raise ControlError(f"{both[0]}{more} on {self.info.mountpoint} is taken by "
                                   f"migration {held.migration} ({held.holder}): one migration "
                                   "at a time per VM")
        self.claims[conn] = req
        return cp.Claimed(req.migration)

    # -- dispatch ------------------------------------------------------------------

    async def dispatch(self, req: cp.Request, conn: Connection | None = None) -> Any:
        """The reply to `req` (from `conn`: ops whose effect lasts as long as the
        connection, like a claim, need it), or the ControlError to answer."""
        try:
            result = OPS[type(req)](self, req, conn or Connection(0))
            if isinstance(result, Awaitable):
                result = await result
            return result
        except ControlError as exc:
            return exc
        except LazyError as exc:
            return ControlError(str(exc))
        except Exception as exc:
            log.exception("control request %s failed", req.OP)
            return ControlError(f"internal error: {exc!r} (see the daemon log)")


OPS: dict[type[cp.Request], Callable[[Controller, Any, Connection], Any]] = {
    cp.Info: Controller.op_info, cp.Status: Controller.op_status, cp.Dirty: Controller.op_dirty,
    cp.Clear: Controller.op_clear, cp.Heat: Controller.op_heat, cp.Freeze: Controller.op_freeze,
    cp.Thaw: Controller.op_thaw, cp.Spill: Controller.op_spill,
    cp.LazyBegin: Controller.op_lazy_begin, cp.LazyRefs: Controller.op_lazy_refs,
    cp.LazyInstall: Controller.op_lazy_install, cp.LazyWait: Controller.op_lazy_wait,
    cp.LazyReport: Controller.op_lazy_report, cp.LazySourceLost: Controller.op_lazy_source_lost,
    cp.LazyGiveUp: Controller.op_lazy_give_up, cp.LazyReattach: Controller.op_lazy_reattach,
    cp.Claim: Controller.op_claim, cp.Punch: Controller.op_punch,
    cp.Written: Controller.op_written,
}
assert set(OPS) == set(cp.OPS.values()), "every op of ctlproto has a handler"


async def private_unix_socket(path: str, backlog: int) -> Any:
    """A listening unix socket at `path` that only its owner (and root) may open: created
    0600 (no window with a wider mode), a stale socket of a dead process replaced. Also the
    migrator's control socket (migrator/steering.py)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # stale socket of a dead process; its caller's checks came first
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock


async def serve(controller: Controller, path: str, *, task_status: Any = None) -> None:
    """Listen on `path` (trio task; reports readiness through task_status)."""
    sock = await private_unix_socket(path, 16)
    owner = os.getuid()
    numbers = iter(range(1, 1 << 62))

    async def handle(stream: Any) -> None:
        conn = Connection(next(numbers))
        async with stream:
            try:
                uid = peer_uid(stream.socket)
                if uid not in (0, owner):
                    log.warning("control: refused uid %d (owner is %d)", uid, owner)
                    msg = f"permission denied: uid {uid} does not own this blkfs daemon"
                    await stream.send_all(cp.encode_reply(ControlError(msg)))
                    with trio.move_on_after(1):  # let the peer read the reason before we close
                        await stream.receive_some(cp.MAX_REQUEST)
                    return
                reader = cp.RequestReader()
                while not reader.closed:
                    data = await stream.receive_some(max(1 << 20, reader.wants()))
                    if not data:
                        return
                    reader.feed(data)
                    for req in reader:
                        reply = req if isinstance(req, ControlError) else (
                            await controller.dispatch(req, conn))
                        await stream.send_all(cp.encode_reply(reply))
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                return
            finally:
                controller.closed(conn)

    listener = trio.SocketListener(sock)
    if task_status is not None:
        task_status.started()
    try:
        await trio.serve_listeners(handle, [listener])
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


class AsyncControlClient:
    """The trio client (the migrator's engine, both sides): requests on one connection are
    answered in order, so a lock keeps each request and its reply together."""

    def __init__(self, stream: trio.SocketStream, path: str, timeout: float = 60.0) -> None:
        self.stream = stream
        self.path = path
        self.timeout = timeout  # for each call that names none
        self._buf = bytearray()
        self._lock = trio.Lock()
        self.broken = False

    @classmethod
    async def connect(cls, path: str, timeout: float = 60.0,
                      sndbuf: int | None = None) -> AsyncControlClient:
        """A connection to the control socket at `path` (errors as ControlClient's)."""
        try:
            stream = await trio.open_unix_socket(path)
        except OSError as exc:
            raise connect_error(path, exc) from None
        if sndbuf:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        return cls(stream, path, timeout)

    @classmethod
    async def for_mount(cls, mountpoint: str, sndbuf: int | None = None,
                        timeout: float = 60.0) -> AsyncControlClient:
        return await cls.connect(find_socket(mountpoint), timeout, sndbuf)

    async def call(self, req: cp.Request, timeout: float | None = None, *,
                   cancellable: bool = False) -> Any:
        """One request and its reply, `timeout` (default: the client's) at most, after which
        the connection is given up.

        By default not cut by cancellation halfway (the next reply would be taken for this
        one's): a cancelled caller waits for the reply first. With `cancellable`, for a
        request whose lost reply does no harm (the epochs of swaps tell a lost one), a
        cancellation ends the call at once and gives the connection up instead."""
        return (await self.call_many([req], timeout, cancellable=cancellable))[0]

    async def call_many(self, reqs: list[cp.Request], timeout: float | None = None, *,
                        cancellable: bool = False) -> list[Any]:
        """Several requests in one write, their replies in order: one round trip for all (the
        last swap of every file of a VM, in the downtime). If any is refused, every reply is
        still read, then the first refusal raised."""
        timeout = self.timeout if timeout is None else timeout
        replies: list[tuple[bytes, bytes]] = []
        async with self._lock:
            if self.broken:
                raise ControlError(f"the connection to the blkfs daemon on {self.path} was "
                                   "given up")
            try:
                with trio.CancelScope(shield=not cancellable), trio.fail_after(timeout):
                    await self.stream.send_all(b"".join(cp.encode_request(r) for r in reqs))
                    while len(replies) < len(reqs):
                        while (len(replies) < len(reqs)
                               and (reply := cp.take_reply(self._buf)) is not None):
                            replies.append(reply)
                        if len(replies) == len(reqs):
                            break
                        chunk = await self.stream.receive_some(1 << 20)
                        if not chunk:
                            raise ControlError(f"the blkfs daemon on {self.path} closed the "
                                               "connection (did it crash?)")
                        self._buf += chunk
            except trio.TooSlowError:
                self.broken = True
                raise ControlError(f"the blkfs daemon on {self.path} did not answer "
                                   f"{reqs[len(replies)].OP} within {timeout:g} s") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self.broken = True
                raise ControlError(f"talking to the blkfs daemon on {self.path}: {exc}"
                                   ) from None
            except trio.Cancelled:
                self.broken = True  # its reply may still come, and be taken for the next one's
                raise
        await trio.lowlevel.checkpoint()  # a cancellation that came meanwhile lands here
        out: list[Any] = []
        refused: ControlError | None = None
        for (line, data), req in zip(replies, reqs, strict=True):
            try:
                out.append(cp.decode_reply(line, req, data))
            except ControlError as exc:
                refused = refused or exc
                out.append(exc)
        if refused is not None:
            raise refused
        return out

    def close(self) -> None:
        """Close at once (no checkpoint): for cleanup code that cannot await."""
        self.stream.socket.close()

    async def aclose(self) -> None:
        await self.stream.aclose()
