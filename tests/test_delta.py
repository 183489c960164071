"""What the destination holds (pure): block digests and the runs that differ."""

from __future__ import annotations

import random

import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.delta import Holdings, _runs, file_digests
from migrator.zeros import zero_digest

BS = 4096


def digests(data: bytes) -> list[int]:
    return [xxhash.xxh3_64_intdigest(data[i:i + BS]) for i in range(0, len(data), BS)]


def test_only_the_blocks_that_differ_are_sent() -> None:
    rng = random.Random(1)
    old = rng.randbytes(10 * BS)
    new = bytearray(old)
    for b in (0, 3, 4, 9):
        new[b * BS + 7] ^= 1
    h = Holdings(10)
    h.add(0, digests(old))
    assert h.blocks == 10
    assert h.to_send(bytes(new), BS, 0) == [(0, 1), (3, 2), (9, 1)]
    assert h.to_send(bytes(new[3 * BS:6 * BS]), BS, 3) == [(3, 2)]  # a run inside the file
    assert h.to_send(old, BS, 0) == []


def test_blocks_not_said_and_blocks_past_the_copy_are_sent() -> None:
    rng = random.Random(2)
    data = rng.randbytes(8 * BS + 100)  # a short tail
    h = Holdings(6)  # the destination's copy: 6 blocks, of which it said 0..3
    h.add(0, digests(data[:4 * BS]))
    assert h.to_send(data, BS, 0) == [(4, 5)]


def test_runs_of_a_mask() -> None:
    import numpy as np

    assert _runs(np.array([True, True, False, True]), 5) == [(5, 2), (8, 1)]
    assert _runs(np.array([False, False]), 0) == []
    assert _runs(np.array([True]), 0) == [(0, 1)]


def test_file_digests_read_no_hole() -> None:
    rng = random.Random(3)
    size = 10 * BS + 10
    data = bytearray(size)
    data[2 * BS:4 * BS] = rng.randbytes(2 * BS)
    data[9 * BS:] = rng.randbytes(BS + 10)
    reads: list[tuple[int, int]] = []

    def read(off: int, n: int) -> bytes:
        reads.append((off, n))
        return bytes(data[off:off + n])

    got = file_digests(read, [(2 * BS, 4 * BS), (9 * BS, size)], size, BS)
    assert got == digests(bytes(data))
    assert got[0] == zero_digest(BS) and got[-1] == xxhash.xxh3_64_intdigest(data[10 * BS:])
    assert all(off >= 2 * BS and not 4 * BS <= off < 9 * BS for off, _ in reads)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_what_is_sent_makes_the_copy_whole(draw: st.DataObject) -> None:
    """Whatever the destination held: it, with the runs sent written over it, is the source."""
    n = draw.draw(st.integers(1, 24))
    rng = random.Random(draw.draw(st.integers(0, 10**6)))
    src = bytearray(rng.randbytes(n * BS))
    old = bytearray(src)
    for b in draw.draw(st.sets(st.integers(0, n - 1))):
        old[b * BS] ^= 0xFF
    held_n = draw.draw(st.integers(0, n))
    h = Holdings(held_n)
    h.add(0, digests(bytes(old[:held_n * BS])))
    copy = bytearray(old[:held_n * BS] + bytes((n - held_n) * BS))
    for first, count in h.to_send(bytes(src), BS, 0):
        copy[first * BS:(first + count) * BS] = src[first * BS:(first + count) * BS]
    assert copy == src


def test_file_digests_a_frame_at_a_time_are_the_whole_files() -> None:
    rng = random.Random(4)
    size = 37 * BS + 5
    data = rng.randbytes(size)
    whole = file_digests(lambda o, n: data[o:o + n], [(0, size)], size, BS)
    parts = [d for first in range(0, 38, 10)
             for d in file_digests(lambda o, n: data[o:o + n], [(0, size)], size, BS, first, 10)]
    assert parts == whole == digests(data)


def test_a_thin_image_s_holdings_cost_the_blocks_said() -> None:
    """4 TiB held: digests said at both ends, the rest as zero runs (HeldZero): two chunks
    of digests, not 9 bytes for each of 64 Mi blocks."""
    import tracemalloc

    nblocks = (4 << 40) // BS
    rng = random.Random(3)
    head, tail = rng.randbytes(3 * BS), rng.randbytes(2 * BS)
    tracemalloc.start()
    h = Holdings(nblocks)
    h.add(0, digests(head))
    h.add_zero(3, nblocks - 5)
    h.add(nblocks - 2, digests(tail))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert h.blocks == nblocks
    assert h.to_send(head, BS, 0) == [] and h.to_send(tail, BS, nblocks - 2) == []
    assert h.to_send(rng.randbytes(BS), BS, 1 << 20) == [(1 << 20, 1)]  # data in a hole there
