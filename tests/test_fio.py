"""fio with verification through a real mount (buffered and O_DIRECT)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest

from .conftest import Mount

pytestmark = [
    pytest.mark.mount,
    pytest.mark.slow,
    pytest.mark.cache,  # mmap, O_DIRECT and buffered writers on both cache modes
    pytest.mark.skipif(shutil.which("fio") is None, reason="fio is missing (apt-get install fio)"),
]


@pytest.mark.parametrize(("rw", "bs", "direct"), [("randwrite", "4k", 0), ("randrw", "64k", 1),
                                                  ("write", "1m", 0)])
def test_fio_verify_crc32c(mount: Mount, rw: str, bs: str, direct: int) -> None:
    r = subprocess.run(
        ["fio", "--name=verify", f"--filename={mount.path('fio.dat')}", "--size=32m",
         f"--rw={rw}", f"--bs={bs}", f"--direct={direct}", "--ioengine=psync",
         "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
         "--output-format=terse"],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # Every block fio wrote is in the dirty set: the whole file.
    st = {f["file"]: f for f in mount.call("status")["files"]}["fio.dat"]
    assert st["dirty"] == st["blocks"] == 32 * 1024 * 1024 // (64 * 1024)
    assert mount.call("info")["faults"] == 0


@pytest.mark.parametrize(("engine", "rw", "bs", "direct"),
                         [("mmap", "randwrite", "4k", 0), ("psync", "randrw", "16k", 1),
                          ("psync", "randwrite", "4k", 0)])
def test_fio_verify_four_jobs(mount_factory: Callable[..., Mount], engine: str, rw: str,
                              bs: str, direct: int) -> None:
    """Four jobs at once, each on its own file (mmap, O_DIRECT and buffered psync), with
    crc32c verification, on a plain and on a --writeback mount."""
    mount = mount_factory()
    r = subprocess.run(
        ["fio", "--name=verify", f"--directory={mount.mnt}", "--size=8m", "--numjobs=4",
         f"--ioengine={engine}", f"--rw={rw}", f"--bs={bs}", f"--direct={direct}",
         "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
         "--group_reporting", "--output-format=terse"],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    files = [f for f in mount.call("status")["files"] if f["file"].startswith("verify.")]
    assert len(files) == 4
    assert all(f["dirty"] == f["blocks"] == 8 * 1024 * 1024 // (64 * 1024) for f in files)
    assert mount.call("info")["faults"] == 0
