"""Passthrough correctness through a real blkfs mount."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import subprocess
from pathlib import Path

import pytest

from blkfs.control import ControlError

from .conftest import Mount

pytestmark = [pytest.mark.mount, pytest.mark.cache]  # semantics on both cache modes, as ext4

_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(-100, old.encode(), -100, new.encode(), ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@pytest.mark.quick  # a mount smoke test of the quick tier
def test_byte_exact_roundtrip(mount: Mount) -> None:
    data = os.urandom(3 * 1024 * 1024 + 12345)
    p = mount.path("disk.raw")
    p.write_bytes(data)
    assert p.read_bytes() == data
    assert (mount.backing / "disk.raw").read_bytes() == data
    with open(p, "r+b") as f:
        f.seek(70000)
        f.write(b"X" * 5)
    expect = data[:70000] + b"X" * 5 + data[70005:]
    assert (mount.backing / "disk.raw").read_bytes() == expect
    assert p.stat().st_size == len(data)


def test_two_opens_readonly_then_readwrite(mount: Mount) -> None:
    p = mount.path("img")
    p.write_bytes(b"\0" * 8192)
    ro = os.open(p, os.O_RDONLY)
    rw = os.open(p, os.O_RDWR)
    try:
        os.pwrite(rw, b"hello", 100)
        assert os.pread(ro, 5, 100) == b"hello"
        with pytest.raises(OSError) as ei:
            os.pwrite(ro, b"no", 0)
        assert ei.value.errno == errno.EBADF
        os.pwrite(rw, b"again", 200)  # the read-only fd did not break the read-write one
        os.fsync(rw)
    finally:
        os.close(ro)
        os.close(rw)
    assert (mount.backing / "img").read_bytes()[200:205] == b"again"


def test_o_direct_open(mount: Mount) -> None:
    p = mount.path("direct.img")
    p.write_bytes(b"\0" * (1 << 20))
    fd = os.open(p, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 8192)  # page-aligned buffer for O_DIRECT
        buf.write(b"D" * 8192)
        assert os.pwritev(fd, [buf], 65536) == 8192
        rbuf = mmap.mmap(-1, 8192)
        assert os.preadv(fd, [rbuf], 65536) == 8192
        assert bytes(rbuf) == b"D" * 8192
    finally:
        os.close(fd)
    assert (mount.backing / "direct.img").read_bytes()[65536:65536 + 8192] == b"D" * 8192


def test_files_reachable_after_parent_renamed(mount: Mount) -> None:
    d = mount.path("vms/a")
    d.mkdir(parents=True)
    f = d / "disk.raw"
    f.write_bytes(b"abc")
    fd = os.open(f, os.O_RDWR)
    try:
        os.rename(mount.path("vms"), mount.path("moved"))
        os.pwrite(fd, b"Z", 0)  # open file still works
        assert mount.path("moved/a/disk.raw").read_bytes() == b"Zbc"
        os.rename(mount.path("moved/a"), mount.path("a2"))
        assert mount.path("a2/disk.raw").read_bytes() == b"Zbc"
        mount.path("a2/new").write_bytes(b"n")
        assert (mount.backing / "a2" / "new").read_bytes() == b"n"
    finally:
        os.close(fd)


def test_hard_links(mount: Mount) -> None:
    a = mount.path("a")
    a.write_bytes(b"one")
    os.link(a, mount.path("b"))
    assert a.stat().st_ino == mount.path("b").stat().st_ino
    assert a.stat().st_nlink == 2
    mount.path("b").write_bytes(b"two")
    assert a.read_bytes() == b"two"
    os.unlink(a)
    assert mount.path("b").stat().st_nlink == 1
    assert mount.path("b").read_bytes() == b"two"


def test_mmap_shared_read_and_write(mount: Mount) -> None:
    p = mount.path("vm.mem")
    p.write_bytes(bytes(range(256)) * 1024)
    with open(p, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED)
        assert m[1000:1004] == bytes(range(1000 % 256, 1000 % 256 + 4))
        m[4096:4100] = b"MMAP"
        m.flush()
        m.close()
    assert (mount.backing / "vm.mem").read_bytes()[4096:4100] == b"MMAP"


def test_large_writes_reach_daemon_as_1mib_requests(mount: Mount) -> None:
    p = mount.path("big")
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        assert os.write(fd, b"x" * (4 << 20)) == 4 << 20
    finally:
        os.close(fd)
    st = {f["file"]: f for f in mount.call("status")["files"]}
    # One 4 MiB write() arrives as four 1 MiB FUSE writes: the largest the kernel allows.
    assert st["big"]["writes"] == 4


def test_create_mode_and_owner(mount_factory: object) -> None:
    m = mount_factory("--allow-other")  # type: ignore[operator]
    d = m.path("shared")
    d.mkdir()
    os.chmod(d, 0o777)
    # create() must honour the caller's mode (after its umask) and uid/gid
    code = "umask 137; echo x > f; umask 022; mkdir -m 750 d; ln -s f l"
    subprocess.run(["sh", "-c", code], cwd=d, user=65534, group=65534, check=True)
    for name, mode in (("f", 0o640), ("d", 0o750)):
        st = os.lstat(d / name)
        assert (st.st_uid, st.st_gid) == (65534, 65534), name
        assert stat.S_IMODE(st.st_mode) == mode, name
        bst = os.lstat(m.backing / "shared" / name)
        assert (bst.st_uid, bst.st_gid, bst.st_mode) == (65534, 65534, st.st_mode)
    assert os.lstat(d / "l").st_uid == 65534
    # default_permissions: another user may not write a 0640 file of nobody's
    r = subprocess.run(["sh", "-c", "echo y >> f"], cwd=d, user=1234, capture_output=True)
    assert r.returncode != 0 and b"Permission denied" in r.stderr


def test_setattr_mode_owner_times_size(mount: Mount) -> None:
    p = mount.path("f")
    p.write_bytes(b"x" * 10000)
    os.chmod(p, 0o600)
    os.chown(p, 123, 456)
    os.truncate(p, 100)
    os.utime(p, ns=(1_000_000_000, 2_000_000_000))
    st, bst = os.stat(p), os.stat(mount.backing / "f")
    for s in (st, bst):
        assert stat.S_IMODE(s.st_mode) == 0o600
        assert (s.st_uid, s.st_gid) == (123, 456)
        assert (s.st_atime_ns, s.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
        assert s.st_size == 100
    with open(p, "r+b") as f:
        f.truncate(50000)
    assert os.stat(mount.backing / "f").st_size == 50000


def test_directories_symlinks_rename_flags(mount: Mount) -> None:
    mount.path("d/e").mkdir(parents=True)
    mount.path("d/e/f").write_bytes(b"f")
    assert sorted(os.listdir(mount.path("d"))) == ["e"]
    with pytest.raises(OSError) as ei:
        os.rmdir(mount.path("d"))
    assert ei.value.errno == errno.ENOTEMPTY
    os.symlink("e/f", mount.path("d/link"))
    assert os.readlink(mount.path("d/link")) == "e/f"
    assert mount.path("d/link").read_bytes() == b"f"
    mount.path("a").write_bytes(b"A")
    mount.path("b").write_bytes(b"B")
    with pytest.raises(OSError) as ei:
        renameat2(str(mount.path("a")), str(mount.path("b")), RENAME_NOREPLACE)
    assert ei.value.errno == errno.EEXIST
    renameat2(str(mount.path("a")), str(mount.path("b")), RENAME_EXCHANGE)
    assert mount.path("a").read_bytes() == b"B" and mount.path("b").read_bytes() == b"A"
    os.rename(mount.path("a"), mount.path("b"))
    assert not mount.path("a").exists() and mount.path("b").read_bytes() == b"B"
    os.unlink(mount.path("d/e/f"))
    os.unlink(mount.path("d/link"))
    os.rmdir(mount.path("d/e"))
    os.rmdir(mount.path("d"))
    assert sorted(os.listdir(mount.mnt)) == ["b"]
    many = [f"n{i:04d}" for i in range(600)]  # readdir over several replies
    mount.path("many").mkdir()
    for n in many:
        mount.path("many", ).joinpath(n).touch()
    assert sorted(os.listdir(mount.path("many"))) == many


def test_symlink_times_are_the_links_own_as_on_ext4(mount: Mount) -> None:
    """utimensat(AT_SYMLINK_NOFOLLOW) sets the link's times and leaves its target's alone."""
    target = mount.path("target")
    target.write_bytes(b"t")
    os.utime(target, ns=(1_000_000_000, 2_000_000_000))
    link = mount.path("link")
    os.symlink("target", link)
    os.utime(link, ns=(3_000_000_123, 4_000_000_456), follow_symlinks=False)
    st = os.lstat(link)
    assert (st.st_atime_ns, st.st_mtime_ns) == (3_000_000_123, 4_000_000_456)
    backing = os.lstat(mount.backing / "link")
    assert (backing.st_atime_ns, backing.st_mtime_ns) == (3_000_000_123, 4_000_000_456)
    assert os.stat(target).st_mtime_ns == 2_000_000_000
    assert mount.call("info")["faults"] == 0


def test_errors_have_the_right_errno_and_the_daemon_survives(mount: Mount) -> None:
    cases = [
        (lambda: os.open(mount.path("nope"), os.O_RDONLY), errno.ENOENT),
        (lambda: os.mkdir(mount.mnt), errno.EEXIST),
        (lambda: os.rmdir(mount.path("file")), errno.ENOTDIR),
        (lambda: os.open(mount.path("file"), os.O_CREAT | os.O_EXCL | os.O_WRONLY), errno.EEXIST),
        (lambda: os.listdir(mount.path("file")), errno.ENOTDIR),
        (lambda: os.unlink(mount.path("dir")), errno.EISDIR),
    ]
    mount.path("file").write_bytes(b"1")
    mount.path("dir").mkdir()
    for fn, code in cases:
        with pytest.raises(OSError) as ei:
            fn()
        assert ei.value.errno == code
    assert mount.path("file").read_bytes() == b"1"
    assert mount.call("info")["faults"] == 0


def test_statfs_reports_backing_limits(mount: Mount) -> None:
    sv, bv = os.statvfs(mount.mnt), os.statvfs(mount.backing)
    assert sv.f_namemax == bv.f_namemax
    assert sv.f_blocks == bv.f_blocks and sv.f_bsize == bv.f_bsize


def test_no_path_escapes_the_backing_dir(mount_factory: object, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    m = mount_factory(backing=tmp_path / "a" / "backing", mnt=tmp_path / "b" / "mnt")  # type: ignore[operator]
    (tmp_path / "a" / "outside-secret").write_bytes(b"secret")
    # A relative symlink is resolved by the kernel against the mount, never by the
    # daemon against the backing tree: from the mount it leads to b/, not a/.
    os.symlink("../outside-secret", m.path("ln"))
    assert os.readlink(m.path("ln")) == "../outside-secret"
    with pytest.raises(FileNotFoundError):
        m.path("ln").read_bytes()
    with pytest.raises(FileNotFoundError):
        os.stat(m.path("outside-secret"))
    # The control socket refuses paths that leave the mount, directly or by symlink.
    for bad, words in (("../outside-secret", "without '..'"), ("/etc/passwd", "relative"),
                       ("ln", "outside the mount")):
        with pytest.raises(ControlError, match=words):
            m.call("dirty", file=bad)
    # The metadata dir is invisible and cannot be created, renamed onto or removed.
    assert ".blkfs" not in os.listdir(m.mnt)
    with pytest.raises(FileNotFoundError):
        os.stat(m.path(".blkfs"))
    with pytest.raises(PermissionError):
        os.mkdir(m.path(".blkfs"))
    m.path("x").write_bytes(b"x")
    with pytest.raises(PermissionError):
        os.rename(m.path("x"), m.path(".blkfs"))
    with pytest.raises(ControlError, match="no such file"):
        m.call("dirty", file=".blkfs/lock")
    assert (m.backing / ".blkfs" / "lock").exists()
    # ".." of the mount root is the kernel's business: the mount's parent.
    assert os.stat(m.path("..")).st_ino == os.stat(tmp_path / "b").st_ino
