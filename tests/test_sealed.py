"""Sealed frames (pure): no plaintext on the wire, and every change on the way refused as one.

The attacker here sits on the path and knows the protocol but not the shared key: it reads
the bytes, and may change, drop, replay, reorder, cut or reflect frames.  Each must end the
session at the frame it touched, with a TamperedError, before that frame's event comes out.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.protocol import (
    BIG_DATA,
    HEADER,
    NEED_DATA,
    TAG_SIZE,
    Abort,
    Blocks,
    Connection,
    FileEntry,
    LocalProtocolError,
    Manifest,
    Ready,
    RemoteProtocolError,
    RoundDone,
    State,
    TamperedError,
    frame_key,
)
from tests.test_protocol import BS, D_NONCE, KEY, MANIFEST, S_NONCE, Link, data, feed

PATTERN = b"the VM wrote this secret page!!!" * (BS // 32)  # one block of a known pattern


def copying() -> Link:
    link = Link(sealed=True)
    link.run(until=State.COPYING)
    return link


def frames_of(conn: Connection, *events: object) -> list[bytes]:
    return [bytes(conn.send(ev)) for ev in events]  # type: ignore[arg-type]


def tampered(conn: Connection, raw: bytes) -> None:
    """`raw` is refused as tampering, nothing of it comes out, and the connection is over."""
    with pytest.raises(TamperedError, match="tampered with or corrupted"):
        feed(conn, raw)
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_no_plaintext_on_the_wire() -> None:
    """Neither the VM's data nor the file names are in the bytes (8 of 8 times before)."""
    link = Link(sealed=True)
    wire = []
    link.run(until=State.MANIFEST)
    wire.append(bytes(link.source.send(MANIFEST)))
    assert feed(link.dest, wire[-1]) == [MANIFEST]
    feed(link.source, link.dest.send(Ready()))
    for i in range(3):
        ev = Blocks(0, i, PATTERN)
        wire.append(bytes(link.source.send(ev)))
        assert feed(link.dest, wire[-1]) == [ev]
    raw = b"".join(wire)
    assert PATTERN[:16] not in raw and b"disk.img" not in raw and b"mem.bin" not in raw
    # the same session in clear shows both: the check would see a leak
    clear = Link()
    clear.run(until=State.MANIFEST)
    assert b"disk.img" in clear.source.send(MANIFEST)


def test_identical_frames_are_sealed_differently() -> None:
    link = copying()
    a, b = frames_of(link.source, Blocks(0, 0, PATTERN), Blocks(0, 0, PATTERN))
    assert a[:HEADER.size] == b[:HEADER.size] and a != b  # the nonce is the frame's number
    assert len(a) == HEADER.size + 12 + len(PATTERN) + TAG_SIZE


def _flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:]


@pytest.mark.parametrize("where", ["type", "length", "payload", "tag"])
def test_a_flipped_bit_anywhere_is_tampering(where: str) -> None:
    link = copying()
    first, second = frames_of(link.source, Blocks(0, 0, PATTERN), RoundDone(0, 1, BS))
    at = {"type": 0, "length": 4, "payload": HEADER.size + 20, "tag": len(first) - 1}[where]
    # a longer length swallows the next frame's first byte: the tag is checked there
    tampered(link.dest, _flip(first, at) + second)


def test_a_dropped_frame_is_tampering() -> None:
    link = copying()
    _first, second = frames_of(link.source, Blocks(0, 0, PATTERN), Blocks(0, 1, PATTERN))
    tampered(link.dest, second)


def test_a_replayed_frame_is_tampering() -> None:
    link = copying()
    (first,) = frames_of(link.source, Blocks(0, 0, PATTERN))
    assert feed(link.dest, first) == [Blocks(0, 0, PATTERN)]
    tampered(link.dest, first)


def test_a_reordered_pair_is_tampering() -> None:
    link = copying()
    first, second = frames_of(link.source, Blocks(0, 0, PATTERN), Blocks(0, 1, PATTERN))
    tampered(link.dest, second + first)


def test_a_cut_frame_is_tampering() -> None:
    """Shortened with its length fixed to match (a cut the framing cannot see)."""
    link = copying()
    (first,) = frames_of(link.source, Blocks(0, 0, PATTERN))
    short = HEADER.size + 12 + BS // 2 + TAG_SIZE
    cut = HEADER.pack(first[0], short - HEADER.size) + first[HEADER.size:short]
    tampered(link.dest, cut)


def test_a_reflected_frame_is_tampering() -> None:
    """Each direction has its own key: the source's frame sent back to it fails."""
    link = copying()
    (first,) = frames_of(link.source, RoundDone(0, 0, 0))
    tampered(link.source, first)


def test_a_frame_from_another_session_is_tampering() -> None:
    """Same key, other nonces: the keys differ, so an old session's frames do not replay."""
    old = Link(sealed=True)
    old.run(until=State.COPYING)
    (first,) = frames_of(old.source, Blocks(0, 0, PATTERN))
    link = Link(sealed=True)
    link.source = Connection("source", KEY, nonce=bytes(32), sealed=True)
    link.run(until=State.COPYING)
    tampered(link.dest, first)


def test_frame_keys_differ_by_direction_session_and_key() -> None:
    k = frame_key(KEY, S_NONCE, D_NONCE, "source")
    assert len(k) == 32
    assert k != frame_key(KEY, S_NONCE, D_NONCE, "dest")
    assert k != frame_key(KEY, D_NONCE, S_NONCE, "source")
    assert k != frame_key(b"another shared key, 32 bytes...", S_NONCE, D_NONCE, "source")
    assert k == frame_key(KEY, S_NONCE, D_NONCE, "source")


def test_hello_and_auth_go_in_clear_and_the_rest_sealed() -> None:
    link = Link(sealed=True)
    s = link.source
    hello = s.send(s.hello_event())
    assert b'"sealed":true' in hello
    feed(s, link.dest.send(link.dest.hello_event()))
    assert s.send(s.auth_event())[0] == 2  # Auth, in clear (JSON follows)
    assert s.seal(b"\x03\x00\x00\x00\x00") != b"\x03\x00\x00\x00\x00"


@pytest.mark.parametrize("source_sealed", [True, False])
def test_both_sides_must_agree_on_sealing(source_sealed: bool) -> None:
    s = Connection("source", KEY, nonce=S_NONCE, sealed=source_sealed)
    d = Connection("dest", KEY, nonce=D_NONCE, sealed=not source_sealed)
    to_d, to_s = s.send(s.hello_event()), d.send(d.hello_event())
    for conn, raw in ((d, to_d), (s, to_s)):
        with pytest.raises(RemoteProtocolError, match="--insecure-plaintext, or neither"):
            feed(conn, raw)


def test_an_abort_after_tampering_is_sealed_and_reaches_the_peer() -> None:
    link = copying()
    (first,) = frames_of(link.source, Blocks(0, 0, PATTERN))
    tampered(link.dest, _flip(first, HEADER.size))
    reason = Abort.about("the connection was tampered with or corrupted")
    raw = link.dest.send(reason)
    assert b"tampered" not in raw
    assert feed(link.source, raw) == [reason]
    with pytest.raises(LocalProtocolError):
        link.dest.send(RoundDone(0, 1, BS))


BIG = Manifest(BS, (FileEntry(0, "disk.img", 1024 * BS),))


def _big_copying() -> Link:
    link = Link(sealed=True)
    link.run(until=State.MANIFEST)
    feed(link.dest, link.source.send(BIG))
    feed(link.source, link.dest.send(Ready()))
    return link


@pytest.mark.parametrize("at", [0, HEADER.size + 3, BIG_DATA, -1])
def test_big_frames_are_checked_whole_before_they_come_out(at: int) -> None:
    """Frames of BIG_DATA and more are gathered in a buffer of their own: checked the same."""
    link = _big_copying()
    ev = Blocks(0, 0, data(128 * BS))
    (raw,) = frames_of(link.source, ev)
    assert len(raw) > BIG_DATA
    raw = _flip(raw, at if at >= 0 else len(raw) + at)
    link.dest.receive_data(raw[:100_000])
    assert link.dest.next_event() is NEED_DATA  # while it gathers
    with pytest.raises(TamperedError):
        feed(link.dest, raw[100_000:])


def test_big_frames_come_out_whole_and_equal() -> None:
    link = _big_copying()
    evs = [Blocks(0, 0, data(128 * BS)), Blocks(0, 128, data(100 * BS, 3))]
    raw = b"".join(frames_of(link.source, *evs))
    got = feed(link.dest, raw, lambda b: [b[i:i + 65536] for i in range(0, len(b), 65536)])
    assert got == evs and type(got[0].data) is bytearray  # type: ignore[union-attr]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_change_to_the_stream_is_refused_or_changes_nothing(draw: st.DataObject) -> None:
    """Overwrite, insert or delete bytes anywhere after the handshake: the events that come
    out are a prefix of those sent, and a change always ends in TamperedError (or, when it
    cuts the stream short, in waiting for more)."""
    link = copying()
    events = [Blocks(0, 0, data(2 * BS)), Blocks(1, 0, PATTERN), RoundDone(0, 3, 3 * BS)]
    raw = bytearray(b"".join(frames_of(link.source, *events)))
    original = bytes(raw)
    at = draw.draw(st.integers(0, len(raw) - 1))
    match draw.draw(st.sampled_from(["overwrite", "insert", "delete"])):
        case "overwrite":
            raw[at] = draw.draw(st.integers(0, 255))
        case "insert":
            raw[at:at] = draw.draw(st.binary(min_size=1, max_size=8))
        case "delete":
            del raw[at:at + draw.draw(st.integers(1, 8))]
    got: list[object] = []
    try:
        got = feed(link.dest, bytes(raw))
    except TamperedError:
        assert bytes(raw) != original
        assert link.dest.state is State.ERROR
        return
    assert got == events[:len(got)]
    assert bytes(raw) == original or len(got) < len(events)
