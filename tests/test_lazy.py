"""Lazy mode of the destination daemon, in process (trio, real files, no FUSE mount)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from blkfs.absent import AbsentMap
from blkfs.lazy import BlockMissing, LazyFile, Postcopy
from blkfs.spill import SlotAllocator, SpillArea, spill_key

BS = 4096
NBLOCKS = 8


def final(b: int) -> bytes:
    return bytes([b + 1]) * BS


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Postcopy, LazyFile, SpillArea, SlotAllocator]:
    path = tmp_path / "vm.mem"
    path.write_bytes(b"\xee" * BS * NBLOCKS)  # stale content: never to be served
    key = spill_key(b"t" * 32, "m1")
    area = SpillArea.create(str(tmp_path / "spill"), "m1", BS, 4, {0: "vm.mem"}, key)
    pc = Postcopy("m1", BS, SpillArea.open(str(tmp_path / "spill"), "m1", key))
    fd = os.open(path, os.O_RDWR)
    lf = LazyFile(0, "vm.mem", (0, 0), fd, AbsentMap(NBLOCKS, 12, [(2, 4)]), BS * NBLOCKS)
    pc.add_file(lf)
    return pc, lf, area, SlotAllocator(4)


async def wanted(pc: Postcopy) -> list[list[int]]:
    """The next non-empty list of wanted blocks (news may also be frees)."""
    while True:
        news = await pc.wait_news(1.0)
        if news.wanted:
            return [list(w) for w in news.wanted]


def content(lf: LazyFile, b: int) -> bytes:
    return os.pread(lf.fd, BS, b * BS)


async def test_read_of_absent_block_waits_for_the_fetch(setup) -> None:
    pc, lf, _area, _ = setup
    await pc.ensure(lf, 0, 2 * BS)  # present blocks: no wait
    assert pc.counts.demand_faults == 0
    done = trio.Event()

    async def reader() -> None:
        await pc.ensure(lf, 2 * BS + 100, 10)
        done.set()

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        assert await wanted(pc) == [[0, 2]] and not done.is_set()
        assert pc.install_fetched(0, 2, final(2)) == 1
        await done.wait()
    assert content(lf, 2) == final(2) and pc.counts.pages_via_demand_fetch == 1
    assert pc.install_fetched(0, 2, b"\0" * BS) == 0  # a late duplicate changes nothing
    assert content(lf, 2) == final(2)


async def test_spill_slot_served_when_generation_and_hash_match(setup) -> None:
    pc, lf, area, alloc = setup
    ref = alloc.allocate()
    assert ref is not None
    area.put(ref, 0, 3, final(3))
    pc.add_refs([(0, 3, ref.slot, ref.generation)])
    await pc.ensure(lf, 3 * BS, BS)
    assert content(lf, 3) == final(3) and pc.counts.pages_via_spill == 1
    assert pc.take_news().freed == ((ref.slot, ref.generation),)


async def test_reused_slot_is_refused_and_fetched(setup) -> None:
    pc, lf, area, alloc = setup
    old = alloc.allocate()
    assert old is not None
    area.put(old, 0, 4, final(4))
    assert alloc.release(old)  # (as if installed elsewhere) and reused for another page
    while (new := alloc.allocate()) is not None and new.slot != old.slot:
        pass
    assert new is not None
    area.put(new, 0, 5, final(5))
    pc.add_refs([(0, 4, old.slot, old.generation)])  # a late, stale ref
    async with trio.open_nursery() as n:
        n.start_soon(pc.ensure, lf, 4 * BS, BS)
        assert await wanted(pc) == [[0, 4]]
        pc.install_fetched(0, 4, final(4))
    assert content(lf, 4) == final(4)
    assert pc.counts.generation_mismatches == 1 and pc.counts.pages_via_spill == 0


async def test_corrupted_slot_is_refused(setup, tmp_path: Path) -> None:
    pc, lf, area, alloc = setup
    ref = alloc.allocate()
    assert ref is not None
    area.put(ref, 0, 2, final(2))
    fd = os.open(tmp_path / "spill" / "slots", os.O_RDWR)
    os.pwrite(fd, b"\x00", ref.slot * BS + 7)
    os.close(fd)
    pc.add_refs([(0, 2, ref.slot, ref.generation)])
    await pc.drain_queue()
    assert lf.absent.is_absent(2) and pc.counts.hash_mismatches == 1
    assert pc.take_news().wanted == ((0, 2),)
    assert content(lf, 2) == b"\xee" * BS  # nothing was installed from the bad slot


async def test_write_to_absent_block_installs_it_first(setup) -> None:
    """A partial write must land on the block's final content, never on the stale bytes."""
    pc, lf, area, alloc = setup
    ref = alloc.allocate()
    assert ref is not None
    area.put(ref, 0, 5, final(5))
    pc.add_refs([(0, 5, ref.slot, ref.generation)])
    await pc.ensure(lf, 5 * BS + 10, 3)  # what fs.write does before its pwrite
    os.pwrite(lf.fd, b"abc", 5 * BS + 10)
    want = bytearray(final(5))
    want[10:13] = b"abc"
    assert content(lf, 5) == bytes(want)
    pc.install_fetched(0, 5, final(5))  # a fetch reply that crossed: must not clobber it
    assert content(lf, 5) == bytes(want)


async def test_source_lost_completes_from_spill_headers_or_names_missing(setup) -> None:
    pc, lf, area, alloc = setup
    for b in (2, 3, 4):  # in the spill, but the destination was never told where
        ref = alloc.allocate()
        assert ref is not None
        area.put(ref, 0, b, final(b))
    area.flush()
    found, news = await pc.lose_source()
    assert found == 3 and news.missing == () and not news.done  # block 5 may still come
    for b in (2, 3, 4):
        assert content(lf, b) == final(b)
    await pc.ensure(lf, 0, 5 * BS)  # everything else is served
    async with trio.open_nursery() as n:
        n.start_soon(pc.adopt_until_settled, 0.5)
        waiting = trio.Event()

        async def reader() -> None:
            waiting.set()
            with pytest.raises(BlockMissing):  # the FUSE layer answers EIO
                await pc.ensure(lf, 5 * BS, 1)

        n.start_soon(reader)
        await waiting.wait()
        await trio.sleep(2)  # paused: the reader waits, never served stale bytes
        assert pc.paused and lf.absent.is_absent(5) and not lf.missing
        area.mark_flushed(3)  # the source says every page is in: block 5 never will be
    assert pc.missing() == [("vm.mem", 5)] and content(lf, 5) == b"\xee" * BS


async def test_a_page_that_reaches_the_spill_late_reaches_the_waiting_reader(setup) -> None:
    """The migrator went away; the source goes on spilling: the reader gets the final page."""
    pc, lf, area, alloc = setup
    assert pc.orphan("its migrator went away")
    got: list[bytes] = []
    async with trio.open_nursery() as n:
        n.start_soon(pc.adopt_until_settled, 0.1)

        async def reader() -> None:
            await pc.ensure(lf, 3 * BS, BS)
            got.append(content(lf, 3))

        n.start_soon(reader)
        await trio.sleep(1)
        assert not got  # waits, visibly
        ref = alloc.allocate()
        assert ref is not None
        area.put(ref, 0, 3, final(3))  # the source, still alive, spills it now
        for b in (2, 4, 5):
            r = alloc.allocate()
            if r is None:
                break
            area.put(r, 0, b, final(b))
        with trio.fail_after(5):
            while not got:
                await trio.sleep(0.05)
        n.cancel_scope.cancel()
    assert got == [final(3)] and pc.counts.pages_via_drain >= 1


async def test_report_counts_faults(setup) -> None:
    pc, lf, _, _ = setup
    async with trio.open_nursery() as n:
        n.start_soon(pc.ensure, lf, 2 * BS, 4 * BS)
        assert sorted(await wanted(pc)) == [[0, 2], [0, 3], [0, 4], [0, 5]]  # one request
        for b in range(2, 6):
            pc.install_fetched(0, b, final(b))
    r = pc.report()
    assert r.demand_faults == 1 and r.remaining == 0 and pc.done
    assert r.demand_fault_p99_ms >= r.demand_fault_p50_ms >= 0
    assert sorted(pc.digests())[0][:2] == (0, 2)


async def test_a_paused_postcopy_tells_a_cut_off_source_which_slots_it_may_reuse(
        setup) -> None:
    """Four slots, and nobody to carry SlotFree: the installed file in the area says which
    generations were installed, so the source can reuse exactly those slots."""
    pc, lf, area, alloc = setup
    assert pc.orphan("its migrator went away")
    refs = {}
    for b in (2, 3, 4, 5):
        ref = alloc.allocate()
        assert ref is not None
        area.put(ref, 0, b, final(b))
        refs[b] = ref
    assert area.installed() == [0, 0, 0, 0]
    async with trio.open_nursery() as n:
        n.start_soon(pc.adopt_until_settled, 0.1)
        with trio.fail_after(5):
            while pc.remaining:
                await trio.sleep(0.05)
        n.cancel_scope.cancel()
    assert await trio.to_thread.run_sync(area.installed) == [
        refs[b].generation for b in (2, 3, 4, 5)]
    assert all(content(lf, b) == final(b) for b in (2, 3, 4, 5))
