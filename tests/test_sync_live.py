"""migrator sync between two real blkfs mounts over TCP (loopback): a replica kept while a
VM writes, stopped by SIGTERM, cut by kill -9, then a migration that starts from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import Mount, run_blkfs, together
from .hosts import (
    MIGRATOR,
    SIMVM,
    Server,
    digest,
    last_line,
    migrate,
    migrate_a_vm,
    state,
    two_vms,
    wait_for,
)

pytestmark = pytest.mark.mount


def start_sync(src: Mount, port: int, key: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*MIGRATOR, "sync", "--mount", str(src.mnt), "--to",
                             f"127.0.0.1:{port}", "--key-file", str(key), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def replica_epoch(dst: Mount) -> int | None:
    st = state(dst)
    rep = st.get("replica") if st else None
    return rep.get("sync_round") if isinstance(rep, dict) else None  # type: ignore[return-value]


@pytest.fixture
def syncs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.mark.cache
def test_a_synced_replica_then_a_migration_that_sends_only_the_change(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server],
        syncs: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    """While the VM writes, the replica follows epoch by epoch, marked not runnable; once
    the VM pauses, the next epoch makes it byte-exact; after SIGTERM a migration to the same
    host sends only what changed since, and is verified."""
    src, dst = hosts
    subprocess.run([*SIMVM, "create", str(src.mnt), "--disk-size", "32M", "--mem-size", "16M"],
                   check=True, capture_output=True)
    # 64 writes of 4 KiB a second, each dirtying a 64 KiB block: a tenth of the blocks
    # change between the sync's last epoch and the migration's copy
    vm = subprocess.Popen([*SIMVM, "run", str(src.mnt), "--rate", "0.25"],
                          stdout=subprocess.DEVNULL)
    try:
        s = Server(dst, key, once=False)
        servers.append(s)
        report = tmp_path / "sync.json"
        sy = start_sync(src, s.port, key, "disk.raw", "vm.mem", "--lag", "1", "--report",
                        str(report))
        syncs.append(sy)
        wait_for(lambda: (replica_epoch(dst) or 0) >= 2)
        st = run_blkfs("status", str(dst.mnt), check=True).stdout
        assert "REPLICA, NOT RUNNABLE" in st and "syncing" in st, st
        st = subprocess.run([*MIGRATOR, "status"], capture_output=True, text=True).stdout
        assert "sync " in st and "replica at epoch" in st and "lag" in st, st
        # (issue 26) its cap changed while it runs, through its control socket
        r = subprocess.run([*MIGRATOR, "set", "--bandwidth", "50"], capture_output=True,
                           text=True)
        assert r.returncode == 0 and "bandwidth cap 100 MB/s -> 50 MB/s" in r.stdout, r
        r = subprocess.run([*MIGRATOR, "set", "--downtime", "10"], capture_output=True,
                           text=True)
        assert r.returncode == 1 and "takes only a new --bandwidth" in r.stderr, r
        def cap() -> object:
            docs = json.loads(subprocess.run([*MIGRATOR, "status", "--json"],
                                             capture_output=True, text=True).stdout)
            return docs[0].get("bandwidth_cap_mb_s")
        wait_for(lambda: cap() == 50, 10, "the new cap in its status")
        # One migration at a time per mount: a migrate beside the sync is refused, in a line.
        r = migrate(src, s.port, key, "disk.raw", "vm.mem", "--suspend", f"pid:{vm.pid}")
        assert r.returncode == 1 and "one migration at a time per VM" in last_line(r), r
        assert "migrator sync pid" in last_line(r) and vm.poll() is None
        os.kill(vm.pid, signal.SIGSTOP)  # the VM pauses: the next whole epoch is exact
        try:
            seen = replica_epoch(dst) or 0
            wait_for(lambda: (replica_epoch(dst) or 0) >= seen + 2)
            for n in ("disk.raw", "vm.mem"):
                assert digest(dst.mnt / n) == digest(src.mnt / n), n
        finally:
            os.kill(vm.pid, signal.SIGCONT)
        sy.send_signal(signal.SIGTERM)
        out, err = sy.communicate(timeout=30)
        assert sy.returncode == 0, err
        assert "sync stopped" in out and "not runnable" in out, out
        rep = json.loads(report.read_text())
        assert rep["status"] == "stopped" and rep["epochs"] >= 4 and rep["sessions"] == 1, rep
        assert rep["epoch"] == replica_epoch(dst), rep
        st = state(dst)
        assert st is not None and st["status"] == "replica" and not st["owner"], st
        assert "stopped" in run_blkfs("status", str(dst.mnt), check=True).stdout
        time.sleep(0.5)  # the VM writes on
        mig = tmp_path / "migrate.json"
        r = migrate(src, s.port, key, "disk.raw", "vm.mem", "--suspend", f"pid:{vm.pid}",
                    "--report", str(mig))
        assert r.returncode == 0, r.stderr
    finally:
        vm.kill()
        vm.wait()
    m = json.loads(mig.read_text())
    # Both sides prove the replica unchanged since its last epoch (lineage.py): only the
    # blocks written since were read and sent, none digested
    assert m["verified"] and m["delta"] == "lineage", (m["delta"], m["lineage_detail"])
    assert m["lineage_files"] == ["disk.raw", "vm.mem"] and m["held_digest_bytes"] == 0, m
    assert m["lineage_blocks"] >= 0.5 * (48 << 20) // 65536, m["lineage_blocks"]
    # What the VM wrote since the epoch and during the migration; a whole copy would be 1.0
    # (the VM writes on while the rounds run, so a busy machine sends more: 0.27 once)
    assert m["bytes_sent"] < 0.5 * m["data_bytes"], (m["bytes_sent"], m["data_bytes"])
    for n in ("disk.raw", "vm.mem"):
        assert digest(dst.mnt / n) == digest(src.mnt / n), n
    chk = subprocess.run([*SIMVM, "check", str(dst.mnt), "--json"], capture_output=True,
                         text=True)
    assert chk.returncode == 0 and json.loads(chk.stdout)["ok"], chk.stdout
    assert state(dst)["status"] == "complete"  # type: ignore[index]


def test_a_sync_killed_loses_nothing_but_time(hosts: tuple[Mount, Mount], key: Path,
                                              servers: list[Server],
                                              syncs: list[subprocess.Popen[str]],
                                              tmp_path: Path) -> None:
    """kill -9 in the middle of the first copy: the destination says its replica holds no
    whole epoch yet, never runnable; a new sync finds what got there and sends the rest."""
    src, dst = hosts
    (src.mnt / "disk.raw").write_bytes(os.urandom(24 << 20))
    s = Server(dst, key, once=False)
    servers.append(s)
    sy = start_sync(src, s.port, key, "disk.raw", "--bandwidth", "8")
    syncs.append(sy)
    wait_for(lambda: (dst.mnt / "disk.raw").exists() and (
        os.stat(dst.backing / "disk.raw").st_blocks * 512 >= 6 << 20))
    sy.kill()
    sy.communicate()
    st = subprocess.run([*MIGRATOR, "status"], capture_output=True, text=True).stdout
    assert f"its process {sy.pid} is gone; the replica there keeps its last epoch" in st, st
    wait_for(lambda: (state(dst) or {}).get("stopped_at"))
    st = state(dst)
    assert st is not None and st["status"] == "replica" and st["replica"]["sync_round"] is None, st
    out = run_blkfs("status", str(dst.mnt), check=True).stdout
    assert "REPLICA, NOT RUNNABLE" in out and "no whole epoch yet" in out, out
    r = subprocess.run([*MIGRATOR, "resolve", "--mount", str(dst.mnt)], capture_output=True,
                       text=True)
    assert "replica at generation 0" in r.stdout and "not runnable" in r.stdout, r.stdout
    report = tmp_path / "again.json"
    sy = start_sync(src, s.port, key, "disk.raw", "--report", str(report), "--lag", "1")
    syncs.append(sy)
    wait_for(lambda: replica_epoch(dst) is not None)
    sy.send_signal(signal.SIGINT)
    sy.communicate(timeout=30)
    rep = json.loads(report.read_text())
    assert rep["status"] == "stopped" and rep["held_blocks"] * 65536 >= 6 << 20, rep
    assert rep["bytes_sent"] < (20 << 20), rep  # not the whole 24 MiB again
    assert digest(dst.mnt / "disk.raw") == digest(src.mnt / "disk.raw")


def test_sync_bad_input_says_one_line(hosts: tuple[Mount, Mount], key: Path,
                                      servers: list[Server], tmp_path: Path) -> None:
    src, _ = hosts
    (src.mnt / "disk.raw").write_bytes(os.urandom(1 << 20))
    before = digest(src.mnt / "disk.raw")
    cases = [
        (["--to", "127.0.0.1:1"], "cannot connect to 127.0.0.1:1"),
        (["--to", "127.0.0.1:x"], "HOST:PORT"),
        (["--lag", "0"], "--lag"),
        (["--mount", str(tmp_path)], "blkfs"),
    ]
    for extra, expect in cases:
        args = ["--mount", str(src.mnt), "--to", "127.0.0.1:9", "--key-file", str(key)]
        for i in range(0, len(extra), 2):
            j = args.index(extra[i]) if extra[i] in args else -1
            if j >= 0:
                args[j + 1] = extra[i + 1]
            else:
                args += extra[i:i + 2]
        r = subprocess.run([*MIGRATOR, "sync", *args, "disk.raw"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode != 0 and expect in last_line(r), (extra, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
    assert digest(src.mnt / "disk.raw") == before


@pytest.mark.cache
def test_lineage_survives_a_clean_remount_and_never_an_unclean_one(
        mount_factory: Callable[..., Mount], key: Path, servers: list[Server],
        syncs: list[subprocess.Popen[str]], tmp_path: Path) -> None:
    """A destination daemon killed -9 forgets which blocks were written (blkfs reports them
    all dirty): the next sync compares digests. Clean remounts of both keep the proof: the
    migration then reads only what changed. And no sync overwrites the VM it handed over."""
    def mounts() -> tuple[Mount, Mount]:
        return (mount_factory(backing=tmp_path / "src-backing", mnt=tmp_path / "src"),
                mount_factory(backing=tmp_path / "dst-backing", mnt=tmp_path / "dst"))

    def sync_once(src: Mount, dst: Mount, report: Path) -> dict[str, object]:
        s = Server(dst, key)
        servers.append(s)
        sy = start_sync(src, s.port, key, "disk.raw", "--lag", "1", "--report", str(report))
        syncs.append(sy)
        t = time.time()
        wait_for(lambda: float((state(dst) or {}).get("started_at", 0)) > t  # type: ignore[arg-type]
                 and (replica_epoch(dst) or 0) >= 1)  # (this sync's second epoch)
        sy.send_signal(signal.SIGTERM)
        assert sy.wait(timeout=30) == 0
        assert s.finish()[0] == 0
        return json.loads(report.read_text())  # type: ignore[no-any-return]

    src, dst = mounts()
    (src.mnt / "disk.raw").write_bytes(os.urandom(8 << 20))
    first = sync_once(src, dst, tmp_path / "1.json")
    assert first["delta"] == "none" and first["epochs"] >= 2, first
    dst.kill9()
    dst = mount_factory(backing=tmp_path / "dst-backing", mnt=tmp_path / "dst")
    again = sync_once(src, dst, tmp_path / "2.json")
    assert again["delta"] == "digests", again  # the replica was proven block by block
    assert "written here since the sync" in str(again["lineage_detail"]), again
    for m in (src, dst):
        m.umount()
    src, dst = mounts()
    report = tmp_path / "migrate.json"
    migrate_a_vm(src, dst, key, servers, "disk.raw", "--report", str(report))
    m = json.loads(report.read_text())
    assert m["delta"] == "lineage" and m["verified"], (m["delta"], m["lineage_detail"])
    assert m["bytes_sent"] < 1 << 20, m["bytes_sent"]
    assert digest(src.mnt / "disk.raw") == digest(dst.mnt / "disk.raw")
    s = Server(dst, key)
    servers.append(s)
    sy = start_sync(src, s.port, key, "disk.raw")
    syncs.append(sy)
    _, err = sy.communicate(timeout=60)
    # (the VM left: this host refuses to sync what is no longer its own)
    assert sy.returncode == 1 and "left this host" in err.strip().splitlines()[-1], err


def test_a_sync_outlives_its_destination_serve(hosts: tuple[Mount, Mount], key: Path,
                                                servers: list[Server],
                                                syncs: list[subprocess.Popen[str]],
                                                tmp_path: Path) -> None:
    """kill -9 of the serve: the sync says so in one line, retries, and goes on with a serve
    started again on the same port, from the replica already there."""
    src, dst = hosts
    (src.mnt / "disk.raw").write_bytes(os.urandom(8 << 20))
    s = Server(dst, key, once=False)
    servers.append(s)
    report = tmp_path / "sync.json"
    sy = start_sync(src, s.port, key, "disk.raw", "--lag", "1", "--report", str(report))
    syncs.append(sy)
    wait_for(lambda: (replica_epoch(dst) or 0) >= 1)
    s.proc.kill()
    s.proc.wait()
    time.sleep(1.5)  # the sync notices, says so, and waits a second before it tries again
    s2 = Server(dst, key, once=False, listen=f"127.0.0.1:{s.port}")
    servers.append(s2)
    t = time.time()
    wait_for(lambda: float((state(dst) or {}).get("started_at", 0)) > t  # type: ignore[arg-type]
             and replica_epoch(dst) is not None)
    with open(src.mnt / "disk.raw", "r+b") as f:  # the VM writes on: the sync follows
        f.write(os.urandom(65536))
    seen = replica_epoch(dst) or 0
    wait_for(lambda: (replica_epoch(dst) or 0) >= seen + 2)
    sy.send_signal(signal.SIGTERM)
    _, err = sy.communicate(timeout=30)
    assert sy.returncode == 0, err
    assert "cut" in err and "again in" in err and "Traceback" not in err, err
    rep = json.loads(report.read_text())
    assert rep["sessions"] >= 2 and rep["status"] == "stopped", rep
    assert digest(src.mnt / "disk.raw") == digest(dst.mnt / "disk.raw")


@pytest.mark.parametrize("into", ["two-mounts", "one-serve"])
def test_a_sync_of_one_vm_and_a_migration_of_another_run_at_once_from_one_mount(
        mount_factory: Callable[..., Mount], key: Path, servers: list[Server],
        syncs: list[subprocess.Popen[str]], tmp_path: Path, into: str) -> None:
    """A host is many VMs: a sync keeps vm1's replica while vm2 migrates from the same mount
    (into another mount, or through the same serve: a second serve on that mount is refused at
    its start), verified; a migration of vm1 meanwhile is refused in one line naming its file and
    the sync that holds it, its VM left running."""
    names = ("src", "d1", "d2") if into == "two-mounts" else ("src", "d1")
    mounts = together(*(lambda n=n: mount_factory(backing=tmp_path / f"{n}-backing",
                                                   mnt=tmp_path / n) for n in names))
    src, d1, d2 = mounts[0], mounts[1], mounts[-1]
    before = two_vms(src)
    s1 = Server(d1, key, once=False)
    s2 = s1 if into == "one-serve" else Server(d2, key)
    servers += [s1, s2]
    if into == "one-serve":  # (issue 26)
        second = subprocess.run([*MIGRATOR, "serve", "--mount", str(d1.mnt), "--listen",
                                 "127.0.0.1:0", "--key-file", str(key)],
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1 and second.stderr.strip() == (
            f"migrator: error: another 'migrator serve' (pid {s1.proc.pid}) takes migrations "
            f"into {d1.mnt} already: one serve per mount takes them all (stop it first to "
            "start this one)"), second.stderr
    sy = start_sync(src, s1.port, key, "vm1/disk.raw", "vm1/vm.mem", "--lag", "1")
    syncs.append(sy)
    # (a replica's first epoch there: the sync holds vm1's files on the source's daemon)
    wait_for(lambda: (d1.mnt / "vm1" / "disk.raw").exists()
             and (replica_epoch(d1) or 0) >= 1, what="vm1's replica")
    vms = [subprocess.Popen(["sleep", "300"]) for _ in range(2)]
    try:
        r2 = migrate(src, s2.port, key, "vm2/disk.raw", "vm2/vm.mem", "--suspend",
                     f"pid:{vms[0].pid}")
        assert r2.returncode == 0, r2.stderr
        if s2 is not s1:
            assert s2.finish()[0] == 0
        assert sy.poll() is None  # the sync goes on beside it
        r1 = migrate(src, s1.port, key, "vm1/disk.raw", "vm1/vm.mem", "--suspend",
                     f"pid:{vms[1].pid}")
        line = last_line(r1)
        assert r1.returncode == 1 and len(r1.stderr.strip().splitlines()) == 1, r1.stderr
        assert "vm1/disk.raw (and 1 more) on " in line and "migrator sync pid" in line, line
        assert "one migration at a time per VM" in line, line
        assert vms[1].poll() is None
    finally:
        for vm in vms:
            vm.kill()
            vm.wait()
    sy.send_signal(signal.SIGTERM)
    out, err = sy.communicate(timeout=30)
    assert sy.returncode == 0 and "sync stopped" in out, err
    for rel, d in before.items():
        assert digest((d1 if rel.startswith("vm1") else d2).mnt / rel) == d, rel
