"""The trio shell around the protocol: frames are sent whole even when the sender is cancelled."""

from __future__ import annotations

import trio

from migrator import protocol as p
from migrator.transport import Channel

KEY = b"k" * 32


class SlowWire(trio.abc.Stream):
    """Takes 100 bytes per scheduling step, as a socket with a full buffer does."""

    def __init__(self) -> None:
        self.wire = bytearray()
        self.started = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        for i in range(0, len(data), 100):
            self.wire += data[i:i + 100]
            self.started.set()
            await trio.sleep(0.0005)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.sleep(0)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        return b""

    async def aclose(self) -> None:
        pass


async def test_cancelled_send_still_writes_the_whole_frame() -> None:
    wire = SlowWire()
    src = Channel(wire, "source", KEY, io_timeout=5)
    src.conn._state = p.State.VERIFYING  # a state where Digests may flow
    src.conn._sizes = {0: 1 << 30}
    src.conn._manifest = p.Manifest(65536, (p.FileEntry(0, "vm.mem", 1 << 30),))
    ev = p.Digests(0, 0, tuple(range(512)))
    async with trio.open_nursery() as n:
        with trio.CancelScope() as scope:

            async def cancel_once_started() -> None:
                await wire.started.wait()
                scope.cancel()

            n.start_soon(cancel_once_started)
            await src.send(ev)  # cancelled after the first 100 bytes went out
    assert bytes(wire.wire) == p.encode(ev)  # whole: the peer never reads half a frame
