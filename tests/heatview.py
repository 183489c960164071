"""Views into a Heat that the daemon does not need (it asks for split, extents and hottest),
for the tests: one write of a range, a block's heat, the written count, every block
coldest first."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from blkfs.heat import Heat


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
