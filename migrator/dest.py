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

import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from blkfs import ctlproto as cp

from . import digestlog, lineage
from . import protocol as p
from .errors import (
    MigrationError,
    VerificationFailed,
)
from .handoff import DestHandoff
from .holding import say_what_is_held
from .ownership import (
    INCOMPLETE_ANSWER,
    OWNER,
    DestRecord,
    DestStatus,
    ReplicaProgress,
    VMRecord,
)
from .postcopy import DestPostcopy
from .qemu import QemuError, QemuTarget
from .qmp import QMPError
from .received import Received, ReceivedFile
from .stores import DestFiles
from .transport import Channel

log = logging.getLogger(__name__)

THREAD_WRITE = 1 << 20  # writes at least this large go to a worker thread
SOURCE_LOST_WAIT = 10.0  # s at most without a block arriving in the spill (or the io timeout)
DIGEST_LOG_DELAY = 0.05  # s after Commit at most before the digest log is written
# States in which the source's Blocks are fetched pages for lazy mode, not copy data.
_FETCH_STATES = {p.State.RESUMING, p.State.POSTCOPY, p.State.POSTCOPY_END}


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
    # window (quiet.RepeatedLines), so a peer that keeps knocking cannot fill the log.
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
        self.files: dict[int, ReceivedFile] = {}
        self._handoff: DestHandoff | None = None  # this host's record of the VM
        self.rx = Received(files)  # what this session wrote, and the digests to verify
        self.files = self.rx.files
        self.t_switch: float | None = None
        self.answered: tuple[str, str] | None = None  # a resolve query was answered
        self.reattached = False  # this session goes on with a migration another one began
        self.digests_saved = False
        self.held_blocks = 0  # blocks this host held before and said so (delta)
        self.vm_id = self.vm_name = ""  # the VM a Manifest named (the serve's one per VM)
        self.peer = "?"  # where it comes from (for 'migrator status' here)
        self.replica = False  # a migrator sync session: a replica kept, never a VM
        self.sent_since_ack = False  # replica: data arrived after the last acknowledged epoch
        self.lineage: tuple[list[int], str] | None = None  # (files accepted, why not others)
        self.back: dict[str, int] = {}  # after the last round: name -> the swap epoch it ended here
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
        # A replica (migrator sync) is never runnable: no Switchover is accepted for it, and a
        # later migration that starts from it marks it incomplete first. Its sync round stays
        # None until the first is acknowledged (a replica cut before that holds a part).
        record = DestRecord(migration, peer, DestStatus.REPLICA if man.replica
                            else DestStatus.INCOMPLETE,
                            files=[{"name": f.name, "size": f.size} for f in man.files],
                            replica=ReplicaProgress() if man.replica else None)
        self.handoff.begin(got, record)  # before any file is touched
        self.store.create(man)
        for f in man.files:
            self.files[f.file_id] = ReceivedFile(f, f.size)
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
    def dest_record(self) -> DestRecord | None:
        """This incoming session's record, kept in the VM's (None until the Manifest)."""
        return self._handoff.dest_record if self._handoff is not None else None

    @property
    def migration(self) -> str:
        return self.dest_record.migration if self.dest_record is not None else "?"

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
            self.handoff.refuse(f"its start failed: {exc}", DestStatus.REFUSED, error=str(exc))
            raise
        log.info("resume hook: %.1f ms", (time.monotonic() - t) * 1000)
        ms = (time.monotonic() - self.t_switch) * 1000 if self.t_switch else 0.0
        try:
            await self.ch.send(p.Resumed(ms))  # first: what waits for `resumed` is not downtime
        finally:
            self.resumed.set()  # the VM runs here now, whatever happens to the source

    async def _new_own_swap_epoch(self) -> None:
        """A new swap epoch of this mount's own after each round: the one that runs at the Commit
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
                    self.migration, self.dest_record.source, lineage.BACK,
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
        blob = digestlog.encode(self.migration, self.block_size,
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
            saved = digestlog.decode(blob, self.migration, self.block_size)
        except digestlog.DigestLogError as exc:
            log.warning("digest log of migration %s unusable (%s): the pre-copied blocks "
                        "cannot be verified", self.migration, exc)
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
        env = dict(os.environ, MIGRATOR_MOUNT=self.mount, MIGRATOR_VM=self.vm_name,
                   MIGRATOR_VM_ID=self.vm_id)
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
        """What an authenticated peer asks for (before the serve lets the session in: one
        per VM at a time)."""
        first = await self.ch.expect(p.Manifest, p.Query, p.Reattach)
        if isinstance(first, p.Manifest):
            self.vm_id, self.vm_name = first.vm, first.vm_name
        return first

    async def run(self, peer: str, man: p.Manifest | p.Query | p.Reattach | None = None
                  ) -> DestRecord | None:
        """The session to its end: its record, or None if it only answered (a Query, or a
        Reattach this host cannot take)."""
        ch = self.ch
        self.peer = peer
        if man is None:
            man = await self.greet()
        if isinstance(man, p.Query):
            await self.answer(man)
            return None
        if isinstance(man, p.Reattach):
            if not await self._reattach(man, peer):
                return None
        else:
            await self.open_files(man, peer)
            if man.lineage:
                ok, why = self.lineage or ([], "")
                await ch.send(p.Lineage(tuple(ok), why[:p.MAX_REASON]))
            if man.delta:
                self.held_blocks += await say_what_is_held(
                    self.store, self.ch, self.files, self.block_size,
                    set(self.lineage[0]) if self.lineage else set())
            await ch.send(p.Ready())
            if self.qemu_spec:
                try:
                    self.qemu = QemuTarget(self.qemu_spec, self.mount)
                except QemuError as exc:
                    raise MigrationError(str(exc)) from None
            log.info("migration %s from %s: %d files", self.migration, peer,
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
        return self.dest_record

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
        record, status, detail = self.handoff.reattachable(ra.migration, ra.generation)
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
            self.files[f.file_id] = ReceivedFile(f, f.size)
        self._load_digests()
        self.reattached = True
        self.resumed.set()  # the session that broke started the VM (its record says owner)
        if announce is not None:
            self.pc = DestPostcopy(self.mount, ch, announce, self.block_size,
                                   self.spill_override, self.resumed)
            self.pc.on_digests = self._merge_digests
            await self.pc.reattach()
        assert self.dest_record is not None
        self.handoff.save(reattaches=self.dest_record.reattaches + 1,
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
            found, news = await self.pc.source_lost(min(SOURCE_LOST_WAIT,
                                                        self.ch.io_timeout))
        self.waiting_for_source = None
        if scope.cancelled_caught:
            return SessionOutcome(False, f"source lost ({why}); it came back and goes on in a "
                                  "new session", awaiting=True)
        self._merge_digests()
        n = news.missing_count
        if self.pc.stats is not None:
            self.handoff.save(postcopy=cp.to_dict(self.pc.stats))
        if news.done:
            self.handoff.save(status=DestStatus.COMPLETE, completed_at=time.time(),
                              verified=True, verified_how="post-copy pages checked against "
                              f"the spill hashes; the source was lost before the final digests "
                              f"({why})")
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
        self.handoff.save(status=DestStatus.INCOMPLETE, error=f"source lost ({why})",
                         missing_blocks=[list(m) for m in news.missing], missing_count=n)
        return SessionOutcome(False, f"source lost ({why}) before every page reached the "
                              f"spill area: {n} blocks missing: {shown}{more}; reads of them "
                              "fail with EIO, everything else is served")

    async def _replica_synced(self, sync_round: int) -> None:
        """Every write of the source's sync round `sync_round` is here: durable first, then
        said so (the RoundAck that follows is the source's proof of the lag it reports)."""
        await self.store.sync()
        swap_epochs, ids, sizes = {}, {}, {}
        for fid, f in self.files.items():  # our own swap epoch from here: nobody writes it
            got = await self.store.own_swap(f.entry.name)
            if got is not None:
                swap_epochs[f.entry.name], ids[f.entry.name] = got[0] + 1, fid
                sizes[f.entry.name] = f.size
        rec = self.dest_record
        assert rec is not None and rec.replica is not None
        replica = ReplicaProgress(sync_round, time.time(), rec.replica.rounds + 1,
                                  lineage.dest_lineage(swap_epochs, ids, sizes, lineage.tag(
                                      self.migration, sync_round)))
        self.sent_since_ack = False
        self.handoff.save(replica=replica, files=[{"name": f.entry.name, "size": f.size}
                                                  for f in self.files.values()])

    def _merge_digests(self) -> None:
        assert self.pc is not None
        for fid, b, d in self.pc.digests:
            f = self.files.get(fid)
            if f is not None:
                f.digests.set(b, d)

    async def _handle(self, ev: p.Event, state: p.State) -> None:
        """One frame, in order, with the protocol state it arrived in (the protocol has
        already checked that it may come now: the handlers only act)."""
        pc = self.pc
        if not isinstance(ev, _DATA):
            await self.store.settle()  # the data written so far is what the mount shows, now
        else:
            await self.store.settle(only_if_many=True)
        if self.replica and isinstance(ev, (*_DATA, p.Resize)):
            self.sent_since_ack = True
        if pc is not None and not pc.absent_done.is_set() and not isinstance(ev, p.Absent):
            pc.absent_done.set()  # Absent frames come right after Postcopy, all together
        if isinstance(ev, p.Blocks) and state in _FETCH_STATES:
            assert pc is not None and self._nursery is not None
            # A fetched block, for a read that waits: into lazy mode (not through the
            # mount), without waiting for it here.
            self._nursery.start_soon(pc.install, ev)
            return
        handler = _HANDLERS.get(type(ev))
        if handler is not None:
            await handler(self, ev)

    async def _on_blocks(self, ev: p.Blocks) -> None:
        await self._write(self.rx.write_blocks, ev, len(ev.data))

    async def _on_packed(self, ev: p.Packed) -> None:
        await self._write(self.rx.write_packed, ev, ev.size)

    async def _on_pages(self, ev: p.Pages) -> None:
        await self._write(self.rx.write_pages, ev, ev.size)

    async def _write(self, write: Any, ev: p.Event, size: int) -> None:
        if size >= THREAD_WRITE:
            await trio.to_thread.run_sync(write, ev)
        else:  # a thread hop costs more than a small write
            write(ev)

    async def _on_zero(self, ev: p.Zero) -> None:
        await self.rx.write_zero(ev)

    async def _on_resize(self, ev: p.Resize) -> None:
        self.rx.resize(ev)

    async def _on_device_state(self, ev: p.DeviceState) -> None:
        if self.qemu is None:
            raise MigrationError("the source sends a QEMU device state: run 'migrator serve' "
                                 "with --resume qemu:CMDLINE_FILE|QMP_SOCKET")
        self.device_state += ev.data

    async def _on_postcopy(self, ev: p.Postcopy) -> None:
        assert self._nursery is not None
        self.pc = DestPostcopy(self.mount, self.ch, ev, self.block_size, self.spill_override,
                               self.resumed)
        self.pc.on_digests = self._merge_digests
        names = {fid: f.entry.name for fid, f in self.files.items()}
        self._nursery.start_soon(self.pc.setup, names)

    async def _on_absent(self, ev: p.Absent) -> None:
        assert self.pc is not None
        self.pc.add_absent(ev)

    async def _on_spill_refs(self, ev: p.SpillRefs) -> None:
        assert self.pc is not None
        await self.pc.refs(ev)

    async def _on_spill_flushed(self, ev: p.SpillFlushed) -> None:
        log.info("source: spill flushed (%d pages)", ev.pages)

    async def _on_round_done(self, ev: p.RoundDone) -> None:
        if self.replica:
            await self._replica_synced(ev.round)
            await self.ch.send(p.RoundAck(ev.round))
        else:
            await self.ch.send(p.RoundAck(ev.round))
            await self._new_own_swap_epoch()  # (after the ack: the next round is not delayed)

    async def _on_switchover(self, ev: p.Switchover) -> None:
        self.t_switch = time.monotonic()

    async def _set_attrs(self, attrs: tuple[p.FileAttrs, ...]) -> None:
        """The files as they left (mode, owner, times, user xattrs), before the VM starts."""
        if not attrs:  # (an older test engine's source says none)
            return
        for problem in await trio.to_thread.run_sync(self.store.set_attrs, attrs):
            log.warning("%s", problem)

    async def _on_commit(self, ev: p.Commit) -> None:
        pc = self.pc
        assert self._nursery is not None
        await self._set_attrs(ev.attrs)
        if pc is not None:
            t = time.monotonic()
            await pc.begun.wait()  # before the VM can read anything
            log.info("commit %.1f ms after switchover; lazy mode on after %.1f ms more",
                     (t - (self.t_switch or t)) * 1000, (time.monotonic() - t) * 1000)
            self._take_ownership(ev.generation)
            self._nursery.start_soon(self._save_digests_soon)
            self._nursery.start_soon(pc.pump)
            # The VM starts while the post-copy traffic flows (it reads absent pages then).
            self._nursery.start_soon(self._start_vm)
        else:
            # No fsync of the files here: it would lengthen the downtime; they are made
            # durable before the migration is marked complete.
            self._take_ownership(ev.generation)
            self._nursery.start_soon(self._save_digests_soon)
            await self._start_vm()

    async def _on_digests(self, ev: p.Digests | p.ZeroDigests) -> None:
        self.rx.check(ev, self.reattached and not self.digests_saved)

    async def _on_verify_done(self, ev: p.VerifyDone) -> None:
        pc = self.pc
        if pc is not None and pc.stats is not None:
            self.handoff.save(postcopy=cp.to_dict(pc.stats))
        await self.store.sync()
        ok, detail = self.rx.verdict()
        if ok:
            self.handoff.save(status=DestStatus.COMPLETE, completed_at=time.time(),
                              verified=True)
        else:
            self.handoff.save(verified=False, mismatches=self.rx.mismatch_count,
                              detail=detail)
        await self.ch.send(p.Verified(ok, self.rx.mismatch_count, detail))
        if not ok:
            raise VerificationFailed(f"verification failed: {detail}")


_DATA = (p.Blocks, p.Zero, p.Packed, p.Pages)  # copy data: written, never a reason to settle
# What the destination does with each frame the source may send it (the protocol's state
# table says when each may come); a frame not here needs nothing done (Done, Held's kin).
_HANDLERS: dict[type, Callable[[DestSession, Any], Awaitable[None]]] = {
    p.Blocks: DestSession._on_blocks,
    p.Packed: DestSession._on_packed,
    p.Zero: DestSession._on_zero,
    p.Pages: DestSession._on_pages,
    p.Resize: DestSession._on_resize,
    p.DeviceState: DestSession._on_device_state,
    p.Postcopy: DestSession._on_postcopy,
    p.Absent: DestSession._on_absent,
    p.SpillRefs: DestSession._on_spill_refs,
    p.SpillFlushed: DestSession._on_spill_flushed,
    p.RoundDone: DestSession._on_round_done,
    p.Switchover: DestSession._on_switchover,
    p.Commit: DestSession._on_commit,
    p.Digests: DestSession._on_digests,
    p.ZeroDigests: DestSession._on_digests,
    p.VerifyDone: DestSession._on_verify_done,
}


def _host(peer: str) -> str:
    """Where a VM came from, for its record: the source's host (its port is any port)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer
