"""The Operations class called directly (no mount): error mapping and fault isolation."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
from pyfuse3 import FUSEError

from blkfs.fs import BlkFS
from blkfs.registry import Registry
from blkfs.tracker import FileTracker

CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), umask=0o022)


def make_fs(tmp_path: Path) -> BlkFS:
    return BlkFS(Registry(str(tmp_path), shift=16, half_life=60.0, static_heat=1.0))


async def test_os_errors_keep_their_errno(tmp_path: Path) -> None:
    fs = make_fs(tmp_path)
    with pytest.raises(FUSEError) as ei:
        await fs.lookup(pyfuse3.ROOT_INODE, b"missing", CTX)
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(FUSEError) as ei:
        await fs.getattr(987654321, CTX)
    assert ei.value.errno == errno.ESTALE
    with pytest.raises(FUSEError) as ei:
        await fs.getxattr(pyfuse3.ROOT_INODE, b"user.x", CTX)
    assert ei.value.errno == errno.ENOSYS  # the kernel stops asking after one ENOSYS
    fs.close_all()


async def test_unexpected_fault_answers_eio_and_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fs = make_fs(tmp_path)
    fi, entry = await fs.create(pyfuse3.ROOT_INODE, b"disk.raw", 0o644, os.O_RDWR, CTX)
    assert await fs.write(fi.fh, 0, b"hello") == 5

    def broken(*args: object) -> bytes:
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(os, "pread", broken)
    with pytest.raises(FUSEError) as ei:
        await fs.read(fi.fh, 0, 5)
    assert ei.value.errno == errno.EIO
    assert fs.faults == 1
    assert "internal error in read" in caplog.text and "simulated bug" in caplog.text
    monkeypatch.undo()
    assert await fs.read(fi.fh, 0, 5) == b"hello"  # still serving
    monkeypatch.setattr(os, "fstat", broken)
    with pytest.raises(FUSEError) as ei:
        await fs.getattr(entry.st_ino, CTX)
    assert ei.value.errno == errno.EIO and fs.faults == 2
    monkeypatch.undo()
    await fs.release(fi.fh)
    fs.close_all()


async def test_write_marks_after_the_data_reached_the_backing_file(tmp_path: Path) -> None:
    fs = make_fs(tmp_path)
    fi, _ = await fs.create(pyfuse3.ROOT_INODE, b"f", 0o644, os.O_RDWR, CTX)
    tr = fs._files[fi.fh].tracker
    assert tr is not None
    with pytest.raises(FUSEError):
        await fs.write(fi.fh, -1, b"x")  # the pwrite fails: nothing may be marked
    assert tr.dirty_extents() == []
    await fs.write(fi.fh, 70000, b"x")
    assert tr.dirty_extents() == [(0, 2)]  # the block written and the hole before it
    await fs.release(fi.fh)
    fs.close_all()


def _unmount_and_remount(tmp_path: Path, fs: BlkFS) -> Registry:
    """What a clean unmount saves and the next mount reads back (no FUSE needed)."""
    from blkfs.mount import MountOptions, _save
    from blkfs.tracker import load_state

    opts = MountOptions(str(tmp_path), str(tmp_path / "mnt"), 1 << 16, 60.0, 1.0)
    os.makedirs(opts.meta_dir, exist_ok=True)
    _save(opts, fs.registry, fs)
    fs.close_all()
    return Registry(str(tmp_path), shift=16, half_life=60.0, static_heat=1.0,
                    saved=load_state(opts.meta_dir, 1 << 16))


def _dirty_after_remount(reg: Registry, path: Path) -> list[tuple[int, int]]:
    st = os.stat(path)
    return reg.tracker_for((st.st_dev, st.st_ino), st).dirty_extents()


@pytest.mark.parametrize("marking_the_file_fails_too", [False, True])
@pytest.mark.parametrize(("block", "blocks_after"), [(5, 8), (10, 11)])  # inside, past the end
async def test_a_fault_after_the_pwrite_never_leaves_a_write_unreported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marking_the_file_fails_too: bool,
        block: int, blocks_after: int, caplog: pytest.LogCaptureFixture) -> None:
    """Invariant 5, structurally: the data reached the backing file, the marking did not."""
    fs = make_fs(tmp_path)
    fi, _ = await fs.create(pyfuse3.ROOT_INODE, b"disk.raw", 0o644, os.O_RDWR, CTX)
    await fs.write(fi.fh, 0, b"\0" * (8 << 16))
    tr = fs._files[fi.fh].tracker
    assert tr is not None
    tr.swap()  # a clean epoch: nothing dirty

    def broken(*args: object) -> None:
        raise ZeroDivisionError("simulated bug in marking")

    monkeypatch.setattr(FileTracker, "on_write", broken)
    if marking_the_file_fails_too:
        monkeypatch.setattr(FileTracker, "mark_all", broken)
    with pytest.raises(FUSEError) as ei:
        await fs.write(fi.fh, block << 16, b"new data")
    assert ei.value.errno == errno.EIO and fs.faults == 1
    monkeypatch.undo()
    assert (tmp_path / "disk.raw").read_bytes()[block << 16:(block << 16) + 8] == b"new data"
    assert fs.registry.trust_lost is marking_the_file_fails_too
    await fs.release(fi.fh)
    reg = _unmount_and_remount(tmp_path, fs)
    # Either way the next mount reports the block dirty: the whole file, from the saved
    # record (marked all-dirty) or because nothing was saved at all.
    assert _dirty_after_remount(reg, tmp_path / "disk.raw") == [(0, blocks_after)]
    assert "every block" in caplog.text


async def test_a_clean_unmount_saves_a_provably_complete_bitmap(tmp_path: Path) -> None:
    """The control for the test above: without a fault the saved bitmap is exact."""
    fs = make_fs(tmp_path)
    fi, _ = await fs.create(pyfuse3.ROOT_INODE, b"disk.raw", 0o644, os.O_RDWR, CTX)
    await fs.write(fi.fh, 0, b"\0" * (8 << 16))
    tr = fs._files[fi.fh].tracker
    assert tr is not None
    tr.swap()
    await fs.write(fi.fh, 5 << 16, b"new data")
    await fs.release(fi.fh)
    reg = _unmount_and_remount(tmp_path, fs)
    assert _dirty_after_remount(reg, tmp_path / "disk.raw") == [(5, 1)]


async def test_a_fault_recording_a_truncate_reports_the_file_dirty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = make_fs(tmp_path)
    fi, entry = await fs.create(pyfuse3.ROOT_INODE, b"disk.raw", 0o644, os.O_RDWR, CTX)
    await fs.write(fi.fh, 0, b"\1" * (4 << 16))
    tr = fs._files[fi.fh].tracker
    assert tr is not None
    tr.swap()

    def broken(*args: object) -> None:
        raise ZeroDivisionError("simulated bug in on_resize")

    monkeypatch.setattr(FileTracker, "on_resize", broken)
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 6 << 16
    fields = SimpleNamespace(update_size=True, update_mode=False, update_uid=False,
                             update_gid=False, update_atime=False, update_mtime=False)
    with pytest.raises(FUSEError) as ei:
        await fs.setattr(entry.st_ino, attr, fields, fi.fh, CTX)
    assert ei.value.errno == errno.EIO
    monkeypatch.undo()
    assert os.path.getsize(tmp_path / "disk.raw") == 6 << 16  # the backing file did grow
    await fs.release(fi.fh)
    reg = _unmount_and_remount(tmp_path, fs)
    assert _dirty_after_remount(reg, tmp_path / "disk.raw") == [(0, 6)]
