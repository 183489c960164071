"""Per-block update frequency ("heat") with exponential decay (pure).

A write adds 1 to a block's heat; heat halves every ``half_life`` seconds.
Blocks whose heat is at or under a threshold are *static*, the rest *dynamic*.

Decay without touching every block: a block stores
``sum(2 ** ((t_write - t0) / half_life))`` over its writes, and its heat at
time ``now`` is that sum times ``2 ** (-(now - t0) / half_life)``.  The scale
is common to all blocks, so ordering by stored value is ordering by heat and a
write is one add.  When the exponent grows large the stored values are
rescaled and ``t0`` moves forward (every 512 half-lives).

The stored values are one float64 array indexed by block (0 = never written, or
decayed to nothing): 8 bytes per block, 8 MiB per million blocks (128 MiB per TiB
at 64 KiB blocks), whatever the writes were.  Every query is a few vectorised passes
over it, so splitting, ordering or listing the heat of a million blocks costs
milliseconds, where a dict and a sorted index of (value, block) pairs cost about
270 bytes per written block and seconds per query.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .bitmap import Extent

DEFAULT_HALF_LIFE = 60.0
DEFAULT_STATIC_HEAT = 1.0
_RESCALE_EXP = 512.0
_NEGLIGIBLE = 1e-9  # heat below this is dropped at rescale/snapshot time
_TOLERANCE = 1.0 + 1e-9  # a block written once has heat 1 up to rounding


def _block_extents(blocks: np.ndarray, limit: int | None = None) -> list[Extent]:
    """Sorted distinct block numbers grouped into extents (the first `limit` of them)."""
    if not blocks.size:
        return []
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate(([0], breaks))[:limit]
    stops = np.concatenate((breaks, [blocks.size]))[:limit]
    return list(zip(blocks[starts].tolist(), (stops - starts).tolist(), strict=True))


class Heat:
    """Decayed write counts for the blocks of one file."""

    __slots__ = ("_inv", "_stored", "_t0", "_top", "half_life")

    def __init__(self, half_life: float = DEFAULT_HALF_LIFE, now: float = 0.0) -> None:
        if not half_life > 0:
            raise ValueError("half-life must be positive")
        self.half_life = float(half_life)
        self._inv = 1.0 / self.half_life
        self._t0 = now
        self._stored = np.zeros(0, dtype=np.float64)  # capacity; blocks past _top are 0
        self._top = 0  # one past the highest block that may be written

    def _grow(self, top: int) -> None:
        if top > self._stored.size:
            bigger = np.zeros(max(top, self._stored.size * 3 // 2, 4096), dtype=np.float64)
            bigger[: self._top] = self._stored[: self._top]
            self._stored = bigger
        self._top = max(self._top, top)

    def _view(self, nblocks: int | None = None) -> np.ndarray:
        top = self._top if nblocks is None else min(self._top, nblocks)
        return self._stored[:top]

    # -- writes (counted in batches, see FileTracker.settle_heat) ---------------

    def bump_many(self, blocks: Sequence[int], now: float) -> None:
        """Count one write of each listed block (repeats count again) at `now`."""
        if not len(blocks):
            return
        e = (now - self._t0) * self._inv
        if e > _RESCALE_EXP:
            self._rescale(now)
            e = 0.0
        idx = np.asarray(blocks, dtype=np.int64)
        self._grow(int(idx.max()) + 1)
        np.add.at(self._stored, idx, 2.0**e)

    # -- queries --------------------------------------------------------------

    def _scale(self, now: float) -> float:
        e = (now - self._t0) * self._inv
        if e > _RESCALE_EXP:  # long idle: rescale before 2**-e underflows to 0
            self._rescale(now)
            e = 0.0
        return 2.0**-e

    def _hot(self, nblocks: int | None, threshold: float, now: float) -> np.ndarray:
        """Mask over the first blocks: heat above `threshold`."""
        limit = threshold * _TOLERANCE / self._scale(now)
        return self._view(nblocks) > limit

    def split(self, nblocks: int, threshold: float, now: float) -> tuple[int, int]:
        """(static, dynamic) block counts among the first `nblocks` blocks."""
        dynamic = int(np.count_nonzero(self._hot(nblocks, threshold, now)))
        return nblocks - dynamic, dynamic

    def dynamic_extents(
        self, nblocks: int, threshold: float, now: float, limit: int
    ) -> list[Extent]:
        """The first `limit` dynamic extents in block order (a listing, not a plan)."""
        blocks = np.flatnonzero(self._hot(nblocks, threshold, now))
        return _block_extents(blocks, max(0, limit))

    def hottest(self, k: int, now: float) -> list[tuple[int, float]]:
        """The k hottest blocks as (block, heat), hottest first (ties: higher block first)."""
        scale = self._scale(now)
        v = self._view()
        idx = np.flatnonzero(v)
        if k <= 0 or not idx.size:
            return []
        if idx.size > k:  # the k largest, ties at the cut taken from the highest blocks
            vals = v[idx]
            cut = np.partition(vals, idx.size - k)[idx.size - k]
            above = idx[vals > cut]
            idx = np.concatenate((above, idx[vals == cut][::-1][: k - above.size]))
        order = np.lexsort((-idx, -v[idx]))  # by falling value, then falling block
        top = idx[order]
        return list(zip(top.tolist(), (v[top] * scale).tolist(), strict=True))

    def runs(self, now: float, digits: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Written blocks as runs of equal rounded heat: (firsts, counts, heats) arrays."""
        v = self._view()
        idx = np.flatnonzero(v)
        heat = np.round(v[idx] * self._scale(now), digits)
        if not idx.size:
            return idx, idx.copy(), heat
        breaks = np.flatnonzero((np.diff(idx) != 1) | (np.diff(heat) != 0)) + 1
        starts = np.concatenate(([0], breaks))
        stops = np.concatenate((breaks, [idx.size]))
        return idx[starts], stops - starts, heat[starts]

    # -- changes of shape ---------------------------------------------------------

    def truncate(self, nblocks: int) -> None:
        """Forget blocks at or past `nblocks` (the file shrank)."""
        if nblocks < self._top:
            self._stored[nblocks : self._top] = 0.0
            self._top = nblocks

    def _rescale(self, now: float) -> None:
        v = self._view()
        v *= 2.0 ** (-(now - self._t0) * self._inv)
        v[v <= _NEGLIGIBLE] = 0.0
        self._t0 = now

    # -- persistence ------------------------------------------------------------

    def snapshot_arrays(self, now: float) -> tuple[np.ndarray, np.ndarray]:
        """(blocks, heats) worth keeping, as of `now`."""
        scale = self._scale(now)
        v = self._view()
        idx = np.flatnonzero(v * scale > _NEGLIGIBLE)
        return idx, v[idx] * scale

    def restore(
        self, pairs: Iterable[tuple[int, float]] | tuple[np.ndarray, np.ndarray], now: float,
        elapsed: float = 0.0,
    ) -> None:
        """Load (block, heat) pairs (or a (blocks, heats) pair of arrays) saved `elapsed`
        seconds ago, decaying them."""
        if isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[0], np.ndarray):
            blocks, heats = pairs
        else:
            listed = list(pairs)
            blocks = np.array([b for b, _ in listed], dtype=np.int64)
            heats = np.array([h for _, h in listed], dtype=np.float64)
        decay = 2.0 ** (-max(0.0, elapsed) * self._inv)
        heats = np.asarray(heats, dtype=np.float64) * decay
        keep = heats > _NEGLIGIBLE
        blocks = np.asarray(blocks, dtype=np.int64)[keep]
        self._t0 = now
        self._stored = np.zeros(0, dtype=np.float64)
        self._top = 0
        if blocks.size:
            self._grow(int(blocks.max()) + 1)
            self._stored[blocks] = heats[keep]
