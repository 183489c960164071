"""Round planning for pre-copy migration (pure: no I/O, no trio).

Two decisions live here:

* **What to send first.** The initial copy sends static blocks before dynamic
  ones, each coldest first (a block that has not changed for a long time is
  unlikely to change before switchover, so copying it early is rarely wasted).
* **When to stop iterating.** After each round the dirty set (in pages: the unit of
  tracking under a block, 4 KiB under 64 KiB blocks) is measured; the
  migration switches over when that set is small enough — by block count, or by
  the downtime it would cost at the bandwidth measured so far (QEMU's rule:
  remaining bytes <= bandwidth x downtime limit) — or when the rounds stop
  converging (the set has not shrunk for ``stall_rounds`` rounds, or
  ``max_rounds`` is reached), in which case the policy (``OnStall``) says: go on
  converging (slow the VM down, go post-copy, stop after a timeout: rounds.py), switch over
  anyway, or abort.
* **When to slow the VM down** (auto-converge, ``AutoConverge``): QEMU's rule.
* **What post-copy still sends in the downtime** (``warm_set``): the hottest absent memory,
  by whole fault region, within a small budget, so that the destination's first reads (QEMU
  loading its device state, the guest's first touches) find their pages instead of faulting.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from blkfs.bitmap import blocks_of_pages, extents, from_extents, to_extents

from .defaults import (
    DOWNTIME_MS,
    MAX_ROUNDS,
    ON_STALL,
    POSTCOPY_DOWNTIME_MS,
    THROTTLE_INITIAL,
    THROTTLE_MAX,
    THROTTLE_STEP,
)

Extent = tuple[int, int]


def initial_order(
    nblocks: int, heat_runs: Iterable[tuple[int, int, float]] | np.ndarray, threshold: float
) -> tuple[list[Extent], list[Extent]]:
    """(static extents, dynamic extents), each coldest first.

    `heat_runs` are blkfs's ``(first, count, heat)`` runs of written blocks (``blkfs heat``,
    as tuples or as its packed array); blocks in no run were never written (heat 0) and come
    first, in block order.  Vectorised: a million runs take tens of milliseconds.
    """
    firsts, counts, heats = _heat_arrays(heat_runs)
    stops = np.minimum(firsts + counts, nblocks)
    keep = stops > firsts
    firsts, stops, heats = firsts[keep], stops[keep], heats[keep]
    # Never written: the gaps between the runs in block order (arrays of the runs, never of
    # the blocks: a 4 TiB thin image has 64 Mi blocks and a few runs).
    by_block = np.argsort(firsts, kind="stable")
    ends = np.maximum.accumulate(stops[by_block]) if by_block.size else stops
    gap_firsts = np.concatenate(([0], ends)).astype(np.int64)
    gap_stops = np.concatenate((firsts[by_block], [nblocks])).astype(np.int64)
    gap = gap_stops > gap_firsts
    static = list(zip(gap_firsts[gap].tolist(), (gap_stops - gap_firsts)[gap].tolist(),
                      strict=True))
    order = np.lexsort((firsts, heats))  # by rising heat, then block
    firsts, counts, heats = firsts[order], (stops - firsts)[order], heats[order]
    cold = heats <= threshold * (1 + 1e-9)
    static += list(zip(firsts[cold].tolist(), counts[cold].tolist(), strict=True))
    dynamic = list(zip(firsts[~cold].tolist(), counts[~cold].tolist(), strict=True))
    return static, dynamic


FAULT_REGION = 2 << 20  # bytes one fault on mmap'ed guest RAM reads (a huge page's folio)


def warm_set(absent: Iterable[Extent], heat_runs: Iterable[tuple[int, int, float]] | np.ndarray,
             budget_blocks: int, region_blocks: int,
             first: Iterable[int] = ()) -> tuple[list[Extent], list[Extent]]:
    """(sent with the last set, left absent): the absent blocks of whole fault regions,
    hottest region first, as many as fit `budget_blocks`; before them, whatever the budget,
    the regions of the blocks in `first`: those the hypervisor reads while it loads its state
    are needed within the downtime anyway, and a fault on them costs the same bytes and a
    round trip more.

    A read on the destination waits for every absent block of the range it reads, and a
    fault on mmap'ed RAM reads its whole region (2 MiB here): a region half sent still
    faults, so regions go whole or not at all.  A region's heat is its hottest absent
    block's (blkfs heat runs; a block in no run has heat 0); ties go to the lower region."""
    listed = [(f, c) for f, c in absent if c > 0]
    first = list(first)
    if not listed or (budget_blocks <= 0 and not first):
        return [], sorted(listed)
    blocks = np.sort(np.concatenate([np.arange(f, f + c, dtype=np.int64) for f, c in listed]))
    # (not np.unique: its first call in a process costs 8 ms, and this runs in the downtime)
    blocks = blocks[np.concatenate(([True], np.diff(blocks) != 0))]
    firsts, counts, heats = _heat_arrays(heat_runs)
    heat = np.zeros(len(blocks))
    if len(firsts):
        order = np.argsort(firsts, kind="stable")
        firsts, counts, heats = firsts[order], counts[order], heats[order]
        at = np.maximum(np.searchsorted(firsts, blocks, side="right") - 1, 0)  # run at/before
        inside = (firsts[at] <= blocks) & (blocks < firsts[at] + counts[at])
        heat = np.where(inside, heats[at], 0.0)
    region = blocks // max(1, region_blocks)  # sorted, as the blocks are
    start = np.flatnonzero(np.concatenate(([True], np.diff(region) != 0)))
    ids = region[start]
    size = np.diff(np.concatenate((start, [len(region)])))
    hottest = np.maximum.reduceat(heat, start)
    wanted = np.isin(ids, np.array(sorted({b // max(1, region_blocks) for b in first}),
                                   dtype=np.int64))
    taken = np.zeros(len(ids), dtype=bool)
    left = budget_blocks
    for i in np.lexsort((ids, -hottest, ~wanted)).tolist():  # first, hottest, lower region
        if wanted[i] or size[i] <= left:
            taken[i] = True
            left -= int(size[i])
        elif left <= 0:
            break
    warm = np.repeat(taken, size)
    return to_extents(blocks[warm].tolist()), to_extents(blocks[~warm].tolist())


def warm_budget_blocks(measured: float, cap_mb_s: float | None, warm_ms: float,
                       block_size: int) -> int:
    """Blocks the link moves in `warm_ms` at the rate measured so far (bytes/s), never past
    the cap: the measured rate counts bytes into the socket's buffer, and bursts past a
    cap, and the downtime is the user's."""
    rate = min(measured, cap_mb_s * 1e6) if cap_mb_s else measured
    return int(rate * warm_ms / 1000 / block_size)


def split_memory(dirty: dict[int, list[Extent]], heat: dict[int, Any], budget_blocks: int,
                 ppb: int, region_blocks: int, first: dict[int, Iterable[int]] | None = None
                 ) -> tuple[dict[int, list[Extent]], dict[int, list[Extent]]]:
    """Post-copy's split of the memory files' dirty pages (by file id): (absent blocks, warm
    pages).  Memory goes post-copy by block (a page is fetched with its block's others, all
    current), except the warm set (`warm_set`, `budget_blocks` shared by the files in turn),
    whose dirty pages go with the last set."""
    absent: dict[int, list[Extent]] = {}
    warm: dict[int, list[Extent]] = {}
    for fid, pages in dirty.items():
        if not pages:
            continue
        sent, left = warm_set(blocks_of_pages(pages, ppb), heat.get(fid, ()), budget_blocks,
                              region_blocks, (first or {}).get(fid, ()))
        budget_blocks -= sum(c for _f, c in sent)
        if left:
            absent[fid] = left
        if sent:
            warm[fid] = pages_in_blocks(pages, sent, ppb)
    return absent, warm


def blocks_of_ranges(ranges: Iterable[tuple[int, int]], block_size: int) -> set[int]:
    """The blocks that (offset, length) byte ranges touch."""
    return {b for off, n in ranges
            for b in range(off // block_size, (off + max(n, 1) - 1) // block_size + 1)}


def blocks_in(extents: Iterable[Extent], blocks: Iterable[int]) -> list[int]:
    """Those of `blocks` that lie in the (sorted) extents."""
    listed = list(extents)
    firsts = [f for f, _c in listed]
    out = []
    for b in sorted(blocks):
        i = bisect.bisect_right(firsts, b) - 1
        if i >= 0 and b < listed[i][0] + listed[i][1]:
            out.append(b)
    return out


def pages_in_blocks(pages: Iterable[Extent], blocks: Iterable[Extent], ppb: int) -> list[Extent]:
    """The page extents that lie in the given (sorted) block extents, `ppb` pages a block."""
    out: list[Extent] = []
    spans = [(f * ppb, (f + c) * ppb) for f, c in blocks]
    i = 0
    for first, count in sorted(pages):
        stop = first + count
        while i < len(spans) and spans[i][1] <= first:
            i += 1
        j = i
        while j < len(spans) and spans[j][0] < stop:
            lo, hi = max(first, spans[j][0]), min(stop, spans[j][1])
            if lo < hi:
                out.append((lo, hi - lo))
            j += 1
    return out


def _heat_arrays(heat_runs: Iterable[tuple[int, int, float]] | np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(firsts, counts, heats) of blkfs heat runs, given as tuples or as its packed array."""
    if isinstance(heat_runs, np.ndarray):
        return (heat_runs["first"].astype(np.int64), heat_runs["count"].astype(np.int64),
                heat_runs["heat"].astype(np.float64))
    listed = list(heat_runs)
    return (np.array([r[0] for r in listed], dtype=np.int64),
            np.array([r[1] for r in listed], dtype=np.int64),
            np.array([r[2] for r in listed], dtype=np.float64))


def union_extents(a: Iterable[Extent], b: Iterable[Extent]) -> list[Extent]:
    """Blocks in either set, as sorted extents (the held set plus the last swap)."""
    both = list(a) + list(b)
    bm = from_extents(both, max((f + c for f, c in both), default=0))
    return extents(bm)


def batches(extents: Iterable[Extent], max_blocks: int) -> Iterator[Extent]:
    """Split extents into runs of at most `max_blocks` (one wire frame each)."""
    if max_blocks < 1:
        raise ValueError("max_blocks must be >= 1")
    for first, count in extents:
        while count > 0:
            n = min(count, max_blocks)
            yield first, n
            first += n
            count -= n


class Verdict(enum.Enum):
    CONTINUE = "continue"
    SWITCHOVER = "switchover"
    ABORT = "abort"


class OnStall(enum.StrEnum):
    """What the rounds do once they stop converging (and slowing the VM did not help)."""

    CONVERGE = "converge"  # go on: post-copy where asked, else stop after the timeout
    SWITCHOVER = "switchover"  # switch over now, whatever the downtime (said first)
    ABORT = "abort"  # stop now; the VM runs on here


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    stalled: bool = False  # not converging: post-copy (--postcopy=auto) takes over here


@dataclass(frozen=True)
class Policy:
    """When to stop iterating. Give `threshold_blocks` or `downtime_ms` (the default)."""

    threshold_blocks: int | None = None
    downtime_ms: float = DOWNTIME_MS
    max_rounds: int = MAX_ROUNDS
    stall_rounds: int = 3
    on_stall: OnStall | Verdict = OnStall(ON_STALL)  # noqa: RUF009 (an enum member, immutable)
    # Once memory goes post-copy, only the disks' last set is in the downtime: aim lower.
    postcopy_downtime_ms: float = POSTCOPY_DOWNTIME_MS
    # Rounds past the point where the downtime would be met, while each is expected to halve
    # the set (the VM's dirty rate times the round's time): a tighter last set.
    tighten_rounds: int = 2

    def __post_init__(self) -> None:
        if self.threshold_blocks is not None and self.threshold_blocks < 0:
            raise ValueError("threshold_blocks must be >= 0")
        if self.downtime_ms <= 0:
            raise ValueError("downtime_ms must be > 0")
        if self.max_rounds < 1 or self.stall_rounds < 1:
            raise ValueError("max_rounds and stall_rounds must be >= 1")
        if self.on_stall is Verdict.CONTINUE:
            raise ValueError("on_stall must be converge, switchover or abort")
        object.__setattr__(self, "on_stall", OnStall(getattr(self.on_stall, "value",
                                                             self.on_stall)))

    @property
    def stall_verdict(self) -> Verdict:
        return {OnStall.SWITCHOVER: Verdict.SWITCHOVER, OnStall.ABORT: Verdict.ABORT}.get(
            OnStall(self.on_stall), Verdict.CONTINUE)


@dataclass(frozen=True)
class RoundStats:
    round: int
    dirty_pages: int
    bytes: int
    seconds: float
    dirty_rate_mb_s: float = 0.0  # how fast the VM dirtied what this round sent


@dataclass
class RoundPlanner:
    """Feeds on round statistics; says whether to run another round.  Dirty sets are
    counted in pages of `page_size` (by default a block: pages are blocks)."""

    policy: Policy
    block_size: int
    page_size: int = 0
    rounds: list[RoundStats] = field(default_factory=list)
    _sent: int = 0
    _busy: float = 0.0
    _tightened: int = 0

    def __post_init__(self) -> None:
        self.page_size = self.page_size or self.block_size

    def enter_postcopy(self) -> None:
        """From now on the pending sets are the disks' only: their own target, a fresh count
        of rounds (stall detection starts over), the bandwidth measured so far kept."""
        if self.policy.threshold_blocks is None:
            self.policy = replace(self.policy, downtime_ms=min(
                self.policy.downtime_ms, self.policy.postcopy_downtime_ms))
        self.rounds = []

    def record_transfer(self, nbytes: int, seconds: float) -> None:
        """Account bytes moved (initial copy included) for the bandwidth estimate."""
        self._sent += nbytes
        self._busy += max(seconds, 0.0)

    def record_round(self, stats: RoundStats) -> None:
        self.rounds.append(stats)
        self.record_transfer(stats.bytes, stats.seconds)

    @property
    def bandwidth(self) -> float:
        """Bytes per second measured so far (0 before anything was sent)."""
        return self._sent / self._busy if self._busy > 0 else 0.0

    @property
    def unit(self) -> str:
        return "blocks" if self.page_size == self.block_size else "pages"

    def expected_downtime_ms(self, pending: int) -> float:
        """The last set of `pending` pages at the bandwidth measured so far."""
        bw = self.bandwidth
        if pending == 0:
            return 0.0
        return float("inf") if bw <= 0 else pending * self.page_size / bw * 1000.0

    def next_set(self, pending: int, dirty_rate: float) -> float:
        """Pages the VM is expected to dirty while a round sends `pending` pages, at
        `dirty_rate` bytes per second."""
        bw = self.bandwidth
        if bw <= 0:
            return float("inf")
        return dirty_rate * (pending * self.page_size / bw) / self.page_size

    def decide(self, pending: int, dirty_rate: float | None = None) -> Decision:
        """Decide after a swap found `pending` dirty pages to send (the VM dirtied them at
        `dirty_rate` bytes per second, if known)."""
        p, unit = self.policy, self.unit
        if p.threshold_blocks is not None:
            if pending * self.page_size <= p.threshold_blocks * self.block_size:
                return Decision(Verdict.SWITCHOVER, f"{pending} dirty {unit} <= threshold "
                                f"{p.threshold_blocks} blocks")
        else:
            expect = self.expected_downtime_ms(pending)
            if expect <= p.downtime_ms:
                nxt = None if dirty_rate is None else self.next_set(pending, dirty_rate)
                if (nxt is not None and self._tightened < p.tighten_rounds and pending > 1
                        and nxt <= pending / 2 and len(self.rounds) < p.max_rounds):
                    self._tightened += 1
                    return Decision(Verdict.CONTINUE, f"{pending} dirty {unit} (expected "
                                    f"downtime {expect:.1f} ms): one more round, expected to "
                                    f"leave {nxt:.0f}")
                return Decision(Verdict.SWITCHOVER, f"{pending} dirty {unit}: expected "
                                f"downtime {expect:.1f} ms <= {p.downtime_ms:g} ms")
        if len(self.rounds) >= p.max_rounds:
            return Decision(p.stall_verdict, f"not converged after {len(self.rounds)} rounds "
                            f"(max {p.max_rounds}); {pending} {unit} still dirty",
                            stalled=True)
        counts = [r.dirty_pages for r in self.rounds] + [pending]
        k = p.stall_rounds
        if len(counts) > k and min(counts[-k:]) >= min(counts[:-k]):
            return Decision(p.stall_verdict, f"dirty set stopped shrinking for {k} rounds "
                            f"({pending} {unit} dirty; the VM writes faster than the "
                            "link moves data)", stalled=True)
        return Decision(Verdict.CONTINUE, f"{pending} dirty {unit}")


@dataclass
class AutoConverge:
    """When to slow the VM down, and by how much (QEMU's auto-converge): after two rounds in
    a row in which the VM dirtied more than `trigger` of what the round before moved, or
    when the rounds stop converging, the throttle goes up a step (the first to `initial`),
    at most every other round (the round right after a step was dirtied partly before it)."""

    initial: int = THROTTLE_INITIAL
    step: int = THROTTLE_STEP
    maximum: int = THROTTLE_MAX
    trigger: float = 0.5
    level: int = 0
    _high: int = 0
    _since_step: int = 2

    @property
    def at_max(self) -> bool:
        return self.maximum <= 0 or self.level >= self.maximum

    def after_round(self, dirtied: int, moved: int, stalled: bool) -> int | None:
        """After a swap found `dirtied` bytes, the round before having moved `moved`: the
        new level if the VM is to be slowed more, else None."""
        self._since_step += 1
        self._high = self._high + 1 if moved and dirtied > self.trigger * moved else 0
        if self.at_max or self._since_step < 2 or not (stalled or self._high >= 2):
            return None
        self._high, self._since_step = 0, 0
        self.level = min(self.maximum, self.initial if not self.level else
                         self.level + self.step)
        return self.level

    def reset(self) -> None:
        self.level, self._high, self._since_step = 0, 0, 2
