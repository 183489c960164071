"""A session that re-states a migration broken after Commit (pure, in memory): Reattach."""

from __future__ import annotations

import pytest

from migrator.protocol import (
    Answer,
    Blocks,
    Digests,
    Done,
    Fetch,
    LocalProtocolError,
    Manifest,
    Postcopy,
    Reattach,
    SpillRefs,
    State,
    Verified,
    VerifyDone,
    decode,
    encode,
)
from tests.test_protocol import BS, FILES, Link, data, refused
from tests.test_protocol_postcopy import STATS, play

MID = "m-42"
MAN = Manifest(BS, FILES, MID)
PC = Postcopy("spill-1", "/srv/spill", 4)


def handshaken() -> Link:
    link = Link()
    link.run(until=State.MANIFEST)
    return link


def test_a_precopy_reattach_goes_on_with_verification() -> None:
    link = handshaken()
    play(link, [("source", Reattach(MID, 3, False)), ("source", MAN)])
    assert link.dest.reattach == Reattach(MID, 3, False)
    assert link.dest.manifest == MAN
    play(link, [("dest", Answer(MID, "owner", 3, "the VM runs here"))])
    assert link.source.state is State.VERIFYING
    play(link, [("source", Digests(0, 0, (1, 2, 3, 4))), ("source", VerifyDone()),
                ("dest", Verified(True, 0, "")), ("source", Done())])
    assert link.dest.state is State.CLOSED


def test_a_postcopy_reattach_goes_on_with_the_postcopy_exchange() -> None:
    link = handshaken()
    play(link, [("source", Reattach(MID, 3, True)), ("source", MAN), ("source", PC),
                ("dest", Answer(MID, "owner", 3, "post-copy paused here"))])
    assert link.source.state is State.POSTCOPY and link.source.postcopy == PC
    play(link, [("source", SpillRefs(((1, 0, 3, 1),))), ("dest", Fetch(1, 1, 1)),
                ("source", Blocks(1, 1, data(BS, 5))), ("dest", STATS),
                ("source", Digests(0, 0, (1, 2, 3, 4))), ("source", VerifyDone()),
                ("dest", Verified(True, 0, "")), ("source", Done())])
    assert link.dest.state is State.CLOSED


@pytest.mark.parametrize("status", ["refused", "unknown", "incomplete"])
def test_any_other_answer_ends_the_session(status: str) -> None:
    link = handshaken()
    play(link, [("source", Reattach(MID, 3, False)), ("source", MAN),
                ("dest", Answer(MID, status, 0, "no"))])
    assert link.source.state is State.CLOSED


def test_the_manifest_must_name_the_migration_reattached() -> None:
    link = handshaken()
    play(link, [("source", Reattach(MID, 3, False))])
    refused(link.dest, encode(Manifest(BS, FILES, "other")), "re-states migration")


def test_an_announced_postcopy_must_come_before_the_answer() -> None:
    link = handshaken()
    play(link, [("source", Reattach(MID, 3, True)), ("source", MAN)])
    with pytest.raises(LocalProtocolError, match="before its Manifest and Postcopy"):
        link.dest.send(Answer(MID, "owner", 3, ""))


def test_a_postcopy_not_announced_is_refused() -> None:
    link = handshaken()
    play(link, [("source", Reattach(MID, 3, False)), ("source", MAN)])
    refused(link.dest, encode(PC), "does not announce it")


def test_no_answer_before_the_manifest_and_no_blocks_before_the_answer() -> None:
    link = handshaken()
    play(link, [("source", Reattach(MID, 3, False))])
    with pytest.raises(LocalProtocolError, match="before its Manifest"):
        link.dest.send(Answer(MID, "owner", 3, ""))
    play(link, [("source", MAN)])
    with pytest.raises(LocalProtocolError, match="may not send Blocks"):
        link.source.send(Blocks(0, 0, data(BS)))


def test_an_answer_about_another_migration_is_refused() -> None:
    link = handshaken()
    play(link, [("source", Reattach(MID, 3, False)), ("source", MAN)])
    refused(link.source, encode(Answer("other", "owner", 3, "")), "to a Reattach of")


def test_reattach_round_trips_and_checks_its_fields() -> None:
    ev = Reattach(MID, 7, True)
    assert decode(encode(ev)) == ev
    with pytest.raises(Exception, match="postcopy must be a bool"):
        encode(Reattach(MID, 7, 1))  # type: ignore[arg-type]
