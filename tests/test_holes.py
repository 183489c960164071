"""The daemon's punch (control op `punch`): zeros that free space, tracked and coherent."""

from __future__ import annotations

import mmap
import os

import pytest

from .conftest import Mount

pytestmark = [pytest.mark.mount, pytest.mark.cache]  # a punch behind the page cache
BS = 64 << 10


def test_a_punched_range_reads_as_zeros_through_the_mount_and_is_tracked(mount: Mount) -> None:
    f = mount.path("disk.raw")
    data = os.urandom(16 * BS)
    f.write_bytes(data)
    with open(f, "rb") as r:  # the kernel caches these pages (keep_cache)
        assert r.read() == data
        m = mmap.mmap(r.fileno(), 0, prot=mmap.PROT_READ)
        assert m[4 * BS:4 * BS + 8] == data[4 * BS:4 * BS + 8]
        mount.swap("disk.raw")
        before = os.stat(mount.backing / "disk.raw").st_blocks
        assert mount.call("punch", file="disk.raw", offset=4 * BS, length=8 * BS)["count"] == 1
        want = data[:4 * BS] + bytes(8 * BS) + data[12 * BS:]
        assert f.read_bytes() == want  # no stale cached page
        assert m[4 * BS:4 * BS + 8] == bytes(8)  # nor a stale mapped one
        m.close()
    assert os.stat(mount.backing / "disk.raw").st_blocks < before  # the space is freed
    assert os.path.getsize(f) == 16 * BS  # size kept
    assert mount.dirty("disk.raw") == [(4, 8)]  # a write like any other


def test_punch_past_the_end_is_clipped_and_a_bad_file_is_refused(mount: Mount) -> None:
    mount.path("f").write_bytes(b"x" * 100)
    assert mount.call("punch", file="f", offset=50, length=10 << 20)["count"] == 1
    assert mount.path("f").read_bytes() == b"x" * 50 + bytes(50)
    assert mount.call("punch", file="f", offset=500, length=10)["count"] == 0
    from blkfs.control import ControlError

    with pytest.raises(ControlError, match="no such file"):
        mount.call("punch", file="nope", offset=0, length=1)
    with pytest.raises(ControlError, match=r"without '\.\.'"):
        mount.call("punch", file="../f", offset=0, length=1)
