"""Per-block update frequency ("heat") with exponential decay (pure).

A write adds 1 to a block's heat; heat halves every ``half_life`` seconds.
Blocks whose heat is at or under a threshold are *static*, the rest *dynamic*.

Decay without touching every block: a block stores
``sum(2 ** ((t_write - t0) / half_life))`` over its writes, and its heat at
time ``now`` is that sum times ``2 ** (-(now - t0) / half_life)``.  The scale
is common to all blocks, so ordering by stored value is ordering by heat and a
write is one dict update.  When the exponent grows large the stored values are
rescaled and ``t0`` moves forward (every 512 half-lives).

Coldest-first order comes from a ``SortedList`` of ``(stored, block)`` that is
brought up to date lazily, only for the blocks written since the last query:
the write path never pays the O(log n) insert.
"""

from __future__ import annotations

from collections.abc import Sequence

from sortedcontainers import SortedList

from .bitmap import Extent, extents, to_extents

DEFAULT_HALF_LIFE = 60.0
DEFAULT_STATIC_HEAT = 1.0
_RESCALE_EXP = 512.0
_NEGLIGIBLE = 1e-9  # heat below this is dropped at rescale/snapshot time


class Heat:
    """Decayed write counts for the blocks of one file."""

    __slots__ = ("_changed", "_index", "_indexed", "_inv", "_stored", "_t0", "half_life")

    def __init__(self, half_life: float = DEFAULT_HALF_LIFE, now: float = 0.0) -> None:
        if not half_life > 0:
            raise ValueError("half-life must be positive")
        self.half_life = float(half_life)
        self._inv = 1.0 / self.half_life
        self._t0 = now
        self._stored: dict[int, float] = {}
        self._index: SortedList = SortedList()
        self._indexed: dict[int, float] = {}
        self._changed: set[int] = set()

    # -- writes (counted in batches, see FileTracker.settle_heat) ---------------

    def bump_many(self, blocks: Sequence[int], now: float) -> None:
        """Count one write of each listed block (repeats count again) at `now`."""
        e = (now - self._t0) * self._inv
        if e > _RESCALE_EXP:
            self._rescale(now)
            e = 0.0
        w = 2.0**e
        stored = self._stored
        get = stored.get
        for b in blocks:
            stored[b] = get(b, 0.0) + w
        self._changed.update(blocks)

    # -- queries --------------------------------------------------------------

    def _scale(self, now: float) -> float:
        e = (now - self._t0) * self._inv
        if e > _RESCALE_EXP:  # long idle: rescale before 2**-e underflows to 0
            self._rescale(now)
            e = 0.0
        return 2.0**-e

    def _refresh(self) -> SortedList:
        index, indexed, stored = self._index, self._indexed, self._stored
        for b in self._changed:
            old = indexed.pop(b, None)
            if old is not None:
                index.remove((old, b))
            v = stored.get(b)
            if v is not None:
                index.add((v, b))
                indexed[b] = v
        self._changed.clear()
        return index

    def _threshold_pos(self, threshold: float, now: float) -> int:
        """Index position of the first written block hotter than `threshold`."""
        scale = self._scale(now)
        index = self._refresh()
        # A tiny tolerance: a block written once has heat 1 up to rounding.
        limit = threshold * (1.0 + 1e-9) / scale
        return index.bisect_right((limit, float("inf")))

    def split(self, nblocks: int, threshold: float, now: float) -> tuple[int, int]:
        """(static, dynamic) block counts among the first `nblocks` blocks."""
        pos = self._threshold_pos(threshold, now)
        dynamic = sum(1 for _, b in self._index.islice(pos) if b < nblocks)
        return nblocks - dynamic, dynamic

    def dynamic_blocks(self, threshold: float, now: float) -> list[int]:
        """Blocks hotter than `threshold`, coldest first."""
        pos = self._threshold_pos(threshold, now)
        return [b for _, b in self._index.islice(pos)]

    def split_extents(
        self, nblocks: int, threshold: float, now: float
    ) -> tuple[list[Extent], list[Extent]]:
        """(static extents, dynamic extents) over blocks 0..nblocks-1."""
        dynamic = [b for b in self.dynamic_blocks(threshold, now) if b < nblocks]
        static = bytearray(b"\x01" * nblocks)
        for b in dynamic:
            static[b] = 0
        return extents(static), to_extents(dynamic)

    def hottest(self, k: int, now: float) -> list[tuple[int, float]]:
        """The k hottest blocks as (block, heat), hottest first."""
        scale = self._scale(now)
        index = self._refresh()
        n = len(index)
        return [(b, v * scale) for v, b in index.islice(max(0, n - k), n, reverse=True)]

    def extents(self, now: float, digits: int = 2) -> list[tuple[int, int, float]]:
        """Written blocks grouped into (first, count, heat) runs of equal rounded heat."""
        scale = self._scale(now)
        out: list[tuple[int, int, float]] = []
        for b in sorted(self._stored):
            h = round(self._stored[b] * scale, digits)
            if out and out[-1][0] + out[-1][1] == b and out[-1][2] == h:
                out[-1] = (out[-1][0], out[-1][1] + 1, h)
            else:
                out.append((b, 1, h))
        return out

    # -- changes of shape ---------------------------------------------------------

    def truncate(self, nblocks: int) -> None:
        """Forget blocks at or past `nblocks` (the file shrank)."""
        gone = [b for b in self._stored if b >= nblocks]
        for b in gone:
            del self._stored[b]
        self._changed.update(gone)

    def _rescale(self, now: float) -> None:
        scale = 2.0 ** (-(now - self._t0) * self._inv)
        self._stored = {b: v * scale for b, v in self._stored.items() if v * scale > _NEGLIGIBLE}
        self._t0 = now
        self._index = SortedList()
        self._indexed = {}
        self._changed = set(self._stored)

    # -- persistence ------------------------------------------------------------

    def snapshot(self, now: float) -> list[tuple[int, float]]:
        """(block, heat) pairs worth keeping, as of `now`."""
        scale = self._scale(now)
        return [(b, v * scale) for b, v in self._stored.items() if v * scale > _NEGLIGIBLE]

    def restore(self, pairs: list[tuple[int, float]], now: float, elapsed: float = 0.0) -> None:
        """Load (block, heat) pairs saved `elapsed` seconds ago, decaying them."""
        decay = 2.0 ** (-max(0.0, elapsed) * self._inv)
        self._t0 = now
        self._stored = {int(b): float(h) * decay for b, h in pairs if h * decay > _NEGLIGIBLE}
        self._index = SortedList()
        self._indexed = {}
        self._changed = set(self._stored)
