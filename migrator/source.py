"""`migrator migrate`: the source side of a live pre-copy migration.

Phases (docs/migration.md has the diagram):

1. connect, handshake (mutual HMAC proof of the shared key), manifest;
2. start an epoch on every file (swap), then the initial copy: static blocks
   coldest first, then dynamic blocks, while the epoch collects new writes;
3. rounds: flush (fsync through the mount), swap, send exactly those pages,
   until the planner says the dirty set is small enough or stopped shrinking;
4. switchover: suspend the VM, flush, last swap, send the last set, commit —
   the destination runs its resume hook; downtime = suspend → resumed;
5. verification after the resume: xxh3 of every source block (the source no
   longer changes) against the destination's digests of what it wrote.

Before the destination confirms the resume, any failure resumes the source VM
and leaves its files untouched (the migrator only reads them).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

import trio

from blkfs.bitmap import blocks_of_pages
from blkfs.spill import SpillArea, SpillError, spill_key

from . import protocol as p
from .blockdigests import BlockDigests
from .codecs import CODECS, compressor
from .delta import Holdings
from .errors import BadPeer, ConnectionLost, MigrationError, NotOwner, PeerAborted, first_error
from .handoff import SourceHandoff
from .lineage import source_proof
from .options import MigrateOptions, SourceFile, SourceHooks
from .ownership import OWNER, REFUSED, VMRecord
from .plan import (
    FAULT_REGION,
    RoundPlanner,
    blocks_in,
    initial_order,
    split_memory,
    union_extents,
    warm_budget_blocks,
)
from .postcopy import SourcePostcopy, from_wire, memory_files, warm_hints
from .reconnect import keep_trying
from .report import MigrationReport, Progress
from .rounds import DirtyRounds
from .sending import Sender
from .steered import Steerable
from .stores import SourceFiles, opened
from .transport import Channel
from .verifying import retired_lineage, verification_digests
from .vm import AdapterError, VMAdapter

log = logging.getLogger(__name__)

Extent = tuple[int, int]


class Source(Steerable):
    def __init__(self, opts: MigrateOptions, adapter: VMAdapter,
                 hooks: SourceHooks | None = None) -> None:
        self.opts = opts
        self.adapter = adapter
        self.hooks = hooks or SourceHooks()
        self.report = MigrationReport()
        self.progress = Progress(cap_mb_s=opts.bandwidth_mb_s, vm_name=opts.vm_name or "")
        self.store: SourceFiles | None = None
        self.files: list[SourceFile] = []
        self.block_size = 0
        self.page_size = 0  # the unit of the dirty sets: swaps return pages
        self.ch: Channel | None = None
        self.suspended = False
        self.t_suspend = 0.0
        self.t_copy = 0.0  # the initial copy began
        self.t_epoch = 0.0  # the epoch whose writes the next swap returns began
        self.sent_at_suspend: int | None = None  # bytes on the wire when the VM stopped
        self.sent_at_resume: int | None = None  # ... and when it ran on the destination
        self.t_resume: float | None = None
        self._compress = compressor(opts.compress) if opts.compress else None
        self.switched = False  # the destination said Resumed: the VM runs there
        self.cancelled_by = ""  # why a cancellation came, if one did (migrator cancel)
        self.migration = str(uuid.uuid4())  # this attempt
        self.handoff: SourceHandoff | None = None  # this host's record of the VM
        self.use_postcopy = opts.postcopy == "on"  # memory goes post-copy (decided by rounds)
        self.spill: SpillArea | None = None
        self.memory_ids: set[int] = set()
        self.dest_has: dict[int, Holdings] = {}  # file id -> what the destination holds
        # Lineage: the first swap's dirty sets (what changed since the replica's epoch), of the
        # files the source vouches for, and those the destination accepted
        self.since_replica: dict[int, list[Extent]] = {}
        self.lineage_ok: set[int] = set()
        self.my_digests: dict[int, BlockDigests] = {}  # the verification's, of this copy
        self.pc: SourcePostcopy | None = None
        self.planner: RoundPlanner | None = None  # once the initial copy begins
        # Switch over at the rounds' next decision, whatever the downtime ('migrator set
        # --postcopy', --timeout): (with the memory post-copy?, why)
        self.switch_now: tuple[bool, str] | None = None
        self.target_changed()

    # -- helpers ----------------------------------------------------------------

    @property
    def _store(self) -> SourceFiles:
        assert self.store is not None
        return self.store

    def _phase(self, phase: str) -> None:
        self.progress.phase = phase

    async def _swap(self) -> dict[int, list[Extent]]:
        return await self._store.swap_all([f.file_id for f in self.files])

    async def _sync_sizes(self) -> None:
        assert self.ch is not None
        for f in self.files:
            size = self._store.size(f.file_id)
            if size != f.size:
                await self.ch.send(p.Resize(f.file_id, size))
                f.size = size

    def _sender(self) -> Sender:
        assert self.ch is not None
        return Sender(self.ch, self._store, self.block_size, self.report, self.progress,
                      self.hooks.run_sync, self._compress,
                      CODECS[self.opts.compress] if self.opts.compress else 0)

    async def _send_sets(self, sets: dict[int, list[Extent]],
                         clear: bool = False) -> tuple[int, int]:
        """Send these blocks (sending.py); the initial copy (`clear`) sends only what the
        destination does not hold already."""
        await self._sync_sizes()
        blocks = nbytes = 0
        for f in self.files:
            b, n = await self._sender().send(f, sets.get(f.file_id, []), clear,
                                             self.dest_has.get(f.file_id) if clear else None)
            blocks += b
            nbytes += n
        return blocks, nbytes

    async def _send_pages(self, sets: dict[int, list[Extent]]) -> tuple[int, int]:
        """Send these dirty pages (a round's, the last set's): (pages, bytes)."""
        await self._sync_sizes()
        pages = nbytes = 0
        for f in self.files:
            if sets.get(f.file_id):
                n, b = await self._sender().send_pages(f, sets[f.file_id], self.page_size)
                pages += n
                nbytes += b
        return pages, nbytes

    async def _open_channel(self) -> Channel:
        mb_s = self.opts.bandwidth_mb_s
        return Channel(await self.hooks.connect(self.opts), "source", self.opts.key,
                       mb_s * 1e6 if mb_s else None, self.opts.io_timeout,
                       sealed=not self.opts.plaintext)

    # -- phases -----------------------------------------------------------------

    async def _connect(self) -> None:
        self.ch = await self._open_channel()
        self.progress.channel = self.ch
        await self.ch.handshake()

    @property
    def vm(self) -> VMRecord | None:
        return self.handoff.vm if self.handoff is not None else None

    async def _open_vm(self) -> VMRecord:
        """Open the files and find the VM they are, refusing unless this host is its owner
        (handoff.py asks the rules)."""
        self.store = store = await opened(self.hooks.open_files(self.opts))
        self.handoff = SourceHandoff(store.records, self.opts.mount, self.opts.to,
                                     self.opts.suspend, self.migration)
        rec = self.handoff.open(list(store.names), self.opts.vm_name)
        self.report.vm, self.report.vm_name = rec.id, rec.name
        return rec

    async def _open(self) -> None:
        await self._open_vm()
        store = self._store
        if store.writeback and self.opts.suspend == "freeze":
            raise MigrationError(
                f"{self.opts.mount} is a --writeback mount, where freeze (the default "
                "--suspend) cannot hold the VM's writes (they land in the page cache first): "
                "use --suspend pid:PID or qemu:QMP_SOCKET")
        await store.claim(self.migration, f"migrator migrate pid {os.getpid()} to {self.opts.to}")
        self.block_size = store.block_size
        self.page_size = store.page_size or self.block_size
        self.report.block_size = self.block_size
        self.report.page_size = self.progress.page_size = self.page_size
        self.files = [SourceFile(i, rel, store.size(i)) for i, rel in enumerate(store.names)]
        if self.opts.postcopy != "off":
            self._postcopy_setup(store.names)

    def _postcopy_setup(self, rels: list[str]) -> None:
        """Which files are memory, and a fresh spill area, before anything is sent."""
        mem_rels = memory_files(rels, self.opts.memory_files, self.opts.mount)
        self.memory_ids = {f.file_id for f in self.files if f.rel in mem_rels}
        self.report.postcopy_files = sorted(mem_rels)
        assert self.opts.spill_dir is not None
        try:
            spill_id = str(uuid.uuid4())  # a directory of its own in --spill: many at once
            path = os.path.join(self.opts.spill_dir, spill_id)
            self.spill = SpillArea.create(path, spill_id, self.block_size,
                                          self.opts.spill_slots,
                                          {f.file_id: f.rel for f in self.files},
                                          spill_key(self.opts.key, spill_id))
        except SpillError as exc:
            raise MigrationError(str(exc)) from None

    async def _start_epoch(self, migration: str, replica: bool = False) -> p.Manifest:
        """The first swap (the epoch that collects writes from now on) and the Manifest; with
        delta, the replica this source can vouch for (lineage.py), if any."""
        first: dict[int, list[Extent]] = {}
        for f in self.files:
            first[f.file_id] = await self._store.swap(f.file_id)
            f.size = self._store.size(f.file_id)
        tag, vouched = "", ()
        assert self.vm is not None
        record = self._store.records.read_sync(self.vm.id)
        if self.opts.delta and self.opts.lineage and not self.opts.stop_and_copy and record:
            proof = source_proof(record, {f.rel: (self._store.last_epoch(f.file_id), f.size)
                                          for f in self.files}, await self._store.trust_lost())
            by_name = {f.rel: f.file_id for f in self.files}
            tag, vouched = proof.tag, tuple(by_name[n] for n in proof.files)
            ppb = self.block_size // self.page_size
            self.since_replica = {fid: blocks_of_pages(first[fid], ppb) for fid in vouched}
            self.report.lineage_detail = "; ".join(f"{n}: {w}" for n, w in proof.why_not.items())
        return p.Manifest(self.block_size, self._entries(), migration,
                          self.opts.delta and not self.opts.stop_and_copy, replica, tag, vouched,
                          *self._vm_fields())

    def _entries(self) -> tuple[p.FileEntry, ...]:
        return tuple(p.FileEntry(f.file_id, f.rel, f.size, self._store.allocated(f.file_id))
                     for f in self.files)

    def _vm_fields(self) -> tuple[str, str, int]:
        assert self.vm is not None
        return self.vm.id, self.vm.name, self.vm.generation

    async def _what_the_destination_holds(self, man: p.Manifest) -> None:
        """Lineage (if the Manifest named a replica), then Held frames until Ready: the xxh3 of
        each block of the older copies there."""
        assert self.ch is not None
        bs, r = self.block_size, self.report
        if man.lineage:
            lin = await self.ch.expect(p.Lineage)
            self.lineage_ok = set(lin.accepted)
            r.lineage_files = sorted(f.rel for f in self.files if f.file_id in self.lineage_ok)
            r.lineage_detail = "; ".join(x for x in (lin.detail, r.lineage_detail) if x)
            for fid in self.lineage_ok:
                f = self.files[fid]
                r.lineage_blocks += (f.size + bs - 1) // bs - sum(
                    c for _, c in self.since_replica[fid])
        while not isinstance(ev := await self.ch.expect(p.Held, p.HeldZero, p.Ready), p.Ready):
            f = self.files[ev.file_id]
            if ev.file_id not in self.dest_has:
                self.dest_has[ev.file_id] = Holdings((f.size + bs - 1) // bs)
            if isinstance(ev, p.HeldZero):  # (its holes: a few bytes for any run)
                self.dest_has[ev.file_id].add_zero(ev.first_block, ev.count)
                r.held_blocks += ev.count
                r.held_digest_bytes += len(p.encode(ev)) + p.TAG_SIZE
                continue
            self.dest_has[ev.file_id].add(ev.first_block, ev.digests)
            r.held_blocks += len(ev.digests)
            r.held_digest_bytes += p.HEADER.size + p.DIGESTS_HEAD + 8 * len(ev.digests) + p.TAG_SIZE
        r.delta = ", ".join(w for w, on in (("lineage", self.lineage_ok),
                                            ("digests", self.dest_has)) if on) or "none"

    async def _initial_copy(self, planner: RoundPlanner, round_no: int = 0) -> None:
        assert self.ch is not None
        self._phase("initial copy")
        now = self.t_copy = time.monotonic()
        static: dict[int, list[Extent]] = {}
        dynamic: dict[int, list[Extent]] = {}
        for f in self.files:
            if f.file_id in self.lineage_ok:  # the replica there holds the rest, unchanged
                static[f.file_id], dynamic[f.file_id] = [], self.since_replica[f.file_id]
                self.report.dynamic_blocks += sum(c for _, c in dynamic[f.file_id])
                continue
            runs, threshold = await self._store.heat(f.file_id, self.opts.static_heat)
            nblocks = (f.size + self.block_size - 1) // self.block_size
            if self.opts.static_first:
                static[f.file_id], dynamic[f.file_id] = initial_order(nblocks, runs, threshold)
            else:
                static[f.file_id], dynamic[f.file_id] = [(0, nblocks)] if nblocks else [], []
            self.report.static_blocks += sum(c for _, c in static[f.file_id])
            self.report.dynamic_blocks += sum(c for _, c in dynamic[f.file_id])
        self.progress.pending = (self.report.static_blocks + self.report.dynamic_blocks) * (
            self.block_size // self.page_size)
        b1, n1 = await self._send_sets(static, clear=True)
        b2, n2 = await self._send_sets(dynamic, clear=True)
        # Round 0: wait until the destination wrote it all, so its backlog never
        # lands in the downtime.
        await self.ch.send(p.RoundDone(round_no, b1 + b2, n1 + n2))
        await self.ch.expect(p.RoundAck)
        self.report.initial_copy_s = time.monotonic() - now
        planner.record_transfer(n1 + n2, self.report.initial_copy_s)

    def _resumed(self) -> None:
        self.t_resume = time.monotonic()
        self.sent_at_resume = self.progress.sent

    def _bytes_by_phase(self, now: float) -> None:
        """Bytes on the wire before, during and after the downtime; blocks per second of
        the copy (initial copy to resume)."""
        r = self.report
        before = r.bytes_sent if self.sent_at_suspend is None else self.sent_at_suspend
        during = (r.bytes_sent if self.sent_at_resume is None else self.sent_at_resume) - before
        r.bytes_by_phase = {"before_downtime": before, "during_downtime": during,
                            "after_downtime": r.bytes_sent - before - during}
        if self.t_copy:
            r.blocks_per_s = round(r.blocks_sent / max((self.t_resume or now) - self.t_copy,
                                                       1e-6))

    async def _suspend(self) -> None:
        bd = self.report.downtime_breakdown_ms
        if self.adapter.flush_before_suspend:
            await self._store.flush()
        self.t_suspend = t = time.monotonic()
        self.sent_at_suspend = self.progress.sent
        self.suspended = True
        await self.hooks.run_sync(self.adapter.suspend)
        bd["suspend"] = _ms(t)
        if not self.adapter.flush_before_suspend:
            t = time.monotonic()
            await self._store.flush()
            bd["flush"] = _ms(t)

    async def _switchover(self, held_back: dict[int, list[Extent]],
                          bandwidth: float = 0.0) -> None:
        assert self.ch is not None
        self._phase("switchover")
        bd = self.report.downtime_breakdown_ms
        # Durably give the VM up before the suspend, so the handoff adds no disk write to
        # the downtime; until the Commit is sent, a failure still resumes it here.
        t = time.monotonic()
        assert self.handoff is not None
        self.handoff.begin()
        self.report.handoff_record_ms = _ms(t)
        heat, first = (await warm_hints(self._store, self.memory_ids, self.adapter,
                                        self.hooks.run_sync, self.report)
                       if self.use_postcopy and self.opts.warm_set_ms > 0 else ({}, {}))
        if not self.suspended:
            await self._suspend()
        t = time.monotonic()
        await self.ch.send(p.Switchover())
        last = await self._swap()
        self.report.dirty_sync_count += 1
        union = {f.file_id: union_extents(held_back.get(f.file_id, []), last.get(f.file_id, []))
                 for f in self.files}
        bd["swap"] = _ms(t)
        t = time.monotonic()
        if self.use_postcopy and any(union.get(fid) for fid in self.memory_ids):
            absent, warm = split_memory(
                {fid: union.get(fid, []) for fid in self.memory_ids}, heat,
                warm_budget_blocks(bandwidth, self.opts.bandwidth_mb_s, self.opts.warm_set_ms,
                                   self.block_size),
                self.block_size // self.page_size, max(1, FAULT_REGION // self.block_size),
                first)
            self.report.warm_set_pages = sum(c for e in warm.values() for _f, c in e)
            self.report.load_reads_left_absent = sum(
                len(blocks_in(absent.get(fid, []), b)) for fid, b in first.items())
            if any(absent.values()):
                await self._switchover_postcopy(union, absent, warm, t)
                return
            # (the warm set took every memory page: a plain commit)
        self.report.last_set_pages, _ = await self._send_pages(union)
        await self._send_device_state()
        bd["send_last_set"] = _ms(t)
        t = time.monotonic()
        try:
            await self._hand_off()
            await self.ch.expect(p.Resumed)
        except PeerAborted:
            raise
        except MigrationError as exc:
            if not self.handed_off:
                raise
            await self._reattach(str(exc))  # the destination holds the VM: it said owner
        bd["destination_resume"] = _ms(t)
        self.switched = True
        self.report.downtime_ms = _ms(self.t_suspend)
        self._resumed()

    async def _reattach(self, why: str) -> None:
        """The link broke after Commit: reconnect, with backoff, for up to the io timeout,
        and re-state the migration (protocol.Reattach), so a destination that holds the VM
        goes on where it broke; NotOwner if it does not, MigrationError if it cannot be
        reached. Either way this copy stays suspended (the caller's _fail settles)."""
        timeout = self.opts.io_timeout
        self.hooks.notify(f"connection lost after the handoff ({why}): reconnecting to "
                          f"{self.opts.to} for up to {timeout:g} s")
        if self.ch is not None:
            await self.ch.aclose()
        await keep_trying(self._reattach_once, timeout, why)
        self.report.reattaches += 1
        self.hooks.notify("reattached to the destination: the migration goes on")

    async def _reattach_once(self) -> None:
        assert self.handoff is not None and self.vm is not None
        ch = await self._open_channel()
        try:
            await ch.handshake()
            unfinished = self.pc is not None and not self.pc.finished
            mid = self.migration
            await ch.send(p.Reattach(mid, self.handoff.generation, unfinished))
            await ch.send(p.Manifest(self.block_size, self._entries(), mid,
                                     vm=self.vm.id, vm_name=self.vm.name,
                                     generation=self.vm.generation))
            if unfinished:
                assert self.spill is not None
                await ch.send(self._announcement())
            answer = await ch.expect(p.Answer)
        except BaseException:
            await ch.aclose()
            raise
        if answer.status != OWNER:
            await ch.aclose()
            raise NotOwner(answer.status, f"the destination says: {answer.detail}")
        if self.ch is not None:  # the bytes it carried still count
            self.progress.sent_before += self.ch.bytes_sent
        self.ch = self.progress.channel = ch

    def _announcement(self) -> p.Postcopy:
        assert self.spill is not None
        return p.Postcopy(self.spill.migration, os.path.abspath(self.spill.path),
                          self.spill.nslots)

    async def _hand_off(self) -> None:
        """The point of no return: the record says handing-off already; say Commit."""
        assert self.ch is not None and self.handoff is not None
        if self.ch.peer_closed():  # (then the VM runs on here rather than wait, suspended)
            raise ConnectionLost("the destination closed the connection before the Commit")
        attrs = self._store.attrs()  # (the files as they are at the suspend point)
        self.handoff.commit_sent = True  # before the send: once it starts, it may arrive
        await self.ch.send(p.Commit(self.handoff.generation, attrs))

    @property
    def spilling(self) -> bool:
        """Post-copy pages are still going into the spill area (the VM needs them)."""
        return self.pc is not None and self.pc.stats.spill_flushed_s is None

    @property
    def handed_off(self) -> bool:
        """The VM was given up (Commit sent): it must not run here again unless settled."""
        return self.handoff is not None and self.handoff.handed_off

    async def _send_device_state(self) -> None:
        """The hypervisor's device state (QEMU), saved at suspend, for the destination's."""
        assert self.ch is not None
        saved = getattr(self.adapter, "saved_state", None)
        state = await self.hooks.run_sync(saved) if saved is not None else b""
        for i in range(0, len(state), p.MAX_BLOCKS_DATA):
            await self.ch.send(p.DeviceState(state[i:i + p.MAX_BLOCKS_DATA]))
        self.report.device_state_bytes = len(state)

    async def _switchover_postcopy(self, union: dict[int, list[Extent]],
                                   absent: dict[int, list[Extent]],
                                   warm: dict[int, list[Extent]], t: float) -> None:
        """Disks' last set and the memory's warm set now; the other memory blocks stay absent
        and follow through the spill area."""
        assert self.ch is not None and self.spill is not None
        r = self.report
        bd = r.downtime_breakdown_ms
        last_set = {fid: e for fid, e in union.items() if fid not in self.memory_ids}
        last_set.update(warm)  # (the disks' pages and the memory's warm set)
        # Absent first: the destination turns lazy mode on while the last set flows.
        await self.ch.send(self._announcement())
        for fid, exts in absent.items():
            for i in range(0, len(exts), p.MAX_ITEMS_PER_FRAME):
                await self.ch.send(p.Absent(fid, tuple(exts[i:i + p.MAX_ITEMS_PER_FRAME])))
        r.last_set_pages, _ = await self._send_pages(last_set)
        await self._send_device_state()
        bd["send_last_set"] = _ms(t)
        by_id = {f.file_id: f for f in self.files}
        pc = self.pc = SourcePostcopy(
            self.ch, self.spill, self.block_size, self._store.read,
            {fid: by_id[fid].size for fid in self.memory_ids}, absent,
            self.opts.spill_rate_mb_s * 1e6 if self.opts.spill_rate_mb_s else None)
        r.postcopy_pages = pc.stats.pages
        pc.reconnect = self._reconnect_postcopy
        t = time.monotonic()
        try:
            await self._hand_off()
        except PeerAborted:
            raise
        except MigrationError:
            if not self.handed_off:
                raise
            # The Commit may have arrived: pc.run finds the link broken and reattaches.
        def flushed(n: int) -> None:
            self.progress.spill_flushed = True
            self.hooks.notify(f"spill flushed ({n} pages): the source may now go away")

        pc.on_flushed = flushed
        self._phase("post-copy")
        async with trio.open_nursery() as nursery:
            done: list[p.PostcopyDone] = []

            async def run_pc() -> None:
                done.append(await pc.run())

            nursery.start_soon(run_pc)
            await pc.resumed.wait()
            bd["destination_resume"] = _ms(t)
            self.switched = True
            r.downtime_ms = r.resume_ms = _ms(self.t_suspend)
            self._resumed()
            self.hooks.notify(f"resumed on the destination after {r.downtime_ms} ms; "
                              f"post-copy of {pc.stats.pages} pages")
        st = pc.stats
        r.postcopy = from_wire(done[0].stats)
        r.postcopy_s = round(time.monotonic() - t, 3)
        r.spill_flushed_s = st.spill_flushed_s
        r.slot_reuses = st.slot_reuses
        r.pages_spilled = st.spilled
        for fid, n in st.fetched_bytes.items():
            name = by_id[fid].rel
            r.bytes_by_file[name] = r.bytes_by_file.get(name, 0) + n
        r.spill_bytes = st.spilled_bytes

    async def _reconnect_postcopy(self, why: str) -> Channel:
        await self._reattach(why)
        assert self.ch is not None
        return self.ch

    async def _verify(self) -> None:
        """Until the destination's verdict, reattaching if the link breaks meanwhile."""
        assert self.ch is not None
        self._phase("verifying")
        t = time.monotonic()
        while True:
            try:
                v = await self._verify_once()
                break
            except PeerAborted:
                raise
            except MigrationError as exc:
                await self._reattach(str(exc))
        self.report.verify_s = round(time.monotonic() - t, 3)
        if v.ok:
            try:
                await self.ch.send(p.Done())
            except MigrationError as exc:  # proven all the same: the destination said so
                self.hooks.notify(f"the last frame (Done) did not reach the destination: {exc}")
        self._verdict(v)

    async def _verify_once(self) -> p.Verified:
        assert self.ch is not None
        for f in self.files:
            keep = self.my_digests[f.file_id] = BlockDigests()
            for frame in verification_digests(self._store, f, self.block_size, keep):
                await self.ch.send(frame)
        await self.ch.send(p.VerifyDone())
        return await self.ch.expect(p.Verified)

    def _verdict(self, v: p.Verified) -> None:
        self.report.verified = v.ok
        if not v.ok:
            self.report.mismatched_blocks = v.mismatches
            self.report.verify_detail = v.detail
            assert self.handoff is not None
            self.handoff.unverified(f"{v.mismatches} blocks differ: {v.detail}")
            self.report.source_vm = ("kept suspended, files untouched: it is the good copy")
            raise MigrationError(
                f"VERIFICATION FAILED: {v.mismatches} blocks differ on the destination "
                f"({v.detail}); the source copy stays suspended and intact: stop the VM on the "
                f"destination, then resume it here with 'migrator resolve --mount "
                f"{self.opts.mount} --resume-here'")
        # The copy is proven: only now is the source copy retired.
        self.report.source_vm = self.adapter.finish()
        assert self.handoff is not None
        self.handoff.retire(self._keep_lineage())
        self.report.generation = self.handoff.record.generation

    def _keep_lineage(self) -> dict[str, Any] | None:
        assert self.vm is not None
        return retired_lineage(self._store, self.vm.id, self.migration, self.block_size,
                               self.files, self.my_digests, self.hooks.notify)

    # -- the whole migration --------------------------------------------------------

    async def run(self) -> MigrationReport:
        r = self.report
        t0 = time.monotonic()
        planner: RoundPlanner | None = None
        try:
            await self._open()
            await self._connect()
            assert self.ch is not None
            # Writes still in the page cache (a --writeback mount, or mmap'ed RAM) reach the
            # backing files first: the initial copy reads them, and the heat counts them.
            await self._store.flush()
            man = await self._start_epoch(self.migration)
            self.t_epoch = time.monotonic()
            r.files = [{"name": f.rel, "size": f.size} for f in self.files]
            r.data_bytes = self.progress.total = sum(f.size for f in self.files)
            await self.ch.send(man)
            r.migration = self.progress.migration = man.migration
            await self._what_the_destination_holds(man)
            r.setup_ms = round((time.monotonic() - t0) * 1000, 2)
            r.status = "active"
            planner = self.planner = RoundPlanner(self.opts.policy, self.block_size,
                                                  self.page_size)
            if self.use_postcopy:
                planner.enter_postcopy()
                self.target_changed()
            if self.opts.stop_and_copy:
                await self._suspend()
            await self._initial_copy(planner)
            held_back = ({} if self.opts.stop_and_copy
                         else await DirtyRounds(self, planner).run())
            await self._switchover(held_back, planner.bandwidth)
            await self._verify()
            r.status = "completed"
        except BaseException as exc:  # errors, Ctrl-C and cancellation alike
            r.status = "failed"
            r.error = self.cancelled_by or _message(exc)
            await self._fail(r.error, first_error(exc))
            raise
        finally:
            r.total_s = round(time.monotonic() - t0, 3)
            r.phase = "done" if r.status == "completed" else self.progress.phase
            if planner is not None and planner.bandwidth > 0:
                r.mbps = round(planner.bandwidth / 1e6, 1)
            r.bytes_sent = self.progress.sent
            self._bytes_by_phase(time.monotonic())
            if self.ch is not None:  # (shielded: under a cancel, the rest and the report too)
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await self.ch.aclose()
            if self.spill is not None:  # kept only for a destination that may still read it
                (self.spill.discard if r.status == "completed" or not self.handed_off
                 else self.spill.close)()
            if self.store is not None:
                self.store.close()
            if self.opts.report_path:
                r.write(self.opts.report_path)
        return r

    async def _fail(self, reason: str, exc: BaseException) -> None:
        """Say why to the peer, and leave exactly one VM running (docs/migration.md).

        Before the handoff the source copy runs again. After it, only the destination's
        Abort (it never took the VM) lets the source copy run again; anything else (the link
        cut, a crash or Ctrl-C there or here) leaves it suspended, and the user is told the
        one command that settles it."""
        r = self.report
        with trio.CancelScope(shield=True):
            refused = (isinstance(exc, PeerAborted) or (isinstance(exc, NotOwner)
                       and exc.status == REFUSED)) and not self.switched
            if self.handoff is not None:  # first the record: as it was, or still unsettled
                commit_sent = self.handoff.commit_sent
                bad = self.handoff.failed(reason, refused, exc.owner_generation
                                          if isinstance(exc, PeerAborted) else -1)
                if bad:
                    r.error = f"{reason}; and {bad}"
            else:
                commit_sent = False
            if not self.handed_off or refused:
                try:
                    if self.suspended:
                        await self.hooks.run_sync(self.adapter.resume)
                        self.suspended = False
                        if commit_sent:
                            r.source_vm = "resumed here: the destination refused the VM"
                except Exception as exc2:  # (whatever it is, the user must hear it)
                    r.error = f"{reason}; and resuming the source VM failed: {exc2}"
            elif self.handed_off:
                where = ("runs on the destination" if self.switched
                         else "may run on the destination")
                r.source_vm = f"kept suspended: the VM {where}"
                r.error = (f"{reason}; the VM {where}, its copy here stays suspended: settle "
                           f"with 'migrator resolve --mount {self.opts.mount} --to "
                           f"{self.opts.to} --key-file KEY'")
            if self.ch is not None:  # (what the peer did wrong, not what we call it)
                await self.ch.abort(exc.reason if isinstance(exc, BadPeer) else reason)

def _ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 2)


def _message(exc: BaseException) -> str:
    exc = first_error(exc)
    if isinstance(exc, (trio.Cancelled, KeyboardInterrupt)):
        return "interrupted"
    if isinstance(exc, OSError):
        return f"I/O error: {exc}"
    if isinstance(exc, (MigrationError, AdapterError, p.ProtocolError)):
        return str(exc)
    return f"internal error: {exc!r}"
