"""Per-block update frequency ("heat") with exponential decay (pure).

A write adds 1 to a block's heat; heat halves every ``half_life`` seconds.
Blocks whose heat is at or under a threshold are *static*, the rest *dynamic*.

Decay without touching every block: a block stores
``sum(2 ** ((t_write - t0) / half_life))`` over its writes, and its heat at
time ``now`` is that sum times ``2 ** (-(now - t0) / half_life)``.  The scale
is common to all blocks, so ordering by stored value is ordering by heat and a
write is one add.  When the exponent grows large the stored values are
rescaled and ``t0`` moves forward (every 512 half-lives).

The stored values are float64 arrays by block in chunks of ``CHUNK_BLOCKS`` (0 = never
written, or decayed to nothing), a chunk allocated at its first write: 8 bytes per block of
the chunks written (32 KiB a chunk), so a thin image's heat costs what its data touches, not
its size. Every query is a few vectorised passes over the chunks, so splitting, ordering or
listing the heat of a million blocks costs milliseconds, where a dict and a sorted index of
(value, block) pairs cost about 270 bytes per written block and seconds per query.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from .bitmap import CHUNK_BLOCKS, CHUNK_MASK, CHUNK_SHIFT, Extent
from .settings import DEFAULT_HALF_LIFE as DEFAULT_HALF_LIFE
from .settings import DEFAULT_STATIC_HEAT as DEFAULT_STATIC_HEAT

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


def _by_chunk(blocks: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(chunk index, start, stop) of each chunk's slice of sorted block numbers."""
    cis = blocks >> CHUNK_SHIFT
    cuts = np.concatenate(([0], np.flatnonzero(np.diff(cis)) + 1, [blocks.size])).tolist()
    for a, b in itertools.pairwise(cuts):
        yield int(cis[a]), a, b


class Heat:
    """Decayed write counts for the blocks of one file."""

    __slots__ = ("_chunks", "_inv", "_t0", "_top", "half_life")

    def __init__(self, half_life: float = DEFAULT_HALF_LIFE, now: float = 0.0) -> None:
        if not half_life > 0:
            raise ValueError("half-life must be positive")
        self.half_life = float(half_life)
        self._inv = 1.0 / self.half_life
        self._t0 = now
        self._chunks: dict[int, np.ndarray] = {}  # chunk index -> stored values of its blocks
        self._top = 0  # one past the highest block that may be written

    @property
    def nbytes(self) -> int:
        """The memory the stored values take."""
        return sum(c.nbytes for c in self._chunks.values())

    def _nonzero(self, nblocks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(blocks, stored values) of every written block below `nblocks`, in block order."""
        top = self._top if nblocks is None else min(self._top, nblocks)
        blocks, values = [], []
        for ci in sorted(self._chunks):
            base = ci << CHUNK_SHIFT
            if base >= top:
                break
            c = self._chunks[ci][:top - base]
            idx = np.flatnonzero(c)
            blocks.append(idx + base)
            values.append(c[idx])
        if not blocks:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        return np.concatenate(blocks), np.concatenate(values)

    # -- writes (counted in batches, see FileTracker.settle_heat) ---------------

    def bump_many(self, blocks: Sequence[int], now: float) -> None:
        """Count one write of each listed block (repeats count again) at `now`."""
        if not len(blocks):
            return
        e = (now - self._t0) * self._inv
        if e > _RESCALE_EXP:
            self._rescale(now)
            e = 0.0
        idx = np.sort(np.asarray(blocks, dtype=np.int64))
        self._top = max(self._top, int(idx[-1]) + 1)
        w = 2.0**e
        for ci, a, b in _by_chunk(idx):
            np.add.at(self._chunk(ci), idx[a:b] & CHUNK_MASK, w)

    def bump_span(self, first: int, stop: int, now: float) -> None:
        """Count one write of each block of [first, stop) at `now`."""
        if stop <= first:
            return
        e = (now - self._t0) * self._inv
        if e > _RESCALE_EXP:
            self._rescale(now)
            e = 0.0
        self._top = max(self._top, stop)
        w = 2.0**e
        while first < stop:
            ci = first >> CHUNK_SHIFT
            end = min(stop, (ci + 1) << CHUNK_SHIFT)
            self._chunk(ci)[first & CHUNK_MASK:(first & CHUNK_MASK) + end - first] += w
            first = end

    def _chunk(self, ci: int) -> np.ndarray:
        c = self._chunks.get(ci)
        if c is None:
            c = self._chunks[ci] = np.zeros(CHUNK_BLOCKS, dtype=np.float64)
        return c

    # -- queries --------------------------------------------------------------

    def _scale(self, now: float) -> float:
        e = (now - self._t0) * self._inv
        if e > _RESCALE_EXP:  # long idle: rescale before 2**-e underflows to 0
            self._rescale(now)
            e = 0.0
        return 2.0**-e

    def _limit(self, threshold: float, now: float) -> float:
        """The stored value above which a block is hotter than `threshold`."""
        return threshold * _TOLERANCE / self._scale(now)

    def split(self, nblocks: int, threshold: float, now: float) -> tuple[int, int]:
        """(static, dynamic) block counts among the first `nblocks` blocks."""
        limit = self._limit(threshold, now)
        top = min(self._top, nblocks)
        dynamic = 0
        for ci, c in self._chunks.items():
            base = ci << CHUNK_SHIFT
            if base < top:
                dynamic += int(np.count_nonzero(c[:top - base] > limit))
        return nblocks - dynamic, dynamic

    def dynamic_extents(
        self, nblocks: int, threshold: float, now: float, limit: int
    ) -> list[Extent]:
        """The first `limit` dynamic extents in block order (a listing, not a plan)."""
        above = self._limit(threshold, now)
        blocks, values = self._nonzero(nblocks)
        return _block_extents(blocks[values > above], max(0, limit))

    def hottest(self, k: int, now: float) -> list[tuple[int, float]]:
        """The k hottest blocks as (block, heat), hottest first (ties: higher block first)."""
        scale = self._scale(now)
        idx, vals = self._nonzero()
        if k <= 0 or not idx.size:
            return []
        if idx.size > k:  # the k largest, ties at the cut taken from the highest blocks
            cut = np.partition(vals, idx.size - k)[idx.size - k]
            above = np.flatnonzero(vals > cut)
            tied = np.flatnonzero(vals == cut)[::-1][: k - above.size]
            pick = np.concatenate((above, tied))
            idx, vals = idx[pick], vals[pick]
        order = np.lexsort((-idx, -vals))  # by falling value, then falling block
        return list(zip(idx[order].tolist(), (vals[order] * scale).tolist(), strict=True))

    def runs(self, now: float, digits: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Written blocks as runs of equal rounded heat: (firsts, counts, heats) arrays."""
        idx, vals = self._nonzero()
        heat = np.round(vals * self._scale(now), digits)
        if not idx.size:
            return idx, idx.copy(), heat
        breaks = np.flatnonzero((np.diff(idx) != 1) | (np.diff(heat) != 0)) + 1
        starts = np.concatenate(([0], breaks))
        stops = np.concatenate((breaks, [idx.size]))
        return idx[starts], stops - starts, heat[starts]

    # -- changes of shape ---------------------------------------------------------

    def truncate(self, nblocks: int) -> None:
        """Forget blocks at or past `nblocks` (the file shrank)."""
        if nblocks >= self._top:
            return
        for ci in [ci for ci in self._chunks if (ci << CHUNK_SHIFT) >= nblocks]:
            del self._chunks[ci]
        last = self._chunks.get(nblocks >> CHUNK_SHIFT)
        if last is not None:
            last[nblocks & CHUNK_MASK:] = 0.0
        self._top = nblocks

    def _rescale(self, now: float) -> None:
        factor = 2.0 ** (-(now - self._t0) * self._inv)
        for ci in list(self._chunks):
            c = self._chunks[ci]
            c *= factor
            c[c <= _NEGLIGIBLE] = 0.0
            if not c.any():
                del self._chunks[ci]  # decayed to nothing: its memory goes too
        self._t0 = now

    # -- persistence ------------------------------------------------------------

    def snapshot_arrays(self, now: float) -> tuple[np.ndarray, np.ndarray]:
        """(blocks, heats) worth keeping, as of `now`."""
        scale = self._scale(now)
        idx, vals = self._nonzero()
        keep = vals * scale > _NEGLIGIBLE
        return idx[keep], vals[keep] * scale

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
        heats = heats[keep]
        self._t0 = now
        self._chunks = {}
        self._top = 0
        if blocks.size:
            order = np.argsort(blocks, kind="stable")  # (a block named twice: the last wins)
            blocks, heats = blocks[order], heats[order]
            self._top = int(blocks[-1]) + 1
            for ci, a, b in _by_chunk(blocks):
                self._chunk(ci)[blocks[a:b] & CHUNK_MASK] = heats[a:b]
