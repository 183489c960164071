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
