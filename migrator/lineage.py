"""Lineage: knowing, without reading a block, that a destination's replica equals the source's
files as of an epoch, so a migration sends only the blocks written since. Pure.

`migrator sync` leaves two records, each among the VM's records (vmrecords.RecordDir). On the
source (the VM's sync record): for each file, the blkfs epoch its last acknowledged round ended
(its swap) and the file's size. On the destination (its VM record's incoming state,
``replica.lineage``): the same tag and, for each file, the destination's own blkfs epoch after
its swap at that acknowledgement; beside it a digest log of every block, tagged the same,
written when the session ended with nothing sent after the acknowledgement.

A migration may then skip a file's unchanged blocks when both sides prove it:

* the source: the epoch its first swap ends is the one right after the recorded one (no swap
  in between: no other sync or migrate, no unclean restart — blkfs then starts a file again at
  epoch 0, all dirty — no file replaced), its size is the recorded one, and the daemon never
  lost track of a write (``trust_lost``); its first swap's dirty set is then exactly what
  changed since the replica's epoch;
* the destination: its record names the same tag, its digest log carries it, and its own swap
  of the file ends the recorded epoch with nothing dirty (nobody wrote the replica since);
  its size is the manifest's.

Anything else falls back to the digests (delta.py), file by file, and the report says why.
The verification still compares every block, so a broken proof costs a failed verification,
never a silent wrong byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Extent = tuple[int, int]


BACK = "switchover"  # the epoch of a migration's own lineage: its files at the switchover


def tag(sync: str, epoch: int | str) -> str:
    """The name of a replica as of an epoch (the digest log's and the Manifest's)."""
    return f"{sync}@{epoch}"


def sync_record(sync: str, to: str, epoch: int | str, files: dict[str, tuple[int, int]],
                now: float) -> dict[str, Any]:
    """The source's record after an acknowledged epoch: {name: (epoch its swap ended, size)}."""
    return {"sync": sync, "to": to, "epoch": epoch, "tag": tag(sync, epoch), "at": now,
            "files": {n: {"epoch": e, "size": s} for n, (e, s) in files.items()}}


@dataclass
class SourceProof:
    tag: str  # "" if no file qualifies
    files: list[str]  # whose every write since the tag's epoch is in the first swap's set
    why_not: dict[str, str]  # the others, and why


def source_proof(record: dict[str, Any] | None, ended: dict[str, tuple[int | None, int]],
                 trust_lost: bool) -> SourceProof:
    """Which files the source can vouch for: `ended` is {name: (epoch the migration's first
    swap ended, size)} and `record` the sync record of this mount (or None)."""
    if not record or not isinstance(record.get("files"), dict) or not record.get("tag"):
        return SourceProof("", [], {n: "no sync record here" for n in ended})
    if trust_lost:
        return SourceProof("", [], {n: "blkfs may have missed a write on this mount (trust "
                                    "lost): see its log" for n in ended})
    ok: list[str] = []
    why: dict[str, str] = {}
    for name, (epoch, size) in ended.items():
        rec = record["files"].get(name)
        if not isinstance(rec, dict):
            why[name] = "not in the last sync"
        elif epoch is None or epoch != int(rec.get("epoch", -2)) + 1:
            why[name] = (f"its blkfs epoch moved on since the sync (epoch {epoch}, the sync "
                         f"left it at {rec.get('epoch')}): another swap, or an unclean restart")
        elif size != rec.get("size"):
            why[name] = f"its size changed since the sync ({rec.get('size')} -> {size})"
        else:
            ok.append(name)
    return SourceProof(str(record["tag"]) if ok else "", ok, why)


def dest_lineage(epochs: dict[str, int], ids: dict[str, int], sizes: dict[str, int],
                 tag_: str) -> dict[str, Any]:
    """What a holder of a replica keeps once it is durable: its own blkfs epoch of each file
    after its swap, the file ids its digest log uses, the sizes, and the replica's tag."""
    return {"tag": tag_, "epochs": dict(epochs), "ids": dict(ids), "sizes": dict(sizes)}


def held_lineage(rec: Any) -> dict[str, Any] | None:
    """The replica this host holds of a VM, if its record (ownership.VMRecord) names one: a
    sync's (role replica), or the copy a migration away from here retired at its switchover
    (role retired: the A of A -> B -> A)."""
    if rec is None:
        return None
    dest = rec.dest_record
    rep = dest.replica if dest is not None else None
    if rec.role == "replica" and rep is not None and isinstance(rep.lineage, dict):
        return rep.lineage
    if rec.role == "retired" and isinstance(rec.lineage, dict):
        return rec.lineage
    return None


def dest_proof(lin: dict[str, Any] | None, tag_: str, names: dict[int, str],
               sizes: dict[int, int], vouched: list[int], own: dict[int, tuple[int, list[Extent]]],
               log_tag: str | None) -> tuple[list[int], str]:
    """Which of the `vouched` files (by id) this host accepts, and why not the others.

    `lin` is held_lineage's; `own` {file id: (epoch its own swap just ended, the extents
    written since)}; `log_tag` the digest log's tag (None: no usable log); `sizes` the
    manifest's, checked against the replica's."""
    if lin is None:
        return [], "no replica here"
    if lin.get("tag") != tag_:
        return [], f"the replica here is {lin.get('tag')}, not {tag_}"
    if log_tag != tag_:
        return [], ("its digest log is missing or of another epoch (the serve stopped before "
                    "the sync did, or a later migration replaced it)")
    epochs, kept = lin.get("epochs") or {}, lin.get("sizes") or {}
    ok: list[int] = []
    why: list[str] = []
    for fid in vouched:
        name = names[fid]
        epoch, dirty = own.get(fid, (None, [(0, 1)]))
        if name not in epochs or kept.get(name) != sizes[fid]:
            why.append(f"{name}: not this size in the replica")
        elif epoch != epochs[name] or dirty:
            why.append(f"{name}: written here since the sync")
        else:
            ok.append(fid)
    return ok, "; ".join(why)
