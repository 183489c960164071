"""The protocol over trio TCP streams: handshake, bandwidth limit, aborts.

All protocol rules (states, limits, authentication) live in the pure
``protocol`` module; this shell only moves bytes and time.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import stat
import time
from collections import deque
from typing import Any, TypeVar

import trio

from . import defaults
from . import protocol as p
from .errors import (
    BadPeer,
    ConnectionLost,
    KeyMismatch,
    MigrationError,
    NotOwner,
    PeerAborted,
    PeerMismatch,
    Tampered,
    VerificationFailed,
    first_error,
)

__all__ = ["BadPeer", "ConnectionLost", "KeyMismatch", "MigrationError", "NotOwner",
           "PeerAborted", "PeerMismatch", "Tampered", "VerificationFailed", "first_error"]

HANDSHAKE_TIMEOUT = 10.0
IO_TIMEOUT = defaults.IO_TIMEOUT  # no progress this long: a cut link or a stuck peer
RECV_CHUNK = 1 << 20
LISTEN_FROM = 1 << 20  # frames from this size on are sent with an ear on the peer
LISTEN_EVERY = 0.05  # s: smaller frames get one at most this often
E = TypeVar("E")  # the event types expect() waits for


def _bad_peer(exc: p.ProtocolError) -> BadPeer:
    cls = (Tampered if isinstance(exc, p.TamperedError) else
           KeyMismatch if isinstance(exc, p.AuthenticationError) else
           PeerMismatch if isinstance(exc, p.MismatchError) else BadPeer)
    return cls(str(exc))


def _aborted(ev: p.Abort) -> PeerAborted:
    return PeerAborted(ev.reason, ev.owner_generation, ev.code)


def read_key(path: str) -> bytes:
    """The shared key, refusing files others can read and keys too short to matter."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            key = f.read().strip()
    except FileNotFoundError:
        raise MigrationError(f"key file {path} does not exist: create one with 'migrator keygen "
                             f"{path}' and copy it to both hosts") from None
    except OSError as exc:
        raise MigrationError(f"cannot read key file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise MigrationError(f"key file {path} is readable by other users: chmod 600 {path}")
    try:
        random_bytes = len(bytes.fromhex(key.decode("ascii")))
    except ValueError:
        random_bytes = -1
    if random_bytes < 16:  # (a password, or a file of another kind: refused before any peer)
        raise MigrationError(f"{path} does not hold a key made by 'migrator keygen' (at least "
                             f"32 hex digits): run 'migrator keygen {path}' and copy the file "
                             "to every host")
    return key


def write_key(path: str, *, force: bool = False) -> None:
    """A new shared key, 32 random bytes as hex, in a file only its owner can read."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise MigrationError(f"{path} exists: keep it, or replace it with --force (both hosts "
                             "then need the new one)") from None
    except OSError as exc:
        raise MigrationError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)  # a replaced file keeps its old mode otherwise
        f.write(secrets.token_hex(32) + "\n")
        f.flush()
        os.fsync(fd)


def parse_hostport(text: str, default_host: str = "127.0.0.1", *, listen: bool = False
                   ) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep and listen:  # (a bare port would listen on this host only, unsaid)
        raise MigrationError(f"--listen {text}: give HOST:PORT, e.g. 0.0.0.0:{text} (every "
                             f"interface) or 127.0.0.1:{text} (this host only)")
    if not sep:
        host, port = default_host, text
    host = host.strip("[]") or default_host
    try:
        n = int(port)
    except ValueError:
        n = -1
    if not (0 if listen else 1) <= n < 65536:
        raise MigrationError(f"bad address {text!r}: use HOST:PORT, e.g. 127.0.0.1:7070")
    return host, n


class Channel:
    """One migration connection: a protocol Connection on a byte stream."""

    def __init__(self, stream: trio.abc.Stream, role: str, key: bytes,
                 limit_bytes_per_s: float | None = None, io_timeout: float = IO_TIMEOUT,
                 *, sealed: bool = True) -> None:
        self.stream = stream
        self.io_timeout = io_timeout
        self.role = role
        self.key = key  # the shared key (the spill area's key derives from it)
        self.conn = p.Connection(role, key, sealed=sealed)
        self.limit = limit_bytes_per_s
        self.bytes_sent = 0
        self.bytes_received = 0
        self._first_bytes = b""  # what the peer began with (a stranger is named by them)
        self._heard = False  # a frame of ours came from the peer
        self._t0 = time.monotonic()
        self._paced_from = 0  # bytes_sent when the cap last changed (set_limit)
        self._send_lock = trio.Lock()
        self._frame: trio.CancelScope | None = None  # the shield of a frame going out
        self._early: deque[p.Event] = deque()  # events read while sending (see _listen)
        self._receiving = False  # a task waits in receive(): it reads the socket itself
        self._listening: trio.CancelScope | None = None  # a send's _listen runs
        self._listen_done = trio.Event()
        self._peer_abort: Exception | None = None  # what _listen learnt: raised by send
        # No ear during the handshake: its frames are small and each is followed by a read,
        # and what a quick peer sent after its Auth (its first frame, maybe a bad one) must
        # come to that read, not fail the handshake as if the peer were a stranger.
        self._handshaking = False
        self._listened_at = -math.inf  # when a send last listened (trio.current_time)

    async def _listen(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """While a send runs and no task waits in receive(): has the peer said something we
        were not waiting for?

        A source busy copying reads nothing until the next RoundAck; if the destination
        aborts meanwhile (disk full, its QEMU failed), its reason must not be lost in the
        connection reset that follows. A plain receive on the stream (any trio stream),
        cancelled when the send is done or a receiver comes (receive() waits for it to stop).
        """
        with trio.CancelScope() as scope:
            self._listening = scope
            self._listen_done = trio.Event()
            task_status.started()
            try:
                # (a receive() that began before this task ran reads the stream itself:
                # checked in the same step as the read, so the two never read at once)
                while self._peer_abort is None and not self._receiving:
                    try:
                        data = await self.stream.receive_some(RECV_CHUNK)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        return  # the send itself reports a broken connection
                    if not data:
                        return  # (the receiver sees the end of the stream itself)
                    self.bytes_received += len(data)
                    try:
                        self.conn.receive_data(data)
                        while (ev := self.conn.next_event()) is not p.NEED_DATA:
                            if isinstance(ev, p.Abort):
                                self._peer_abort = _aborted(ev)
                                return
                            self._early.append(ev)
                    except p.ProtocolError as exc:
                        self._peer_abort = _bad_peer(exc)
                        return
            finally:
                self._listening = None
                self._listen_done.set()

    async def _send_listening(self, data: bytes) -> None:
        """stream.send_all, with an ear on the peer meanwhile unless a receiver has it.

        A frame that can keep the sender busy always gets one; small ones at most every
        LISTEN_EVERY seconds (the listener costs a task and a few scheduler passes: on every
        small frame, +1.3 ms of the switchover's send_last_set in `scripts/bench_demo.py`),
        so a stream of small frames still hears an Abort within that time."""
        now = trio.current_time()  # (trio's clock: the same on an autojump clock every run)
        small = len(data) < LISTEN_FROM and now - self._listened_at < LISTEN_EVERY
        if small or self._receiving or self._peer_abort is not None or self._handshaking:
            await self.stream.send_all(data)
            return
        self._listened_at = now
        failed: Exception | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(self._listen)
            await trio.lowlevel.checkpoint()  # what already waits is read before we go on
            try:
                await self.stream.send_all(data)
            except Exception as exc:  # as it is, not in the nursery's ExceptionGroup
                failed = exc
            finally:
                nursery.cancel_scope.cancel()
        if failed is not None:
            raise failed

    def peer_closed(self) -> bool:
        """The peer has closed its end (an EOF or a reset waits in our socket), seen without
        reading a frame. The source asks before its Commit: a Commit written into a dead
        connection would keep the VM suspended here, unsettled, for nothing."""
        sock = getattr(self.stream, "socket", None)
        if sock is None:
            return False
        try:
            with socket.socket(fileno=os.dup(sock.fileno())) as s:
                return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:  # reset: gone too
            return True

    def set_limit(self, limit_bytes_per_s: float | None) -> None:
        """A new cap from now on (migrator set, evacuate's shares). The budget restarts now:
        a lower cap must not stall for what was sent under the higher one, nor a higher one
        let a backlog out in a burst."""
        self.limit = limit_bytes_per_s
        self._t0 = time.monotonic()
        self._paced_from = self.bytes_sent

    async def send(self, event: p.Event) -> None:
        """Send one frame, whole or not at all.

        Cancellation may stop us while we wait for the lock or the bandwidth budget, but
        never once the frame is applied to the protocol state and partly written: half a
        frame would leave the peer reading garbage (seen when post-copy ended while the
        spill writer was sending).
        """
        if self._peer_abort is not None:
            raise self._peer_abort
        async with self._send_lock:
            if self.limit:
                # Token bucket: never run ahead of limit x elapsed.
                size = len(getattr(event, "data", b"")) + 64
                ahead = ((self.bytes_sent - self._paced_from + size) / self.limit
                         - (time.monotonic() - self._t0))
                if ahead > 0:
                    await trio.sleep(ahead)
            if self.conn.state in (p.State.ERROR, p.State.ABORTED):
                raise ConnectionLost(f"connection to the peer lost: {self.conn.why}")
            data = self.conn.send(event)
            try:
                try:
                    with trio.CancelScope(shield=True) as self._frame, trio.fail_after(
                            self.io_timeout):
                        await self._send_listening(data)
                    hurried = self._frame.cancelled_caught
                finally:
                    self._frame = None
                if hurried:  # (hurry: half a frame may have gone out; nothing may follow)
                    self.abandon()
                    raise ConnectionLost("the peer took no data while the migration stopped: "
                                         "the link was closed")
            except trio.TooSlowError:
                raise ConnectionLost(f"the peer took no data for {self.io_timeout:g} s: "
                                     "network cut or peer stuck") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if self._peer_abort is not None:
                    raise self._peer_abort from None
                await self._why_peer_left()
                raise ConnectionLost(f"connection to the peer lost while sending: {exc}") from None
            self.bytes_sent += len(data)
        if self._peer_abort is not None:
            raise self._peer_abort

    async def _why_peer_left(self) -> None:
        """A send failed: the peer may have said why before it closed (an Abort we did not
        read while busy sending).  Raise PeerAborted with its reason if it did."""
        if self._receiving:
            return  # the receiving task reads it
        with trio.move_on_after(1):
            while True:
                try:
                    data = await self.stream.receive_some(RECV_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return
                if not data:
                    return
                try:
                    self.conn.receive_data(data)
                    while (ev := self.conn.next_event()) is not p.NEED_DATA:
                        if isinstance(ev, p.Abort):
                            raise _aborted(ev)
                except p.ProtocolError:
                    return

    async def receive(self) -> p.Event:
        self._receiving = True
        try:
            if self._listening is not None:  # a send listens: it gives the stream back
                self._listening.cancel()
                await self._listen_done.wait()
            if self._early:
                return self._early.popleft()
            if self._peer_abort is not None:
                raise self._peer_abort
            return await self._receive()
        finally:
            self._receiving = False

    async def _receive(self) -> p.Event:
        eof = False
        while True:
            try:
                ev = self.conn.next_event()
            except p.ProtocolError as exc:
                if eof and isinstance(exc, p.PeerClosed):  # gone, not lying
                    raise ConnectionLost(f"connection to the peer lost: {exc}") from None
                raise self._stranger(exc) from None
            if ev is not p.NEED_DATA:
                self._heard = True
                if isinstance(ev, p.Abort):
                    raise _aborted(ev)
                return ev
            try:
                with trio.fail_after(self.io_timeout):
                    data = await self.stream.receive_some(RECV_CHUNK)
            except trio.TooSlowError:
                raise ConnectionLost(f"nothing from the peer for {self.io_timeout:g} s: "
                                     "network cut or peer stuck") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ConnectionLost(f"connection to the peer lost: {exc}") from None
            if len(self._first_bytes) < 16:
                self._first_bytes += data[:16 - len(self._first_bytes)]
            self.bytes_received += len(data)
            eof = not data
            try:
                self.conn.receive_data(data)
            except p.ProtocolError as exc:
                raise self._stranger(exc) from None

    def _stranger(self, exc: p.ProtocolError) -> BadPeer:
        """A frame that is no frame of ours before the handshake ended: a peer that speaks
        another protocol (an HTTP client or server, ssh...), named by its first bytes."""
        if self._handshaking and not self._heard and not isinstance(
                exc, (p.AuthenticationError, p.MismatchError)):
            return BadPeer(f"the peer does not speak the migrator protocol (it began with "
                           f"{self._first_bytes!r}): is that address a migrator's?")
        return _bad_peer(exc)

    async def expect(self, *types: type[E]) -> E:
        ev = await self.receive()
        if not isinstance(ev, types):
            raise BadPeer(f"expected {' or '.join(t.__name__ for t in types)}, "
                          f"got {type(ev).__name__}")
        return ev

    async def handshake(self, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """Hello both ways, then mutual proof of the shared key."""
        self._handshaking = True
        try:
            with trio.fail_after(timeout):
                await self.send(self.conn.hello_event())
                await self.expect(p.Hello)
                await self.send(self.conn.auth_event())
                await self.expect(p.Auth)
        except trio.TooSlowError:
            raise MigrationError(f"the peer did not complete the handshake within {timeout:g} s "
                                 "(is it a migrator?)") from None
        finally:
            self._handshaking = False

    async def abort(self, reason: str, owner_generation: int = -1,
                    code: p.AbortCode = p.AbortCode.NONE) -> None:
        """Tell the peer why we stop, if the connection still allows it.

        Then half-close and read until the peer closes (2 s at most): closing with its
        data unread would reset the connection and could destroy the Abort before the
        peer reads it.
        """
        with trio.move_on_after(2):
            try:
                data = self.conn.send(p.Abort.about(reason, owner_generation, code))
                async with self._send_lock:
                    await self.stream.send_all(data)
                if isinstance(self.stream, trio.SocketStream):
                    await self.stream.send_eof()
                    while await self.stream.receive_some(RECV_CHUNK):
                        pass
            except (MigrationError, p.ProtocolError, trio.BrokenResourceError,
                    trio.ClosedResourceError, OSError):
                pass

    def hurry(self, grace: float) -> None:
        """The migration stops: a frame still going out gets `grace` seconds more, not the
        rest of --io-timeout (a peer that takes no data would hold the stop that long); past
        them the link is abandoned, as no Abort could follow half a frame."""
        if self._frame is not None:
            self._frame.deadline = min(self._frame.deadline, trio.current_time() + grace)

    def abandon(self) -> None:
        """Close the link now, a frame half sent or not (hurry's end): no Abort could follow
        half a frame, and a peer that takes no data would not read one."""
        sock = getattr(self.stream, "socket", None)
        if sock is not None:
            sock.close()  # (trio wakes the task waiting on it: ClosedResourceError)

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            await self.stream.aclose()
