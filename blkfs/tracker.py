"""Per-file tracking state and its persistence (pure: no FUSE, no trio).

A ``FileTracker`` holds what blkfs knows about one regular file: its size as
written through the mount, the dirty bitmap of the current epoch and the heat
of its blocks.  Hard links share one tracker: trackers are keyed by the
backing file's ``(st_dev, st_ino)``.

Persistence (invariant 5): on a clean unmount every tracker is written to
``STATE_FILE`` together with the identity of the file it describes (size,
mtime, ctime).  On mount the file is read and removed *before* the mount
serves any request, so after an unclean exit there is no state and every file
is reported all-dirty.  A saved record is used only if the file still has the
identity it had at unmount; anything else (changed behind blkfs's back,
different block size, unreadable state) falls back to all-dirty.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .bitmap import (
    CHUNK_MASK,
    CHUNK_SHIFT,
    DirtyBitmap,
    Extent,
    block_extents,
    blocks_for,
    extents,
    from_extents,
    masks_from_pages,
    page_extents,
    page_shift,
)
from .heat import DEFAULT_HALF_LIFE, Heat

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_FORMAT = 2  # 2: dirty pages ("dirty_pages", "page_size"); 1: dirty blocks ("dirty")
READABLE_FORMATS = (1, 2)

FileKey = tuple[int, int]  # (st_dev, st_ino) of the backing file
HEAT_SPAN_MIN = 64  # blocks a write covers from which its heat is logged as one span


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """What must be unchanged for a saved bitmap to still be complete."""

    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileTracker:
    """Dirty bitmap (page masks by block) + heat (by block) + size of one tracked file."""

    __slots__ = ("bitmap", "frozen", "heat", "heat_log", "heat_spans", "key", "lazy", "pidx",
                 "pshift", "restored", "shift", "size", "writes")

    def __init__(
        self,
        key: FileKey,
        size: int,
        shift: int,
        *,
        half_life: float = DEFAULT_HALF_LIFE,
        now: float = 0.0,
        all_dirty: bool = True,
    ) -> None:
        self.key = key
        self.shift = shift
        self.pshift = page_shift(shift)
        ppb = 1 << (shift - self.pshift)
        self.pidx = ppb - 1  # page index within its block: (offset >> pshift) & pidx
        self.size = size
        self.bitmap = DirtyBitmap(blocks_for(size, shift), all_dirty=all_dirty, ppb=ppb)
        self.heat = Heat(half_life, now)
        self.heat_log: list[int] = []  # blocks written since the last settle_heat ...
        self.heat_spans: list[tuple[int, int]] = []  # ... and [first, stop) of long writes
        self.frozen = False
        self.restored = False  # True when the bitmap came from a clean-shutdown record
        self.writes = 0
        self.lazy: Any = None  # a lazy.LazyFile while post-copy installs this file

    @property
    def block_size(self) -> int:
        return 1 << self.shift

    @property
    def page_size(self) -> int:
        return 1 << self.pshift

    @property
    def pages_per_block(self) -> int:
        return self.pidx + 1

    @property
    def nblocks(self) -> int:
        return blocks_for(self.size, self.shift)

    def on_write(self, offset: int, length: int, heat: bool = True) -> None:
        """Record `length` bytes written at `offset`, after they reached the backing file.

        The write hot path: an OR of the written pages into the block's mask
        and a list append.  Heat is settled later in batches (`settle_heat`,
        about once a second and before every heat query): a dict update per
        write and a clock read cost more than the rest of the tracking
        together.  `_grow` keeps the bitmap at least as long as the file, so
        the single-block store needs no bounds check. `heat=False`: dirty, but no
        heat (a punch: a hole travels as a Zero run whatever its heat).
        """
        end = offset + length
        if length <= 0:
            return
        if end > self.size:
            self._grow(end)
        shift = self.shift
        first = offset >> shift
        last = (end - 1) >> shift
        self.writes += 1
        if first == last:
            pshift, pidx = self.pshift, self.pidx
            masks = self.bitmap.masks
            chunk = masks.chunks[first >> CHUNK_SHIFT]
            if chunk is None:
                chunk = masks.own(first >> CHUNK_SHIFT)
            chunk[first & CHUNK_MASK] |= (2 << (((end - 1) >> pshift) & pidx)) - (
                1 << ((offset >> pshift) & pidx))
            if heat:
                self.heat_log.append(first)
        else:
            self.bitmap.mark_bytes(offset, end, shift, self.pshift)
            if heat and last - first < HEAT_SPAN_MIN:
                self.heat_log.extend(range(first, last + 1))
            elif heat:  # (logged block by block, a 1 TiB write would be 16 Mi ints)
                self.heat_spans.append((first, last + 1))

    def settle_heat(self, now: float) -> None:
        """Count the writes logged since the last call as happening at `now`."""
        if self.heat_log:
            self.heat.bump_many(self.heat_log, now)
            self.heat_log.clear()
        for first, stop in self.heat_spans:
            self.heat.bump_span(first, stop, now)
        self.heat_spans.clear()

    def _grow(self, new_size: int) -> None:
        """Mark every block between the old and the new end of file.

        A hole left by growth reads as zeros, which is new content for the
        copy: blocks in it (and the old partial last block) are dirty.
        """
        old = self.size
        self.size = new_size
        self.bitmap.mark(old >> self.shift, (new_size - 1) >> self.shift)

    def on_resize(self, new_size: int) -> None:
        """Truncate/extend: drop blocks past EOF, mark blocks that growth adds."""
        if new_size > self.size:
            self._grow(new_size)
        elif new_size < self.size:
            self.size = new_size
            n = blocks_for(new_size, self.shift)
            self.bitmap.resize(n)
            self.heat.truncate(n)
            self.heat_log = [b for b in self.heat_log if b < n]
            self.heat_spans = [(a, min(b, n)) for a, b in self.heat_spans if a < n]

    def mark_all(self, size: int | None = None) -> None:
        """Report every block dirty (a write may have gone unmarked), up to `size` if the
        file is known to be longer than what was tracked."""
        if size is not None and size > self.size:
            self._grow(size)
        n = self.nblocks
        self.bitmap.resize(n)
        if n:
            self.bitmap.mark(0, n - 1)

    def swap(self) -> tuple[int, list[Extent]]:
        """End the current epoch: return (its number, its dirty block extents)."""
        epoch, masks = self.swap_bitmap()
        return epoch, block_extents(masks)

    def swap_pages(self) -> tuple[int, list[Extent]]:
        """End the current epoch: return (its number, its dirty page extents)."""
        epoch, masks = self.swap_bitmap()
        return epoch, page_extents(masks, self.pages_per_block)

    def swap_bitmap(self) -> tuple[int, Any]:
        """End the current epoch: return (its number, its page masks)."""
        self.bitmap.resize(self.nblocks)
        return self.bitmap.swap()

    def clear(self, exts: list[Extent]) -> None:
        """Forget these blocks' dirty marks: the caller is about to read them.

        A copier that clears a range *before* reading it loses nothing (a write
        after the clear is marked again) and need not resend blocks whose
        writes all came before it read them.
        """
        for first, count in exts:
            self.bitmap.clear(first, first + count)

    def dirty_extents(self) -> list[Extent]:
        return self.bitmap.extents()

    def dirty_pages(self) -> list[Extent]:
        return self.bitmap.page_extents()

    # -- persistence ------------------------------------------------------------

    def to_record(self, ident: FileIdentity, path: str, now: float) -> dict[str, Any]:
        self.settle_heat(now)
        blocks, values = self.heat.snapshot_arrays(now)
        return {
            "dev": self.key[0],
            "ino": self.key[1],
            "path": path,
            "size": ident.size,
            "mtime_ns": ident.mtime_ns,
            "ctime_ns": ident.ctime_ns,
            "epoch": self.bitmap.epoch,
            "page_size": self.page_size,
            "dirty_pages": self.bitmap.page_extents(),
            "heat_blocks": base64.b64encode(blocks.astype("<u8").tobytes()).decode(),
            "heat_values": base64.b64encode(values.astype("<f8").tobytes()).decode(),
        }

    @classmethod
    def from_record(
        cls,
        rec: dict[str, Any],
        shift: int,
        *,
        half_life: float,
        now: float,
        elapsed: float,
    ) -> FileTracker:
        tr = cls(
            (rec["dev"], rec["ino"]),
            rec["size"],
            shift,
            half_life=half_life,
            now=now,
            all_dirty=False,
        )
        if "dirty_pages" in rec:
            if rec["page_size"] != tr.page_size:
                raise ValueError(f"pages of {rec['page_size']} bytes, not {tr.page_size}")
            tr.bitmap.masks = masks_from_pages(rec["dirty_pages"], tr.nblocks, tr.pages_per_block)
        else:  # format 1: whole blocks
            for first, count in extents(from_extents(rec["dirty"], tr.nblocks)):
                tr.bitmap.mark(first, first + count - 1)
        tr.bitmap.epoch = int(rec["epoch"])
        blocks = np.frombuffer(base64.b64decode(rec["heat_blocks"]), dtype="<u8")
        values = np.frombuffer(base64.b64decode(rec["heat_values"]), dtype="<f8")
        if blocks.size != values.size:
            raise ValueError("heat blocks and values differ in length")
        inside = blocks < tr.nblocks  # heat is an array by block: no entry past the file
        tr.heat.restore((blocks[inside].astype(np.int64), values[inside].astype(np.float64)),
                        now, elapsed)
        tr.restored = True
        return tr


class SavedState:
    """Records of the last clean unmount, consumed as files are first seen."""

    def __init__(self, records: dict[FileKey, dict[str, Any]], saved_at: float) -> None:
        self.records = records
        self.saved_at = saved_at

    @classmethod
    def empty(cls) -> SavedState:
        return cls({}, time.time())

    def take(
        self,
        key: FileKey,
        st: os.stat_result,
        shift: int,
        *,
        half_life: float,
        now: float,
    ) -> FileTracker | None:
        """The restored tracker for `key` if its record still proves completeness."""
        rec = self.records.pop(key, None)
        if rec is None:
            return None
        try:
            if FileIdentity.of(st) != FileIdentity(rec["size"], rec["mtime_ns"], rec["ctime_ns"]):
                log.info("%s changed while unmounted: reporting it all dirty", rec.get("path", key))
                return None
            return FileTracker.from_record(
                rec, shift, half_life=half_life, now=now, elapsed=time.time() - self.saved_at
            )
        except (KeyError, ValueError, TypeError) as exc:
            log.warning(
                "bad saved record for %s (%s): reporting it all dirty", rec.get("path", key), exc
            )
            return None


def load_state(meta_dir: str, block_size: int) -> SavedState:
    """Read and remove the clean-shutdown state; empty when absent or unusable.

    The file is unlinked (and the directory fsynced) before the mount serves
    anything: a crash from here on leaves no state behind, so the next mount
    reports everything dirty.
    """
    path = os.path.join(meta_dir, STATE_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return SavedState.empty()
    try:
        os.unlink(path)
        _fsync_dir(meta_dir)
    except OSError:
        log.exception("cannot remove %s: refusing to trust it", path)
        return SavedState.empty()
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("format") not in READABLE_FORMATS:
            raise ValueError(f"unknown format {doc.get('format')!r}")
        if doc.get("block_size") != block_size:
            log.info(
                "saved state has block size %s, mount uses %s: all files dirty",
                doc.get("block_size"),
                block_size,
            )
            return SavedState.empty()
        records = {(r["dev"], r["ino"]): r for r in doc["files"]}
        return SavedState(records, float(doc["saved_at"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("unreadable tracking state %s (%s): all files dirty", path, exc)
        return SavedState.empty()


def save_state(meta_dir: str, block_size: int, records: list[dict[str, Any]]) -> str:
    """Write the clean-shutdown state atomically (tmp + fsync + rename + fsync dir)."""
    path = os.path.join(meta_dir, STATE_FILE)
    tmp = path + ".tmp"
    doc = {
        "format": STATE_FORMAT,
        "block_size": block_size,
        "saved_at": time.time(),
        "files": records,
    }
    # 0600 whatever the daemon's umask (it runs with 0, so that files keep the modes asked)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)  # (a tmp left by an older version keeps its mode otherwise)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    _fsync_dir(meta_dir)
    return path


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
