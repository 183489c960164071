"""Views into a Heat that the daemon does not need (it asks for split, dynamic_extents, runs,
hottest and snapshot_arrays), for the tests: one write of a range, a block's heat, the
written count, every block coldest first, the split as extents, the runs as tuples."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from blkfs.bitmap import Extent, mask_extents
from blkfs.heat import Heat, _block_extents


def bump(h: Heat, first: int, last: int, now: float) -> None:
    h.bump_many(range(first, last + 1), now)


def dense(h: Heat, nblocks: int | None = None) -> np.ndarray:
    """The stored values of blocks 0..nblocks-1 (all written ones for None) as one array."""
    idx, vals = h._nonzero(nblocks)
    n = nblocks if nblocks is not None else (int(idx[-1]) + 1 if idx.size else 0)
    v = np.zeros(n)
    v[idx] = vals
    return v


def value(h: Heat, block: int, now: float) -> float:
    scale = h._scale(now)  # first: it may rescale the stored values
    v = dense(h)
    return float(v[block]) * scale if block < v.size else 0.0


def written(h: Heat) -> int:
    return int(h._nonzero()[0].size)


def coldest(h: Heat, nblocks: int, now: float) -> Iterator[tuple[int, float]]:
    """Never-written blocks (heat 0) first in block order, then by rising heat."""
    scale = h._scale(now)
    v = dense(h, nblocks)
    for b in np.flatnonzero(v == 0).tolist():
        yield b, 0.0
    idx = np.flatnonzero(v)
    for b in idx[np.argsort(v[idx], kind="stable")].tolist():
        yield b, float(v[b]) * scale


def dynamic_blocks(h: Heat, threshold: float, now: float) -> list[int]:
    """Blocks hotter than `threshold`, coldest first (ties in block order)."""
    idx, vals = h._nonzero()
    hot = vals > h._limit(threshold, now)
    return idx[hot][np.argsort(vals[hot], kind="stable")].tolist()


def split_extents(h: Heat, nblocks: int, threshold: float,
                  now: float) -> tuple[list[Extent], list[Extent]]:
    """(static extents, dynamic extents) over blocks 0..nblocks-1, in block order."""
    hot = dense(h, nblocks) > h._limit(threshold, now)
    return mask_extents(~hot), _block_extents(np.flatnonzero(hot))


def extents(h: Heat, now: float, digits: int = 2) -> list[tuple[int, int, float]]:
    """Written blocks grouped into (first, count, heat) runs of equal rounded heat."""
    firsts, counts, heats = h.runs(now, digits)
    return list(zip(firsts.tolist(), counts.tolist(), heats.tolist(), strict=True))


def snapshot(h: Heat, now: float) -> list[tuple[int, float]]:
    """(block, heat) pairs worth keeping, as of `now`."""
    blocks, heats = h.snapshot_arrays(now)
    return list(zip(blocks.tolist(), heats.tolist(), strict=True))
