"""The migration protocol (pure): a whole session in memory, split every way, and every refusal."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import struct
from collections.abc import Callable

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from migrator.protocol import (
    HEADER,
    MAX_BLOCKS_DATA,
    MAX_DIGESTS_PER_FRAME,
    MAX_FILE_SIZE,
    MAX_FILES,
    MAX_FRAME,
    MAX_PAYLOAD,
    MAX_REASON,
    NEED_DATA,
    PROTOCOL_VERSION,
    Abort,
    Auth,
    AuthenticationError,
    Blocks,
    Commit,
    Connection,
    Digests,
    Done,
    Event,
    FileEntry,
    FrameType,
    Held,
    HeldZero,
    Hello,
    Lineage,
    LocalProtocolError,
    Manifest,
    Packed,
    Pages,
    ProtocolError,
    Ready,
    RemoteProtocolError,
    Resize,
    Resumed,
    RoundAck,
    RoundDone,
    State,
    Switchover,
    Verified,
    VerifyDone,
    Zero,
    ZeroDigests,
    check_event,
    check_file_name,
    decode,
    encode,
)

KEY = b"the shared key, 32 bytes long..."
V = PROTOCOL_VERSION
BS = 4096
S_NONCE, D_NONCE = bytes(range(32)), bytes(range(200, 232))
Split = Callable[[bytes], list[bytes]]


def data(n: int, seed: int = 0) -> bytes:
    return (bytes(range(seed, 256)) + bytes(range(seed))) * (n // 256) + bytes(range(n % 256))


def whole(b: bytes) -> list[bytes]:
    return [b]


def bytewise(b: bytes) -> list[bytes]:
    return [b[i : i + 1] for i in range(len(b))]


def drain(conn: Connection) -> list[Event]:
    """Events until NEED_DATA, or up to an Abort (after which the connection refuses all)."""
    events: list[Event] = []
    while not (events and isinstance(events[-1], Abort)):
        event = conn.next_event()
        if event is NEED_DATA:
            break
        events.append(event)
    return events


def feed(conn: Connection, raw: bytes, split: Split = whole) -> list[Event]:
    events = []
    for piece in split(raw):
        conn.receive_data(piece)
        events += drain(conn)
    return events


def frame(kind: FrameType, payload: bytes | dict[str, object]) -> bytes:
    """A hand-made frame, for what an honest encoder would refuse to produce."""
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    return HEADER.pack(kind, len(payload)) + payload


FILES = (FileEntry(0, "disk.img", 3 * BS + 100), FileEntry(1, "vm/mem.bin", 2 * BS))
MANIFEST = Manifest(BS, FILES)

# (sender, event or how to get it from the sender) of a whole session, in order
SCRIPT: list[tuple[str, Event | Callable[[Connection], Event]]] = [
    ("source", Connection.hello_event),
    ("dest", Connection.hello_event),
    ("source", Connection.auth_event),
    ("dest", Connection.auth_event),
    ("source", MANIFEST),
    ("dest", Ready()),
    ("source", Blocks(0, 0, data(2 * BS))),
    ("source", Blocks(0, 3, data(100, 1))),  # the tail: not a whole block, ends at the end
    ("source", Blocks(1, 0, data(2 * BS, 2))),
    ("source", RoundDone(0, 5, 4 * BS + 100)),
    ("source", Resize(1, 4 * BS)),  # the next round starts before the ack
    ("dest", RoundAck(0)),
    ("source", Blocks(1, 2, data(2 * BS, 3))),
    ("source", RoundDone(1, 2, 2 * BS)),
    ("dest", RoundAck(1)),
    ("source", Switchover()),
    ("source", Blocks(0, 2, data(BS + 100, 4))),
    ("source", Resize(0, 2 * BS)),
    ("source", Commit()),
    ("dest", Resumed(12.5)),
    ("source", Digests(0, 0, (1, 2))),
    ("source", Digests(1, 0, (3, 4, 5, 2**64 - 1))),
    ("source", VerifyDone()),
    ("dest", Verified(True, 0, "")),
    ("source", Done()),
]


class Link:
    """A source and a dest back to back: what one sends, the other receives.

    In clear by default, so that the rule tests can feed frames of their own making
    (encode(...)); test_sealed.py plays the same sessions sealed and tampers with them."""

    def __init__(self, split: Split = whole, source_key: bytes = KEY, dest_key: bytes = KEY,
                 sealed: bool = False):
        self.source = Connection("source", source_key, nonce=S_NONCE, sealed=sealed)
        self.dest = Connection("dest", dest_key, nonce=D_NONCE, sealed=sealed)
        self.split = split
        self.step = 0

    def side(self, role: str) -> Connection:
        return self.source if role == "source" else self.dest

    def send(self, sender: Connection, event: Event) -> list[Event]:
        receiver = self.dest if sender is self.source else self.source
        return feed(receiver, sender.send(event), self.split)

    def run(self, until: State | None = None) -> None:
        """Play SCRIPT until both sides are in `until` (or to the end)."""
        while self.step < len(SCRIPT):
            if until is not None and self.source.state is until is self.dest.state:
                return
            role, what = SCRIPT[self.step]
            sender = self.side(role)
            event = what(sender) if callable(what) else what
            assert self.send(sender, event) == [event]
            assert self.source.state is self.dest.state  # both sides agree at every step
            self.step += 1
        assert until in (None, State.CLOSED)


def link_at(state: State) -> Link:
    link = Link()
    link.run(until=state)
    return link


def refused(conn: Connection, raw: bytes, match: str, exc: type[Exception] = RemoteProtocolError):
    """Feed `raw`: it must raise `exc` with `match`, leave ERROR, and refuse everything after."""
    with pytest.raises(exc, match=match):
        feed(conn, raw)
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="ERROR"):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(encode(MANIFEST))
    with pytest.raises(LocalProtocolError):
        conn.send(Ready())


# -- whole sessions ---------------------------------------------------------------------------


def check_finished(link: Link) -> None:
    assert link.source.state is link.dest.state is State.CLOSED
    for conn in (link.source, link.dest):
        assert conn.manifest == MANIFEST
        assert dict(conn.sizes) == {0: 2 * BS, 1: 4 * BS}
        conn.receive_data(b"")  # EOF after Done is the normal end
        assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
def test_whole_session(sealed: bool) -> None:
    link = Link(sealed=sealed)
    link.run()
    check_finished(link)


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
def test_whole_session_fed_one_byte_at_a_time(sealed: bool) -> None:
    link = Link(split=bytewise, sealed=sealed)
    link.run()
    check_finished(link)


@settings(max_examples=50, deadline=None)
@given(st.randoms(use_true_random=False), st.booleans())
def test_whole_session_random_splits(rnd: random.Random, sealed: bool) -> None:
    def split(b: bytes) -> list[bytes]:
        cuts = sorted(rnd.sample(range(1, len(b)), min(len(b) - 1, rnd.randint(0, 6))))
        return [b[i:j] for i, j in zip([0, *cuts], [*cuts, len(b)], strict=True)]

    link = Link(split=split, sealed=sealed)
    link.run()
    check_finished(link)


def test_whole_session_all_frames_in_one_chunk() -> None:
    """The dest may get many frames in one read: every event comes out, in order."""
    link = link_at(State.COPYING)
    events = [event for _, event in SCRIPT[6:10]]
    raw = b"".join(link.source.send(event) for event in events)  # type: ignore[arg-type]
    assert feed(link.dest, raw) == events
    assert link.dest.state is State.ROUND_END


def test_hellos_and_auths_may_cross() -> None:
    s = Connection("source", KEY, nonce=S_NONCE)
    d = Connection("dest", KEY, nonce=D_NONCE)
    to_d, to_s = s.send(s.hello_event()), d.send(d.hello_event())
    assert feed(d, to_d) == [Hello(PROTOCOL_VERSION, "source", S_NONCE)]
    assert feed(s, to_s) == [Hello(PROTOCOL_VERSION, "dest", D_NONCE)]
    to_d, to_s = s.send(s.auth_event()), d.send(d.auth_event())
    assert len(feed(d, to_d)) == len(feed(s, to_s)) == 1
    assert s.state is d.state is State.MANIFEST


def test_default_nonce_is_fresh_and_constructor_checks() -> None:
    first, second = Connection("source", KEY), Connection("source", KEY)
    assert first.hello_event().nonce != second.hello_event().nonce
    with pytest.raises(ValueError, match="role"):
        Connection("middle", KEY)
    with pytest.raises(ValueError, match="key"):
        Connection("source", b"")
    with pytest.raises(ValueError, match="nonce"):
        Connection("source", KEY, nonce=b"short")


# -- the handshake ---------------------------------------------------------------------------


@pytest.mark.parametrize("wrong", ["source", "dest"])
def test_wrong_key_on_either_side_fails_both_and_no_manifest_gets_in(wrong: str) -> None:
    bad = b"another key, also 32 bytes long."
    link = Link(**{f"{wrong}_key": bad})
    link.run(until=State.AUTH)
    s, d = link.source, link.dest
    s_auth, d_auth = s.send(s.auth_event()), d.send(d.auth_event())
    with pytest.raises(AuthenticationError, match="does not know the shared key"):
        feed(d, s_auth)
    with pytest.raises(AuthenticationError, match="does not know the shared key"):
        feed(s, d_auth)
    assert s.state is d.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        s.send(MANIFEST)
    with pytest.raises(RemoteProtocolError):
        feed(d, encode(MANIFEST))


def test_no_manifest_before_both_auths() -> None:
    link = link_at(State.AUTH)
    s, d = link.source, link.dest
    assert feed(d, s.send(s.auth_event())) == [s.auth_event()]  # dest has not sent its Auth
    with pytest.raises(LocalProtocolError, match="Manifest in state AUTH"):
        s.send(MANIFEST)
    refused(d, encode(MANIFEST), "may not send Manifest in state AUTH")


def test_manifest_before_hello_and_auth_before_hello() -> None:
    refused(Connection("dest", KEY), encode(MANIFEST), "Manifest in state HELLO")
    refused(Connection("dest", KEY), encode(Auth(b"x" * 32)), "Auth in state HELLO")


def test_version_mismatch_says_both_versions() -> None:
    hello = {"version": PROTOCOL_VERSION + 1, "role": "source", "nonce": S_NONCE.hex(),
             "cipher": "new"}
    refused(Connection("dest", KEY), frame(FrameType.HELLO, hello),
            f"peer speaks protocol version {PROTOCOL_VERSION + 1}, we speak {PROTOCOL_VERSION}")


def _hello(drop: str = "", **fields: object) -> dict[str, object]:
    """The source's Hello as JSON, with some fields changed (or one dropped)."""
    hello = {"version": V, "role": "source", "nonce": S_NONCE.hex(), "sealed": True, **fields}
    hello.pop(drop, None)
    return hello


@pytest.mark.parametrize(
    ("hello", "match"),
    [
        (_hello(role="dest"), "dest, and so are we"),
        (_hello(nonce=D_NONCE.hex()), "echoed our nonce"),
        (_hello(role="boss"), "role must be"),
        (_hello(nonce="ab" * 31), "nonce must be 32 bytes"),
        (_hello(nonce=S_NONCE.hex().upper()), "lowercase hex"),
        (_hello(nonce="zz" * 32), "lowercase hex"),
        (_hello(nonce=" " + "ab" * 32), "lowercase hex"),
        (_hello(version=True), "integer, not bool"),
        (_hello("nonce"), "lacks nonce"),
        (_hello(sealed=1), "sealed must be"),
        (_hello("sealed"), "lacks sealed"),
        (_hello(sealed=False), "the source runs with --insecure-plaintext and the dest seals"),
    ],
)
def test_bad_hellos(hello: dict[str, object], match: str) -> None:
    refused(Connection("dest", KEY, nonce=D_NONCE), frame(FrameType.HELLO, hello), match)


def test_second_hello_is_refused() -> None:
    d = Connection("dest", KEY)
    hello = encode(Hello(V, "source", S_NONCE))
    feed(d, hello)
    refused(d, hello, r"peer \(source\) already sent Hello")


def test_mac_is_the_documented_hmac() -> None:
    link = link_at(State.AUTH)
    for conn, role, receiver_nonce, sender_nonce in [(link.source, b"source", D_NONCE, S_NONCE),
                                                     (link.dest, b"dest", S_NONCE, D_NONCE)]:
        message = b"blkfs-migrator/1|" + role + b"|" + receiver_nonce + sender_nonce
        assert conn.auth_event().mac == hmac.new(KEY, message, hashlib.sha256).digest()


def test_auth_event_needs_both_hellos() -> None:
    s = Connection("source", KEY)
    s.send(s.hello_event())
    with pytest.raises(LocalProtocolError, match="both Hellos"):
        s.auth_event()


# -- illegal sends: LocalProtocolError, nothing changes, the session goes on ------------------


@pytest.mark.parametrize(
    ("state", "role", "event", "match"),
    [
        (State.HELLO, "source", Hello(1, "source", b"x" * 32), "hello_event"),
        (State.HELLO, "source", Ready(), "Ready in state HELLO"),
        (State.AUTH, "dest", Auth(b"x" * 32), "auth_event"),
        (State.MANIFEST, "dest", MANIFEST, r"we \(dest\) may not send Manifest"),
        (State.MANIFEST, "source", Blocks(0, 0, data(BS)), "Blocks in state MANIFEST"),
        (State.COPYING, "source", Blocks(0, 3, data(BS)), "refusing to lie about sizes"),
        (State.COPYING, "source", Abort("x" * (MAX_REASON + 1)), "1001 characters"),
        (State.COPYING, "dest", RoundAck(0), "RoundAck in state COPYING"),
        (State.ROUND_END, "source", Switchover(), "Switchover in state ROUND_END"),
        (State.ROUND_END, "source", RoundDone(9, 0, 0), "RoundDone in state ROUND_END"),
        (State.ROUND_END, "dest", RoundAck(7), "round 0 is the one waiting"),
        (State.RESUMING, "source", Digests(0, 0, (1,)), "Digests in state RESUMING"),
        (State.VERDICT, "dest", Verified(True, 3, ""), "ok with 3 mismatches"),
    ],
)
def test_illegal_send_changes_nothing(state: State, role: str, event: Event, match: str) -> None:
    link = link_at(state)
    with pytest.raises(LocalProtocolError, match=match):
        link.side(role).send(event)
    assert link.source.state is link.dest.state is state
    link.run()
    check_finished(link)


def test_rounds_must_increase() -> None:
    link = link_at(State.COPYING)
    link.send(link.source, RoundDone(3, 0, 0))
    link.send(link.dest, RoundAck(3))
    with pytest.raises(LocalProtocolError, match="rounds must increase"):
        link.source.send(RoundDone(3, 0, 0))
    refused(link.dest, encode(RoundDone(2, 0, 0)), "rounds must increase")


def test_send_refuses_what_is_not_an_event() -> None:
    with pytest.raises(LocalProtocolError, match="not a protocol event"):
        Connection("source", KEY).send("Hello")  # type: ignore[arg-type]


# -- events in the wrong order from the peer ---------------------------------------------------


@pytest.mark.parametrize(
    ("state", "receiver", "event", "match"),
    [
        (State.MANIFEST, "dest", Blocks(0, 0, data(BS)), "Blocks in state MANIFEST"),
        (State.AUTH, "dest", MANIFEST, "Manifest in state AUTH"),
        (State.READY, "dest", Ready(), r"peer \(source\) may not send Ready"),
        (State.COPYING, "source", RoundAck(0), "RoundAck in state COPYING"),
        (State.COPYING, "dest", Commit(), "Commit in state COPYING"),
        (State.ROUND_END, "dest", Switchover(), "Switchover in state ROUND_END"),
        (State.RESUMING, "dest", Digests(0, 0, (1,)), "Digests in state RESUMING"),
        (State.VERIFYING, "dest", Done(), "Done in state VERIFYING"),
        (State.VERIFYING, "source", Verified(True, 0, ""), "Verified in state VERIFYING"),
        (State.SWITCHOVER, "source", Resumed(1.0), "Resumed in state SWITCHOVER"),
    ],
)
def test_wrong_order_is_refused(state: State, receiver: str, event: Event, match: str) -> None:
    refused(link_at(state).side(receiver), encode(event), match)


def test_round_ack_for_the_wrong_round() -> None:
    refused(link_at(State.ROUND_END).source, encode(RoundAck(5)), "round 0 is the one waiting")


def test_nothing_after_done() -> None:
    link = Link()
    link.run()
    with pytest.raises(LocalProtocolError, match="CLOSED"):
        link.source.send(Abort("too late"))
    refused(link.dest, encode(Abort("late")), "Abort in state CLOSED")


def test_wrong_state_is_refused_at_the_header() -> None:
    """A frame that is not allowed now is refused before its (large) payload is buffered."""
    d = link_at(State.MANIFEST).dest
    refused(d, HEADER.pack(FrameType.BLOCKS, 12 + MAX_BLOCKS_DATA), "Blocks in state MANIFEST")


# -- garbage, limits and EOF -------------------------------------------------------------------


def test_garbage_is_refused() -> None:
    http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    refused(Connection("dest", KEY), http, "unknown frame type 0x47")


@pytest.mark.parametrize("code", [0, 35, 255])
def test_unknown_frame_type(code: int) -> None:
    d = link_at(State.COPYING).dest
    refused(d, bytes([code, 0, 0, 0, 0]), f"unknown frame type {code:#04x}")


@pytest.mark.parametrize("length", [MAX_PAYLOAD + 1, 2**32 - 1])
def test_oversized_length_is_refused_at_the_header(length: int) -> None:
    d = link_at(State.COPYING).dest
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        d.receive_data(HEADER.pack(FrameType.BLOCKS, length))  # the header alone
    assert d.state is State.ERROR


def test_header_of_the_largest_frame_is_accepted_and_the_frame_too() -> None:
    link = link_at(State.MANIFEST)
    big = Manifest(BS, (FileEntry(0, "big", 2**30),))
    link.send(link.source, big)
    link.send(link.dest, Ready())
    raw = encode(Blocks(0, 0, data(MAX_BLOCKS_DATA)))
    assert len(raw) <= MAX_FRAME
    link.dest.receive_data(raw[: HEADER.size])
    assert link.dest.next_event() is NEED_DATA
    link.dest.receive_data(raw[HEADER.size :] + raw)  # one frame and a second in one read
    # more before draining would let the buffer grow without bound: refused, nothing changes
    with pytest.raises(LocalProtocolError, match="next_event"):
        link.dest.receive_data(b"more")
    events = drain(link.dest)
    assert [len(e.data) for e in events] == [MAX_BLOCKS_DATA] * 2  # type: ignore[union-attr]
    assert link.dest.state is State.COPYING


def test_truncated_frame_then_eof() -> None:
    d = link_at(State.COPYING).dest
    d.receive_data(encode(Blocks(0, 0, data(BS)))[:100])
    assert d.next_event() is NEED_DATA
    d.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed the connection during COPYING in"):
        d.next_event()
    assert d.state is State.ERROR


@pytest.mark.parametrize("state", [State.HELLO, State.AUTH, State.COPYING, State.RESUMING])
def test_eof_in_the_middle(state: State) -> None:
    link = link_at(state)
    link.dest.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=f"closed the connection during {state.name}$"):
        link.dest.next_event()
    assert link.dest.state is State.ERROR


def test_frames_before_eof_still_come_out() -> None:
    d = link_at(State.COPYING).dest
    d.receive_data(encode(Resize(0, 0)))
    d.receive_data(b"")
    assert d.next_event() == Resize(0, 0)
    with pytest.raises(RemoteProtocolError, match="closed"):
        d.next_event()
    with pytest.raises(RemoteProtocolError):
        d.receive_data(b"")


def test_data_after_eof_is_a_local_error() -> None:
    d = Connection("dest", KEY)
    d.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        d.receive_data(b"x")


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([State.HELLO, State.AUTH, State.COPYING]), st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_errors(state: State, junk: bytes) -> None:
    link = link_at(state)
    for conn in (link.source, link.dest):
        try:
            feed(conn, junk)
            conn.receive_data(b"")
            drain(conn)
        except ProtocolError:
            pass
        else:
            raise AssertionError("EOF in the middle must raise")


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_frames_raise_only_protocol_errors(draw: st.DataObject) -> None:
    raw = bytearray(draw.draw(st.sampled_from([encode(MANIFEST), encode(Resize(1, 5)),
                                               encode(RoundDone(0, 1, 2)),
                                               encode(Blocks(1, 1, data(BS)))])))
    for _ in range(draw.draw(st.integers(1, 4))):
        raw[draw.draw(st.integers(0, len(raw) - 1))] = draw.draw(st.integers(0, 255))
    conn = link_at(draw.draw(st.sampled_from([State.MANIFEST, State.COPYING]))).dest
    try:
        feed(conn, bytes(raw), bytewise)
    except ProtocolError:
        assert conn.state is State.ERROR


# -- the manifest ------------------------------------------------------------------------------


def manifest_frame(files: list[dict[str, object]], block_size: object = BS) -> bytes:
    return frame(FrameType.MANIFEST, {"block_size": block_size, "files": files, "migration": "",
                                         "delta": False, "replica": False, "lineage": "",
                                         "lineage_files": [], "vm": "", "vm_name": "",
                                         "generation": 0})


def entry(file_id: object = 0, name: object = "disk.img", size: object = BS,
          allocated: object = 0) -> dict[str, object]:
    return {"file_id": file_id, "name": name, "size": size, "allocated": allocated}


BAD_NAMES = [
    ("../etc/passwd", "'..' component"),
    ("a/../../b", "'..' component"),
    ("..", "'..' component"),
    ("/etc/passwd", "absolute"),
    ("a//b", "empty component"),
    ("a/", "empty component"),
    ("./a", "'.' component"),
    ("a/./b", "'.' component"),
    ("", "empty"),
    ("a\0b", "NUL"),
    ("x" * 4097, "4097 bytes long"),
    ("é" * 2049, "4098 bytes long"),
    ("d/" + "x" * 256, "over 255 bytes"),
    ("\udcff", "not valid UTF-8"),
]


@pytest.mark.parametrize(("name", "match"), BAD_NAMES)
def test_bad_names_are_refused(name: str, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        check_file_name(name)
    with pytest.raises(LocalProtocolError, match=match):
        link_at(State.MANIFEST).source.send(Manifest(BS, (FileEntry(0, name, 0),)))
    refused(link_at(State.MANIFEST).dest, manifest_frame([entry(name=name)]), match)


@pytest.mark.parametrize("name", ["disk.img", "a/b/c.qcow2", "..a", "a..", ".hidden/x", "é/日本",
                                  "back\\slash", "x" * 255])
def test_good_names(name: str) -> None:
    assert check_file_name(name) == name


@pytest.mark.parametrize(
    ("files", "block_size", "match"),
    [
        ([entry(0, "a"), entry(0, "b")], BS, "file_id 0 twice"),
        ([entry(0, "a"), entry(1, "a")], BS, "'a' twice"),
        ([entry(0, "a"), entry(1, "a/b")], BS, "'a' is both a file and a directory"),
        ([entry(0, "a/b/c"), entry(1, "a-"), entry(2, "a/b")], BS, "both a file and a dir"),
        ([entry(i, f"f{i}") for i in range(MAX_FILES + 1)], BS, "1025 files, more than 1024"),
        ([entry(MAX_FILES)], BS, "file_id 1024 is outside"),
        ([entry(-1)], BS, "file_id -1 is outside"),
        ([entry(size=MAX_FILE_SIZE + 1)], BS, "outside 0..1125899906842624"),
        ([entry(size=-1)], BS, "is outside"),
        ([entry(size=1.5)], BS, "integer, not float"),
        ([entry(file_id=False)], BS, "integer, not bool"),
        ([entry(name=7)], BS, "must be a string, not int"),
        ([entry() | {"mode": 420}], BS, "unexpected keys"),
        ([{"file_id": 0, "name": "a", "allocated": 0}], BS, "lacks size"),
        ([{"file_id": 0, "name": "a", "size": 1}], BS, "lacks allocated"),
        ([["a"]], BS, "must be a JSON object, not list"),
        ([], 3000, "outside 4096..1048576"),
        ([], 2 * 2**20, "outside 4096..1048576"),
        ([], 12288, "not a power of two"),
        ([], True, "integer, not bool"),
    ],
)
def test_bad_manifests(files: list[dict[str, object]], block_size: object, match: str) -> None:
    refused(link_at(State.MANIFEST).dest, manifest_frame(files, block_size), match)


def test_manifest_needs_a_tuple_of_entries_to_send() -> None:
    with pytest.raises(ProtocolError, match="tuple of FileEntry"):
        encode(Manifest(BS, [FileEntry(0, "a", 0)]))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="not a FileEntry"):
        encode(Manifest(BS, (("a", 0),)))  # type: ignore[arg-type]


def test_sizes_are_read_only() -> None:
    conn = link_at(State.COPYING).dest
    with pytest.raises(TypeError):
        conn.sizes[0] = 1  # type: ignore[index]


def test_manifest_files_must_be_a_list() -> None:
    raw = frame(FrameType.MANIFEST, {"block_size": BS, "files": {"0": "a"}, "migration": "",
                                     "delta": False, "replica": False, "lineage": "",
                       "lineage_files": [], "vm": "", "vm_name": "", "generation": 0})
    refused(link_at(State.MANIFEST).dest, raw, "must be a list")


def test_empty_manifest_and_largest_manifest_are_fine() -> None:
    assert decode(encode(Manifest(BS, ()))) == Manifest(BS, ())
    files = tuple(FileEntry(i, f"dir/{i:04}-" + "n" * 240, MAX_FILE_SIZE) for i in range(MAX_FILES))
    assert decode(encode(Manifest(2**20, files))).files == files


# -- sizes: a peer that lies about them ---------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (Blocks(0, 3, data(BS)), "end at byte 16384, past its size 12388"),
        (Blocks(0, 4, data(BS)), "past its size"),
        (Blocks(0, 2**63, data(BS)), "past its size"),
        (Blocks(1, 2, data(BS)), "past its size 8192"),
        (Blocks(7, 0, data(BS)), "file_id 7 is not in the manifest"),
        (Blocks(0, 0, data(100)), "carry 100 bytes: not whole blocks"),
        (Blocks(0, 1, data(BS + 1)), "not whole blocks"),
        (Blocks(0, 0, b""), "carry no data"),
        (Resize(9, 0), "file_id 9 is not in the manifest"),
    ],
)
def test_lying_about_sizes(event: Event, match: str) -> None:
    refused(link_at(State.COPYING).dest, encode(event), "peer lies about sizes: .*" + match)


def test_resize_moves_the_limit_both_ways() -> None:
    link = link_at(State.COPYING)
    link.send(link.source, Resize(1, BS + 1))
    assert link.dest.sizes[1] == link.source.sizes[1] == BS + 1
    link.send(link.source, Blocks(1, 1, b"x"))  # the new tail
    refused(link.dest, encode(Blocks(1, 1, data(BS))), "peer lies about sizes")


def test_resize_beyond_the_limit() -> None:
    raw = frame(FrameType.RESIZE, {"file_id": 0, "size": MAX_FILE_SIZE + 1})
    refused(link_at(State.COPYING).dest, raw, "Resize.size 1125899906842625 is outside")
    with pytest.raises(LocalProtocolError, match="outside"):
        link_at(State.COPYING).source.send(Resize(0, MAX_FILE_SIZE + 1))


def test_blocks_over_8_mib_are_refused() -> None:
    raw = HEADER.pack(FrameType.BLOCKS, 12 + MAX_BLOCKS_DATA + 1) + bytes(12 + MAX_BLOCKS_DATA + 1)
    refused(link_at(State.COPYING).dest, raw, "more than 8 MiB")


def test_short_blocks_frame() -> None:
    d = link_at(State.COPYING).dest
    refused(d, frame(FrameType.BLOCKS, b"\0" * 11), "shorter than its header")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (encode(Digests(0, 0, (1, 2, 3))), "lies about sizes: Digests for file 0 reach block 2"),
        (encode(Digests(1, 3, (1, 2))), "reach block 4, it has 4 blocks"),
        (encode(Digests(5, 0, (1,))), "file_id 5 is not in the manifest"),
        (frame(FrameType.DIGESTS, b"\0" * 15), "shorter than its header"),
        (frame(FrameType.DIGESTS, bytes(12) + b"\0\0\0\2" + bytes(8)), "2 digests but carries 8"),
        (frame(FrameType.DIGESTS, bytes(12) + b"\0\0\0\0"), "number of digests 0 is outside"),
        (frame(FrameType.DIGESTS, bytes(12) + (MAX_DIGESTS_PER_FRAME + 1).to_bytes(4, "big")),
         "number of digests 65537 is outside"),
        (encode(ZeroDigests(0, 1, 2)), "lies about sizes: ZeroDigests for file 0 reach block 2"),
        (encode(ZeroDigests(1, 0, 5)), "reach block 4, it has 4 blocks"),
        (encode(ZeroDigests(5, 0, 1)), "file_id 5 is not in the manifest"),
        (frame(FrameType.ZERO_DIGESTS, b'{"file_id":0,"first_block":0,"count":0}'),
         "ZeroDigests.count 0 is outside"),
    ],
)
def test_bad_digests(raw: bytes, match: str) -> None:
    refused(link_at(State.VERIFYING).dest, raw, match)


def test_digests_limits_on_send() -> None:
    with pytest.raises(ProtocolError, match="65537"):
        encode(Digests(0, 0, (0,) * (MAX_DIGESTS_PER_FRAME + 1)))
    with pytest.raises(ProtocolError, match=r"0\.\.2\*\*64-1"):
        encode(Digests(0, 0, (2**64,)))
    assert len(encode(Digests(0, 0, (0,) * MAX_DIGESTS_PER_FRAME))) < MAX_PAYLOAD


# -- strict JSON -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "kind", "payload", "match"),
    [
        (State.COPYING, FrameType.ROUND_DONE, {"round": True, "blocks": 0, "bytes": 0},
         "round must be an integer, not bool"),
        (State.COPYING, FrameType.RESIZE, {"file_id": 0, "size": True}, "integer, not bool"),
        (State.COPYING, FrameType.RESIZE, {"file_id": 0, "size": 1.0}, "integer, not float"),
        (State.COPYING, FrameType.RESIZE, {"file_id": "0", "size": 1}, "integer, not str"),
        (State.COPYING, FrameType.ROUND_DONE, {"round": 0, "blocks": 0}, "lacks bytes"),
        (State.COPYING, FrameType.ROUND_DONE, {"round": 0, "blocks": 0, "bytes": 0, "x": 1},
         r"unexpected keys \['x'\]"),
        (State.READY, FrameType.READY, {"now": True}, "unexpected keys"),
        (State.ROUND_END, FrameType.ROUND_ACK, b'{"round":0,"round":0}', "a key twice"),
        (State.ROUND_END, FrameType.ROUND_ACK, b"[0]", "must be a JSON object, not list"),
        (State.ROUND_END, FrameType.ROUND_ACK, b"round 0", "not a JSON object"),
        (State.ROUND_END, FrameType.ROUND_ACK, b"", "not a JSON object"),
        (State.ROUND_END, FrameType.ROUND_ACK, b'{"round":0}x', "not a JSON object"),
        (State.ROUND_END, FrameType.ROUND_ACK, b'{"round":1' + b"0" * 5000 + b"}", "not a JSON"),
        (State.ROUND_END, FrameType.ROUND_ACK, b"\xff\xfe{}", "not a JSON object"),
        (State.ROUND_END, FrameType.ROUND_ACK, b"[" * 100_000, "not a JSON object"),
        (State.RESUMING, FrameType.RESUMED, b'{"ms":NaN}', "NaN, which is not JSON"),
        (State.RESUMING, FrameType.RESUMED, b'{"ms":-Infinity}', "Infinity, which is not"),
        (State.RESUMING, FrameType.RESUMED, b'{"ms":1e999}', "finite number"),
        (State.RESUMING, FrameType.RESUMED, b'{"ms":-1.5}', "finite number"),
        (State.RESUMING, FrameType.RESUMED, b'{"ms":1' + b"0" * 400 + b"}", "finite number"),
        (State.RESUMING, FrameType.RESUMED, b'{"ms":false}', "finite number"),
        (State.VERDICT, FrameType.VERIFIED, {"ok": 1, "mismatches": 0, "detail": ""},
         "ok must be a bool, not int"),
        (State.VERDICT, FrameType.VERIFIED, {"ok": True, "mismatches": 2, "detail": ""},
         "ok with 2 mismatches"),
        (State.VERDICT, FrameType.VERIFIED, {"ok": False, "mismatches": 1, "detail": "x" * 1001},
         "1001 characters long"),
        (State.COPYING, FrameType.ABORT, {"reason": None, "owner_generation": -1, "code": ""},
         "must be a string, not NoneType"),
        (State.COPYING, FrameType.ABORT, b'{"reason":"\\ud800","owner_generation":-1,"code":""}',
         "not valid UTF-8"),
        (State.COPYING, FrameType.ABORT, {"reason": "x", "owner_generation": -1,
                                          "code": "gone-fishing"}, "Abort.code"),
        (State.COPYING, FrameType.ABORT, {"reason": "x", "owner_generation": -2, "code": ""},
         "outside -1"),
        (State.AUTH, FrameType.AUTH, {"mac": "00" * 31}, "must be 32 bytes"),
    ],
)
def test_strict_json(state: State, kind: FrameType, payload: bytes | dict[str, object],
                     match: str) -> None:
    link = link_at(state)
    from_dest = (FrameType.READY, FrameType.ROUND_ACK, FrameType.RESUMED, FrameType.VERIFIED)
    receiver = link.source if kind in from_dest else link.dest
    refused(receiver, frame(kind, payload), match)


def test_resumed_accepts_a_json_integer() -> None:
    link = link_at(State.RESUMING)
    assert feed(link.source, frame(FrameType.RESUMED, {"ms": 12})) == [Resumed(12.0)]


# -- abort -------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [State.HELLO, State.AUTH, State.READY, State.ROUND_END,
                                   State.SWITCHOVER, State.VERDICT])
@pytest.mark.parametrize("who", ["source", "dest"])
def test_abort_from_either_side(state: State, who: str) -> None:
    link = link_at(state)
    sender = link.side(who)
    receiver = link.dest if sender is link.source else link.source
    assert link.send(sender, Abort("disk full")) == [Abort("disk full")]
    assert sender.state is receiver.state is State.ABORTED
    for conn in (sender, receiver):
        with pytest.raises(LocalProtocolError, match="ABORTED"):
            conn.send(Abort("again"))
        with pytest.raises(ProtocolError, match=r"aborted: .*'disk full'"):
            conn.next_event()
        with pytest.raises(ProtocolError, match="aborted"):
            conn.receive_data(b"x")


def test_frames_before_an_abort_still_come_out() -> None:
    link = link_at(State.COPYING)
    s = link.source
    raw = s.send(Resize(0, 0)) + s.send(Abort("bye"))
    assert feed(link.dest, raw) == [Resize(0, 0), Abort("bye")]


def test_abort_may_still_be_sent_after_a_peer_error() -> None:
    link = link_at(State.COPYING)
    with pytest.raises(RemoteProtocolError):
        feed(link.dest, b"garbage!")
    why = Abort.about("you sent garbage")
    assert feed(link.source, link.dest.send(why)) == [why]
    assert link.dest.state is State.ERROR
    assert link.source.state is State.ABORTED


def test_abort_about_always_encodes() -> None:
    event = Abort.about("name \udcff " + "x" * 5000)
    assert len(event.reason) == MAX_REASON
    assert decode(encode(event)) == event


# -- encoders: round trips ---------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@given(u32, u64, st.binary(min_size=1, max_size=20_000))
def test_blocks_round_trip(file_id: int, first: int, payload: bytes) -> None:
    event = Blocks(file_id, first, payload)
    raw = encode(event)
    assert len(raw) == HEADER.size + 12 + len(payload)
    assert decode(raw) == event


@given(u32, u64, st.lists(u64, min_size=1, max_size=300))
def test_digests_round_trip(file_id: int, first: int, digests: list[int]) -> None:
    event = Digests(file_id, first, tuple(digests))
    assert decode(encode(event)) == event


component = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"),
                    min_size=1, max_size=20).filter(lambda c: c not in (".", ".."))
name = st.lists(component, min_size=1, max_size=4).map("/".join)


@given(st.sampled_from([2**k for k in range(12, 21)]),
       st.lists(st.tuples(st.integers(0, MAX_FILES - 1), name, st.integers(0, MAX_FILE_SIZE)),
                max_size=20, unique_by=(lambda t: t[0], lambda t: t[1])))
def test_manifest_round_trip(block_size: int, rows: list[tuple[int, str, int]]) -> None:
    manifest = Manifest(block_size, tuple(FileEntry(*row) for row in rows))
    try:
        check_event(manifest)
    except ProtocolError as exc:
        assume("both a file and a directory" not in str(exc))
        raise
    assert decode(encode(manifest)) == manifest
    link = link_at(State.MANIFEST)
    assert link.send(link.source, manifest) == [manifest]
    assert dict(link.dest.sizes) == {f: size for f, _, size in rows}


control_events = st.one_of(
    st.builds(RoundDone, st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1),
              st.integers(0, 2**63 - 1)),
    st.builds(Resize, u32, st.integers(0, MAX_FILE_SIZE)),
    st.builds(Resumed, st.floats(0, 1e12)),
    st.builds(Verified, st.just(False), st.integers(0, 2**63 - 1),
              st.text(st.characters(blacklist_categories=("Cs",)), max_size=MAX_REASON)),
    st.builds(Abort, st.text(st.characters(blacklist_categories=("Cs",)), max_size=MAX_REASON)),
    st.builds(Hello, st.just(V), st.sampled_from(["source", "dest"]), st.binary(min_size=32,
                                                                               max_size=32)),
    st.builds(Auth, st.binary(min_size=32, max_size=32)),
)


@given(control_events)
def test_control_round_trip(event: Event) -> None:
    assert decode(encode(event)) == event


def test_wire_format_is_fixed() -> None:
    assert encode(RoundAck(3)) == b"\x08\x00\x00\x00\x0b" + b'{"round":3}'
    assert encode(Ready()) == b"\x04\x00\x00\x00\x02{}"
    assert encode(Blocks(2, 5, b"ab")) == (b"\x05\x00\x00\x00\x0e" + b"\x00\x00\x00\x02"
                                          + b"\x00" * 7 + b"\x05ab")
    assert encode(Digests(1, 0, (7,))) == (b"\x0c\x00\x00\x00\x18\x00\x00\x00\x01" + bytes(8)
                                           + b"\x00\x00\x00\x01" + bytes(7) + b"\x07")
    assert encode(Manifest(BS, (FileEntry(0, "é", 1),))) == frame(FrameType.MANIFEST, (
        '{"block_size":4096,"files":[{"file_id":0,"name":"é","size":1,"allocated":0}],"migration":"","delta":false,"replica":false,"lineage":"","lineage_files":[],"vm":"","vm_name":"","generation":0}'
        .encode()))
    assert encode(Commit(7)) == b"\x0a\x00\x00\x00\x1b" + b'{"generation":7,"attrs":[]}'


def test_a_manifest_too_big_for_a_frame_is_refused_on_send() -> None:
    name = "/".join(["\x01" * 250] * 16)  # 4015 bytes, six times that as JSON escapes
    files = tuple(FileEntry(i, f"{i:04}{name}", 0) for i in range(MAX_FILES))
    with pytest.raises(ProtocolError, match="more than 8388672"):
        encode(Manifest(BS, files))


def test_decode_wants_exactly_one_frame() -> None:
    raw = encode(Ready())
    with pytest.raises(ProtocolError, match="at least 5 bytes"):
        decode(raw[:3])
    with pytest.raises(ProtocolError, match="says 2 payload bytes, has 3"):
        decode(raw + b"x")


BIG_BS = 64 << 10
BIG_MANIFEST = Manifest(BIG_BS, (FileEntry(0, "disk.img", 64 * BIG_BS),
                                 FileEntry(1, "vm.mem", 16 * BIG_BS + 7)))
BIG_FRAMES: list[Event] = [
    Blocks(0, 0, data(16 * BIG_BS, 1)),  # 1 MiB: received into a buffer of its own
    Blocks(1, 0, data(BIG_BS, 2)),  # small: the usual path
    Zero(0, 16, 8),
    Blocks(0, 24, data(8 * BIG_BS, 3)),  # 512 KiB, right after a small frame
    Blocks(0, 32, data(32 * BIG_BS, 4)),  # 2 MiB, right after a big one
    Blocks(1, 4, data(12 * BIG_BS + 7, 5)),  # a big tail: ends at the end of the file
    RoundDone(0, 96, 0),
]


def _big_link(sealed: bool = False) -> tuple[Connection, Connection]:
    s = Connection("source", KEY, nonce=S_NONCE, sealed=sealed)
    d = Connection("dest", KEY, nonce=D_NONCE, sealed=sealed)
    for a, b in ((s, d), (d, s)):
        feed(b, a.send(a.hello_event()))
    for a, b in ((s, d), (d, s)):
        feed(b, a.send(a.auth_event()))
    feed(d, s.send(BIG_MANIFEST))
    feed(s, d.send(Ready()))
    return s, d


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False), st.booleans())
def test_big_blocks_frames_arrive_whole_however_split(rnd: random.Random, sealed: bool) -> None:
    """Blocks frames of 256 KiB or more gather their data in a buffer of their own: every
    event comes out equal and in order, whatever the read sizes, frames back to back."""
    s, d = _big_link(sealed)
    raw = b"".join(s.send(e) for e in BIG_FRAMES)
    cuts = sorted(rnd.sample(range(1, len(raw)), rnd.randint(0, 40)))
    for i in range(rnd.randint(0, 5)):  # cuts right at and around a big frame's header
        cuts.append(min(len(raw) - 1, HEADER.size + 12 * (i + 1)))
    cuts = sorted(set(cuts))
    pieces = [raw[i:j] for i, j in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    got = []
    for piece in pieces:
        d.receive_data(piece)
        got += drain(d)
    assert got == BIG_FRAMES
    assert d.state is State.ROUND_END


def test_a_peer_gone_in_the_middle_of_a_big_frame_is_an_error() -> None:
    s, d = _big_link()
    raw = s.send(BIG_FRAMES[0])
    d.receive_data(raw[: len(raw) // 2])
    assert d.next_event() is NEED_DATA
    d.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        d.next_event()


def test_packed_frames_round_trip_where_blocks_go_and_lies_are_refused() -> None:
    s, d = _big_link()
    ev = Packed(0, 2, 1, 2 * BIG_BS, b"compressed bytes")
    assert decode(encode(ev)) == ev
    assert feed(d, s.send(ev)) == [ev]  # COPYING
    tail = Packed(1, 16, 2, 7, b"x")  # the file's tail: not a whole block, ends at its end
    assert feed(d, s.send(tail)) == [tail]
    for bad, why in ((Packed(0, 63, 1, 2 * BIG_BS, b"z"), "past its size"),
                     (Packed(0, 0, 1, BIG_BS + 1, b"z"), "not whole blocks")):
        with pytest.raises(LocalProtocolError, match=why):
            s.send(bad)
    for bad, why in ((Packed(0, 0, 0, BIG_BS, b"z"), "codec"),
                     (Packed(0, 0, 1, 0, b"z"), "size"),
                     (Packed(0, 0, 1, BIG_BS, b""), "not empty")):
        with pytest.raises(ProtocolError, match=why):
            encode(bad)
    # a peer that states a size past the file is refused on receipt too
    lie = HEADER.pack(FrameType.PACKED, 18) + struct.pack(">IQBI", 0, 63, 1, 2 * BIG_BS) + b"z"
    d.receive_data(lie)
    with pytest.raises(RemoteProtocolError, match="past its size"):
        d.next_event()


def test_pages_frames_round_trip_where_blocks_go_and_lies_are_refused() -> None:
    s, d = _big_link()
    ev = Pages(0, ((4096, 4096), (3 * 4096, 8)), b"p" * 4104)
    assert decode(encode(ev)) == ev
    assert feed(d, s.send(ev)) == [ev]  # COPYING
    packed = Pages(0, ((0, 4096),), b"compressed", codec=1)
    assert feed(d, s.send(packed)) == [packed]
    size = BIG_MANIFEST.files[0].size
    with pytest.raises(LocalProtocolError, match="past its size"):
        s.send(Pages(0, ((size - 4, 8),), b"x" * 8))
    for bad, why in ((Pages(0, (), b"x"), "1 to"),
                     (Pages(0, ((8, 4), (4, 4)), b"x" * 8), "ascend"),
                     (Pages(0, ((0, 4), (2, 4)), b"x" * 8), "ascend"),
                     (Pages(0, ((0, 0),), b"x"), "length"),
                     (Pages(0, ((0, 4),), b"xyz"), "for ranges of 4"),
                     (Pages(0, ((0, 4),), b""), "not empty")):
        with pytest.raises(ProtocolError, match=why):
            encode(bad)
    # a peer that writes past the file is refused on receipt too
    lie = (HEADER.pack(FrameType.PAGES, 9 + 12 + 8) + struct.pack(">IBI", 0, 0, 1)
           + struct.pack(">QI", size - 4, 8) + b"x" * 8)
    d.receive_data(lie)
    with pytest.raises(RemoteProtocolError, match="past its size"):
        d.next_event()


def _delta_link() -> Link:
    link = Link()
    link.run(until=State.MANIFEST)
    man = Manifest(BS, FILES, "m", delta=True)
    assert link.send(link.source, man) == [man]
    return link


def test_held_frames_answer_a_manifest_that_asks_and_come_before_ready() -> None:
    link = _delta_link()
    held = Held(0, 0, (1, 2, 3, 4))
    assert decode(encode(held)) == held and type(decode(encode(held))) is Held
    assert link.send(link.dest, held) == [held]
    assert link.send(link.dest, Held(1, 1, (9,))) == [Held(1, 1, (9,))]
    assert link.send(link.dest, Ready()) == [Ready()]
    with pytest.raises(LocalProtocolError, match="Held in state COPYING"):
        link.dest.send(held)


def test_held_frames_are_refused_unasked_and_past_the_file() -> None:
    link = link_at(State.READY)  # the Manifest did not ask
    refused(link.source, encode(Held(0, 0, (1,))), "answer a Manifest that asks")
    link = _delta_link()
    refused(link.source, encode(Held(0, 3, (1, 2))), "reach block 4, it has 4 blocks")


def test_held_zero_runs_come_with_held_and_obey_its_rules() -> None:
    """A thin image's holes held at the destination: one frame a run, in the delta's place
    (READY), only when asked, never past the file."""
    link = _delta_link()
    run = HeldZero(0, 0, 2)
    assert decode(encode(run)) == run and type(decode(encode(run))) is HeldZero
    assert link.send(link.dest, run) == [run]
    assert link.send(link.dest, Held(0, 2, (9,))) == [Held(0, 2, (9,))]
    assert link.send(link.dest, Ready()) == [Ready()]
    with pytest.raises(LocalProtocolError, match="HeldZero in state COPYING"):
        link.dest.send(run)
    refused(link_at(State.READY).source, encode(HeldZero(0, 0, 1)), "answer a Manifest")
    refused(_delta_link().source, encode(HeldZero(0, 3, 2)),
            "HeldZero for file 0 reach block 4, it has 4 blocks")


def _replica_link() -> Link:
    link = Link()
    link.run(until=State.MANIFEST)
    man = Manifest(BS, FILES, "s", delta=True, replica=True)
    assert link.send(link.source, man) == [man]
    assert decode(encode(man)) == man
    link.send(link.dest, Ready())
    return link


def test_a_replica_session_is_never_switched_over_to() -> None:
    """migrator sync: rounds as long as it runs, and no Switchover, ever (so no Postcopy, no
    Commit: the destination's replica is never runnable)."""
    event = Switchover()
    link = _replica_link()
    link.send(link.source, Blocks(0, 0, data(BS)))
    link.send(link.source, RoundDone(4, 1, BS))
    assert link.send(link.dest, RoundAck(4)) == [RoundAck(4)]
    with pytest.raises(LocalProtocolError, match="a replica is never switched over to"):
        link.source.send(event)
    refused(link.dest, encode(event), "a replica is never switched over to")


def test_manifest_replica_must_be_a_bool() -> None:
    link = link_at(State.MANIFEST)
    bad = {"block_size": BS, "files": [], "migration": "", "delta": False, "replica": 1,
           "lineage": "", "lineage_files": [], "vm": "", "vm_name": "", "generation": 0}
    refused(link.dest, frame(FrameType.MANIFEST, bad), "Manifest.replica must be true or false")


def _lineage_link(files: tuple[int, ...] = (0,)) -> Link:
    link = Link()
    link.run(until=State.MANIFEST)
    man = Manifest(BS, FILES, "m", delta=True, lineage="s@3", lineage_files=files)
    assert link.send(link.source, man) == [man] and decode(encode(man)) == man
    return link


def test_lineage_answers_a_manifest_that_names_a_replica_once_before_held() -> None:
    link = _lineage_link((0, 1))
    lin = Lineage((1,), "disk.img: written here since the sync")
    assert decode(encode(lin)) == lin
    assert link.send(link.dest, lin) == [lin]
    assert link.send(link.dest, Held(0, 0, (1,))) == [Held(0, 0, (1,))]
    assert link.send(link.dest, Ready()) == [Ready()]
    link = _lineage_link()
    link.send(link.dest, Held(0, 0, (1,)))
    refused(link.source, encode(Lineage((), "")), "Lineage twice, or after Held")


def test_a_destination_cannot_accept_what_the_source_did_not_vouch_for() -> None:
    refused(_lineage_link((0,)).source, encode(Lineage((1,), "")), "did not vouch for")
    refused(link_at(State.READY).source, encode(Lineage((), "")),
            "answers a Manifest that names a replica")
    with pytest.raises(ProtocolError, match="lineage_files without a lineage"):
        encode(Manifest(BS, FILES, "m", lineage_files=(0,)))
    with pytest.raises(ProtocolError, match="not in the manifest"):
        encode(Manifest(BS, FILES, "m", lineage="s@1", lineage_files=(7,)))
    with pytest.raises(ProtocolError, match="names a file twice"):
        encode(Lineage((0, 0), ""))


@pytest.mark.parametrize(("changes", "match"), [
    ({"vm": "../x"}, "is not a VM id"),
    ({"vm": ".hidden"}, "is not a VM id"),
    ({"vm": "v" * 65}, "more than 64"),
    ({"vm_name": 7}, "must be a string"),
    ({"generation": True}, "must be an integer"),
    ({"generation": -1}, "outside 0"),
])
def test_the_manifest_s_vm_is_checked(changes: dict[str, object], match: str) -> None:
    raw = frame(FrameType.MANIFEST, {"block_size": BS, "files": [], "migration": "",
                                     "delta": False, "replica": False, "lineage": "",
                                     "lineage_files": [], "vm": "v1", "vm_name": "web",
                                     "generation": 3, **changes})
    refused(link_at(State.MANIFEST).dest, raw, match)


def test_every_frame_has_a_row_and_the_special_rows_are_rows() -> None:
    """state.py is the one place of the rules: a new frame needs its rows in TABLE, and the
    each-side-once and post-copy-only sets (and RULES) only qualify frames the table has."""
    from migrator.protocol.events import EVENT_OF
    from migrator.protocol.state import EACH_SIDE_ONCE, POSTCOPY_ONLY, RULES, TABLE

    sent = {cls for (_st, _who, cls) in TABLE}
    assert sent == set(EVENT_OF.values()), set(EVENT_OF.values()) ^ sent
    pairs = {(st, cls) for (st, _who, cls) in TABLE}
    assert pairs >= EACH_SIDE_ONCE and pairs >= POSTCOPY_ONLY
    assert set(RULES) <= sent
