"""`migrator serve`: the destination side.

It writes the blocks it receives into the files under its blkfs mount, keeps
an xxh3 digest of every block it wrote, runs the resume hook when the source
commits, and compares its digests with the source's after the resume (so the
check costs no downtime).

A migration's files are listed in ``<mount>/.migration-state.json``, written
(and fsynced) *before* any file is touched, with ``"status": "incomplete"``;
only a verified migration turns it to ``"complete"``.  Anything else — abort,
crash, kill -9, disk full — leaves it incomplete (invariant 3).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import trio
import xxhash

from . import protocol as p
from .postcopy import DestPostcopy
from .qemu import QemuError, QemuTarget
from .qmp import QMPError
from .transport import IO_TIMEOUT, Channel, MigrationError, PeerAborted, leaf

log = logging.getLogger(__name__)

STATE_NAME = ".migration-state.json"


class VerificationFailed(MigrationError):
    pass


RESERVED = {STATE_NAME, ".blkfs"}
THREAD_WRITE = 1 << 20  # writes at least this large go to a worker thread


def state_path(mount: str) -> str:
    return os.path.join(mount, STATE_NAME)


def read_state(mount: str) -> dict[str, Any] | None:
    try:
        with open(state_path(mount)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _write_state(mount: str, state: dict[str, Any]) -> None:
    path = state_path(mount)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _File:
    entry: p.FileEntry
    path: str
    fd: int
    size: int
    digests: dict[int, int] = field(default_factory=dict)
    verified: int = 0


class DestSession:
    """One incoming migration on an authenticated channel."""

    def __init__(self, mount: str, ch: Channel, resume_cmd: str | None,
                 spill_override: str | None = None, qemu_spec: str | None = None) -> None:
        self.mount = os.path.realpath(mount)
        self.ch = ch
        self.resume_cmd = resume_cmd
        self.qemu_spec = qemu_spec
        self.qemu: QemuTarget | None = None
        self._qemu_ready = trio.Event()
        self.device_state = bytearray()
        self.spill_override = spill_override
        self.pc: DestPostcopy | None = None  # once the source announced post-copy
        self.committed = False
        self.resumed = False  # the resume hook returned: the VM runs here now
        self._nursery: trio.Nursery | None = None
        self.files: dict[int, _File] = {}
        self.block_size = 0
        self.state: dict[str, Any] = {}
        self.mismatches: list[str] = []  # the first few, for the message
        self.mismatch_count = 0
        self.blocks_written = 0
        self.t_switch: float | None = None

    # -- setup ------------------------------------------------------------------

    def _target(self, name: str) -> str:
        """The path for a manifest name: inside the mount, never a reserved name."""
        parts = name.split("/")
        if parts[0] in RESERVED:
            raise MigrationError(f"refusing file name {name!r}: reserved on the destination")
        full = os.path.realpath(os.path.join(self.mount, name))
        if os.path.commonpath([full, self.mount]) != self.mount or full == self.mount:
            raise MigrationError(f"refusing file name {name!r}: it leads outside {self.mount}")
        return full

    def _check_space(self, man: p.Manifest, targets: list[str]) -> None:
        need = 0
        for f, path in zip(man.files, targets, strict=True):
            try:
                have = os.stat(path).st_blocks * 512
            except FileNotFoundError:
                have = 0
            need += max(0, f.size - have)
        sv = os.statvfs(self.mount)
        free = sv.f_bavail * sv.f_frsize
        if need > free:
            raise MigrationError(f"destination disk full: the migration needs {need} more bytes, "
                                 f"{self.mount} has {free} free")

    def open_files(self, man: p.Manifest, peer: str) -> None:
        targets = [self._target(f.name) for f in man.files]
        self._check_space(man, targets)
        self.block_size = man.block_size
        self.state = {
            "migration": str(uuid.uuid4()),
            "status": "incomplete",
            "source": peer,
            "started_at": time.time(),
            "files": [{"name": f.name, "size": f.size} for f in man.files],
        }
        _write_state(self.mount, self.state)  # before any file is touched
        for f, path in zip(man.files, targets, strict=True):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_DIRECT, 0o600)
            os.ftruncate(fd, f.size)
            self.files[f.file_id] = _File(f, path, fd, f.size)

    def close_files(self) -> None:
        for f in self.files.values():
            os.close(f.fd)
        self.files.clear()

    # -- data -------------------------------------------------------------------

    def write_blocks(self, ev: p.Blocks) -> None:
        f = self.files[ev.file_id]
        bs = self.block_size
        try:
            os.pwrite(f.fd, ev.data, ev.first_block * bs)
        except OSError as exc:
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise MigrationError(f"destination disk full writing {f.entry.name}") from None
            raise MigrationError(f"cannot write {f.entry.name}: {exc.strerror}") from None
        mv = memoryview(ev.data)
        h = xxhash.xxh3_64_intdigest
        for i in range(0, len(mv), bs):
            f.digests[ev.first_block + i // bs] = h(mv[i:i + bs])
        self.blocks_written += (len(mv) + bs - 1) // bs

    def resize(self, ev: p.Resize) -> None:
        f = self.files[ev.file_id]
        os.ftruncate(f.fd, ev.size)
        f.size = ev.size
        nblocks = (ev.size + self.block_size - 1) // self.block_size
        for b in [b for b in f.digests if b >= nblocks]:
            del f.digests[b]
        if ev.size % self.block_size and nblocks - 1 in f.digests:
            del f.digests[nblocks - 1]  # its tail changed: the source resends it

    def _mismatch(self, text: str) -> None:
        self.mismatch_count += 1
        if len(self.mismatches) < 5:
            self.mismatches.append(text)

    def check_digests(self, ev: p.Digests) -> None:
        f = self.files[ev.file_id]
        for i, d in enumerate(ev.digests):
            b = ev.first_block + i
            mine = f.digests.get(b)
            if mine != d:
                self._mismatch(f"{f.entry.name} block {b} "
                               + ("never received" if mine is None else "differs"))
            f.verified += 1

    def verdict(self) -> tuple[bool, str]:
        for f in self.files.values():
            nblocks = (f.size + self.block_size - 1) // self.block_size
            if f.verified != nblocks:
                self._mismatch(f"{f.entry.name}: {f.verified} of {nblocks} blocks checked")
        n = self.mismatch_count
        more = f" (+{n - len(self.mismatches)} more)" if n > len(self.mismatches) else ""
        return n == 0, "; ".join(self.mismatches) + more

    async def _fsync_all(self) -> None:
        for f in self.files.values():
            await trio.to_thread.run_sync(os.fsync, f.fd)

    async def _start_qemu(self) -> None:
        """The waiting QEMU opens its files now, long before the switchover needs it."""
        assert self.qemu is not None
        try:
            await trio.to_thread.run_sync(self.qemu.start)
        except (QemuError, QMPError) as exc:
            # Abort now, long before the source stops its VM.
            raise MigrationError(f"destination QEMU: {exc}") from None
        finally:
            self._qemu_ready.set()

    async def _resume(self) -> None:
        if self.qemu is not None:
            await self._qemu_ready.wait()  # (a failed start has aborted the session)
            try:
                await trio.to_thread.run_sync(self.qemu.incoming, bytes(self.device_state))
            except QemuError as exc:
                raise MigrationError(f"destination QEMU: {exc}") from None
            return
        if not self.resume_cmd:
            return
        env = dict(os.environ, MIGRATOR_MOUNT=self.mount)
        r = await trio.run_process(["sh", "-c", self.resume_cmd], env=env, check=False,
                                   capture_stdout=True, capture_stderr=True)
        if r.returncode != 0:
            msg = (r.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
            raise MigrationError(f"the resume command failed (exit {r.returncode}): {msg}")

    # -- the session ----------------------------------------------------------------

    async def run(self, peer: str) -> dict[str, Any]:
        ch = self.ch
        await ch.handshake()
        man = await ch.expect(p.Manifest)
        self.open_files(man, peer)
        await ch.send(p.Ready())
        if self.qemu_spec:
            try:
                self.qemu = QemuTarget(self.qemu_spec, self.mount)
            except QemuError as exc:
                raise MigrationError(str(exc)) from None
        log.info("migration %s from %s: %d files", self.state["migration"], peer, len(man.files))
        # The receiver stays up to a few frames ahead of the writer, so network
        # reads and file writes overlap; the writer handles events in order.
        tx, rx = trio.open_memory_channel[Any](4)

        async def receiver() -> None:
            async with tx:
                while True:
                    ev = await ch.receive()
                    await tx.send(ev)
                    if isinstance(ev, p.Done):
                        return

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.qemu is not None:
                nursery.start_soon(self._start_qemu)
            nursery.start_soon(receiver)
            async with rx:
                async for ev in rx:
                    await self._handle(ev)
        return self.state

    async def _resume_postcopy(self) -> None:
        """The resume hook runs while the post-copy traffic flows (the VM reads absent pages
        while it starts)."""
        assert self.pc is not None
        t = time.monotonic()
        with trio.CancelScope(shield=True):  # a lost source must not leave the hook half-run
            await self._resume()
        log.info("resume hook: %.1f ms", (time.monotonic() - t) * 1000)
        self.resumed = True  # the VM runs here now, whatever happens to the source
        self.pc.resumed.set()
        ms = (time.monotonic() - self.t_switch) * 1000 if self.t_switch else 0.0
        await self.ch.send(p.Resumed(ms))

    async def finish_without_source(self, why: str) -> tuple[bool, str]:
        """The source is gone after the resume: complete from the spill area, or say what is
        missing.  Returns (complete, message)."""
        assert self.pc is not None
        out = await self.pc.source_lost()
        self._merge_digests()
        n = out["missing_count"]
        self.state["postcopy"] = self.pc.report
        if n == 0:
            self.state.update(status="complete", completed_at=time.time(),
                              verified="post-copy pages checked against the spill hashes; "
                              f"the source was lost before the final digests ({why})")
            _write_state(self.mount, self.state)
            return True, (f"source lost ({why}); completed from the spill area alone "
                          f"({out['found_in_spill']} pages found there)")
        missing = out["missing"]
        shown = ", ".join(f"{rel} block {b}" for rel, b in missing[:10])
        more = f" (+{n - 10} more)" if n > 10 else ""
        self.state.update(status="incomplete", error=f"source lost ({why})",
                          missing_blocks=[[rel, b] for rel, b in missing], missing_count=n)
        _write_state(self.mount, self.state)
        return False, (f"source lost ({why}) before every page reached the spill area: "
                       f"{n} blocks missing: {shown}{more}; reads of them fail with EIO, "
                       "everything else is served")

    def _merge_digests(self) -> None:
        assert self.pc is not None
        for fid, b, d in self.pc.digests:
            f = self.files.get(fid)
            if f is not None:
                f.digests[b] = d

    def _begin_lazy(self) -> None:
        """Every Absent is in (they come right after Postcopy): turn lazy mode on while the
        disks' last set still flows."""
        assert self.pc is not None and self._nursery is not None
        self.pc.begin_started = True
        names = {fid: os.path.relpath(f.path, self.mount) for fid, f in self.files.items()}
        self._nursery.start_soon(self.pc.begin, names)

    async def _handle(self, ev: Any) -> None:
        ch = self.ch
        if (self.pc is not None and not self.pc.begin_started
                and not isinstance(ev, (p.Postcopy, p.Absent))):
            self._begin_lazy()
        if isinstance(ev, p.Blocks) and self.committed:
            assert self.pc is not None and self._nursery is not None
            # A fetched block, for a read that waits: into lazy mode (not through the
            # mount), without waiting for it here.
            self._nursery.start_soon(self.pc.install, ev)
        elif isinstance(ev, p.Blocks):
            if len(ev.data) >= THREAD_WRITE:
                await trio.to_thread.run_sync(self.write_blocks, ev)
            else:  # a thread hop costs more than a small write
                self.write_blocks(ev)
        elif isinstance(ev, p.Resize):
            self.resize(ev)
        elif isinstance(ev, p.DeviceState):
            if self.qemu is None:
                raise MigrationError("the source sends a QEMU device state: run 'migrator serve' "
                                     "with --resume qemu:CMDLINE_FILE|QMP_SOCKET")
            self.device_state += ev.data
        elif isinstance(ev, p.Postcopy):
            self.pc = DestPostcopy(self.mount, ch, ev, self.block_size, self.spill_override)
            self.pc.on_digests = self._merge_digests
            assert self._nursery is not None
            self._nursery.start_soon(self.pc.prepare)
        elif isinstance(ev, p.Absent):
            assert self.pc is not None
            self.pc.add_absent(ev)
        elif isinstance(ev, p.SpillRefs):
            assert self.pc is not None
            await self.pc.refs(ev)
        elif isinstance(ev, p.SpillFlushed):
            log.info("source: spill flushed (%d pages)", ev.pages)
        elif isinstance(ev, p.RoundDone):
            await ch.send(p.RoundAck(ev.round))
        elif isinstance(ev, p.Switchover):
            self.t_switch = time.monotonic()
        elif isinstance(ev, p.Commit) and self.pc is not None:
            self.committed = True
            t = time.monotonic()
            await self.pc.begun.wait()  # before the VM can read anything
            log.info("commit %.1f ms after switchover; lazy mode on after %.1f ms more",
                     (t - (self.t_switch or t)) * 1000, (time.monotonic() - t) * 1000)
            assert self._nursery is not None
            self._nursery.start_soon(self.pc.pump)
            self._nursery.start_soon(self._resume_postcopy)
        elif isinstance(ev, p.Commit):
            # No fsync here: it would lengthen the downtime; files are made
            # durable before the migration is marked complete.
            await self._resume()
            self.resumed = True
            ms = (time.monotonic() - self.t_switch) * 1000 if self.t_switch else 0.0
            await ch.send(p.Resumed(ms))
        elif isinstance(ev, p.Digests):
            self.check_digests(ev)
        elif isinstance(ev, p.VerifyDone):
            if self.pc is not None:
                self.state["postcopy"] = self.pc.report
            await self._fsync_all()
            ok, detail = self.verdict()
            if ok:
                self.state.update(status="complete", completed_at=time.time())
                _write_state(self.mount, self.state)
            await ch.send(p.Verified(ok, self.mismatch_count, detail))
            if not ok:
                raise VerificationFailed(f"verification failed: {detail}")


async def serve_one(stream: trio.SocketStream, mount: str, key: bytes,
                    resume_cmd: str | None, lock: trio.Lock, io_timeout: float,
                    spill: str | None = None, qemu: str | None = None) -> bool:
    """Handle one connection; True when a migration completed."""
    try:
        peer = "{}:{}".format(*stream.socket.getpeername()[:2])
    except OSError:
        peer = "?"
    ch = Channel(stream, "dest", key, io_timeout=io_timeout)
    if lock.locked():
        await ch.abort("the destination is busy with another migration")
        await ch.aclose()
        return False
    async with lock:
        session = DestSession(mount, ch, resume_cmd, spill, qemu)
        try:
            state = await session.run(peer)
            log.info("migration %s complete: %d blocks written", state["migration"],
                     session.blocks_written)
            print(f"migrator serve: migration from {peer} complete and verified "
                  f"({len(session.files)} files)", flush=True)
            if session.qemu is not None and session.qemu.pid:
                print(f"migrator serve: the guest runs in QEMU pid {session.qemu.pid} (QMP and "
                      f"log in {session.qemu.dir})", flush=True)
            return True
        except BaseException as group:
            exc = leaf(group)
            if not isinstance(exc, (MigrationError, p.ProtocolError, OSError)):
                raise
            msg = str(exc) if not isinstance(exc, OSError) else f"I/O error: {exc}"
            if not isinstance(exc, PeerAborted):
                await ch.abort(msg)
            if session.qemu is not None and not session.resumed:
                session.qemu.abort()  # before cont: the source's QEMU goes on (invariant 3)
            if (session.pc is not None and session.resumed
                    and not isinstance(exc, VerificationFailed)):
                # After the resume the VM runs here: never roll back; finish what we can.
                try:
                    ok, text = await session.finish_without_source(msg)
                except (MigrationError, OSError) as exc2:
                    ok, text = False, f"{msg}; and completing from the spill failed: {exc2}"
                print(f"migrator serve: migration from {peer}: {text}", flush=True)
                return ok
            if session.state:
                session.state.update(status="incomplete", error=msg)
                try:
                    _write_state(session.mount, session.state)
                except OSError:
                    log.exception("cannot update the migration state")
            print(f"migrator serve: migration from {peer} failed: {msg}; the files stay marked "
                  "incomplete", flush=True)
            return False
        finally:
            if session.qemu is not None:
                session.qemu.detach()
            session.close_files()
            if session.pc is not None:
                await session.pc.aclose()
            await ch.aclose()


async def serve(mount: str, host: str, port: int, key: bytes, resume_cmd: str | None,
                once: bool, io_timeout: float = IO_TIMEOUT,
                task_status: Any = trio.TASK_STATUS_IGNORED, spill: str | None = None,
                qemu: str | None = None) -> bool:
    """Accept migrations until cancelled; with `once`, one and return whether it completed."""
    lock = trio.Lock()
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise MigrationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = listeners[0].socket.getsockname()[1]
    task_status.started(bound)
    print(f"migrator serve: listening on {host}:{bound}, writing into {mount}", flush=True)
    completed = False

    async def accept_loop(ln: trio.SocketListener, nursery: trio.Nursery) -> None:
        nonlocal completed
        async with ln:
            while True:
                stream = await ln.accept()
                if once:
                    completed = await serve_one(stream, mount, key, resume_cmd, lock, io_timeout,
                                                spill, qemu)
                    nursery.cancel_scope.cancel()
                    return
                nursery.start_soon(serve_one, stream, mount, key, resume_cmd, lock, io_timeout,
                                   spill, qemu)

    async with trio.open_nursery() as nursery:
        for ln in listeners:
            nursery.start_soon(accept_loop, ln, nursery)
    return completed
