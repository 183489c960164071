"""`migrator serve`: the destination side.

It writes the blocks it receives into the files under its blkfs mount, keeps
an xxh3 digest of every block it wrote, runs the resume hook when the source
commits, and compares its digests with the source's after the resume (so the
check costs no downtime).

Whose files it may write, and when it takes the VM, is this host's record of the VM
(handoff.DestHandoff, ownership.py): ``incoming`` (durable) *before* any file is touched,
``owner`` at the Commit, the session's ``status`` ``complete`` only once verified.
Anything else — abort, crash, kill -9, disk full — leaves it not runnable (invariant 3).

Library code here logs; what a person reads comes back as a `SessionOutcome` that
the CLI prints.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from blkfs import ctlproto as cp

from . import digestlog, lineage
from . import protocol as p
from .handoff import DestHandoff, Refused
from .ownership import INCOMPLETE_ANSWER, OWNER, VMRecord
from .postcopy import DestPostcopy
from .qemu import QemuError, QemuTarget
from .qmp import QMPError
from .quiet import Quiet
from .received import Received, _File
from .stores import DestFiles, MountDest
from .transport import (
    IO_TIMEOUT,
    STILL_RUNNING,
    Channel,
    KeyMismatch,
    MigrationError,
    PeerAborted,
    PeerMismatch,
    leaf,
)

log = logging.getLogger(__name__)

SYNC_STOPPED = "the sync stopped"  # how a migrator sync's Abort begins when it stops cleanly
THREAD_WRITE = 1 << 20  # writes at least this large go to a worker thread
SOURCE_LOST_WAIT = 10.0  # s the session waits for the daemon to complete from the spill
MAX_HANDSHAKES = 128  # connections at once that have not proved the key (the oldest goes)
DIGEST_LOG_DELAY = 0.05  # s after Commit at most before the digest log is written
# States in which the source's Blocks are fetched pages for lazy mode, not copy data.
_FETCH_STATES = {p.State.RESUMING, p.State.POSTCOPY, p.State.POSTCOPY_END}


class VerificationFailed(MigrationError):
    pass


@dataclass
class SessionOutcome:
    """How one incoming migration ended, in words for the operator (none for a refusal)."""

    completed: bool
    text: str
    # The VM runs here and its source may reattach to finish (verify, fetch): a `--once`
    # serve waits for that a while before it exits.
    awaiting: bool = False
    # A migration was attempted (it ends a `--once` serve); not for a stranger or a refusal.
    ends: bool = True
    # A refusal at the door (wrong key, a migrator set up otherwise): said once per kind and
    # window (quiet.Quiet), so a peer that keeps knocking cannot fill the log.
    kind: str = ""


class DestSession:
    """One incoming migration on an authenticated channel."""

    def __init__(self, files: DestFiles, ch: Channel, resume_cmd: str | None = None,
                 spill_override: str | None = None, qemu_spec: str | None = None,
                 resume_hook: Callable[[], Awaitable[None]] | None = None) -> None:
        self.store = files
        self.mount = files.mount
        self.ch = ch
        self.resume_cmd = resume_cmd
        self.resume_hook = resume_hook  # in place of resume_cmd (the engine tests)
        self.qemu_spec = qemu_spec
        self.qemu: QemuTarget | None = None
        self._qemu_ready = trio.Event()
        self.device_state = bytearray()
        self.spill_override = spill_override
        self.pc: DestPostcopy | None = None  # once the source announced post-copy
        self.resumed = trio.Event()  # the resume hook returned: the VM runs here now
        self._nursery: trio.Nursery | None = None
        self.files: dict[int, _File] = {}
        self._handoff: DestHandoff | None = None  # this host's record of the VM
        self.rx = Received(files)  # what this session wrote, and the digests to verify
        self.files = self.rx.files
        self.t_switch: float | None = None
        self.answered: tuple[str, str] | None = None  # a resolve query was answered
        self.reattached = False  # this session goes on with a migration another one began
        self.digests_saved = False
        self.held_blocks = 0  # blocks this host held before and said so (delta)
        self.replica = False  # a migrator sync session: a replica kept, never a VM
        self.sent_since_ack = False  # replica: data arrived after the last acknowledged epoch
        self.lineage: tuple[list[int], str] | None = None  # (files accepted, why not others)
        self.back: dict[str, int] = {}  # after the last round: name -> the own epoch it ended
        # Set while the session waits for the daemon to complete from the spill after losing
        # its source: cancelling it gives way to that source's Reattach.
        self.waiting_for_source: trio.CancelScope | None = None

    # -- setup ------------------------------------------------------------------

    async def open_files(self, man: p.Manifest, peer: str) -> None:
        await self.store.prepare(man, f"migrator serve pid {os.getpid()}, from {peer}")
        self.block_size = man.block_size
        migration = man.migration or str(uuid.uuid4())
        got = self.handoff.admit(man.vm, man.vm_name, [f.name for f in man.files],
                                 man.generation, _host(peer), migration, man.replica)
        self.replica = man.replica
        kept: dict[int, dict[int, int]] = {}
        if man.lineage:  # before the record below replaces the replica's
            self.lineage, kept = await self._check_lineage(man, got.before)
        state: dict[str, Any] = {
            "migration": migration,
            # a replica (migrator sync) is never runnable: no Switchover is accepted for it,
            # and a later migration that starts from it marks it incomplete first
            "status": "replica" if man.replica else "incomplete",
            "source": peer,
            "started_at": time.time(),
            "files": [{"name": f.name, "size": f.size} for f in man.files],
        }
        if man.replica:
            # the source epoch (sync round) of which every write is here, durably; None until
            # the first round is acknowledged (a replica cut before that holds a part)
            state["replica"] = {"epoch": None, "synced_at": None}
        self.handoff.begin(got, state)  # before any file is touched
        self.store.create(man)
        for f in man.files:
            self.files[f.file_id] = _File(f, f.size)
        for fid, digests in kept.items():  # the replica's blocks count as written here
            self.files[fid].digests = digests
            self.held_blocks += len(digests)

    async def _check_lineage(self, man: p.Manifest, before: VMRecord | None
                       ) -> tuple[tuple[list[int], str], dict[int, dict[int, int]]]:
        """Which vouched files this host holds unchanged as of the named replica epoch (see
        lineage.py), with their digests from the replica's log, keyed by this manifest's ids."""
        lin = lineage.held_lineage(before)
        ids = lin.get("ids", {}) if lin is not None else {}
        names = {f.file_id: f.name for f in man.files}
        saved: dict[int, dict[int, int]] = {}
        log_tag = None
        blob = self.store.records.read_digests(man.vm) if lin is not None else None
        if blob is not None and lin is not None:
            try:
                saved = digestlog.decode(blob, man.lineage, man.block_size)
                log_tag = man.lineage
            except digestlog.DigestLogError as exc:
                log.info("lineage %s: digest log unusable: %s", man.lineage, exc)
        own = {}
        for fid in man.lineage_files:
            got = await self.store.own_swap(names[fid])
            if got is not None:
                own[fid] = got
        sizes = {f.file_id: f.size for f in man.files}
        ok, why = lineage.dest_proof(lin, man.lineage, names, sizes, list(man.lineage_files),
                                     own, log_tag)
        kept: dict[int, dict[int, int]] = {}
        for fid in list(ok):
            old = ids.get(names[fid])
            if old is None or old not in saved:
                ok.remove(fid)
                why = "; ".join(x for x in (why, f"{names[fid]}: not in the digest log") if x)
                continue
            kept[fid] = saved[old]
        log.info("lineage %s: %d of %d files held unchanged%s", man.lineage, len(ok),
                 len(man.lineage_files), f" ({why})" if why else "")
        return (ok, why), kept

    async def _say_what_is_held(self) -> None:
        """The source asked (delta): the xxh3 of every block of each file this host held
        before (an older copy), so that only the blocks that differ travel. They count as
        written here for the verification, which still compares every block."""
        bs, per_frame = self.block_size, p.MAX_DIGESTS_PER_FRAME
        known = set(self.lineage[0]) if self.lineage else set()
        for fid, f in self.files.items():
            if self.store.fresh(fid) or fid in known:
                continue  # created empty here: nothing held; or known by lineage already
            for first in range(0, (f.size + bs - 1) // bs, per_frame):
                # a frame at a time, as they are read: the source sees progress, not silence
                try:
                    if min(f.size - first * bs, per_frame * bs) >= THREAD_WRITE:
                        held = await trio.to_thread.run_sync(self.store.held, fid, bs, first,
                                                             per_frame)
                    else:  # a thread hop costs more than hashing a small file
                        held = self.store.held(fid, bs, first, per_frame)
                except OSError as exc:
                    raise MigrationError(f"cannot read {f.entry.name} here: "
                                         f"{exc.strerror}") from None
                if not held:
                    break  # nothing held (all holes): the source sends it all
                for i, d in enumerate(held, first):
                    f.digests[i] = d
                self.held_blocks += len(held)
                await self.ch.send(p.Held(fid, first, tuple(held)))

    @property
    def block_size(self) -> int:
        return self.rx.block_size

    @block_size.setter
    def block_size(self, value: int) -> None:
        self.rx.block_size = value

    @property
    def handoff(self) -> DestHandoff:
        if self._handoff is None:  # (only once the session needs the records)
            self._handoff = DestHandoff(self.store.records, self.store.force)
        return self._handoff

    @property
    def state(self) -> dict[str, Any]:
        """This incoming session's state, kept in the VM's record."""
        return self._handoff.state if self._handoff is not None else {}

    @property
    def vm(self) -> VMRecord | None:
        return self._handoff.vm if self._handoff is not None else None

    @property
    def owner(self) -> bool:
        """This host took the VM: it runs here from now on, whatever happens to the source."""
        return self._handoff is not None and self._handoff.owner

    def _take_ownership(self, generation: int) -> None:
        """Durably, before the VM is started (the handoff, docs/migration.md)."""
        t = time.monotonic()
        self.handoff.take(generation)
        log.info("ownership record: %.2f ms", (time.monotonic() - t) * 1000)

    async def _start_vm(self) -> None:
        """Take the VM and start it; a failed start is a refusal (the VM does not run here:
        the source may run it again), recorded before the Abort that tells the source."""
        assert self.owner
        t = time.monotonic()
        try:
            with trio.CancelScope(shield=True):  # once owner, the start is never cut halfway
                await self._resume()
        except MigrationError as exc:
            if self.qemu is not None:
                self.qemu.abort()  # before the record says so: it must not run
            self.handoff.refuse(f"its start failed: {exc}", "refused", error=str(exc))
            raise
        log.info("resume hook: %.1f ms", (time.monotonic() - t) * 1000)
        ms = (time.monotonic() - self.t_switch) * 1000 if self.t_switch else 0.0
        try:
            await self.ch.send(p.Resumed(ms))  # first: what waits for `resumed` is not downtime
        finally:
            self.resumed.set()  # the VM runs here now, whatever happens to the source

    async def _new_own_epoch(self) -> None:
        """A new epoch of this mount's own after each round: the one that runs at the Commit
        holds every block written here since the last round (the rest of the migration's, then
        the VM's), so a migration back proves that the source's retired copy lacks at most
        those (lineage.py). Never in the downtime: one control call a file, per round."""
        back: dict[str, int] = {}
        for f in self.files.values():
            try:
                got = await self.store.own_swap(f.entry.name)
            except MigrationError as exc:
                log.warning("no lineage for a migration back: %s", exc)
                got = None
            if got is None:
                self.back = {}
                return
            back[f.entry.name] = got[0]
        self.back = back

    async def _save_digests_soon(self) -> None:
        """From Commit: once the VM runs, or after DIGEST_LOG_DELAY if its start takes longer
        (a slow hook), so the write is never inside the downtime of a fast start."""
        with trio.move_on_after(DIGEST_LOG_DELAY):
            await self.resumed.wait()
        await self.save_digests()
        if self.back and self.vm is not None:  # the source's retired copy: these files then
            try:
                self.store.records.write_sync(self.vm.id, lineage.sync_record(
                    self.state["migration"], str(self.state.get("source")), lineage.BACK,
                    {f.entry.name: (self.back[f.entry.name], f.size)
                     for f in self.files.values()}, time.time()))
            except (OSError, MigrationError) as exc:
                log.warning("cannot write the lineage record in %s: %s (a migration back will "
                            "compare digests)", self.mount, exc)

    async def save_digests(self) -> None:
        """The digests of every block this session wrote (final from Commit on), so a
        session the source reattaches after this one died can still verify them."""
        if self.digests_saved or self.reattached or not self.files:
            return  # (a reattached session holds only what the log gave it, or less)
        self.digests_saved = True
        blob = digestlog.encode(self.state["migration"], self.block_size,
                                {fid: self.rx.all_digests(f) for fid, f in self.files.items()})
        t = time.monotonic()
        try:
            await self._write_digests(blob)
        except OSError as exc:
            log.error("cannot write the digest log in %s: %s (a reattached session could not "
                      "verify the pre-copied blocks)", self.mount, exc.strerror or exc)
            return
        log.info("digest log: %d bytes in %.1f ms", len(blob), (time.monotonic() - t) * 1000)

    async def _write_digests(self, blob: bytes) -> None:
        assert self.vm is not None
        await trio.to_thread.run_sync(self.store.records.write_digests, self.vm.id, blob)

    def _load_digests(self) -> None:
        """A reattached session: the digests the broken one wrote down."""
        assert self.vm is not None
        blob = self.store.records.read_digests(self.vm.id)
        try:
            if blob is None:
                raise digestlog.DigestLogError("there is none")
            saved = digestlog.decode(blob, self.state["migration"], self.block_size)
        except digestlog.DigestLogError as exc:
            log.warning("digest log of migration %s unusable (%s): the pre-copied blocks "
                        "cannot be verified", self.state["migration"], exc)
            return
        for fid, digests in saved.items():
            if fid in self.files:
                self.files[fid].digests.update(digests)
        self.digests_saved = True

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
        if self.resume_hook is not None:
            await self.resume_hook()
            return
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

    async def greet(self) -> p.Manifest | p.Query | p.Reattach:
        """The handshake and the peer's first frame (see serve_one, which splits them)."""
        await self.ch.handshake()
        return await self.first_frame()

    async def first_frame(self) -> p.Manifest | p.Query | p.Reattach:
        """What an authenticated peer asks for (before the one session at a time is taken)."""
        return await self.ch.expect(p.Manifest, p.Query, p.Reattach)

    async def run(self, peer: str, man: p.Manifest | p.Query | p.Reattach | None = None
                  ) -> dict[str, Any]:
        ch = self.ch
        if man is None:
            man = await self.greet()
        if isinstance(man, p.Query):
            await self.answer(man)
            return {}
        if isinstance(man, p.Reattach):
            if not await self._reattach(man, peer):
                return {}
        else:
            await self.open_files(man, peer)
            if man.lineage:
                ok, why = self.lineage or ([], "")
                await ch.send(p.Lineage(tuple(ok), why[:p.MAX_REASON]))
            if man.delta:
                await self._say_what_is_held()
            await ch.send(p.Ready())
            if self.qemu_spec:
                try:
                    self.qemu = QemuTarget(self.qemu_spec, self.mount)
                except QemuError as exc:
                    raise MigrationError(str(exc)) from None
            log.info("migration %s from %s: %d files", self.state["migration"], peer,
                     len(man.files))
        # The receiver stays up to a few frames ahead of the writer, so network reads and
        # file writes overlap; the writer handles events in order, each with the protocol
        # state it arrived in (the connection's own state may be ahead by then).
        tx, rx = trio.open_memory_channel[tuple[Any, p.State]](4)
        lost: list[MigrationError] = []

        async def receiver() -> None:
            async with tx:
                while True:
                    try:
                        ev = await ch.receive()
                    except MigrationError as exc:
                        # What the peer said before it went (a Commit above all) is still
                        # handled, in order; then the session fails with this.
                        lost.append(exc)
                        return
                    await tx.send((ev, ch.conn.state))
                    if isinstance(ev, p.Done):
                        return

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.qemu is not None:
                nursery.start_soon(self._start_qemu)
            if self.reattached and self.pc is not None:
                nursery.start_soon(self.pc.pump)
            nursery.start_soon(receiver)
            async with rx:
                async for ev, state in rx:
                    await self._handle(ev, state)
                if lost:
                    raise lost[0]
        return self.state

    async def answer(self, q: p.Query) -> None:
        """`migrator resolve` on the source asks what this host's record says."""
        status, epoch, detail = self.handoff.answer(q.migration,
                                                    await self.store.postcopy_absent())
        log.info("resolve query for %s: %s (%s)", q.migration, status, detail)
        await self.ch.send(p.Answer(q.migration, status, epoch, detail))
        self.answered = (status, detail)


    async def _reattach(self, ra: p.Reattach, peer: str) -> bool:
        """The source of a migration broken after Commit is back: go on with it if this host
        holds the VM (its record says owner, at the source's epoch). False if not (answered)."""
        ch = self.ch
        man = await ch.expect(p.Manifest)
        announce = await ch.expect(p.Postcopy) if ra.postcopy else None
        record, status, detail = self.handoff.reattachable(ra.migration, ra.epoch)
        epoch = record.generation if record is not None else 0
        if record is not None:
            got = await self.store.reattach(man, f"migrator serve pid {os.getpid()}, "
                                            f"reattached from {peer}",
                                            announce.migration if announce else None)
            if got is not None and got.given_up:
                status, detail = INCOMPLETE_ANSWER, (
                    f"the post-copy here gave up {got.remaining} blocks: the source copy is "
                    "the only whole one")
        if status != OWNER:
            log.info("reattach of %s from %s refused: %s (%s)", ra.migration, peer, status,
                     detail)
            await ch.send(p.Answer(ra.migration, status, epoch, detail))
            self.answered = (status, detail)
            return False
        assert record is not None
        self.handoff.resume(record)
        self.block_size = man.block_size
        for f in man.files:
            self.files[f.file_id] = _File(f, f.size)
        self._load_digests()
        self.reattached = True
        self.resumed.set()  # the session that broke started the VM (its record says owner)
        if announce is not None:
            self.pc = DestPostcopy(self.mount, ch, announce, self.block_size,
                                   self.spill_override, self.resumed)
            self.pc.on_digests = self._merge_digests
            await self.pc.reattach()
        self.handoff.save(reattaches=int(self.state.get("reattaches", 0)) + 1,
                         postcopy_paused=None)
        log.info("migration %s: source %s reattached (%s)", ra.migration, peer,
                 "post-copy goes on" if announce else "verification")
        await ch.send(p.Answer(ra.migration, OWNER, epoch, "reattached: " + detail))
        return True

    async def finish_without_source(self, why: str) -> SessionOutcome:
        """The source is gone after the resume: complete from the spill area, or say what is
        missing."""
        assert self.pc is not None
        with trio.CancelScope() as scope:
            self.waiting_for_source = scope
            found, news = await self.pc.source_lost(SOURCE_LOST_WAIT)
        self.waiting_for_source = None
        if scope.cancelled_caught:
            return SessionOutcome(False, f"source lost ({why}); it came back and goes on in a "
                                  "new session", awaiting=True)
        self._merge_digests()
        n = news.missing_count
        if self.pc.stats is not None:
            self.state["postcopy"] = cp.to_dict(self.pc.stats)
        if news.done:
            self.handoff.save(status="complete", completed_at=time.time(),
                             verified="post-copy pages checked against the spill hashes; the "
                             f"source was lost before the final digests ({why})")
            return SessionOutcome(True, f"source lost ({why}); completed from the spill area "
                                  f"alone ({found} pages found there at once)", awaiting=True)
        if n == 0:
            self.handoff.save(postcopy_paused=f"source lost ({why}); {news.remaining} blocks "
                             "absent, installed as they reach the spill area")
            return SessionOutcome(False, f"source lost ({why}): post-copy paused with "
                                  f"{news.remaining} blocks absent; the blkfs daemon installs "
                                  "them as they reach the spill area, and their readers wait "
                                  f"meanwhile (blkfs spill {self.mount}); if they never will: "
                                  f"blkfs spill {self.mount} --give-up", awaiting=True)
        shown = ", ".join(f"{rel} block {b}" for rel, b in news.missing[:10])
        more = f" (+{n - 10} more)" if n > 10 else ""
        self.handoff.save(status="incomplete", error=f"source lost ({why})",
                         missing_blocks=[list(m) for m in news.missing], missing_count=n)
        return SessionOutcome(False, f"source lost ({why}) before every page reached the "
                              f"spill area: {n} blocks missing: {shown}{more}; reads of them "
                              "fail with EIO, everything else is served")

    async def _replica_synced(self, epoch: int) -> None:
        """Every write of the source's epoch `epoch` is here: durable first, then said so
        (the RoundAck that follows is the source's proof of the lag it reports)."""
        await self.store.sync()
        epochs, ids, sizes = {}, {}, {}
        for fid, f in self.files.items():  # our own epoch from here: nobody writes the replica
            got = await self.store.own_swap(f.entry.name)
            if got is not None:
                epochs[f.entry.name], ids[f.entry.name] = got[0] + 1, fid
                sizes[f.entry.name] = f.size
        rec = self.state["replica"]
        rec.update(epoch=epoch, synced_at=time.time(), rounds=int(rec.get("rounds", 0)) + 1,
                   lineage=lineage.dest_lineage(epochs, ids, sizes, lineage.tag(
                       self.state["migration"], epoch)))
        self.sent_since_ack = False
        self.handoff.save(files=[{"name": f.entry.name, "size": f.size}
                                for f in self.files.values()])

    def _merge_digests(self) -> None:
        assert self.pc is not None
        for fid, b, d in self.pc.digests:
            f = self.files.get(fid)
            if f is not None:
                f.digests[b] = d

    async def _handle(self, ev: Any, state: p.State) -> None:
        ch = self.ch
        pc = self.pc
        if not isinstance(ev, (p.Blocks, p.Zero, p.Packed)):
            await self.store.settle()  # the data written so far is what the mount shows, now
        else:
            await self.store.settle(only_if_many=True)
        if self.replica and isinstance(ev, (p.Blocks, p.Zero, p.Packed, p.Resize)):
            self.sent_since_ack = True
        if pc is not None and not pc.absent_done.is_set() and not isinstance(ev, p.Absent):
            pc.absent_done.set()  # Absent frames come right after Postcopy, all together
        if isinstance(ev, p.Blocks) and state in _FETCH_STATES:
            assert pc is not None and self._nursery is not None
            # A fetched block, for a read that waits: into lazy mode (not through the
            # mount), without waiting for it here.
            self._nursery.start_soon(pc.install, ev)
        elif isinstance(ev, p.Blocks):
            if len(ev.data) >= THREAD_WRITE:
                await trio.to_thread.run_sync(self.rx.write_blocks, ev)
            else:  # a thread hop costs more than a small write
                self.rx.write_blocks(ev)
        elif isinstance(ev, p.Packed):
            if ev.size >= THREAD_WRITE:
                await trio.to_thread.run_sync(self.rx.write_packed, ev)
            else:
                self.rx.write_packed(ev)
        elif isinstance(ev, p.Zero):
            await self.rx.write_zero(ev)
        elif isinstance(ev, p.Resize):
            self.rx.resize(ev)
        elif isinstance(ev, p.DeviceState):
            if self.qemu is None:
                raise MigrationError("the source sends a QEMU device state: run 'migrator serve' "
                                     "with --resume qemu:CMDLINE_FILE|QMP_SOCKET")
            self.device_state += ev.data
        elif isinstance(ev, p.Postcopy):
            assert self._nursery is not None
            self.pc = DestPostcopy(self.mount, ch, ev, self.block_size, self.spill_override,
                                   self.resumed)
            self.pc.on_digests = self._merge_digests
            names = {fid: f.entry.name for fid, f in self.files.items()}
            self._nursery.start_soon(self.pc.setup, names)
        elif isinstance(ev, p.Absent):
            assert pc is not None
            pc.add_absent(ev)
        elif isinstance(ev, p.SpillRefs):
            assert pc is not None
            await pc.refs(ev)
        elif isinstance(ev, p.SpillFlushed):
            log.info("source: spill flushed (%d pages)", ev.pages)
        elif isinstance(ev, p.RoundDone) and self.replica:
            await self._replica_synced(ev.round)
            await ch.send(p.RoundAck(ev.round))
        elif isinstance(ev, p.RoundDone):
            await ch.send(p.RoundAck(ev.round))
            await self._new_own_epoch()  # (after the ack: the source's next round is not delayed)
        elif isinstance(ev, p.Switchover):
            self.t_switch = time.monotonic()
        elif isinstance(ev, p.Commit) and pc is not None:
            t = time.monotonic()
            await pc.begun.wait()  # before the VM can read anything
            log.info("commit %.1f ms after switchover; lazy mode on after %.1f ms more",
                     (t - (self.t_switch or t)) * 1000, (time.monotonic() - t) * 1000)
            assert self._nursery is not None
            self._take_ownership(ev.epoch)
            self._nursery.start_soon(self._save_digests_soon)
            self._nursery.start_soon(pc.pump)
            # The VM starts while the post-copy traffic flows (it reads absent pages then).
            self._nursery.start_soon(self._start_vm)
        elif isinstance(ev, p.Commit):
            # No fsync of the files here: it would lengthen the downtime; they are made
            # durable before the migration is marked complete.
            self._take_ownership(ev.epoch)
            assert self._nursery is not None
            self._nursery.start_soon(self._save_digests_soon)
            await self._start_vm()
        elif isinstance(ev, p.Digests):
            self.rx.check_digests(ev, self.reattached and not self.digests_saved)
        elif isinstance(ev, p.VerifyDone):
            if pc is not None and pc.stats is not None:
                self.state["postcopy"] = cp.to_dict(pc.stats)
            await self.store.sync()
            ok, detail = self.rx.verdict()
            if ok:
                self.handoff.save(status="complete", completed_at=time.time(), verified=True)
            else:
                self.handoff.save(verified=False, mismatches=self.rx.mismatch_count,
                                  detail=detail)
            await ch.send(p.Verified(ok, self.rx.mismatch_count, detail))
            if not ok:
                raise VerificationFailed(f"verification failed: {detail}")


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
    """One session at a time on a serve (the daemon's claim makes it one per mount), and
    which one, so the source of a session that lost it can take its place."""

    def __init__(self) -> None:
        self.lock = trio.Lock()
        self.current: DestSession | None = None
        self.started = 0  # sessions that took the lock so far

    def refusal(self, first: object) -> str | None:
        """Why a peer whose first frame is `first` is refused now, or None to let it in. A
        Reattach of the running session's migration is let in while that session waits for
        its lost source (which gives way), and told STILL_RUNNING while it still runs."""
        if not self.lock.locked():
            return None
        cur = self.current
        if (isinstance(first, p.Reattach) and cur is not None
                and cur.state.get("migration") == first.migration):
            if cur.waiting_for_source is None:
                return STILL_RUNNING
            cur.waiting_for_source.cancel()
            return None
        if cur is not None and cur.replica:
            return (f"the destination is busy: migrator sync from {cur.state.get('source')} "
                    "keeps a replica there; stop it first (the migration then starts from "
                    "the replica)")
        return "the destination is busy with another migration"


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
        log.info("refused %s: %s", peer, refusal)
        await session.store.aclose()
        await ch.abort(refusal)
        await ch.aclose()
        return SessionOutcome(False, "", ends=False)
    async with sessions.lock:
        sessions.current = session
        sessions.started += 1
        try:
            state = await session.run(peer, first)
            if session.answered is not None:
                return SessionOutcome(False, f"{peer} asked about a migration: "
                                      f"{session.answered[0]} ({session.answered[1]})")
            log.info("migration %s complete: %d blocks written", state["migration"],
                     session.rx.blocks_written)
            text = f"migration from {peer} complete and verified ({len(session.files)} files)"
            if session.reattached:
                text += "; the source reattached after the first session broke"
            if session.qemu is not None and session.qemu.pid:
                text += (f"; the guest runs in QEMU pid {session.qemu.pid} (QMP and log in "
                         f"{session.qemu.dir})")
            return SessionOutcome(True, text)
        except BaseException as group:
            exc = leaf(group)
            if not isinstance(exc, (MigrationError, p.ProtocolError, OSError)):
                raise
            msg = str(exc) if not isinstance(exc, OSError) else f"I/O error: {exc}"
            return await _failed(session, peer, msg, exc)
        finally:
            sessions.current = None
            if session.qemu is not None:
                session.qemu.detach()
            await session.store.aclose()
            if session.pc is not None:
                await session.pc.aclose()
            await ch.aclose()


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
        reason = str(exc).removeprefix("bad peer: ")
        await ch.abort(f"the destination refused: {reason}")
        await ch.aclose()
        return SessionOutcome(False, f"refused {peer}: {reason}", ends=False, kind="door")
    if isinstance(exc, PeerAborted):  # a migrator that refused us first (a mismatch)
        reason = str(exc).removeprefix("the peer aborted: ").removeprefix("bad peer: ")
        await ch.aclose()
        return SessionOutcome(False, f"{peer} gave up the handshake: {reason}", ends=False,
                              kind="door")
    log.debug("probe from %s: %s", peer, exc)
    await ch.aclose()
    return SessionOutcome(False, "", ends=False)


async def _failed(session: DestSession, peer: str, msg: str,
                  exc: BaseException) -> SessionOutcome:
    """A session that failed: say it in one line, and never leave two VMs."""
    mid = session.state.get("migration", "?")
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
        touched = session.vm is not None and session.state
        if touched:
            try:
                refused = session.state.get("status") == "refused"  # (its start failed)
                session.handoff.refuse(msg, "refused" if refused else "incomplete", error=msg)
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
    rec = session.state.get("replica") or {}
    epoch = rec.get("epoch")
    stopped = isinstance(exc, PeerAborted) and SYNC_STOPPED in msg
    if not isinstance(exc, PeerAborted):
        await session.ch.abort(msg)
    if epoch is not None and not session.sent_since_ack:
        # The files are that epoch exactly: its digests, for a migration that trusts them
        # (lineage.py) instead of reading every block on both sides.
        blob = digestlog.encode(lineage.tag(session.state["migration"], epoch),
                                session.block_size, {fid: session.rx.all_digests(f)
                                                     for fid, f in session.files.items()})
        try:
            await session._write_digests(blob)
        except OSError as exc2:
            log.error("cannot write the replica's digest log in %s: %s (a migration from it "
                      "will compare digests instead)", session.mount, exc2.strerror or exc2)
            rec["lineage"] = None
    else:
        rec["lineage"] = None  # blocks of a later epoch may be here: digests only
    try:
        session.handoff.save(stopped_at=time.time(),
                            stopped=msg.removeprefix("the peer aborted: "))
    except OSError as exc2:
        log.error("cannot update the replica state in %s: %s", session.mount,
                  exc2.strerror or exc2)
    what = ("holds no whole epoch yet (the first sync was cut)" if epoch is None
            else f"holds every write up to its epoch {epoch}")
    how = "stopped" if stopped else f"cut ({msg.removeprefix('the peer aborted: ')})"
    return SessionOutcome(epoch is not None, f"sync from {peer} {how}: the replica here {what}; "
                          "not runnable: 'migrator migrate' to this host starts from it")


def unfinished_here(store: DestFiles) -> str | None:
    """What a serve starting on this mount should say of a migration it took and did not
    finish (its serve died after the handoff), or None.

    A CLI face (migrator serve's start-up line, cli.py, which calls it sync): the one
    blocking control call of the migrator outside its CLI modules, 10 s at most, allowed by
    name in tests/test_architecture.py until cli.py awaits an async twin."""
    recs = [r for r in store.records.all()
            if r.role == OWNER and (r.incoming or {}).get("status") == "running"]
    if not recs:
        return None
    rec = recs[0]
    from blkfs.control import ControlClient, ControlError  # a CLI face: see its docstring

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


def _host(peer: str) -> str:
    """Where a VM came from, for its record: the source's host (its port is any port)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def _peer(stream: trio.SocketStream) -> str:
    try:
        return "{}:{}".format(*stream.socket.getpeername()[:2])
    except OSError:
        return "?"


async def serve(opts: ServeOptions, host: str, port: int, once: bool,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> bool:
    """Accept migrations until cancelled (reports the bound port through task_status); with
    `once`, one, and return whether it completed."""
    sessions = Sessions()
    handshakes = Handshakes()
    quiet = Quiet()
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
        if sessions.started == started and sessions.current is None:
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
    return completed
