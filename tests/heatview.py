"""Views into a Heat that the daemon does not need (it asks for split, extents and hottest),
for the tests: one write of a range, a block's heat, the written count, every block
coldest first."""

from __future__ import annotations

from collections.abc import Iterator

from blkfs.heat import Heat


def bump(h: Heat, first: int, last: int, now: float) -> None:
    h.bump_many(range(first, last + 1), now)


def value(h: Heat, block: int, now: float) -> float:
    scale = h._scale(now)  # first: it may rescale the stored values
    return h._stored.get(block, 0.0) * scale


def written(h: Heat) -> int:
    return len(h._stored)


def coldest(h: Heat, nblocks: int, now: float) -> Iterator[tuple[int, float]]:
    """Never-written blocks (heat 0) first in block order, then by rising heat."""
    scale = h._scale(now)
    index = list(h._refresh())
    seen = {b for _, b in index}
    for b in range(nblocks):
        if b not in seen:
            yield b, 0.0
    for v, b in index:
        if b < nblocks:
            yield b, v * scale


