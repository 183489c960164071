"""The control socket: a Unix stream socket speaking newline-delimited JSON.

Request ``{"op": "dirty", "file": "disk.raw", "swap": true}``; answer
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``.

Only the daemon's owner and root may talk to it (invariant 6): the socket is
0600 inside a 0700 runtime directory, and every connection's peer
credentials (SO_PEERCRED) are checked before anything is read.

The server runs in the daemon's trio loop, on the same thread as the FUSE
handlers, so an op sees the trackers between two handler steps, never in the
middle of one.  The client is plain blocking sockets, for CLIs and scripts.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import logging
import os
import socket
import stat
import struct
import time
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import trio

from .runtime import DaemonInfo, mount_fstype

if TYPE_CHECKING:
    from .fs import BlkFS
    from .tracker import FileTracker

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20  # bytes in one request line
MAX_DATA = 16 << 20  # bytes of binary payload after a request line ("data_len")
LAZY_WAIT_MAX = 5.0  # seconds a lazy_wait long poll may hold the connection
HOTTEST = 5


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


class ControlError(Exception):
    """A request the daemon refused, with a message meant for the user."""


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class Controller:
    """The ops of the control socket, over a BlkFS instance."""

    def __init__(self, fs: BlkFS, info: DaemonInfo) -> None:
        self.fs = fs
        self.info = info

    # -- helpers -------------------------------------------------------------

    def _resolve(self, rel: Any) -> tuple[str, FileTracker]:
        if not isinstance(rel, str) or not rel:
            raise ControlError("a FILE relative to the mount is required")
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts:
            raise ControlError(f"{rel!r}: give the file relative to the mount, without '..'")
        if p.parts and p.parts[0] == ".blkfs":
            raise ControlError(f"no such file {rel!r} under {self.info.mountpoint}")
        backing = self.fs.backing
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
        return relpath, self.fs.tracker_for((st.st_dev, st.st_ino), st, relpath)

    def _need_tracking(self) -> None:
        if not self.fs.tracking:
            raise ControlError(
                f"{self.info.mountpoint} is mounted with --no-tracking: "
                "remount without it to track writes"
            )

    def _threshold(self, args: dict[str, Any]) -> float:
        t = args.get("static_heat")
        if t is None:
            return self.fs.static_heat
        if not isinstance(t, (int, float)) or t < 0:
            raise ControlError("static_heat must be a number >= 0")
        return float(t)

    def _trackers(self, files: Any) -> list[FileTracker] | None:
        if files is None or files == []:
            return None
        if not isinstance(files, list):
            raise ControlError("files must be a list of paths")
        return [self._resolve(f)[1] for f in files]

    # -- ops -----------------------------------------------------------------

    def op_info(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "mountpoint": self.info.mountpoint,
            "backing": self.fs.backing,
            "block_size": 1 << self.fs.shift,
            "tracking": self.fs.tracking,
            "half_life": self.fs.half_life,
            "static_heat": self.fs.static_heat,
            "frozen_all": self.fs.frozen_all,
            "faults": self.fs.faults,
        }

    def op_status(self, args: dict[str, Any]) -> dict[str, Any]:
        threshold = self._threshold(args)
        self.fs.settle_heat()
        now = time.monotonic()
        files = []
        for rel, st, tr in self.fs.tracked_files():
            entry: dict[str, Any] = {"file": rel, "size": st.st_size}
            if tr is not None:
                static, dynamic = tr.heat.split(tr.nblocks, threshold, now)
                entry.update(
                    block_size=tr.block_size,
                    blocks=tr.nblocks,
                    epoch=tr.bitmap.epoch,
                    dirty=tr.bitmap.count(),
                    static=static,
                    dynamic=dynamic,
                    hottest=[[b, round(h, 3)] for b, h in tr.heat.hottest(HOTTEST, now)],
                    writes=tr.writes,
                    frozen=tr.frozen,
                    restored=tr.restored,
                )
            files.append(entry)
        return {**self.op_info(args), "static_heat": threshold, "files": files}

    def op_dirty(self, args: dict[str, Any]) -> dict[str, Any]:
        rel, tr = self._resolve(args.get("file"))
        if args.get("swap"):
            epoch, exts = tr.swap()
        else:
            epoch, exts = tr.bitmap.epoch, tr.dirty_extents()
        return {
            "file": rel,
            "epoch": epoch,
            "block_size": tr.block_size,
            "size": tr.size,
            "extents": [list(e) for e in exts],
        }

    def op_clear(self, args: dict[str, Any]) -> dict[str, Any]:
        """Clear the dirty marks of some blocks before reading them (see FileTracker.clear)."""
        rel, tr = self._resolve(args.get("file"))
        exts = args.get("extents")
        if not isinstance(exts, list) or not all(
            isinstance(e, list) and len(e) == 2 and all(type(x) is int and x >= 0 for x in e)
            for e in exts
        ):
            raise ControlError("extents must be a list of [first_block, count] pairs")
        tr.clear([(f, c) for f, c in exts])
        return {"file": rel, "epoch": tr.bitmap.epoch}

    def op_heat(self, args: dict[str, Any]) -> dict[str, Any]:
        rel, tr = self._resolve(args.get("file"))
        threshold = self._threshold(args)
        now = time.monotonic()
        tr.settle_heat(now)
        static, dynamic = tr.heat.split_extents(tr.nblocks, threshold, now)
        return {
            "file": rel,
            "block_size": tr.block_size,
            "blocks": tr.nblocks,
            "half_life": self.fs.half_life,
            "static_heat": threshold,
            "static": sum(c for _, c in static),
            "dynamic": sum(c for _, c in dynamic),
            "static_extents": [list(e) for e in static],
            "dynamic_extents": [list(e) for e in dynamic],
            "heat": [list(e) for e in tr.heat.extents(now)],
        }

    def op_freeze(self, args: dict[str, Any]) -> dict[str, Any]:
        self._need_tracking()
        return {"frozen": self.fs.freeze(self._trackers(args.get("files")))}

    def op_thaw(self, args: dict[str, Any]) -> dict[str, Any]:
        self._need_tracking()
        return {"thawed": self.fs.thaw(self._trackers(args.get("files")))}

    # -- spill area and post-copy (docs/spill.md) ---------------------------------

    def op_spill(self, args: dict[str, Any]) -> dict[str, Any]:
        from .spill import SpillArea, SpillError

        path = self.fs.spill_dir
        if not path:
            raise ControlError(f"{self.info.mountpoint} has no spill area: mount with --spill DIR, "
                               "or start a post-copy migration")
        try:
            area = SpillArea.open(path)
        except SpillError as exc:
            return {"path": path, "exists": False, "error": str(exc)}
        try:
            out: dict[str, Any] = {"exists": True, **area.summary()}
            if args.get("slots"):
                out["slot_headers"] = [
                    [i, h.file_id, h.block, h.generation, h.flags]
                    for i, h in enumerate(area.scan()) if h.generation]
        finally:
            area.close()
        pc = self.fs.postcopy
        if pc is not None:
            out["postcopy"] = {"migration": pc.migration, **pc.report()}
        return out

    def _postcopy(self) -> Any:
        pc = self.fs.postcopy
        if pc is None:
            raise ControlError("no post-copy is running on this mount")
        return pc

    async def op_lazy_begin(self, args: dict[str, Any]) -> dict[str, Any]:
        """{migration, block_size, spill, files: [{file_id, file, extents}]}"""
        from .spill import SpillError

        files = args.get("files")
        if not isinstance(files, list) or not files:
            raise ControlError("files must be a non-empty list")
        todo = []
        for f in files:
            if not isinstance(f, dict) or type(f.get("file_id")) is not int:
                raise ControlError("each file needs file_id, file and extents")
            rel, tr = self._resolve(f.get("file"))
            exts = f.get("extents")
            if not isinstance(exts, list) or not all(
                    isinstance(e, list) and len(e) == 2 and all(type(x) is int and x >= 0
                                                                 for x in e) for e in exts):
                raise ControlError("extents must be a list of [first_block, count] pairs")
            todo.append((f["file_id"], rel, tr, [(a, b) for a, b in exts]))
        try:
            pc = await self.fs.begin_postcopy(str(args.get("migration")),
                                              int(args.get("block_size", 0)),
                                              args.get("spill"), todo)
        except (ValueError, SpillError) as exc:
            raise ControlError(str(exc)) from None
        return {"remaining": pc.remaining}

    def op_lazy_refs(self, args: dict[str, Any], data: bytes = b"") -> dict[str, Any]:
        """Spill refs as binary (file_id u32, block u64, slot u32, generation u64), big-endian."""
        pc = self._postcopy()
        if len(data) % _REF.size:
            raise ControlError(f"refs payload of {len(data)} bytes is not {_REF.size}-byte records")
        try:
            pc.add_refs(list(_REF.iter_unpack(data)))
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        return {"remaining": pc.remaining}

    def op_lazy_install(self, args: dict[str, Any], data: bytes = b"") -> dict[str, Any]:
        pc = self._postcopy()
        file_id, first = args.get("file_id"), args.get("first_block")
        if type(file_id) is not int or type(first) is not int or first < 0:
            raise ControlError("lazy_install needs file_id and first_block")
        try:
            n = pc.install_fetched(file_id, first, data)
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        return {"installed": n, "remaining": pc.remaining}

    async def op_lazy_wait(self, args: dict[str, Any]) -> dict[str, Any]:
        t = args.get("timeout", 1.0)
        if not isinstance(t, (int, float)) or not 0 <= t <= LAZY_WAIT_MAX:
            raise ControlError(f"timeout must be 0..{LAZY_WAIT_MAX} s")
        return await self._postcopy().wait_news(float(t))

    def op_lazy_report(self, args: dict[str, Any]) -> dict[str, Any]:
        pc = self._postcopy()
        out = pc.report()
        if args.get("digests"):
            out["digests"] = pc.digests()
        return out

    async def op_lazy_source_lost(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self._postcopy().lose_source()

    # -- dispatch ------------------------------------------------------------------

    async def dispatch(self, line: bytes, data: bytes = b"",
                       req: Any = None) -> dict[str, Any]:
        try:
            if req is None:
                req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise ControlError('a request is a JSON object with an "op" string')
            fn = getattr(self, "op_" + req["op"], None)
            if fn is None:
                raise ControlError(f"unknown op {req['op']!r}")
            if req["op"] in _DATA_OPS:
                result = fn(req, data)
            elif data:
                raise ControlError(f"op {req['op']!r} takes no data")
            else:
                result = fn(req)
            if inspect.isawaitable(result):
                result = await result
            return {"ok": True, "result": result}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except ValueError:
            return {"ok": False, "error": "request is not valid JSON"}
        except Exception as exc:
            log.exception("control request %r failed", line[:200])
            return {"ok": False, "error": f"internal error: {exc!r} (see the daemon log)"}


_DATA_OPS = {"lazy_refs", "lazy_install"}
_REF = struct.Struct(">IQIQ")  # a spill ref in lazy_refs: file_id, block, slot, generation


def pack_refs(refs: list[tuple[int, int, int, int]]) -> bytes:
    return b"".join(_REF.pack(*r) for r in refs)


def _request(line: bytes) -> tuple[Any, int]:
    """The parsed request (None if not JSON) and the payload bytes that follow it."""
    try:
        req = json.loads(line)
    except ValueError:
        return None, 0
    n = req.get("data_len", 0) if isinstance(req, dict) else 0
    return req, n if type(n) is int and 0 <= n <= MAX_DATA else 0


async def serve(controller: Controller, path: str, *, task_status: Any = None) -> None:
    """Listen on `path` (trio task; reports readiness through task_status)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # stale socket of a dead daemon; the mount check came first
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    owner = os.getuid()

    async def handle(stream: Any) -> None:
        async with stream:
            try:
                uid = peer_uid(stream.socket)
                if uid not in (0, owner):
                    log.warning("control: refused uid %d (owner is %d)", uid, owner)
                    msg = f"permission denied: uid {uid} does not own this blkfs daemon"
                    await stream.send_all(json.dumps({"ok": False, "error": msg}).encode() + b"\n")
                    with trio.move_on_after(1):  # let the peer read the reason before we close
                        await stream.receive_some(MAX_REQUEST)
                    return
                buf = b""
                while True:
                    data = await stream.receive_some(1 << 20)
                    if not data:
                        return
                    buf += data
                    while b"\n" in buf:
                        line, rest = buf.split(b"\n", 1)
                        req, need = _request(line)
                        if len(rest) < need:  # a binary payload follows the line
                            acc = bytearray(rest)
                            while len(acc) < need:
                                more = await stream.receive_some(max(need - len(acc), 65536))
                                if not more:
                                    return
                                acc += more
                            rest = bytes(acc)
                        payload, buf = rest[:need], rest[need:]
                        reply = await controller.dispatch(line, payload, req)
                        await stream.send_all(json.dumps(reply).encode() + b"\n")
                    if len(buf) > MAX_REQUEST:
                        await stream.send_all(
                            json.dumps({"ok": False, "error": "request too large"}).encode() + b"\n"
                        )
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                return

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


# -- client ---------------------------------------------------------------------------


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
    if fstype != "fuse.blkfs":
        raise DaemonNotRunning(f"{mountpoint} is a {fstype} mount, not blkfs")
    info = DaemonInfo.find(mnt)
    if info is None or not info.alive():
        raise DaemonNotRunning(
            f"the blkfs daemon of {mountpoint} is not running (crashed?): "
            f"run 'fusermount3 -u {mountpoint}', then mount it again"
        )
    return info.control


class ControlClient:
    """Blocking client: one connection, one request at a time."""

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise DaemonNotRunning(f"no blkfs daemon answers on {path}: is it still running? "
                                   "(look for blkfs in ps; remount if it died)") from None
        except PermissionError:
            self.sock.close()
            raise ControlError(
                f"permission denied on {path}: only the daemon's owner and root may use it"
            ) from None
        self._buf = b""

    @classmethod
    def for_mount(cls, mountpoint: str, timeout: float = 60.0) -> ControlClient:
        return cls(find_socket(mountpoint), timeout)

    def call(self, op: str, data: bytes = b"", **args: Any) -> Any:
        if data:
            args["data_len"] = len(data)
        try:
            self.sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n" + data)
            while b"\n" not in self._buf:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise ControlError(f"the blkfs daemon on {self.path} closed the connection")
                self._buf += data
        except OSError as exc:
            raise ControlError(f"talking to the blkfs daemon on {self.path}: {exc}") from None
        line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "unknown error"))
        return reply["result"]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
