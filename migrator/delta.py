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


class Holdings:
    """The destination's digests of one file's blocks, as far as it said them."""

    def __init__(self, nblocks: int) -> None:
        self.digests = np.zeros(nblocks, np.uint64)
        self.known = np.zeros(nblocks, bool)

    def add(self, first: int, digests: Iterable[int]) -> None:
        got = np.fromiter(digests, np.uint64)
        self.digests[first:first + len(got)] = got
        self.known[first:first + len(got)] = True

    @property
    def blocks(self) -> int:
        return int(self.known.sum())

    def to_send(self, data: bytes, bs: int, first: int) -> list[Run]:
        """The runs of blocks in `data` (block `first` on, the last may be short) that the
        destination does not hold as they are here."""
        n = -(-len(data) // bs)
        end = min(first + n, len(self.known))
        mine = np.fromiter((xxhash.xxh3_64_intdigest(data[i * bs:(i + 1) * bs])
                            for i in range(n)), np.uint64, n)
        send = np.ones(n, bool)
        if end > first:
            k = end - first
            send[:k] = ~(self.known[first:end] & (self.digests[first:end] == mine[:k]))
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
