"""Destination lazy mode (post-copy): absent blocks, served from spill slots or fetched.

The migrator (``migrator serve``) turns it on for some files with the
``lazy_begin`` control op, before the VM resumes (`LazyMode.begin`: it opens the
backing files, makes their trackers point here, drops the kernel's cached pages and
starts the drain).  From then on, inside the daemon's trio loop:

* a read or write that touches an absent block waits (``ensure``) until the
  block is installed — first from its spill slot if the migrator told us one
  (generation checked before and after the read, hash checked), else by a
  demand fetch: the block joins ``wanted``, which the migrator collects with
  the long-polling ``lazy_wait`` op and fetches from the source ahead of the
  background stream, then hands back with ``lazy_install``;
* a background drain installs every block whose slot it was told
  (``lazy_refs``) in the order told, and reports the slots it freed;
* ``install`` is the only writer of absent blocks: on the trio thread, no
  await between the absent check and the pwrite, so a guest write (which
  waits for the install first) can never be overwritten by a late install.

If nobody fetches for us any more (the migrator's connection closed, or it lost the
source: ``lazy_source_lost``), post-copy is *paused*: the spill headers are scanned
again and again and every page found there is installed (those a reader waits for
too); readers of other blocks wait.  Only once the source has marked the area
flushed (or a person gives up: ``lazy_give_up``) is a block not found *missing*:
reads of it raise BlockMissing, which the FUSE layer answers with EIO (never zeros
or stale bytes).  Nothing here knows FUSE.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
import xxhash

from .absent import AbsentMap
from .ctlproto import MAX_LISTED, News, PostcopyStats
from .spill import FLAG_FILLED, Refused, SlotRef, SpillArea, SpillError
from .tracker import FileKey, FileTracker

log = logging.getLogger(__name__)

DRAIN_BATCH = 32  # slots read per thread hop by the drain
MAX_LATENCIES = 1 << 16


class LazyError(Exception):
    """Lazy mode cannot do what was asked; the message is for the user."""


class BlockMissing(Exception):
    """An absent block that no one can supply any more (the source is lost)."""


@dataclass
class LazyFile:
    file_id: int
    rel: str
    key: FileKey
    fd: int  # read-write fd on the backing file: installs go here
    absent: AbsentMap
    size: int
    refs: dict[int, SlotRef] = field(default_factory=dict)  # block -> slot told by the source
    digests: dict[int, int] = field(default_factory=dict)  # block -> xxh3 of what was installed
    missing: set[int] = field(default_factory=set)  # absent, and no one can supply it any more
    owner: Postcopy | None = field(default=None, repr=False)  # the post-copy it arrives by

    def resize(self, size: int, nblocks: int) -> None:
        """The file was truncated or extended through the mount."""
        self.size = size
        self.absent.truncate(nblocks)


class Postcopy:
    """Lazy mode of one incoming migration, inside the destination daemon."""

    def __init__(self, migration: str, block_size: int, spill: SpillArea | None) -> None:
        self.migration = migration
        self.block_size = block_size
        self.spill = spill
        self.files: dict[FileKey, LazyFile] = {}
        self.by_id: dict[int, LazyFile] = {}
        self._pending: dict[tuple[int, int], trio.Event] = {}  # being obtained
        self._wanted: list[tuple[int, int]] = []  # to fetch, not yet handed to the migrator
        self._freed: list[tuple[int, int]] = []  # (slot, generation) to report
        self._installed: dict[int, int] = {}  # slot -> generation installed from it, ever
        self._unpublished: set[int] = set()  # slots whose _installed the area does not show
        self._queue: deque[tuple[int, int]] = deque()  # (file_id, block) refs for the drain
        self._queue_ready = trio.Event()
        self._news = trio.Event()
        self._drain_lock = trio.Lock()  # one drain at a time: a batch in flight is finished
        self.given_up = False  # no one will fetch: absent blocks not in the spill are missing
        self.paused: str | None = None  # why nobody fetches for us now (see orphan)
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self.counts = PostcopyStats()  # the counters; report() adds the rest
        self.fault_ms: list[float] = []

    # -- setup ---------------------------------------------------------------------

    def add_file(self, lf: LazyFile) -> None:
        lf.owner = self
        self.files[lf.key] = lf
        self.by_id[lf.file_id] = lf

    @property
    def remaining(self) -> int:
        return sum(lf.absent.count for lf in self.files.values())

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def missing(self) -> list[tuple[str, int]]:
        return [(lf.rel, b) for lf in self.files.values() for b in sorted(lf.missing)]

    def close(self) -> None:
        for lf in self.files.values():
            os.close(lf.fd)
        if self.spill is not None:
            self.spill.close()

    def _notify(self) -> None:
        self._news.set()

    # -- the only writer of absent blocks -----------------------------------------------

    def install(self, lf: LazyFile, block: int, data: bytes, digest: int | None = None) -> bool:
        """Write the block's final content and make it present; False if it already was."""
        if not lf.absent.is_absent(block):
            return False
        bs = self.block_size
        end = min(lf.size, (block + 1) * bs)
        want = max(0, end - block * bs)
        if len(data) < want:
            raise ValueError(f"block {block} of {lf.rel}: {len(data)} bytes, need {want}")
        page = data[:want]
        os.pwrite(lf.fd, page, block * bs)  # no await from the absent check to the mark
        lf.absent.install(block)
        lf.digests[block] = digest if digest is not None else xxhash.xxh3_64_intdigest(page)
        lf.missing.discard(block)
        ref = lf.refs.pop(block, None)
        if ref is not None:
            self._free(ref)
        ev = self._pending.pop((lf.file_id, block), None)
        if ev is not None:
            ev.set()
        if self.done and self.finished_at is None:
            self.finished_at = time.monotonic()
            log.info("post-copy %s: every block installed", self.migration)
        self._notify()
        return True

    # -- handlers' side ------------------------------------------------------------------

    async def ensure(self, lf: LazyFile, offset: int, length: int) -> None:
        """Return once every block that [offset, offset+length) touches is present."""
        blocks = lf.absent.absent_in(offset, length)
        if not blocks:
            return
        t0 = time.monotonic()
        self.counts.demand_faults += 1
        while True:
            blocks = [b for b in blocks if lf.absent.is_absent(b)]
            if not blocks:
                break
            lost = [b for b in blocks if b in lf.missing]
            if lost:
                log.error("read of %s block %d: missing (source lost before it was spilled)",
                          lf.rel, lost[0])
                raise BlockMissing(f"{lf.rel} block {lost[0]}")
            mine = [b for b in blocks if (lf.file_id, b) not in self._pending]
            for b in mine:
                self._pending[(lf.file_id, b)] = trio.Event()
            if mine:
                await self._obtain(lf, mine)
            for b in blocks:
                ev = self._pending.get((lf.file_id, b))
                if ev is not None:
                    await ev.wait()
                    break
        ms = (time.monotonic() - t0) * 1000
        if len(self.fault_ms) < MAX_LATENCIES:
            self.fault_ms.append(ms)

    async def _obtain(self, lf: LazyFile, blocks: list[int]) -> None:
        """Blocks this task took on: from their slots when possible, else wanted."""
        with_ref = [b for b in blocks if b in lf.refs] if self.spill is not None else []
        if with_ref:
            await self._from_spill(lf, with_ref, drain=False)
        rest = [b for b in blocks if lf.absent.is_absent(b)]
        if rest:
            self._want(lf, rest)

    def _free(self, ref: SlotRef) -> None:
        """The page of `ref` is installed (or not needed): its slot may be reused."""
        self._freed.append((ref.slot, ref.generation))
        if ref.generation > self._installed.get(ref.slot, 0):
            self._installed[ref.slot] = ref.generation
            self._unpublished.add(ref.slot)

    async def _publish_installed(self) -> None:
        """While paused: tell the source through the area which slots it may reuse (it
        cannot hear SlotFree: nobody carries them)."""
        if self.spill is None or not self._unpublished:
            return
        refs = [SlotRef(s, self._installed[s]) for s in sorted(self._unpublished)]
        try:
            await trio.to_thread.run_sync(self.spill.mark_installed, refs)
        except OSError as exc:
            log.warning("cannot write %s/installed (%s): the source cannot reuse slots while "
                        "it is cut off", self.spill.path, exc.strerror or exc)
            return
        self._unpublished.clear()

    def _want(self, lf: LazyFile, blocks: list[int]) -> None:
        if self.given_up:
            self._give_up(lf, blocks)
            return
        self._wanted.extend((lf.file_id, b) for b in blocks)
        self._notify()

    def _give_up(self, lf: LazyFile, blocks: list[int]) -> None:
        for b in blocks:
            lf.missing.add(b)
            ev = self._pending.pop((lf.file_id, b), None)
            if ev is not None:
                ev.set()  # its waiters see it missing and answer EIO

    async def _from_spill(self, lf: LazyFile, blocks: list[int], drain: bool) -> None:
        """Read these blocks' slots in one thread hop; install what passes the checks."""
        spill = self.spill
        assert spill is not None
        refs = [(b, lf.refs[b]) for b in blocks]

        def read_all() -> list[bytes | None]:
            return [spill.read(ref, lf.file_id, b) for b, ref in refs]

        try:
            pages: list[bytes | Refused | None] = await trio.to_thread.run_sync(read_all)
        except OSError as exc:
            log.error("spill area %s unreadable: %s; fetching from the source", spill.path, exc)
            pages = [None] * len(refs)
        for (b, ref), page in zip(refs, pages, strict=True):
            if page is None:  # unreadable (said above): fetched, not counted as refused
                if lf.refs.get(b) == ref:
                    del lf.refs[b]
            elif isinstance(page, Refused):
                self._refused(lf, b, ref, page)
            elif self.install(lf, b, page, digest=xxhash.xxh3_64_intdigest(page)):
                if drain:
                    self.counts.pages_via_drain += 1
                else:
                    self.counts.pages_via_spill += 1
            elif lf.refs.get(b) == ref:  # installed meanwhile: the slot is free anyway
                del lf.refs[b]
                self._free(ref)

    def _refused(self, lf: LazyFile, block: int, ref: SlotRef, why: Refused) -> None:
        """A slot read that failed its checks: never used; the block is fetched instead."""
        if why is Refused.STALE:
            self.counts.generation_mismatches += 1
        elif why is Refused.TORN:
            self.counts.hash_mismatches += 1
        else:
            self.counts.mac_mismatches += 1
        log.warning("spill slot %d (generation %d) for %s block %d refused as %s; fetching it",
                    ref.slot, ref.generation, lf.rel, block, why.value)
        if lf.refs.get(block) == ref:
            del lf.refs[block]  # never try that slot again

    # -- the migrator's side -------------------------------------------------------------

    def add_refs(self, refs: list[tuple[int, int, int, int]]) -> None:
        """(file_id, block, slot, generation) from the source: queue them for the drain."""
        for file_id, block, slot, gen in refs:
            lf = self.by_id.get(file_id)
            if lf is None or not 0 <= slot < (self.spill.nslots if self.spill else 0):
                raise ValueError(f"bad spill ref {(file_id, block, slot, gen)}")
            self.counts.refs_received += 1
            ref = SlotRef(slot, gen)
            if not lf.absent.is_absent(block):
                self._free(ref)  # fetched already: free at once
                continue
            lf.refs[block] = ref
            self._queue.append((file_id, block))
        self._queue_ready.set()
        self._notify()

    def install_fetched(self, file_id: int, first: int, data: bytes) -> int:
        """Blocks the migrator fetched from the source; returns how many were still absent."""
        lf = self.by_id.get(file_id)
        if lf is None:
            raise ValueError(f"no lazy file {file_id}")
        bs = self.block_size
        n = 0
        for i in range(0, max(len(data), 1), bs):
            b = first + i // bs
            if self.install(lf, b, data[i:i + bs]):
                n += 1
        self.counts.pages_via_demand_fetch += n
        return n

    def take_news(self) -> News:
        wanted, self._wanted = self._wanted, []
        freed, self._freed = self._freed, []
        self._news = trio.Event()
        return News(wanted=tuple(wanted), freed=tuple(freed), remaining=self.remaining,
                    done=self.done, given_up=self.given_up,
                    missing=tuple(self.missing()[:MAX_LISTED]),
                    missing_count=sum(len(lf.missing) for lf in self.files.values()))

    async def wait_news(self, timeout: float) -> News:
        if not (self._wanted or self._freed or self.done):
            with trio.move_on_after(timeout):
                await self._news.wait()
        return self.take_news()

    def report(self) -> PostcopyStats:
        lat = sorted(self.fault_ms)
        return dataclasses.replace(
            self.counts, remaining=self.remaining,
            missing_count=sum(len(lf.missing) for lf in self.files.values()),
            demand_fault_p50_ms=round(_pct(lat, 50), 3),
            demand_fault_p99_ms=round(_pct(lat, 99), 3),
            postcopy_s=round((self.finished_at or time.monotonic()) - self.started, 3))

    def digests(self) -> tuple[tuple[int, int, int], ...]:
        return tuple((lf.file_id, b, d) for lf in self.files.values()
                     for b, d in lf.digests.items())

    # -- nobody fetches for us: the migrator or the source went away ---------------------

    async def _adopt_from_headers(self) -> int:
        """Install every absent block the spill headers show, a block a reader waits for
        included; returns how many pages were newly found there."""
        if self.spill is None:
            return 0
        try:
            headers = await trio.to_thread.run_sync(self.spill.scan)
        except OSError as exc:
            log.error("cannot scan the spill area %s: %s", self.spill.path, exc)
            return 0
        found = 0
        todo: dict[int, list[int]] = {}
        for slot, h in enumerate(headers):
            lf = self.by_id.get(h.file_id)
            if (lf is None or not h.flags & FLAG_FILLED or not lf.absent.is_absent(h.block)
                    or h.generation == 0):
                continue
            old = lf.refs.get(h.block)
            if old is None or old.generation < h.generation or old.slot != slot:
                lf.refs[h.block] = SlotRef(slot, h.generation)
                found += 1
            todo.setdefault(lf.file_id, []).append(h.block)
        async with self._drain_lock:
            for file_id, blocks in todo.items():
                lf = self.by_id[file_id]
                for i in range(0, len(blocks), DRAIN_BATCH):
                    batch = [b for b in blocks[i:i + DRAIN_BATCH]
                             if lf.absent.is_absent(b) and b in lf.refs]
                    if batch:
                        await self._from_spill(lf, batch, drain=True)
        return found

    def orphan(self, why: str) -> bool:
        """Nobody will fetch for us any more: complete from the spill area alone (see
        adopt_until_settled). False if already done or orphaned."""
        if self.done or self.paused is not None:
            return False
        self.paused = why
        log.warning("post-copy %s paused: %s; %d blocks absent: installing them from the spill "
                    "area as they appear there", self.migration, why, self.remaining)
        self._notify()
        return True

    def reattach(self) -> None:
        """The migrator is back (its source reconnected): it fetches for us again. Blocks a
        reader waits for are wanted anew (the migrator that took them may have died with
        them), and the spill scan stops: the source re-sends its refs."""
        if self.paused is not None:
            log.info("post-copy %s resumed after a pause (%s); %d blocks absent",
                     self.migration, self.paused, self.remaining)
        self.paused = None
        if not self.given_up:
            wanted = set(self._wanted)
            self._wanted.extend(k for k in self._pending if k not in wanted)
        self._notify()

    async def adopt_until_settled(self, interval: float = 0.5) -> None:
        """Take every page the spill area shows, again and again (the source may still be
        writing it), until every block is installed, or the source has marked the area
        flushed: a block not in it then will never come, and only then is it missing (its
        readers get EIO). Readers of other blocks wait meanwhile, never served stale."""
        while not self.done and self.paused is not None:
            flushed = (await trio.to_thread.run_sync(self.spill.flushed)
                       if self.spill is not None else None)
            await self._adopt_from_headers()  # after reading the marker: it covers this scan
            await self._publish_installed()
            if self.done:
                break
            if self.spill is None or flushed is not None:
                self.give_up("the source marked the spill area flushed without them"
                             if self.spill is not None else "there is no spill area")
                break
            await trio.sleep(interval)
        await self._publish_installed()

    def give_up(self, why: str) -> int:
        """Every block still absent is missing for good (reads of it fail with EIO).
        Returns how many."""
        n = 0
        for lf in self.files.values():
            rest = [b for b in lf.absent.blocks() if b not in lf.missing]
            self._give_up(lf, rest)
            n += len(rest)
        self._wanted.clear()
        if n:
            first = self.missing()[0]
            log.error("post-copy %s: %d blocks missing (%s; first: %s block %d)",
                      self.migration, n, why, *first)
        self.given_up = True
        self._notify()
        return n

    async def lose_source(self) -> tuple[int, News]:
        """The migrator lost the source: complete from the spill area (now, and as pages
        keep arriving there), name missing only what the area provably will never hold.
        Returns (pages found there now, the news)."""
        self.orphan("the source is out of reach")
        found = await self._adopt_from_headers()
        return found, self.take_news()

    # -- the drain ---------------------------------------------------------------------

    async def drain_queue(self) -> None:
        """Install every queued ref now (batches of slot reads off the trio thread)."""
        async with self._drain_lock:
            await self._drain_unlocked()

    async def _drain_unlocked(self) -> None:
        while self._queue:
            batch: list[tuple[int, int]] = []
            while self._queue and len(batch) < DRAIN_BATCH:
                file_id, b = self._queue.popleft()
                lf = self.by_id[file_id]
                key = (file_id, b)
                if not lf.absent.is_absent(b) or key in self._pending or b not in lf.refs:
                    if not lf.absent.is_absent(b) and b in lf.refs:
                        self._free(lf.refs.pop(b))
                    continue
                self._pending[key] = trio.Event()
                batch.append(key)
            by_file: dict[int, list[int]] = {}
            for file_id, b in batch:
                by_file.setdefault(file_id, []).append(b)
            for file_id, blocks in by_file.items():
                lf = self.by_id[file_id]
                await self._from_spill(lf, blocks, drain=True)
                rest = [b for b in blocks if lf.absent.is_absent(b)]
                if rest:
                    self._want(lf, rest)  # refused slots: fetch them

    async def drain_forever(self) -> None:
        while not self.done:
            await self._queue_ready.wait()
            self._queue_ready = trio.Event()
            try:
                await self.drain_queue()
            except Exception:
                log.exception("post-copy drain failed; blocks are still fetched on demand")
                await trio.sleep(0.1)


def _pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not sorted_values:
        return 0.0
    k = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[k - 1]


class LazyMode:
    """The daemon's side of post-copy: the incoming migrations' Postcopy, any number at once,
    each over files of its own (a VM's), by migration id.

    `invalidate(key)` drops the kernel's cached pages of a file (the FUSE layer's job);
    `nursery` (set by the mount) runs the drains.
    """

    def __init__(self, block_shift: int,
                 invalidate: Callable[[FileKey], Awaitable[None]],
                 spill_dir: str | None = None) -> None:
        self.shift = block_shift
        self._invalidate = invalidate
        self.spill_dir = os.path.realpath(spill_dir) if spill_dir else None
        self.running: dict[str, Postcopy] = {}  # by migration, in the order they began
        self.nursery: trio.Nursery | None = None
        self._trackers: dict[str, list[FileTracker]] = {}  # those whose .lazy points into each

    @property
    def current(self) -> Postcopy | None:
        """The post-copy begun last (what `blkfs spill` shows), if any."""
        return next(reversed(self.running.values()), None)

    def orphan(self, why: str, migrations: list[str] | None = None) -> None:
        """Nobody fetches for these post-copies (default: all) any more: complete them from
        the spill."""
        for mid, pc in list(self.running.items()):
            if (migrations is None or mid in migrations) and pc.orphan(why) and (
                    self.nursery is not None):
                self.nursery.start_soon(pc.adopt_until_settled)

    def require(self, migration: str | None = None) -> Postcopy:
        """The post-copy `migration`, or the only one running when none is named."""
        if migration is not None:
            pc = self.running.get(migration)
            if pc is None:
                raise LazyError(f"no post-copy {migration} on this mount")
            return pc
        if not self.running:
            raise LazyError("no post-copy is running on this mount")
        live = [pc for pc in self.running.values() if not pc.done] or list(
            self.running.values())
        if len(live) > 1:
            raise LazyError(f"{len(live)} post-copies run on this mount "
                            f"({', '.join(pc.migration for pc in live)}): name one")
        return live[-1]

    async def ensure(self, lf: LazyFile, offset: int, length: int) -> None:
        """Wait until the blocks that a read or write touches are present."""
        if lf.absent.count:
            assert lf.owner is not None
            await lf.owner.ensure(lf, offset, length)

    async def begin(self, backing: str, migration: str, block_size: int,
                    spill_path: str | None,
                    files: list[tuple[int, str, FileTracker, list[tuple[int, int]]]],
                    spill_key: bytes | None = None) -> Postcopy:
        """Turn on lazy mode for these files: these blocks are absent until installed
        (docs/spill.md). Other post-copies go on; one still running over any of these files
        refuses this one."""
        for _fid, rel, tr, _ext in files:
            old = tr.lazy.owner if tr.lazy is not None else None
            if old is not None and not old.done and not old.given_up:
                raise LazyError(f"{rel} is still arriving by post-copy {old.migration} "
                                f"({old.remaining} blocks absent; see blkfs spill)")
        if block_size != 1 << self.shift:
            raise LazyError(f"the migration uses {block_size}-byte blocks, this mount "
                            f"{1 << self.shift}: mount the destination with --block-size "
                            f"{block_size}")
        try:
            spill = SpillArea.open(spill_path, migration, spill_key) if spill_path else None
        except SpillError as exc:
            raise LazyError(str(exc)) from None
        keys = {tr.key for _f, _r, tr, _e in files}
        for mid, pc in list(self.running.items()):  # those finished, given up over these
            if mid == migration or pc.done or keys & set(pc.files):  # files, or begun again
                self.close(mid)
        pc = Postcopy(migration, block_size, spill)
        try:
            for file_id, rel, tr, extents in files:
                fd = os.open(os.path.join(backing, rel), os.O_RDWR | os.O_CLOEXEC)
                try:
                    absent = AbsentMap(tr.nblocks, self.shift, extents)
                except ValueError as exc:
                    os.close(fd)
                    raise LazyError(f"{rel}: {exc}") from None
                pc.add_file(LazyFile(file_id, rel, tr.key, fd, absent, os.fstat(fd).st_size))
        except BaseException:
            pc.close()
            raise
        self.running[migration] = pc
        if spill_path:
            self.spill_dir = os.path.realpath(spill_path)
        trackers = self._trackers[migration] = []
        for file_id, _rel, tr, _ext in files:  # reads wait from now on ...
            tr.lazy = pc.by_id[file_id]
            trackers.append(tr)
        for lf in pc.files.values():  # ... and none is answered from the page cache
            await self._invalidate(lf.key)
        if self.nursery is not None:
            self.nursery.start_soon(pc.drain_forever)
        log.info("post-copy %s: %d absent blocks in %d files, spill %s (%d post-copies here)",
                 migration, pc.remaining, len(files), spill_path, len(self.running))
        return pc

    def close(self, migration: str | None = None) -> None:
        """End a post-copy (default: every one; done, or the mount goes away)."""
        for mid in [migration] if migration is not None else list(self.running):
            pc = self.running.pop(mid, None)
            for tr in self._trackers.pop(mid, []):
                if tr.lazy is not None and tr.lazy.owner is pc:
                    tr.lazy = None
            if pc is not None:
                pc.close()
