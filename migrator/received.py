"""What an incoming session wrote, block by block, with the xxh3 of each: the destination's
half of the verification (the source sends its digests after the resume; every block is
compared). The writes go through the session's DestFiles."""

from __future__ import annotations

from dataclasses import dataclass, field

import xxhash

from . import protocol as p
from .blockdigests import BlockDigests
from .codecs import CodecError, decompress
from .errors import BadPeer
from .stores import DestFiles
from .zeros import zero_digest

SPARSE_PAGE = 4096  # the hole granularity of the backing filesystems (ext4, xfs)
ZERO_PAGE = bytes(SPARSE_PAGE)


@dataclass
class ReceivedFile:
    entry: p.FileEntry
    size: int
    # xxh3 of what was written, by block; the runs received as Zero frames (blockdigests.py)
    digests: BlockDigests = field(default_factory=BlockDigests)
    verified: int = 0
    # Blocks from here on may hold what a write before a Resize left (their digests were
    # forgotten): written whole, never sparse (see write_blocks)
    forgotten_from: int | None = None

    def digest(self, block: int, bs: int) -> int | None:
        return self.digests.get(block, bs, self.size)


class Received:
    def __init__(self, store: DestFiles) -> None:
        self.store = store
        self.files: dict[int, ReceivedFile] = {}
        self.block_size = 0
        self.blocks_written = 0
        self.mismatches: list[str] = []  # the first few, for the message
        self.mismatch_count = 0
        self.unchecked = 0  # blocks whose digests died with an earlier session

    def all_digests(self, f: ReceivedFile) -> BlockDigests:
        return f.digests


    def write_packed(self, ev: p.Packed) -> None:
        """Decompressed to exactly the size it states, then written like Blocks."""
        try:
            data = decompress(ev.codec, ev.data, ev.size)
        except CodecError as exc:
            raise BadPeer(f"blocks {ev.first_block}+ of "
                          f"{self.files[ev.file_id].entry.name}: {exc}") from None
        self.write_blocks(p.Blocks(ev.file_id, ev.first_block, data))

    def write_pages(self, ev: p.Pages) -> None:
        """Dirty pages, written where they go; each block they touch is read back whole for
        its digest (the rest of it is what this side held already)."""
        f = self.files[ev.file_id]
        bs = self.block_size
        data: bytes | bytearray = ev.data
        if ev.codec:
            try:
                data = decompress(ev.codec, ev.data, ev.size)
            except CodecError as exc:
                raise BadPeer(f"pages at byte {ev.ranges[0][0]} of {f.entry.name}: "
                              f"{exc}") from None
        h = xxhash.xxh3_64_intdigest
        touched: dict[int, bool] = {}  # block -> the ranges cover it whole
        with memoryview(data) as mv:
            pos = 0
            for off, n in ev.ranges:
                self.store.write(ev.file_id, off, mv[pos:pos + n])
                first, last = off // bs, (off + n - 1) // bs
                for b in range(first, last + 1):
                    whole = off <= b * bs and min((b + 1) * bs, f.size) <= off + n
                    if whole:
                        f.digests.set(b, h(mv[pos + b * bs - off:pos + min((b + 1) * bs,
                                                                            f.size) - off]))
                    touched[b] = touched.get(b, False) or whole
                pos += n
        for b, whole in touched.items():
            if not whole:
                f.digests.set(b, h(self.store.read(ev.file_id, b * bs, max(0, min(
                    bs, f.size - b * bs)))))
        self.blocks_written += len(touched)

    def write_blocks(self, ev: p.Blocks) -> None:
        f = self.files[ev.file_id]
        bs = self.block_size
        mv = memoryview(ev.data)
        if self.store.fresh(ev.file_id):
            self._write_sparse(f, ev.file_id, ev.first_block, mv)
        else:
            self.store.write(ev.file_id, ev.first_block * bs, ev.data)
        h = xxhash.xxh3_64_intdigest
        n = (len(mv) + bs - 1) // bs
        f.digests.zeros.remove(ev.first_block, ev.first_block + n)
        data = f.digests.data
        for i in range(0, len(mv), bs):
            data[ev.first_block + i // bs] = h(mv[i:i + bs])
        self.blocks_written += n

    def _write_sparse(self, f: ReceivedFile, file_id: int, first: int,
                      mv: memoryview) -> None:
        """Blocks into a file this migration created: of a block nothing wrote yet, the
        all-zero pages stay holes, so the destination allocates no more than the source
        (data written in 4 KiB pieces under 64 KiB blocks took 16 times its space here)."""
        bs, page = self.block_size, SPARSE_PAGE
        start = run = 0  # the run of bytes to write: [start, run)
        for i in range(0, len(mv), bs):
            b = first + i // bs
            if f.digests.get(b, bs, f.size) is not None or (
                    f.forgotten_from is not None and b >= f.forgotten_from):
                run = min(i + bs, len(mv))  # (written before: whole, zeros included)
                continue
            for j in range(i, min(i + bs, len(mv)), page):
                piece = mv[j:j + page]
                if piece != ZERO_PAGE[:len(piece)]:
                    run = j + len(piece)
                    continue
                if run > start:
                    self.store.write(file_id, first * bs + start, mv[start:run])
                start = run = j + len(piece)
        if run > start:
            self.store.write(file_id, first * bs + start, mv[start:run])

    async def write_zero(self, ev: p.Zero) -> None:
        """All-zero blocks: nothing is written where the file is still a fresh hole here;
        over data it wrote, or in a file that existed, they are zeroed (store.zero)."""
        f = self.files[ev.file_id]
        bs = self.block_size
        first, n = ev.first_block, ev.count
        written = f.digests.set_zero(first, n)
        if written or not self.store.fresh(ev.file_id):
            await self.store.zero(ev.file_id, first * bs, min(n * bs, f.size - first * bs))
        self.blocks_written += n

    def resize(self, ev: p.Resize) -> None:
        f = self.files[ev.file_id]
        self.store.resize(ev.file_id, ev.size)
        f.size = ev.size
        nblocks = (ev.size + self.block_size - 1) // self.block_size
        # (a partial last block: its tail changed, the source resends it)
        forget = nblocks - 1 if ev.size % self.block_size else nblocks
        f.digests.forget_from(forget)
        f.forgotten_from = forget if f.forgotten_from is None else min(f.forgotten_from, forget)

    def _mismatch(self, text: str) -> None:
        self.mismatch_count += 1
        if len(self.mismatches) < 5:
            self.mismatches.append(text)

    def check(self, ev: p.Digests | p.ZeroDigests, lost: bool = False) -> None:
        if isinstance(ev, p.ZeroDigests):
            self.check_zero_digests(ev, lost)
        else:
            self.check_digests(ev, lost)

    def check_digests(self, ev: p.Digests, lost: bool = False) -> None:
        """Against what this session wrote; `lost`: the digests of what an earlier session
        wrote died with it (counted, never taken for a match)."""
        f = self.files[ev.file_id]
        for i, d in enumerate(ev.digests):
            b = ev.first_block + i
            mine = f.digest(b, self.block_size)
            if mine is None and lost:
                self.unchecked += 1
            elif mine != d:
                self._mismatch(f"{f.entry.name} block {b} "
                               + ("never received" if mine is None else "differs"))
            f.verified += 1

    def check_zero_digests(self, ev: p.ZeroDigests, lost: bool = False) -> None:
        """Blocks all zeros at the source: each must be zeros here too (received as a Zero
        run, or written with zero data). Costs the blocks written here, not the run."""
        f = self.files[ev.file_id]
        bs = self.block_size
        end = ev.first_block + ev.count
        for a, b in f.digests.zeros.gaps(ev.first_block, end):
            if b - a <= len(f.digests.data):
                found = [(k, f.digests.data[k]) for k in range(a, b) if k in f.digests.data]
            else:
                found = [(k, d) for k, d in f.digests.data.items() if a <= k < b]
            for k, d in found:
                if d != zero_digest(max(0, min(bs, f.size - k * bs))):
                    self._mismatch(f"{f.entry.name} block {k} differs")
            missing = b - a - len(found)
            if missing and lost:
                self.unchecked += missing
            elif missing:
                self.mismatch_count += missing - 1
                self._mismatch(f"{f.entry.name} blocks {a}..{b - 1}: {missing} never received")
        f.verified += ev.count

    def verdict(self) -> tuple[bool, str]:
        if self.unchecked:
            self._mismatch(f"{self.unchecked} blocks cannot be verified: their digests died "
                           "with the 'migrator serve' session that received them")
        for f in self.files.values():
            nblocks = (f.size + self.block_size - 1) // self.block_size
            if f.verified != nblocks:
                self._mismatch(f"{f.entry.name}: {f.verified} of {nblocks} blocks checked")
        n = self.mismatch_count
        more = f" (+{n - len(self.mismatches)} more)" if n > len(self.mismatches) else ""
        return n == 0, "; ".join(self.mismatches) + more
