"""Spill-slot rules (pure): generations, the free list, and which reads may be used."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkfs.spill import (
    HEADER_SIZE,
    Refused,
    SlotAllocator,
    SlotHeader,
    SlotRef,
    SpillError,
    checked_read,
    fill_header,
    slot_mac,
    spill_key,
)

KEY = spill_key(b"k" * 32, "m1")


def test_header_round_trip() -> None:
    h = SlotHeader(3, 2**40, 7, 65536, 2**63 + 5, 1, b"M" * 16)
    raw = h.pack()
    assert len(raw) == HEADER_SIZE
    assert SlotHeader.unpack(raw) == h
    with pytest.raises(SpillError):
        SlotHeader.unpack(b"\0" * 10)


def test_allocation_bumps_generation_and_freed_slots_are_reused() -> None:
    a = SlotAllocator(2)
    r1, r2 = a.allocate(), a.allocate()
    assert r1 == SlotRef(0, 1) and r2 == SlotRef(1, 1)
    assert a.allocate() is None  # bounded: the writer must wait for a release
    assert a.release(r1)
    assert not a.release(r1)  # twice: ignored
    r3 = a.allocate()
    assert r3 == SlotRef(0, 2) and a.reuses == 1
    assert not a.release(r1)  # stale: the slot was reallocated since


def test_free_list_is_fifo() -> None:
    a = SlotAllocator(3)
    refs = [a.allocate() for _ in range(3)]
    for r in (refs[2], refs[0]):
        assert r is not None and a.release(r)
    assert a.allocate().slot == 2  # type: ignore[union-attr]
    assert a.allocate().slot == 0  # type: ignore[union-attr]


def test_a_freed_slot_keeps_serving_a_late_reader_until_reused() -> None:
    a = SlotAllocator(1)
    ref = a.allocate()
    assert ref is not None
    page = b"P" * 4096
    h = fill_header(5, 9, ref, page, KEY)
    assert a.release(ref)  # installed; content still there
    assert checked_read(ref, 5, 9, h, page, h, KEY) == page
    new = a.allocate()
    assert new is not None
    h2 = fill_header(6, 1, new, b"Q" * 4096, KEY)
    assert checked_read(ref, 5, 9, h2, b"Q" * 4096, h2, KEY) is Refused.STALE  # moved on


@pytest.mark.parametrize(("case", "why"), [
    ("gen-before", Refused.STALE), ("gen-after", Refused.STALE), ("torn", Refused.TORN),
    ("hash", Refused.TORN), ("other-block", Refused.STALE), ("other-file", Refused.STALE),
    ("empty", Refused.STALE), ("short", Refused.TORN), ("forged", Refused.FORGED),
    ("other-key", Refused.FORGED), ("mac-changed", Refused.TORN)])
def test_reads_that_must_be_refused(case: str, why: Refused) -> None:
    ref = SlotRef(0, 4)
    page = bytes(range(256)) * 16
    good = fill_header(1, 2, ref, page, KEY)
    before, data, after = good, page, good
    if case == "gen-before":
        before = SlotHeader(1, 2, 5, good.length, good.digest, 1)
    elif case == "gen-after":  # reallocated while we read
        after = SlotHeader(1, 2, 5, good.length, good.digest, 1)
    elif case == "torn":  # rewritten under us with the same generation: headers differ
        after = SlotHeader(1, 2, 4, good.length, good.digest ^ 1, 1)
    elif case == "hash":  # corrupted on disk
        data = b"X" + page[1:]
    elif case == "other-block":
        before = after = SlotHeader(1, 3, 4, good.length, good.digest, 1)
    elif case == "other-file":
        before = after = SlotHeader(9, 2, 4, good.length, good.digest, 1)
    elif case == "empty":
        before = after = SlotHeader(1, 2, 4, good.length, good.digest, 0)
    elif case == "short":
        data = page[:100]
    elif case == "forged":  # data and a matching xxh3, written without the key
        data = b"F" * len(page)
        before = after = fill_header(1, 2, ref, data, b"\0" * 32)
    elif case == "other-key":  # another migration's (or another key file's) slot
        before = after = fill_header(1, 2, ref, page, spill_key(b"k" * 32, "m2"))
    elif case == "mac-changed":  # rewritten under us: same generation, other page
        other = fill_header(1, 2, ref, b"Z" * len(page), KEY)
        after = SlotHeader(1, 2, 4, good.length, good.digest, 1, other.mac)
    assert checked_read(ref, 1, 2, before, data, after, KEY) is why
    assert checked_read(ref, 1, 2, good, page, good, KEY) == page
    assert slot_mac(KEY, 1, 2, 4, page) == good.mac


@given(st.lists(st.sampled_from(["alloc", "release-old", "release-new"]), max_size=200),
       st.integers(1, 5))
def test_generations_only_grow_and_live_refs_are_unique(ops: list[str], n: int) -> None:
    a = SlotAllocator(n)
    live: list[SlotRef] = []
    dead: list[SlotRef] = []
    for op in ops:
        if op == "alloc":
            r = a.allocate()
            if r is None:
                assert len(live) == n
            else:
                assert all(x.slot != r.slot for x in live)
                assert all(r.generation > d.generation for d in dead if d.slot == r.slot)
                live.append(r)
        elif live:
            r = live.pop(0 if op == "release-old" else -1)
            assert a.release(r)
            dead.append(r)
            assert not a.release(r)
        assert a.free == n - len(live)
