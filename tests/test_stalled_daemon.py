"""A blkfs daemon that stalls stalls only the call that waits for it (the engine is async).

The control server here accepts and never answers, then hangs up after HANG_UP s: with the
blocking ControlClient back in the engine, the loop would stand still until then, and every
check below would see it late."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import blkfs.control
from blkfs.control import AsyncControlClient
from migrator.stores import BlkfsSource, MountDest
from migrator.transport import MigrationError

HANG_UP = 3.0  # s: the stalled server closes its connections then (no test waits 60 s)
LATE = 1.0  # s: a wake-up, or a timeout of 0.3 s, this late means the loop was blocked


@pytest.fixture
def stalled(tmp_path: Path) -> Iterator[str]:
    """A control socket whose daemon takes every request and answers none."""
    path = str(tmp_path / "control")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(16)
    ls.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        held: list[tuple[float, socket.socket]] = []
        while not stop.is_set():
            try:
                held.append((time.monotonic(), ls.accept()[0]))
            except TimeoutError:
                pass
            for t, c in [h for h in held if time.monotonic() - h[0] > HANG_UP]:
                c.close()
                held.remove((t, c))
        for _, c in held:
            c.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    yield path
    stop.set()
    th.join(5)
    ls.close()


async def _ticks_on_time(late: list[float]) -> None:
    """Sleeps of 0.1 s, each one's lateness noted: the loop runs, or it does not."""
    while True:
        t = time.monotonic()
        await trio.sleep(0.1)
        late.append(time.monotonic() - t - 0.1)


async def test_a_timeout_around_a_swap_fires_on_time_while_the_daemon_stalls(
        stalled: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source opens its files (Info, Dirty) and swaps through the daemon: a trio timeout
    around either fires on time, and the loop's other tasks run meanwhile."""
    monkeypatch.setattr(blkfs.control, "find_socket", lambda mount: stalled)
    late: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_ticks_on_time, late)
        t = time.monotonic()
        with trio.move_on_after(0.3) as scope:
            await BlkfsSource.open("/mnt/vm", ["disk.raw"])
        assert scope.cancelled_caught and time.monotonic() - t < LATE

        src = BlkfsSource("/mnt/vm", await AsyncControlClient.connect(stalled))
        src.names = ["disk.raw"]
        t = time.monotonic()
        with trio.move_on_after(0.3) as scope:
            await src.swap(0)
        assert scope.cancelled_caught and time.monotonic() - t < LATE
        src.close()
        nursery.cancel_scope.cancel()
    assert late and max(late) < LATE, late


async def test_the_destination_waits_for_a_stalled_daemon_without_stopping_the_loop(
        stalled: str) -> None:
    """Telling the daemon of written ranges is not cut by cancellation (its tracking must
    learn them), but it waits in trio: other tasks run, and its own timeout ends it."""
    dest = MountDest(os.path.dirname(stalled))
    dest.client = await AsyncControlClient.connect(stalled, timeout=1.0)
    dest.names[0] = "disk.raw"
    dest.pending[0] = [[0, 4096]]
    dest.npending = 1
    late: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_ticks_on_time, late)
        t = time.monotonic()
        with pytest.raises(MigrationError, match="did not answer written within 1 s"):
            await dest.settle()
        assert 0.9 < time.monotonic() - t < 1 + LATE
        nursery.cancel_scope.cancel()
    assert len(late) >= 5 and max(late) < LATE, late
    dest.client.close()
