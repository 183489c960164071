"""The absent map of a post-copy destination file (pure): which blocks still wait for the source."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.absent import AbsentMap
from blkfs.bitmap import to_extents

K4, K64 = 12, 16



def extents_of(m: AbsentMap) -> list[tuple[int, int]]:
    return to_extents(m.blocks())

def test_construction_from_extents() -> None:
    m = AbsentMap(10, K4, [(0, 2), (5, 3), (6, 1), (9, 1), (4, 0)])  # overlaps count once
    assert (m.nblocks, m.shift, m.count) == (10, K4, 6)
    assert m.blocks() == [0, 1, 5, 6, 7, 9]
    assert extents_of(m) == [(0, 2), (5, 3), (9, 1)]
    assert [m.is_absent(b) for b in range(10)] == [b in {0, 1, 5, 6, 7, 9} for b in range(10)]
    assert not m.is_absent(-1) and not m.is_absent(10) and not m.is_absent(1 << 40)


def test_no_extents_means_all_present() -> None:
    m = AbsentMap(8, K4)
    assert m.count == 0 and m.blocks() == [] and extents_of(m) == []
    assert m.absent_in(0, 8 << K4) == []
    empty = AbsentMap(0, K4, [(0, 0)])
    assert empty.count == 0 and empty.blocks() == [] and extents_of(empty) == []


def test_whole_file_absent() -> None:
    m = AbsentMap(5, K64, [(0, 5)])
    assert m.count == 5 and extents_of(m) == [(0, 5)]


@pytest.mark.parametrize("extent", [(-1, 1), (0, -1), (8, 3), (10, 1), (11, 0), (0, 11)])
def test_extent_outside_the_file_is_refused(extent: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="outside 10 blocks"):
        AbsentMap(10, K4, [extent])


def test_extent_ending_at_the_last_block_is_accepted() -> None:
    m = AbsentMap(10, K4, [(7, 3), (10, 0)])
    assert m.blocks() == [7, 8, 9]


@pytest.mark.parametrize("shift", [K4, K64])
def test_absent_in_crosses_block_boundaries(shift: int) -> None:
    bs = 1 << shift
    m = AbsentMap(8, shift, [(1, 1), (3, 2), (7, 1)])  # absent: 1, 3, 4, 7
    assert m.absent_in(0, bs) == []  # exactly block 0
    assert m.absent_in(0, bs + 1) == [1]  # one byte into block 1
    assert m.absent_in(bs - 1, 1) == []  # last byte of block 0
    assert m.absent_in(bs - 1, 2) == [1]  # straddles 0|1
    assert m.absent_in(2 * bs - 1, 1) == [1]  # last byte of block 1
    assert m.absent_in(2 * bs, bs) == []  # exactly block 2
    assert m.absent_in(2 * bs + 5, bs) == [3]  # inside 2, into 3
    assert m.absent_in(3 * bs + bs // 2, bs) == [3, 4]  # half of 3, half of 4
    assert m.absent_in(bs, 4 * bs) == [1, 3, 4]  # blocks 1..4
    assert m.absent_in(0, 8 * bs) == [1, 3, 4, 7]
    assert m.absent_in(7 * bs + bs - 1, 1) == [7]  # last byte of the file


@pytest.mark.parametrize("shift", [K4, K64])
def test_absent_in_past_the_end_is_clamped(shift: int) -> None:
    bs = 1 << shift
    m = AbsentMap(4, shift, [(3, 1)])
    assert m.absent_in(3 * bs, 100 * bs) == [3]  # a read running past EOF
    assert m.absent_in(4 * bs, bs) == []  # entirely past the end
    assert m.absent_in(1000 * bs, 1) == []
    assert m.absent_in(0, 1 << 62) == [3]


@pytest.mark.parametrize("shift", [K4, K64])
def test_absent_in_of_nothing_is_nothing(shift: int) -> None:
    m = AbsentMap(4, shift, [(0, 4)])
    for off in (0, 1, (1 << shift) - 1, 2 << shift, 100 << shift):
        assert m.absent_in(off, 0) == []
    assert m.absent_in(0, -1) == []


def test_install_returns_true_once() -> None:
    m = AbsentMap(6, K4, [(1, 3)])
    assert m.install(2) is True
    assert m.count == 2 and not m.is_absent(2)
    assert m.install(2) is False  # already present
    assert m.count == 2
    assert m.install(0) is False  # never was absent
    assert m.install(6) is False and m.install(-1) is False and m.install(1 << 40) is False
    assert m.count == 2
    assert m.absent_in(0, 6 << K4) == [1, 3] and extents_of(m) == [(1, 1), (3, 1)]
    assert m.install(1) and m.install(3)
    assert m.count == 0 and m.blocks() == [] and extents_of(m) == []
    assert m.absent_in(0, 6 << K4) == []


def test_truncate_shrink_drops_absent_blocks_past_the_end() -> None:
    m = AbsentMap(10, K4, [(2, 2), (6, 4)])  # 2, 3, 6, 7, 8, 9
    m.truncate(7)
    assert (m.nblocks, m.count) == (7, 3)
    assert m.blocks() == [2, 3, 6]
    assert not m.is_absent(7) and not m.install(8)
    m.truncate(3)
    assert (m.nblocks, m.count, m.blocks()) == (3, 1, [2])
    m.truncate(0)
    assert (m.nblocks, m.count, m.blocks(), extents_of(m)) == (0, 0, [], [])


def test_truncate_grow_adds_present_blocks() -> None:
    m = AbsentMap(4, K64, [(2, 2)])
    m.truncate(9)
    assert (m.nblocks, m.count) == (9, 2)
    assert m.blocks() == [2, 3]
    assert m.absent_in(4 << K64, 5 << K64) == []  # the new blocks are never absent
    assert not m.install(8)
    m.truncate(3)  # shrink again: block 3 gone
    m.truncate(5)  # and grow: block 3 comes back present
    assert m.blocks() == [2] and m.count == 1


def test_truncate_to_the_same_size_changes_nothing() -> None:
    m = AbsentMap(5, K4, [(0, 5)])
    m.truncate(5)
    assert (m.nblocks, m.count, extents_of(m)) == (5, 5, [(0, 5)])


def test_extents_round_trip() -> None:
    ext = [(0, 1), (2, 3), (6, 1), (8, 2)]
    m = AbsentMap(10, K4, ext)
    assert extents_of(m) == ext
    assert AbsentMap(10, K4, extents_of(m)).blocks() == m.blocks()


# -- against a model set -----------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("install"), st.integers(-2, 70)),
        st.tuples(st.just("truncate"), st.integers(0, 70)),
        st.tuples(st.just("query"), st.tuples(st.integers(0, 80 << 12), st.integers(0, 9 << 12))),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(
    nblocks=st.integers(0, 64),
    shift=st.sampled_from([K4, 13, K64]),
    extents=st.lists(st.tuples(st.integers(0, 64), st.integers(0, 64)), max_size=6),
    steps=ops,
)
def test_absent_map_matches_a_set(nblocks: int, shift: int,
                                  extents: list[tuple[int, int]],
                                  steps: list[tuple[str, object]]) -> None:
    extents = [(f, c) for f, c in extents if f + c <= nblocks]
    m = AbsentMap(nblocks, shift, extents)
    model = {b for f, c in extents for b in range(f, f + c)}
    n = nblocks

    def check() -> None:
        assert m.nblocks == n
        assert m.count == len(model)
        assert m.blocks() == sorted(model)
        assert [b for f, c in extents_of(m) for b in range(f, f + c)] == sorted(model)
        for (f1, c1), (f2, _) in zip(extents_of(m), extents_of(m)[1:], strict=False):
            assert c1 > 0 and f1 + c1 < f2  # maximal runs, sorted, not touching
        for b in range(-1, n + 2):
            assert m.is_absent(b) == (b in model)

    check()
    for op, arg in steps:
        if op == "install":
            assert isinstance(arg, int)
            assert m.install(arg) == (arg in model)
            model.discard(arg)
        elif op == "truncate":
            assert isinstance(arg, int)
            model = {b for b in model if b < arg}
            n = arg
            m.truncate(arg)
        else:
            assert isinstance(arg, tuple)
            off, length = arg
            want = sorted(b for b in model
                          if length > 0 and off >> shift <= b <= (off + length - 1) >> shift)
            assert m.absent_in(off, length) == want
        check()
