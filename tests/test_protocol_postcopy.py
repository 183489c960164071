"""The post-copy end of a session (pure, in memory): Postcopy/Absent, spill refs, fetches."""

from __future__ import annotations

import dataclasses
import json

import pytest

from blkfs.ctlproto import PostcopyStats
from migrator.postcopy import from_wire, to_wire
from migrator.protocol import (
    Absent,
    Blocks,
    Commit,
    Connection,
    DeviceState,
    Digests,
    Done,
    Fetch,
    FrameType,
    LocalProtocolError,
    Postcopy,
    PostcopyDone,
    PostcopyFigures,
    ProtocolError,
    Resumed,
    SlotFree,
    SpillFlushed,
    SpillRefs,
    State,
    Switchover,
    Verified,
    VerifyDone,
    decode,
    encode,
)
from tests.test_protocol import BS, MANIFEST, Link, data, refused

STATS = PostcopyDone(PostcopyFigures(3, 2, 8, 2, 1, 0, 0, 10, 0, 0, 0.5, 2.25, 1.5))


def at_switchover() -> Link:
    link = Link()
    link.run(until=State.COPYING)
    link.send(link.source, Switchover())  # after the ack of round 0... any COPYING point
    return link


def play(link: Link, script: list[tuple[str, object]]) -> None:
    for role, ev in script:
        sender = link.side(role)
        assert link.send(sender, ev) == [ev]  # type: ignore[arg-type]
        assert link.source.state is link.dest.state


def test_whole_postcopy_session() -> None:
    link = at_switchover()
    play(link, [
        ("source", Blocks(0, 0, data(BS))),
        ("source", Postcopy("m-1", "/srv/spill", 4)),
        ("source", Absent(1, ((0, 2),))),
        ("source", Commit()),
        ("source", SpillRefs(((1, 0, 3, 1),))),  # spilling starts at once
        ("dest", Fetch(1, 1, 1)),  # the hypervisor reads RAM while it loads
        ("source", Blocks(1, 1, data(BS, 5))),
        ("dest", SlotFree(((3, 1),))),
        ("dest", Resumed(4.0)),
    ])
    assert link.source.state is State.POSTCOPY and link.source.postcopy is not None
    play(link, [
        ("source", SpillFlushed(1)),
        ("dest", STATS),
        ("source", SpillRefs(((1, 1, 0, 1),))),  # crossed with PostcopyDone: still legal
        ("source", Digests(0, 0, (1, 2, 3, 4))),
        ("source", VerifyDone()),
        ("dest", Verified(True, 0, "")),
        ("source", Done()),
    ])
    assert link.dest.state is State.CLOSED


def test_postcopy_frames_need_the_announcement() -> None:
    link = at_switchover()
    play(link, [("source", Commit())])
    # A pre-copy session: no Fetch, no spill refs while resuming.
    with pytest.raises(LocalProtocolError, match="without a Postcopy"):
        link.dest.send(Fetch(0, 0, 1))
    refused(link.dest, encode(SpillRefs(((0, 0, 0, 1),))), "without a Postcopy")


def test_absent_before_postcopy_is_refused() -> None:
    link = at_switchover()
    refused(link.dest, encode(Absent(0, ((0, 1),))), "without a Postcopy")


@pytest.mark.parametrize(("event", "match"), [
    (Absent(1, ((1, 2),)), "outside its 2 blocks"),
    (Absent(7, ((0, 1),)), "not in the manifest"),
    (SpillRefs(((1, 99, 0, 1),)), "past its end"),
    (SpillRefs(((1, 0, 4, 1),)), "slot 4 of 4"),
])
def test_source_lies_are_refused(event: object, match: str) -> None:
    link = at_switchover()
    play(link, [("source", Postcopy("m", "/s", 4))])
    if isinstance(event, SpillRefs):
        play(link, [("source", Commit())])
    refused(link.dest, encode(event), match)  # type: ignore[arg-type]


@pytest.mark.parametrize(("event", "match"), [
    (Fetch(1, 1, 2), "it has 2"),
    (Fetch(9, 0, 1), "not in the manifest"),
    (SlotFree(((4, 1),)), "past the spill area"),
])
def test_dest_lies_are_refused(event: object, match: str) -> None:
    link = at_switchover()
    play(link, [("source", Postcopy("m", "/s", 4)), ("source", Commit())])
    refused(link.source, encode(event), match)  # type: ignore[arg-type]


def test_no_fetch_after_postcopy_done() -> None:
    link = at_switchover()
    play(link, [("source", Postcopy("m", "/s", 4)), ("source", Commit()),
                ("dest", Resumed(1.0)), ("dest", STATS)])
    with pytest.raises(LocalProtocolError, match="may not send Fetch"):
        link.dest.send(Fetch(0, 0, 1))


@pytest.mark.parametrize("event", [
    Postcopy("m", "/spill", 1), Absent(0, ((0, 1), (5, 9))), SpillRefs(((0, 1, 2, 3),) * 3),
    SpillFlushed(0), Fetch(0, 2**40, 128), SlotFree(((1, 2),)), STATS,
])
def test_round_trip(event: object) -> None:
    assert decode(encode(event)) == event  # type: ignore[arg-type]


@pytest.mark.parametrize(("event", "match"), [
    (Postcopy("m", "/s", 0), "slots"),
    (Fetch(0, 0, 0), "count"),
    (SpillRefs(()), "number of refs"),
    (SpillRefs(((0, 0, 0, 0),)), "generation"),
    (PostcopyDone(PostcopyFigures(demand_fault_p50_ms=-1.0)), "finite number"),
    (PostcopyDone(PostcopyFigures(demand_faults=-1)), "demand_faults"),
])
def test_bad_fields(event: object, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        encode(event)  # type: ignore[arg-type]


def test_manifest_unchanged() -> None:
    c = Connection("source", b"k" * 16)
    assert c.postcopy is None and MANIFEST.block_size == BS


def test_device_state_flows_before_commit_and_is_bounded() -> None:
    link = at_switchover()
    play(link, [("source", DeviceState(b"QEVM" * 100)), ("source", DeviceState(b"x")),
                ("source", Commit())])
    link = at_switchover()
    chunk = encode(DeviceState(b"\0" * (8 << 20)))
    for _ in range(32):  # 256 MiB is allowed ...
        link.dest.receive_data(chunk)
        assert isinstance(link.dest.next_event(), DeviceState)
    refused(link.dest, chunk, "device state over")  # ... not a byte more
    assert decode(encode(DeviceState(b"abc"))) == DeviceState(b"abc")
    with pytest.raises(ProtocolError, match="non-empty"):
        encode(DeviceState(b""))


def _done_with(stats: dict[str, object]) -> bytes:
    body = json.dumps({"stats": stats}).encode()
    return bytes([FrameType.POSTCOPY_DONE]) + len(body).to_bytes(4, "big") + body


def test_figures_unknown_are_dropped_and_missing_read_zero() -> None:
    """Figures are for the report: a peer counting one more (or one fewer) must not fail the
    last frame of a post-copy.  The figures given are still checked."""
    ev = decode(_done_with({"demand_faults": 4, "postcopy_s": 2, "next_years_figure": 1}))
    assert ev == PostcopyDone(PostcopyFigures(demand_faults=4, postcopy_s=2.0))
    with pytest.raises(ProtocolError, match="demand_faults"):
        decode(_done_with({"demand_faults": -1}))
    with pytest.raises(ProtocolError, match="postcopy_s must be a finite number"):
        decode(_done_with({"postcopy_s": 10**400}))
    with pytest.raises(ProtocolError, match="JSON object"):
        decode(_done_with([]))  # type: ignore[arg-type]


def test_figures_convert_to_and_from_the_daemons_type() -> None:
    """The edge (migrator/postcopy.py): every figure the wire carries comes from the daemon's
    PostcopyStats and goes back into it for the report, unchanged."""
    values = {f.name: (i + 1 if f.type == "int" else i + 0.5)
              for i, f in enumerate(dataclasses.fields(PostcopyFigures))}
    daemon = PostcopyStats(**values)  # type: ignore[arg-type]
    assert dataclasses.asdict(to_wire(daemon)) == values
    assert from_wire(to_wire(daemon)) == daemon
