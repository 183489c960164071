"""A man in the middle on 127.0.0.1, between a real `migrator migrate` and `migrator serve`.

The proxy reads the frame headers (they frame the stream, in clear) and does to the source's
frames what an on-path attacker could: read them, flip a bit, drop one, replay one, swap two.
Every change must stop the migration before the switchover with one line, the source VM
running and its files untouched, and the destination incomplete.
"""

from __future__ import annotations

import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator import protocol as p

from .conftest import Mount
from .hosts import (
    Server,
    assert_source_whole,
    digest,
    last_line,
    migrate,
    state,
)

pytestmark = pytest.mark.mount

MARK = b"a page the VM wrote, find me!!!\n"  # 32 bytes, repeated over the disk


def _shut(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Proxy:
    """Forwards 127.0.0.1:port to the serve; `attack` rewrites the source's frames."""

    def __init__(self, upstream: int, attack: str | None = None, nth: int = 2) -> None:
        self.upstream, self.attack, self.nth = upstream, attack, nth
        self.wire = bytearray()  # what the source sent, as it went on the wire
        self.blocks_seen = 0
        self.socks: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self.upstream))
        self.socks += [client, server]
        for target, args in ((self._frames, (client, server)), (self._pipe, (server, client))):
            t = threading.Thread(target=target, args=args, daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(src, dst)

    def _frames(self, src: socket.socket, dst: socket.socket) -> None:
        buf, held = bytearray(), None
        try:
            while data := src.recv(1 << 20):
                buf += data
                while len(buf) >= p.HEADER.size:
                    code, length = p.HEADER.unpack_from(buf)
                    end = p.HEADER.size + length
                    if len(buf) < end:
                        break
                    frame = bytes(buf[:end])
                    del buf[:end]
                    out = [frame]
                    if code == p.FrameType.BLOCKS:
                        self.blocks_seen += 1
                        if held is not None:  # reorder: the next frame first, then the held
                            out, held = [frame, held], None
                        elif self.blocks_seen == self.nth and self.attack:
                            out = self._tamper(frame)
                            if self.attack == "reorder":
                                held, out = frame, []
                    for f in out:
                        self.wire += f
                        dst.sendall(f)
        except OSError:
            pass
        finally:
            _shut(src, dst)

    def _tamper(self, frame: bytes) -> list[bytes]:
        match self.attack:
            case "flip":
                at = len(frame) // 2
                return [frame[:at] + bytes([frame[at] ^ 0x04]) + frame[at + 1:]]
            case "drop":
                return []
            case "replay":
                return [frame, frame]
        return [frame]

    def close(self) -> None:
        self.listener.close()
        for t in self.threads:
            t.join(timeout=10)
        for sk in self.socks:
            sk.close()
        self.socks.clear()


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    made: list[Proxy] = []
    yield made
    for px in made:
        px.close()


def _vm_files(src: Mount) -> dict[str, str]:
    (src.mnt / "disk.raw").write_bytes(MARK * (6 << 20 >> 5))
    (src.mnt / "vm.mem").write_bytes(MARK[::-1] * (2 << 20 >> 5))
    return {n: digest(src.mnt / n) for n in ("disk.raw", "vm.mem")}


@pytest.mark.parametrize("plaintext", [False, True], ids=["sealed", "insecure-plaintext"])
def test_the_vm_data_is_not_on_the_wire(hosts: tuple[Mount, Mount], key: Path,
                                        servers: list[Server], proxies: list[Proxy],
                                        idle_vm: subprocess.Popen[bytes],
                                        plaintext: bool) -> None:
    """Sealed, not one copy of the page is on the wire (it was 8 of 8 times in clear); the
    same capture of an --insecure-plaintext run finds it, so the check can see a leak."""
    src, dst = hosts
    _vm_files(src)
    flag = ["--insecure-plaintext"] if plaintext else []
    s = Server(dst, key, *flag)
    servers.append(s)
    px = Proxy(s.port)
    proxies.append(px)
    r = migrate(src, px.port, key, "disk.raw", "vm.mem", "--suspend", f"pid:{idle_vm.pid}",
                *flag)
    assert r.returncode == 0, r.stderr
    assert "INSECURE" in r.stderr.upper() if plaintext else "plaintext" not in r.stderr
    px.close()
    assert (MARK in px.wire) is plaintext
    assert (b"disk.raw" in px.wire) is plaintext
    assert digest(dst.mnt / "disk.raw") == digest(src.mnt / "disk.raw")


@pytest.mark.parametrize("attack", ["flip", "drop", "replay", "reorder"])
def test_a_changed_stream_stops_the_migration_before_the_switchover(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server], proxies: list[Proxy],
        idle_vm: subprocess.Popen[bytes], attack: str) -> None:
    src, dst = hosts
    before = _vm_files(src)
    s = Server(dst, key)
    servers.append(s)
    px = Proxy(s.port, attack)
    proxies.append(px)
    r = migrate(src, px.port, key, "disk.raw", "vm.mem", "--suspend", f"pid:{idle_vm.pid}")
    assert r.returncode == 1
    line = last_line(r)
    assert "tampered with or corrupted" in line and "Traceback" not in r.stderr, r.stderr
    assert_source_whole(src, before, idle_vm)
    rc, out = s.finish()
    assert rc == 1 and "tampered with or corrupted" in out, out
    st = state(dst)
    assert st is None or st["status"] == "incomplete"


def test_a_peer_in_clear_is_told_to_match(hosts: tuple[Mount, Mount], key: Path,
                                          servers: list[Server],
                                          idle_vm: subprocess.Popen[bytes]) -> None:
    """One side with --insecure-plaintext, the other without: refused at the handshake, with
    what to do, and nothing sent."""
    src, dst = hosts
    before = _vm_files(src)
    s = Server(dst, key)
    servers.append(s)
    r = migrate(src, s.port, key, "disk.raw", "--suspend", f"pid:{idle_vm.pid}",
                "--insecure-plaintext")
    assert r.returncode == 1 and "--insecure-plaintext, or neither" in last_line(r), r.stderr
    assert_source_whole(src, before, idle_vm)
    line = ""
    deadline = time.monotonic() + 10  # the serve says it once the source hung up
    while "--insecure-plaintext" not in line and time.monotonic() < deadline:
        if select.select([s.proc.stdout], [], [], 0.2)[0]:
            line = s.readline()
    s.proc.terminate()
    rest = s.finish()[1]
    # refused (it saw the mismatch first) or gave up (the source did): one line either way
    assert "--insecure-plaintext, or neither" in line, (line, rest)
    assert "refused" in line or "gave up the handshake" in line, line
