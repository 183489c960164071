"""Spill-area slots: headers, generations and the free list (pure; groundwork for post-copy).

The spill area (DESIGN.md, flow 4) is a slot file of N slots of one block each
plus a table of slot headers.  A slot is (re)allocated from a free list, and
every allocation bumps its *generation*.  A slot whose page the destination
installed goes back on the free list **with its content intact**, so a late
reader may still use it — but only if the header still shows the generation
that reader was told, before and after it read the data, and the data's hash
matches the header.  Otherwise the read is refused and the reader falls back
(to a demand fetch from the source).

This module holds the rules; the I/O over the slot file and header table
comes with the post-copy issue.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

import xxhash

# file_id u32, block u64, generation u64, length u32, xxh3 u64, flags u32
_HEADER = struct.Struct("<IQQIQI")
HEADER_SIZE = 64  # on disk, padded: room to grow without moving slots
FLAG_FILLED = 1  # the slot holds a page (content written and hashed)


class SpillError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class SlotHeader:
    file_id: int
    block: int
    generation: int
    length: int
    digest: int
    flags: int = 0

    def pack(self) -> bytes:
        return _HEADER.pack(self.file_id, self.block, self.generation, self.length,
                            self.digest, self.flags).ljust(HEADER_SIZE, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> SlotHeader:
        if len(raw) < _HEADER.size:
            raise SpillError(f"slot header of {len(raw)} bytes, need {_HEADER.size}")
        return cls(*_HEADER.unpack_from(raw))


@dataclass(frozen=True, slots=True)
class SlotRef:
    """What a reader is told: where the page is, and which generation holds it."""

    slot: int
    generation: int


class SlotAllocator:
    """The writer's view of N slots: a FIFO free list and a generation per slot.

    FIFO, so a freed slot is reused as late as possible: a late reader of its
    old content has the longest chance to still find a matching generation.
    """

    def __init__(self, nslots: int, generations: list[int] | None = None) -> None:
        if nslots < 1:
            raise SpillError("a spill area needs at least one slot")
        self.nslots = nslots
        self.generations = list(generations) if generations else [0] * nslots
        if len(self.generations) != nslots:
            raise SpillError("one generation per slot")
        self._free: deque[int] = deque(range(nslots))
        self._is_free = bytearray(b"\x01" * nslots)
        self.reuses = 0  # allocations of a slot that had held a page before

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self) -> SlotRef | None:
        """A slot for a new page with its new generation, or None when all are in use."""
        if not self._free:
            return None
        slot = self._free.popleft()
        self._is_free[slot] = 0
        if self.generations[slot]:
            self.reuses += 1
        self.generations[slot] += 1
        return SlotRef(slot, self.generations[slot])

    def release(self, ref: SlotRef) -> bool:
        """The destination installed the page of `ref`: the slot may be reused.

        A stale release (the slot was reallocated since) is ignored: False.
        """
        if not 0 <= ref.slot < self.nslots:
            raise SpillError(f"no slot {ref.slot} in a spill area of {self.nslots}")
        if self._is_free[ref.slot] or self.generations[ref.slot] != ref.generation:
            return False
        self._is_free[ref.slot] = 1
        self._free.append(ref.slot)
        return True


def fill_header(file_id: int, block: int, ref: SlotRef, data: bytes) -> SlotHeader:
    """The header a writer stores with a page in slot `ref`."""
    return SlotHeader(file_id, block, ref.generation, len(data),
                      xxhash.xxh3_64_intdigest(data), FLAG_FILLED)


def checked_read(
    expect: SlotRef, file_id: int, block: int, before: SlotHeader, data: bytes,
    after: SlotHeader,
) -> bytes | None:
    """The page if this read of slot `expect` may be used, else None (fall back).

    `before` and `after` are the slot's header read before and after `data`.
    Used only when both show the generation the reader was told, describe the
    page it wants, and the data has the recorded length and hash (invariant 4:
    never a stale or torn page).
    """
    for h in (before, after):
        if (h.generation != expect.generation or not h.flags & FLAG_FILLED
                or h.file_id != file_id or h.block != block):
            return None
    if before != after or len(data) < before.length:
        return None
    page = data[:before.length]
    if xxhash.xxh3_64_intdigest(page) != before.digest:
        return None
    return page
