"""Unit tests for blkfs.bitmap (pure: sizes, extents, DirtyBitmap)."""

from __future__ import annotations

from array import array
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkfs.bitmap import (
    CHUNK_BLOCKS,
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    DirtyBitmap,
    block_extents,
    blocks_for,
    check_block_size,
    extents,
    from_extents,
    full_chunk,
    parse_size,
    to_extents,
)

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40

# -- parse_size -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("12B", 12),
        ("12b", 12),
        ("64K", 64 * K),
        ("64k", 64 * K),
        ("64KB", 64 * K),
        ("64KiB", 64 * K),
        ("64kib", 64 * K),
        ("1M", M),
        ("1MiB", M),
        ("2G", 2 * G),
        ("2gb", 2 * G),
        ("1T", T),
        ("  1M \n", M),
    ],
)
def test_parse_size_good(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "K",
        "KB",
        "iB",
        "B",
        "1.5K",
        "1,5K",
        "-1",
        "-1K",
        "1X",
        "1P",
        "abc",
        "1KK",
        "K1",
        "0x10",
        "1e3",
        "64KBB",
    ],
)
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(["", "B", "K", "M", "G", "T"]))
def test_parse_size_unit_multiplies(n: int, unit: str) -> None:
    factor = {"": 1, "B": 1, "K": K, "M": M, "G": G, "T": T}[unit]
    assert parse_size(f"{n}{unit}") == n * factor
    assert parse_size(f"{n}{unit.lower()}") == n * factor


def test_default_block_size_is_allowed() -> None:
    assert check_block_size(DEFAULT_BLOCK_SIZE) == 16


# -- check_block_size ---------------------------------------------------------------


@pytest.mark.parametrize("shift", range(12, 21))
def test_check_block_size_powers_of_two(shift: int) -> None:
    assert check_block_size(1 << shift) == shift


@pytest.mark.parametrize(
    "size",
    [
        0,
        -4096,
        1,
        2048,
        MIN_BLOCK_SIZE - 1,
        MIN_BLOCK_SIZE + 1,
        6144,
        3 * 4096,
        MAX_BLOCK_SIZE - 1,
        MAX_BLOCK_SIZE + 1,
        MAX_BLOCK_SIZE * 2,
    ],
)
def test_check_block_size_rejects(size: int) -> None:
    with pytest.raises(ValueError):
        check_block_size(size)


# -- blocks_for ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [(0, 0), (1, 1), (4095, 1), (4096, 1), (4097, 2), (8192, 2), (8193, 3)],
)
def test_blocks_for_examples(size: int, expected: int) -> None:
    assert blocks_for(size, 12) == expected


@given(st.integers(min_value=0, max_value=1 << 50), st.integers(min_value=12, max_value=20))
def test_blocks_for_is_ceiling(size: int, shift: int) -> None:
    n = blocks_for(size, shift)
    bs = 1 << shift
    assert n * bs >= size
    assert (n - 1) * bs < size or n == 0


# -- extents ------------------------------------------------------------------------


def test_extents_examples() -> None:
    assert extents(b"") == []
    assert extents(bytes(5)) == []
    assert extents(b"\x01" * 4) == [(0, 4)]
    assert extents(bytes([0, 1, 1, 0, 1, 0, 0, 1, 1])) == [(1, 2), (4, 1), (7, 2)]
    assert extents(bytearray([1, 0, 1])) == [(0, 1), (2, 1)]


def test_to_extents_examples() -> None:
    assert to_extents([]) == []
    assert to_extents([5, 3, 4, 4, 9, 0]) == [(0, 1), (3, 3), (9, 1)]
    assert to_extents(iter([2, 1, 2])) == [(1, 2)]


def test_from_extents_clips_and_rejects_negative() -> None:
    assert from_extents([(2, 3)], 4) == bytearray([0, 0, 1, 1])
    assert from_extents([(10, 3)], 4) == bytearray(4)
    assert from_extents([(0, 0)], 3) == bytearray(3)
    assert from_extents([], 0) == bytearray()
    with pytest.raises(ValueError):
        from_extents([(-1, 2)], 4)
    with pytest.raises(ValueError):
        from_extents([(1, -2)], 4)


def test_from_extents_accepts_json_lists() -> None:
    assert from_extents([[0, 1], [3, 2]], 6) == bytearray([1, 0, 0, 1, 1, 0])


def _check_canonical(exts: list[tuple[int, int]]) -> None:
    """Sorted, each non-empty, not overlapping and not adjacent."""
    for first, count in exts:
        assert first >= 0
        assert count >= 1
    for (a, n), (b, _) in pairwise(exts):
        assert a + n < b  # strictly: a gap of at least one block


block_sets = st.sets(st.integers(min_value=0, max_value=300), max_size=120)


@given(block_sets)
def test_to_extents_round_trip(blocks: set[int]) -> None:
    exts = to_extents(blocks)
    _check_canonical(exts)
    assert {b for first, count in exts for b in range(first, first + count)} == blocks
    assert sum(count for _, count in exts) == len(blocks)
    nblocks = max(blocks, default=-1) + 1
    bm = from_extents(exts, nblocks)
    assert {i for i, v in enumerate(bm) if v} == blocks
    assert extents(bm) == exts


@given(st.lists(st.integers(min_value=0, max_value=300), max_size=120))
def test_to_extents_order_and_duplicates_do_not_matter(blocks: list[int]) -> None:
    assert to_extents(blocks) == to_extents(sorted(set(blocks)))


@given(st.lists(st.sampled_from([0, 1]), max_size=300))
def test_extents_round_trip_from_bitmap(bits: list[int]) -> None:
    bm = bytearray(bits)
    exts = extents(bm)
    _check_canonical(exts)
    assert from_extents(exts, len(bm)) == bm
    assert exts == to_extents(i for i, v in enumerate(bits) if v)


@given(st.integers(0, 2**32 - 1), st.integers(130, 3000), st.floats(0.05, 0.95))
def test_extents_of_fragmented_bitmaps(seed: int, n: int, density: float) -> None:
    """Past 64 runs the rest is found vectorised: the same runs, in order."""
    import random

    rng = random.Random(seed)
    bits = [1 if rng.random() < density else 0 for _ in range(n)]
    exts = extents(bytearray(bits))
    _check_canonical(exts)
    assert exts == to_extents(i for i, v in enumerate(bits) if v)


@given(block_sets, st.integers(min_value=0, max_value=310))
def test_from_extents_clips_to_nblocks(blocks: set[int], nblocks: int) -> None:
    bm = from_extents(to_extents(blocks), nblocks)
    assert len(bm) == nblocks
    assert {i for i, v in enumerate(bm) if v} == {b for b in blocks if b < nblocks}


# -- DirtyBitmap --------------------------------------------------------------------


def test_dirty_bitmap_init() -> None:
    bm = DirtyBitmap(5)
    assert len(bm) == 5
    assert bm.count() == 0
    assert bm.extents() == []
    assert bm.epoch == 0
    full = DirtyBitmap(5, all_dirty=True, epoch=7)
    assert full.count() == 5
    assert full.extents() == [(0, 5)]
    assert full.epoch == 7
    assert DirtyBitmap(0, all_dirty=True).extents() == []


def test_mark_single_block() -> None:
    bm = DirtyBitmap(8)
    bm.mark(3, 3)
    assert bm.extents() == [(3, 1)]
    bm.mark(3, 3)
    assert bm.count() == 1
    assert len(bm) == 8


def test_mark_range_inclusive() -> None:
    bm = DirtyBitmap(10)
    bm.mark(2, 5)
    assert bm.extents() == [(2, 4)]
    bm.mark(0, 0)
    bm.mark(6, 9)
    assert bm.extents() == [(0, 1), (2, 8)]
    assert len(bm) == 10


def test_mark_grows_past_end() -> None:
    bm = DirtyBitmap(2)
    bm.mark(5, 5)
    assert len(bm) == 6
    assert bm.extents() == [(5, 1)]
    bm.mark(4, 9)
    assert len(bm) == 10
    assert bm.extents() == [(4, 6)]
    empty = DirtyBitmap(0)
    empty.mark(0, 2)
    assert len(empty) == 3
    assert empty.extents() == [(0, 3)]


@given(st.lists(st.tuples(st.integers(0, 80), st.integers(0, 20)), max_size=30))
def test_mark_matches_set_model(ranges: list[tuple[int, int]]) -> None:
    bm = DirtyBitmap(10)
    model: set[int] = set()
    length = 10
    for first, n in ranges:
        last = first + n
        bm.mark(first, last)
        model.update(range(first, last + 1))
        length = max(length, last + 1)
    assert len(bm) == length
    assert bm.extents() == to_extents(model)
    assert bm.count() == len(model)


def test_resize_shrink_and_grow() -> None:
    bm = DirtyBitmap(10, all_dirty=True)
    bm.resize(4)
    assert len(bm) == 4
    assert bm.extents() == [(0, 4)]
    bm.resize(8)
    assert len(bm) == 8
    assert bm.extents() == [(0, 4)]  # added blocks are clean
    bm.resize(8)
    assert len(bm) == 8
    bm.resize(0)
    assert len(bm) == 0
    assert bm.count() == 0


def test_swap_returns_ended_epoch_and_old_bits() -> None:
    bm = DirtyBitmap(6)
    bm.mark(1, 2)
    epoch, bits = bm.swap()
    assert epoch == 0
    assert block_extents(bits) == [(1, 2)] and len(bits) == 6
    assert bm.epoch == 1
    assert len(bm) == 6
    assert bm.count() == 0
    # the returned bitmap is detached from the new epoch
    bm.mark(4, 4)
    assert block_extents(bits) == [(1, 2)]
    epoch, bits = bm.swap()
    assert epoch == 1
    assert block_extents(bits) == [(4, 1)]
    assert bm.epoch == 2
    epoch, bits = bm.swap()
    assert epoch == 2
    assert block_extents(bits) == []


def test_swap_keeps_starting_epoch() -> None:
    bm = DirtyBitmap(3, all_dirty=True, epoch=41)
    epoch, bits = bm.swap()
    assert (epoch, block_extents(bits)) == (41, [(0, 3)])
    assert bm.epoch == 42


# -- chunks: a thin image costs its dirty set, not its size ------------------------------

CB = CHUNK_BLOCKS


@given(st.sampled_from([1, 2, 4, 8, 16]), st.booleans(), st.lists(st.tuples(
    st.sampled_from(["write", "mark", "clear", "resize", "swap"]),
    st.integers(0, 3 * CB + 5), st.integers(0, 2 * CB + 3)), max_size=25))
def test_chunked_masks_match_a_model_across_chunk_edges(
        ppb: int, all_dirty: bool, ops: list[tuple[str, int, int]]) -> None:
    """Every change at and across chunk edges (whole chunks, the shared full one, the last
    partial one) against a dict of page masks."""
    n = 2 * CB + 7
    bm = DirtyBitmap(n, all_dirty=all_dirty, ppb=ppb)
    full = (1 << ppb) - 1
    model = dict.fromkeys(range(n), full) if all_dirty else {}
    for op, a, b in ops:
        if op == "write":  # pages [a, a + b + 1) of a page-addressed file
            bm.mark_bytes(a, a + b + 1, ppb.bit_length() - 1, 0)
            for page in range(a, a + b + 1):
                model[page // ppb] = model.get(page // ppb, 0) | 1 << (page % ppb)
            n = max(n, (a + b) // ppb + 1)
        elif op == "mark":
            bm.mark(a, a + b)
            model.update(dict.fromkeys(range(a, a + b + 1), full))
            n = max(n, a + b + 1)
        elif op == "clear":
            bm.clear(a, a + b)
            for blk in range(a, a + b):
                model.pop(blk, None)
        elif op == "resize":
            bm.resize(a)
            model = {k: v for k, v in model.items() if k < a}
            n = a
        else:
            _, old = bm.swap()
            assert block_extents(old) == to_extents(k for k, v in model.items() if v)
            model = {}
        assert len(bm) == n
    want = {k: v for k, v in model.items() if v}
    assert bm.extents() == to_extents(want)
    assert bm.count() == len(want)
    assert bm.page_extents() == to_extents(
        k * ppb + i for k, v in want.items() for i in range(ppb) if v >> i & 1)
    assert full_chunk(ppb) == array(full_chunk(ppb).typecode, [full]) * CB  # never changed


def test_a_4_tib_image_seen_fresh_costs_kilobytes_not_its_size() -> None:
    """All dirty at 64 KiB blocks: 64 Mi blocks, one shared chunk; a write at each end and
    a swap of it cost a chunk each."""
    import tracemalloc

    nblocks = (4 * T) // (64 * K)
    tracemalloc.start()
    bm = DirtyBitmap(nblocks, all_dirty=True, ppb=16)
    assert bm.extents() == [(0, nblocks)] and bm.count() == nblocks
    bm.swap()
    bm.mark_bytes(4096, 8192, 16, 12)
    bm.mark_bytes(4 * T - 4096, 4 * T, 16, 12)
    assert bm.page_extents() == [(1, 1), (nblocks * 16 - 1, 1)]
    bm.resize(nblocks - 1)
    assert bm.extents() == [(0, 1)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2 * M, peak  # (the dense masks were 128 MiB)
