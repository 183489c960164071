"""The Connection: bytes in, events out; events in, bytes out (sans-IO, like h11's).

It moves bytes and frames, and asks the other modules everything else: codec.py what a frame
says, state.py whether it may be said now, sealing.py how it is sealed.  A big Blocks frame is
taken into a buffer of its own as it arrives (decrypted on the way when sealed), so 8 MiB of
data is copied once.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

from .codec import BLOCKS_HEAD, check_header, decode_payload, encode_parts
from .events import (
    DEST,
    NEED_DATA,
    ROLES,
    SOURCE,
    Auth,
    Blocks,
    Event,
    FrameType,
    Hello,
    LocalProtocolError,
    Manifest,
    NeedData,
    PeerClosed,
    Postcopy,
    ProtocolError,
    Reattach,
    RemoteProtocolError,
)
from .limits import BIG_DATA, HEADER, MAX_FRAME, MAX_PAYLOAD, NONCE_SIZE, PROTOCOL_VERSION, TAG_SIZE
from .sealing import Opening, Sealer, auth_mac, frame_key
from .state import ConnectionState, State


class _Gathering:
    """A big frame's data in clear, copied once into a buffer of its own as it arrives."""

    def __init__(self, size: int) -> None:
        self.size, self.fill = size, 0
        self._data = bytearray(size)

    def take(self, data: memoryview) -> int:
        """Take what of `data` belongs to the frame; how many bytes that was."""
        n = min(self.size - self.fill, len(data))
        self._data[self.fill:self.fill + n] = data[:n]
        self.fill += n
        return n

    def finish(self) -> bytearray:
        """The frame's data, all of it here."""
        return self._data


class Connection:
    """One side of a migration: bytes in, events out; events in, bytes out.  No I/O."""

    def __init__(self, role: str, key: bytes, nonce: bytes | None = None, *,
                 sealed: bool = True) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be 'source' or 'dest', not {role!r}")
        if type(key) is not bytes or not key:
            raise ValueError("the shared key must be non-empty bytes")
        nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        if type(nonce) is not bytes or len(nonce) != NONCE_SIZE:
            raise ValueError(f"the nonce must be {NONCE_SIZE} bytes")
        self.role = role
        self.peer_role = DEST if role == SOURCE else SOURCE
        self._key = key
        self._nonce = nonce
        self.sealed = sealed  # frames after Auth are sealed (False: --insecure-plaintext)
        self._cs = ConnectionState(Hello(PROTOCOL_VERSION, role, nonce, sealed),
                                   functools.partial(auth_mac, key))
        self._seal_out: Sealer | None = None  # from our Auth on
        self._seal_in: Sealer | None = None  # from the peer's Auth on
        self._buf = bytearray()
        self._big: _Gathering | Opening | None = None  # a big Blocks frame, as it comes
        self._big_head = b""
        self._eof = False

    @property
    def state(self) -> State:
        """Where the conversation is (state.py)."""
        return self._cs.state

    @property
    def why(self) -> str:
        """What ended the connection (an error, or an Abort), once it ended."""
        return self._cs.why

    @property
    def postcopy(self) -> Postcopy | None:
        """The Postcopy announcement, once sent: the session ends with post-copy."""
        return self._cs.postcopy

    @property
    def manifest(self) -> Manifest | None:
        """The Manifest, once sent (a Reattach's too)."""
        return self._cs.manifest

    @property
    def reattach(self) -> Reattach | None:
        """The Reattach that opened this session, if it is one."""
        return self._cs.reattach

    @property
    def sizes(self) -> Mapping[int, int]:
        """Current size of each file by file_id: the manifest's, updated by Resize."""
        return MappingProxyType(self._cs.sizes)

    def hello_event(self) -> Hello:
        """Our Hello (the only one send() accepts)."""
        return self._cs.hello

    def auth_event(self) -> Auth:
        """Our Auth, once both Hellos are known (the MAC covers the peer's nonce)."""
        if self._cs.state is not State.AUTH:
            raise LocalProtocolError(f"Auth needs both Hellos first (state {self._cs.state.name})")
        return Auth(self._cs.expected_mac(self.role))

    def send(self, event: Event) -> bytes:
        """The bytes to write for `event`; LocalProtocolError, state unchanged, if illegal."""
        try:
            code, parts, size = encode_parts(event)
            seal = self._seal_out  # our Auth itself goes in clear
            self._apply(event, self.role)
        except ProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None
        if seal is not None:
            return seal.seal(code, parts, size)
        return b"".join([HEADER.pack(code, size), *parts])  # one copy of the data

    def seal(self, frame: bytes) -> bytes:
        """A frame made by hand, as send() would write it (sealed once our Auth is out), with
        no rule checked and no state changed: for tests that play a peer breaking the rules."""
        if self._seal_out is None:
            return frame
        return bytes(self._seal_out.seal(frame[0], [memoryview(frame)[HEADER.size:]],
                                         len(frame) - HEADER.size))

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer (b"" means EOF); next_event() parses them."""
        self._refuse_if_over()
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if not data:
            self._eof = True
            return
        if len(self._buf) >= MAX_FRAME:
            raise LocalProtocolError("call next_event() until NEED_DATA before feeding more")
        big = self._big
        if big is not None and big.fill < big.size:
            n = big.take(memoryview(data))
            if n == len(data):
                return
            data = memoryview(data)[n:]
        self._buf += data
        try:
            if big is None:
                self._header()  # refuse a bad header now, before its payload arrives
                self._start_big()
        except ProtocolError as exc:
            raise self._fail(exc) from None

    def _start_big(self) -> None:
        """The front frame is Blocks of BIG_DATA or more, not all here: its data goes into a
        buffer of its own as it comes, so it is copied once (not into the buffer, out as the
        payload, out again as the data). Only a peek: the header is checked for the state
        when the frame is taken (our own sends may change what is legal meanwhile).  A sealed
        frame is decrypted as it comes, its Blocks header too (it is ciphertext)."""
        if len(self._buf) < HEADER.size:
            return
        code, length = HEADER.unpack_from(self._buf)
        sealed = self._seal_in is not None
        if code != FrameType.BLOCKS or not BIG_DATA <= length <= MAX_PAYLOAD + sealed * TAG_SIZE:
            return
        pre, end = HEADER.size + (0 if sealed else BLOCKS_HEAD.size), HEADER.size + length
        if not pre <= len(self._buf) < end:
            return
        self._big_head = bytes(self._buf[:pre])
        self._big = (_Gathering(end - pre) if self._seal_in is None
                     else self._seal_in.opening(self._big_head, end - pre))
        with memoryview(self._buf) as view:
            self._big.take(view[pre:])
        self._buf = bytearray()

    def next_event(self) -> Event | Literal[NeedData.NEED_DATA]:
        """The peer's next event, or NEED_DATA; RemoteProtocolError (state ERROR) if illegal."""
        self._refuse_if_over()
        if self._big is not None:
            return self._big_event()
        try:
            length = self._header()
            end = HEADER.size + length if length is not None else 0
            if length is None or len(self._buf) < end:
                if self._eof and (self._buf or self._cs.state is not State.CLOSED):
                    where = " in the middle of a frame" if self._buf else ""
                    raise PeerClosed(
                        f"peer closed the connection during {self._cs.state.name}{where}")
                return NEED_DATA
            code = self._buf[0]
            with memoryview(self._buf) as view:
                if self._seal_in is None:
                    payload = bytes(view[HEADER.size : end])
                else:
                    payload = self._seal_in.open(bytes(view[: HEADER.size]),
                                                 view[HEADER.size : end])
            del self._buf[:end]
            event = decode_payload(self._typed(code, len(payload)), payload)
            self._apply(event, self.peer_role)
            self._start_big()
        except ProtocolError as exc:
            raise self._fail(exc) from None
        return event

    def _big_event(self) -> Event | Literal[NeedData.NEED_DATA]:
        assert self._big is not None
        try:
            if self._big.fill < self._big.size:
                if self._eof:
                    raise PeerClosed(f"peer closed the connection during "
                                        f"{self._cs.state.name} in the middle of a frame")
                return NEED_DATA
            code, length = HEADER.unpack_from(self._big_head)
            data = self._big.finish()  # sealed: TamperedError unless the tag proves it
            if self._seal_in is None:
                self._typed(code, length)
                file_id, first = BLOCKS_HEAD.unpack_from(self._big_head, HEADER.size)
            else:
                self._typed(code, len(data))
                file_id, first = BLOCKS_HEAD.unpack_from(data)
                del data[: BLOCKS_HEAD.size]  # O(1) at a bytearray's front: no copy
            self._big = None
            event = Blocks(file_id, first, data)
            self._apply(event, self.peer_role)
            self._start_big()
        except ProtocolError as exc:
            raise self._fail(exc) from None
        return event

    # -- internals ------------------------------------------------------------------------

    def _refuse_if_over(self) -> None:
        if self._cs.state is State.ERROR:
            raise RemoteProtocolError(f"connection is in ERROR: {self._cs.why}")
        if self._cs.state is State.ABORTED:
            raise ProtocolError(f"connection was aborted: {self._cs.why}")

    def _fail(self, exc: ProtocolError) -> RemoteProtocolError:
        self._cs.process_error(str(exc))
        self._buf = bytearray()
        self._big = None
        return exc if isinstance(exc, RemoteProtocolError) else RemoteProtocolError(str(exc))

    def _header(self) -> int | None:
        """The front frame's payload length once its 5 header bytes are in.  A clear frame's
        type is checked for the state now, before its payload arrives; a sealed one's only
        once its tag proves the header is the peer's (a changed header must read as
        tampering, not as a peer breaking the rules)."""
        if len(self._buf) < HEADER.size:
            return None
        code, length = HEADER.unpack_from(self._buf)
        if self._seal_in is None:
            self._typed(code, length)
        elif not TAG_SIZE <= length <= MAX_PAYLOAD + TAG_SIZE:
            raise self._seal_in.tampered(f"a sealed frame of {length} bytes")
        return length

    def _typed(self, code: int, length: int) -> type[Event]:
        """The event class of a frame with this header, if the state allows it now."""
        cls = check_header(code, length)
        self._cs.check_legal(self.peer_role, cls)
        return cls

    def _frame_key(self, sender: str) -> bytes:
        source, dest = ((self._nonce, self._cs.peer_nonce) if self.role == SOURCE
                        else (self._cs.peer_nonce, self._nonce))
        return frame_key(self._key, source, dest, sender)

    def _apply(self, event: Event, sender: str) -> None:
        """The state table's verdict on `event` (it raises, changing nothing, if illegal), then
        the keys of sealed frames from that side's Auth on."""
        self._cs.process(event, sender)
        if type(event) is Auth and self.sealed:
            sealer = Sealer(self._frame_key(sender), sender)
            if sender == self.role:
                self._seal_out = sealer
            else:
                self._seal_in = sealer
