"""Who owns a VM, across any history of migrations: the rules every session asks. Pure.

A VM is a named set of files on a mount with an id that travels with it, and a generation
that goes up by one at every handoff.  Every host that ever held it keeps one record of it
(`VMRecord`, stored by vmrecords.RecordDir outside what the mount shows), whose role says what
this host's copy is:

* ``owner``: the VM runs here (or is to be started here) at `generation`;
* ``handing-off``: it was, and the Commit of generation + 1 to `peer` is sent or about to
  be: never resumed here until settled (``migrator resolve``);
* ``retired``: handed to `peer` at `generation`; the copy here is history (a replica of the
  switchover, for a migration back);
* ``replica``: a copy kept by ``migrator sync`` from `peer`, the owner; never runnable;
* ``incoming``: a migration from `peer` is writing the files now;
* ``incomplete``: an incoming migration ended before its Commit; not runnable.

The rules (docs/migration.md, "The handoff" and "A VM's life"):

1. a host hands a VM off only as its owner (`may_hand_off`); the source writes handing-off
   durably before it sends Commit, and resumes only when the destination refused, or a
   person says so;
2. a destination admits an incoming migration only over files of no VM that runs or is
   kept here (`admit`); it writes owner durably before it starts the VM, at the generation
   after the one the source owned;
3. an attempt that fails before the Commit leaves the source's record as it was, and the
   destination's at most ``incomplete`` (its files were written);
4. two hosts that both say owner are a split brain: detected when they meet, recorded on
   both with both generations, settled only by a person.

A session changes only the record of its own VM: another VM's session, a failed one or an
interrupted one never touches it.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any


def _known_fields(cls: type, d: dict[str, Any], *nested: str) -> dict[str, Any]:
    """The keys of `d` that are fields of the dataclass `cls`, but the `nested` ones (which
    the caller builds itself): a record written by a newer migrator still reads."""
    names = {f.name for f in fields(cls)} - set(nested)
    return {k: v for k, v in d.items() if k in names}


class Role(StrEnum):
    """What this host's copy of a VM is (the module's docstring says each)."""

    OWNER = "owner"
    HANDING_OFF = "handing-off"
    RETIRED = "retired"
    REPLICA = "replica"
    INCOMING = "incoming"
    INCOMPLETE = "incomplete"


OWNER, HANDING_OFF, RETIRED = Role.OWNER, Role.HANDING_OFF, Role.RETIRED
REPLICA, INCOMING, INCOMPLETE = Role.REPLICA, Role.INCOMING, Role.INCOMPLETE
ROLES = tuple(Role)
RUNS_HERE = (OWNER, HANDING_OFF)  # a copy that runs, or may, on this host
KEPT_HERE = (*RUNS_HERE, REPLICA, INCOMING)  # files a new incoming migration must not take

# Answers of a destination about a migration (protocol.Answer.status)
REFUSED, UNKNOWN = "refused", "unknown"
INCOMPLETE_ANSWER = "incomplete"  # it took the VM, but its copy still lacks post-copy pages

HISTORY_KEPT = 64  # events per record (the oldest go first)


class Refusal(Exception):
    """A rule says no. `owner_generation` is set when the refusing host owns the VM itself
    (a split brain), so the other side can record it too."""

    def __init__(self, text: str, owner_generation: int | None = None) -> None:
        super().__init__(text)
        self.owner_generation = owner_generation


@dataclass
class VMRecord:
    id: str
    name: str
    files: list[str]
    generation: int = 0
    role: str = OWNER
    peer: str = ""  # where it came from (owner, replica, incoming) or went to (retired)
    migration: str = ""  # the migration (or sync) that last changed the role
    at: float = field(default_factory=time.time)  # when the role last changed
    detail: str = ""
    suspend: str = ""  # the source's --suspend spec: resolve resumes or retires through it
    forced: bool = False  # a person settled the last handoff by hand
    split_brain: dict[str, Any] | None = None  # another host claims it too: {peer, generation}
    history: list[dict[str, Any]] = field(default_factory=list)
    lineage: dict[str, Any] | None = None  # retired: the peer's files as of the switchover
    dest_record: DestRecord | None = None  # the last incoming session's (dest.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMRecord | None:
        """None for anything that is not a whole record (torn, or not ours): unknown."""
        try:
            rec = cls(**_known_fields(cls, d, "dest_record"))
            rec.role = Role(rec.role)
        except (TypeError, ValueError):
            return None
        if not isinstance(rec.files, list):
            return None
        got = d.get("dest_record", d.get("incoming"))  # ("incoming" before it had its own word)
        rec.dest_record = DestRecord.from_dict(got) if isinstance(got, dict) else None
        return rec

    @property
    def unsettled(self) -> bool:
        return self.role == HANDING_OFF

    @property
    def next_generation(self) -> int:
        return self.generation + 1

    def event(self, what: str, **extra: Any) -> None:
        self.history.append({"at": time.time(), "event": what, "generation": self.generation,
                             "role": self.role, **{k: v for k, v in extra.items() if v}})
        del self.history[:-HISTORY_KEPT]

    def became(self, role: str, *, generation: int | None = None, peer: str | None = None,
               migration: str | None = None, detail: str = "", event: str = "") -> VMRecord:
        """A copy in the new role, with the change in its history."""
        out = replace(self, history=list(self.history), role=role, at=time.time(),
                      detail=detail)
        if generation is not None:
            out.generation = generation
        if peer is not None:
            out.peer = peer
        if migration is not None:
            out.migration = migration
        out.event(event or role, peer=out.peer, migration=out.migration, detail=detail)
        return out


class DestStatus(StrEnum):
    """Where an incoming session stands (the VM's role says whose the VM is)."""

    INCOMPLETE = "incomplete"  # the files are being written, or the session ended unfinished
    REPLICA = "replica"  # a sync keeps them: never runnable
    RUNNING = "running"  # the VM was taken and started here; its verification is pending
    COMPLETE = "complete"  # verified (or completed from the spill area alone)
    REFUSED = "refused"  # its start failed: it never ran here


@dataclass
class ReplicaProgress:
    """What a sync has made of the files here."""

    sync_round: int | None = None  # the source's sync round whose every write is here, durably
    synced_at: float | None = None
    rounds: int = 0
    lineage: dict[str, Any] | None = None  # this host's side of it (lineage.dest_lineage)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplicaProgress:
        got = _known_fields(cls, d)
        if "epoch" in d and "sync_round" not in d:  # (written before it had its own word)
            got["sync_round"] = d["epoch"]
        return cls(**got)


@dataclass
class DestRecord:
    """The destination's record of one incoming session, kept in its VM's record (durable
    before any file is touched); `migrator status`, `resolve` and `blkfs status` read it."""

    migration: str
    source: str = ""
    status: DestStatus = DestStatus.INCOMPLETE
    started_at: float = field(default_factory=time.time)
    files: list[dict[str, Any]] = field(default_factory=list)  # {name, size} each
    replica: ReplicaProgress | None = None  # a sync's; None for a migration
    taken_at: float | None = None  # the Commit: the VM is this host's from then on
    completed_at: float | None = None
    verified: bool | None = None
    verified_how: str = ""  # when not by the final digests (the source was lost)
    error: str = ""
    detail: str = ""
    mismatches: int = 0
    reattaches: int = 0
    postcopy: dict[str, Any] | None = None  # its post-copy's figures (cp.to_dict)
    postcopy_paused: str | None = None
    missing_blocks: list[list[Any]] = field(default_factory=list)  # [name, block] each
    missing_count: int = 0
    stopped_at: float | None = None  # a sync that ended
    stopped: str = ""  # why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DestRecord | None:
        """None for a record torn or of another shape (the session is then unknown)."""
        try:
            rec = cls(**_known_fields(cls, d, "replica"))
            rec.status = DestStatus(rec.status)
            if isinstance(rec.verified, str):  # (a sentence, before verified_how)
                rec.verified, rec.verified_how = True, rec.verified
            rep = d.get("replica")
            rec.replica = ReplicaProgress.from_dict(rep) if isinstance(rep, dict) else None
        except (TypeError, ValueError):
            return None
        return rec


def default_name(files: list[str]) -> str:
    """A VM named by its files: their directory if they share one, else the first's stem."""
    dirs = {os.path.dirname(f) for f in files}
    if len(dirs) == 1 and "" not in dirs:
        return dirs.pop()
    return os.path.splitext(os.path.basename(files[0]))[0] or files[0]


def new_vm(files: list[str], name: str | None, suspend: str = "") -> VMRecord:
    rec = VMRecord(str(uuid.uuid4()), name or default_name(files), list(files),
                   suspend=suspend)
    rec.event("created", detail="first known on this host")
    return rec


def find_vm(records: list[VMRecord], files: list[str], name: str | None) -> VMRecord | None:
    """The VM that `migrate FILES` / `--vm NAME` means on this host, or None for a new one.

    A file belongs to at most one VM of a host; naming some of a VM's files, or files of two
    VMs, is refused: the VM moves whole."""
    if name:
        named = [r for r in records if r.name == name]
        if named:
            rec = max(named, key=lambda r: r.at)
            if files and sorted(files) != sorted(rec.files):
                raise Refusal(f"VM {name} is {', '.join(rec.files)} here, not "
                              f"{', '.join(files)}: name its files as they are, or none")
            return rec
        if not files:
            raise Refusal(f"no VM named {name} on this mount: name its files once "
                          f"(--vm {name} FILE...)")
    want = set(files)
    overlap = [r for r in records if want & set(r.files)]
    if not overlap:
        return None
    exact = [r for r in overlap if set(r.files) == want]
    if len(exact) == 1 and len(overlap) == 1:
        rec = exact[0]
        if name and rec.name != name:
            raise Refusal(f"{files[0]} belongs to VM {rec.name} here, not {name}")
        return rec
    r = next(r for r in overlap if set(r.files) != want) if not exact else overlap[0]
    shared = sorted(want & set(r.files))
    raise Refusal(f"{shared[0]} belongs to VM {r.name} ({r.role} here), whose files are "
                  f"{', '.join(r.files)}: a VM moves whole (--vm {r.name})")


def when(rec: VMRecord) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.at))


def may_hand_off(rec: VMRecord | None, mount: str) -> None:
    """A host hands off (or syncs) a VM only as its owner, with no split brain open."""
    if rec is None or (rec.role == OWNER and not rec.split_brain):
        return
    name = rec.name
    if rec.role == OWNER:
        sb = rec.split_brain or {}
        raise Refusal(f"split brain: VM {name} is this host's at generation {rec.generation} "
                      f"and {sb.get('peer', 'another host')}'s at generation "
                      f"{sb.get('generation')}; stop the copy you drop, then run 'migrator "
                      f"resolve --mount {mount} --vm {name} --retire-here' on its host "
                      "(--resume-here on the one you keep)")
    if rec.role == HANDING_OFF:
        raise Refusal(f"the handoff of VM {name} to {rec.peer} (migration {rec.migration}) "
                      f"was never settled ({rec.detail or 'the VM may run there'}): run "
                      f"'migrator resolve --mount {mount} --to {rec.peer} --key-file KEY' "
                      "first")
    if rec.role == RETIRED:
        raise Refusal(f"VM {name} left this host: it was handed to {rec.peer} at generation "
                      f"{rec.generation} on {when(rec)} and runs there; to take it back, "
                      "migrate it from there to here")
    if rec.role == REPLICA:
        raise Refusal(f"VM {name} is a replica here, kept by 'migrator sync' from {rec.peer} "
                      "(its owner): the VM runs there; migrate it from there")
    raise Refusal(f"VM {name} is not runnable here: the migration from {rec.peer} "
                  f"({rec.migration}) {'is running' if rec.role == INCOMING else 'did not finish'}"
                  "; its owner is there")


def vm_to_hand_off(records: list[VMRecord], files: list[str], name: str | None,
                   mount: str) -> VMRecord | None:
    """find_vm, then may_hand_off: the VM these files are, which this host may hand off
    (None: a new VM). What a VM's role forbids is said before how it was named."""
    try:
        rec = find_vm(records, files, name)
    except Refusal:
        for r in records:
            if set(r.files) & set(files):
                may_hand_off(r, mount)
        raise
    may_hand_off(rec, mount)
    return rec


@dataclass
class Admission:
    record: VMRecord  # the VM's record as the session begins (role incoming or replica)
    dropped: list[VMRecord]  # records of other, stale VMs whose files it takes over
    before: VMRecord | None  # what this host knew of the VM before


def admit(records: list[VMRecord], vm: str, name: str, files: list[str], generation: int,
          peer: str, migration: str, *, replica: bool = False,
          force: bool = False) -> Admission:
    """May an incoming migration (or sync) of VM `vm`, owned by `peer` at `generation`,
    write these files here? Refusal if not; the records to write if so."""
    own = next((r for r in records if r.id == vm), None)
    if own is not None and own.role == HANDING_OFF and generation >= own.next_generation:
        # The VM this host was handing off comes back from an owner at that generation or
        # later: the handoff happened (its copy here is history), whatever was never settled.
        own = retired(own, f"{peer} owns it at generation {generation}: the handoff took")
    if own is not None and not force:
        if own.role in RUNS_HERE:
            raise Refusal(
                f"split brain: VM {own.name} is this host's at generation {own.generation} "
                f"({own.role}), and the source says it owns it at generation {generation}; "
                "neither copy is overwritten: stop the one you drop, then 'migrator resolve "
                "--retire-here' on its host", owner_generation=own.generation)
        if own.role == RETIRED and own.generation > generation:
            raise Refusal(f"VM {own.name} left this host at generation {own.generation}, "
                          f"later than the source's {generation}: the source's copy is "
                          "stale; the VM runs where it went from here "
                          f"({own.peer})")
    dropped: list[VMRecord] = []
    want = set(files)
    for r in records:
        if r.id == vm or not want & set(r.files):
            continue
        if r.role in KEPT_HERE and not force:
            shared = sorted(want & set(r.files))[0]
            what = {REPLICA: f"is a replica of VM {r.name} here (sync from {r.peer})",
                    INCOMING: f"belongs to VM {r.name}, arriving here from {r.peer}"}.get(
                r.role, f"belongs to VM {r.name}, which runs here ({r.role}, generation "
                f"{r.generation})")
            raise Refusal(f"refusing to overwrite: {shared} {what}; stop it there first, or "
                          "run 'migrator serve' with --force")
        dropped.append(r)
    if own is not None and own.role in RUNS_HERE and force:
        own = own.became(INCOMPLETE, detail="overwritten by hand (--force)")
    base = own or VMRecord(vm, name, list(files))
    rec = base.became(REPLICA if replica else INCOMING, generation=generation, peer=peer,
                      migration=migration, event="sync" if replica else "incoming")
    rec.name, rec.files, rec.lineage, rec.split_brain, rec.forced = name, list(files), None, \
        None, False
    return Admission(rec, dropped, own)


def took(rec: VMRecord, generation: int) -> VMRecord:
    """The Commit: this host owns the VM from now on (written before it starts it)."""
    if generation != rec.next_generation:
        raise Refusal(f"bad peer: Commit of generation {generation}, but the VM came at "
                      f"generation {rec.generation} (expected {rec.next_generation})")
    return rec.became(OWNER, generation=generation, event="took",
                      detail=f"handed to this host by {rec.peer}")


def incoming_ended(rec: VMRecord, why: str, before: VMRecord | None = None) -> VMRecord:
    """An incoming migration that ended before the Commit, or whose VM failed to start (then
    the take is undone: the VM stays at the source's generation). A host that had retired
    the VM stays retired, as it was (its copy is no replica any more: partly overwritten);
    any other copy is incomplete."""
    if before is not None and before.role == RETIRED:
        out = rec.became(RETIRED, generation=before.generation, peer=before.peer,
                         event="incoming-ended",
                         detail=f"{why}; these files are partly overwritten, not runnable")
        out.lineage = None
        return out
    gen = rec.generation - 1 if rec.role == OWNER else rec.generation
    return rec.became(INCOMPLETE, generation=gen, detail=why)


def begin_handoff(rec: VMRecord, to: str, migration: str, suspend: str) -> VMRecord:
    """Before the suspend, durably: from the Commit on the VM may run at `to`."""
    out = rec.became(HANDING_OFF, peer=to, migration=migration,
                     detail="switching over: the destination may run the VM")
    out.suspend = suspend
    return out


def handoff_off(rec: VMRecord, why: str, resumed: bool) -> VMRecord:
    """Back to owner as it was: the Commit was never sent, or the destination refused."""
    return rec.became(OWNER, detail=why, event="resumed" if resumed else "kept")


def retired(rec: VMRecord, why: str, lineage: dict[str, Any] | None = None) -> VMRecord:
    """The destination holds the VM at the next generation: the copy here is history."""
    out = rec.became(RETIRED, generation=rec.next_generation, detail=why)
    out.lineage, out.split_brain = lineage, None
    return out


def unverified(rec: VMRecord, why: str) -> VMRecord:
    """It runs there on a copy that failed verification: still unsettled, kept suspended."""
    return rec.became(HANDING_OFF, detail=f"unverified: {why}", event="unverified")


def resumed_by_hand(rec: VMRecord) -> VMRecord:
    """`resolve --resume-here`: a person says the copy there is stopped. The generation is
    the one the destination may hold too, so if it did take the VM the two owners meet as a
    split brain, never as a stale copy quietly overwritten."""
    gen = rec.next_generation if rec.role == HANDING_OFF else rec.generation
    out = rec.became(OWNER, generation=gen, detail="resumed here by hand (--resume-here)",
                     event="resumed-by-hand")
    out.forced, out.split_brain = True, None
    return out


def retired_by_hand(rec: VMRecord) -> VMRecord:
    """`resolve --retire-here`: a person says the VM runs elsewhere."""
    gen = rec.next_generation if rec.role == HANDING_OFF else rec.generation
    out = rec.became(RETIRED, generation=gen, detail="retired here by hand (--retire-here)",
                     event="retired-by-hand")
    out.split_brain = None
    return out


def split_brain(rec: VMRecord, peer: str, generation: int) -> VMRecord:
    out = rec.became(rec.role, detail=f"split brain: {peer} says it owns the VM at "
                     f"generation {generation}", event="split-brain")
    out.split_brain = {"peer": peer, "generation": generation, "at": time.time()}
    return out


def answer(records: list[VMRecord], migration: str, absent: int = 0) -> tuple[str, int, str]:
    """(status, generation, detail) of this host about `migration`, for a source's Query.

    Asked only while no session of it runs, so an incoming record there never will be
    taken: a refusal. A host that took the VM then and handed it on since still took it."""
    for rec in records:
        took_it = [h for h in rec.history if h.get("event") == "took"
                   and h.get("migration") == migration]
        if took_it:
            gen = int(took_it[-1]["generation"])
            if rec.role == OWNER and rec.migration == migration and absent:
                return INCOMPLETE_ANSWER, gen, (
                    f"VM {rec.name} was handed to this host at generation {gen}, but its "
                    f"copy still lacks {absent} post-copy blocks")
            now = "" if rec.role == OWNER and rec.generation == gen else (
                f"; it is {rec.role} here now, at generation {rec.generation}")
            return OWNER, gen, f"VM {rec.name} was handed to this host at generation {gen}{now}"
        ended = any(h.get("migration") == migration and h.get("event") in (
            INCOMPLETE, "incoming-ended") for h in rec.history)
        if ended or (rec.migration == migration and rec.role == INCOMING):
            return REFUSED, rec.generation, (f"this host never took the VM ({rec.name}, "
                                             f"{rec.role}: {rec.detail or 'not runnable'})")
    return UNKNOWN, 0, f"no record of migration {migration} here"


def reattachable(records: list[VMRecord], migration: str, generation: int
                 ) -> tuple[VMRecord | None, str, str]:
    """The record a source that lost its link after Commit may go on with: (record, status,
    detail); the record only when it says owner of that migration at that generation."""
    status, gen, detail = answer(records, migration)
    rec = next((r for r in records if r.migration == migration), None)
    if status != OWNER or rec is None or rec.role != OWNER:
        return None, status if status != OWNER else UNKNOWN, detail
    if gen != generation:
        return None, UNKNOWN, (f"this host holds migration {migration} at generation {gen}, "
                               f"not {generation}")
    return rec, OWNER, detail


def settle(answer_status: str) -> str | None:
    """What a source with an unsettled handoff does on the destination's answer: "retire"
    (the destination has the VM), "resume" (it never will), or None (a person decides)."""
    return {OWNER: "retire", REFUSED: "resume"}.get(answer_status)


def describe(rec: VMRecord, arriving: bool = True) -> str:
    """One line for a person on this host; `resolve`, `migrator status` and `blkfs status`
    say the same. `arriving`: an incoming VM's serve still takes it (its status is live)."""
    head = f"VM {rec.name} ({', '.join(rec.files)}): {rec.role} at generation {rec.generation}"
    if rec.split_brain:
        sb = rec.split_brain
        return (f"{head}: SPLIT BRAIN: {sb.get('peer')} claims it at generation "
                f"{sb.get('generation')}; a person decides which copy stays (resolve "
                "--retire-here on the other)")
    tail = {
        OWNER: ("the VM is this host's" + (f" (it came from {rec.peer})" if rec.peer else "")
                + ("; resumed by hand" if rec.forced else "")
                + "; if it is not running, start it from these files"),
        HANDING_OFF: f"handed to {rec.peer}, unsettled: 'migrator resolve' settles it",
        RETIRED: f"runs at {rec.peer}; this copy is history (migrate it back from there)",
        REPLICA: f"a replica kept by sync from {rec.peer}, not runnable",
        INCOMING: f"arriving from {rec.peer}, not runnable yet" if arriving else (
            f"from {rec.peer}, NOT RUNNABLE: no serve on this host takes it now (its serve is "
            "gone; it will not finish)"),
        INCOMPLETE: f"from {rec.peer}, not runnable: the migration did not finish",
    }[rec.role]
    return f"{head}: {tail}" + (f" [{rec.detail}]" if rec.detail and rec.role != OWNER else "")


def summary(rec: VMRecord) -> dict[str, Any]:
    """The record as `migrator status --json` lists it."""
    return {"id": rec.id, "name": rec.name, "files": rec.files, "generation": rec.generation,
            "role": rec.role, "peer": rec.peer, "at": rec.at, "migration": rec.migration,
            "detail": rec.detail, "split_brain": rec.split_brain, "forced": rec.forced,
            "history": rec.history}


# -- records of the migrator before VM identity (read once, converted) --------------------------

LEGACY_SOURCE = ".migration-source.json"
LEGACY_DEST = ".migration-state.json"
LEGACY_SYNC = ".migration-sync.json"
LEGACY_DIGESTS = ".migration-digests"
LEGACY_NAMESPACE = uuid.UUID("6b1f0a52-3c2e-4f57-9a55-0d1b6c2f7e11")


def from_legacy(source: dict[str, Any] | None, dest: dict[str, Any] | None) -> list[VMRecord]:
    """The VMs that one mount's last source record and last destination record speak of.
    Their id is derived from their file names, so both hosts of a VM convert to the same."""
    out: dict[str, VMRecord] = {}
    candidates: list[tuple[int, VMRecord]] = []
    if source and isinstance(source.get("files"), list):
        files = [str(f) for f in source["files"]]
        state = source.get("state")
        role = {"retired": RETIRED, "handed-off": HANDING_OFF, "unverified": HANDING_OFF}.get(
            str(state), OWNER)
        gen = int(source.get("epoch", 0))
        rec = VMRecord(_legacy_id(files), default_name(files), files,
                       generation=gen if role == RETIRED else max(gen - 1, 0), role=role,
                       peer=str(source.get("to", "")), migration=str(source.get("migration", "")),
                       detail=str(source.get("detail", "")), suspend=str(source.get("suspend", "")),
                       lineage=source.get("lineage") if role == RETIRED else None)
        candidates.append((gen, rec))
    if dest and isinstance(dest.get("files"), list):
        files = [str(f.get("name")) for f in dest["files"] if isinstance(f, dict)]
        status = dest.get("status")
        role = (OWNER if dest.get("owner") and status in ("running", "complete")
                else REPLICA if status == "replica" else INCOMPLETE)
        gen = int(dest.get("epoch", 0))
        rec = VMRecord(_legacy_id(files), default_name(files), files, generation=gen,
                       role=role, peer=str(dest.get("source", "")),
                       migration=str(dest.get("migration", "")),
                       dest_record=DestRecord.from_dict(dest))
        if role == OWNER:
            rec.history.append({"at": time.time(), "event": "took", "generation": gen,
                                "migration": rec.migration, "role": OWNER})
        candidates.append((gen, rec))
    for _, rec in sorted(candidates, key=lambda c: c[0]):  # the later handoff wins
        rec.event("converted", detail="from the records of an older migrator")
        out[rec.id] = rec
    return list(out.values())


def _legacy_id(files: list[str]) -> str:
    return str(uuid.uuid5(LEGACY_NAMESPACE, "\0".join(sorted(files))))
