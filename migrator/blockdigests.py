"""The xxh3 of a file's blocks, for the verification and the digest logs (pure).

A block of data has its digest in a dict; a run of all-zero blocks (a thin image's holes,
received as `Zero` frames or verified as `ZeroDigests`) is one interval, whatever its length.
So what a 4 TiB image holding 64 MiB costs here is its 1,024 blocks of data and a few runs,
not 64 Mi digests (which took the migrator and `migrator serve` to 2 GB for a 1 TiB image).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator

from .zeros import zero_digest


class ZeroRuns:
    """Disjoint block intervals [start, end), sorted, joined where they touch."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def blocks(self) -> int:
        """Blocks covered (not __len__: list() would take it for a length hint)."""
        return sum(e - s for s, e in zip(self.starts, self.ends, strict=True))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(first, count) of each run, in order."""
        return ((s, e - s) for s, e in zip(self.starts, self.ends, strict=True))

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        i = bisect_left(self.ends, start)  # first run that ends at or after start
        j = bisect_right(self.starts, end)  # runs before j start at or before end
        if i < j:
            start = min(start, self.starts[i])
            end = max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        if end <= start:
            return
        i = bisect_right(self.ends, start)  # first run that ends after start
        j = bisect_left(self.starts, end)  # runs before j start before end
        if i >= j:
            return
        keep_s, keep_e = [], []
        if self.starts[i] < start:
            keep_s.append(self.starts[i])
            keep_e.append(start)
        if self.ends[j - 1] > end:
            keep_s.append(end)
            keep_e.append(self.ends[j - 1])
        self.starts[i:j] = keep_s
        self.ends[i:j] = keep_e

    def __contains__(self, block: int) -> bool:
        i = bisect_right(self.starts, block) - 1
        return i >= 0 and block < self.ends[i]

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The [a, b) parts of [start, end) that no run covers."""
        out = []
        pos = start
        i = bisect_right(self.ends, start)
        while pos < end and i < len(self.starts):
            if self.starts[i] >= end:
                break
            if self.starts[i] > pos:
                out.append((pos, self.starts[i]))
            pos = max(pos, self.ends[i])
            i += 1
        if pos < end:
            out.append((pos, end))
        return out


class BlockDigests:
    """A file's block digests: `data` {block: xxh3} and `zeros` (runs of all-zero blocks)."""

    __slots__ = ("data", "zeros")

    def __init__(self, data: dict[int, int] | None = None,
                 zeros: ZeroRuns | None = None) -> None:
        self.data = data if data is not None else {}
        self.zeros = zeros if zeros is not None else ZeroRuns()

    def __len__(self) -> int:
        """Blocks with a digest."""
        return len(self.data) + self.zeros.blocks()

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, BlockDigests) and self.data == other.data
                and list(self.zeros) == list(other.zeros))

    def get(self, block: int, bs: int, size: int) -> int | None:
        """The digest of `block` of a file of `size` bytes, or None if none is known."""
        d = self.data.get(block)
        if d is None and block in self.zeros:
            return zero_digest(max(0, min(bs, size - block * bs)))
        return d

    def set(self, block: int, digest: int) -> None:
        """A block written: its digest, in place of a zero run's."""
        self.data[block] = digest
        if self.zeros.starts:
            self.zeros.remove(block, block + 1)

    def set_zero(self, first: int, count: int) -> list[int]:
        """Blocks [first, first+count) are zeros now; returns the blocks of data they were."""
        end = first + count
        if len(self.data) < count:  # (a zero run may cover a whole 16 GiB hole)
            was = [b for b in self.data if first <= b < end]
        else:
            was = [b for b in range(first, end) if b in self.data]
        for b in was:
            del self.data[b]
        self.zeros.add(first, end)
        return was

    def forget_from(self, block: int) -> None:
        """No digest for `block` and after (the file shrank, or its tail changed)."""
        for b in [b for b in self.data if b >= block]:
            del self.data[b]
        self.zeros.remove(block, 1 << 63)

    def update(self, other: BlockDigests) -> None:
        for first, count in other.zeros:
            self.set_zero(first, count)
        for b, d in other.data.items():
            self.set(b, d)
