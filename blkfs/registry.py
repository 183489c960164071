"""The tracking state of one mount: every file's tracker, found by its backing identity.

The FUSE handlers (fs.py) and the control socket (control.py) both work on this, never on
each other: a handler asks for the tracker of the inode it serves, a control op for the
tracker of a path, and both get the same object.  It also holds what outlives an inode the
kernel forgot: the last known path of a tracked file (unmount saves it), the saved records
of the last clean unmount (consumed as files are first seen), and the freeze of writes.

Invariant 5 lives here too: ``trust_lost`` is set when a write may have reached a backing
file without being marked (a fault between the two that marking the whole file dirty could
not repair); a registry that lost trust is never saved, so the next mount says all-dirty.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Mapping
from typing import Any

import trio

from .settings import META_DIR
from .tracker import FileIdentity, FileKey, FileTracker, SavedState

log = logging.getLogger(__name__)

META_NAME = META_DIR  # hidden metadata dir at the backing root


class Registry:
    """Trackers by (st_dev, st_ino) of the backing file, for one backing directory."""

    def __init__(self, backing: str, *, shift: int, half_life: float, static_heat: float,
                 tracking: bool = True, saved: SavedState | None = None) -> None:
        self.backing = os.path.realpath(backing)
        self.shift = shift
        self.half_life = half_life
        self.static_heat = static_heat
        self.tracking = tracking
        self.saved = saved or SavedState.empty()
        self.trackers: dict[FileKey, FileTracker] = {}
        # Last known path (relative) of tracked files whose inode the kernel forgot, or that
        # were reached only through the control socket: unmount needs them.
        self.paths: dict[FileKey, str] = {}
        self.frozen_all = False
        self.trust_lost = False  # see the module docstring
        self._thaw_events: dict[FileKey, trio.Event] = {}

    @property
    def block_size(self) -> int:
        return 1 << self.shift

    # -- trackers ----------------------------------------------------------------------

    def tracker_for(self, key: FileKey, st: os.stat_result, path: str | None = None
                    ) -> FileTracker:
        """The tracker of a regular file, restored from saved state or all-dirty."""
        if path is not None:
            self.paths[key] = path
        tr = self.trackers.get(key)
        if tr is None:
            now = time.monotonic()
            tr = self.saved.take(key, st, self.shift, half_life=self.half_life, now=now)
            if tr is None:
                tr = FileTracker(key, st.st_size, self.shift, half_life=self.half_life, now=now,
                                 all_dirty=True)
            tr.frozen = self.frozen_all
            self.trackers[key] = tr
        return tr

    def new_file(self, key: FileKey) -> FileTracker:
        """A file just created through the mount: clean, and never heir to a saved record or
        tracker of an earlier file that had the same (reused) inode number."""
        self.saved.records.pop(key, None)
        tr = FileTracker(key, 0, self.shift, half_life=self.half_life, now=time.monotonic(),
                         all_dirty=False)
        tr.frozen = self.frozen_all
        self.trackers[key] = tr
        return tr

    def forget(self, key: FileKey, path: str | None) -> None:
        """The kernel dropped the inode: keep its path for unmount, or drop a deleted file."""
        if path is None:  # deleted: its inode number may be reused by a new file
            self.trackers.pop(key, None)
            self.paths.pop(key, None)
        else:
            self.paths[key] = path

    def mark_unsafe(self, tr: FileTracker | None, why: str, size: int | None = None) -> None:
        """A write may have reached `tr`'s file unmarked (the file may now be `size` bytes):
        report the whole file dirty, or, if even that fails, never save this mount's state
        (invariant 5).  Never raises: it runs in a handler's error path."""
        try:
            if tr is None:
                raise ValueError("no tracker")
            tr.mark_all(size)
            log.error("%s: every block of the file is reported dirty", why)
        except Exception:
            self.trust_lost = True
            log.exception("%s, and marking the file dirty failed: the tracking state will not "
                          "be saved (the next mount reports every block dirty)", why)

    def tracked_files(self) -> list[tuple[str, os.stat_result, FileTracker | None]]:
        """Every regular file under the backing dir (metadata dir excluded)."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.backing):
            if dirpath == self.backing and META_NAME in dirnames:
                dirnames.remove(META_NAME)
            dirnames.sort()
            for fn in sorted(filenames):
                path = os.path.join(dirpath, fn)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                rel = os.path.relpath(path, self.backing)
                tr = self.tracker_for((st.st_dev, st.st_ino), st, rel) if self.tracking else None
                out.append((rel, st, tr))
        return out

    # -- heat ----------------------------------------------------------------------------

    def settle_heat(self) -> None:
        """Count the writes logged since the last settle into the heat of their blocks."""
        now = time.monotonic()
        for tr in self.trackers.values():
            tr.settle_heat(now)

    async def settle_heat_forever(self, interval: float = 1.0) -> None:
        """Settle heat every `interval` s, so a write's heat is dated within that."""
        while True:
            await trio.sleep(interval)
            self.settle_heat()

    # -- freeze --------------------------------------------------------------------------

    async def wait_thawed(self, tr: FileTracker) -> None:
        while tr.frozen:
            ev = self._thaw_events.get(tr.key)
            if ev is None:
                ev = self._thaw_events[tr.key] = trio.Event()
            await ev.wait()

    def freeze(self, trackers: list[FileTracker] | None) -> int:
        """Hold writes to these files (all when None) until thaw.

        Returns once no write to them is in flight: a write handler marks its blocks
        without awaiting after it passed the freeze check, so every write that passed the
        check has already been marked when we run.
        """
        if trackers is None:
            self.frozen_all = True
            trackers = list(self.trackers.values())
        for tr in trackers:
            tr.frozen = True
        return len(trackers)

    def thaw(self, trackers: list[FileTracker] | None) -> int:
        if trackers is None:
            self.frozen_all = False
            trackers = list(self.trackers.values())
        for tr in trackers:
            tr.frozen = False
            ev = self._thaw_events.pop(tr.key, None)
            if ev is not None:
                ev.set()
        return len(trackers)

    # -- persistence ---------------------------------------------------------------------

    def records(self, live: Mapping[FileKey, int]) -> list[dict[str, Any]]:
        """Records of every tracker whose file still exists, for the state file, plus the
        saved records no file claimed (files not opened during this mount).

        `live` maps keys of inodes the kernel still knows to an fd on them (their current
        path is read from it: a rename through the mount moved them).
        """
        now = time.monotonic()
        out: list[dict[str, Any]] = []
        for key, tr in self.trackers.items():
            try:
                fd = live.get(key)
                if fd is not None:
                    st = os.fstat(fd)
                    path = os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), self.backing)
                elif key in self.paths:
                    path = self.paths[key]
                    st = os.lstat(os.path.join(self.backing, path))
                else:
                    continue
            except OSError:
                continue
            if st.st_nlink == 0 or (st.st_dev, st.st_ino) != key:
                continue  # deleted, or the name now holds another file
            out.append(tr.to_record(FileIdentity.of(st), path, now))
        return out + list(self.saved.records.values())
