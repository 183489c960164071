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


def value(h: Heat, block: int, now: float) -> float:
    scale = h._scale(now)  # first: it may rescale the stored values
    v = h._view()
    return float(v[block]) * scale if block < v.size else 0.0


def written(h: Heat) -> int:
    return int(np.count_nonzero(h._view()))


def coldest(h: Heat, nblocks: int, now: float) -> Iterator[tuple[int, float]]:
    """Never-written blocks (heat 0) first in block order, then by rising heat."""
    scale = h._scale(now)
    v = np.zeros(nblocks)
    part = h._view(nblocks)
    v[: part.size] = part
    for b in np.flatnonzero(v == 0).tolist():
        yield b, 0.0
    idx = np.flatnonzero(v)
    for b in idx[np.argsort(v[idx], kind="stable")].tolist():
        yield b, float(v[b]) * scale


def dynamic_blocks(h: Heat, threshold: float, now: float) -> list[int]:
    """Blocks hotter than `threshold`, coldest first (ties in block order)."""
    idx = np.flatnonzero(h._hot(None, threshold, now))
    return idx[np.argsort(h._stored[idx], kind="stable")].tolist()


def split_extents(h: Heat, nblocks: int, threshold: float,
                  now: float) -> tuple[list[Extent], list[Extent]]:
    """(static extents, dynamic extents) over blocks 0..nblocks-1, in block order."""
    hot = np.zeros(nblocks, dtype=bool)
    part = h._hot(nblocks, threshold, now)
    hot[: part.size] = part
    return mask_extents(~hot), _block_extents(np.flatnonzero(hot))


def extents(h: Heat, now: float, digits: int = 2) -> list[tuple[int, int, float]]:
    """Written blocks grouped into (first, count, heat) runs of equal rounded heat."""
    firsts, counts, heats = h.runs(now, digits)
    return list(zip(firsts.tolist(), counts.tolist(), heats.tolist(), strict=True))


def snapshot(h: Heat, now: float) -> list[tuple[int, float]]:
    """(block, heat) pairs worth keeping, as of `now`."""
    blocks, heats = h.snapshot_arrays(now)
    return list(zip(blocks.tolist(), heats.tolist(), strict=True))
