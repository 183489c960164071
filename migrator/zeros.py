"""Zero blocks and holes (pure): what never needs to travel as data.

Real VM disks are thin and most of a VM's memory is zero pages. A run of blocks that is all
zeros travels as a `Zero` frame (a few bytes for any run); a hole in the source's backing
file is not even read (the source finds data with SEEK_DATA/SEEK_HOLE, see
`data_ranges`); and the digest of a zero block is a constant, so verification never reads a
hole either.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import xxhash

Run = tuple[int, int, bool]  # (first block, count, is zero / is hole)


@lru_cache(maxsize=8)
def _zeros(n: int) -> bytes:
    return bytes(n)


@lru_cache(maxsize=64)
def zero_digest(length: int) -> int:
    """xxh3-64 of `length` zero bytes (a zero block, or a file's short zero tail)."""
    return xxhash.xxh3_64_intdigest(_zeros(length))


def zero_runs(data: bytes, bs: int, first: int = 0) -> list[Run]:
    """Runs of blocks in `data` (block `first` on; the last may be short) that are all zeros
    or not. One compare for an all-zero buffer; else a compare per block (memcmp speed)."""
    if not data:
        return []
    n = -(-len(data) // bs)
    if data == _zeros(len(data)):
        return [(first, n, True)]
    zb = _zeros(bs)
    runs: list[Run] = []
    for i in range(n):
        blk = data[i * bs:(i + 1) * bs]
        z = blk == (zb if len(blk) == bs else zb[:len(blk)])
        if runs and runs[-1][2] == z:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, z)
        else:
            runs.append((first + i, 1, z))
    return runs


def hole_runs(data: Iterable[tuple[int, int]], first: int, count: int, bs: int,
              size: int) -> list[Run]:
    """Split blocks [first, first+count) of a file of `size` bytes into runs that are holes
    (True: no byte of the block is in a data range) or not, given its data ranges as
    [start, end) byte offsets, sorted (what SEEK_DATA/SEEK_HOLE report)."""
    runs: list[Run] = []

    def add(b0: int, b1: int, hole: bool) -> None:
        if b1 <= b0:
            return
        if runs and runs[-1][2] == hole and runs[-1][0] + runs[-1][1] == b0:
            runs[-1] = (runs[-1][0], runs[-1][1] + b1 - b0, hole)
        else:
            runs.append((b0, b1 - b0, hole))

    end = first + count
    pos = first
    for start, stop in data:
        stop = min(stop, size)
        if stop <= start:
            continue
        d0, d1 = start // bs, -(-stop // bs)  # blocks touching data
        if d1 <= pos:
            continue
        if d0 >= end:
            break
        add(pos, min(max(d0, pos), end), True)
        add(max(d0, pos), min(d1, end), False)
        pos = max(pos, min(d1, end))
        if pos >= end:
            break
    add(pos, end, True)
    return runs
