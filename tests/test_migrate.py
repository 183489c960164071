"""Live migration between two real blkfs mounts over TCP (loopback, and two namespaces)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from migrator import protocol as p

from .conftest import Mount, run_blkfs, together
from .hosts import (
    MIGRATOR,
    SIMVM,
    Server,
    assert_source_whole,
    digest,
    fill_source,
    in_netns,
    last_line,
    layout_digest,
    migrate,
    migrate_a_vm,
    state,
    stopped,
    two_vms,
    vm_records,
    wait_for,
    wait_mid_copy,
    wait_writing,
)

pytestmark = pytest.mark.mount

@pytest.mark.quick  # a mount smoke test of the quick tier
def test_idle_files_arrive_byte_exact(freeze_hosts: tuple[Mount, Mount], key: Path,
                                      servers: list[Server], tmp_path: Path) -> None:
    src, dst = freeze_hosts
    (src.mnt / "vms").mkdir()
    (src.mnt / "vms" / "disk.raw").write_bytes(os.urandom(3 * 1024 * 1024 + 777))
    (src.mnt / "vm.mem").write_bytes(os.urandom(2 * 1024 * 1024))
    (src.mnt / "empty").write_bytes(b"")
    s = Server(dst, key)
    servers.append(s)
    report = tmp_path / "report.json"
    r = migrate(src, s.port, key, "vms/disk.raw", "vm.mem", "empty", "--report", str(report))
    assert r.returncode == 0, r.stderr
    rc, out = s.finish()
    assert rc == 0 and "complete and verified" in out
    for name in ("vms/disk.raw", "vm.mem", "empty"):
        assert digest(dst.mnt / name) == digest(src.mnt / name), name
    st = state(dst)
    assert st is not None and st["status"] == "complete"
    rep = json.loads(report.read_text())
    for k in ("total_s", "downtime_ms", "bytes_sent", "data_bytes", "static_blocks",
              "dynamic_blocks", "rounds", "verified"):
        assert k in rep, k
    assert rep["verified"] is True and rep["status"] == "completed"
    assert rep["data_bytes"] == 5 * 1024 * 1024 + 777
    assert rep["data_bytes"] <= rep["bytes_sent"] <= 1.01 * rep["data_bytes"] + 4096
    assert "stay frozen" in r.stdout  # the default adapter: blkfs freeze
    run_blkfs("thaw", str(src.mnt), check=True)


@pytest.mark.cache
@pytest.mark.slow
def test_live_vm_migrates_with_no_lost_write(hosts: tuple[Mount, Mount], key: Path,
                                             servers: list[Server], tmp_path: Path) -> None:
    """Invariant 2: the destination equals the source at the suspend point, and the
    VM's own ledger proves it holds the latest version of every block."""
    src, dst = hosts
    subprocess.run([*SIMVM, "create", str(src.mnt), "--disk-size", "32M", "--mem-size", "16M"],
                   check=True, capture_output=True)
    vm = subprocess.Popen([*SIMVM, "run", str(src.mnt), "--rate", "20"],
                          stdout=subprocess.DEVNULL)
    try:
        wait_writing(src, vm, 8)
        s = Server(dst, key)
        servers.append(s)
        report = tmp_path / "report.json"
        r = migrate(src, s.port, key, "disk.raw", "vm.mem", "--suspend", f"pid:{vm.pid}",
                    "--report", str(report))
        assert r.returncode == 0, r.stdout + r.stderr
        assert vm.wait(timeout=10) == -signal.SIGKILL  # the source copy is retired
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
    rc, out = s.finish()
    assert rc == 0, out
    for name in ("disk.raw", "vm.mem"):  # the source files are as they were at suspend
        assert digest(dst.mnt / name) == digest(src.mnt / name), name
    chk = subprocess.run([*SIMVM, "check", str(dst.mnt), "--json"], capture_output=True,
                         text=True)
    res = json.loads(chk.stdout)
    assert chk.returncode == 0 and res["ok"] and res["written_units"] > 100, res
    rep = json.loads(report.read_text())
    assert rep["downtime_ms"] is not None and rep["verified"]
    assert rep["static_blocks"] + rep["dynamic_blocks"] == (48 << 20) // 65536
    # The VM resumes on the destination from its own state and stays consistent.
    subprocess.run([*SIMVM, "run", str(dst.mnt), "--resume", "--rate", "20", "--seconds",
                    "0.5"], check=True, capture_output=True)
    chk = subprocess.run([*SIMVM, "check", str(dst.mnt), "--json"], capture_output=True,
                         text=True)
    assert json.loads(chk.stdout)["generation"] == 2 and chk.returncode == 0


# -- abort safety (invariant 3) and bad input (invariant 6) ------------------------------


def test_status_shows_a_running_migration_and_nothing_after(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server],
        idle_vm: subprocess.Popen[bytes], tmp_path: Path) -> None:
    """`migrator status` (query-migrate): another process sees the running migration's
    phase, bytes and remaining set; when it ends its status file is gone."""
    src, dst = hosts
    (src.mnt / "disk.raw").write_bytes(os.urandom(12 << 20))  # 4 s at 3 MB/s
    s = Server(dst, key)
    servers.append(s)
    report = tmp_path / "report.json"
    mig = subprocess.Popen([*MIGRATOR, "migrate", "--mount", str(src.mnt), "--to",
                            f"127.0.0.1:{s.port}", "--key-file", str(key), "--suspend",
                            f"pid:{idle_vm.pid}", "--bandwidth", "3", "--report", str(report),
                            "--json", "disk.raw"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        seen: list[dict[str, object]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and mig.poll() is None:
            r = subprocess.run([*MIGRATOR, "status", "--json"], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            docs = json.loads(r.stdout)
            if docs and docs[0]["phase"] == "initial copy" and docs[0]["bytes_sent"]:
                # the line of the same moment (on a busy machine each start takes ~1 s)
                line = subprocess.run([*MIGRATOR, "status"], capture_output=True,
                                      text=True).stdout
                if "initial copy" in line:
                    seen = docs
                    break
            time.sleep(0.1)
        assert seen, "the running migration never showed in migrator status"
        doc = seen[0]
        assert doc["running"] is True and doc["pid"] == mig.pid
        assert doc["status"] == "active" and doc["data_bytes"] == 12 << 20
        assert doc["mount"] == str(src.mnt)
        assert "initial copy" in line and "MB/s" in line, line
        out, err = mig.communicate(timeout=60)
        assert mig.returncode == 0, err
        assert json.loads(out) == json.loads(report.read_text())  # --json: the report alone
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.communicate()
        for pipe in (mig.stdout, mig.stderr):  # (a failed check must not leak them)
            pipe.close()  # type: ignore[union-attr]
    after = subprocess.run([*MIGRATOR, "status"], capture_output=True, text=True)
    assert after.returncode == 0 and "no migration is running" in after.stdout
    rep = json.loads(report.read_text())
    assert sum(rep["bytes_by_phase"].values()) == rep["bytes_sent"]
    assert s.finish()[0] == 0


def test_wrong_key_is_refused_before_any_data(hosts: tuple[Mount, Mount], key: Path,
                                              servers: list[Server], tmp_path: Path,
                                              idle_vm: subprocess.Popen[bytes]) -> None:
    src, dst = hosts
    before = fill_source(src)
    other = tmp_path / "other-key"
    other.write_text(os.urandom(32).hex())
    other.chmod(0o600)
    s = Server(dst, key)
    servers.append(s)
    for _ in range(4):  # a source that keeps knocking with the wrong key
        r = migrate(src, s.port, other, "disk.raw", "--suspend", f"pid:{idle_vm.pid}")
        assert r.returncode == 1 and "shared key" in last_line(r)
    assert state(dst) is None and not (dst.mnt / "disk.raw").exists()
    assert_source_whole(src, before, idle_vm)
    # The stranger ended nothing: the same --once serve takes the real source next.
    assert s.proc.poll() is None
    r = migrate(src, s.port, key, "disk.raw", "--suspend", f"pid:{idle_vm.pid}")
    assert r.returncode == 0, r.stderr
    rc, out = s.finish()
    assert rc == 0 and "complete and verified" in out
    # One line for the operator however often it knocked within 10 s (quiet.RepeatedLines); none
    # when the source saw the dest's proof first and hung up before it said anything.
    assert out.count("shared key") <= 1, out


def test_closed_port_and_bad_arguments(freeze_hosts: tuple[Mount, Mount], key: Path,
                                       servers: list[Server], tmp_path: Path) -> None:
    src, dst = freeze_hosts
    fill_source(src, 1)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    r = migrate(src, port, key, "disk.raw")
    assert r.returncode == 1 and "cannot connect" in last_line(r)
    assert "migrator serve" in last_line(r)
    r = migrate(src, port, key, "disk.raw", "--json")  # a failure's report, on stdout
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and doc["status"] == "failed" and "cannot connect" in doc["error"]
    r = migrate(src, port, key, "nope.raw")
    assert r.returncode == 1 and "no such file" in last_line(r)
    loose = tmp_path / "loose-key"
    loose.write_text("x" * 40)
    loose.chmod(0o644)
    r = migrate(src, port, loose, "disk.raw")
    assert r.returncode == 1 and "chmod 600" in last_line(r)
    r = migrate(src, port, key, "disk.raw", "--suspend", "pid:999999999")
    assert r.returncode == 1 and "no process" in last_line(r)
    r = subprocess.run([*MIGRATOR, "serve", "--mount", str(tmp_path), "--listen", "127.0.0.1:0",
                        "--key-file", str(key)], capture_output=True, text=True)
    assert r.returncode == 1 and "not a blkfs mount" in last_line(r)
    s = Server(dst, key, once=False)  # (issue 26: SIGTERM ended it without a word)
    servers.append(s)
    s.proc.send_signal(signal.SIGTERM)
    rc, out = s.finish()
    assert rc == 128 + signal.SIGTERM and "migrator serve: stopped by SIGTERM" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill-destination", "sigterm-source", "kill9-source"])
def test_failure_mid_copy_leaves_the_source_whole(
    hosts: tuple[Mount, Mount], key: Path, servers: list[Server],
    idle_vm: subprocess.Popen[bytes], how: str, tmp_path: Path
) -> None:
    src, dst = hosts
    before = fill_source(src, 32)
    s = Server(dst, key)
    servers.append(s)
    status = tmp_path / "status.json"
    proc = subprocess.Popen([*MIGRATOR, "migrate", "--mount", str(src.mnt), "--to",
                             f"127.0.0.1:{s.port}", "--key-file", str(key), "--bandwidth", "10",
                             "--status-file", str(status), "--suspend", f"pid:{idle_vm.pid}",
                             "--report", str(tmp_path / "report.json"), "disk.raw", "vm.mem"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_mid_copy(status, proc)  # 36 MiB at 10 MB/s: the fault falls into the copy
    if how == "kill-destination":
        s.proc.kill()
    elif how == "sigterm-source":
        proc.send_signal(signal.SIGTERM)
    else:
        proc.kill()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    if how != "kill9-source":
        # (issue 26) Only what was measured: it ended in its initial copy, so no verification,
        # no rate of 0 MB/s, no "initial copy 0.00 s"; absent in the report, not 0.
        flat = " ".join(out.split())
        assert "ended in initial copy" in flat and "the initial copy did not finish" in flat
        assert "verified" not in flat and "0 MB/s" not in flat and "switchover" not in flat
        rep = json.loads((tmp_path / "report.json").read_text())
        assert rep["status"] == "failed" and rep["phase"] == "initial copy", rep
        assert rep["initial_copy_s"] is None and rep["verify_s"] is None, rep
        assert rep["bytes_sent"] > 0
        line = err.strip().splitlines()[-1]
        assert line.startswith("migrator: error:"), err
        assert ("interrupted" in line) if how == "sigterm-source" else ("lost" in line or
                                                                        "closed" in line), line
    if how != "kill-destination":
        rc, sout = s.finish()
        assert rc == 1 and "incomplete" in sout
    st = state(dst)
    assert st is not None and st["status"] == "incomplete"
    assert_source_whole(src, before, idle_vm)
    # ... and a new attempt completes.
    s2 = Server(dst, key)
    servers.append(s2)
    r = migrate(src, s2.port, key, "disk.raw", "vm.mem", "--suspend", f"pid:{idle_vm.pid}")
    assert r.returncode == 0, r.stderr
    assert s2.finish()[0] == 0 and state(dst)["status"] == "complete"  # type: ignore[index]
    assert digest(dst.mnt / "disk.raw") == before["disk.raw"]


@pytest.mark.cache
def test_destination_disk_full(mount_factory: Callable[..., Mount], key: Path,
                               servers: list[Server], tmp_path: Path,
                               idle_vm: subprocess.Popen[bytes]) -> None:
    with small_destination(mount_factory, tmp_path, "8m") as (src, dst):
        before = fill_source(src, 16)
        s = Server(dst, key)
        servers.append(s)
        r2 = migrate(src, s.port, key, "disk.raw", "vm.mem", "--suspend", f"pid:{idle_vm.pid}")
        assert r2.returncode == 1 and "disk full" in last_line(r2), r2.stderr
        assert s.finish()[0] == 1
        assert_source_whole(src, before, idle_vm)


@contextlib.contextmanager
def small_destination(mount_factory: Callable[..., Mount], tmp_path: Path,
                      size: str) -> Iterator[tuple[Mount, Mount]]:
    """(source, destination) mounts, the destination's backing on a tmpfs of `size`: a
    small disk, unmounted afterwards (its blkfs mount first)."""
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        src, dst = together(
            lambda: mount_factory(backing=tmp_path / "src-backing", mnt=tmp_path / "src"),
            lambda: mount_factory(backing=small / "backing", mnt=tmp_path / "dst"))
        yield src, dst
        subprocess.run(["fusermount3", "-u", str(dst.mnt)], capture_output=True)
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def _thin(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    """A sparse file of `size` with data only at `pieces` (offset -> bytes)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)


def test_a_thin_image_fits_by_its_data_and_a_destination_too_small_for_it_says_both_figures(
        mount_factory: Callable[..., Mount], key: Path, servers: list[Server], tmp_path: Path,
        idle_vm: subprocess.Popen[bytes]) -> None:
    """A 1 TiB image holding 3 MiB goes to a 48 MiB disk, verified, and takes its data there
    (the check counts the source's allocation, not the size). One with 64 MiB of data is
    refused before anything moves, in one line with what it needs and what is free."""
    with small_destination(mount_factory, tmp_path, "48m") as (src, dst):
        size = 1 << 40
        pieces = {0: os.urandom(1 << 20), (1 << 39) + 12345: os.urandom(1 << 20),
                  size - (1 << 20): os.urandom(1 << 20)}
        _thin(src.mnt / "disk.raw", size, pieces)
        s = Server(dst, key)
        servers.append(s)
        r2 = migrate(src, s.port, key, "disk.raw", "--suspend", f"pid:{idle_vm.pid}")
        assert r2.returncode == 0, r2.stderr
        assert s.finish()[0] == 0 and state(dst)["status"] == "complete"  # type: ignore[index]
        got = dst.mnt / "disk.raw"
        assert os.path.getsize(got) == size
        assert os.stat(got).st_blocks * 512 < 8 << 20  # its data, not its size
        with open(got, "rb") as f:
            for off, data in pieces.items():
                f.seek(off)
                assert f.read(len(data)) == data, off

        _thin(src.mnt / "big.raw", size, {size // 2: os.urandom(64 << 20)})
        s2 = Server(dst, key)
        servers.append(s2)
        vm2 = subprocess.Popen(["sleep", "300"])  # (the first VM went with its migration)
        try:
            r3 = migrate(src, s2.port, key, "big.raw", "--suspend", f"pid:{vm2.pid}")
            assert vm2.poll() is None and not stopped(vm2.pid)
        finally:
            vm2.kill()
            vm2.wait()
        line = last_line(r3)
        assert r3.returncode == 1 and "destination disk full" in line, r3.stderr
        assert "needs 68.0 MiB" in line and "of data" in line and "MiB (" in line, line
        assert "free" in line and len(r3.stderr.strip().splitlines()) == 1, r3.stderr
        assert s2.finish()[0] == 1
        assert not (dst.mnt / "big.raw").exists() or os.stat(dst.mnt / "big.raw").st_blocks == 0


@pytest.mark.parametrize("way", ["lineage", "digests"])
def test_a_thin_image_migrated_back_costs_its_data(hosts: tuple[Mount, Mount], key: Path,
                                                    servers: list[Server], tmp_path: Path,
                                                    idle_vm: subprocess.Popen[bytes],
                                                    way: str) -> None:
    """A 1 TiB image holding 2 MiB, A -> B, 1 MiB written on B, B -> A: either way (lineage,
    or A saying what it holds: its holes as runs, HeldZero) a few MiB travel, not 128 MiB of
    digests, and every block is verified."""
    a, b = hosts
    size = 1 << 40
    pieces = {0: os.urandom(1 << 20), size - (1 << 20): os.urandom(1 << 20)}
    _thin(a.mnt / "disk.raw", size, pieces)
    s = Server(b, key)
    servers.append(s)
    r = migrate(a, s.port, key, "disk.raw", "--suspend", f"pid:{idle_vm.pid}")
    assert r.returncode == 0 and s.finish()[0] == 0, r.stderr
    with open(b.mnt / "disk.raw", "r+b") as f:  # the VM on B writes 1 MiB in the middle
        f.seek(size // 2)
        f.write(new := os.urandom(1 << 20))
    pieces[size // 2] = new
    report = tmp_path / "back.json"
    migrate_a_vm(b, a, key, servers, "disk.raw", "--report", str(report),
                 *(["--no-lineage"] if way == "digests" else []))
    with open(a.mnt / "disk.raw", "rb") as f:
        for off, data in pieces.items():
            f.seek(off)
            assert f.read(len(data)) == data, off
    assert os.path.getsize(a.mnt / "disk.raw") == size
    rep = json.loads(report.read_text())
    assert rep["verified"] and rep["delta"] == way, (rep["delta"], rep["lineage_detail"])
    assert rep["bytes_sent"] < 4 << 20, rep["bytes_sent"]  # 1 MiB of data, and frames
    if way == "digests":
        assert rep["held_blocks"] == size // 65536
        assert rep["held_digest_bytes"] < 1 << 20, rep["held_digest_bytes"]


class TwoVMs:
    """Two VMs on one source mount (two_vms), one serve on a destination mount taking both,
    and vm1's migration held at its switchover (a `cmd:` suspend waiting for a file) until
    `release()`; `close()` releases it and stops the stand-in VMs."""

    def __init__(self, mount_factory: Callable[..., Mount], key: Path,
                 servers: list[Server], tmp_path: Path, *serve_args: str) -> None:
        self.src, self.dst = together(*(
            lambda n=n: mount_factory(backing=tmp_path / f"{n}-backing", mnt=tmp_path / n)
            for n in ("src", "dst")))
        self.before = two_vms(self.src)
        self.key, self.tmp = key, tmp_path
        self.vms = [subprocess.Popen(["sleep", "300"]) for _ in range(2)]
        self.ready, self.go = tmp_path / "ready", tmp_path / "go"
        self.hold = (f"cmd:touch {self.ready}; while [ ! -e {self.go} ]; do sleep 0.02; done; "
                     f"kill -STOP {self.vms[0].pid}::kill -CONT {self.vms[0].pid}")
        self.serve = Server(self.dst, key, *serve_args, once=False)
        servers.append(self.serve)

    def start(self, vm: str, suspend: str, *extra: str,
              port: int | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen([*MIGRATOR, "migrate", "--mount", str(self.src.mnt), "--to",
                                 f"127.0.0.1:{port or self.serve.port}", "--key-file",
                                 str(self.key),
                                 f"{vm}/disk.raw", f"{vm}/vm.mem", "--suspend", suspend,
                                 *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def start_held(self) -> subprocess.Popen[str]:
        """vm1's migration, once it is at its switchover (the VM's claim held on both sides)."""
        m1 = self.start("vm1", self.hold)
        wait_for(self.ready.exists, what="vm1's migration at its switchover")
        return m1

    def release(self) -> None:
        self.go.touch()

    def close(self) -> None:
        self.release()
        for vm in self.vms:
            vm.kill()
            vm.wait()


def test_two_vms_migrate_at_once_from_one_mount_into_one_serve(
        mount_factory: Callable[..., Mount], key: Path, servers: list[Server],
        tmp_path: Path) -> None:
    """One serve takes a session per VM at once: vm1's migration is held at its switchover
    (its VM being suspended) while vm2's goes all the way through the same serve, then vm1's
    finishes; both verified, each VM owned by the destination."""
    t = TwoVMs(mount_factory, key, servers, tmp_path)
    try:
        m1 = t.start_held()
        r2 = migrate(t.src, t.serve.port, key, "vm2/disk.raw", "vm2/vm.mem", "--suspend",
                     f"pid:{t.vms[1].pid}")
        assert r2.returncode == 0, r2.stderr  # all the way while vm1's session is open
        assert m1.poll() is None
        t.release()
        _, err1 = m1.communicate(timeout=120)
        assert m1.returncode == 0, err1
    finally:
        t.close()
    for rel, d in t.before.items():
        assert digest(t.dst.mnt / rel) == d, rel
    roles = sorted((r["name"], r["role"]) for r in vm_records(t.dst))
    assert roles == [("vm1", "owner"), ("vm2", "owner")], roles


def test_a_vm_migrates_in_while_another_migrates_out_of_the_same_mount(
        mount_factory: Callable[..., Mount], key: Path, servers: list[Server],
        tmp_path: Path) -> None:
    """Each mount is a source and a destination at once: vm1 goes A -> B while vm2 goes
    B -> A (vm1's held at its switchover until vm2's is through); both verified, each owned
    where it went, each retired where it was."""
    a, b = together(*(lambda n=n: mount_factory(backing=tmp_path / f"{n}-backing",
                                                mnt=tmp_path / n) for n in ("a", "b")))
    (a.mnt / "vm1").mkdir()
    (b.mnt / "vm2").mkdir()
    before = {}
    for m, vm in ((a, "vm1"), (b, "vm2")):
        for name, size in (("disk.raw", 8 << 20), ("vm.mem", 4 << 20)):
            (m.mnt / vm / name).write_bytes(os.urandom(size))
            before[f"{vm}/{name}"] = digest(m.mnt / vm / name)
    sa, sb = Server(a, key, once=False), Server(b, key, once=False)
    servers += [sa, sb]
    vms = [subprocess.Popen(["sleep", "300"]) for _ in range(2)]
    ready, go = tmp_path / "ready", tmp_path / "go"
    hold = (f"cmd:touch {ready}; while [ ! -e {go} ]; do sleep 0.02; done; "
            f"kill -STOP {vms[0].pid}::kill -CONT {vms[0].pid}")
    try:
        m1 = subprocess.Popen([*MIGRATOR, "migrate", "vm1/disk.raw", "vm1/vm.mem", "--mount",
                               str(a.mnt), "--to", f"127.0.0.1:{sb.port}", "--key-file",
                               str(key), "--suspend", hold], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        wait_for(ready.exists, what="vm1's migration at its switchover")
        r2 = migrate(b, sa.port, key, "vm2/disk.raw", "vm2/vm.mem", "--suspend",
                     f"pid:{vms[1].pid}")
        assert r2.returncode == 0, r2.stderr
        go.touch()
        _, err1 = m1.communicate(timeout=120)
        assert m1.returncode == 0, err1
    finally:
        go.touch()
        for vm in vms:
            vm.kill()
            vm.wait()
    for rel, d in before.items():
        assert digest((b if rel.startswith("vm1") else a).mnt / rel) == d, rel
    assert {r["name"]: r["role"] for r in vm_records(a)} == {"vm1": "retired", "vm2": "owner"}
    assert {r["name"]: r["role"] for r in vm_records(b)} == {"vm1": "owner", "vm2": "retired"}


BYSTANDER_FAULTS = ["kill -9", "Ctrl-C", "tampered frame", "link cut",
                    "its VM fails to start"]


def test_migrations_that_fail_beside_another_in_one_serve_end_only_themselves(
        mount_factory: Callable[..., Mount], key: Path, servers: list[Server],
        tmp_path: Path) -> None:
    """The fault matrix's cells for a bystander, as one history: vm1's migration is held at
    its switchover while vm2's, through the same serve, fails again and again (its source
    killed -9 or interrupted mid-copy, a frame of it tampered with, its link cut, its VM
    failing to start at the destination), each attempt after the last one's failure. Each
    time vm2 keeps running at the source with its files as they were and its copy on the
    destination is not runnable; then vm1's completes and verifies."""
    from .test_mitm import Proxy

    t = TwoVMs(mount_factory, key, servers, tmp_path, "--resume-cmd",
               '[ "$MIGRATOR_VM" != vm2 ] || { echo no such VM >&2; exit 3; }')
    with open(t.src.mnt / "vm2" / "disk.raw", "ab") as f:  # (long enough to be cut mid-copy)
        f.write(os.urandom(12 << 20))
    t.before["vm2/disk.raw"] = digest(t.src.mnt / "vm2" / "disk.raw")
    proxies: list[Proxy] = []
    m1 = None
    try:
        m1 = t.start_held()
        for fault in BYSTANDER_FAULTS:
            proxy = Proxy(t.serve.port, "flip" if fault == "tampered frame" else None)
            proxies.append(proxy)
            status = tmp_path / f"vm2-{len(proxies)}.status"
            slow = fault in ("kill -9", "Ctrl-C", "link cut")
            report = tmp_path / f"vm2-{len(proxies)}.json"
            # (--no-delta: every attempt sends it all, however much the last one left there)
            m2 = t.start("vm2", f"pid:{t.vms[1].pid}", "--status-file", str(status),
                         "--report", str(report), "--no-delta",
                         *(("--bandwidth", "8") if slow else ()), port=proxy.port)
            if slow:
                wait_mid_copy(status, m2)
            if fault == "kill -9":
                m2.kill()
            elif fault == "Ctrl-C":
                m2.send_signal(signal.SIGINT)
            elif fault == "link cut":
                for sk in proxy.socks:
                    sk.shutdown(socket.SHUT_RDWR)
            _, err2 = m2.communicate(timeout=120)
            assert m2.returncode != 0, (fault, err2)
            if fault != "kill -9":  # one line, and the report says so (Ctrl-C's too)
                last = err2.strip().splitlines()[-1]
                assert last.startswith("migrator: error: "), err2
                rep = json.loads(report.read_text())
                assert rep["status"] == "failed" and rep["error"] in last, (rep["error"], last)
            assert t.vms[1].poll() is None and not stopped(t.vms[1].pid), fault  # runs on
            for rel in ("vm2/disk.raw", "vm2/vm.mem"):
                assert digest(t.src.mnt / rel) == t.before[rel], (fault, rel)
            # (after a kill -9 the serve learns of it when the connection closes: soon)
            wait_for(lambda: {r["name"]: r["role"] for r in vm_records(t.dst)}.get("vm2")
                     == "incomplete", 30, f"vm2's copy incomplete after {fault}")
            assert {r["name"]: r["role"] for r in vm_records(t.src)}.get("vm2") == "owner"
        assert m1.poll() is None  # held all along
        t.release()
        _, err1 = m1.communicate(timeout=120)
        assert m1.returncode == 0, err1
    finally:
        t.close()
        if m1 is not None and m1.poll() is None:  # (a failed check must not leak its pipes)
            m1.kill()
            m1.communicate()
        for px in proxies:
            px.close()
    for rel in ("vm1/disk.raw", "vm1/vm.mem"):
        assert digest(t.dst.mnt / rel) == t.before[rel], rel
    roles = {r["name"]: r["role"] for r in vm_records(t.dst)}
    assert roles == {"vm1": "owner", "vm2": "incomplete"}, roles
    assert {r["name"]: r["role"] for r in vm_records(t.src)} == {
        "vm1": "retired", "vm2": "owner"}


def test_garbage_from_a_fake_destination(hosts: tuple[Mount, Mount], key: Path,
                                         idle_vm: subprocess.Popen[bytes]) -> None:
    src, _ = hosts
    before = fill_source(src, 1)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def speak_garbage() -> None:
        conn, _ = srv.accept()
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + os.urandom(100))
        time.sleep(0.5)
        conn.close()

    t = threading.Thread(target=speak_garbage, daemon=True)
    t.start()
    r = migrate(src, srv.getsockname()[1], key, "disk.raw", "--suspend", f"pid:{idle_vm.pid}")
    srv.close()
    assert r.returncode == 1 and "bad peer" in last_line(r), r.stderr
    assert "does not speak the migrator protocol (it began with b'HTTP/1.1 200 OK" in last_line(
        r), r.stderr  # (issue 26: it said "unknown frame type 0x48")
    assert_source_whole(src, before, idle_vm)


def _handshaken_client(port: int, key: bytes) -> tuple[socket.socket, p.Connection]:
    sk = socket.create_connection(("127.0.0.1", port))
    conn = p.Connection("source", key)
    sk.sendall(conn.send(conn.hello_event()))
    while True:
        ev = conn.next_event()
        if ev is p.NEED_DATA:
            conn.receive_data(sk.recv(65536))
        elif isinstance(ev, p.Hello):
            break
    sk.sendall(conn.send(conn.auth_event()))
    while conn.next_event() is p.NEED_DATA:
        conn.receive_data(sk.recv(65536))
    return sk, conn


def _raw_frame(ftype: p.FrameType, payload: bytes, conn: p.Connection | None = None) -> bytes:
    """A frame made by hand, sealed for `conn`'s session: an authenticated peer that lies."""
    frame = p.HEADER.pack(int(ftype), len(payload)) + payload
    return conn.seal(frame) if conn is not None else frame


@pytest.mark.parametrize("attack", ["garbage", "dotdot", "absolute", "lie-size", "huge-frame",
                                    "bad-packed"])
def test_destination_refuses_bad_peers(hosts: tuple[Mount, Mount], key: Path,
                                       servers: list[Server], tmp_path: Path,
                                       attack: str) -> None:
    """Invariant 6: no peer message makes the destination write outside its mount or
    allocate without bound; each is refused and the destination stays incomplete."""
    _, dst = hosts
    s = Server(dst, key)
    servers.append(s)
    if attack == "garbage":
        with socket.create_connection(("127.0.0.1", s.port)) as sk:
            sk.sendall(os.urandom(64))
            time.sleep(0.3)
    else:
        sk, conn = _handshaken_client(s.port, key.read_text().strip().encode())
        with sk:
            if attack in ("dotdot", "absolute"):
                name = "../escaped" if attack == "dotdot" else str(tmp_path / "escaped")
                man = {"block_size": 65536, "files": [{"file_id": 0, "name": name, "size": 10,
                                                       "allocated": 0}],
                       "migration": "m", "delta": False, "replica": False, "lineage": "",
                       "lineage_files": [], "vm": "v1", "vm_name": "v", "generation": 0}
                sk.sendall(_raw_frame(p.FrameType.MANIFEST, json.dumps(man).encode(), conn))
            elif attack == "lie-size":
                man = {"block_size": 65536, "files": [{"file_id": 0, "name": "f", "size": 10,
                                                       "allocated": 10}],
                       "migration": "m", "delta": False, "replica": False, "lineage": "",
                       "lineage_files": [], "vm": "v1", "vm_name": "v", "generation": 0}
                sk.sendall(_raw_frame(p.FrameType.MANIFEST, json.dumps(man).encode(), conn))
                time.sleep(0.3)
                sk.sendall(_raw_frame(p.FrameType.BLOCKS, struct.pack(">IQ", 0, 1000)
                                      + b"x" * 65536, conn))
            elif attack == "bad-packed":  # says 64 KiB of zstd, holds garbage
                man = {"block_size": 65536, "files": [{"file_id": 0, "name": "f",
                                                       "size": 1 << 20, "allocated": 0}],
                       "migration": "m",
                       "delta": False, "replica": False, "lineage": "",
                       "lineage_files": [], "vm": "v1", "vm_name": "v", "generation": 0}
                sk.sendall(_raw_frame(p.FrameType.MANIFEST, json.dumps(man).encode(), conn))
                time.sleep(0.3)
                sk.sendall(_raw_frame(p.FrameType.PACKED, struct.pack(">IQBI", 0, 0, 1, 65536)
                                      + os.urandom(300), conn))
            else:
                sk.sendall(p.HEADER.pack(int(p.FrameType.BLOCKS), 2**31))  # refused at the header
            time.sleep(0.3)
    if attack == "garbage":  # a stranger: not a word to it, and the --once serve goes on
        time.sleep(0.5)
        assert s.proc.poll() is None
        s.proc.terminate()
    rc, out = s.finish()
    if attack == "garbage":
        assert "failed" not in out and "refused" not in out, out  # a probe: no line for it
    else:
        assert rc == 1, out
    assert not (tmp_path / "escaped").exists() and not (dst.mnt.parent / "escaped").exists()
    st = state(dst)
    assert st is None or st["status"] == "incomplete"
    if attack == "lie-size":
        assert "lies about sizes" in out
    if attack in ("dotdot", "absolute"):
        assert "'..' component" in out or "absolute" in out, out
    if attack == "bad-packed":
        assert "does not decompress" in out, out


@pytest.mark.slow
def test_across_two_network_namespaces(hosts: tuple[Mount, Mount], key: Path,
                                       servers: list[Server], idle_vm: subprocess.Popen[bytes],
                                       netns_pair: tuple[str, str, str]) -> None:
    a, b, _ = netns_pair
    src, dst = hosts
    before = fill_source(src, 8)
    s = Server(dst, key, netns=b, listen="10.231.77.2:0")
    servers.append(s)
    r = migrate(src, s.port, key, "disk.raw", "vm.mem", "--suspend", f"pid:{idle_vm.pid}",
                host="10.231.77.2", netns=a)
    assert r.returncode == 0, r.stderr
    assert s.finish()[0] == 0
    for n, d in before.items():
        assert digest(dst.mnt / n) == d


@pytest.mark.slow
def test_network_cut_mid_copy(hosts: tuple[Mount, Mount], key: Path, servers: list[Server],
                              netns_pair: tuple[str, str, str],
                              idle_vm: subprocess.Popen[bytes], tmp_path: Path) -> None:
    """A cut without a reset (link down): both sides notice within --io-timeout."""
    a, b, veth = netns_pair
    src, dst = hosts
    before = fill_source(src, 32)
    status = tmp_path / "status.json"
    s = Server(dst, key, "--io-timeout", "3", netns=b, listen="10.231.77.2:0")
    servers.append(s)
    proc = subprocess.Popen([*in_netns(a), *MIGRATOR, "migrate", "--mount",
                             str(src.mnt), "--to", f"10.231.77.2:{s.port}", "--key-file",
                             str(key), "--bandwidth", "10", "--io-timeout", "3", "--suspend",
                             f"pid:{idle_vm.pid}", "--status-file", str(status),
                             "disk.raw", "vm.mem"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_mid_copy(status, proc)
    subprocess.run(["ip", "-n", a, "link", "set", veth, "down"], check=True)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "network cut" in err.strip().splitlines()[-1], err
    rc, out = s.finish()
    assert rc == 1 and "network cut" in out
    st = state(dst)
    assert st is not None and st["status"] == "incomplete"
    assert_source_whole(src, before, idle_vm)


@pytest.mark.slow
def test_a_thin_disk_and_zero_memory_cost_what_they_hold(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server], tmp_path: Path,
        idle_vm: subprocess.Popen[bytes]) -> None:
    """A 1 GiB sparse disk holding 17 MiB, a 64 MiB memory file of written zeros but for
    4 MiB: holes are never read, zero blocks travel as Zero runs, and the destination stays
    as thin as the source, also where the data was written in 4 KiB pieces (one in each
    64 KiB block: 16 times their space before, issue 26); everything is verified."""
    src, dst = hosts
    disk, mem = src.mnt / "disk.raw", src.mnt / "vm.mem"
    held = {0: os.urandom(8 << 20), 700 << 20: os.urandom(4 << 20),  # at both ends and inside
            (1 << 30) - (4 << 20): os.urandom(4 << 20)}
    held |= {(200 << 20) + k * (64 << 10) + (8 << 10): os.urandom(4 << 10) for k in range(256)}
    with open(disk, "wb") as f:
        f.truncate(1 << 30)
        for off, data in held.items():
            f.seek(off)
            f.write(data)
    with open(mem, "wb") as f:
        f.write(bytes(30 << 20) + os.urandom(4 << 20) + bytes(30 << 20))
    # What the source holds, from what was written (reading 1 GiB back through the mount
    # would take 5 s, and would only compare the copy with what the source mount reads)
    before = {"disk.raw": layout_digest(1 << 30, held), "vm.mem": digest(mem)}
    s = Server(dst, key)
    servers.append(s)
    report = tmp_path / "report.json"
    r = migrate(src, s.port, key, "disk.raw", "vm.mem", "--suspend", f"pid:{idle_vm.pid}",
                "--report", str(report))
    assert r.returncode == 0, r.stderr
    assert s.finish()[0] == 0
    rep = json.loads(report.read_text())
    assert rep["verified"]
    kinds = rep["bytes_by_kind"]
    print("\nthin:", {k: rep[k] for k in ("total_s", "initial_copy_s", "verify_s",
                                          "bytes_sent", "downtime_ms")}, kinds)
    assert kinds["hole"] > (1 << 30) - (48 << 20), kinds  # never read
    assert kinds["zero"] >= 60 << 20, kinds  # read, and sent as Zero runs
    # ~ the data held, and the 256 blocks of 64 KiB around the 4 KiB pieces (whole blocks
    # travel: their zero pages are left unwritten there)
    assert rep["bytes_sent"] < 1.2 * (20 << 20) + (16 << 20), rep["bytes_sent"]
    for n, d in before.items():
        assert digest(dst.mnt / n) == d
    src_alloc = sum(os.stat(src.backing / n).st_blocks for n in ("disk.raw", "vm.mem")) * 512
    dst_alloc = sum(os.stat(dst.backing / n).st_blocks for n in ("disk.raw", "vm.mem")) * 512
    assert dst_alloc <= 1.1 * src_alloc, (dst_alloc, src_alloc)
    assert dst_alloc < 24 << 20, dst_alloc  # the 60 MiB of written zeros stay unwritten here
    disk_alloc = [os.stat(m.backing / "disk.raw").st_blocks * 512 for m in (src, dst)]
    assert disk_alloc[1] <= disk_alloc[0] + (256 << 10), disk_alloc  # (4 KiB pieces: 1 MiB)


@pytest.mark.cache
@pytest.mark.slow
def test_zero_runs_over_data_the_destination_holds_are_punched(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server], tmp_path: Path,
        idle_vm: subprocess.Popen[bytes]) -> None:
    """A migration onto files the destination already holds (the way back, onto the copy it
    retired): the blocks that became zeros meanwhile are punched there by its daemon (the
    files stay as thin as the source's), not written."""
    src, dst = hosts
    (src.mnt / "disk.raw").write_bytes(os.urandom(32 << 20))
    (src.mnt / "vm.mem").write_bytes(os.urandom(4 << 20))
    s = Server(dst, key)
    servers.append(s)
    assert migrate(src, s.port, key, "disk.raw", "vm.mem", "--suspend",
                   f"pid:{idle_vm.pid}").returncode == 0
    assert s.finish()[0] == 0
    with open(dst.mnt / "disk.raw", "r+b") as f:  # the guest, there now, frees 24 MiB: zeros
        f.seek(4 << 20)
        f.write(bytes(24 << 20))
    s2 = Server(src, key)  # back to the first host, which holds the copy it retired
    servers.append(s2)
    report = tmp_path / "report.json"
    vm2 = subprocess.Popen(["sleep", "300"])  # (the first one was retired)
    try:
        r = migrate(dst, s2.port, key, "disk.raw", "vm.mem", "--suspend", f"pid:{vm2.pid}",
                    "--report", str(report))
    finally:
        vm2.kill()
        vm2.wait()
    assert r.returncode == 0, r.stderr
    assert s2.finish()[0] == 0
    rep = json.loads(report.read_text())
    assert rep["verified"] and rep["bytes_by_kind"]["zero"] >= 24 << 20, rep["bytes_by_kind"]
    assert digest(dst.mnt / "disk.raw") == digest(src.mnt / "disk.raw")
    assert os.stat(src.backing / "disk.raw").st_blocks * 512 < 12 << 20  # punched, not written


@pytest.mark.cache
def test_direct_writes_are_tracked_and_never_leave_a_stale_page(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server],
        idle_vm: subprocess.Popen[bytes]) -> None:
    """The destination writes the backing files directly, not through FUSE: what the mount
    shows afterwards is the new data even where the kernel had the old pages cached (mmap'ed
    and read through the mount just before), and the daemon tracked the writes."""
    import mmap

    src, dst = hosts
    (src.mnt / "disk.raw").write_bytes(os.urandom(4 << 20))
    (dst.mnt / "disk.raw").write_bytes(b"\x55" * (4 << 20))  # an old copy, cached
    with open(dst.mnt / "disk.raw", "rb") as f:
        old = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        assert old[:4] == b"\x55" * 4 and (dst.mnt / "disk.raw").read_bytes()[-1] == 0x55
        run_blkfs("dirty", str(dst.mnt), "disk.raw", "--swap", check=True)  # a clean epoch
        writes_before, heat_before = _writes(dst, "disk.raw"), _heat(dst, "disk.raw")
        s = Server(dst, key)
        servers.append(s)
        r = migrate(src, s.port, key, "disk.raw", "--suspend", f"pid:{idle_vm.pid}")
        assert r.returncode == 0, r.stderr
        assert s.finish()[0] == 0
        assert old[:4096] == (src.mnt / "disk.raw").read_bytes()[:4096]  # the mapping too
        old.close()
    assert digest(dst.mnt / "disk.raw") == digest(src.mnt / "disk.raw")
    # Every block was tracked as written (its heat rose by one write; its dirty mark went to
    # the epochs the destination starts after each round, for a migration back: lineage.py)
    heat = _heat(dst, "disk.raw")
    assert len(heat) == (4 << 20) // 65536
    assert all(heat[b] - heat_before.get(b, 0.0) > 0.5 for b in heat), (heat, heat_before)
    out = run_blkfs("dirty", str(dst.mnt), "disk.raw", "--json", check=True).stdout
    assert json.loads(out)["epoch"] >= 2  # (its own swaps: one after the initial copy at least)
    # ... told in one range, not written as FUSE requests (4 MiB would be 4 or more)
    assert _writes(dst, "disk.raw") - writes_before == 1


def _writes(m: Mount, rel: str) -> int:
    return {f["file"]: f for f in m.call("status")["files"]}[rel]["writes"]


def _heat(m: Mount, rel: str) -> dict[int, float]:
    """Each written block's heat (one write adds 1; it halves every half-life)."""
    from blkfs import ctlproto as cp

    with m.client() as c:
        runs = c.call(cp.Heat(rel)).heat_runs()
    return {b: float(h) for first, n, h in zip(runs["first"], runs["count"], runs["heat"],
                                                strict=True) for b in range(first, first + n)}


def test_compressed_migration_over_a_slow_link(hosts: tuple[Mount, Mount], key: Path,
                                               servers: list[Server], tmp_path: Path,
                                               idle_vm: subprocess.Popen[bytes]) -> None:
    """--compress lz4 on a capped link: text goes compressed, random data as it is, the
    destination is byte-exact and verified, and fewer bytes cross the wire."""
    src, dst = hosts
    text = b"".join(b"guest log %07d: nothing to report\n" % i for i in range(200_000))
    (src.mnt / "disk.raw").write_bytes(text[: 6 << 20] + os.urandom(2 << 20))
    s = Server(dst, key)
    servers.append(s)
    report = tmp_path / "report.json"
    r = migrate(src, s.port, key, "disk.raw", "--suspend", f"pid:{idle_vm.pid}",
                "--compress", "lz4", "--bandwidth", "40", "--report", str(report))
    assert r.returncode == 0, r.stderr
    assert s.finish()[0] == 0
    assert digest(dst.mnt / "disk.raw") == digest(src.mnt / "disk.raw")
    rep = json.loads(report.read_text())
    assert rep["verified"] and rep["bytes_by_kind"]["compressed"] >= 5 << 20, rep
    assert rep["bytes_by_kind"]["normal"] >= 2 << 20
    assert rep["bytes_sent"] < 0.5 * rep["data_bytes"]
    assert "compressed" in r.stdout  # the summary's "by kind" line says so


def test_status_of_a_migration_whose_process_died(tmp_path: Path) -> None:
    """A migrate killed with -9 leaves its status file: `migrator status` says its process is
    gone and where to settle it, in one line, and --json says running: false."""
    run = tmp_path / "run"
    (run / "migrations").mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    doc = {"migration": "m-123", "status": "active", "phase": "dirty rounds", "round": 2,
           "dirty_pages": 7, "remaining_bytes": 7 << 12, "bytes_sent": 1 << 20,
           "data_bytes": 4 << 20, "mbps": 12.5, "pid": dead.pid, "mount": "/mnt/vms"}
    (run / "migrations" / f"{dead.pid}.json").write_text(json.dumps(doc))
    env = dict(os.environ, BLKFS_RUNTIME_DIR=str(run))
    r = subprocess.run([*MIGRATOR, "status"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 1, r
    assert "m-123 (died)" in r.stdout and f"process {dead.pid} is gone" in r.stdout, r.stdout
    assert "died in dirty rounds" in r.stdout and "(active)" not in r.stdout
    assert "migrator resolve --mount /mnt/vms" in r.stdout
    js = json.loads(subprocess.run([*MIGRATOR, "status", "--json"], capture_output=True,
                                   text=True, env=env).stdout)
    assert js[0]["running"] is False and (js[0]["status"], js[0]["died_in"]) == (
        "died", "dirty rounds")
    junk = run / "migrations" / "1.json"
    junk.write_text("{not json")  # someone's junk beside it: skipped, said, not fatal
    r = subprocess.run([*MIGRATOR, "status"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "m-123" in r.stdout, r
    assert "skipping" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([*MIGRATOR, "status", "--status-file", str(junk)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 1 and "not a migrator status file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.cache
@pytest.mark.parametrize("way", ["lineage", "digests"])
def test_a_migration_back_sends_only_what_changed(hosts: tuple[Mount, Mount], key: Path,
                                                  servers: list[Server], tmp_path: Path,
                                                  idle_vm: subprocess.Popen[bytes],
                                                  way: str) -> None:
    """A -> B, 2 % of the disk written on B, then B -> A: only the blocks B wrote travel.
    lineage: B's blkfs knows them (its epoch from the switchover on) and A proves its retired
    copy unchanged since, so nothing else is read; digests (--no-lineage): A says what it
    holds, an xxh3 per block. Either way every block is verified."""
    a, b = hosts
    fill_source(a, 8)
    s = Server(b, key)
    servers.append(s)
    r = migrate(a, s.port, key, "disk.raw", "vm.mem", "--suspend", f"pid:{idle_vm.pid}")
    assert r.returncode == 0 and s.finish()[0] == 0, r.stderr
    with open(b.mnt / "disk.raw", "r+b") as f:  # the VM on B writes 2 % of its disk
        for i in range(0, 128 * 65536 // 50, 65536):
            f.seek(i * 7 % (8 << 20))
            f.write(os.urandom(65536))
    report = tmp_path / "back.json"
    r = migrate_a_vm(b, a, key, servers, "disk.raw", "vm.mem", "--report", str(report),
                     *(["--no-lineage"] if way == "digests" else []))
    for n in ("disk.raw", "vm.mem"):
        assert digest(a.mnt / n) == digest(b.mnt / n), n
    rep = json.loads(report.read_text())
    assert rep["verified"] and rep["delta"] == way, (rep["delta"], rep["lineage_detail"])
    if way == "digests":
        assert rep["held_blocks"] == (12 << 20) // 65536
        assert rep["bytes_sent"] <= 0.05 * rep["data_bytes"], rep["bytes_sent"]
        assert "held" in r.stdout or rep["bytes_by_kind"]["held"] >= 10 << 20
    else:
        assert rep["lineage_files"] == ["disk.raw", "vm.mem"] and rep["held_blocks"] == 0
        assert rep["lineage_blocks"] >= (12 << 20) // 65536 * 0.9, rep["lineage_blocks"]
        assert rep["bytes_sent"] <= 0.03 * rep["data_bytes"], rep["bytes_sent"]


def test_files_arrive_with_their_mode_owner_times_and_xattrs(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server],
        idle_vm: subprocess.Popen[bytes]) -> None:
    """(issue 26) They arrived 0600, owned by the serve, with the time of the copy and none of
    their user xattrs: now as they were at the suspend point, before the VM starts there."""
    src, dst = hosts
    before = fill_source(src, 2)
    disk = src.mnt / "disk.raw"
    os.chown(disk, 1234, 5678)
    os.chmod(disk, 0o640)
    os.setxattr(src.backing / "disk.raw", "user.vm", b"web")  # (xattrs of the backing file)
    os.utime(disk, ns=(1_600_000_000_123_456_789, 1_650_000_000_987_654_321))
    want = os.stat(disk)
    s = Server(dst, key)
    servers.append(s)
    r = migrate(src, s.port, key, "disk.raw", "--suspend", f"pid:{idle_vm.pid}")
    assert r.returncode == 0, r.stderr
    assert s.finish()[0] == 0
    got = os.stat(dst.mnt / "disk.raw")
    assert (oct(got.st_mode), got.st_uid, got.st_gid) == (oct(want.st_mode), 1234, 5678)
    assert got.st_mtime_ns == want.st_mtime_ns  # (atime: the verification's reads move it,
    # relatime, as the copy's reads moved the source's)
    assert os.getxattr(dst.backing / "disk.raw", "user.vm") == b"web"
    assert digest(dst.mnt / "disk.raw") == before["disk.raw"]
