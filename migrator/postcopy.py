"""Post-copy (DESIGN.md flow 4): the spill writer and fetch server on the source, the bridge
between the migration connection and the destination daemon's lazy mode on the destination.

Source, from Commit on (the VM is suspended, so every remaining page is final):

* the *spill writer* puts each remaining page into a slot of the spill area
  (allocating from the free list, waiting for frees when all N are in use) and
  tells the destination where (SpillRefs); when every page is in, it makes the
  area durable and says SpillFlushed — from then on the source may vanish;
* the *receiver* answers Fetch at once (ahead of the spill stream) with Blocks
  read from the backing file, and returns freed slots to the allocator.

Destination: lazy_begin on its blkfs before the resume hook runs; spill refs
and fetched blocks go to the daemon over its control socket; a long poll
(lazy_wait) brings back the blocks a read waits for (sent as Fetch) and the
slots the daemon freed (sent as SlotFree), until every block is installed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from blkfs.control import ControlError, find_socket, pack_refs
from blkfs.spill import SlotAllocator, SlotHeader, SlotRef, SpillArea

from . import protocol as p
from .transport import Channel, MigrationError

log = logging.getLogger(__name__)

Extent = tuple[int, int]
SPILL_BATCH = 64  # pages per SpillRefs frame (and per thread hop of the writer)
MEMORY_SUFFIXES = (".mem", ".ram")


def is_memory_file(name: str) -> bool:
    """Default for which files are memory (post-copied); disks always stay pre-copy."""
    base = os.path.basename(name).lower()
    return base.endswith(MEMORY_SUFFIXES) or "memory" in base or base.startswith("mem")


def runs(blocks: Iterable[int], limit: int) -> list[Extent]:
    """Sorted blocks as (first, count) runs of at most `limit` blocks."""
    out: list[Extent] = []
    for b in sorted(blocks):
        if out and out[-1][0] + out[-1][1] == b and out[-1][1] < limit:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


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

    def __init__(self, ch: Channel, spill: SpillArea, nslots: int, block_size: int,
                 fds: dict[int, int], sizes: dict[int, int],
                 absent: dict[int, list[Extent]], spill_rate: float | None = None) -> None:
        self.ch = ch
        self.spill_rate = spill_rate  # bytes/s into the spill area (shared storage), or None
        self.spill = spill
        self.alloc = SlotAllocator(nslots)
        self.bs = block_size
        self.fds = fds
        self.sizes = sizes
        self.todo: deque[tuple[int, int]] = deque(
            (fid, b) for fid, exts in absent.items() for first, n in exts
            for b in range(first, first + n))
        self.done_blocks: set[tuple[int, int]] = set()  # fetched: no need to spill
        self.headers: dict[int, SlotHeader] = {}
        self.stats = SourceStats(pages=len(self.todo))
        self._freed = trio.Event()
        self.resumed = trio.Event()
        self.t_commit = time.monotonic()
        self.on_flushed: Any = None  # callback, for the CLI's "spill flushed" line

    def _page(self, file_id: int, block: int) -> bytes:
        size = self.sizes[file_id]
        n = max(0, min(self.bs, size - block * self.bs))
        data = os.pread(self.fds[file_id], n, block * self.bs)
        if len(data) != n:
            raise MigrationError(f"source file {file_id} shrank under the migration")
        return data

    async def run(self) -> dict[str, Any]:
        """Until the destination has every page; returns its PostcopyDone figures."""
        result: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._spill_writer)

            async def receive() -> None:
                while True:
                    ev = await self.ch.receive()
                    if isinstance(ev, p.Fetch):
                        await self._answer(ev)
                    elif isinstance(ev, p.SlotFree):
                        self._release(ev)
                    elif isinstance(ev, p.Resumed):
                        self.resumed.set()
                    elif isinstance(ev, p.PostcopyDone):
                        result.update({f: getattr(ev, f) for f in ev.__dataclass_fields__})
                        nursery.cancel_scope.cancel()
                        return
                    else:
                        raise MigrationError(f"bad peer: {type(ev).__name__} during post-copy")

            nursery.start_soon(receive)
        # Every page is installed now, including those whose SlotFree would have crossed
        # PostcopyDone on the wire: the headers say so, for `blkfs spill`.
        for slot, h in self.headers.items():
            if self.alloc.release(SlotRef(slot, h.generation)):
                self.spill.mark_free(SlotRef(slot, h.generation), h)
        self.stats.slot_reuses = self.alloc.reuses
        return result

    async def _answer(self, ev: p.Fetch) -> None:
        if ev.file_id not in self.fds:
            raise MigrationError(f"bad peer: fetch of file {ev.file_id}, which is not post-copied")
        size = self.sizes[ev.file_id]
        start = ev.first_block * self.bs
        n = max(0, min(ev.count * self.bs, size - start))
        data = os.pread(self.fds[ev.file_id], n, start) if n else b""
        if not data:
            return
        for b in range(ev.first_block, ev.first_block + ev.count):
            self.done_blocks.add((ev.file_id, b))
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
        sent = 0
        t0 = time.monotonic()
        while self.todo:
            batch: list[tuple[SlotRef, int, int]] = []
            while self.todo and len(batch) < SPILL_BATCH:
                fid, b = self.todo[0]
                if (fid, b) in self.done_blocks:
                    self.todo.popleft()
                    continue
                ref = self.alloc.allocate()
                if ref is None:
                    break
                self.todo.popleft()
                batch.append((ref, fid, b))
            if not batch:
                if self.todo:  # every slot holds a page the destination has not installed
                    self._freed = trio.Event()
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
            await self.ch.send(p.SpillRefs(tuple((fid, b, ref.slot, ref.generation)
                                                 for ref, fid, b in batch)))
            sent += len(batch)
            self.stats.spilled = sent
        await trio.to_thread.run_sync(self.spill.flush)
        self.stats.spill_flushed_s = round(time.monotonic() - self.t_commit, 3)
        await self.ch.send(p.SpillFlushed(sent))
        log.info("spill flushed: %d pages", sent)
        if self.on_flushed is not None:
            self.on_flushed(sent)


# -- destination ----------------------------------------------------------------------------


class AsyncControl:
    """A trio client of a blkfs control socket (the blocking one lives in blkfs.control)."""

    def __init__(self, stream: trio.SocketStream, path: str) -> None:
        self.stream = stream
        self.path = path
        self._buf = b""
        self._lock = trio.Lock()

    @classmethod
    async def connect(cls, mount: str) -> AsyncControl:
        try:
            path = find_socket(mount)
            stream = await trio.open_unix_socket(path)
            # Fetched blocks go to the daemon in one write (1 MiB faults), not in 200 KiB
            # rounds of the default buffer, each waiting for the other process to run.
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            return cls(stream, path)
        except ControlError as exc:
            raise MigrationError(str(exc)) from None
        except OSError as exc:
            raise MigrationError(f"cannot reach the blkfs daemon of {mount}: {exc}") from None

    async def call(self, op: str, data: bytes = b"", **args: Any) -> Any:
        if data:
            args["data_len"] = len(data)
        async with self._lock:
            try:
                await self.stream.send_all(json.dumps({"op": op, **args}).encode() + b"\n" + data)
                while b"\n" not in self._buf:
                    chunk = await self.stream.receive_some(1 << 20)
                    if not chunk:
                        raise MigrationError(f"the blkfs daemon on {self.path} closed the "
                                             "connection (did it crash?)")
                    self._buf += chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise MigrationError(f"talking to the blkfs daemon on {self.path}: {exc}"
                                     ) from None
            line, self._buf = self._buf.split(b"\n", 1)
        reply = json.loads(line)
        if not reply.get("ok"):
            raise MigrationError(f"blkfs: {reply.get('error', 'unknown error')}")
        return reply["result"]

    async def aclose(self) -> None:
        await self.stream.aclose()


class DestPostcopy:
    """The destination's bridge: migration connection <-> lazy mode of its blkfs daemon."""

    def __init__(self, mount: str, ch: Channel, announce: p.Postcopy, block_size: int,
                 spill_override: str | None) -> None:
        self.mount = mount
        self.ch = ch
        self.announce = announce
        self.block_size = block_size
        self.spill_path = spill_override or announce.spill
        self.absent: dict[int, list[Extent]] = {}
        self.ctl: AsyncControl | None = None
        self.poll: AsyncControl | None = None
        self.inst: AsyncControl | None = None  # fetched blocks: never queued behind refs
        self.begun = trio.Event()  # lazy mode is on in the daemon
        self.begin_started = False
        self._prepared = trio.Event()
        self.spill_usable = True
        self.resumed = trio.Event()
        self.report: dict[str, Any] = {}
        self.digests: list[list[int]] = []
        self.on_digests: Any = None  # called once the daemon's digests are in self.digests

    def add_absent(self, ev: p.Absent) -> None:
        self.absent.setdefault(ev.file_id, []).extend(ev.extents)

    async def prepare(self) -> None:
        """What needs no absent map (connections, the spill check), while the last set flows."""
        try:
            try:
                area = SpillArea.open(self.spill_path, self.announce.migration)
                area.close()
            except Exception as exc:  # SpillError, OSError: fetch everything instead
                log.warning("spill area unusable (%s): every remaining page is fetched from "
                            "the source", exc)
                self.spill_usable = False
            self.ctl = await AsyncControl.connect(self.mount)
            self.poll = await AsyncControl.connect(self.mount)
            self.inst = await AsyncControl.connect(self.mount)
        finally:
            self._prepared.set()

    async def begin(self, names: dict[int, str]) -> None:
        """Lazy mode on, before the VM resumes: from now on its reads of these blocks wait."""
        t0 = time.monotonic()
        await self._prepared.wait()
        t1 = time.monotonic()
        if self.ctl is None:
            raise MigrationError("post-copy: the connection to the blkfs daemon failed")
        files = [{"file_id": fid, "file": names[fid], "extents": [list(e) for e in exts]}
                 for fid, exts in self.absent.items()]
        await self.ctl.call("lazy_begin", migration=self.announce.migration,
                            block_size=self.block_size,
                            spill=self.spill_path if self.spill_usable else None, files=files)
        self.begun.set()
        log.info("lazy mode on: waited %.1f ms for the connections, lazy_begin %.1f ms",
                 (t1 - t0) * 1000, (time.monotonic() - t1) * 1000)

    async def refs(self, ev: p.SpillRefs) -> None:
        assert self.ctl is not None
        if self.spill_usable:
            await self.ctl.call("lazy_refs", data=pack_refs(list(ev.refs)))
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
        assert self.inst is not None
        await self.inst.call("lazy_install", data=ev.data, file_id=ev.file_id,
                             first_block=ev.first_block)

    async def _fetch(self, by_file: dict[int, list[int]]) -> None:
        limit = max(1, p.MAX_BLOCKS_DATA // self.block_size)
        for fid, blocks in by_file.items():
            for first, count in runs(blocks, limit):
                await self.ch.send(p.Fetch(fid, first, count))

    async def pump(self) -> None:
        """Carry the daemon's wants and frees to the source until every block is installed."""
        assert self.poll is not None
        while True:
            news = await self.poll.call("lazy_wait", timeout=1.0)
            by_file: dict[int, list[int]] = {}
            for fid, b in news["wanted"]:
                by_file.setdefault(fid, []).append(b)
            if by_file:
                await self._fetch(by_file)
            freed = news["freed"]
            for i in range(0, len(freed), p.MAX_ITEMS_PER_FRAME):
                await self.ch.send(p.SlotFree(tuple((s, g) for s, g in
                                                    freed[i:i + p.MAX_ITEMS_PER_FRAME])))
            if news["done"]:
                break
        await self.resumed.wait()  # PostcopyDone only after Resumed
        self.report = await self.poll.call("lazy_report", digests=True)
        self.digests = self.report.pop("digests")
        if self.on_digests is not None:
            self.on_digests()  # before PostcopyDone: the source's Digests come after it
        r = self.report
        await self.ch.send(p.PostcopyDone(
            r["demand_faults"], r["pages_via_spill"] + r["pages_via_drain"],
            r["pages_via_demand_fetch"], r["pages_via_drain"], r["generation_mismatches"],
            r["hash_mismatches"],
            float(r["demand_fault_p50_ms"]), float(r["demand_fault_p99_ms"]),
            float(r["postcopy_s"])))

    async def source_lost(self) -> dict[str, Any]:
        """Complete from the spill area alone, or name what is missing."""
        ctl = await AsyncControl.connect(self.mount)
        try:
            out = await ctl.call("lazy_source_lost")
            self.report = await ctl.call("lazy_report", digests=True)
            self.digests = self.report.pop("digests")
        finally:
            await ctl.aclose()
        return out

    async def aclose(self) -> None:
        for c in (self.ctl, self.poll, self.inst):
            if c is not None:
                with trio.move_on_after(1):
                    await c.aclose()
