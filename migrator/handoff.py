"""The handoff's bookkeeping on each side: this host's record of the VM, changed only as the
rules say (ownership.py), each change durable before it is acted on (docs/migration.md, "The
handoff"). The engine classes (Source, DestSession) move blocks; they ask these what they may
do and tell them what happened.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from . import ownership as own
from .errors import BadPeer, MigrationError
from .ownership import HANDING_OFF, OWNER, DestRecord, DestStatus, VMRecord
from .vmrecords import VMRecords


class Refused(MigrationError):
    """An ownership rule refused an incoming session before anything was written here;
    `owner_generation` >= 0 if this host owns the VM itself (a split brain)."""

    def __init__(self, text: str, owner_generation: int = -1) -> None:
        super().__init__(text)
        self.owner_generation = owner_generation


class SourceHandoff:
    """The source's record of the VM: owner while it copies, handing-off from just before
    the suspend, then retired (verified), back to owner (refused, or failed before the
    Commit), or still handing-off (unsettled: resolve)."""

    def __init__(self, records: VMRecords, mount: str, to: str, suspend: str,
                 migration: str) -> None:
        self.records, self.mount, self.to, self.suspend = records, mount, to, suspend
        self.migration = migration
        self.vm: VMRecord | None = None
        self.commit_sent = False  # from the first byte of Commit on, the VM may run there

    def open(self, names: list[str], vm_name: str | None) -> VMRecord:
        """The VM these files are, if this host may hand it off; a new one if it never knew
        them (owned here from now on)."""
        try:
            rec = own.vm_to_hand_off(self.records.all(), names, vm_name, self.mount)
        except own.Refusal as exc:
            raise MigrationError(str(exc)) from None
        if rec is None:
            rec = own.new_vm(names, vm_name, self.suspend)
            self.records.put(rec)
        self.vm = rec
        return rec

    @property
    def record(self) -> VMRecord:
        assert self.vm is not None
        return self.vm

    def _put(self, rec: VMRecord) -> None:
        self.records.put(rec)
        self.vm = rec

    @property
    def generation(self) -> int:
        """The generation a Commit hands the VM over as."""
        return self.record.next_generation

    def begin(self) -> None:
        """Before the suspend: from the Commit on, the VM may run at the destination."""
        self._put(own.begin_handoff(self.record, self.to, self.migration, self.suspend))

    @property
    def handed_off(self) -> bool:
        """The VM was given up (Commit sent): it must not run here again unless settled."""
        return self.commit_sent and self.vm is not None and self.vm.role == HANDING_OFF

    def retire(self, lineage: dict[str, Any] | None) -> None:
        self._put(own.retired(self.record, "the destination verified its copy", lineage))

    def unverified(self, why: str) -> None:
        self._put(own.unverified(self.record, why))

    def failed(self, reason: str, refused: bool, owner_generation: int) -> str | None:
        """A migration that failed: the record as it was, unless the Commit went out and the
        destination did not refuse (then it stays handing-off, for resolve); a destination
        that owns the VM itself is a split brain, recorded here too. Returns what went wrong
        writing the record, if anything did."""
        vm = self.vm
        if vm is None:
            return None
        try:
            if vm.role == HANDING_OFF and (not self.handed_off or refused):
                why = (f"the destination refused: {reason}" if self.commit_sent
                       else f"aborted before the handoff: {reason}")
                self._put(own.handoff_off(vm, why, resumed=self.commit_sent))
            if owner_generation >= 0 and self.record.role == OWNER:
                self._put(own.split_brain(self.record, self.to, owner_generation))
        except MigrationError as exc:
            return str(exc)
        return None


class DestHandoff:
    """The destination's record of the incoming VM, with the session's state kept in it:
    incoming (or replica) from the Manifest on, owner from the Commit (before the VM starts),
    incomplete if the session ends before it."""

    def __init__(self, records: VMRecords, force: bool) -> None:
        self.records, self.force = records, force
        self.vm: VMRecord | None = None
        self.before: VMRecord | None = None  # what this host knew of the VM before
        self.dest_record: DestRecord | None = None  # this session's (None before begin)

    def admit(self, vm: str, name: str, files: list[str], generation: int, peer: str,
              migration: str, replica: bool) -> own.Admission:
        """May this session write these files? Refused if not (a split brain recorded);
        nothing is written yet either way (begin() does)."""
        if not vm:
            raise BadPeer("its Manifest names no VM")
        try:
            return own.admit(self.records.all(), vm, name, files, generation, peer, migration,
                             replica=replica, force=self.force)
        except own.Refusal as exc:
            if exc.owner_generation is not None:  # this host owns it too: say so, keep it
                mine = self.records.get(vm)
                if mine is not None:
                    self.records.put(own.split_brain(mine, peer, generation))
            raise Refused(str(exc), -1 if exc.owner_generation is None
                          else exc.owner_generation) from None

    def begin(self, got: own.Admission, dest_record: DestRecord) -> None:
        """Durably, before any file is touched; the stale VMs whose files it takes go."""
        self.vm, self.before, self.dest_record = got.record, got.before, dest_record
        self.save()
        for stale in got.dropped:
            self.records.drop(stale.id)

    def resume(self, rec: VMRecord) -> None:
        """A reattached session goes on with the record the broken one left."""
        # (a record converted from an older migrator may lack the session's part)
        self.vm = rec
        self.dest_record = rec.dest_record or DestRecord(rec.migration, rec.peer,
                                                         DestStatus.RUNNING)

    def save(self, vm: VMRecord | None = None, **changes: Any) -> None:
        """The session's record, changed, into the VM's record, durably (with the VM's new
        role). A change of a field DestRecord does not have is a TypeError."""
        assert self.dest_record is not None
        self.dest_record = replace(self.dest_record, **changes)
        if vm is not None:
            self.vm = vm
        assert self.vm is not None
        self.vm.dest_record = self.dest_record
        self.records.put(self.vm)

    @property
    def owner(self) -> bool:
        """This host took the VM: it runs here from now on, whatever happens to the source."""
        return self.vm is not None and self.vm.role == OWNER

    def take(self, generation: int) -> None:
        """The Commit, before the VM is started."""
        assert self.vm is not None
        try:
            took = own.took(self.vm, generation)
        except own.Refusal as exc:
            raise MigrationError(str(exc)) from None
        self.save(took, status=DestStatus.RUNNING, taken_at=time.time())

    def refuse(self, why: str, status: DestStatus, **changes: Any) -> None:
        """The session ends before the VM runs here (or its start failed): not runnable."""
        assert self.vm is not None
        vm = self.vm
        if vm.role in (own.INCOMING, OWNER):  # (once: a refused start ends it already)
            vm = own.incoming_ended(vm, why, self.before)
        self.save(vm, status=status, **changes)

    def answer(self, migration: str, absent: int) -> tuple[str, int, str]:
        return own.answer(self.records.all(), migration, absent)

    def reattachable(self, migration: str, generation: int
                     ) -> tuple[VMRecord | None, str, str]:
        return own.reattachable(self.records.all(), migration, generation)
