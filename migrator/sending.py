"""Sending a file's data: the copy's inner loop. `send` sends blocks (the initial copy, and
post-copy's memory): holes are never read, zero blocks travel as Zero runs, blocks the
destination holds already stay there (delta), the rest as Blocks, compressed where that pays
(--compress). `send_pages` sends the dirty pages of the rounds and the last set as Pages
frames: a 4 KiB write costs 4 KiB, not its 64 KiB block."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from . import protocol as p
from .codecs import packed
from .delta import Holdings
from .plan import batches
from .report import MigrationReport, Progress
from .stores import SourceFiles
from .transport import Channel
from .zeros import hole_runs, zero_runs

Extent = tuple[int, int]
COMPRESS_PIECE = 1 << 20  # --compress decides per MiB: random data among text goes raw
FRAME_DATA = p.MAX_BLOCKS_DATA  # bytes of block data per Blocks frame: the most it may carry
HOLE_BATCH = 1 << 24  # blocks per batch over a hole (checked and cleared at once)
THREAD_READ = 1 << 20  # reads at least this large go to a worker thread
PAGES_FRAME = 1 << 20  # bytes of pages per Pages frame (its ranges are read one by one)


@dataclass
class Sender:
    """One send of blocks over the migration's channel (made per call: the channel changes
    when the source reattaches)."""

    ch: Channel
    store: SourceFiles
    block_size: int
    report: MigrationReport
    progress: Progress
    run_sync: Callable[..., Awaitable[Any]]
    compress: Any = None  # a compressor (codecs.compressor), for --compress
    codec: int = 0

    async def send(self, f: Any, exts: list[Extent], clear: bool = False,
                   held: Holdings | None = None) -> tuple[int, int]:
        """Send these blocks of `f` (its file_id, rel and size); returns (blocks, data bytes).
        With `clear` (the initial copy) each batch's dirty marks are cleared before it is read;
        `held` is what the destination holds of the file (delta).

        A reader stays one frame ahead of the sender, so disk reads and network sends
        overlap.
        """
        ch, store = self.ch, self.store
        bs = self.block_size
        nblocks = (f.size + bs - 1) // bs
        # Batches of one frame's data, but one batch for a whole hole: the holes now only
        # shape the batches (each batch is checked again after its dirty marks are cleared).
        shaped: list[Extent] = []
        if exts:
            ranges = store.data_ranges(f.file_id, 0, f.size)
            for first, count in exts:
                for b0, n, hole in hole_runs(ranges, first, min(count, nblocks - first), bs,
                                             f.size):
                    shaped += batches([(b0, n)], HOLE_BATCH if hole else FRAME_DATA // bs)
        todo = [(first, min(count, nblocks - first)) for first, count in shaped
                if first < nblocks]
        blocks = nbytes = 0
        # (first block, data) to send as Blocks, (first block, count) as Zero, or
        # (first block, (data, compressed)) as Packed
        tx, rx = trio.open_memory_channel[tuple[int, bytes | int | tuple[bytes, bytes]]](2)
        kinds = self.report.bytes_by_kind
        compress, codec = self.compress, self.codec

        async def reader() -> None:
            async with tx:
                try:
                    await read_all()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the sender stopped (its error is the one to report)

        def read(first: int, count: int) -> list[tuple[int, bytes | int | tuple[bytes, bytes]]]:
            """Holes are not read; what is read, zero blocks of it travel as Zero runs, the
            rest compressed where that pays (--compress)."""
            out: list[tuple[int, bytes | int | tuple[bytes, bytes]]] = []
            ranges = store.data_ranges(f.file_id, first * bs, (first + count) * bs)
            for b0, n, hole in hole_runs(ranges, first, count, bs, f.size):
                if hole:
                    out.append((b0, n))
                    kinds["hole"] = kinds.get("hole", 0) + min(n * bs, f.size - b0 * bs)
                    continue
                data = store.read(f.file_id, b0 * bs, n * bs)
                for z0, zn, zero in zero_runs(data, bs, b0):
                    if zero:
                        out.append((z0, zn))
                        kinds["zero"] = kinds.get("zero", 0) + min(zn * bs, len(data) - (
                            z0 - b0) * bs)
                        continue
                    run = data[(z0 - b0) * bs:(z0 - b0 + zn) * bs]
                    left = len(run)  # what the destination holds as it is here stays there
                    for s0, sn in held.to_send(run, bs, z0) if held else [(z0, zn)]:
                        piece = run[(s0 - z0) * bs:(s0 - z0 + sn) * bs]
                        left -= len(piece)
                        if compress is None:
                            out.append((s0, piece))
                        else:
                            out += compressed(piece, 0, len(piece), s0)
                    if left:
                        kinds["held"] = kinds.get("held", 0) + left
            return out

        def compressed(data: bytes, start: int, length: int,
                       first: int) -> list[tuple[int, bytes | tuple[bytes, bytes]]]:
            """Pieces of COMPRESS_PIECE, each compressed if that pays; the raw neighbours
            joined again into one frame."""
            assert compress is not None
            out: list[tuple[int, bytes | tuple[bytes, bytes]]] = []
            step = max(bs, COMPRESS_PIECE // bs * bs)
            end = start + length
            raw = start  # where the run of pieces that did not pay began
            with memoryview(data) as view:
                for off in range(start, end, step):
                    piece = view[off:min(off + step, end)]
                    small = packed(compress, piece)
                    if small is None:
                        continue
                    if raw < off:
                        out.append((first + (raw - start) // bs, data[raw:off]))
                    out.append((first + (off - start) // bs, (bytes(piece), small)))
                    raw = off + len(piece)
            if raw < end:
                out.append((first + (raw - start) // bs, data[raw:end]))
            return out

        async def read_all() -> None:
            for first, count in todo:
                if clear:  # initial copy: writes that came before this read need no resend
                    await store.clear(f.file_id, [(first, count)])
                if count * bs >= THREAD_READ:
                    pieces = await self.run_sync(read, first, count)
                else:  # a thread hop costs more than a small page-cache read
                    pieces = read(first, count)
                if clear:  # (what the destination holds goes nowhere: left no more)
                    gone(count - sum(_blocks(data, bs) for _, data in pieces))
                for piece in pieces:
                    await tx.send(piece)

        def gone(nblocks: int) -> None:
            """The initial copy's blocks that left (or need not): what `migrator status` and
            the progress timeout count as left, as they go out, not as they are read ahead."""
            if clear and self.progress.page_size:
                per = bs // self.progress.page_size
                self.progress.pending = max(0, self.progress.pending - nblocks * per)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            async with rx:
                async for first, data in rx:
                    gone(_blocks(data, bs))  # (its frame goes out now)
                    if isinstance(data, int):  # a zero run: a few bytes on the wire
                        await ch.send(p.Zero(f.file_id, first, data))
                        blocks += data
                        self.report.blocks_sent += data
                        continue
                    small = None
                    if isinstance(data, tuple):
                        data, small = data
                    end = first * bs + len(data)
                    if len(data) % bs and end != f.size:
                        data = data[: len(data) // bs * bs]  # shrank meanwhile: resized later
                        small = None  # (what was compressed is no longer what goes)
                    if not data:
                        continue
                    if small is not None:
                        await ch.send(p.Packed(f.file_id, first, codec, len(data), small))
                        kinds["compressed"] = kinds.get("compressed", 0) + len(data)
                    else:
                        await ch.send(p.Blocks(f.file_id, first, data))
                        kinds["normal"] = kinds.get("normal", 0) + len(data)
                    blocks += (len(data) + bs - 1) // bs
                    self.report.blocks_sent += (len(data) + bs - 1) // bs  # (as it goes)
                    nbytes += len(data)
                    by_file = self.report.bytes_by_file
                    by_file[f.rel] = by_file.get(f.rel, 0) + len(data)
                    self.report.bytes_sent = self.progress.sent
        return blocks, nbytes

    async def send_pages(self, f: Any, pages: list[Extent], page_size: int) -> tuple[int, int]:
        """Send these pages of `f` (a round's dirty set, in pages of `page_size`), clipped
        to its size as last told; returns (pages, data bytes).  A reader stays one frame
        ahead of the sender."""
        ps, size = page_size, f.size
        frames: list[list[tuple[int, int]]] = [[]]
        held = 0
        for first, count in pages:
            off, end = first * ps, min((first + count) * ps, size)
            while off < end:
                n = min(end - off, PAGES_FRAME - held)
                frames[-1].append((off, n))
                off += n
                held += n
                if held >= PAGES_FRAME or len(frames[-1]) == p.MAX_PAGE_RANGES:
                    frames.append([])
                    held = 0
        if not frames[-1]:
            frames.pop()
        tx, rx = trio.open_memory_channel[p.Pages](2)
        store, compress, codec = self.store, self.compress, self.codec

        def read(ranges: list[tuple[int, int]]) -> p.Pages | None:
            parts, kept = [], []
            for off, n in ranges:
                data = store.read(f.file_id, off, n)
                if data:  # (short: the file shrank since; a Resize follows)
                    parts.append(data)
                    kept.append((off, len(data)))
            if not kept:
                return None
            data = b"".join(parts)
            small = packed(compress, data) if compress is not None else None
            if small is not None:
                return p.Pages(f.file_id, tuple(kept), small, codec)
            return p.Pages(f.file_id, tuple(kept), data)

        async def reader() -> None:
            async with tx:
                try:
                    for ranges in frames:
                        nbytes = sum(n for _, n in ranges)
                        ev = (await self.run_sync(read, ranges) if nbytes >= THREAD_READ
                              else read(ranges))
                        if ev is not None:
                            await tx.send(ev)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the sender stopped (its error is the one to report)

        npages = nbytes = 0
        kinds, by_file = self.report.bytes_by_kind, self.report.bytes_by_file
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            async with rx:
                async for ev in rx:
                    await self.ch.send(ev)
                    n = ev.size
                    kind = "compressed" if ev.codec else "normal"
                    kinds[kind] = kinds.get(kind, 0) + n
                    by_file[f.rel] = by_file.get(f.rel, 0) + n
                    npages += sum(-(-r // ps) for _, r in ev.ranges)
                    nbytes += n
                    self.report.bytes_sent = self.progress.sent
        self.report.pages_sent += npages
        return npages, nbytes


def _blocks(data: bytes | int | tuple[bytes, bytes], bs: int) -> int:
    """Blocks of a piece the reader hands the sender (a zero run's count, or data)."""
    if isinstance(data, int):
        return data
    raw = data[0] if isinstance(data, tuple) else data
    return (len(raw) + bs - 1) // bs
