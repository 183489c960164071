"""`migrator serve`: the connections, and how each session ends.

A serve accepts connection after connection; each proves the shared key first
(`Handshakes` bounds the strangers), then one `DestSession` (dest.py) at a time runs on
the mount (`Sessions`: who gives way to whom). How a session ended, in words for the
operator, is a `SessionOutcome`; a failed one never leaves two VMs (`_failed`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from blkfs import ctlproto as cp

from . import digestlog, lineage
from . import protocol as p
from .dest import DestSession, SessionOutcome
from .errors import (
    KeyMismatch,
    MigrationError,
    PeerAborted,
    PeerMismatch,
    VerificationFailed,
    first_error,
)
from .handoff import Refused
from .ownership import OWNER, DestStatus, ReplicaProgress
from .quiet import RepeatedLines
from .stores import DestFiles, MountDest
from .transport import IO_TIMEOUT, Channel

log = logging.getLogger(__name__)

MAX_HANDSHAKES = 128  # connections at once that have not proved the key (the oldest goes)


@dataclass
class ServeOptions:
    mount: str
    key: bytes
    resume_cmd: str | None = None
    io_timeout: float = IO_TIMEOUT
    spill: str | None = None  # where this host sees the spill area (default: as announced)
    qemu: str | None = None  # --resume qemu:SPEC
    say: Callable[[str], None] = field(default=lambda text: None)  # one line for the operator
    force: bool = False  # overwrite the files of a VM that runs here
    open_files: Callable[[str, bool], DestFiles] = field(default=MountDest)
    resume_hook: Callable[[], Awaitable[None]] | None = None  # in place of resume_cmd (tests)
    plaintext: bool = False  # --insecure-plaintext: frames in clear after the handshake


class Sessions:
    """The sessions a serve runs at once: any number, one per VM (the daemon's claims hold
    each VM's files), or one at all with `limit` 1 (`--once`, or a serve whose resume starts
    one QEMU command line); which ones, so the source of a session that lost its own can
    take its place."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.running: list[DestSession] = []
        self.started = 0  # sessions let in so far
        self.giving_way: dict[str, trio.Event] = {}  # migration -> set once its session left

    def refusal(self, first: object) -> p.Abort | None:
        """The Abort that refuses a peer whose first frame is `first` now, or None to let it
        in. A Reattach of a running session's migration is let in while that session waits
        for its lost source (which gives way), and told STILL_RUNNING while it still runs; a
        Manifest of a VM that a session runs for is refused, and any past the limit."""
        if isinstance(first, p.Reattach):
            for cur in self.running:
                if cur.migration == first.migration:
                    if cur.waiting_for_source is None:
                        return p.Abort("the destination is still running this migration's "
                                       "first session", code=p.AbortCode.STILL_RUNNING)
                    cur.waiting_for_source.cancel()
                    self.giving_way.setdefault(cur.migration, trio.Event())
                    return None
        vm = first.vm if isinstance(first, p.Manifest) else None
        for cur in self.running:
            if cur.replica and (self.limit == 1 or (vm is not None and cur.vm_id == vm)):
                source = cur.dest_record.source if cur.dest_record is not None else "?"
                return p.Abort(f"the destination is busy: migrator sync from {source} keeps "
                               "a replica there; stop it first (the migration then starts "
                               "from the replica)")
            if vm and cur.vm_id == vm:
                return p.Abort(f"the destination is busy with another migration of VM "
                               f"{cur.vm_name or vm}")
        if self.limit is not None and len(self.running) >= self.limit:
            return p.Abort("the destination is busy with another migration")
        return None


class Handshakes:
    """Connections that have not proved the shared key yet, oldest first. Past `limit` the
    oldest is dropped: idle or slow strangers cannot pile up descriptors, nor keep a real
    source out (it is the newest when it connects, and proves the key in milliseconds)."""

    def __init__(self, limit: int = MAX_HANDSHAKES) -> None:
        self.limit = limit
        self.pending: dict[int, trio.CancelScope] = {}  # insertion order: oldest first
        self.dropped = 0

    @contextlib.contextmanager
    def admit(self) -> Iterator[trio.CancelScope]:
        scope = trio.CancelScope()
        while len(self.pending) >= self.limit:
            self.pending.pop(next(iter(self.pending))).cancel()
            self.dropped += 1
        self.pending[id(scope)] = scope
        try:
            with scope:
                yield scope
        finally:
            self.pending.pop(id(scope), None)


async def serve_one(stream: trio.abc.Stream, opts: ServeOptions, sessions: Sessions,
                    peer: str = "?", handshakes: Handshakes | None = None) -> SessionOutcome:
    """Handle one connection: the handshake first, with nothing opened or taken for the peer
    until it proved the shared key (a stranger costs a socket for the handshake timeout)."""
    ch = Channel(stream, "dest", opts.key, io_timeout=opts.io_timeout,
                 sealed=not opts.plaintext)
    with (handshakes or Handshakes()).admit() as scope:
        try:
            await ch.handshake()
        except (MigrationError, p.ProtocolError, trio.BrokenResourceError,
                trio.ClosedResourceError, OSError) as exc:
            return await _stranger(ch, peer, exc)
    if scope.cancelled_caught:
        return await _stranger(ch, peer, MigrationError("dropped: too many handshakes at once"))
    session = DestSession(opts.open_files(opts.mount, opts.force), ch, opts.resume_cmd,
                          opts.spill, opts.qemu, opts.resume_hook)
    try:
        first = await session.first_frame()
    except (MigrationError, p.ProtocolError) as exc:
        await session.store.aclose()
        out = await _failed(session, peer, str(exc), exc)
        await ch.aclose()
        return out
    refusal = sessions.refusal(first)
    if refusal is not None:
        log.info("refused %s: %s", peer, refusal.reason)
        await session.store.aclose()
        await ch.abort(refusal.reason, code=p.AbortCode(refusal.code))
        await ch.aclose()
        return SessionOutcome(False, "", ends=False)
    if isinstance(first, p.Reattach) and first.migration in sessions.giving_way:
        # (the session it takes over releases the VM's files first: one claim per VM)
        await sessions.giving_way[first.migration].wait()
    sessions.running.append(session)  # (removed however the session ends)
    sessions.started += 1
    try:
        await session.run(peer, first)
        if session.answered is not None:
            return SessionOutcome(False, f"{peer} asked about a migration: "
                                  f"{session.answered[0]} ({session.answered[1]})")
        log.info("migration %s complete: %d blocks written", session.migration,
                 session.rx.blocks_written)
        n = len(session.files)
        text = f"migration from {peer} complete and verified ({n} file{'' if n == 1 else 's'})"
        if session.reattached:
            text += "; the source reattached after the first session broke"
        if session.qemu is not None and session.qemu.pid:
            text += (f"; the guest runs in QEMU pid {session.qemu.pid} (QMP and log in "
                     f"{session.qemu.dir})")
        return SessionOutcome(True, text)
    except BaseException as group:
        exc = first_error(group)
        if not isinstance(exc, (MigrationError, p.ProtocolError, OSError)):
            raise
        msg = str(exc) if not isinstance(exc, OSError) else f"I/O error: {exc}"
        return await _failed(session, peer, msg, exc)
    finally:
        sessions.running.remove(session)
        try:
            if session.qemu is not None:
                session.qemu.detach()
            await session.store.aclose()
            if session.pc is not None:
                await session.pc.aclose()
            await ch.aclose()
        finally:
            gone = sessions.giving_way.pop(session.migration, None)
            if gone is not None:
                gone.set()  # (the Reattach it gave way to may go on: the claim is free)


async def _stranger(ch: Channel, peer: str, exc: BaseException) -> SessionOutcome:
    """A peer that did not prove the shared key. A migrator with another key hears why and
    the operator reads one line; anything else (a port scan, garbage, a silent or slow
    connection) is a probe: one debug line, not a word to it, and the serve goes on."""
    if isinstance(exc, KeyMismatch):
        await ch.abort("the shared key does not match")
        await ch.aclose()
        return SessionOutcome(False, f"refused {peer}: it does not know the shared key (a "
                              "source with another key file?)", ends=False, kind="door")
    if isinstance(exc, PeerMismatch):  # a migrator set up otherwise: both operators hear why
        reason = exc.reason
        await ch.abort(f"the destination refused: {reason}")
        await ch.aclose()
        return SessionOutcome(False, f"refused {peer}: {reason}", ends=False, kind="door")
    if isinstance(exc, PeerAborted):  # a migrator that refused us first (a mismatch)
        reason = exc.reason
        await ch.aclose()
        return SessionOutcome(False, f"{peer} gave up the handshake: {reason}", ends=False,
                              kind="door")
    log.debug("probe from %s: %s", peer, exc)
    await ch.aclose()
    return SessionOutcome(False, "", ends=False)


async def _failed(session: DestSession, peer: str, msg: str,
                  exc: BaseException) -> SessionOutcome:
    """A session that failed: say it in one line, and never leave two VMs."""
    mid = session.migration
    if session.replica:
        return await _replica_ended(session, peer, msg, exc)
    if not session.owner:
        # Not taken: refuse for good (no QEMU left waiting, the record says so), then tell
        # the source, which may run its VM again.
        if session.qemu is not None:
            session.qemu.abort()
        if session.pc is not None and session.pc.begun.is_set():
            try:  # no VM will run on these files: their absent blocks are errors, not waits
                await session.pc.give_up()
            except MigrationError as exc2:
                log.error("cannot end lazy mode of the refused migration: %s", exc2)
        rec = session.dest_record
        touched = session.vm is not None and rec is not None
        if touched:
            assert rec is not None
            try:
                refused = rec.status == DestStatus.REFUSED  # (its start failed)
                session.handoff.refuse(msg, DestStatus.REFUSED if refused
                                       else DestStatus.INCOMPLETE, error=msg)
            except (OSError, MigrationError) as exc2:  # e.g. its blkfs daemon died (ENOTCONN)
                log.error("cannot update the migration state in %s: %s", session.mount, exc2)
        if not isinstance(exc, PeerAborted):
            await session.ch.abort(msg, exc.owner_generation if isinstance(exc, Refused)
                                   else -1)
        if not touched:
            return SessionOutcome(False, f"migration from {peer} refused: {msg}; nothing here "
                                  "was changed")
        return SessionOutcome(False, f"migration from {peer} failed: {msg}; the files stay "
                              "marked incomplete (not runnable)")
    # Taken: the VM runs here. Never roll back, never Abort (the source would resume).
    try:
        await session.save_digests()  # for the session the source may reattach
    except Exception:
        log.exception("cannot save the digest log")
    if isinstance(exc, VerificationFailed):
        return SessionOutcome(False, f"migration {mid} from {peer}: VERIFICATION FAILED: {msg}; "
                              "the VM runs here on a copy that differs from the source: stop "
                              "it here, then resume the source copy there with 'migrator "
                              "resolve --resume-here'")
    if session.pc is not None and session.resumed.is_set():
        try:
            out = await session.finish_without_source(msg)
        except (MigrationError, OSError) as exc2:
            out = SessionOutcome(False, f"{msg}; and completing from the spill failed: {exc2}")
        return SessionOutcome(out.completed, f"migration from {peer}: {out.text}",
                              awaiting=out.awaiting)
    try:
        session.handoff.save(error=f"verification did not finish: {msg}")
    except OSError as exc2:
        log.error("cannot update the migration state in %s: %s", session.mount,
                  exc2.strerror or exc2)
    return SessionOutcome(False, f"migration {mid} from {peer}: the VM runs here, but the "
                          f"source went before verification ({msg}); it holds its copy "
                          "suspended, and reconnects within its io timeout to finish, or "
                          "'migrator resolve' there settles it", awaiting=True)


async def _replica_ended(session: DestSession, peer: str, msg: str,
                         exc: BaseException) -> SessionOutcome:
    """A sync ends only this way (stopped, cut, or failed): the replica stays what its last
    acknowledged epoch made it, marked not runnable, for a later sync or migrate to use."""
    dest = session.dest_record
    rep = dest.replica if dest is not None and dest.replica is not None else ReplicaProgress()
    sync_round = rep.sync_round
    stopped = isinstance(exc, PeerAborted) and exc.code == p.AbortCode.SYNC_STOPPED
    if not isinstance(exc, PeerAborted):
        await session.ch.abort(msg)
    if sync_round is not None and not session.sent_since_ack:
        # The files are that round exactly: its digests, for a migration that trusts them
        # (lineage.py) instead of reading every block on both sides.
        blob = digestlog.encode(lineage.tag(session.migration, sync_round),
                                session.block_size, {fid: session.rx.all_digests(f)
                                                     for fid, f in session.files.items()})
        try:
            await session._write_digests(blob)
        except OSError as exc2:
            log.error("cannot write the replica's digest log in %s: %s (a migration from it "
                      "will compare digests instead)", session.mount, exc2.strerror or exc2)
            rep = replace(rep, lineage=None)
    else:
        rep = replace(rep, lineage=None)  # blocks of a later round may be here: digests only
    why = exc.reason if isinstance(exc, PeerAborted) else msg
    try:
        if dest is not None:
            session.handoff.save(replica=rep, stopped_at=time.time(), stopped=why)
    except OSError as exc2:
        log.error("cannot update the replica state in %s: %s", session.mount,
                  exc2.strerror or exc2)
    what = ("holds no whole epoch yet (the first sync was cut)" if sync_round is None
            else f"holds every write up to its epoch {sync_round}")
    how = "stopped" if stopped else f"cut ({why})"
    return SessionOutcome(sync_round is not None, f"sync from {peer} {how}: the replica here "
                          f"{what}; not runnable: 'migrator migrate' to this host starts from it")


def unfinished_here(store: DestFiles) -> str | None:
    """What a serve starting on this mount should say of a migration it took and did not
    finish (its serve died after the handoff), or None.

    A CLI face (migrator serve's start-up line, cli.py, which calls it sync): the one
    blocking control call of the migrator outside its CLI modules, 10 s at most, allowed by
    name in tests/test_architecture.py until cli.py awaits an async twin."""
    from blkfs.control import ControlClient, ControlError  # a CLI face: see its docstring

    recs = [r for r in store.records.all()
            if r.role == OWNER and r.dest_record is not None
            and r.dest_record.status == DestStatus.RUNNING]
    if not recs:
        return None
    rec = recs[0]
    try:
        with ControlClient.for_mount(store.mount, timeout=10) as c:
            absent = int(c.call(cp.Info()).postcopy_absent)
    except ControlError:
        absent = 0
    pc = (f"; its post-copy lacks {absent} blocks, installed from the spill area as they "
          "appear there (blkfs spill)" if absent else "")
    return (f"migration {rec.migration} of VM {rec.name} from {rec.peer} is unfinished here "
            f"(the VM was handed to this host at generation {rec.generation}, verification "
            f"did not end{pc}): its source reattaches on its own within its io timeout, or "
            "'migrator resolve' there settles it")


def _peer(stream: trio.SocketStream) -> str:
    try:
        return "{}:{}".format(*stream.socket.getpeername()[:2])
    except OSError:
        return "?"


async def serve(opts: ServeOptions, host: str, port: int, once: bool,
                task_status: Any = trio.TASK_STATUS_IGNORED,
                watch: Callable[[Sessions], Awaitable[None]] | None = None) -> bool:
    """Accept migrations until cancelled (reports the bound port through task_status); with
    `once`, one, and return whether it completed. `watch` runs beside, on the sessions (the
    incoming status 'migrator status' reads)."""
    # One session at a time for --once, and where the resume starts one QEMU command line
    # (its files are fixed): any number else, one per VM.
    sessions = Sessions(limit=1 if once or opts.qemu else None)
    handshakes = Handshakes()
    quiet = RepeatedLines()
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise MigrationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    task_status.started(listeners[0].socket.getsockname()[1])
    completed = False

    async def one(stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        nonlocal completed
        outcome = await serve_one(stream, opts, sessions, _peer(stream), handshakes)
        text = (quiet.line(outcome.kind, outcome.text, time.monotonic()) if outcome.kind
                else outcome.text)
        if text:
            opts.say(text)
        if not once or not outcome.ends:  # (a stranger or a refusal as busy ends nothing)
            return
        completed = outcome.completed
        if not outcome.awaiting:
            nursery.cancel_scope.cancel()
            return
        # The source may reattach to finish: keep the door open a while for it.
        started = sessions.started
        await trio.sleep(opts.io_timeout)
        if sessions.started == started and not sessions.running:
            nursery.cancel_scope.cancel()

    async def accept_loop(ln: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with ln:
            while True:
                try:
                    stream = await ln.accept()
                except OSError as exc:  # out of descriptors (a flood): wait, do not die
                    if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                         errno.ENOMEM):
                        raise
                    log.warning("accept: %s; refusing connections for 0.1 s", exc.strerror)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(one, stream, nursery)

    async with trio.open_nursery() as nursery:
        for ln in listeners:
            nursery.start_soon(accept_loop, ln, nursery)
        if watch is not None:
            nursery.start_soon(watch, sessions)
    return completed
