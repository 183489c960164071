"""The source's verification frames (migrator/verifying.py): every block once, in order, a
frame at most 8,192 digests, long runs of holes as one ZeroDigests, holes never read."""

from __future__ import annotations

import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator import protocol as p
from migrator.blockdigests import BlockDigests
from migrator.options import SourceFile
from migrator.verifying import DIGESTS_PER_FRAME, ZERO_RUN_MIN, verification_digests
from migrator.zeros import zero_digest

BS = 4096


class Sparse:
    """A file of `size` bytes with data (b"\\x01"...) only in `ranges`; reads of holes fail."""

    def __init__(self, size: int, ranges: list[tuple[int, int]]) -> None:
        self.size, self.ranges, self.asked = size, ranges, 0

    def data_ranges(self, file_id: int, start: int, end: int) -> list[tuple[int, int]]:
        self.asked += 1
        return [(max(a, start), min(b, end)) for a, b in self.ranges if a < end and b > start]

    def read_into(self, file_id: int, offset: int, buf: memoryview) -> int:
        n = min(len(buf), self.size - offset)
        assert any(a < offset + n and b > offset for a, b in self.ranges), "a hole was read"
        for i in range(n):
            pos = offset + i
            buf[i] = 1 if any(a <= pos < b for a, b in self.ranges) else 0
        return n


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12_000), st.integers(1, 3)), max_size=6),
       st.integers(1, 12_300))
def test_every_block_once_in_order_with_long_holes_as_runs(
        spans: list[tuple[int, int]], nblocks: int) -> None:
    size = nblocks * BS - 100  # (a short last block)
    ranges = sorted({(b * BS, min((b + n) * BS, size)) for b, n in spans if b * BS < size})
    store = Sparse(size, ranges)
    keep = BlockDigests()
    frames = list(verification_digests(store, SourceFile(0, "f", size), BS, keep))  # type: ignore[arg-type]
    assert store.asked == 1  # the data ranges once, not a frame at a time
    pos = 0
    for fr in frames:
        assert fr.first_block == pos
        if isinstance(fr, p.ZeroDigests):
            assert fr.count >= ZERO_RUN_MIN
            pos += fr.count
            continue
        assert 1 <= len(fr.digests) <= DIGESTS_PER_FRAME
        for b, d in enumerate(fr.digests, pos):
            length = min(BS, size - b * BS)
            data = bytes(1 if any(a <= b * BS + i < e for a, e in ranges) else 0
                         for i in range(length)) if any(
                a < b * BS + length and e > b * BS for a, e in ranges) else bytes(length)
            assert d == (xxhash.xxh3_64_intdigest(data) if any(data) else
                         zero_digest(length)), b
        pos += len(fr.digests)
    assert pos == -(-size // BS)
    assert len(keep) == pos
