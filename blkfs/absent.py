"""The absent map of a destination file in post-copy (pure).

One byte per block, 1 = absent: the block's final content is still on the
source (or in a spill slot) and the local backing file holds stale bytes or a
hole.  A read or write touching an absent block must wait until the block is
installed (invariant 4: never serve a stale or zero page).  Installing is the
only way a block becomes present; nothing makes a present block absent again.
"""

from __future__ import annotations

from collections.abc import Iterable

Extent = tuple[int, int]  # (first block, count)


class AbsentMap:
    __slots__ = ("_map", "count", "nblocks", "shift")

    def __init__(self, nblocks: int, shift: int, extents: Iterable[Extent] = ()) -> None:
        self.nblocks = nblocks
        self.shift = shift
        self._map = bytearray(nblocks)
        for first, count in extents:
            if first < 0 or count < 0 or first + count > nblocks:
                raise ValueError(f"absent extent {first}+{count} outside {nblocks} blocks")
            self._map[first:first + count] = b"\x01" * count
        self.count = self._map.count(1)

    def is_absent(self, block: int) -> bool:
        return 0 <= block < self.nblocks and self._map[block] == 1

    def absent_in(self, offset: int, length: int) -> list[int]:
        """The absent blocks that bytes [offset, offset+length) touch."""
        if not self.count or length <= 0:
            return []
        first = offset >> self.shift
        stop = min(self.nblocks, ((offset + length - 1) >> self.shift) + 1)
        m = self._map
        out = []
        i = m.find(1, first, stop)
        while i != -1:
            out.append(i)
            i = m.find(1, i + 1, stop)
        return out

    def install(self, block: int) -> bool:
        """Mark `block` present; False if it already was."""
        if not self.is_absent(block):
            return False
        self._map[block] = 0
        self.count -= 1
        return True

    def truncate(self, nblocks: int) -> None:
        """The file shrank (or grew: new blocks are holes written locally, never absent)."""
        if nblocks < self.nblocks:
            self.count -= self._map.count(1, nblocks)
            del self._map[nblocks:]
        else:
            self._map.extend(bytes(nblocks - self.nblocks))
        self.nblocks = nblocks

    def blocks(self) -> list[int]:
        return self.absent_in(0, self.nblocks << self.shift)
