"""One owner per VM across a history of migrations, with real mounts and processes: the
reproductions of what broke before VMs had an identity and a generation (issue 23).

Stand-in VMs are `sleep` processes (--suspend pid:); the destination runs no VM of its own,
so "the VM writes on H" is a write through H's mount.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Mount, together
from .hosts import (
    MIGRATOR,
    Server,
    digest,
    last_line,
    migrate,
    stopped,
    vm_record,
    wait_mid_copy,
)

pytestmark = pytest.mark.mount


@pytest.fixture
def vms() -> Iterator[Callable[[], int]]:
    """Stand-in VM processes, one per leg of a history (a retired one is gone)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> int:
        procs.append(subprocess.Popen(["sleep", "300"]))
        return procs[-1].pid

    yield start
    for p in procs:
        p.kill()
        p.wait()


def hop(src: Mount, dst: Mount, key: Path, servers: list[Server], pid: int,
        *files: str) -> subprocess.CompletedProcess[str]:
    s = Server(dst, key)
    servers.append(s)
    r = migrate(src, s.port, key, *files, "--suspend", f"pid:{pid}")
    if r.returncode == 0:
        assert s.finish()[0] == 0
    else:
        s.kill()
    return r


def status(m: Mount) -> dict[str, Any]:
    r = subprocess.run([*MIGRATOR, "status", "--mount", str(m.mnt), "--json"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def blkfs_vms(m: Mount) -> list[dict[str, Any]]:
    r = subprocess.run([sys.executable, "-m", "blkfs.cli", "status", str(m.mnt), "--json"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["vms"]  # type: ignore[no-any-return]


def resolve(m: Mount) -> str:
    r = subprocess.run([*MIGRATOR, "resolve", "--mount", str(m.mnt)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_stale_copy_never_overwrites_the_vm_that_runs_there(
        mount_factory: Callable[..., Mount], tmp_path: Path, key: Path, servers: list[Server],
        vms: Callable[[], int]) -> None:
    """G -> H of a; the VM writes on H; then another VM's migration G -> H is interrupted.
    The guard of a at H is a's own record: neither that session nor G's retries erase it."""
    g, h = together(
        lambda: mount_factory(backing=tmp_path / "g-backing", mnt=tmp_path / "g"),
        lambda: mount_factory(backing=tmp_path / "h-backing", mnt=tmp_path / "h"))
    (g.mnt / "a.raw").write_bytes(os.urandom(4 << 20))
    (g.mnt / "b.raw").write_bytes(os.urandom(24 << 20))  # (2.4 s at 10 MB/s: time to cut)
    assert hop(g, h, key, servers, vms(), "a.raw").returncode == 0
    with open(h.mnt / "a.raw", "r+b") as f:  # the VM runs on H and writes
        f.write(b"written on H")
    on_h = digest(h.mnt / "a.raw")
    r = hop(g, h, key, servers, vms(), "a.raw")
    assert r.returncode == 1 and "left this host" in r.stderr, r.stderr
    # Another VM's migration into H, interrupted in mid-copy with Ctrl-C.
    s = Server(h, key)
    servers.append(s)
    st = tmp_path / "b.status"
    b_vm = vms()
    m = subprocess.Popen([*MIGRATOR, "migrate", "--mount", str(g.mnt), "--to",
                          f"127.0.0.1:{s.port}", "--key-file", str(key), "--bandwidth", "10",
                          "--status-file", str(st), "--suspend", f"pid:{b_vm}", "b.raw"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_mid_copy(st, m)
    m.send_signal(signal.SIGINT)
    _, err = m.communicate(timeout=60)
    assert m.returncode != 0 and "interrupted" in err, err
    assert not stopped(b_vm)  # the VM of b runs on at G
    s.kill()
    # a from G again: refused at G (it left), and H's copy untouched.
    r = hop(g, h, key, servers, vms(), "a.raw")
    assert r.returncode == 1 and "left this host" in r.stderr, r.stderr
    assert digest(h.mnt / "a.raw") == on_h
    # Even a G that forgot everything (its records lost) cannot overwrite it: H refuses.
    subprocess.run(["rm", "-rf", str(g.backing / ".blkfs" / "vms")], check=True)
    r = hop(g, h, key, servers, vms(), "a.raw")
    assert r.returncode == 1 and "refusing to overwrite: a.raw" in r.stderr, r.stderr
    assert digest(h.mnt / "a.raw") == on_h
    roles = {v["name"]: v["role"] for v in status(h)["vms"]}
    assert roles == {"a": "owner", "b": "incomplete"}, roles


def test_there_and_back_and_there_again_leaves_one_owner(
        mount_factory: Callable[..., Mount], tmp_path: Path, key: Path, servers: list[Server],
        vms: Callable[[], int]) -> None:
    """C -> D, D -> C, C -> D: one id, generation 3, D the owner and C retired, whoever is
    asked; then C hands the VM to a fresh host F: refused."""
    c, d = together(
        lambda: mount_factory(backing=tmp_path / "c-backing", mnt=tmp_path / "c"),
        lambda: mount_factory(backing=tmp_path / "d-backing", mnt=tmp_path / "d"))
    (c.mnt / "disk.raw").write_bytes(os.urandom(8 << 20))
    (c.mnt / "vm.mem").write_bytes(os.urandom(2 << 20))
    for src, dst in ((c, d), (d, c), (c, d)):
        r = hop(src, dst, key, servers, vms(), "disk.raw", "vm.mem")
        assert r.returncode == 0, r.stderr
    assert digest(c.mnt / "disk.raw") == digest(d.mnt / "disk.raw")
    sc, sd = status(c)["vms"], status(d)["vms"]
    assert len(sc) == len(sd) == 1 and sc[0]["id"] == sd[0]["id"]
    assert (sc[0]["role"], sc[0]["generation"]) == ("retired", 3), sc
    assert (sd[0]["role"], sd[0]["generation"]) == ("owner", 3), sd
    assert [h["event"] for h in sd[0]["history"]][-2:] == ["incoming", "took"]
    assert "retired at generation 3" in resolve(c) and "owner at generation 3" in resolve(d)
    assert [v["role"] for v in blkfs_vms(c)] == ["retired"]
    assert [v["role"] for v in blkfs_vms(d)] == ["owner"]
    for m in (c, d):  # the records are the host's, not the VM's: the mount never shows them
        assert sorted(os.listdir(m.mnt)) == ["disk.raw", "vm.mem"]
    f = mount_factory(backing=tmp_path / "f-backing", mnt=tmp_path / "f")
    r = hop(c, f, key, servers, vms(), "disk.raw", "vm.mem")
    assert r.returncode == 1 and "left this host" in r.stderr and "generation 3" in r.stderr
    assert os.listdir(f.mnt) == []
    r = hop(d, f, key, servers, vms(), "disk.raw", "vm.mem")  # its owner may
    assert r.returncode == 0, r.stderr
    assert status(f)["vms"][0]["generation"] == 4


def test_a_file_named_by_an_absolute_path_or_a_symlink_is_the_same_file(
        freeze_hosts: tuple[Mount, Mount], key: Path, servers: list[Server],
        tmp_path: Path) -> None:
    src, dst = freeze_hosts
    (src.mnt / "vms").mkdir()
    (src.mnt / "vms" / "disk.raw").write_bytes(os.urandom(2 << 20))
    link = tmp_path / "disk-link.raw"
    link.symlink_to(src.mnt / "vms" / "disk.raw")
    outside = tmp_path / "outside.raw"
    outside.write_bytes(b"x" * 4096)
    s = Server(dst, key)
    servers.append(s)
    r = migrate(src, s.port, key, str(outside), "--vm", "web")
    assert r.returncode == 1 and "is not a file under the mount" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert vm_record(src) == {}  # nothing recorded, nothing handed off
    r = migrate(src, s.port, key, str(link), "vms/disk.raw", "--vm", "web")  # one file, twice
    assert r.returncode == 1 and (f"vms/disk.raw is named twice: as {link} and vms/disk.raw"
                                  in last_line(r)), r.stderr
    r = migrate(src, s.port, key, str(src.mnt / "vms" / "disk.raw"), "--vm", "web")
    assert r.returncode == 0, r.stderr
    assert s.finish()[0] == 0
    assert digest(dst.mnt / "vms" / "disk.raw") == digest(src.mnt / "vms" / "disk.raw")
    rec = vm_record(src)
    assert rec["files"] == ["vms/disk.raw"] and rec["name"] == "web" and rec["role"] == "retired"
    subprocess.run([sys.executable, "-m", "blkfs.cli", "thaw", str(src.mnt)], check=True)
    # Through a symlink, or by --vm alone: the same VM, which left this host.
    s = Server(dst, key)
    servers.append(s)
    for args in ((str(link),), ("--vm", "web")):
        r = migrate(src, s.port, key, *args)
        assert r.returncode == 1 and "VM web left this host" in r.stderr, r.stderr
    s.kill()
