"""The destination's verdict: every block checked, every digest equal (invariant 2)."""

from __future__ import annotations

import xxhash

from migrator import protocol as p
from migrator.received import Received, ReceivedFile
from migrator.stores import MountDest

BS = 4096


def session(nblocks: int) -> tuple[Received, list[int]]:
    s = Received(MountDest("/"))
    s.block_size = BS
    data = [bytes([i]) * BS for i in range(nblocks)]
    f = ReceivedFile(p.FileEntry(0, "disk.raw", nblocks * BS), nblocks * BS)
    f.digests = {i: xxhash.xxh3_64_intdigest(d) for i, d in enumerate(data)}
    s.files[0] = f
    return s, [xxhash.xxh3_64_intdigest(d) for d in data]


def test_all_equal_is_ok() -> None:
    s, digests = session(4)
    s.check_digests(p.Digests(0, 0, tuple(digests)))
    assert s.verdict() == (True, "")


def test_a_differing_block_fails_loudly() -> None:
    s, digests = session(4)
    digests[2] ^= 1
    s.check_digests(p.Digests(0, 0, tuple(digests)))
    ok, detail = s.verdict()
    assert not ok and "disk.raw block 2 differs" in detail and s.mismatch_count == 1


def test_a_block_never_received_or_never_checked_fails() -> None:
    s, digests = session(4)
    del s.files[0].digests[1]
    s.check_digests(p.Digests(0, 0, tuple(digests[:3])))  # block 3 never compared
    ok, detail = s.verdict()
    assert not ok and s.mismatch_count == 2
    assert "block 1 never received" in detail and "3 of 4 blocks checked" in detail


def test_many_mismatches_are_counted_and_summarized() -> None:
    s, digests = session(50)
    s.check_digests(p.Digests(0, 0, tuple(d ^ 1 for d in digests)))
    ok, detail = s.verdict()
    assert not ok and s.mismatch_count == 50 and "(+45 more)" in detail
