"""Dirty bitmaps and extent encoding (pure).

A dirty bitmap holds one *page mask* per block: bit i set means page i of the block was
written (0: clean).  A page is the unit of dirty tracking under a block: 4 KiB (a guest
page, the size of most writes) for blocks up to 64 KiB, a 16th of the block above that, so a
mask is at most 16 bits.  Heat, the copy and the spill area stay at the block; only the dirty
rounds go by page, where a 4 KiB write would otherwise cost a 64 KiB block on the wire.

The masks live in chunks of ``CHUNK_BLOCKS`` blocks (``PageMasks``): a chunk nobody wrote is
None, one whose every page is dirty is a shared full chunk, any other an ``array('B')`` (up to
8 pages a block) or ``array('H')`` of its own, allocated at its first write. So a thin image
costs what its data and its dirty set take, not its size: a 4 TiB image freshly seen (all
dirty) is 16,384 references to one chunk; a write is one C-speed item store into its chunk,
and numpy reads each chunk's memory without a copy for every query.

Extents are ``(first, count)`` pairs in ascending order, of blocks or of pages (the form
every API and wire message uses).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import numpy as np

from .settings import DEFAULT_BLOCK_SIZE as DEFAULT_BLOCK_SIZE
from .settings import MAX_BLOCK_SIZE as MAX_BLOCK_SIZE
from .settings import MIN_BLOCK_SIZE as MIN_BLOCK_SIZE
from .settings import check_block_size as check_block_size
from .settings import parse_size as parse_size

Extent = tuple[int, int]

PAGE_SIZE = 4096  # the smallest page: a guest page
MAX_PAGES_PER_BLOCK = 16  # a page mask fits 16 bits


def page_shift(shift: int) -> int:
    """log2 of the page size under blocks of 2**shift bytes."""
    return max(PAGE_SIZE.bit_length() - 1, shift - (MAX_PAGES_PER_BLOCK.bit_length() - 1))


def blocks_for(size: int, shift: int) -> int:
    """Number of blocks covering `size` bytes."""
    return (size + (1 << shift) - 1) >> shift


def extents(bitmap: bytes | bytearray) -> list[Extent]:
    """Runs of dirty blocks as (first, count).

    The first runs are found with C-speed find() (microseconds for a clean or a whole dirty
    map); a fragmented rest goes to two vectorised passes (tens of milliseconds for 160,000
    runs, where find() would loop in Python)."""
    out: list[Extent] = []
    find = bitmap.find
    end = len(bitmap)
    pos = find(1)
    while pos != -1:
        if len(out) == 64:
            rest = mask_extents(np.frombuffer(bitmap, dtype=np.uint8, offset=pos) != 0)
            out.extend((pos + f, c) for f, c in rest)
            break
        stop = find(0, pos)
        if stop == -1:
            stop = end
        out.append((pos, stop - pos))
        pos = find(1, stop)
    return out


def mask_extents(mask: np.ndarray) -> list[Extent]:
    """Runs of True in a boolean array, as (first, count) extents in block order."""
    starts, counts = mask_runs(mask)
    return list(zip(starts.tolist(), counts.tolist(), strict=True))


def mask_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of True in a boolean array as two arrays, (firsts, counts): no Python objects."""
    if not mask.size:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    edges = np.flatnonzero(np.diff(mask.view(np.int8), prepend=0, append=0))
    starts, stops = edges[0::2], edges[1::2]
    return starts, stops - starts


def runs(bitmap: bytes | bytearray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of dirty blocks as (firsts, counts) arrays, for replies that travel packed."""
    return mask_runs(np.frombuffer(bitmap, dtype=np.uint8) != 0)


def from_extents(exts: Iterable[Extent], nblocks: int) -> bytearray:
    """Build a bitmap of `nblocks` from extents; extents past the end are clipped."""
    bm = bytearray(nblocks)
    for first, count in exts:
        if first < 0 or count < 0:
            raise ValueError(f"bad extent ({first}, {count})")
        stop = min(first + count, nblocks)
        if stop > first:
            bm[first:stop] = b"\x01" * (stop - first)
    return bm


def to_extents(blocks: Iterable[int]) -> list[Extent]:
    """Group block numbers (any order, duplicates allowed) into sorted extents."""
    out: list[Extent] = []
    for b in sorted(set(blocks)):
        if out and out[-1][0] + out[-1][1] == b:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


CHUNK_SHIFT = 12
CHUNK_BLOCKS = 1 << CHUNK_SHIFT  # 8 KiB of 16-page masks: 256 MiB of file at 64 KiB blocks
CHUNK_MASK = CHUNK_BLOCKS - 1


def chunks_for(nblocks: int) -> int:
    return (nblocks + CHUNK_MASK) >> CHUNK_SHIFT


def _typecode(ppb: int) -> str:
    return "B" if ppb <= 8 else "H"


_FULL: dict[int, array] = {}


def full_chunk(ppb: int) -> array:
    """The one chunk of whole-dirty masks for `ppb` pages a block, shared by every bitmap:
    never changed in place (ORing pages into a full mask leaves it full; every other change
    first takes a chunk of its own)."""
    c = _FULL.get(ppb)
    if c is None:
        c = _FULL[ppb] = array(_typecode(ppb), [(1 << ppb) - 1]) * CHUNK_BLOCKS
    return c


class PageMasks:
    """One epoch's page masks for `n` blocks, in chunks (see the module's docstring). Masks
    past `n` are 0 in the last chunk, which is never the shared full one unless whole."""

    __slots__ = ("chunks", "code", "full", "n", "ppb")

    def __init__(self, nblocks: int, ppb: int, *, all_dirty: bool = False) -> None:
        self.ppb = ppb
        self.full = (1 << ppb) - 1
        self.code = _typecode(ppb)
        self.n = 0
        self.chunks: list[array | None] = []
        self.grow(nblocks)
        if all_dirty and nblocks:
            self.set_full(0, nblocks)

    def __len__(self) -> int:
        return self.n

    def _zeros(self, n: int = CHUNK_BLOCKS) -> array:
        return array(self.code, bytes(n * (1 if self.code == "B" else 2)))

    def own(self, ci: int) -> array:
        """Chunk `ci` as an array of its own, to change in place."""
        c = self.chunks[ci]
        if c is None:
            c = self._zeros()
        elif c is _FULL.get(self.ppb):
            c = array(self.code, c)
        self.chunks[ci] = c
        return c

    def grow(self, nblocks: int) -> None:
        """At least `nblocks` blocks; added ones are clean."""
        if nblocks > self.n:
            self.chunks.extend([None] * (chunks_for(nblocks) - len(self.chunks)))
            self.n = nblocks

    def shrink(self, nblocks: int) -> None:
        if nblocks >= self.n:
            return
        del self.chunks[chunks_for(nblocks):]
        self.n = nblocks
        tail = nblocks & CHUNK_MASK
        if tail and self.chunks[-1] is not None:
            self.own(len(self.chunks) - 1)[tail:] = self._zeros(CHUNK_BLOCKS - tail)

    def set_full(self, first: int, stop: int) -> None:
        """Blocks [first, stop) whole-dirty (stop <= n)."""
        full = full_chunk(self.ppb)
        while first < stop:
            ci = first >> CHUNK_SHIFT
            base = ci << CHUNK_SHIFT
            end = min(stop, base + CHUNK_BLOCKS)
            c = self.chunks[ci]
            if c is full:
                pass
            elif end - first == CHUNK_BLOCKS:
                self.chunks[ci] = full
            else:
                self.own(ci)[first - base:end - base] = array(self.code, [self.full]) * (
                    end - first)
            first = end

    def or_mask(self, block: int, mask: int) -> None:
        c = self.chunks[block >> CHUNK_SHIFT]
        if c is None:
            c = self.own(block >> CHUNK_SHIFT)
        c[block & CHUNK_MASK] |= mask

    def clear(self, first: int, stop: int) -> None:
        stop = min(stop, self.n)
        while first < stop:
            ci = first >> CHUNK_SHIFT
            base = ci << CHUNK_SHIFT
            end = min(stop, base + CHUNK_BLOCKS)
            if self.chunks[ci] is not None:
                if end - first == CHUNK_BLOCKS:
                    self.chunks[ci] = None
                else:
                    self.own(ci)[first - base:end - base] = self._zeros(end - first)
            first = end

    def pieces(self) -> list[tuple[int, int, np.ndarray | None]]:
        """(first block, blocks, masks) of every chunk written, in block order (views, no
        copy); consecutive full chunks come as one piece with masks None."""
        dtype = np.uint8 if self.code == "B" else np.uint16
        full = _FULL.get(self.ppb)
        out: list[tuple[int, int, np.ndarray | None]] = []
        for ci, c in enumerate(self.chunks):
            if c is None:
                continue
            base = ci << CHUNK_SHIFT
            if c is full:
                if out and out[-1][2] is None and out[-1][0] + out[-1][1] == base:
                    out[-1] = (out[-1][0], out[-1][1] + CHUNK_BLOCKS, None)
                else:
                    out.append((base, CHUNK_BLOCKS, None))
            else:
                m = np.frombuffer(c, dtype=dtype)[:self.n - base]
                out.append((base, m.size, m))
        return out

    def count(self) -> int:
        return sum(n if m is None else int(np.count_nonzero(m)) for _, n, m in self.pieces())


def _joined(firsts: list[np.ndarray], counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Runs found piece by piece, in order, as one pair of arrays: runs that touch across a
    piece's edge are one run."""
    if not firsts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    f, c = np.concatenate(firsts).astype(np.int64), np.concatenate(counts).astype(np.int64)
    joined = np.flatnonzero(f[1:] == (f + c)[:-1]) + 1
    if joined.size:
        keep = np.ones(f.size, dtype=bool)
        keep[joined] = False
        heads = np.flatnonzero(keep)
        c = np.add.reduceat(c, heads)
        f = f[heads]
    return f, c


def block_runs(masks: PageMasks) -> tuple[np.ndarray, np.ndarray]:
    """Runs of dirty blocks (any page written) as (firsts, counts) arrays."""
    firsts, counts = [], []
    for base, n, m in masks.pieces():
        if m is None:
            f, c = np.array([base]), np.array([n])
        else:
            f, c = mask_runs(m != 0)
        firsts.append(f + base if m is not None else f)
        counts.append(c)
    return _joined(firsts, counts)


def block_extents(masks: PageMasks) -> list[Extent]:
    f, c = block_runs(masks)
    return list(zip(f.tolist(), c.tolist(), strict=True))


def page_runs(masks: PageMasks, ppb: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs of dirty pages as (firsts, counts) arrays, in pages (block b, page i is page
    b * ppb + i).  Chunks all whole cost a comparison; only chunks mixing whole and partial
    blocks are unpacked to one boolean per page."""
    if ppb == 1:
        return block_runs(masks)
    full = (1 << ppb) - 1
    firsts: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    for base, n, chunk in masks.pieces():
        if chunk is None or (chunk == full).all():
            firsts.append(np.array([base * ppb], dtype=np.int64))
            counts.append(np.array([n * ppb], dtype=np.int64))
            continue
        if not chunk.any():
            continue
        bits = np.unpackbits(chunk.view(np.uint8), bitorder="little")
        if chunk.itemsize * 8 != ppb:
            bits = bits.reshape(chunk.size, chunk.itemsize * 8)[:, :ppb].reshape(-1)
        f, c = mask_runs(bits.view(bool))
        firsts.append(f + base * ppb)
        counts.append(c)
    return _joined(firsts, counts)


def page_extents(masks: PageMasks, ppb: int) -> list[Extent]:
    f, c = page_runs(masks, ppb)
    return list(zip(f.tolist(), c.tolist(), strict=True))


def masks_from_pages(exts: Iterable[Extent], nblocks: int, ppb: int) -> PageMasks:
    """Page masks of `nblocks` blocks from page extents (clipped at the end)."""
    bm = DirtyBitmap(nblocks, ppb=ppb)
    shift, npages = ppb.bit_length() - 1, nblocks * ppb
    for first, count in exts:
        if first < 0 or count < 0:
            raise ValueError(f"bad extent ({first}, {count})")
        end = min(first + count, npages)
        if end > first:
            bm.mark_bytes(first, end, shift, 0)  # in pages: a "byte" is a page here
    bm.resize(nblocks)
    return bm.masks


def blocks_of_pages(exts: Iterable[Extent], ppb: int) -> list[Extent]:
    """The blocks the page extents touch, as block extents."""
    out: list[Extent] = []
    for first, count in exts:
        b0, b1 = first // ppb, (first + count - 1) // ppb + 1
        if out and out[-1][0] + out[-1][1] >= b0:
            f0 = out[-1][0]
            out[-1] = (f0, max(out[-1][1], b1 - f0))
        else:
            out.append((b0, b1 - b0))
    return out


class DirtyBitmap:
    """Pages written since the last swap, for one file: a page mask per block (`masks`).

    ``mark`` and ``mark_bytes`` are the write hot path; ``swap`` atomically hands out the
    current masks and starts empty ones (a new epoch).  Atomic here means: no await or
    thread switch between reading and replacing, which holds because the daemon runs the
    write handler and the swap on one trio thread.
    """

    __slots__ = ("epoch", "full", "masks", "ppb")

    def __init__(self, nblocks: int, *, all_dirty: bool = False, epoch: int = 0,
                 ppb: int = 1) -> None:
        if not 1 <= ppb <= MAX_PAGES_PER_BLOCK:
            raise ValueError(f"{ppb} pages a block: 1 to {MAX_PAGES_PER_BLOCK}")
        self.ppb = ppb
        self.full = (1 << ppb) - 1
        self.masks = PageMasks(nblocks, ppb, all_dirty=all_dirty)
        self.epoch = epoch

    def __len__(self) -> int:
        return self.masks.n

    def mark(self, first: int, last: int) -> None:
        """Mark blocks first..last inclusive whole, growing the map if needed."""
        self.masks.grow(last + 1)
        self.masks.set_full(first, last + 1)

    def mark_bytes(self, offset: int, end: int, shift: int, pshift: int) -> None:
        """Mark the pages bytes [offset, end) touch (blocks of 2**shift, pages of 2**pshift)."""
        first, last = offset >> shift, (end - 1) >> shift
        idx = self.ppb - 1
        p0, p1 = (offset >> pshift) & idx, ((end - 1) >> pshift) & idx
        m = self.masks
        if last >= m.n:
            m.grow(last + 1)
        ci = first >> CHUNK_SHIFT
        if ci == last >> CHUNK_SHIFT:  # (the common case: one chunk, one item store or three)
            c = m.chunks[ci]
            if c is None:
                c = m.own(ci)
            elif c is _FULL.get(self.ppb):
                return  # every page of it is dirty already
            i, j = first & CHUNK_MASK, last & CHUNK_MASK
            if i == j:
                c[i] |= (2 << p1) - (1 << p0)
                return
            c[i] |= self.full - ((1 << p0) - 1)
            if j > i + 1:
                c[i + 1:j] = full_chunk(self.ppb)[:j - i - 1]
            c[j] |= (2 << p1) - 1
            return
        m.or_mask(first, self.full - ((1 << p0) - 1))
        if last > first + 1:
            m.set_full(first + 1, last)
        m.or_mask(last, (2 << p1) - 1)

    def clear(self, first: int, stop: int) -> None:
        self.masks.clear(first, stop)

    def resize(self, nblocks: int) -> None:
        """Drop blocks past `nblocks` or add clean ones up to it."""
        if nblocks < self.masks.n:
            self.masks.shrink(nblocks)
        else:
            self.masks.grow(nblocks)

    def count(self) -> int:
        """Dirty blocks."""
        return self.masks.count()

    def extents(self) -> list[Extent]:
        """Dirty blocks as extents."""
        return block_extents(self.masks)

    def page_extents(self) -> list[Extent]:
        return page_extents(self.masks, self.ppb)

    def swap(self) -> tuple[int, PageMasks]:
        """Return (ended epoch, its masks) and start the next epoch empty."""
        old, ended = self.masks, self.epoch
        self.masks = PageMasks(old.n, self.ppb)
        self.epoch = ended + 1
        return ended, old
