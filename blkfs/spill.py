"""Spill-area slots: headers, generations and the free list (pure; groundwork for post-copy).

The spill area (DESIGN.md, flow 4) is a slot file of N slots of one block each
plus a table of slot headers.  A slot is (re)allocated from a free list, and
every allocation bumps its *generation*.  A slot whose page the destination
installed goes back on the free list **with its content intact**, so a late
reader may still use it — but only if the header still shows the generation
that reader was told, before and after it read the data, and the data's hash
matches the header.  Otherwise the read is refused and the reader falls back
(to a demand fetch from the source).

Every slot and the manifest carry a MAC keyed from the migration's shared key (`spill_key`:
the destination's daemon gets only that derived key): the area may sit on storage other
hosts can write, and xxh3 is a checksum, not a MAC.  A slot whose MAC does not verify (a
forgery, or a torn read of a slot being rewritten) is refused like a stale one.

The rules (SlotHeader, SlotAllocator, checked_read, summarize) are pure;
SpillArea is the plain-file I/O over a spill directory (no trio, no FUSE), so
the source migrator, the destination daemon and `blkfs spill` share it.
docs/spill.md has the on-disk format.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import struct
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import xxhash

# file_id u32, block u64, generation u64, length u32, xxh3 u64, flags u32, mac 16 B
_HEADER = struct.Struct("<IQQIQI16s")
HEADER_SIZE = 64  # on disk, padded: room to grow without moving slots
FLAG_FILLED = 1  # the slot holds a page (content written and hashed)
FLAG_FREE = 2  # the destination installed that page: reusable, content kept
SPILL_VERSION = 2  # 2: slot and manifest MACs
MAC_SIZE = 16  # keyed BLAKE2b-128 over (file_id, block, generation, length, data)
_MAC_FIELDS = struct.Struct("<IQQI")
MANIFEST_NAME, HEADERS_NAME, SLOTS_NAME = "manifest.json", "headers", "slots"
FLUSHED_NAME = "flushed.json"  # written by the source once every page is in (mark_flushed)
# The one file the destination writes: per slot (u64 LE), the generation of the page it last
# installed from it, so a source cut off from the destination can still reuse those slots.
INSTALLED_NAME = "installed"
_GEN = struct.Struct("<Q")
MAX_SLOTS = 1 << 24


REF = struct.Struct(">IQIQ")  # a spill ref on the wire: file_id, block, slot, generation


def pack_refs(refs: Iterable[tuple[int, int, int, int]]) -> bytes:
    """Spill refs as the migration frames and the control socket carry them."""
    return b"".join(REF.pack(*r) for r in refs)


def unpack_refs(data: bytes) -> list[tuple[int, int, int, int]]:
    if len(data) % REF.size:
        raise ValueError(f"{len(data)} bytes of spill refs are not {REF.size}-byte records")
    return list(REF.iter_unpack(data))


class Refused(enum.Enum):
    """Why a slot read was not used (each is counted; the block is fetched or missing)."""

    STALE = "stale"  # the slot holds another generation, page or nothing: reused, or unfilled
    TORN = "torn"  # the header changed during the read, or the data does not match its xxh3
    FORGED = "forged"  # consistent data and xxh3, but not the MAC: written without the key


class SpillError(Exception):
    pass


def spill_key(shared_key: bytes, migration: str) -> bytes:
    """The key of one migration's spill area, derived from the shared key (HMAC-SHA256 as a
    PRF): whoever holds it can write slots of that migration only, and the daemon that reads
    them never holds the shared key itself."""
    return hmac.new(shared_key, b"blkfs spill v2|" + migration.encode(), hashlib.sha256).digest()


def slot_mac(key: bytes, file_id: int, block: int, generation: int, data: bytes) -> bytes:
    m = hashlib.blake2b(key=key, digest_size=MAC_SIZE)
    m.update(_MAC_FIELDS.pack(file_id, block, generation, len(data)))
    m.update(data)
    return m.digest()


def manifest_mac(key: bytes, manifest: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in manifest.items() if k != "mac"}, sort_keys=True,
                      separators=(",", ":")).encode()
    return hmac.new(key, b"manifest|" + body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class SlotHeader:
    file_id: int
    block: int
    generation: int
    length: int
    digest: int
    flags: int = 0
    mac: bytes = bytes(MAC_SIZE)

    def pack(self) -> bytes:
        return _HEADER.pack(self.file_id, self.block, self.generation, self.length,
                            self.digest, self.flags, self.mac).ljust(HEADER_SIZE, b"\0")

    @classmethod
    def unpack(cls, raw: bytes) -> SlotHeader:
        if len(raw) < _HEADER.size:
            raise SpillError(f"slot header of {len(raw)} bytes, need {_HEADER.size}")
        return cls(*_HEADER.unpack_from(raw))


@dataclass(frozen=True, slots=True)
class SlotRef:
    """What a reader is told: where the page is, and which generation holds it."""

    slot: int
    generation: int


class SlotAllocator:
    """The writer's view of N slots: a FIFO free list and a generation per slot.

    FIFO, so a freed slot is reused as late as possible: a late reader of its
    old content has the longest chance to still find a matching generation.
    """

    def __init__(self, nslots: int, generations: list[int] | None = None) -> None:
        if nslots < 1:
            raise SpillError("a spill area needs at least one slot")
        self.nslots = nslots
        self.generations = list(generations) if generations else [0] * nslots
        if len(self.generations) != nslots:
            raise SpillError("one generation per slot")
        self._free: deque[int] = deque(range(nslots))
        self._is_free = bytearray(b"\x01" * nslots)
        self.reuses = 0  # allocations of a slot that had held a page before

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self) -> SlotRef | None:
        """A slot for a new page with its new generation, or None when all are in use."""
        if not self._free:
            return None
        slot = self._free.popleft()
        self._is_free[slot] = 0
        if self.generations[slot]:
            self.reuses += 1
        self.generations[slot] += 1
        return SlotRef(slot, self.generations[slot])

    def in_use(self) -> list[SlotRef]:
        """Every slot allocated and not released, with its generation."""
        return [SlotRef(s, self.generations[s]) for s in range(self.nslots)
                if not self._is_free[s]]

    def release(self, ref: SlotRef) -> bool:
        """The destination installed the page of `ref`: the slot may be reused.

        A stale release (the slot was reallocated since) is ignored: False.
        """
        if not 0 <= ref.slot < self.nslots:
            raise SpillError(f"no slot {ref.slot} in a spill area of {self.nslots}")
        if self._is_free[ref.slot] or self.generations[ref.slot] != ref.generation:
            return False
        self._is_free[ref.slot] = 1
        self._free.append(ref.slot)
        return True


def fill_header(file_id: int, block: int, ref: SlotRef, data: bytes, key: bytes) -> SlotHeader:
    """The header a writer stores with a page in slot `ref`."""
    return SlotHeader(file_id, block, ref.generation, len(data),
                      xxhash.xxh3_64_intdigest(data), FLAG_FILLED,
                      slot_mac(key, file_id, block, ref.generation, data))


def checked_read(
    expect: SlotRef, file_id: int, block: int, before: SlotHeader, data: bytes,
    after: SlotHeader, key: bytes,
) -> bytes | Refused:
    """The page if this read of slot `expect` may be used, else why not (fall back).

    `before` and `after` are the slot's header read before and after `data`.
    Used only when both show the generation the reader was told, describe the
    page it wants, and the data has the recorded length, hash and MAC (invariant 4:
    never a stale, torn or forged page).
    """
    for h in (before, after):
        if (h.generation != expect.generation or not h.flags & FLAG_FILLED
                or h.file_id != file_id or h.block != block):
            return Refused.STALE
    # The writer may mark the slot free meanwhile (content kept): not a change.
    if ((before.length, before.digest, before.mac) != (after.length, after.digest, after.mac)
            or len(data) < before.length):
        return Refused.TORN
    page = data[:before.length]
    if xxhash.xxh3_64_intdigest(page) != before.digest:
        return Refused.TORN  # on GlusterFS: 27 of 4,416 racing reads, headers matching
    if not hmac.compare_digest(slot_mac(key, file_id, block, expect.generation, page),
                               before.mac):
        return Refused.FORGED
    return page


def summarize(headers: Iterable[SlotHeader]) -> dict[str, int]:
    """Counts for an operator: slots holding a page, free (installed) and never used."""
    in_use = free = unused = max_gen = 0
    for h in headers:
        max_gen = max(max_gen, h.generation)
        if h.generation == 0:
            unused += 1
        elif h.flags & FLAG_FREE:
            free += 1
        elif h.flags & FLAG_FILLED:
            in_use += 1
        else:
            in_use += 1  # being written
    return {"in_use": in_use, "free": free, "unused": unused, "max_generation": max_gen}


class SpillArea:
    """A spill directory: ``manifest.json``, ``headers`` (N x 64 B) and ``slots`` (N blocks).

    Only the source writes it (`create`, `put`, `mark_free`, `flush`); the
    destination and `blkfs spill` only read it (`open`, `read`, `scan`).
    A page is written header-first: the new generation without FLAG_FILLED,
    then the data, then the header with FLAG_FILLED and the hash, so a reader
    that overlaps a reallocation sees another generation or a bad hash.
    """

    def __init__(self, path: str, manifest: dict[str, Any], writable: bool,
                 key: bytes | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.key = key  # the spill key: without it the area is for looking at, not reading
        self.migration: str = manifest["migration"]
        self.block_size: int = manifest["block_size"]
        self.nslots: int = manifest["slots"]
        mode = os.O_RDWR if writable else os.O_RDONLY
        self._ifd: int | None = None  # the installed file, opened by the first mark_installed
        self._hfd = os.open(os.path.join(path, HEADERS_NAME), mode | os.O_CLOEXEC)
        try:
            self._sfd = os.open(os.path.join(path, SLOTS_NAME), mode | os.O_CLOEXEC)
        except BaseException:
            os.close(self._hfd)
            raise
        need = (self.nslots * HEADER_SIZE, self.nslots * self.block_size)
        have = (os.fstat(self._hfd).st_size, os.fstat(self._sfd).st_size)
        if have != need:
            self.close()
            raise SpillError(f"spill area {path} is damaged: headers and slots are {have[0]} and "
                             f"{have[1]} bytes, the manifest says {need[0]} and {need[1]}")

    # -- setup ----------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, migration: str, block_size: int, nslots: int,
               files: dict[int, str], key: bytes) -> SpillArea:
        """A fresh area for one migration (any earlier area in `path` is replaced)."""
        if not 1 <= nslots <= MAX_SLOTS:
            raise SpillError(f"--spill-slots must be 1..{MAX_SLOTS}, not {nslots}")
        try:
            os.makedirs(path, exist_ok=True)
            for name in (MANIFEST_NAME, FLUSHED_NAME, HEADERS_NAME, SLOTS_NAME, INSTALLED_NAME):
                try:
                    os.unlink(os.path.join(path, name))
                except FileNotFoundError:
                    pass
            for name, size in ((HEADERS_NAME, nslots * HEADER_SIZE),
                               (SLOTS_NAME, nslots * block_size),
                               (INSTALLED_NAME, nslots * _GEN.size)):
                fd = os.open(os.path.join(path, name), os.O_RDWR | os.O_CREAT | os.O_EXCL
                             | os.O_CLOEXEC, 0o600)
                try:
                    os.posix_fallocate(fd, 0, size)  # reserve it now: no ENOSPC mid-way
                    os.fsync(fd)
                finally:
                    os.close(fd)
            manifest = {
                "version": SPILL_VERSION, "migration": migration, "block_size": block_size,
                "slots": nslots, "header_size": HEADER_SIZE, "created_at": time.time(),
                "files": {str(k): v for k, v in files.items()},
            }
            manifest["mac"] = manifest_mac(key, manifest)
            tmp = os.path.join(path, MANIFEST_NAME + ".tmp")
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(path, MANIFEST_NAME))  # last: the area is ready
        except OSError as exc:
            raise SpillError(f"cannot create the spill area in {path}: {exc.strerror or exc}"
                             ) from None
        return cls(path, manifest, writable=True, key=key)

    @classmethod
    def open(cls, path: str, migration: str | None = None,
             key: bytes | None = None) -> SpillArea:
        """Open an existing area read-only; `migration` must match when given, and with the
        spill `key` the manifest's MAC must verify (pages are read only with a key)."""
        try:
            with open(os.path.join(path, MANIFEST_NAME)) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise SpillError(f"no spill area in {path} (no {MANIFEST_NAME}): give the directory "
                             "the source writes (--spill)") from None
        except (OSError, ValueError) as exc:
            raise SpillError(f"cannot read the spill manifest in {path}: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("version") != SPILL_VERSION:
            raise SpillError(f"{path}/{MANIFEST_NAME} is not a version {SPILL_VERSION} manifest")
        try:
            ok = (isinstance(manifest["migration"], str)
                  and type(manifest["block_size"]) is int and manifest["block_size"] > 0
                  and type(manifest["slots"]) is int and 1 <= manifest["slots"] <= MAX_SLOTS)
        except KeyError:
            ok = False
        if not ok:
            raise SpillError(f"{path}/{MANIFEST_NAME} is malformed")
        if migration is not None and manifest["migration"] != migration:
            raise SpillError(f"the spill area in {path} belongs to migration "
                             f"{manifest['migration']}, not {migration}: is --spill the "
                             "directory the source writes?")
        if key is not None and not hmac.compare_digest(
                str(manifest.get("mac", "")), manifest_mac(key, manifest)):
            raise SpillError(f"the spill manifest in {path} does not carry this migration's "
                             "MAC: it was not written by the source (or with another key)")
        try:
            return cls(path, manifest, writable=False, key=key)
        except OSError as exc:
            raise SpillError(f"cannot open the spill area in {path}: {exc.strerror}") from None

    def close(self) -> None:
        for fd in (self._hfd, self._sfd, self._ifd):
            if fd is None:
                continue
            try:
                os.close(fd)
            except OSError:
                pass

    def discard(self) -> None:
        """Close and remove this area: its files and its directory, nothing else (a
        migration that ended either way: nobody will read it)."""
        self.close()
        for name in (MANIFEST_NAME, FLUSHED_NAME, HEADERS_NAME, SLOTS_NAME, INSTALLED_NAME,
                     MANIFEST_NAME + ".tmp", FLUSHED_NAME + ".tmp"):
            try:
                os.unlink(os.path.join(self.path, name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self.path)
        except OSError:
            pass  # (something else in it: not ours to remove)

    # -- writer (source) ------------------------------------------------------------

    def _header_at(self, slot: int, h: SlotHeader) -> None:
        os.pwrite(self._hfd, h.pack(), slot * HEADER_SIZE)

    def put(self, ref: SlotRef, file_id: int, block: int, data: bytes) -> SlotHeader:
        """Store one page in slot `ref` (just allocated); returns its header."""
        if len(data) > self.block_size:
            raise SpillError(f"a page of {len(data)} bytes does not fit a slot of "
                             f"{self.block_size}")
        self._header_at(ref.slot, SlotHeader(file_id, block, ref.generation, 0, 0, 0))
        os.pwrite(self._sfd, data, ref.slot * self.block_size)
        assert self.key is not None, "a writable area has its key"
        h = fill_header(file_id, block, ref, data, self.key)
        self._header_at(ref.slot, h)
        return h

    def mark_free(self, ref: SlotRef, h: SlotHeader) -> None:
        """Record that the page of `ref` was installed (for `blkfs spill`); content kept."""
        self._header_at(ref.slot, SlotHeader(h.file_id, h.block, h.generation, h.length,
                                             h.digest, h.flags | FLAG_FREE, h.mac))

    def flush(self) -> None:
        """Make every page written so far durable: after this the source may vanish."""
        os.fdatasync(self._sfd)
        os.fdatasync(self._hfd)

    def mark_flushed(self, pages: int) -> None:
        """After `flush`: say in the area itself that it holds every remaining page, so a
        destination left alone knows that a page it does not find will never come."""
        tmp = os.path.join(self.path, FLUSHED_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"migration": self.migration, "pages": pages, "at": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.path, FLUSHED_NAME))
        dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def flushed(self) -> int | None:
        """The pages the source spilled in all, once it marked the area flushed; else None."""
        try:
            with open(os.path.join(self.path, FLUSHED_NAME)) as f:
                doc = json.load(f)
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("migration") != self.migration:
            return None
        pages = doc.get("pages")
        return pages if type(pages) is int and pages >= 0 else None

    def installed(self) -> list[int]:
        """Per slot, the generation the destination last installed from it (0: none)."""
        try:
            with open(os.path.join(self.path, INSTALLED_NAME), "rb") as f:
                raw = f.read(self.nslots * _GEN.size)
        except FileNotFoundError:
            return [0] * self.nslots
        gens = [g for (g,) in _GEN.iter_unpack(raw[: len(raw) // _GEN.size * _GEN.size])]
        return gens + [0] * (self.nslots - len(gens))

    # -- reader (destination, operator) ---------------------------------------------

    def mark_installed(self, refs: Iterable[SlotRef]) -> None:
        """The destination installed these slots' pages: the source may reuse them even
        when it cannot hear the destination (the one write of the area's reader)."""
        if self._ifd is None:
            self._ifd = os.open(os.path.join(self.path, INSTALLED_NAME),
                                os.O_WRONLY | os.O_CLOEXEC)
        for ref in refs:
            if 0 <= ref.slot < self.nslots:
                os.pwrite(self._ifd, _GEN.pack(ref.generation), ref.slot * _GEN.size)

    def header(self, slot: int) -> SlotHeader:
        return SlotHeader.unpack(os.pread(self._hfd, HEADER_SIZE, slot * HEADER_SIZE))

    def read(self, ref: SlotRef, file_id: int, block: int) -> bytes | Refused:
        """The page in `ref` if the generation, hash and MAC checks pass, else why not."""
        if self.key is None:
            raise SpillError(f"the spill area in {self.path} was opened without its key: "
                             "its pages cannot be trusted")
        if not 0 <= ref.slot < self.nslots:
            return Refused.STALE
        before = self.header(ref.slot)
        if before.generation != ref.generation or not before.flags & FLAG_FILLED:
            return Refused.STALE  # not performed: the slot moved on (or is being written)
        data = os.pread(self._sfd, self.block_size, ref.slot * self.block_size)
        return checked_read(ref, file_id, block, before, data, self.header(ref.slot), self.key)

    def scan(self) -> list[SlotHeader]:
        """Every slot header, in slot order (one read)."""
        raw = os.pread(self._hfd, self.nslots * HEADER_SIZE, 0)
        return [SlotHeader.unpack(raw[i:i + HEADER_SIZE])
                for i in range(0, len(raw), HEADER_SIZE)]

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "migration": self.migration, "block_size": self.block_size,
                "slots": self.nslots, **summarize(self.scan())}
