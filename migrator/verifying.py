"""The source's side of the verification: the xxh3 of every block of its suspended copy,
and what the retired copy keeps of them for a migration back (lineage.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import xxhash

from . import digestlog
from . import protocol as p
from .blockdigests import BlockDigests
from .errors import MigrationError
from .lineage import BACK, dest_lineage, tag
from .options import SourceFile
from .sending import FRAME_DATA
from .stores import SourceFiles
from .zeros import hole_runs, zero_digest

DIGESTS_PER_FRAME = 8192  # (a Digests frame of 64 KiB: the destination checks as they come)
ZERO_RUN_MIN = 256  # hole blocks in a row that go as one ZeroDigests (fewer: as digests)


def verification_digests(store: SourceFiles, f: SourceFile, block_size: int,
                         keep: BlockDigests) -> Iterator[p.Digests | p.ZeroDigests]:
    """The frames of `f`'s verification, in block order: the xxh3 of its blocks, a frame's
    worth at a time, and each run of at least ZERO_RUN_MIN hole blocks as one ZeroDigests (a
    hole's digest is a constant, never read: a 4 TiB thin image costs its data; shorter holes
    go as their digests, in the frames of the data around them). Every digest also goes into
    `keep`. The file's data ranges are asked once. The copy is suspended, so a file that
    comes up short is a fault, not a race."""
    bs = block_size
    h = xxhash.xxh3_64_intdigest
    buf = memoryview(bytearray(max(bs, FRAME_DATA // bs * bs)))  # reused: no faults
    nblocks = (f.size + bs - 1) // bs
    first = 0  # the block of digests[0]
    digests: list[int] = []

    def frames(all_of_them: bool) -> Iterator[p.Digests]:
        nonlocal first, digests
        while len(digests) >= DIGESTS_PER_FRAME or (all_of_them and digests):
            out = tuple(digests[:DIGESTS_PER_FRAME])
            keep.data.update(enumerate(out, first))
            yield p.Digests(f.file_id, first, out)
            first += len(out)
            digests = digests[DIGESTS_PER_FRAME:]

    for b0, n, hole in hole_runs(store.data_ranges(f.file_id, 0, f.size), 0, nblocks, bs,
                                 f.size):
        if hole and n >= ZERO_RUN_MIN:
            yield from frames(True)
            keep.set_zero(b0, n)
            yield p.ZeroDigests(f.file_id, b0, n)
            first = b0 + n
            continue
        if hole:
            digests += [zero_digest(min(bs, f.size - b * bs)) for b in range(b0, b0 + n)]
            yield from frames(False)
            continue
        off, stop = b0 * bs, min((b0 + n) * bs, f.size)
        while off < stop:
            want = min(len(buf), stop - off)
            got = store.read_into(f.file_id, off, buf[:want])
            if got != want:  # (suspended: it cannot change, unless behind us)
                raise MigrationError(f"{f.rel} shrank under the verification")
            digests += [h(buf[i:min(i + bs, got)]) for i in range(0, got, bs)]
            off += got
            yield from frames(False)
    yield from frames(True)


def retired_lineage(store: SourceFiles, vm_id: str, migration: str, block_size: int,
                    files: list[SourceFile], digests: dict[int, BlockDigests],
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
