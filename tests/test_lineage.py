"""lineage.py: when both sides' records prove a replica an exact epoch (pure)."""

from __future__ import annotations

from typing import Any

from migrator.lineage import (
    BACK,
    dest_lineage,
    dest_proof,
    held_lineage,
    source_proof,
    sync_record,
    tag,
)
from migrator.ownership import DestRecord, DestStatus, ReplicaProgress, VMRecord

REC = sync_record("s", "host:1", 4, {"disk": (10, 4096), "mem": (3, 8192)}, 0.0)


def test_the_source_vouches_only_for_files_whose_next_epoch_is_the_one_it_ends() -> None:
    proof = source_proof(REC, {"disk": (11, 4096), "mem": (3, 8192)}, trust_lost=False)
    assert proof.tag == tag("s", 4) == "s@4" and proof.files == ["disk"]
    assert "epoch moved on" in proof.why_not["mem"]  # no swap since the sync's: (3, not 4)
    assert source_proof(REC, {"disk": (12, 4096)}, False).files == []  # a swap between
    assert "size changed" in source_proof(REC, {"disk": (11, 1)}, False).why_not["disk"]
    assert "not in the last sync" in source_proof(REC, {"new": (1, 1)}, False).why_not["new"]
    assert source_proof(REC, {"disk": (None, 4096)}, False).files == []  # never swapped
    lost = source_proof(REC, {"disk": (11, 4096)}, trust_lost=True)
    assert lost.tag == "" and "trust lost" in lost.why_not["disk"]
    assert source_proof(None, {"disk": (11, 4096)}, False).tag == ""


LIN = dest_lineage({"disk": 7, "mem": 2}, {"disk": 0, "mem": 1}, {"disk": 4096, "mem": 8192},
                   "s@4")
REPLICA = VMRecord("v", "v", ["disk", "mem"], role="replica", dest_record=DestRecord(
    "s", status=DestStatus.REPLICA, replica=ReplicaProgress(4, lineage=LIN)))
NAMES, SIZES = {0: "disk", 1: "mem"}, {0: 4096, 1: 8192}


def test_the_destination_accepts_files_nobody_wrote_since() -> None:
    own = {0: (7, []), 1: (2, [(0, 1)])}  # mem was written here since
    ok, why = dest_proof(held_lineage(REPLICA), "s@4", NAMES, SIZES, [0, 1], own, "s@4")
    assert ok == [0] and "mem: written here since the sync" in why
    ok, why = dest_proof(LIN, "s@4", NAMES, SIZES, [0], {0: (0, [(0, 1)])}, "s@4")
    assert ok == [] and "written here" in why  # an unclean restart: epoch 0, all dirty
    ok, why = dest_proof(LIN, "s@4", NAMES, {0: 1, 1: 8192}, [0], {0: (7, [])}, "s@4")
    assert ok == [] and "not this size" in why
    assert dest_proof(LIN, "s@5", NAMES, SIZES, [0], {0: (7, [])}, "s@5")[1].startswith(
        "the replica here is s@4")
    assert "digest log is missing" in dest_proof(LIN, "s@4", NAMES, SIZES, [0], {0: (7, [])},
                                                 None)[1]
    assert dest_proof(None, "s@4", NAMES, SIZES, [0], {}, "s@4") == ([], "no replica here")


def test_a_retired_source_copy_is_a_replica_and_a_running_one_is_not() -> None:
    back = dest_lineage({"disk": 3}, {"disk": 0}, {"disk": 4096}, tag("m", BACK))
    def rec(role: str, **kw: Any) -> VMRecord:
        return VMRecord("v", "v", ["disk"], role=role, **kw)

    assert held_lineage(rec("retired", lineage=back)) == back
    assert held_lineage(rec("handing-off", lineage=back)) is None
    assert held_lineage(rec("owner", lineage=back)) is None  # it runs: it changes
    assert held_lineage(rec("incomplete", dest_record=DestRecord(
        "s", replica=ReplicaProgress(lineage=LIN)))) is None
    assert held_lineage(REPLICA) == LIN
    assert held_lineage(None) is None
