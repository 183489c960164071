"""The ownership rules (migrator/ownership.py), pure: what each host may do with a VM given
what it knows of it."""

from __future__ import annotations

from typing import Any

import pytest

from migrator import ownership as own
from migrator.ownership import (
    HANDING_OFF,
    INCOMING,
    INCOMPLETE,
    OWNER,
    REFUSED,
    REPLICA,
    RETIRED,
    UNKNOWN,
    Refusal,
    VMRecord,
)

FILES = ["web/disk.raw", "web/vm.mem"]


def rec(role: str = OWNER, generation: int = 0, files: list[str] | None = None, vm: str = "v1",
        name: str = "web", peer: str = "b:1", migration: str = "m1") -> VMRecord:
    return VMRecord(vm, name, list(files or FILES), generation, role, peer, migration)


def test_a_vm_is_named_by_its_files_or_once_by_a_name() -> None:
    assert own.default_name(FILES) == "web"
    assert own.default_name(["disk.raw", "vm.mem"]) == "disk"
    new = own.new_vm(["disk.raw"], None)
    assert new.role == OWNER and new.generation == 0 and new.name == "disk"
    assert own.new_vm(["disk.raw"], "db").name == "db"
    web = rec()
    assert own.find_vm([web], list(reversed(FILES)), None) is web
    assert own.find_vm([web], [], "web") is web  # --vm NAME alone: its files
    assert own.find_vm([web], ["other.raw"], None) is None  # a new VM
    with pytest.raises(Refusal, match=r"a VM moves whole"):
        own.find_vm([web], ["web/disk.raw"], None)
    with pytest.raises(Refusal, match=r"not web/disk\.raw"):
        own.find_vm([web], ["web/disk.raw"], "web")
    with pytest.raises(Refusal, match="no VM named db"):
        own.find_vm([web], [], "db")
    with pytest.raises(Refusal, match="belongs to VM web"):
        own.find_vm([web], FILES, "db")


@pytest.mark.parametrize(("role", "words"), [
    (HANDING_OFF, "never settled"),
    (RETIRED, "left this host: it was handed to b:1 at generation 3"),
    (REPLICA, "a replica here"),
    (INCOMING, "not runnable here"),
    (INCOMPLETE, "not runnable here"),
])
def test_only_the_owner_hands_a_vm_off(role: str, words: str) -> None:
    own.may_hand_off(None, "/m")  # a VM this host never knew: it is a new one
    own.may_hand_off(rec(OWNER, 3), "/m")
    with pytest.raises(Refusal, match=words):
        own.may_hand_off(rec(role, 3), "/m")


def test_a_retired_host_says_where_the_vm_is_and_how_to_take_it_back() -> None:
    with pytest.raises(Refusal) as e:
        own.may_hand_off(rec(RETIRED, 4, peer="10.0.0.2:7070"), "/m")
    text = str(e.value)
    assert "10.0.0.2:7070" in text and "generation 4" in text and "migrate it from there" in text


def test_an_owner_with_a_split_brain_open_hands_nothing_off() -> None:
    sb = own.split_brain(rec(OWNER, 2), "c:1", 2)
    with pytest.raises(Refusal, match=r"split brain.*--retire-here"):
        own.may_hand_off(sb, "/m")


def test_a_handoff_round_trip_raises_the_generation_by_one() -> None:
    a = rec(OWNER, 0, peer="")
    going = own.begin_handoff(a, "b:1", "m2", "pid:7")
    assert going.role == HANDING_OFF and going.generation == 0 and going.next_generation == 1
    adm = own.admit([], a.id, a.name, a.files, a.generation, "a:1", "m2")
    assert adm.record.role == INCOMING and adm.record.generation == 0 and adm.before is None
    took = own.took(adm.record, going.next_generation)
    assert took.role == OWNER and took.generation == 1
    gone = own.retired(going, "verified")
    assert gone.role == RETIRED and gone.generation == 1 and gone.peer == "b:1"
    assert [h["event"] for h in took.history] == ["incoming", "took"]
    with pytest.raises(Refusal, match=r"bad peer: Commit of generation 5"):
        own.took(adm.record, 5)
    back = own.handoff_off(going, "aborted before the handoff", resumed=False)
    assert back.role == OWNER and back.generation == 0  # as it was


def test_a_destination_never_overwrites_a_vm_it_owns_or_keeps() -> None:
    mine = rec(OWNER, 2)
    with pytest.raises(Refusal, match="split brain") as e:
        own.admit([mine], "v1", "web", FILES, 2, "a:1", "m9")
    assert e.value.owner_generation == 2
    for role in (OWNER, HANDING_OFF, REPLICA, INCOMING):  # another VM's files
        with pytest.raises(Refusal, match=r"refusing to overwrite: web/disk\.raw"):
            own.admit([rec(role, vm="v2", name="other")], "v1", "web", FILES, 0, "a:1", "m9")
    stale = rec(RETIRED, vm="v2", name="old")  # a VM that left: its files may be taken
    adm = own.admit([stale, rec(OWNER, vm="v3", files=["x.raw"])], "v1", "web", FILES, 0,
                    "a:1", "m9")
    assert adm.dropped == [stale]
    forced = own.admit([mine], "v1", "web", FILES, 2, "a:1", "m9", force=True)
    assert forced.record.role == INCOMING and forced.before is not None


def test_a_stale_source_is_refused_by_the_host_it_left_later() -> None:
    left = rec(RETIRED, 5)  # this host handed the VM on at generation 5
    with pytest.raises(Refusal, match="stale"):
        own.admit([left], "v1", "web", FILES, 3, "a:1", "m9")
    ok = own.admit([left], "v1", "web", FILES, 5, "a:1", "m9")  # its owner brings it back
    assert ok.record.role == INCOMING and ok.before is left


def test_answers_come_from_the_history_not_from_the_last_session() -> None:
    took = own.took(own.admit([], "v1", "web", FILES, 0, "a:1", "m1").record, 1)
    assert own.answer([took], "m1")[0] == OWNER
    assert own.answer([took], "m1", absent=3)[0] == own.INCOMPLETE_ANSWER
    later = own.retired(own.begin_handoff(took, "c:1", "m2", ""), "verified")
    status, gen, detail = own.answer([later], "m1")  # it took m1, then handed it on
    assert status == OWNER and gen == 1 and "retired here now" in detail
    cut = own.incoming_ended(own.admit([], "v2", "db", ["db.raw"], 0, "a:1", "m3").record,
                             "link cut")
    assert own.answer([later, cut], "m3")[0] == REFUSED
    assert own.answer([later, cut], "m-none")[0] == UNKNOWN
    r, status, _ = own.reattachable([took], "m1", 1)
    assert r is took and status == OWNER
    assert own.reattachable([took], "m1", 2)[:2] == (None, UNKNOWN)


def test_settling_by_hand_meets_the_other_owner_as_a_split_brain() -> None:
    going = own.begin_handoff(rec(OWNER, 3), "b:1", "m2", "")
    here = own.resumed_by_hand(going)
    assert here.role == OWNER and here.generation == 4 and here.forced
    there = own.took(own.admit([], "v1", "web", FILES, 3, "a:1", "m2").record, 4)
    with pytest.raises(Refusal, match="split brain") as e:  # they meet: both say owner at 4
        own.admit([there], "v1", "web", FILES, here.generation, "a:1", "m3")
    assert e.value.owner_generation == 4
    marked = own.split_brain(there, "a:1", 4)
    assert "SPLIT BRAIN" in own.describe(marked) and "generation 4" in own.describe(marked)
    gone = own.retired_by_hand(marked)
    assert gone.role == RETIRED and gone.split_brain is None
    assert own.retired_by_hand(going).generation == 4


def test_records_round_trip_and_torn_ones_are_unknown() -> None:
    r = own.begin_handoff(rec(), "b:1", "m2", "pid:1")
    assert VMRecord.from_dict(r.to_dict()) == r
    assert VMRecord.from_dict({"id": "x"}) is None
    assert VMRecord.from_dict({**r.to_dict(), "role": "mystery"}) is None
    for _ in range(own.HISTORY_KEPT + 10):
        r.event("x")
    assert len(r.history) == own.HISTORY_KEPT


def test_old_records_convert_to_the_same_vm_on_both_hosts() -> None:
    src = {"migration": "m1", "epoch": 2, "to": "b:1", "suspend": "pid:3",
           "files": ["disk.raw"], "state": "retired"}
    dst = {"migration": "m1", "epoch": 2, "owner": True, "status": "complete",
           "source": "a:1", "files": [{"name": "disk.raw", "size": 4096}]}
    (a,) = own.from_legacy(src, None)
    (b,) = own.from_legacy(None, dst)
    assert a.id == b.id and a.role == RETIRED and b.role == OWNER
    assert a.generation == b.generation == 2
    assert own.answer([b], "m1")[0] == OWNER  # a cut handoff settles after conversion too
    (c,) = own.from_legacy({**src, "state": "handed-off"}, None)
    assert c.role == HANDING_OFF and c.next_generation == 2
    (d,) = own.from_legacy(src, {**dst, "migration": "m0", "epoch": 1})  # A -> B -> A: later
    assert d.role == RETIRED


def test_what_a_role_forbids_is_said_before_how_the_vm_was_named() -> None:
    going = rec(HANDING_OFF)
    with pytest.raises(Refusal, match="never settled"):  # not "a VM moves whole"
        own.vm_to_hand_off([going], ["web/disk.raw"], None, "/m")
    with pytest.raises(Refusal, match="a VM moves whole"):
        own.vm_to_hand_off([rec(OWNER)], ["web/disk.raw"], None, "/m")
    assert own.vm_to_hand_off([rec(OWNER)], FILES, None, "/m") is not None


# -- the records on disk (vmrecords.RecordDir) ----------------------------------------------------


def test_records_live_under_the_backing_directory_and_survive_a_reopen(tmp_path: Any) -> None:
    from migrator.vmrecords import RecordDir

    d = RecordDir(str(tmp_path))
    a = own.new_vm(["disk.raw"], None)
    d.put(a)
    d.put(own.begin_handoff(a, "b:1", "m1", "pid:1"))  # (rewritten in place)
    d.write_digests(a.id, b"log")
    d.write_sync(a.id, {"tag": "s@1"})
    d.close()
    again = RecordDir(str(tmp_path))
    (got,) = again.all()
    assert got.role == HANDING_OFF and got.migration == "m1"
    assert again.read_digests(a.id) == b"log" and again.read_sync(a.id) == {"tag": "s@1"}
    assert (tmp_path / ".blkfs" / "vms" / a.id / "record.json").exists()
    (tmp_path / ".blkfs" / "vms" / a.id / "record.json").write_text('{"id": ')  # torn
    assert again.all() == [] and again.get(a.id) is None  # unknown, never settled
    again.drop(a.id)
    assert not (tmp_path / ".blkfs" / "vms" / a.id).exists()


def test_the_records_of_an_older_migrator_are_converted_once(tmp_path: Any) -> None:
    import json

    from migrator.vmrecords import RecordDir

    (tmp_path / ".migration-source.json").write_text(json.dumps({
        "migration": "m1", "epoch": 1, "to": "b:1", "suspend": "pid:3",
        "files": ["disk.raw"], "state": "handed-off"}))
    (tmp_path / ".migration-digests").write_bytes(b"old log")
    d = RecordDir(str(tmp_path))
    (rec,) = d.all()
    assert rec.role == HANDING_OFF and rec.peer == "b:1" and rec.suspend == "pid:3"
    assert d.read_digests(rec.id) == b"old log"
    assert not (tmp_path / ".migration-source.json").exists()  # not shown by the mount now
    assert (tmp_path / ".blkfs" / "legacy" / ".migration-source.json").exists()
    assert [r.id for r in RecordDir(str(tmp_path)).all()] == [rec.id]


def test_an_unsettled_handoff_is_settled_by_the_vm_coming_back_from_its_owner() -> None:
    going = own.begin_handoff(rec(OWNER, 2), "b:1", "m2", "")  # cut: never settled here
    back = own.admit([going], "v1", "web", FILES, 3, "b:1", "m3")  # b owns it at 3
    assert back.record.role == INCOMING and back.before is not None
    assert back.before.role == RETIRED and back.before.generation == 3
    with pytest.raises(Refusal, match="split brain"):  # at 2 the source cannot own it
        own.admit([going], "v1", "web", FILES, 2, "c:1", "m4")


def test_a_failed_incoming_migration_leaves_a_retired_host_retired() -> None:
    left = own.retired(own.begin_handoff(rec(OWNER, 1), "b:1", "m1", ""), "verified")
    adm = own.admit([left], "v1", "web", FILES, 2, "b:1", "m2")  # it comes back, and fails
    back = own.incoming_ended(adm.record, "link cut", adm.before)
    assert (back.role, back.generation, back.peer, back.lineage) == (RETIRED, 2, "b:1", None)
    assert "partly overwritten" in back.detail and back.history[-1]["event"] == "incoming-ended"
    new = own.admit([], "v2", "db", ["db.raw"], 0, "a:1", "m3")
    assert own.incoming_ended(new.record, "cut", new.before).role == INCOMPLETE
    took = own.took(new.record, 1)
    failed_start = own.incoming_ended(took, "would not start", new.before)
    assert (failed_start.role, failed_start.generation) == (INCOMPLETE, 0)
    assert own.answer([back], "m2")[0] == REFUSED  # the source of m2 may resume


@pytest.mark.parametrize("name", [".blkfs/vms/x/record.json", ".migration-source.json",
                                  ".migration-state.json", ".migration-digests"])
def test_a_peer_cannot_write_where_records_are_read(tmp_path: Any, name: str) -> None:
    """A file of a record's name, sent by a peer, would be read as a record."""
    from migrator.stores import MountDest
    from migrator.transport import MigrationError

    with pytest.raises(MigrationError, match="reserved on the destination"):
        MountDest(str(tmp_path))._target(name)
