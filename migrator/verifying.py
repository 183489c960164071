"""The source's side of the verification: the xxh3 of every block of its suspended copy,
and what the retired copy keeps of them for a migration back (lineage.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import xxhash

from . import digestlog
from .errors import MigrationError
from .lineage import BACK, dest_lineage, tag
from .options import SourceFile
from .sending import FRAME_DATA
from .stores import SourceFiles
from .zeros import hole_runs, zero_digest

DIGESTS_PER_FRAME = 8192  # (a Digests frame of 64 KiB: the destination checks as they come)


def verification_digests(store: SourceFiles, f: SourceFile, block_size: int
                         ) -> Iterator[tuple[int, tuple[int, ...]]]:
    """(first block, digests of the blocks from there) for every block of `f`, a frame's
    worth at a time. Holes are a constant, never read; the copy is suspended, so a file
    that comes up short is a fault, not a race."""
    bs = block_size
    h = xxhash.xxh3_64_intdigest
    buf = memoryview(bytearray(max(bs, FRAME_DATA // bs * bs)))  # reused: no faults
    nblocks = (f.size + bs - 1) // bs
    for first in range(0, nblocks, DIGESTS_PER_FRAME):
        count = min(DIGESTS_PER_FRAME, nblocks - first)
        digests: list[int] = []
        ranges = store.data_ranges(f.file_id, first * bs, (first + count) * bs)
        for b0, n, hole in hole_runs(ranges, first, count, bs, f.size):
            if hole:
                digests += [zero_digest(min(bs, f.size - b * bs)) for b in range(b0, b0 + n)]
                continue
            off, stop = b0 * bs, min((b0 + n) * bs, f.size)
            while off < stop:
                want = min(len(buf), stop - off)
                got = store.read_into(f.file_id, off, buf[:want])
                if got != want:  # (suspended: it cannot change, unless behind us)
                    raise MigrationError(f"{f.rel} shrank under the verification")
                digests += [h(buf[i:min(i + bs, got)]) for i in range(0, got, bs)]
                off += got
        yield first, tuple(digests)


def retired_lineage(store: SourceFiles, vm_id: str, migration: str, block_size: int,
                    files: list[SourceFile], digests: dict[int, dict[int, int]],
                    notify: Callable[[str], None]) -> dict[str, Any] | None:
    """The retired copy is the destination's files as of the switchover: keep its digests
    (the verification's) and this mount's swap epochs, so a migration back to here reads and
    sends only what the VM wrote there since (lineage.py). Best effort: without them, the
    way back compares digests."""
    if len(digests) != len(files):
        return None
    name = tag(migration, BACK)
    swap_epochs: dict[str, int] = {}
    for f in files:
        ended = store.last_epoch(f.file_id)
        if ended is None:
            return None
        swap_epochs[f.rel] = ended + 1
    try:
        store.records.write_digests(vm_id, digestlog.encode(name, block_size, digests))
    except OSError as exc:
        notify(f"cannot keep the retired copy's digests ({exc.strerror}): a migration back "
               "will compare digests")
        return None
    return dest_lineage(swap_epochs, {f.rel: f.file_id for f in files},
                        {f.rel: f.size for f in files}, name)
