"""What one host knows of the VMs of a mount, on disk: ``BACKING/.blkfs/vms/<id>/``.

Each VM's record (ownership.VMRecord), its digest log and its sync record (lineage), kept
under the backing directory, where the mount (and so the VM) never shows them. The records
written inside the downtime are RecordFiles: in place, pre-sized, one fdatasync.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Protocol

from . import ownership as own
from .errors import MigrationError
from .ownership import VMRecord

log = logging.getLogger(__name__)

META = ".blkfs"  # the daemon's directory at the backing root: the mount never shows it
VMS = os.path.join(META, "vms")  # under it: one directory of records per VM
# Names a migration may not write: the daemon's directory, and the old records (read once,
# converted: a file of that name sent by a peer would be taken for one)
RESERVED = {META, own.LEGACY_SOURCE, own.LEGACY_DEST, own.LEGACY_SYNC, own.LEGACY_DIGESTS}


class VMRecords(Protocol):
    """What one host knows of the VMs of a mount (ownership.VMRecord), and each VM's digest
    log and sync record (lineage), kept where the VM's files do not show them."""

    def all(self) -> list[VMRecord]: ...

    def get(self, vm: str) -> VMRecord | None: ...

    def put(self, rec: VMRecord) -> None:
        """Durably, before the caller acts on it (one write and one fdatasync)."""
        ...

    def drop(self, vm: str) -> None: ...

    def read_sync(self, vm: str) -> dict[str, object] | None: ...

    def write_sync(self, vm: str, record: dict[str, object]) -> None: ...

    def read_digests(self, vm: str) -> bytes | None: ...

    def write_digests(self, vm: str, data: bytes) -> None: ...

    def close(self) -> None: ...


def read_json(path: str) -> dict[str, object] | None:
    """A JSON record, or None if there is none (or it is not a record: unreadable counts as
    absent, and the callers then treat the migration as unknown, never as settled)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def write_file_durably(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)  # a torn file never replaces a whole one


class RecordFile:
    """A small JSON record (an ownership record) made durable with one write and one
    fdatasync: rewritten in place, padded to a size fixed when it is first written.

    A handoff writes one of these inside the downtime, so the usual tmp file, fsync, rename
    and directory fsync (four round trips through FUSE, 3-7 ms measured) would not do. The
    first write allocates the whole padded size and syncs it, so no later write needs a new
    block: ENOSPC cannot strike after that point. Trailing spaces keep the file valid JSON;
    a write torn by a crash reads as no record, which every reader treats as unknown (never
    as settled)."""

    MIN_SIZE = 16 << 10

    def __init__(self, directory: str, name: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, name)
        self.fd: int | None = None
        self.size = 0

    def read(self) -> dict[str, object] | None:
        return read_json(self.path)

    def write(self, obj: dict[str, object]) -> None:
        body = json.dumps(obj, indent=1).encode()
        size = max(self.MIN_SIZE, -(-(len(body) + 1) // 4096) * 4096)
        data = body.ljust(size - 1) + b"\n"
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self.size = os.fstat(self.fd).st_size
            new = self.size == 0
        else:
            new = False
        os.pwrite(self.fd, data, 0)
        if size < self.size:
            os.ftruncate(self.fd, size)
        if size != self.size or new:
            os.fsync(self.fd)  # the size (and the blocks) are new: metadata too
            if new:
                dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            self.size = size
        else:
            os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


def mount_relative(mount: str, name: str) -> str:
    """A FILE of the command line as the mount's relative name: relative to the mount,
    absolute under it, or through a symlink to a file under it all mean the same file."""
    root = os.path.realpath(mount)
    full = os.path.realpath(name if os.path.isabs(name) else os.path.join(root, name))
    if full == root or os.path.commonpath([full, root]) != root:
        raise MigrationError(f"{name} is not a file under the mount {mount}")
    return os.path.relpath(full, root)


class RecordDir:
    """The VM records of one mount: ``BACKING/.blkfs/vms/<id>/`` holds the VM's record, its
    digest log and its sync record. Outside what the mount shows (the VM never sees them,
    nor lists them), and on the backing filesystem itself: a record written inside the
    downtime costs one pwrite and one fdatasync, without a FUSE round trip.

    Records of the migrator before VM identity (``.migration-*`` files at the top of the
    mount) are converted the first time the directory is read, and moved under
    ``.blkfs/legacy/``."""

    def __init__(self, backing: str) -> None:
        self.backing = backing
        self.root = os.path.join(backing, VMS)
        self.open: dict[str, RecordFile] = {}
        self._legacy_done = False

    def _dir(self, vm: str) -> str:
        if not vm or "/" in vm or vm.startswith("."):
            raise MigrationError(f"bad VM id {vm!r}")
        return os.path.join(self.root, vm)

    def all(self) -> list[VMRecord]:
        self._convert_legacy()
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        out = []
        for vm in names:
            rec = self.get(vm)
            if rec is not None:
                out.append(rec)
        return out

    def get(self, vm: str) -> VMRecord | None:
        self._convert_legacy()
        d = read_json(os.path.join(self._dir(vm), "record.json"))
        rec = VMRecord.from_dict(d) if d else None
        if d and rec is None:
            log.warning("unreadable VM record %s: counted as unknown", vm)
        return rec

    def put(self, rec: VMRecord) -> None:
        f = self.open.get(rec.id)
        try:
            if f is None:
                d = self._dir(rec.id)
                os.makedirs(d, mode=0o700, exist_ok=True)
                f = self.open[rec.id] = RecordFile(d, "record.json")
            f.write(rec.to_dict())
        except OSError as exc:
            raise MigrationError(f"cannot write the record of VM {rec.name} in {self.root}: "
                                 f"{exc.strerror}") from None

    def drop(self, vm: str) -> None:
        f = self.open.pop(vm, None)
        if f is not None:
            f.close()
        d = self._dir(vm)
        for name in ("record.json", "sync.json", "digests"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(d, name))
        with contextlib.suppress(OSError):
            os.rmdir(d)

    def read_sync(self, vm: str) -> dict[str, object] | None:
        return read_json(os.path.join(self._dir(vm), "sync.json"))

    def write_sync(self, vm: str, record: dict[str, object]) -> None:
        os.makedirs(self._dir(vm), mode=0o700, exist_ok=True)
        f = RecordFile(self._dir(vm), "sync.json")
        try:
            f.write(record)
        except OSError as exc:
            raise MigrationError(f"cannot write the sync record in {self.root}: "
                                 f"{exc.strerror}") from None
        finally:
            f.close()

    def read_digests(self, vm: str) -> bytes | None:
        try:
            with open(os.path.join(self._dir(vm), "digests"), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_digests(self, vm: str, data: bytes) -> None:
        os.makedirs(self._dir(vm), mode=0o700, exist_ok=True)
        write_file_durably(os.path.join(self._dir(vm), "digests"), data)

    def _convert_legacy(self) -> None:
        if self._legacy_done:
            return
        self._legacy_done = True
        top = {n: os.path.join(self.backing, n) for n in (
            own.LEGACY_SOURCE, own.LEGACY_DEST, own.LEGACY_SYNC, own.LEGACY_DIGESTS)}
        if not any(os.path.exists(p) for p in top.values()):
            return
        src, dst = read_json(top[own.LEGACY_SOURCE]), read_json(top[own.LEGACY_DEST])
        sync = read_json(top[own.LEGACY_SYNC])
        blob = None
        with contextlib.suppress(FileNotFoundError), open(top[own.LEGACY_DIGESTS], "rb") as f:
            blob = f.read()
        for rec in own.from_legacy(src, dst):
            if self.get(rec.id) is None:
                self.put(rec)
            if blob is not None:  # (tagged: a reader that expects another tag ignores it)
                self.write_digests(rec.id, blob)
            if sync and isinstance(sync.get("files"), dict) and set(sync["files"]) <= set(
                    rec.files):
                self.write_sync(rec.id, sync)
        keep = os.path.join(self.backing, META, "legacy")
        os.makedirs(keep, mode=0o700, exist_ok=True)
        for name, path in top.items():
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, os.path.join(keep, name))
        log.warning("converted the migration records of %s to VM records (the old ones are "
                    "in %s)", self.backing, keep)

    def close(self) -> None:
        for f in self.open.values():
            f.close()
        self.open.clear()


