"""Post-copy (DESIGN.md flow 4): the spill writer and fetch server on the source, the bridge
between the migration connection and the destination daemon's lazy mode on the destination.

Source, from Commit on (the VM is suspended, so every remaining page is final):

* the *spill writer*, once the destination says the VM runs (SPILL_START_GRACE at most: the
  CPUs are the destination's while it starts the VM), puts each remaining page into a slot of
  the spill area (allocating from the free list, waiting for frees when all N are in use) and
  tells the destination where (SpillRefs); when every page is in, it makes the area durable
  and says SpillFlushed — from then on the source may vanish;
* the *receiver* answers Fetch at once (ahead of the spill stream) with Blocks
  read from the backing file, and returns freed slots to the allocator.

Destination: lazy_begin on its blkfs before the resume hook runs; spill refs
and fetched blocks go to the daemon over its control socket; a long poll
(lazy_wait) brings back the blocks a read waits for (sent as Fetch) and the
slots the daemon freed (sent as SlotFree), until every block is installed.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import trio

from blkfs import ctlproto as cp
from blkfs.control import AsyncControlClient, ControlError
from blkfs.spill import SlotAllocator, SlotHeader, SlotRef, SpillArea, pack_refs, spill_key

from . import protocol as p
from .errors import BadPeer, MigrationError, NotOwner
from .plan import blocks_of_ranges
from .transport import Channel

if TYPE_CHECKING:
    from .report import MigrationReport
    from .stores import HeatRuns, SourceFiles

log = logging.getLogger(__name__)

Extent = tuple[int, int]
SPILL_BATCH = 64  # pages per SpillRefs frame (and per thread hop of the writer)
FETCH_GAP = 4  # present blocks a Fetch may bridge to ask for two runs of a read in one
RECLAIM_POLL = 0.5  # s between reads of the area's installed file while cut off
# The spill waits for the VM to run on the destination, this long at most: until then the
# two cores of a small host are the destination's, starting the VM (QEMU loading its device
# state competed with the spill writer and the drain for them: 16-28 ms of load, 7-11 alone).
SPILL_START_GRACE = 0.25
MEMORY_SUFFIXES = (".mem", ".ram")


def is_memory_file(name: str) -> bool:
    """Default for which files are memory (post-copied); disks always stay pre-copy."""
    base = os.path.basename(name).lower()
    return base.endswith(MEMORY_SUFFIXES) or "memory" in base or base.startswith("mem")


def memory_files(rels: list[str], named: list[str] | None, mount: str) -> set[str]:
    """The migrated files that are memory: those named (--memory, relative to the mount or
    absolute under it), else those whose names say so (is_memory_file)."""
    if named:
        got = {os.path.normpath(os.path.relpath(m, mount) if os.path.isabs(m) else m)
               for m in named}
        unknown = got - set(rels)
        if unknown:
            raise MigrationError(f"--memory {sorted(unknown)[0]} is not one of the migrated "
                                 "files")
        return got
    got = {r for r in rels if is_memory_file(r)}
    if not got:
        raise MigrationError("--postcopy: no memory file among the migrated files; name it "
                             "with --memory FILE (disks always stay pre-copy)")
    return got


def runs(blocks: Iterable[int], limit: int, gap: int = 0) -> list[Extent]:
    """Sorted blocks as (first, count) runs of at most `limit` blocks, bridging up to `gap`
    blocks not asked for between two runs (one round trip for a read's blocks instead of one
    per run: a bridged block already present is an install that changes nothing, one still
    absent is installed early)."""
    out: list[Extent] = []
    for b in sorted(set(blocks)):
        if out:
            first, count = out[-1]
            if first + count <= b <= first + count + gap and b - first < limit:
                out[-1] = (first, b - first + 1)
                continue
        out.append((b, 1))
    return out


def to_wire(stats: cp.PostcopyStats) -> p.PostcopyFigures:
    """The daemon's post-copy figures as PostcopyDone carries them.  The wire has a type of
    its own, so a figure blkfs adds stays here until the protocol names it too."""
    return p.PostcopyFigures(**{f.name: getattr(stats, f.name) for f in fields(p.PostcopyFigures)})


def from_wire(figures: p.PostcopyFigures) -> cp.PostcopyStats:
    """The destination daemon's figures, as it sent them, in the daemon's type (the report's):
    those the wire carries and the daemon does not (any more) count are left out."""
    known = {f.name for f in fields(cp.PostcopyStats)}
    return cp.PostcopyStats(**{k: v for k, v in asdict(figures).items() if k in known})


# -- source ----------------------------------------------------------------------------------


@dataclass
class SourceStats:
    pages: int = 0  # pages left absent at switchover
    spilled: int = 0
    slot_reuses: int = 0
    spill_flushed_s: float | None = None  # after Commit
    spilled_bytes: int = 0
    fetched_bytes: dict[int, int] = field(default_factory=dict)  # by file id


class SourcePostcopy:
    """The source's side from Commit to the destination's PostcopyDone."""

    def __init__(self, ch: Channel, spill: SpillArea, block_size: int,
                 read: Callable[[int, int, int], bytes], sizes: dict[int, int],
                 absent: dict[int, list[Extent]], spill_rate: float | None = None) -> None:
        self.ch = ch
        self.spill_rate = spill_rate  # bytes/s into the spill area (shared storage), or None
        self.spill = spill
        self.alloc = SlotAllocator(spill.nslots)
        self.bs = block_size
        self.read = read  # (file_id, offset, length) of the suspended source's files
        self.sizes = sizes
        self.todo: deque[tuple[int, int]] = deque(
            (fid, b) for fid, exts in absent.items() for first, n in exts
            for b in range(first, first + n))
        self.headers: dict[int, SlotHeader] = {}
        self.stats = SourceStats(pages=len(self.todo))
        self._freed = trio.Event()
        self.resumed = trio.Event()
        self.t_commit = time.monotonic()
        self.on_flushed: Callable[[int], None] | None = None  # for the CLI's line
        self.link_lost = False  # the destination is out of reach: spill on regardless
        # Called when the link breaks: a new channel to a destination session that goes on
        # with this post-copy (protocol.Reattach), or MigrationError when none will.
        self.reconnect: Callable[[str], Awaitable[Channel]] | None = None
        self.reconnecting = False
        self.finished = False  # the destination said PostcopyDone

    def _page(self, file_id: int, block: int) -> bytes:
        size = self.sizes[file_id]
        n = max(0, min(self.bs, size - block * self.bs))
        data = self.read(file_id, block * self.bs, n)
        if len(data) != n:
            raise MigrationError(f"source file {file_id} shrank under the migration")
        return data

    async def run(self) -> p.PostcopyDone:
        """Until the destination has every page; returns its PostcopyDone.

        The spill writer's duty outlives the link: if the destination goes out of reach,
        every remaining page still goes into the spill area (flushed, marked), since the
        destination's blkfs completes from it alone; only then is the lost link reported."""
        result: list[p.PostcopyDone] = []
        lost: list[MigrationError] = []
        async with trio.open_nursery() as nursery:

            async def spill() -> None:
                await self._spill_writer()
                if lost:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(spill)

            async def receive() -> None:
                while True:
                    try:
                        await receive_events()
                        return
                    except MigrationError as exc:
                        self.link_lost = True
                        if not await self._reconnect(str(exc), lost):
                            self._freed.set()  # a writer waiting for frees must hear it
                            if self.stats.spill_flushed_s is not None or (
                                    isinstance(lost[0], NotOwner)
                                    and lost[0].status == "refused"):  # no VM needs them
                                nursery.cancel_scope.cancel()
                            return

            async def receive_events() -> None:
                while True:
                    ev = await self.ch.receive()
                    if isinstance(ev, p.Fetch):
                        await self._answer(ev)
                    elif isinstance(ev, p.SlotFree):
                        self._release(ev)
                    elif isinstance(ev, p.Resumed):
                        self.resumed.set()
                    elif isinstance(ev, p.PostcopyDone):
                        self.finished = True
                        result.append(ev)
                        nursery.cancel_scope.cancel()
                        return
                    else:
                        raise BadPeer(f"{type(ev).__name__} during post-copy")

            nursery.start_soon(receive)
        if lost:
            raise lost[0]
        # Every page is installed now, including those whose SlotFree would have crossed
        # PostcopyDone on the wire: the headers say so, for `blkfs spill`.
        for slot, h in self.headers.items():
            if self.alloc.release(SlotRef(slot, h.generation)):
                self.spill.mark_free(SlotRef(slot, h.generation), h)
        self.stats.slot_reuses = self.alloc.reuses
        return result[0]

    async def _reconnect(self, why: str, lost: list[MigrationError]) -> bool:
        """The link broke: a new one to a destination session that goes on, if possible.
        Meanwhile the writer spills on (the refs it cannot send, the area holds)."""
        if self.reconnect is None:
            lost.append(MigrationError(why))
            return False
        self.reconnecting = True
        try:
            self.ch = await self.reconnect(why)
        except MigrationError as exc:
            lost.append(exc)
            return False
        finally:
            self.reconnecting = False
        self.link_lost = False
        self.resumed.set()  # the destination holds the VM: it said owner
        # What the destination's new session cannot know: where the unconfirmed pages are.
        refs = [(h.file_id, h.block, ref.slot, ref.generation)
                for ref in self.alloc.in_use()
                if (h := self.headers.get(ref.slot)) is not None
                and h.generation == ref.generation]
        for i in range(0, len(refs), p.MAX_ITEMS_PER_FRAME):
            await self.ch.send(p.SpillRefs(tuple(refs[i:i + p.MAX_ITEMS_PER_FRAME])))
        if self.stats.spill_flushed_s is not None:
            await self.ch.send(p.SpillFlushed(self.stats.spilled))
        self._freed.set()
        return True

    async def _answer(self, ev: p.Fetch) -> None:
        if ev.file_id not in self.sizes:
            raise BadPeer(f"fetch of file {ev.file_id}, which is not post-copied")
        size = self.sizes[ev.file_id]
        start = ev.first_block * self.bs
        n = max(0, min(ev.count * self.bs, size - start))
        data = self.read(ev.file_id, start, n) if n else b""
        if not data:
            return
        fb = self.stats.fetched_bytes
        fb[ev.file_id] = fb.get(ev.file_id, 0) + len(data)
        await self.ch.send(p.Blocks(ev.file_id, ev.first_block, data))

    def _release(self, ev: p.SlotFree) -> None:
        for slot, gen in ev.slots:
            ref = SlotRef(slot, gen)
            if self.alloc.release(ref):
                h = self.headers.get(slot)
                if h is not None and h.generation == gen:
                    self.spill.mark_free(ref, h)
        self._freed.set()

    async def _spill_writer(self) -> None:
        # Every page goes in, the fetched ones too: a fetched page may never have reached the
        # destination's daemon (its migrator can die in between), and once the area is
        # marked flushed, a page not in it is taken for lost there.
        with trio.move_on_after(SPILL_START_GRACE):
            await self.resumed.wait()  # (its faults are answered meanwhile, at once)
        sent = 0
        t0 = time.monotonic()
        stuck_since: float | None = None  # cut off, and no slot to reuse since then
        while self.todo:
            batch: list[tuple[SlotRef, int, int]] = []
            while self.todo and len(batch) < SPILL_BATCH:
                fid, b = self.todo[0]
                ref = self.alloc.allocate()
                if ref is None:
                    break
                self.todo.popleft()
                batch.append((ref, fid, b))
            if not batch:  # every slot holds a page not confirmed installed yet
                if self.link_lost:
                    if await self._reclaim_installed():
                        stuck_since = None
                        continue
                    stuck_since = stuck_since or time.monotonic()
                    if (not self.reconnecting
                            and time.monotonic() - stuck_since > self.ch.io_timeout):
                        raise MigrationError(
                            f"{len(self.todo)} pages could not be spilled: every slot holds a "
                            "page the destination has not confirmed, and it is out of reach")
                self._freed = trio.Event()
                with trio.move_on_after(RECLAIM_POLL if self.link_lost else math.inf):
                    await self._freed.wait()
                continue
            if self.spill_rate:  # token bucket, as on the link: this batch's bytes first
                ahead = (sent + len(batch)) * self.bs / self.spill_rate - (time.monotonic() - t0)
                if ahead > 0:
                    await trio.sleep(ahead)

            def write(batch: list[tuple[SlotRef, int, int]] = batch) -> list[SlotHeader]:
                return [self.spill.put(ref, fid, b, self._page(fid, b)) for ref, fid, b in batch]

            try:
                headers = await trio.to_thread.run_sync(write)
            except OSError as exc:
                raise MigrationError(f"cannot write the spill area {self.spill.path}: "
                                     f"{exc.strerror or exc}") from None
            for (ref, _fid, _b), h in zip(batch, headers, strict=True):
                self.headers[ref.slot] = h
                self.stats.spilled_bytes += h.length
            sent += len(batch)
            self.stats.spilled = sent
            await self._tell(p.SpillRefs(tuple((fid, b, ref.slot, ref.generation)
                                               for ref, fid, b in batch)))
        await trio.to_thread.run_sync(self.spill.flush)
        await trio.to_thread.run_sync(self.spill.mark_flushed, sent)
        self.stats.spill_flushed_s = round(time.monotonic() - self.t_commit, 3)
        log.info("spill flushed: %d pages", sent)
        if self.on_flushed is not None:
            self.on_flushed(sent)
        await self._tell(p.SpillFlushed(sent))

    async def _reclaim_installed(self) -> int:
        """Cut off from the destination: the slots its daemon says (in the area) it
        installed are free again. Returns how many."""
        try:
            gens = await trio.to_thread.run_sync(self.spill.installed)
        except OSError:
            return 0
        n = 0
        for ref in self.alloc.in_use():
            h = self.headers.get(ref.slot)
            if gens[ref.slot] == ref.generation and h is not None and self.alloc.release(ref):
                self.spill.mark_free(ref, h)
                n += 1
        if n:
            log.info("cut off from the destination: %d slots it installed are reused", n)
        return n

    async def _tell(self, event: p.Event) -> None:
        """Tell the destination, unless it is out of reach: the spill area says it too."""
        if self.link_lost:
            return
        try:
            await self.ch.send(event)
        except MigrationError:
            self.link_lost = True


# -- destination ----------------------------------------------------------------------------


def _dest_spill_path(override: str | None, announce: p.Postcopy) -> str:
    """Where this host sees the announced area: `serve --spill DIR` is where it sees the
    source's --spill DIR, and each migration's area is a directory of its own in it (a
    source of an older version wrote its area into DIR itself)."""
    if override is None:
        return announce.spill
    if "/" in announce.migration or announce.migration in ("", ".", ".."):
        return override  # (not a name: never a path out of DIR)
    own = os.path.join(override, announce.migration)
    return own if os.path.isdir(own) else override


class DestPostcopy:
    """The destination's bridge: migration connection <-> lazy mode of its blkfs daemon.

    `setup` (a task started at Postcopy) connects to the daemon and checks the spill area
    while the Absent frames arrive, then turns lazy mode on once `absent_done` says they are
    all in; `begun` is set from then on.  `resumed` is the session's: PostcopyDone waits
    for it."""

    def __init__(self, mount: str, ch: Channel, announce: p.Postcopy, block_size: int,
                 spill_override: str | None, resumed: trio.Event) -> None:
        self.mount = mount
        self.ch = ch
        self.announce = announce
        self.block_size = block_size
        self.spill_path = _dest_spill_path(spill_override, announce)
        self.spill_key = spill_key(ch.key, announce.migration)  # all the daemon gets of it
        self.absent: dict[int, list[Extent]] = {}
        self.absent_done = trio.Event()  # every Absent frame is in
        self.begun = trio.Event()  # lazy mode is on in the daemon
        self.resumed = resumed
        self.spill_usable = True
        self.ctl: AsyncControlClient | None = None
        self.poll: AsyncControlClient | None = None
        self.inst: AsyncControlClient | None = None  # fetched blocks: never queued behind refs
        self.stats: cp.PostcopyStats | None = None
        self.digests: tuple[tuple[int, int, int], ...] = ()
        self.on_digests: Callable[[], None] | None = None  # once `digests` are in

    def add_absent(self, ev: p.Absent) -> None:
        self.absent.setdefault(ev.file_id, []).extend(ev.extents)

    async def _connect(self, sndbuf: int | None = None) -> AsyncControlClient:
        try:
            return await AsyncControlClient.for_mount(self.mount, sndbuf)
        except ControlError as exc:
            raise MigrationError(str(exc)) from None

    async def _call(self, client: AsyncControlClient | None, req: cp.Request) -> object:
        if client is None:
            raise MigrationError("post-copy: the connection to the blkfs daemon failed")
        try:
            return await client.call(req)
        except ControlError as exc:
            raise MigrationError(f"blkfs: {exc}") from None

    async def setup(self, names: dict[int, str]) -> None:
        """Lazy mode on, before the VM resumes: from then on its reads of absent blocks wait.
        What needs no absent map (connections, the spill check) runs while Absent arrives."""
        t0 = time.monotonic()
        try:
            area = SpillArea.open(self.spill_path, self.announce.migration, self.spill_key)
            area.close()
        except Exception as exc:  # SpillError, OSError: fetch everything instead
            log.warning("spill area unusable (%s): every remaining page is fetched from "
                        "the source", exc)
            self.spill_usable = False
        self.ctl = await self._connect()
        self.poll = await self._connect()
        # Fetched blocks go to the daemon in one write (1 MiB faults), not in 200 KiB rounds
        # of the default buffer, each waiting for the other process to run.
        self.inst = await self._connect(sndbuf=4 << 20)
        await self.absent_done.wait()
        t1 = time.monotonic()
        files = tuple(cp.LazyFileSpec(fid, names[fid], tuple(exts))
                      for fid, exts in self.absent.items())
        await self._call(self.ctl, cp.LazyBegin(
            self.announce.migration, self.block_size,
            self.spill_path if self.spill_usable else None, files,
            self.spill_key.hex() if self.spill_usable else None))
        self.begun.set()
        log.info("lazy mode on: %.1f ms to connect, lazy_begin %.1f ms", (t1 - t0) * 1000,
                 (time.monotonic() - t1) * 1000)

    async def reattach(self) -> None:
        """A session the source reattached: lazy mode is on in the daemon already (the store
        took it back with lazy_reattach); only the connections are new."""
        self.ctl = await self._connect()
        self.poll = await self._connect()
        self.inst = await self._connect(sndbuf=4 << 20)
        self.absent_done.set()
        self.begun.set()

    async def refs(self, ev: p.SpillRefs) -> None:
        if self.spill_usable:
            await self._call(self.ctl, cp.LazyRefs(pack_refs(ev.refs), self.announce.migration))
            return
        # No spill here: fetch those pages instead, and free their slots at once.
        by_file: dict[int, list[int]] = {}
        for fid, b, _s, _g in ev.refs:
            by_file.setdefault(fid, []).append(b)
        await self._fetch(by_file)
        await self.ch.send(p.SlotFree(tuple((s, g) for _f, _b, s, g in ev.refs)))

    async def install(self, ev: p.Blocks) -> None:
        """A fetched block (a read waits for it): on its own connection, off the event
        handler's queue."""
        await self._call(self.inst, cp.LazyInstall(ev.file_id, ev.first_block, ev.data,
                                                         self.announce.migration))

    async def _fetch(self, by_file: dict[int, list[int]]) -> None:
        limit = max(1, p.MAX_BLOCKS_DATA // self.block_size)
        for fid, blocks in by_file.items():
            for first, count in runs(blocks, limit, FETCH_GAP):
                await self.ch.send(p.Fetch(fid, first, count))

    async def pump(self) -> None:
        """Carry the daemon's wants and frees to the source until every block is installed."""
        while True:
            news = await self._call(self.poll, cp.LazyWait(1.0, self.announce.migration))
            assert isinstance(news, cp.News)
            by_file: dict[int, list[int]] = {}
            for fid, b in news.wanted:
                by_file.setdefault(fid, []).append(b)
            if by_file:
                await self._fetch(by_file)
            freed = news.freed
            for i in range(0, len(freed), p.MAX_ITEMS_PER_FRAME):
                await self.ch.send(p.SlotFree(freed[i:i + p.MAX_ITEMS_PER_FRAME]))
            if news.done:
                break
        await self.resumed.wait()  # PostcopyDone only after Resumed
        await self._report(self.poll)
        assert self.stats is not None
        await self.ch.send(p.PostcopyDone(to_wire(self.stats)))

    async def _report(self, client: AsyncControlClient | None) -> None:
        rep = await self._call(client, cp.LazyReport(True, self.announce.migration))
        assert isinstance(rep, cp.LazyReportReply)
        self.stats, self.digests = rep.stats, rep.digests
        if self.on_digests is not None:
            self.on_digests()  # before PostcopyDone: the source's Digests come after it

    async def source_lost(self, quiet: float) -> tuple[int, cp.News]:
        """The daemon completes from the spill area alone (as pages keep arriving there);
        wait for it to finish, or to name what will never come, as long as blocks arrive:
        `quiet` s without one end the wait. Returns (pages found in the area at once, the
        news at the end)."""
        ctl = await self._connect()
        try:
            out = await self._call(ctl, cp.LazySourceLost(self.announce.migration))
            assert isinstance(out, cp.SourceLostReply)
            news = out.news
            last = time.monotonic()
            while not news.done and not news.missing_count:
                left = last + quiet - time.monotonic()
                if left <= 0:
                    break
                got = await self._call(ctl, cp.LazyWait(min(1.0, left),
                                                        self.announce.migration))
                assert isinstance(got, cp.News)
                if got.remaining < news.remaining:
                    last = time.monotonic()
                news = got
            await self._report(ctl)
        finally:
            await ctl.aclose()
        return out.found_in_spill, news

    async def give_up(self) -> None:
        """This host will not run the VM: its absent blocks are missing for good (EIO)."""
        ctl = await self._connect()
        try:
            await self._call(ctl, cp.LazyGiveUp(self.announce.migration))
        finally:
            await ctl.aclose()

    async def aclose(self) -> None:
        for c in (self.ctl, self.poll, self.inst):
            if c is not None:
                with trio.move_on_after(1):
                    await c.aclose()


async def warm_hints(store: SourceFiles, memory_ids: set[int], adapter: Any,
                     run_sync: Callable[..., Awaitable[Any]], report: MigrationReport
                     ) -> tuple[dict[int, HeatRuns], dict[int, set[int]]]:
    """What the memory's blocks are worth to the destination's start, asked while the VM
    still runs: their heat (a query of a large file takes milliseconds), and the blocks the
    hypervisor reads while it loads its state (QEMU: its virtio rings), if it says."""
    heat = {fid: (await store.heat(fid, None))[0] for fid in memory_ids}
    reads = getattr(adapter, "load_reads", None)
    if reads is None or len(memory_ids) != 1:  # (which file is its RAM?)
        return heat, {}
    try:
        blocks = blocks_of_ranges(await run_sync(reads), report.block_size)
    except Exception as exc:  # a hint: the migration goes on without it
        log.warning("%s could not say what it reads at load: %r", adapter.name, exc)
        return heat, {}
    report.load_reads = len(blocks)
    return heat, {fid: blocks for fid in memory_ids}
