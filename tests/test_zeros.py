"""Zero blocks and holes (pure)."""

from __future__ import annotations

from itertools import pairwise

import xxhash
from hypothesis import given
from hypothesis import strategies as st

from migrator.zeros import hole_runs, zero_digest, zero_runs

BS = 16


def expand(runs: list[tuple[int, int, bool]]) -> list[tuple[int, bool]]:
    return [(b, z) for first, n, z in runs for b in range(first, first + n)]


@given(st.lists(st.booleans(), max_size=40), st.integers(1, BS))
def test_zero_runs_say_which_blocks_are_zero(zero: list[bool], tail: int) -> None:
    data = b"".join(bytes(BS) if z else b"\1" * BS for z in zero)
    if zero:  # a short last block
        data = data[: len(data) - BS + tail]
    runs = zero_runs(data, BS, first=7)
    assert expand(runs) == [(7 + i, z) for i, z in enumerate(zero)]
    assert all(a[2] != b[2] for a, b in pairwise(runs))  # merged


def test_zero_digest_is_the_digest_of_zeros() -> None:
    assert zero_digest(4096) == xxhash.xxh3_64_intdigest(bytes(4096))
    assert zero_digest(100) == xxhash.xxh3_64_intdigest(bytes(100))


@given(st.lists(st.tuples(st.integers(0, 400), st.integers(1, 60)), max_size=6),
       st.integers(0, 30), st.integers(0, 30), st.integers(1, 400))
def test_hole_runs_match_a_byte_by_byte_view(ranges: list[tuple[int, int]], first: int,
                                            count: int, size: int) -> None:
    # disjoint, sorted data ranges
    data, pos = [], 0
    for gap, length in ranges:
        start = pos + gap
        data.append((start, start + length))
        pos = start + length
    nblocks = -(-size // BS)
    first = min(first, nblocks)
    count = min(count, nblocks - first)
    has = [False] * (nblocks + 1)
    for start, stop in data:
        for byte in range(start, min(stop, size)):
            has[byte // BS] = True
    runs = hole_runs(data, first, count, BS, size)
    assert expand(runs) == [(b, not has[b]) for b in range(first, first + count)]
