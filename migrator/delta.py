"""What the destination already holds (pure): block digests, and the runs that differ.

A destination that holds an older copy of the files (the retired copy of an A -> B -> A
migration, a replica) says what it has as an xxh3 per block (`Held` frames, after a Manifest
with `delta`); the source then sends only the blocks whose digest differs from its own: the
rsync idea, block-aligned, the digests themselves 8 bytes a block on the wire. The
verification after the switchover still compares every block, the held ones included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import xxhash

from .zeros import hole_runs, zero_digest

Run = tuple[int, int]  # (first block, count)
READ_CHUNK = 8 << 20  # bytes per read while digesting what the destination holds


CHUNK = 4096  # blocks of digests allocated at once: a thin image's holes cost nothing


class Holdings:
    """The destination's digests of one file's blocks, as far as it said them (Held), in
    chunks allocated where it said some; its runs of zero blocks (HeldZero) are only counted:
    the data the source reads there is not zeros (zero runs travel as Zero), so it differs."""

    def __init__(self, nblocks: int) -> None:
        self.nblocks = nblocks
        self.chunks: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # -> (digests, known)
        self.zero_blocks = 0

    def add(self, first: int, digests: Iterable[int]) -> None:
        got = np.fromiter(digests, np.uint64)
        pos, end = first, min(first + len(got), self.nblocks)
        while pos < end:
            ci, off = divmod(pos, CHUNK)
            if ci not in self.chunks:
                self.chunks[ci] = (np.zeros(CHUNK, np.uint64), np.zeros(CHUNK, bool))
            d, k = self.chunks[ci]
            n = min(CHUNK - off, end - pos)
            d[off:off + n] = got[pos - first:pos - first + n]
            k[off:off + n] = True
            pos += n

    def add_zero(self, first: int, count: int) -> None:
        self.zero_blocks += count

    @property
    def blocks(self) -> int:
        return sum(int(k.sum()) for _, k in self.chunks.values()) + self.zero_blocks

    def to_send(self, data: bytes, bs: int, first: int) -> list[Run]:
        """The runs of blocks in `data` (block `first` on, the last may be short) that the
        destination does not hold as they are here."""
        n = -(-len(data) // bs)
        mine = np.fromiter((xxhash.xxh3_64_intdigest(data[i * bs:(i + 1) * bs])
                            for i in range(n)), np.uint64, n)
        send = np.ones(n, bool)
        pos, end = first, min(first + n, self.nblocks)
        while pos < end:
            ci, off = divmod(pos, CHUNK)
            m = min(CHUNK - off, end - pos)
            chunk = self.chunks.get(ci)
            if chunk is not None:
                d, k = chunk
                i = pos - first
                send[i:i + m] = ~(k[off:off + m] & (d[off:off + m] == mine[i:i + m]))
            pos += m
        return _runs(send, first)


def _runs(mask: np.ndarray, first: int) -> list[Run]:
    """(first, count) of each run of True in `mask`, block `first` being mask[0]."""
    if not mask.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return [(first + int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def file_digests(read: Callable[[int, int], bytes], ranges: list[tuple[int, int]], size: int,
                 bs: int, first: int = 0, count: int | None = None) -> list[int]:
    """xxh3 of blocks [first, first+count) (default: to the end) of a file of `size` bytes,
    `read(offset, length)` giving its bytes and `ranges` its data ranges (SEEK_DATA/
    SEEK_HOLE): a hole is never read."""
    nblocks = -(-size // bs)
    count = nblocks - first if count is None else min(count, nblocks - first)
    out: list[int] = []
    step = max(1, READ_CHUNK // bs)
    for b0, n, hole in hole_runs(ranges, first, count, bs, size):
        if hole:
            out += [zero_digest(min(bs, size - b * bs)) for b in range(b0, b0 + n)]
            continue
        for c0 in range(b0, b0 + n, step):
            c1 = min(b0 + n, c0 + step)
            data = read(c0 * bs, min((c1 - c0) * bs, size - c0 * bs))
            if len(data) < min((c1 - c0) * bs, size - c0 * bs):  # shrank meanwhile
                data += bytes(min((c1 - c0) * bs, size - c0 * bs) - len(data))
            out += [xxhash.xxh3_64_intdigest(data[i * bs:(i + 1) * bs])
                    for i in range(c1 - c0)]
    return out
