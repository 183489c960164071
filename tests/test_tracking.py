"""Tracking through a real mount: exact extents, epochs, persistence, crash, freeze."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from blkfs import ctlproto as cp
from blkfs.control import ControlError, flush_file
from blkfs.runtime import process_gone

from .conftest import Mount, run_blkfs

pytestmark = pytest.mark.mount

B = 64 * 1024


def pwrite(path: Path, data: bytes, off: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("off", "length", "expect"),
    [
        (100, 1, [(0, 1)]),  # inside a block
        (B - 1, 2, [(0, 2)]),  # across a boundary
        (2 * B, B, [(2, 1)]),  # exactly one block, both edges on boundaries
        (3 * B, B + 1, [(3, 2)]),  # one byte into the next block
        (5 * B - 1, 1, [(4, 1)]),  # last byte of a block
        (6 * B, 3 * B, [(6, 3)]),  # several blocks
        (15 * B + 10, 10, [(15, 1)]),  # last block of the file
    ],
)
@pytest.mark.cache
def test_dirty_extents_equal_what_was_written(
    mount: Mount, off: int, length: int, expect: list[tuple[int, int]]
) -> None:
    p = mount.path("disk.raw")
    p.write_bytes(b"\0" * 16 * B)
    mount.swap("disk.raw")
    pwrite(p, b"w" * length, off)
    assert mount.dirty("disk.raw") == expect
    assert mount.swap("disk.raw") == expect
    assert mount.dirty("disk.raw") == []


@pytest.mark.quick  # a mount smoke test of the quick tier
@pytest.mark.cache
def test_swap_epochs_and_json_shape(mount: Mount) -> None:
    p = mount.path("disk.raw")
    p.write_bytes(b"\0" * 4 * B)
    r = run_blkfs("dirty", str(mount.mnt), "disk.raw", "--swap", "--json", check=True)
    import json

    doc = json.loads(r.stdout)
    assert doc == {"file": "disk.raw", "epoch": 0, "block_size": B, "extents": [[0, 4]]}
    pwrite(p, b"x", B)
    doc = json.loads(run_blkfs("dirty", str(mount.mnt), str(p), "--json", check=True).stdout)
    assert doc == {"file": "disk.raw", "epoch": 1, "block_size": B, "extents": [[1, 1]]}
    doc = json.loads(run_blkfs("dirty", str(mount.mnt), "disk.raw", "--swap", "--json",
                               check=True).stdout)
    assert doc["epoch"] == 1 and doc["extents"] == [[1, 1]]


@pytest.mark.cache
def test_truncate_and_growth(mount: Mount) -> None:
    p = mount.path("disk.raw")
    p.write_bytes(b"\1" * 16 * B)
    mount.swap("disk.raw")
    os.truncate(p, 3 * B + 100)  # shrink: blocks past EOF dropped, nothing new to copy
    assert mount.dirty("disk.raw") == []
    st = {f["file"]: f for f in mount.call("status")["files"]}["disk.raw"]
    assert st["blocks"] == 4
    os.truncate(p, 16 * B)  # growth: the new blocks (and the old partial one) are dirty
    assert mount.swap("disk.raw") == [(3, 13)]
    pwrite(p, b"z", 20 * B + 5)  # write past EOF leaves a hole: the hole is new content
    assert mount.swap("disk.raw") == [(16, 5)]
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)  # O_TRUNC open
    os.close(fd)
    assert mount.dirty("disk.raw") == []
    assert {f["file"]: f for f in mount.call("status")["files"]}["disk.raw"]["blocks"] == 0


@pytest.mark.cache
def test_heat_split_and_hottest(mount: Mount) -> None:
    p = mount.path("vm.mem")
    p.write_bytes(b"\0" * 8 * B)
    for _ in range(5):
        pwrite(p, b"h", 3 * B)
    h = mount.call("heat", file="vm.mem")
    assert h["dynamic_extents"] == [[3, 1]]
    assert h["static"] == 7 and h["dynamic"] == 1
    st = {f["file"]: f for f in mount.call("status")["files"]}["vm.mem"]
    assert st["hottest"][0][0] == 3 and st["hottest"][0][1] > 5
    assert mount.call("heat", file="vm.mem", static_heat=100)["dynamic"] == 0


@pytest.mark.cache
def test_mmap_writes_are_tracked_at_msync_and_fsync(mount: Mount) -> None:
    p = mount.path("vm.mem")
    p.write_bytes(b"\0" * 16 * B)
    mount.swap("vm.mem")
    with open(p, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED)
        m[5 * B + 7] = 1
        m[9 * B:9 * B + 2] = b"ab"
        m.flush()  # msync
        assert mount.swap("vm.mem") == [(5, 1), (9, 1)]
        m[12 * B] = 1
        # An fsync of the file through the mount (what `blkfs dirty --swap` does
        # first) is a barrier for page-cache writes; syncfs is not.
        r = run_blkfs("dirty", str(mount.mnt), "vm.mem", "--swap", "--json", check=True)
        assert '"extents": [\n  [\n   12,\n   1\n  ]\n ]' in r.stdout
        m.close()
    assert (mount.backing / "vm.mem").read_bytes()[12 * B] == 1


@pytest.mark.cache
def test_block_size_option(mount_factory: Callable[..., Mount]) -> None:
    m = mount_factory("--block-size", "4K")
    p = m.path("f")
    p.write_bytes(b"\0" * 64 * 1024)
    m.swap("f")
    pwrite(p, b"x" * 5000, 4096 * 3)
    d = m.call("dirty", file="f")
    assert d["block_size"] == 4096 and d["extents"] == [[3, 2]]


@pytest.mark.cache
def test_clean_unmount_persists_bitmap_and_heat(mount_factory: Callable[..., Mount]) -> None:
    m = mount_factory()
    p = m.path("disk.raw")
    p.write_bytes(b"\0" * 8 * B)
    m.path("untouched").write_bytes(b"u" * B)
    m.swap("disk.raw")
    m.swap("untouched")
    for _ in range(4):
        pwrite(p, b"x", 2 * B)
    m.umount()
    assert (m.backing / ".blkfs" / "state.json").exists()
    m2 = mount_factory()
    assert not (m2.backing / ".blkfs" / "state.json").exists()  # consumed at mount
    d = m2.call("dirty", file="disk.raw")
    assert d["extents"] == [[2, 1]] and d["epoch"] == 1
    assert m2.dirty("untouched") == []
    assert m2.call("heat", file="disk.raw")["dynamic_extents"] == [[2, 1]]
    # the restored state survives a second clean cycle (files never looked up included)
    m2.umount()
    m3 = mount_factory()
    assert m3.dirty("disk.raw") == [(2, 1)]
    assert m3.dirty("untouched") == []


@pytest.mark.cache
def test_change_while_unmounted_reports_all_dirty(mount_factory: Callable[..., Mount]) -> None:
    m = mount_factory()
    m.path("disk.raw").write_bytes(b"\0" * 4 * B)
    m.swap("disk.raw")
    m.umount()
    with open(m.backing / "disk.raw", "r+b") as f:  # behind blkfs's back
        f.write(b"sneaky")
    m2 = mount_factory()
    assert m2.dirty("disk.raw") == [(0, 4)]


@pytest.mark.cache
def test_kill9_then_remount_reports_every_block_dirty(mount_factory: Callable[..., Mount]) -> None:
    m = mount_factory()
    m.path("disk.raw").write_bytes(b"\0" * 8 * B)
    m.path("sub").mkdir()
    m.path("sub/vm.mem").write_bytes(b"\0" * 3 * B)
    m.swap("disk.raw")
    m.swap("sub/vm.mem")
    m.umount()
    m = mount_factory()
    assert m.dirty("disk.raw") == []  # clean state restored
    pwrite(m.path("disk.raw"), b"y", 0)
    m.kill9()
    assert not m.mounted()
    m2 = mount_factory()
    assert m2.dirty("disk.raw") == [(0, 8)]
    assert m2.dirty("sub/vm.mem") == [(0, 3)]
    st = {f["file"]: f for f in m2.call("status")["files"]}
    assert not st["disk.raw"]["restored"]


@pytest.mark.cache
def test_a_4_tib_thin_image_is_tracked_exactly_in_kilobytes(
        mount_factory: Callable[..., Mount]) -> None:
    """A thin image of any size costs the daemon what its writes touch: writes at both ends
    of a 4 TiB file (64 Mi blocks) come back as exact page extents, a clean unmount keeps
    them, a crash makes the whole file dirty, and the daemon's memory never grows by the
    dense bitmap (128 MiB) or heat (512 MiB) it would take."""
    m = mount_factory("--block-size", "64K")
    size = 4 << 40
    before = _rss_kib(m.pid)
    with open(m.path("disk.raw"), "wb") as f:
        f.truncate(size)
    nblocks = size // B
    assert m.dirty("disk.raw") == [(0, nblocks)]  # new size: every block is new content
    m.swap("disk.raw")
    pwrite(m.path("disk.raw"), b"a" * 4096, 4096)
    pwrite(m.path("disk.raw"), b"z" * 4096, size - 4096)
    pwrite(m.path("disk.raw"), b"m" * 8192, size // 2 - 4096)  # across a block edge
    flush_file(str(m.path("disk.raw")))
    pages = m.call("dirty", file="disk.raw", pages=True)
    assert pages["page_size"] == 4096
    half = size // 2 // 4096
    assert pages["extents"] == [[1, 1], [half - 1, 2], [size // 4096 - 1, 1]]
    heat = m.call("heat", file="disk.raw")
    assert heat["blocks"] == nblocks and heat["dynamic"] == 0 and heat["static"] == nblocks
    hottest = {f["file"]: f for f in m.call("status")["files"]}["disk.raw"]["hottest"]
    assert sorted(b for b, _ in hottest) == [0, nblocks // 2 - 1, nblocks // 2, nblocks - 1]
    assert _rss_kib(m.pid) - before < 16 << 10, "the daemon grew by a dense map"
    m.umount()  # a clean unmount keeps the four blocks, not 64 Mi of them
    m2 = mount_factory("--block-size", "64K")
    assert m2.dirty("disk.raw") == [(0, 1), (nblocks // 2 - 1, 2), (nblocks - 1, 1)]
    m2.kill9()
    m3 = mount_factory("--block-size", "64K")
    assert m3.dirty("disk.raw") == [(0, nblocks)]  # after a crash: all of it, whatever size


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.fixture
def plain(mount_factory: Callable[..., Mount]) -> Mount:
    """A mount without the writeback cache whatever BLKFS_WRITEBACK says: freeze needs one."""
    return mount_factory("--no-writeback", "--block-size", "64K")


def test_freeze_holds_writers_and_thaw_releases_them(plain: Mount) -> None:
    mount = plain
    p = mount.path("disk.raw")
    p.write_bytes(b"\0" * 4 * B)
    mount.path("other").write_bytes(b"\0" * B)
    mount.swap("disk.raw")
    r = run_blkfs("freeze", str(mount.mnt), "disk.raw", check=True)
    assert "froze disk.raw" in r.stdout
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os
        fd = os.open({str(p)!r}, os.O_WRONLY)
        os.pwrite(fd, b"F" * 10, {B})
        print("written", flush=True)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert writer.poll() is None, "the write went through a frozen file"
        assert (mount.backing / "disk.raw").read_bytes()[B:B + 10] == b"\0" * 10
        assert p.read_bytes()[:10] == b"\0" * 10  # reads go on
        pwrite(mount.path("other"), b"o", 0)  # other files are not frozen
        assert mount.dirty("disk.raw") == []
        run_blkfs("thaw", str(mount.mnt), "disk.raw", check=True)
        out, _ = writer.communicate(timeout=10)
        assert out.strip() == "written"
    finally:
        if writer.poll() is None:
            run_blkfs("thaw", str(mount.mnt))
            writer.kill()
    assert mount.dirty("disk.raw") == [(1, 1)]


def test_freeze_all_covers_new_files(plain: Mount) -> None:
    mount = plain
    mount.path("a").write_bytes(b"a")
    run_blkfs("freeze", str(mount.mnt), check=True)
    writer = subprocess.Popen([sys.executable, "-c",
                               f"open({str(mount.path('new'))!r}, 'wb').write(b'n' * 10)"])
    try:
        time.sleep(0.5)
        assert writer.poll() is None
        assert mount.call("info")["frozen_all"]
    finally:
        run_blkfs("thaw", str(mount.mnt), check=True)
    assert writer.wait(timeout=10) == 0
    assert mount.path("new").read_bytes() == b"n" * 10


# A writer of unique stamps, one write at a time, into blocks [first, first + nblocks) of a
# file: with pwrite, through a shared mmap, or as whole O_DIRECT pages. Prints its count.
WRITER = textwrap.dedent("""
    import mmap, os, random, struct, sys, time
    path, kind, first, nblocks, bs, seconds = sys.argv[1:7]
    first, nblocks, bs, seconds = int(first), int(nblocks), int(bs), float(seconds)
    rnd = random.Random(kind)
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if kind == "direct" else 0))
    m = mmap.mmap(fd, (first + nblocks) * bs, mmap.MAP_SHARED) if kind == "mmap" else None
    page = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer: a whole page
    version = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        version += 1
        b = first + rnd.randrange(nblocks)
        stamp = struct.pack("<QQ", b, version)
        if kind == "direct":  # a whole aligned page of the block, stamped
            page[:16] = stamp
            os.pwrite(fd, page, b * bs + rnd.randrange(bs // 4096) * 4096)
            continue
        off = b * bs + rnd.randrange(0, bs - 16) // 8 * 8  # somewhere inside the block
        if m is not None:
            m[off:off + 16] = stamp
        else:
            os.pwrite(fd, stamp, off)
    if m is not None:
        m.flush()
        m.close()
    if kind != "direct":
        os.fsync(fd)
    os.close(fd)
    print(version)
""")



@pytest.mark.cache
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pwrite", "mmap"])
def test_no_lost_write_under_concurrent_swaps(
    mount_factory: Callable[..., Mount], mode: str
) -> None:
    """Invariant 1: copy each swapped set of pages to a replica while a writer hammers the
    file; after a final swap the replica must equal the file byte for byte.  A write whose
    mark were lost would leave an old version in the replica.  Many small pages (4 KiB
    under 64 KiB blocks: only the pages swapped are copied, never the rest of a block), few
    writes each: a lost mark is most often the page's last."""
    mount = mount_factory("--block-size", "64K")
    B, P = 64 * 1024, 4096
    nblocks = 512
    p = mount.path("disk.raw")
    p.write_bytes(b"\0" * nblocks * B)
    replica = bytearray(p.read_bytes())
    mount.swap("disk.raw")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(p), mode, "0", str(nblocks),
                               str(B), "4"], stdout=subprocess.PIPE, text=True)
    swaps = copied = 0
    with mount.client() as c:
        fd = os.open(p, os.O_RDONLY)
        try:
            def round_() -> None:
                nonlocal swaps, copied
                flush_file(str(p))  # the barrier for mmap writes still in the page cache
                reply = c.call(cp.Dirty("disk.raw", swap=True, pages=True))
                assert reply.page_size == P
                swaps += 1
                for first, count in reply.extents:
                    replica[first * P:(first + count) * P] = os.pread(fd, count * P, first * P)
                    copied += count

            while writer.poll() is None:
                round_()
            assert writer.returncode == 0
            round_()
        finally:
            os.close(fd)
    writes = int(writer.communicate()[0])
    assert writes > 100 and swaps > 5, (writes, swaps)
    assert bytes(replica) == (mount.backing / "disk.raw").read_bytes()


@pytest.mark.cache
def test_no_tracking_mount_is_a_plain_passthrough(mount_factory: Callable[..., Mount]) -> None:
    m = mount_factory("--no-tracking")
    m.path("f").write_bytes(b"data")
    assert m.path("f").read_bytes() == b"data"
    with pytest.raises(ControlError, match="--no-tracking"):
        m.call("dirty", file="f")
    assert m.call("info")["tracking"] is False


@pytest.mark.cache
def test_a_new_file_never_inherits_an_old_files_tracking(mount: Mount) -> None:
    """Inode numbers are reused after delete: a new file must start afresh."""
    for i in range(20):
        p = mount.path(f"f{i}")
        p.write_bytes(b"\0" * 16 * B)
        mount.swap(f"f{i}")
        os.unlink(p)
    q = mount.path("new")
    pwrite(q, b"n", 0)
    st = {f["file"]: f for f in mount.call("status")["files"]}["new"]
    assert st["size"] == 1 and st["blocks"] == 1 and st["dirty"] == 1
    assert mount.dirty("new") == [(0, 1)]


@pytest.mark.cache
def test_sigterm_is_a_clean_unmount(mount_factory: Callable[..., Mount]) -> None:
    m = mount_factory()
    m.path("disk.raw").write_bytes(b"\0" * 4 * B)
    m.swap("disk.raw")
    pwrite(m.path("disk.raw"), b"t", 2 * B)
    os.kill(m.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while not process_gone(m.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process_gone(m.pid) and not m.mounted()
    assert (m.backing / ".blkfs" / "state.json").exists()
    m2 = mount_factory()
    assert m2.dirty("disk.raw") == [(2, 1)]


@pytest.mark.cache
def test_flush_file_is_a_barrier_for_mmap_writes(mount: Mount) -> None:
    """sync_file_range through the mount pushes page-cache writes to the daemon
    (no FSYNC of the backing file needed); without it they stay in the cache."""
    p = mount.path("vm.mem")
    p.write_bytes(b"\0" * 64 * B)
    with open(p, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED)
        for rnd in range(3):
            mount.swap("vm.mem")
            for b in (3, 17, 40):
                m[b * B + rnd] = 1
            flush_file(str(p))
            assert mount.swap("vm.mem") == [(3, 1), (17, 1), (40, 1)]
        m.close()


@pytest.mark.cache
def test_clear_drops_marks_of_a_range_and_checks_its_input(mount: Mount) -> None:
    p = mount.path("disk.raw")
    p.write_bytes(b"\0" * 8 * B)
    assert mount.call("clear", file="disk.raw", extents=[[0, 3], [5, 1]])["epoch"] == 0
    assert mount.dirty("disk.raw") == [(3, 2), (6, 2)]
    pwrite(p, b"x", 0)
    assert mount.dirty("disk.raw") == [(0, 1), (3, 2), (6, 2)]
    for bad in ([[0]], [[-1, 2]], "0-3", [[True, 1]]):
        with pytest.raises(ControlError, match="extents"):
            mount.call("clear", file="disk.raw", extents=bad)
