"""Writeback mounts (`blkfs mount --writeback`): the kernel's page cache takes the writes and
hands them to blkfs at writeback.  Tracking must stay exact at every flush, the file must
behave as on the backing filesystem (an fsx-style random-op check against a twin file), and
what cannot work (freeze) is refused in one line."""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from blkfs import ctlproto as cp
from blkfs.bdi import bdi_name
from blkfs.control import flush_file

from .conftest import Mount, run_blkfs
from .hosts import (
    wait_for,
)
from .test_tracking import WRITER

pytestmark = pytest.mark.mount

B = 64 * 1024


def bdi_of(m: Mount) -> Path:
    name = bdi_name(Path("/proc/self/mountinfo").read_text(), str(m.mnt))
    assert name is not None
    return Path("/sys/class/bdi") / name


def test_a_writeback_mount_gets_its_dirty_budget_and_says_so(
        mount_factory: Callable[..., Mount]) -> None:
    m = mount_factory("--writeback", "--dirty-limit", "256M")
    info = m.call("info")
    assert info["writeback"] and info["dirty_limit"] == 256 << 20
    d = bdi_of(m)
    assert (d / "strict_limit").read_text().strip() == "0"  # the 1 % leash is lifted ...
    assert abs(int((d / "max_bytes").read_text()) - (256 << 20)) < 1 << 20  # ... for a bound
    r = run_blkfs("status", str(m.mnt), check=True)
    assert "writeback cache (dirty limit 256.0 MiB)" in " ".join(r.stdout.split())
    m.umount()
    wait_for(lambda: released(d), 10, f"{d} to go")  # the knobs went with the mount


def released(bdi: Path) -> bool:
    """The mount of `bdi` is gone: the bdi with it (the kernel drops it soon after the
    unmount), or its number already serves a new mount (of another test: they run at once)."""
    return not bdi.exists() or any(
        ln.split()[2] == bdi.name for ln in Path("/proc/self/mountinfo").read_text().splitlines())


def test_plain_mounts_keep_the_kernels_default(mount_factory: Callable[..., Mount]) -> None:
    m = mount_factory("--no-writeback")
    assert not m.call("info")["writeback"]
    assert (bdi_of(m) / "strict_limit").read_text().strip() == "1"


def test_bad_dirty_limit_is_one_line(mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    for bad, says in (("lots", "cannot read"), ("4K", "too small")):
        r = run_blkfs("mount", str(tmp_path / "b"), str(tmp_path / "m"), "--writeback",
                      "--dirty-limit", bad)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.splitlines()) == 1


def test_every_write_is_in_the_set_after_the_flush(mount_factory: Callable[..., Mount]) -> None:
    m = mount_factory("--writeback")
    p = m.path("disk.raw")
    p.write_bytes(bytes(64 * B))
    m.swap("disk.raw")
    rnd = random.Random(3)
    want: set[int] = set()
    fd = os.open(p, os.O_RDWR)
    try:
        for _ in range(300):
            off, n = rnd.randrange(64 * B - 5000), rnd.randrange(1, 5000)
            os.pwrite(fd, os.urandom(n), off)
            want.update(range(off // B, (off + n - 1) // B + 1))
    finally:
        os.close(fd)
    flush_file(str(p))  # the barrier every swap in blkfs and the migrator stands behind
    got = {b for f, c in m.swap("disk.raw") for b in range(f, f + c)}
    assert got == want
    assert (m.backing / "disk.raw").read_bytes() == p.read_bytes()


def test_freeze_is_refused_with_what_to_use_instead(mount_factory: Callable[..., Mount]) -> None:
    m = mount_factory("--writeback")
    m.path("disk.raw").write_bytes(b"x")
    r = run_blkfs("freeze", str(m.mnt), "disk.raw")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert "--writeback" in r.stderr and "pid:" in r.stderr
    assert not m.call("info")["frozen_all"]


def test_a_daemon_killed_with_dirty_pages_reports_every_block_dirty(
        mount_factory: Callable[..., Mount]) -> None:
    m = mount_factory("--writeback")
    p = m.path("disk.raw")
    p.write_bytes(bytes(8 * B))
    m.swap("disk.raw")
    m.umount()
    m = mount_factory("--writeback")
    assert m.dirty("disk.raw") == []  # the clean state came back
    fd = os.open(m.path("disk.raw"), os.O_RDWR)
    os.pwrite(fd, b"lost in the page cache", 3 * B)  # no flush: the daemon never saw it
    m.kill9()
    with contextlib.suppress(OSError):  # ENOTCONN: the close's flush had nobody to go to
        os.close(fd)
    m2 = mount_factory("--writeback")
    assert m2.dirty("disk.raw") == [(0, 8)]


def test_size_mtime_links_and_truncate_agree_with_the_kernel(
        mount_factory: Callable[..., Mount]) -> None:
    """The kernel owns size and mtime between writebacks; after a flush the backing file
    agrees, and tracking saw growth, truncation and writes through a second name."""
    m = mount_factory("--writeback")
    p, back = m.path("disk.raw"), m.backing / "disk.raw"
    p.write_bytes(bytes(2 * B))
    m.swap("disk.raw")
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, b"grow", 5 * B + 10)  # past the end: the kernel extends the size
        assert os.fstat(fd).st_size == 5 * B + 14
        os.fsync(fd)
        st, bst = os.stat(p), os.stat(back)
        assert (st.st_size, st.st_mtime_ns) == (bst.st_size, bst.st_mtime_ns)
        os.ftruncate(fd, B + 1)
        assert os.stat(back).st_size == B + 1
    finally:
        os.close(fd)
    os.link(p, m.path("alias.raw"))
    with open(m.path("alias.raw"), "r+b") as f:
        f.seek(10)
        f.write(b"via the link")
    run_blkfs("dirty", str(m.mnt), "disk.raw", "--swap", check=True)  # flushes, then swaps
    assert m.dirty("alias.raw") == []  # one file, one tracker: the swap covered both names
    assert back.read_bytes() == p.read_bytes() and back.read_bytes()[10:22] == b"via the link"


def test_write_only_and_append_opens_land_where_they_would_on_the_backing_fs(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    """A partial page written through an O_WRONLY handle needs the page read first (the
    daemon opens such handles read-write), and O_APPEND is the kernel's job under writeback."""
    m = mount_factory("--writeback")
    twin = tmp_path / "twin"
    for path in (m.path("f"), twin):
        path.write_bytes(b"a" * 10000)
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, b"Z", 5)
        os.close(fd)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"END")
        os.pwrite(fd, b"!", 0)  # Linux: pwrite on O_APPEND appends too
        os.close(fd)
    flush_file(str(m.path("f")))
    assert m.path("f").read_bytes() == twin.read_bytes() == (m.backing / "f").read_bytes()


@pytest.mark.parametrize("writeback", [True, False], ids=["writeback", "plain"])
def test_random_ops_match_a_twin_on_the_backing_filesystem(
        mount_factory: Callable[..., Mount], tmp_path: Path, writeback: bool) -> None:
    """fsx-style: a long run of random writes, mmap writes, truncates, reads and fsyncs on a
    file through the mount and on a twin beside the backing directory (ext4 here): every read
    returns the twin's bytes, and after a flush the backing file is the twin."""
    m = mount_factory("--writeback" if writeback else "--no-writeback", "--block-size", "4K")
    fs_file, twin = m.path("fsx.raw"), tmp_path / "fsx.twin"
    rnd = random.Random(11)
    fds = [os.open(x, os.O_RDWR | os.O_CREAT, 0o644) for x in (fs_file, twin)]
    size, log = 0, []
    try:
        for step in range(1500):
            op = rnd.choice("wwwwmtrrs")
            if op == "w":
                off, n = rnd.randrange(600_000), rnd.randrange(1, 70_000)
                data = rnd.randbytes(n)
                for fd in fds:
                    os.pwrite(fd, data, off)
                size = max(size, off + n)
            elif op == "m" and size >= 4096:
                off, n = rnd.randrange(size), rnd.randrange(1, 9000)
                n = min(n, size - off)
                data = rnd.randbytes(n)
                for fd in fds:
                    with mmap.mmap(fd, size) as mm:
                        mm[off:off + n] = data
            elif op == "t":
                size = rnd.randrange(700_000)
                for fd in fds:
                    os.ftruncate(fd, size)
            elif op == "s":
                os.fsync(fds[0])
            else:
                off = rnd.randrange(size + 1000)
                n = rnd.randrange(1, 100_000)
                a, b = (os.pread(fd, n, off) for fd in fds)
                assert a == b, f"step {step}: read {n} at {off} differs; last ops {log[-8:]}"
            log.append(op)
            assert os.fstat(fds[0]).st_size == os.fstat(fds[1]).st_size == size, log[-8:]
    finally:
        for fd in fds:
            os.close(fd)
    flush_file(str(fs_file))
    assert (m.backing / "fsx.raw").read_bytes() == twin.read_bytes()
    assert m.call("info")["faults"] == 0


@pytest.mark.slow
def test_no_lost_write_with_pwrite_mmap_and_direct_writers_at_once(
        mount_factory: Callable[..., Mount]) -> None:
    """Invariant 1 under writeback: three writers (buffered pwrite, shared mmap, O_DIRECT),
    each on its third of the file, while swaps run in a loop behind a flush; a replica built
    from the swapped sets of pages (4 KiB under 16 KiB blocks), read from the backing file as
    the migrator reads, equals the file."""
    m = mount_factory("--writeback", "--block-size", "16K")
    bs, third = 16 * 1024, 1024
    p, back = m.path("disk.raw"), m.backing / "disk.raw"
    p.write_bytes(bytes(3 * third * bs))
    replica = bytearray(back.read_bytes())
    m.swap("disk.raw")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(p), kind,
                                 str(i * third), str(third), str(bs), "4"],
                                stdout=subprocess.PIPE, text=True)
               for i, kind in enumerate(("pwrite", "mmap", "direct"))]
    swaps = 0
    fd = os.open(back, os.O_RDONLY)
    try:
        with m.client() as c:
            def round_() -> None:
                nonlocal swaps
                flush_file(str(p))
                reply = c.call(cp.Dirty("disk.raw", swap=True, pages=True))
                ps = reply.page_size
                assert ps == 4096
                for first, count in reply.extents:
                    replica[first * ps:(first + count) * ps] = os.pread(fd, count * ps,
                                                                        first * ps)
                swaps += 1

            while any(w.poll() is None for w in writers):
                round_()
            round_()
    finally:
        os.close(fd)
        for w in writers:
            if w.poll() is None:
                w.kill()
    counts = [int(w.communicate()[0]) for w in writers]
    assert all(w.returncode == 0 for w in writers)
    assert min(counts) > 100 and swaps > 5, (counts, swaps)
    assert bytes(replica) == back.read_bytes() == p.read_bytes()


def test_migrating_with_freeze_from_a_writeback_mount_is_refused_before_anything(
        mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    m = mount_factory("--writeback")
    m.path("disk.raw").write_bytes(b"d" * B)
    before = (m.backing / "disk.raw").read_bytes()
    key = tmp_path / "key"
    key.write_text("ab" * 32)
    key.chmod(0o600)
    r = subprocess.run([sys.executable, "-m", "migrator.cli", "migrate", "--mount", str(m.mnt),
                        "--to", "127.0.0.1:9", "--key-file", str(key), "disk.raw"],
                       capture_output=True, text=True, timeout=60)  # the default: freeze
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--writeback mount" in r.stderr and "--suspend pid:PID" in r.stderr
    assert (m.backing / "disk.raw").read_bytes() == before
    assert not m.call("info")["frozen_all"] and m.dirty("disk.raw") == [(0, 1)]
