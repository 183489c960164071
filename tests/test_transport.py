"""The trio shell around the protocol: frames are sent whole even when the sender is cancelled."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from migrator import protocol as p
from migrator.transport import Channel, MigrationError, read_key, write_key

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
    src.conn._cs.state = p.State.VERIFYING  # a state where Digests may flow
    src.conn._cs.sizes = {0: 1 << 30}
    src.conn._cs.manifest = p.Manifest(65536, (p.FileEntry(0, "vm.mem", 1 << 30),))
    ev = p.Digests(0, 0, tuple(range(512)))
    async with trio.open_nursery() as n:
        with trio.CancelScope() as scope:

            async def cancel_once_started() -> None:
                await wire.started.wait()
                scope.cancel()

            n.start_soon(cancel_once_started)
            await src.send(ev)  # cancelled after the first 100 bytes went out
    assert bytes(wire.wire) == p.encode(ev)  # whole: the peer never reads half a frame


def _postcopy_conn(ch: Channel) -> None:
    c = ch.conn
    c._cs.state = p.State.POSTCOPY  # both sides may speak: refs one way, fetches the other
    c._cs.sizes = {0: 1 << 30}
    c._cs.manifest = p.Manifest(65536, (p.FileEntry(0, "vm.mem", 1 << 30),))
    c._cs.postcopy = p.Postcopy("m", "/spill", 8)


async def test_a_frame_that_arrives_while_sending_reaches_the_waiting_receiver() -> None:
    """The spill writer sends while the receive loop waits for a Fetch: the check for an early
    Abort before each send must not swallow the Fetch (that deadlocked a post-copy)."""
    import socket

    mine, peer = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(mine))
    ch = Channel(stream, "source", KEY, io_timeout=5, sealed=False)  # frames made by hand
    _postcopy_conn(ch)
    fetch = p.Fetch(0, 7, 1)
    got: list[object] = []

    async def receiver() -> None:
        got.append(await ch.receive())

    with trio.fail_after(3):
        async with trio.open_nursery() as n:
            n.start_soon(receiver)
            await trio.sleep(0.05)  # the receiver now waits on the socket
            peer.sendall(p.encode(fetch))  # arrives ...
            await ch.send(p.SpillRefs(((0, 1, 0, 1),)))  # ... just before this send
    assert got == [fetch]
    peer.close()
    await stream.aclose()


def test_keygen_writes_a_key_only_its_owner_reads_and_never_overwrites_by_accident(
        tmp_path: Path) -> None:
    path = str(tmp_path / "migrator.key")
    write_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = read_key(path)
    assert len(key) == 64 and int(key, 16) >= 0
    with pytest.raises(MigrationError, match="exists: keep it, or replace it with --force"):
        write_key(path)
    assert read_key(path) == key
    os.chmod(path, 0o644)
    with pytest.raises(MigrationError, match="readable by other users"):
        read_key(path)
    write_key(path, force=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and read_key(path) != key
    with pytest.raises(MigrationError, match="migrator keygen"):
        read_key(str(tmp_path / "missing.key"))
    for text in ("correct horse battery staple", "ab" * 15, ""):  # a password, too short
        other = tmp_path / "other.key"
        other.write_text(text)
        other.chmod(0o600)
        with pytest.raises(MigrationError, match="does not hold a key made by 'migrator keygen'"):
            read_key(str(other))


async def test_an_abort_that_came_while_busy_sending_is_heard_by_the_next_send() -> None:
    """A source busy copying reads nothing: the destination's Abort (disk full) must reach it
    with its reason, on any trio stream (here in memory), before a reset could lose it."""
    import trio.testing

    from migrator.transport import PeerAborted

    mine, peer = trio.testing.memory_stream_pair()
    ch = Channel(mine, "source", KEY, io_timeout=5)
    _postcopy_conn(ch)
    await peer.send_all(p.encode(p.Abort.about("destination disk full")))
    with trio.fail_after(3), pytest.raises(PeerAborted, match="destination disk full"):
        await ch.send(p.SpillRefs(((0, 1, 0, 1),)))


async def test_a_frame_heard_while_sending_waits_for_the_next_receive() -> None:
    """What a send heard that is not an Abort is the next receive()'s, in order."""
    import trio.testing

    mine, peer = trio.testing.memory_stream_pair()
    ch = Channel(mine, "source", KEY, io_timeout=5)
    _postcopy_conn(ch)
    fetches = [p.Fetch(0, 7, 1), p.Fetch(0, 9, 2)]
    await peer.send_all(b"".join(p.encode(f) for f in fetches))
    with trio.fail_after(3):
        await ch.send(p.SpillRefs(((0, 1, 0, 1),)))
        assert [await ch.receive(), await ch.receive()] == fetches


async def test_an_abort_during_a_long_send_is_heard_when_it_ends() -> None:
    """The send listens while its frame goes out (a slow peer, a full socket buffer)."""
    from migrator.transport import PeerAborted

    class SlowTalkingWire(SlowWire):
        def __init__(self) -> None:
            super().__init__()
            self.incoming = bytearray()
            self.arrived = trio.Event()

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            await self.arrived.wait()
            data, self.incoming = bytes(self.incoming), bytearray()
            self.arrived = trio.Event()
            return data

    wire = SlowTalkingWire()
    ch = Channel(wire, "source", KEY, io_timeout=5)
    ch.conn._cs.state = p.State.VERIFYING
    ch.conn._cs.sizes = {0: 1 << 30}
    ch.conn._cs.manifest = p.Manifest(65536, (p.FileEntry(0, "vm.mem", 1 << 30),))

    async def abort_midway() -> None:
        await wire.started.wait()
        wire.incoming += p.encode(p.Abort.about("its QEMU failed"))
        wire.arrived.set()

    with trio.fail_after(3):
        async with trio.open_nursery() as n:
            n.start_soon(abort_midway)
            with pytest.raises(PeerAborted, match="its QEMU failed"):
                await ch.send(p.Digests(0, 0, tuple(range(512))))
    assert bytes(wire.wire) == p.encode(p.Digests(0, 0, tuple(range(512))))  # whole


async def test_a_bad_first_frame_sent_with_the_auth_fails_after_the_handshake() -> None:
    """A quick peer's frames can all be waiting before the destination's first send: its
    Hello, its Auth, and right behind them a bad frame. The handshake still completes (the
    peer proved the key: it is no stranger) and the bad frame fails the first receive after
    it, as a bad peer (serve then ends the session, not ignore it as a probe)."""
    import trio.testing

    from migrator.errors import BadPeer

    left, right = trio.testing.memory_stream_pair()
    peer = p.Connection("source", KEY)
    await left.send_all(peer.send(peer.hello_event()))
    dest = Channel(right, "dest", KEY, io_timeout=5)

    async def peer_side() -> None:
        while (ev := peer.next_event()) is p.NEED_DATA or not isinstance(ev, p.Hello):
            if ev is p.NEED_DATA:
                peer.receive_data(await left.receive_some(65536))
        # the Auth and a frame that no state allows, in one write
        await left.send_all(peer.send(peer.auth_event())
                            + peer.seal(p.HEADER.pack(int(p.FrameType.BLOCKS), 2**31)))

    with trio.fail_after(3):
        async with trio.open_nursery() as n:
            n.start_soon(peer_side)
            await trio.testing.wait_all_tasks_blocked()
            await dest.handshake()  # (passes: the peer knows the key)
            with pytest.raises(BadPeer):
                await dest.receive()
            n.cancel_scope.cancel()


class FastWire(SlowWire):
    """Takes everything at once."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.wire += data
        await trio.lowlevel.checkpoint()


async def test_a_new_cap_counts_from_the_moment_it_is_set(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """(migrator set, evacuate's shares) A lower cap never stalls for what went out under a
    higher one or none, and no cap means no wait: on a clock of our own, the waits asked."""
    from types import SimpleNamespace

    from migrator import transport

    clock, waits = [1000.0], []

    async def sleep(s: float) -> None:
        waits.append(round(s, 6))
        clock[0] += s
        await trio.lowlevel.checkpoint()

    monkeypatch.setattr(transport, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(transport.trio, "sleep", sleep)
    ch = Channel(FastWire(), "source", KEY, 1000.0, io_timeout=5)
    ch.conn._cs.state = p.State.VERIFYING
    ch.conn._cs.sizes = {0: 1 << 30}
    ch.conn._cs.manifest = p.Manifest(65536, (p.FileEntry(0, "vm.mem", 1 << 30),))
    ev = p.Digests(0, 0, tuple(range(512)))  # 4 KiB a frame; paced as 64 bytes (no data)
    await ch.send(ev)
    assert waits == [0.064]
    ch.set_limit(None)
    for _ in range(3):
        await ch.send(ev)
    assert waits == [0.064]  # none
    ch.set_limit(1000.0)  # ~16 KB went out meanwhile: not owed
    await ch.send(ev)
    assert waits == [0.064, 0.064]


def test_a_bare_port_to_listen_on_says_which_host() -> None:
    from migrator.transport import parse_hostport

    with pytest.raises(MigrationError, match=r"--listen 7091: give HOST:PORT, e\.g\. 0\.0"):
        parse_hostport("7091", listen=True)
    assert parse_hostport("0.0.0.0:7091", listen=True) == ("0.0.0.0", 7091)
    assert parse_hostport("7091") == ("127.0.0.1", 7091)  # (a destination: this host)
