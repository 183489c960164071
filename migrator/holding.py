"""The destination's side of a delta (Manifest.delta): what it holds of each file, before
Ready. The xxh3 of its blocks of data as Held frames, a frame at a time as they are read (the
source sees progress, not silence), and each long run of holes as one HeldZero: a thin
image held here costs its data, not 8 bytes for each of its 64 Mi blocks."""

from __future__ import annotations

import trio

from . import protocol as p
from .errors import MigrationError
from .received import ReceivedFile
from .stores import DestFiles
from .transport import Channel
from .verifying import ZERO_RUN_MIN

THREAD_READ = 1 << 20  # bytes a frame covers from which it is read in a worker thread


async def say_what_is_held(store: DestFiles, ch: Channel, files: dict[int, ReceivedFile],
                           bs: int, known: set[int]) -> int:
    """Say it for every file held here but those in `known` (lineage vouched for them);
    what is said counts as written here for the verification, which still compares every
    block. Returns the blocks said."""
    said = 0
    for fid, f in files.items():
        if store.fresh(fid) or fid in known:
            continue  # created empty here: nothing held; or known by lineage already
        nblocks = (f.size + bs - 1) // bs
        try:
            if f.size >= THREAD_READ:
                holes = await trio.to_thread.run_sync(store.held_holes, fid, bs, ZERO_RUN_MIN)
            else:  # (as below)
                holes = store.held_holes(fid, bs, ZERO_RUN_MIN)
        except OSError as exc:
            raise MigrationError(f"cannot read {f.entry.name} here: {exc.strerror}") from None
        pos = 0
        for first, count in [*holes, (nblocks, 0)]:
            got = await _held_blocks(store, ch, f, fid, bs, pos, first)
            if got is None:
                break  # nothing held (all holes): the source sends it all
            said += got
            if count:
                f.digests.set_zero(first, count)
                said += count
                await ch.send(p.HeldZero(fid, first, count))
            pos = first + count
    return said


async def _held_blocks(store: DestFiles, ch: Channel, f: ReceivedFile, fid: int, bs: int,
                       start: int, end: int) -> int | None:
    """Held frames of blocks [start, end); None if the file holds nothing at all."""
    per_frame, said = p.MAX_DIGESTS_PER_FRAME, 0
    for first in range(start, end, per_frame):
        count = min(per_frame, end - first)
        try:
            if min(f.size - first * bs, count * bs) >= THREAD_READ:
                held = await trio.to_thread.run_sync(store.held, fid, bs, first, count)
            else:  # a thread hop costs more than hashing a small file
                held = store.held(fid, bs, first, count)
        except OSError as exc:
            raise MigrationError(f"cannot read {f.entry.name} here: {exc.strerror}") from None
        if not held:
            return None if first == 0 else said
        for i, d in enumerate(held, first):
            f.digests.set(i, d)
        said += len(held)
        await ch.send(p.Held(fid, first, tuple(held)))
    return said
