"""Dirty bitmaps and extent encoding (pure).

A dirty bitmap holds one *page mask* per block: bit i set means page i of the block was
written (0: clean).  A page is the unit of dirty tracking under a block: 4 KiB (a guest
page, the size of most writes) for blocks up to 64 KiB, a 16th of the block above that, so a
mask is at most 16 bits.  Heat, the copy and the spill area stay at the block; only the dirty
rounds go by page, where a 4 KiB write would otherwise cost a 64 KiB block on the wire.

The masks live in an ``array('B')`` (up to 8 pages a block) or ``array('H')``: one C-speed
item store per write, a range one slice assignment, and numpy reads the same memory without
a copy for every query.  A 1 TiB image at 64 KiB blocks costs 32 MiB.

Extents are ``(first, count)`` pairs in ascending order, of blocks or of pages (the form
every API and wire message uses).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import numpy as np

Extent = tuple[int, int]

MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 1 << 20
DEFAULT_BLOCK_SIZE = 64 * 1024
PAGE_SIZE = 4096  # the smallest page: a guest page
MAX_PAGES_PER_BLOCK = 16  # a page mask fits 16 bits


def check_block_size(size: int) -> int:
    """Return log2(size), or raise ValueError if size is not an allowed block size."""
    if size < MIN_BLOCK_SIZE or size > MAX_BLOCK_SIZE or size & (size - 1):
        raise ValueError(f"block size {size} is not a power of two between 4K and 1M")
    return size.bit_length() - 1


def parse_size(text: str) -> int:
    """Parse '64K', '1M', '4096', '2G' (binary units) into bytes."""
    units = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num = t.rstrip("KMGT")
    unit = t[len(num) :]
    if not num or unit not in units:
        raise ValueError(f"cannot read {text!r} as a size (examples: 4096, 64K, 1M)")
    try:
        value = int(num)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size (examples: 4096, 64K, 1M)") from None
    if value < 0:
        raise ValueError(f"size {text!r} is negative")
    return value * units[unit]


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


def _typecode(ppb: int) -> str:
    return "B" if ppb <= 8 else "H"


def mask_array(masks: array) -> np.ndarray:
    """The masks as a numpy array over the same memory (no copy)."""
    return np.frombuffer(masks, dtype=np.uint8 if masks.typecode == "B" else np.uint16)


def block_runs(masks: array) -> tuple[np.ndarray, np.ndarray]:
    """Runs of dirty blocks (any page written) as (firsts, counts) arrays."""
    return mask_runs(mask_array(masks) != 0)


def block_extents(masks: array) -> list[Extent]:
    return mask_extents(mask_array(masks) != 0)


_CHUNK = 1 << 16  # blocks unpacked to pages at once: 1 M pages, 1 MiB of booleans


def page_runs(masks: array, ppb: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs of dirty pages as (firsts, counts) arrays, in pages (block b, page i is page
    b * ppb + i).  Chunks of blocks all clean or all whole cost a comparison; only chunks
    mixing whole and partial blocks are unpacked to one boolean per page."""
    m = mask_array(masks)
    if ppb == 1:
        return mask_runs(m != 0)
    full = (1 << ppb) - 1
    firsts: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    for start in range(0, m.size, _CHUNK):
        chunk = m[start:start + _CHUNK]
        if not chunk.any():
            continue
        if (chunk == full).all():
            firsts.append(np.array([start * ppb], dtype=np.int64))
            counts.append(np.array([chunk.size * ppb], dtype=np.int64))
            continue
        bits = np.unpackbits(chunk.view(np.uint8), bitorder="little")
        if chunk.itemsize * 8 != ppb:
            bits = bits.reshape(chunk.size, chunk.itemsize * 8)[:, :ppb].reshape(-1)
        f, c = mask_runs(bits.view(bool))
        firsts.append(f + start * ppb)
        counts.append(c)
    if not firsts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    f, c = np.concatenate(firsts), np.concatenate(counts)
    # runs that touch across a chunk's edge are one run
    joined = np.flatnonzero(f[1:] == (f + c)[:-1]) + 1
    if joined.size:
        keep = np.ones(f.size, dtype=bool)
        keep[joined] = False
        heads = np.flatnonzero(keep)
        c = np.add.reduceat(c, heads)
        f = f[heads]
    return f, c


def page_extents(masks: array, ppb: int) -> list[Extent]:
    f, c = page_runs(masks, ppb)
    return list(zip(f.tolist(), c.tolist(), strict=True))


def masks_from_pages(exts: Iterable[Extent], nblocks: int, ppb: int) -> array:
    """Page masks of `nblocks` blocks from page extents (clipped at the end)."""
    bm = DirtyBitmap(nblocks, ppb=ppb)
    shift, npages = ppb.bit_length() - 1, nblocks * ppb
    for first, count in exts:
        if first < 0 or count < 0:
            raise ValueError(f"bad extent ({first}, {count})")
        end = min(first + count, npages)
        if end > first:
            bm.mark_bytes(first, end, shift, 0)  # in pages: a "byte" is a page here
    return bm.bits


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
    """Pages written since the last swap, for one file: a page mask per block.

    ``mark`` and ``mark_bytes`` are the write hot path; ``swap`` atomically hands out the
    current masks and starts empty ones (a new epoch).  Atomic here means: no await or
    thread switch between reading and replacing, which holds because the daemon runs the
    write handler and the swap on one trio thread.
    """

    __slots__ = ("bits", "epoch", "full", "ppb")

    def __init__(self, nblocks: int, *, all_dirty: bool = False, epoch: int = 0,
                 ppb: int = 1) -> None:
        if not 1 <= ppb <= MAX_PAGES_PER_BLOCK:
            raise ValueError(f"{ppb} pages a block: 1 to {MAX_PAGES_PER_BLOCK}")
        self.ppb = ppb
        self.full = (1 << ppb) - 1
        self.bits = self._new(nblocks, self.full if all_dirty else 0)
        self.epoch = epoch

    def _new(self, nblocks: int, value: int = 0) -> array:
        return array(_typecode(self.ppb), [value]) * nblocks

    def __len__(self) -> int:
        return len(self.bits)

    def mark(self, first: int, last: int) -> None:
        """Mark blocks first..last inclusive whole, growing the map if needed."""
        bits = self.bits
        if last >= len(bits):
            bits.extend(self._new(last + 1 - len(bits)))
        if first == last:
            bits[first] = self.full
        else:
            bits[first : last + 1] = self._new(last + 1 - first, self.full)

    def mark_bytes(self, offset: int, end: int, shift: int, pshift: int) -> None:
        """Mark the pages bytes [offset, end) touch (blocks of 2**shift, pages of 2**pshift)."""
        first, last = offset >> shift, (end - 1) >> shift
        idx = self.ppb - 1
        p0, p1 = (offset >> pshift) & idx, ((end - 1) >> pshift) & idx
        bits = self.bits
        if last >= len(bits):
            bits.extend(self._new(last + 1 - len(bits)))
        if first == last:
            bits[first] |= (2 << p1) - (1 << p0)
            return
        bits[first] |= self.full - ((1 << p0) - 1)
        if last > first + 1:
            bits[first + 1 : last] = self._new(last - first - 1, self.full)
        bits[last] |= (2 << p1) - 1

    def clear(self, first: int, stop: int) -> None:
        bits = self.bits
        stop = min(stop, len(bits))
        if stop > first:
            bits[first:stop] = self._new(stop - first)

    def resize(self, nblocks: int) -> None:
        """Drop blocks past `nblocks` or add clean ones up to it."""
        bits = self.bits
        if nblocks < len(bits):
            del bits[nblocks:]
        elif nblocks > len(bits):
            bits.extend(self._new(nblocks - len(bits)))

    def count(self) -> int:
        """Dirty blocks."""
        return int(np.count_nonzero(mask_array(self.bits)))

    def extents(self) -> list[Extent]:
        """Dirty blocks as extents."""
        return block_extents(self.bits)

    def page_extents(self) -> list[Extent]:
        return page_extents(self.bits, self.ppb)

    def swap(self) -> tuple[int, array]:
        """Return (ended epoch, its masks) and start the next epoch empty."""
        old, ended = self.bits, self.epoch
        self.bits = self._new(len(old))
        self.epoch = ended + 1
        return ended, old
