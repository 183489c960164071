"""The destination's verdict: every block checked, every digest equal (invariant 2)."""

from __future__ import annotations

import xxhash

from migrator import protocol as p
from migrator.blockdigests import BlockDigests
from migrator.received import Received, ReceivedFile
from migrator.stores import MountDest

BS = 4096


def session(nblocks: int) -> tuple[Received, list[int]]:
    s = Received(MountDest("/"))
    s.block_size = BS
    data = [bytes([i]) * BS for i in range(nblocks)]
    f = ReceivedFile(p.FileEntry(0, "disk.raw", nblocks * BS), nblocks * BS)
    f.digests = BlockDigests({i: xxhash.xxh3_64_intdigest(d) for i, d in enumerate(data)})
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
    del s.files[0].digests.data[1]
    s.check_digests(p.Digests(0, 0, tuple(digests[:3])))  # block 3 never compared
    ok, detail = s.verdict()
    assert not ok and s.mismatch_count == 2
    assert "block 1 never received" in detail and "3 of 4 blocks checked" in detail


def test_many_mismatches_are_counted_and_summarized() -> None:
    s, digests = session(50)
    s.check_digests(p.Digests(0, 0, tuple(d ^ 1 for d in digests)))
    ok, detail = s.verdict()
    assert not ok and s.mismatch_count == 50 and "(+45 more)" in detail


def test_a_run_of_zero_blocks_is_checked_as_a_run() -> None:
    """ZeroDigests: every block of the run must be zeros here: received as a Zero run, or
    written as zero data; data there differs, a gap was never received."""
    nblocks = (4 << 40) // BS  # a 4 TiB thin image: 2**30 blocks, in a few runs
    s = Received(MountDest("/"))
    s.block_size = BS
    f = s.files[0] = ReceivedFile(p.FileEntry(0, "disk.raw", nblocks * BS), nblocks * BS)
    f.digests.set(0, xxhash.xxh3_64_intdigest(b"a" * BS))
    f.digests.set(1, xxhash.xxh3_64_intdigest(bytes(BS)))  # zero data, written
    f.digests.set_zero(2, nblocks - 2)
    s.check_digests(p.Digests(0, 0, (xxhash.xxh3_64_intdigest(b"a" * BS),)))
    s.check_zero_digests(p.ZeroDigests(0, 1, nblocks - 1))
    assert s.verdict() == (True, "")

    f.digests.set(7, 123)  # data where the source has zeros
    f.digests.zeros.remove(100, 110)  # and ten blocks never received
    s.check_zero_digests(p.ZeroDigests(0, 1, nblocks - 1))
    assert s.mismatch_count == 11
    ok, detail = s.verdict()
    assert not ok
    assert "disk.raw block 7 differs" in detail
    assert "disk.raw blocks 100..109: 10 never received" in detail
