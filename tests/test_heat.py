"""Unit tests for blkfs.heat (pure; explicit `now` values, never sleeps)."""

from __future__ import annotations

import math
from collections import defaultdict
from itertools import pairwise

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from blkfs.bitmap import CHUNK_BLOCKS, to_extents
from blkfs.heat import _NEGLIGIBLE, _RESCALE_EXP, DEFAULT_STATIC_HEAT, Heat

from .heatview import (
    bump,
    coldest,
    dynamic_blocks,
    extents,
    snapshot,
    split_extents,
    value,
    written,
)

HL = 60.0  # half-life used by most tests


def approx(x: float) -> object:
    return pytest.approx(x, rel=1e-12, abs=1e-15)


# -- construction -----------------------------------------------------------------


@pytest.mark.parametrize("half_life", [0.0, -1.0, float("nan")])
def test_half_life_must_be_positive(half_life: float) -> None:
    with pytest.raises(ValueError):
        Heat(half_life)


def test_empty_heat() -> None:
    h = Heat(HL)
    assert written(h) == 0
    assert value(h, 3, 100.0) == 0.0
    assert h.split(4, DEFAULT_STATIC_HEAT, 0.0) == (4, 0)
    assert split_extents(h, 4, DEFAULT_STATIC_HEAT, 0.0) == ([(0, 4)], [])
    assert list(coldest(h, 3, 0.0)) == [(0, 0.0), (1, 0.0), (2, 0.0)]
    assert h.hottest(5, 0.0) == []
    assert extents(h, 0.0) == []
    assert snapshot(h, 0.0) == []


# -- bump / value / decay ---------------------------------------------------------------


def test_bump_counts_one_per_write() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 2, 2, 0.0)
    assert value(h, 2, 0.0) == 1.0
    bump(h, 2, 2, 0.0)
    assert value(h, 2, 0.0) == 2.0
    assert value(h, 1, 0.0) == 0.0
    assert written(h) == 1


def test_bump_range_is_inclusive() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 3, 6, 0.0)
    assert [value(h, b, 0.0) for b in range(8)] == [0, 0, 0, 1, 1, 1, 1, 0]
    assert written(h) == 4


@pytest.mark.parametrize("t0", [0.0, 1000.0, -50.0])
def test_heat_halves_every_half_life(t0: float) -> None:
    h = Heat(HL, now=t0)
    bump(h, 0, 0, t0 + 10.0)
    assert value(h, 0, t0 + 10.0) == approx(1.0)
    assert value(h, 0, t0 + 10.0 + HL) == approx(0.5)
    assert value(h, 0, t0 + 10.0 + 2 * HL) == approx(0.25)
    assert value(h, 0, t0 + 10.0 + HL / 2) == approx(2**-0.5)


def test_decayed_writes_add_up() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 0, 0, 0.0)
    bump(h, 0, 0, HL)  # first write has decayed to 0.5 by now
    assert value(h, 0, HL) == approx(1.5)
    assert value(h, 0, 2 * HL) == approx(0.75)


# -- threshold split --------------------------------------------------------------------


def test_written_once_is_static_written_twice_is_dynamic() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 1, 1, 0.0)
    bump(h, 2, 2, 0.0)
    bump(h, 2, 2, 0.0)
    assert value(h, 1, 0.0) == 1.0
    # heat exactly at the threshold is static ("at or under")
    assert h.split(4, 1.0, 0.0) == (3, 1)
    assert dynamic_blocks(h, 1.0, 0.0) == [2]
    assert split_extents(h, 4, 1.0, 0.0) == ([(0, 2), (3, 1)], [(2, 1)])
    # two writes spread over time are still hotter than 1 at the second write
    bump(h, 3, 3, 0.0)
    bump(h, 3, 3, 5 * HL)
    assert value(h, 3, 5 * HL) > 1.0
    assert 3 in dynamic_blocks(h, 1.0, 5 * HL)
    # ...and everything cools down to static eventually
    assert h.split(4, 1.0, 10 * HL) == (4, 0)


def test_written_once_static_at_exact_half_lives() -> None:
    """Writes at t0 + k*half_life: 2**k is exact, so heat is exactly 1.0 at that instant."""
    for k in range(0, 12):
        h = Heat(HL, now=0.0)
        now = k * HL
        bump(h, 0, 0, now)
        assert value(h, 0, now) == 1.0
        assert h.split(1, 1.0, now) == (1, 0)


# BUG (minor, float rounding): the static/dynamic test compares stored values
# against `threshold / 2**-e` while the write stored `2**e`; for most
# (t0, now) pairs 2**e * 2**-e != 1.0 exactly, so a block written once has heat
# 1.0000000000000002 at that instant and is classified *dynamic* at the default
# threshold 1.0 (about 1 in 8 random time pairs).
@example(t0=0.0, dt=24223.75)  # pinned failing case: heat 1.0000000000000002
@given(
    t0=st.floats(min_value=0.0, max_value=1e4, allow_nan=False),
    dt=st.floats(min_value=0.0, max_value=500 * HL, allow_nan=False),
)
def test_written_once_is_static_at_any_time(t0: float, dt: float) -> None:
    h = Heat(HL, now=t0)
    now = t0 + dt
    bump(h, 0, 0, now)
    assert value(h, 0, now) == pytest.approx(1.0, rel=1e-12)
    assert h.split(1, DEFAULT_STATIC_HEAT, now) == (1, 0)


def test_split_threshold_zero_counts_every_written_block_dynamic() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 0, 0, 0.0)
    bump(h, 5, 6, 0.0)
    assert h.split(10, 0.0, 100 * HL) == (7, 3)


def test_split_extents_partition_blocks() -> None:
    h = Heat(HL, now=0.0)
    for _ in range(3):
        bump(h, 2, 3, 0.0)
    bump(h, 7, 7, 0.0)
    bump(h, 7, 7, 0.0)
    bump(h, 9, 9, 0.0)  # once: static
    static, dynamic = split_extents(h, 10, 1.0, 0.0)
    assert dynamic == [(2, 2), (7, 1)]
    assert static == [(0, 2), (4, 3), (8, 2)]
    # dynamic_blocks is coldest first
    assert dynamic_blocks(h, 1.0, 0.0) == [7, 2, 3]
    # a higher threshold leaves only the hottest
    assert split_extents(h, 10, 2.5, 0.0) == ([(0, 2), (4, 6)], [(2, 2)])
    # blocks past nblocks are ignored by split_extents
    assert split_extents(h, 3, 1.0, 0.0) == ([(0, 2)], [(2, 1)])


# BUG (latent): split() promises "(static, dynamic) block counts among the first
# `nblocks` blocks" but counts every dynamic block in the index, including
# blocks >= nblocks, unlike split_extents() which filters them.  Not reachable
# through FileTracker today (it truncates heat on shrink), but the two disagree.
def test_split_counts_only_first_nblocks() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 5, 5, 0.0)
    bump(h, 5, 5, 0.0)
    static, dynamic = split_extents(h, 2, 1.0, 0.0)
    assert (sum(c for _, c in static), sum(c for _, c in dynamic)) == (2, 0)
    assert h.split(2, 1.0, 0.0) == (2, 0)


# BUG: after a file has not been written for more than ~1075 half-lives (about
# 18 hours at the default 60 s), Heat._scale(now) underflows to 0.0 and
# _threshold_pos divides by it: split(), dynamic_blocks() and split_extents()
# raise ZeroDivisionError (the control socket's `status` and `heat` ops call
# them).  value()/coldest()/hottest() are fine (they multiply).
def test_split_long_after_last_write() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 0, 0, 0.0)
    bump(h, 0, 0, 0.0)
    later = 1100 * HL
    assert value(h, 0, later) == 0.0
    assert h.split(2, 1.0, later) == (2, 0)
    assert split_extents(h, 2, 1.0, later) == ([(0, 2)], [])
    assert dynamic_blocks(h, 1.0, later) == []


@given(
    st.lists(st.tuples(st.integers(0, 15), st.integers(1, 4)), max_size=30),
    st.floats(min_value=0.0, max_value=6.0),
    st.floats(min_value=0.0, max_value=3 * HL),
)
def test_split_agrees_with_values(
    writes: list[tuple[int, int]], threshold: float, later: float
) -> None:
    h = Heat(HL, now=0.0)
    for i, (b, n) in enumerate(writes):
        for _ in range(n):
            bump(h, b, b, float(i))
    now = len(writes) + later
    nblocks = 16
    # keep clear of the exact boundary, where float rounding decides
    vals = {b: value(h, b, now) for b in range(nblocks)}
    if any(math.isclose(v, threshold, rel_tol=1e-9) for v in vals.values()):
        return
    expected_dyn = sorted(b for b, v in vals.items() if v > threshold)
    static, dynamic = split_extents(h, nblocks, threshold, now)
    assert dynamic == to_extents(expected_dyn)
    assert static == to_extents(b for b in range(nblocks) if b not in expected_dyn)
    assert h.split(nblocks, threshold, now) == (nblocks - len(expected_dyn), len(expected_dyn))
    assert sorted(dynamic_blocks(h, threshold, now)) == expected_dyn


# -- coldest / hottest --------------------------------------------------------------


def test_coldest_order() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 4, 4, 0.0)
    bump(h, 4, 4, 0.0)
    bump(h, 4, 4, 0.0)
    bump(h, 1, 1, 0.0)
    bump(h, 6, 6, 0.0)
    bump(h, 6, 6, 0.0)
    bump(h, 2, 2, 0.0)
    got = list(coldest(h, 8, 0.0))
    assert got == [
        (0, 0.0), (3, 0.0), (5, 0.0), (7, 0.0),  # never written, block order
        (1, 1.0), (2, 1.0),  # equal heat: block order
        (6, 2.0),
        (4, 3.0),
    ]  # fmt: skip


def test_coldest_ignores_blocks_past_nblocks() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 0, 5, 0.0)
    bump(h, 1, 1, 0.0)
    assert [b for b, _ in coldest(h, 3, 0.0)] == [0, 2, 1]
    assert list(coldest(h, 0, 0.0)) == []


@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3), st.floats(0.0, 5 * HL))),
    st.integers(0, 45),
    st.floats(0.0, 3 * HL),
)
def test_coldest_covers_every_block_once(
    writes: list[tuple[int, int, float]], nblocks: int, later: float
) -> None:
    h = Heat(HL, now=0.0)
    t = 0.0
    for b, n, dt in writes:
        t += dt
        bump(h, b, b + n, t)
    now = t + later
    got = list(coldest(h, nblocks, now))
    assert sorted(b for b, _ in got) == list(range(nblocks))
    heats = [v for _, v in got]
    for a, b in pairwise(heats):
        assert a <= b * (1 + 1e-12)
    for b, v in got:
        assert v == pytest.approx(value(h, b, now), rel=1e-12)
    # never-written blocks first, in block order
    unwritten = [b for b, v in got if v == 0.0]
    assert unwritten == sorted(unwritten)


def test_hottest() -> None:
    h = Heat(HL, now=0.0)
    for b, n in [(0, 1), (1, 4), (2, 2), (3, 3)]:
        for _ in range(n):
            bump(h, b, b, 0.0)
    assert h.hottest(2, 0.0) == [(1, 4.0), (3, 3.0)]
    assert h.hottest(10, 0.0) == [(1, 4.0), (3, 3.0), (2, 2.0), (0, 1.0)]
    assert h.hottest(0, 0.0) == []
    assert h.hottest(1, HL) == [(1, 2.0)]


def test_index_follows_later_writes() -> None:
    """Queries between writes must see blocks whose heat changed since the last query."""
    h = Heat(HL, now=0.0)
    bump(h, 0, 0, 0.0)
    bump(h, 1, 1, 0.0)
    bump(h, 1, 1, 0.0)
    assert h.hottest(1, 0.0) == [(1, 2.0)]
    bump(h, 0, 0, 0.0)
    bump(h, 0, 0, 0.0)
    assert h.hottest(1, 0.0) == [(0, 3.0)]
    assert [b for b, _ in coldest(h, 2, 0.0)] == [1, 0]


# -- truncate -------------------------------------------------------------------------------


def test_truncate_drops_blocks() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 0, 9, 0.0)
    bump(h, 8, 8, 0.0)
    assert h.hottest(1, 0.0) == [(8, 2.0)]  # index built before truncate
    h.truncate(4)
    assert written(h) == 4
    assert value(h, 8, 0.0) == 0.0
    assert value(h, 3, 0.0) == 1.0
    assert h.hottest(10, 0.0) == [(3, 1.0), (2, 1.0), (1, 1.0), (0, 1.0)]
    assert h.split(10, 0.5, 0.0) == (6, 4)
    assert extents(h, 0.0) == [(0, 4, 1.0)]
    assert [b for b, _ in coldest(h, 6, 0.0)] == [4, 5, 0, 1, 2, 3]
    h.truncate(0)
    assert written(h) == 0
    assert h.hottest(10, 0.0) == []


# -- rescale ----------------------------------------------------------------------------


def test_rescale_keeps_order_and_values() -> None:
    hl = 1.0
    h = Heat(hl, now=0.0)
    base = _RESCALE_EXP - 10  # writes close to the rescale point keep non-negligible heat
    bump(h, 0, 0, base)
    for _ in range(3):
        bump(h, 1, 1, base + 5)
    bump(h, 2, 2, base + 10)
    bump(h, 3, 3, 0.0)  # ancient: negligible by the time of the rescale
    before_order = [b for b, _ in coldest(h, 4, base + 10)]
    now = _RESCALE_EXP + 5  # past 512 half-lives: this bump rescales
    bump(h, 4, 4, now)
    assert h._t0 == now  # the rescale really happened (white-box)
    expected = {
        0: 2 ** -(now - base),
        1: 3 * 2 ** -(now - base - 5),
        2: 2 ** -(now - base - 10),
        3: 0.0,
        4: 1.0,
    }
    for b, v in expected.items():
        assert value(h, b, now) == pytest.approx(v, rel=1e-9, abs=_NEGLIGIBLE)
    assert value(h, 3, now) == 0.0
    assert [b for b, _ in coldest(h, 5, now)] == [*before_order, 4]
    assert h.hottest(1, now) == [(4, 1.0)]
    assert value(h, 1, now + hl) == pytest.approx(expected[1] / 2, rel=1e-9)


bump_seqs = st.lists(
    st.tuples(
        st.integers(0, 12),  # first block
        st.integers(0, 2),  # extra blocks
        st.one_of(  # time step: mostly small, sometimes many half-lives
            st.floats(0.0, 5.0),
            st.floats(100.0, 700.0),
        ),
    ),
    max_size=40,
)


@settings(max_examples=150)
@given(bump_seqs, st.floats(0.0, 50.0), st.sampled_from([1.0, 0.7, 3.0]))
def test_matches_naive_model(
    bumps: list[tuple[int, int, float]], later: float, half_life: float
) -> None:
    h = Heat(half_life, now=0.0)
    history: dict[int, list[float]] = defaultdict(list)
    t = 0.0
    for first, extra, dt in bumps:
        t += dt
        bump(h, first, first + extra, t)
        for b in range(first, first + extra + 1):
            history[b].append(t)
    now = t + later

    def naive(b: int) -> float:
        return math.fsum(2.0 ** (-(now - w) / half_life) for w in history[b])

    for b in range(16):
        # blocks under _NEGLIGIBLE at a rescale are dropped, hence the absolute tolerance
        assert math.isclose(value(h, b, now), naive(b), rel_tol=1e-9, abs_tol=_NEGLIGIBLE)
    # ordering by heat agrees with the model (up to rounding)
    got = list(coldest(h, 16, now))
    assert sorted(b for b, _ in got) == list(range(16))
    model = [naive(b) for b, _ in got]
    for a, c in pairwise(model):
        assert a <= c * (1 + 1e-9) + _NEGLIGIBLE


# -- extents ----------------------------------------------------------------------------


def test_extents_groups_equal_heat_runs() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 0, 3, 0.0)
    bump(h, 5, 5, 0.0)
    bump(h, 6, 6, 0.0)
    bump(h, 6, 6, 0.0)
    bump(h, 7, 8, 0.0)
    bump(h, 7, 8, 0.0)
    assert extents(h, 0.0) == [(0, 4, 1.0), (5, 1, 1.0), (6, 3, 2.0)]
    assert extents(h, HL) == [(0, 4, 0.5), (5, 1, 0.5), (6, 3, 1.0)]


def test_extents_rounding_digits() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 0, 0, 0.0)
    bump(h, 1, 1, 1.0)  # heat 1.0 vs 2**(-1/60) ~ 0.9885 at t=1
    assert extents(h, 1.0, digits=1) == [(0, 2, 1.0)]
    assert extents(h, 1.0, digits=2) == [(0, 1, 0.99), (1, 1, 1.0)]


# -- snapshot / restore -------------------------------------------------------------


def test_snapshot_restore_round_trip() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 0, 0, 0.0)
    bump(h, 3, 4, 0.0)
    bump(h, 3, 3, 10.0)
    pairs = snapshot(h, 10.0)
    assert sorted(b for b, _ in pairs) == [0, 3, 4]
    r = Heat(HL, now=5000.0)
    r.restore(pairs, now=5000.0)
    for b in range(6):
        assert value(r, b, 5000.0) == approx(value(h, b, 10.0))
        assert value(r, b, 5000.0 + HL) == approx(value(h, b, 10.0 + HL))
    assert [b for b, _ in coldest(r, 6, 5000.0)] == [b for b, _ in coldest(h, 6, 10.0)]
    assert r.hottest(1, 5000.0) == [(3, approx(value(h, 3, 10.0)))]


def test_restore_applies_elapsed_decay() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 0, 0, 0.0)
    bump(h, 0, 0, 0.0)
    bump(h, 1, 1, 0.0)
    pairs = snapshot(h, 0.0)
    assert dict(pairs) == {0: 2.0, 1: 1.0}
    r = Heat(HL, now=100.0)
    r.restore(pairs, now=100.0, elapsed=HL)
    assert value(r, 0, 100.0) == approx(1.0)
    assert value(r, 1, 100.0) == approx(0.5)
    assert value(r, 0, 100.0 + HL) == approx(0.5)
    # negative elapsed (clock went backwards) is treated as zero
    r.restore(pairs, now=0.0, elapsed=-HL)
    assert value(r, 0, 0.0) == 2.0


def test_restore_replaces_previous_state_and_drops_negligible() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 7, 7, 0.0)
    assert h.hottest(1, 0.0) == [(7, 1.0)]
    h.restore([(1, 1.0), (2, 1e-12)], now=0.0)
    assert written(h) == 1
    assert value(h, 7, 0.0) == 0.0
    assert h.hottest(5, 0.0) == [(1, 1.0)]
    # a long elapsed time decays everything away
    h.restore([(1, 1.0)], now=0.0, elapsed=100 * HL)
    assert written(h) == 0


def test_snapshot_drops_negligible_heat() -> None:
    h = Heat(HL, now=0.0)
    bump(h, 0, 0, 0.0)
    bump(h, 1, 1, 40 * HL)
    assert [b for b, _ in snapshot(h, 40 * HL)] == [1]
    assert snapshot(h, 200 * HL) == []


def test_hottest_cut_through_ties_takes_the_highest_blocks() -> None:
    h = Heat(HL, now=0.0)
    for b in range(10):
        bump(h, b, b, 0.0)
    bump(h, 3, 3, 0.0)
    assert h.hottest(3, 0.0) == [(3, 2.0), (9, 1.0), (8, 1.0)]


def test_memory_is_per_block_not_per_write() -> None:
    """A million blocks cost 8 MB of heat however often they are written."""
    h = Heat(HL, now=0.0)
    h.bump_many(range(1 << 20), 0.0)
    h.bump_many(range(0, 1 << 20, 2), 1.0)
    assert h.nbytes <= 8 * (1 << 20) * 3 // 2
    assert written(h) == 1 << 20
    assert len(extents(h, 1.0)) == 1 << 20  # alternating heats: one run per block


def test_a_thin_image_s_heat_costs_the_chunks_it_touches_not_its_size() -> None:
    """Writes at both ends of a 4 TiB image (64 Mi blocks): two chunks, exact queries; the
    chunks go when the file shrinks or the heat decays to nothing."""
    last = (4 << 40) // (64 << 10) - 1
    h = Heat(HL, now=0.0)
    h.bump_many([0, 1, last, last, last - CHUNK_BLOCKS], 0.0)
    assert h.nbytes == 3 * CHUNK_BLOCKS * 8
    assert h.hottest(2, 0.0) == [(last, 2.0), (last - CHUNK_BLOCKS, 1.0)]  # (ties: higher)
    assert h.split(last + 1, 1.0, 0.0) == (last, 1)
    assert h.dynamic_extents(last + 1, 0.5, 0.0, 10) == [(0, 2), (last - CHUNK_BLOCKS, 1),
                                                         (last, 1)]
    assert extents(h, 0.0) == [(0, 2, 1.0), (last - CHUNK_BLOCKS, 1, 1.0), (last, 1, 2.0)]
    h.truncate(last - last % CHUNK_BLOCKS)  # the last chunk goes
    assert h.nbytes == 2 * CHUNK_BLOCKS * 8 and h.hottest(1, 0.0) == [(last - CHUNK_BLOCKS, 1.0)]
    h.bump_many([5], 600 * HL)  # (long after: the rescale drops what decayed to nothing)
    assert h.nbytes == CHUNK_BLOCKS * 8 and h.hottest(3, 600 * HL) == [(5, 1.0)]


@given(st.lists(st.tuples(st.integers(0, 3 * CHUNK_BLOCKS), st.integers(0, 2 * CHUNK_BLOCKS),
                          st.floats(0, 100)), max_size=6))
def test_a_span_counts_as_a_write_of_each_of_its_blocks(
        spans: list[tuple[int, int, float]]) -> None:
    by_span, by_block = Heat(HL, now=0.0), Heat(HL, now=0.0)
    for first, n, t in sorted(spans, key=lambda x: x[2]):
        by_span.bump_span(first, first + n, t)
        by_block.bump_many(list(range(first, first + n)), t)
    assert extents(by_span, 100.0, 6) == extents(by_block, 100.0, 6)
    assert by_span.nbytes == by_block.nbytes
