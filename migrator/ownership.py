"""Who owns the VM: the ownership records of both sides and how a cut handoff is settled.

Pure: records are plain dicts read and written by the stores (stores.py); this module
says what they mean.  The rule (docs/migration.md, "The handoff"):

* the source writes ``handed-off`` durably *before* it sends Commit, and from then on never
  resumes its copy unless the destination refused (an Abort from it, or an Answer
  ``refused``) or a person says so (``migrator resolve --resume-here``);
* the destination writes ``owner`` durably *before* it starts the VM, and never sends Abort
  after that; it refuses (record ``refused``, then Abort) only while it has not started it.

So at most one copy runs: the destination's only after its record says owner, the source's
only after the destination said it never will.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

SOURCE_RECORD = ".migration-source.json"  # on the source mount
DEST_RECORD = ".migration-state.json"  # on the destination mount
DIGEST_LOG = ".migration-digests"  # beside it: what the destination received (digestlog)
SYNC_RECORD = ".migration-sync.json"  # on the source mount: migrator sync's last epoch (lineage)

# Source states
COPYING = "copying"  # before Commit: the VM is the source's
HANDED_OFF = "handed-off"  # Commit sent (or about to be): never resume without settling
RESUMED = "resumed"  # the destination refused: the source runs the VM again
RETIRED = "retired"  # the destination verified its copy: the source copy is gone
UNVERIFIED = "unverified"  # the destination runs it, but its copy failed verification
SETTLED_SOURCE = {COPYING, RESUMED, RETIRED}

# Answers of a destination about a migration (protocol.Answer.status)
OWNER, REFUSED, UNKNOWN = "owner", "refused", "unknown"
INCOMPLETE = "incomplete"  # it took the VM, but its copy still lacks post-copy pages


@dataclass
class SourceRecord:
    migration: str
    epoch: int
    to: str
    suspend: str  # the VM adapter (--suspend), so `resolve` can resume or retire the VM
    files: list[str]
    state: str = COPYING
    detail: str = ""
    updated_at: float = field(default_factory=time.time)
    # Once retired: this copy is a replica of the destination's files as of the switchover
    # (lineage.dest_lineage), for a migration back that trusts it instead of digests
    lineage: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceRecord:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def unsettled(self) -> bool:
        return self.state not in SETTLED_SOURCE


def dest_answer(record: dict[str, Any] | None, migration: str,
                absent: int = 0) -> tuple[str, int, str]:
    """(status, epoch, detail) of a destination record, as an Answer to a Query.

    Only a session that ended may be asked (the destination answers queries while no
    migration runs), so a record that does not say owner is a refusal: the destination
    writes owner before it starts the VM, and will not start it any more. An owner whose
    post-copy still has `absent` blocks is incomplete: the source copy is the only whole
    one, so it must not be retired on that answer."""
    if not record or record.get("migration") != migration:
        have = record.get("migration") if record else None
        return UNKNOWN, 0, (f"no record of migration {migration} here"
                            + (f" (the last one was {have})" if have else ""))
    epoch = int(record.get("epoch", 0))
    if record.get("owner") and absent:
        return INCOMPLETE, epoch, (f"the VM was handed to this host as epoch {epoch}, but its "
                                   f"copy still lacks {absent} post-copy blocks")
    if record.get("owner"):
        return OWNER, epoch, (f"the VM was handed to this host as epoch {epoch} "
                              f"(status {record.get('status')})")
    return REFUSED, epoch, f"this host never took the VM (status {record.get('status')})"


def next_epoch(*records: dict[str, Any] | None) -> int:
    """One more than any epoch either record of this mount has seen."""
    return 1 + max((int(r.get("epoch", 0)) for r in records if r), default=0)


def overwrite_refusal(dest: dict[str, Any] | None, source: dict[str, Any] | None,
                      names: set[str]) -> str | None:
    """Why a new incoming migration must not overwrite these files, or None.

    They belong to a VM that runs here if this mount took a VM (owner, running or complete)
    with any of these files and has not handed it on since (a later, retired source
    record of this mount)."""
    if not dest or not dest.get("owner") or dest.get("status") not in ("running", "complete"):
        return None
    files = dest.get("files", [])
    mine = {f.get("name") for f in files if isinstance(f, dict)} & names
    if not mine:
        return None
    if source and source.get("state") == RETIRED and int(source.get("epoch", 0)) > int(
            dest.get("epoch", 0)):
        return None  # the VM left this host again since
    return (f"{sorted(mine)[0]} belongs to the VM of migration {dest.get('migration')}, which "
            f"runs here (status {dest.get('status')})")


def settle(answer: str) -> str | None:
    """What a source with an unsettled handoff does on the destination's answer: "retire"
    (the destination has the VM), "resume" (it never will), or None (a person decides)."""
    return {OWNER: "retire", REFUSED: "resume"}.get(answer)
