"""The source's side of post-copy in process (SourcePostcopy over a real spill area and a
scripted peer): the spill writer leaves the host's CPUs to the destination until it says the VM
runs, while every Fetch is answered at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from blkfs.spill import SpillArea, spill_key
from migrator import protocol as p
from migrator.postcopy import SPILL_START_GRACE, SourcePostcopy

BS = 4096
NBLOCKS = 16


class ScriptedPeer:
    """The channel as SourcePostcopy uses it: what it sends is kept (with the time), what it
    receives the test puts in."""

    io_timeout = 10.0

    def __init__(self) -> None:
        self.sent: list[tuple[float, p.Event]] = []
        self._tx, self._rx = trio.open_memory_channel[p.Event](100)

    async def send(self, event: p.Event) -> None:
        self.sent.append((trio.current_time(), event))

    async def receive(self) -> p.Event:
        return await self._rx.receive()

    def put(self, event: p.Event) -> None:
        self._tx.send_nowait(event)

    def first(self, kind: type) -> float | None:
        return next((t for t, ev in self.sent if isinstance(ev, kind)), None)


def page(b: int) -> bytes:
    return bytes([b + 1]) * BS


def read(_file_id: int, offset: int, length: int) -> bytes:
    return b"".join(page(b) for b in range(offset // BS, (offset + length) // BS))


def source_postcopy(tmp_path: Path, peer: ScriptedPeer) -> SourcePostcopy:
    area = SpillArea.create(str(tmp_path / "spill"), "m1", BS, 4, {0: "vm.mem"},
                            spill_key(b"k" * 32, "m1"))
    return SourcePostcopy(peer, area, BS, read, {0: NBLOCKS * BS},  # type: ignore[arg-type]
                          {0: [(0, NBLOCKS)]})


async def finish(pc: SourcePostcopy, peer: ScriptedPeer) -> None:
    """Free every slot as it is told of, until the spill is flushed; then PostcopyDone."""
    freed = 0
    while not any(isinstance(ev, p.SpillFlushed) for _t, ev in peer.sent):
        for _t, ev in list(peer.sent)[freed:]:
            freed += 1
            if isinstance(ev, p.SpillRefs):
                peer.put(p.SlotFree(tuple((s, g) for _f, _b, s, g in ev.refs)))
        await trio.sleep(0.01)
    peer.put(p.PostcopyDone(p.PostcopyFigures()))


@pytest.mark.parametrize("resumed_after", [0.05, None])
async def test_the_spill_waits_for_the_vm_to_run_and_fetches_do_not(
        tmp_path: Path, resumed_after: float | None) -> None:
    # (the real clock: the spill's writes run in threads, across which an autojump clock
    # would leap)
    peer = ScriptedPeer()
    pc = source_postcopy(tmp_path, peer)
    t0 = trio.current_time()
    async with trio.open_nursery() as n:
        done: list[p.PostcopyDone] = []

        async def run() -> None:
            done.append(await pc.run())

        n.start_soon(run)
        await trio.sleep(0.01)
        peer.put(p.Fetch(0, 5, 2))  # QEMU loading its state faults on blocks 5 and 6
        await trio.sleep(0.01)
        blocks = [ev for _t, ev in peer.sent if isinstance(ev, p.Blocks)]
        assert blocks == [p.Blocks(0, 5, page(5) + page(6))]  # answered while the VM starts
        assert pc.stats.spilled == 0 and peer.first(p.SpillRefs) is None
        if resumed_after is not None:
            await trio.sleep(resumed_after - 0.02)
            peer.put(p.Resumed(40.0))
        await finish(pc, peer)
    assert done and pc.stats.spilled == NBLOCKS
    first_ref = peer.first(p.SpillRefs)
    assert first_ref is not None
    if resumed_after is not None:  # the spill began at once when the VM ran
        assert resumed_after <= first_ref - t0 < resumed_after + 0.15
    else:  # a destination that never said so still gets every page, after the grace
        assert SPILL_START_GRACE <= first_ref - t0 < SPILL_START_GRACE + 0.15
