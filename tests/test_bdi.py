"""The writeback mount's bdi knobs: which bdi a mount is, and the ratio fallback (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blkfs.bdi import apply_budget, bdi_name, ratio_for

MOUNTINFO = """\
22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
61 22 0:39 / /tmp/my\\040vms rw,nosuid,nodev shared:30 - fuse.blkfs blkfs:/b rw,user_id=0
70 22 0:45 / /mnt/x rw shared:31 - fuse.blkfs blkfs:/c rw
71 70 0:46 / /mnt/x rw shared:32 - fuse.blkfs blkfs:/d rw
"""


def test_bdi_name_reads_the_mount_on_top_and_unescapes_paths() -> None:
    assert bdi_name(MOUNTINFO, "/tmp/my vms") == "0:39"
    assert bdi_name(MOUNTINFO, "/mnt/x") == "0:46"  # mounted over: the last one is on top
    assert bdi_name(MOUNTINFO, "/nowhere") is None


def test_ratio_for_rounds_up_and_stays_in_range() -> None:
    assert ratio_for(1 << 30, 4 << 30) == 25
    assert ratio_for(1, 4 << 30) == 1
    assert ratio_for(1 << 40, 4 << 30) == 100
    assert ratio_for(1 << 30, 0) == 100  # unknown threshold: do not throttle


def test_apply_budget_writes_max_bytes_or_falls_back_to_max_ratio(tmp_path: Path) -> None:
    mnt = "/"
    name = bdi_name(Path("/proc/self/mountinfo").read_text(), mnt)
    if name is None:
        pytest.skip("no root mount in mountinfo")
    knobs = tmp_path / name
    knobs.mkdir()
    for k in ("strict_limit", "max_bytes", "max_ratio"):
        (knobs / k).write_text("1\n")
    got = apply_budget(mnt, 512 << 20, sysfs=str(tmp_path))
    assert got.how == "max_bytes" and (knobs / "max_bytes").read_text() == f"{512 << 20}\n"
    assert (knobs / "strict_limit").read_text() == "0\n"
    (knobs / "max_bytes").unlink()  # an older kernel
    got = apply_budget(mnt, 512 << 20, sysfs=str(tmp_path))
    assert got.how.startswith("max_ratio ") and (knobs / "max_ratio").read_text() != "1\n"
    assert apply_budget(mnt, 1, sysfs=str(tmp_path / "none")).how.startswith("no ")
