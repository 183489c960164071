"""A real QEMU guest (TCG) live-migrated between two blkfs mounts: pre-copy and post-copy.

The guest (scripts/build_guest.sh, Debian packages only) writes "TICK n" into 4 KiB block n of
its virtio disk every tick and checks a 16 MiB RAM canary, printing both on its serial console.
QEMU moves only its device state (x-ignore-shared); blkfs and the migrator move the disk image
and the RAM file.

The guest boots once per module (`booted`: ~7 s of TCG) and is saved, stopped after its first
tick: its disk, its RAM file and QEMU's device state.  Each test puts that disk and RAM file on
its source mount and starts the source QEMU from the saved state (`-incoming`): the guest runs on
from its next tick, on the mount, with the canary it made at boot in its RAM, and the test waits
for its ticks there before it migrates it.  Slow tier: restore + migration + a few ticks is ~6 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from migrator.qmp import QMP, QMPError

from .conftest import Mount, together
from .hosts import (
    MIGRATOR,
    Server,
    state,
)

pytestmark = [pytest.mark.mount, pytest.mark.slow, pytest.mark.serial, pytest.mark.cache]

ROOT = Path(__file__).resolve().parent.parent
QEMU = shutil.which("qemu-system-x86_64")
RAM = "128M"


@pytest.fixture(scope="module")
def guest() -> Path:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is missing (apt-get install qemu-system-x86)")
    r = subprocess.run([str(ROOT / "scripts" / "build_guest.sh")], capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"cannot build the test guest: {r.stderr.strip().splitlines()[-1:]}")
    return Path(r.stdout.strip().splitlines()[-1])


def qemu_argv(guest: Path, mount: str, console: Path, cache: str) -> list[str]:
    return [QEMU or "qemu-system-x86_64", "-accel", "tcg", "-m", RAM, "-display", "none",
            "-no-reboot", "-nodefaults", "-kernel", str(guest / "vmlinuz"),
            "-initrd", str(guest / "initrd.gz"), "-append", "console=ttyS0 quiet panic=-1",
            "-serial", f"file:{console}",
            "-drive", f"file={mount}/disk.raw,format=raw,if=virtio,cache={cache}",
            "-object", f"memory-backend-file,id=mem,size={RAM},mem-path={mount}/vm.mem,share=on",
            "-machine", "memory-backend=mem"]


def ignore_shared(q: QMP) -> None:
    """x-ignore-shared, as the migrator sets it: RAM stays in the shared memory-backend-file."""
    q.execute("migrate-set-capabilities",
              {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})


def wait_migration(q: QMP, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (st := q.command("query-migrate").get("status")) != "completed":
        assert st not in ("failed", "cancelled") and time.monotonic() < deadline, (what, st)
        time.sleep(0.01)


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Until QEMU listens on its QMP socket: the file appears at bind(), a moment before
    listen(), and a connect in between is refused (seen on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, f"no QMP on {path}"
        if path.exists():
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(path))
                    return  # (closed at once: QEMU then serves the next client)
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
        time.sleep(0.02)


@dataclass(frozen=True)
class Booted:
    """A guest booted once and saved, stopped after its first tick."""

    dir: Path  # disk.raw, vm.mem (its RAM) and state (QEMU's device state, RAM left out)
    canary: str  # the md5 of the 16 MiB it put in its RAM at boot
    ticks: int  # the ticks it made before it was stopped (on disk.raw too)


@pytest.fixture(scope="module")
def booted(guest: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    """Boot the guest (on a plain directory) and save it as the migrator's source would:
    `stop`, device state with x-ignore-shared (the RAM is in vm.mem), `quit`."""
    d = tmp_path_factory.mktemp("booted")
    for name, size in (("disk.raw", 64 << 20), ("vm.mem", 128 << 20)):
        with open(d / name, "wb") as f:
            f.truncate(size)
    console, qmp = d / "console.log", d / "qmp.sock"
    with open(d / "qemu.log", "wb") as log:
        proc = subprocess.Popen([*qemu_argv(guest, str(d), console, "writeback"),
                                 "-qmp", f"unix:{qmp},server=on,wait=off"],
                                stdout=log, stderr=log)
    try:
        wait_ticks(console, 1, 120)
        wait_socket(qmp, proc)
        with QMP(str(qmp)) as q:
            q.command("stop")
            ignore_shared(q)
            q.command("migrate", uri=f"exec:cat > {d / 'state'}")
            wait_migration(q, "save")
            with contextlib.suppress(OSError, QMPError):
                q.command("quit")  # it may close the socket before it answers
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = console.read_text(errors="replace")
    canary = re.search(r"CANARY (\w+)", text)
    assert canary and (d / "state").stat().st_size > 0, text
    yield Booted(d, canary.group(1), len(ticks(console)))
    shutil.rmtree(d, ignore_errors=True)


def ticks(console: Path) -> list[str]:
    try:
        text = console.read_text(errors="replace")
    except FileNotFoundError:
        return []
    # Whole lines only: the guest writes its serial console a few bytes at a time, so the
    # last line may still be arriving ("TICK 9 disk=ok ca", seen once).
    whole = text[:text.rfind("\n") + 1]
    return [ln for ln in whole.splitlines() if ln.startswith("TICK ")]


def wait_ticks(console: Path, n: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = ticks(console)
        if len(t) >= n:
            return t
        time.sleep(0.05)
    raise AssertionError(f"{console}: {len(ticks(console))} ticks after {timeout} s, want {n}:\n"
                         + (console.read_text(errors="replace")[-2000:]
                            if console.exists() else "(no console)"))


def two_hosts(mount_factory: Callable[..., Mount],
              tmp_path: Path) -> tuple[Mount, Mount, Path]:
    """Source and destination mounts and the key."""
    src, dst = together(
        lambda: mount_factory(backing=tmp_path / "src-b", mnt=tmp_path / "src"),
        lambda: mount_factory(backing=tmp_path / "dst-b", mnt=tmp_path / "dst"))
    key = tmp_path / "key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o600)
    return src, dst, key


def put(src: Path, dst: Path) -> None:
    """Copy a guest file through the mount (written as the guest wrote it, zeros left out)."""
    zero = bytes(1 << 16)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while blk := fi.read(len(zero)):
            if blk == zero[:len(blk)]:
                fo.seek(len(blk), os.SEEK_CUR)
            else:
                fo.write(blk)
        fo.truncate(os.fstat(fi.fileno()).st_size)


def boot_source(guest: Path, booted: Booted, src: Mount, tmp_path: Path, cache: str,
                procs: list[subprocess.Popen[bytes]]) -> tuple[subprocess.Popen[bytes], Path,
                                                               Path]:
    """The source QEMU on `src`, the saved guest's disk and RAM put there and its device state
    loaded (`-incoming`), then `cont`: (process, serial console file, QMP socket)."""
    for name in ("disk.raw", "vm.mem"):
        put(booted.dir / name, src.mnt / name)
    con_src, qmp_src = tmp_path / "console-src.log", tmp_path / "qmp-src.sock"
    with open(tmp_path / "qemu-src.log", "wb") as log:
        source = subprocess.Popen([*qemu_argv(guest, str(src.mnt), con_src, cache),
                                   "-S", "-incoming", "defer",
                                   "-qmp", f"unix:{qmp_src},server=on,wait=off"],
                                  stdout=log, stderr=log)
    procs.append(source)
    wait_socket(qmp_src, source)
    with QMP(str(qmp_src)) as q:  # closed: QEMU serves one QMP client, the migrator's next
        ignore_shared(q)
        q.command("migrate-incoming", uri=f"exec:cat {booted.dir / 'state'}")
        wait_migration(q, "restore")
        q.command("cont")
    return source, con_src, qmp_src


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """QEMUs to kill before the mounts go (unmount only after QEMU has exited)."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for pr in started:
        if pr.poll() is None:
            pr.kill()
        pr.wait()


@pytest.mark.parametrize(("cache", "postcopy", "attach"),
                         [("writeback", False, False), ("none", False, False),
                          ("writeback", True, False), ("writeback", False, True)],
                         ids=["precopy-writeback", "precopy-cache-none", "postcopy",
                              "precopy-own-destination-qemu"])
def test_qemu_guest_migrates_live(guest: Path, booted: Booted,
                                  mount_factory: Callable[..., Mount], tmp_path: Path,
                                  procs: list[subprocess.Popen[bytes]], cache: str,
                                  postcopy: bool, attach: bool) -> None:
    src, dst, key = two_hosts(mount_factory, tmp_path)
    source, con_src, qmp_src = boot_source(guest, booted, src, tmp_path, cache, procs)
    con_dst = tmp_path / "console-dst.log"
    before = wait_ticks(con_src, 2, 60)  # it runs on the source mount, from its saved state
    assert int(before[0].split()[1]) == booted.ticks + 1, before
    canary = booted.canary
    cmdline = tmp_path / "qemu-dst.cmdline"
    cmdline.write_text(" ".join(f"'{a}'" for a in qemu_argv(guest, "$MIGRATOR_MOUNT", con_dst,
                                                              cache)) + "\n")
    resume = f"qemu:{cmdline}"
    if attach:  # a destination QEMU the user started, waiting with -incoming defer
        for name, size in (("disk.raw", 64 << 20), ("vm.mem", 128 << 20)):
            with open(dst.mnt / name, "wb") as f:
                f.truncate(size)
        qmp_dst = tmp_path / "qmp-dst.sock"
        with open(tmp_path / "qemu-dst.log", "wb") as log:
            procs.append(subprocess.Popen(
                [*qemu_argv(guest, str(dst.mnt), con_dst, cache), "-S", "-incoming", "defer",
                 "-qmp", f"unix:{qmp_dst},server=on,wait=off"], stdout=log, stderr=log))
        wait_socket(qmp_dst, procs[-1])  # type: ignore[arg-type]
        resume = f"qemu:{qmp_dst}"
    s = Server(dst, key, "--resume", resume)
    report = tmp_path / "report.json"
    extra = ["--postcopy", "--spill", str(tmp_path / "spill")] if postcopy else []
    try:
        r = subprocess.run([*MIGRATOR, "migrate", "--mount", str(src.mnt), "--to",
                            f"127.0.0.1:{s.port}", "--key-file", str(key), "--suspend",
                            f"qemu:{qmp_src}", "--report", str(report), *extra,
                            "disk.raw", "vm.mem"], capture_output=True, text=True, timeout=120)
        rc, out = s.finish(timeout=60)
    finally:
        s.kill()
    m = re.search(r"QEMU pid (\d+) \(QMP and log in (\S+)\)", out)
    if m:  # the destination QEMU runs detached from `migrator serve`: ours to stop
        procs.append(_Pid(int(m.group(1)), m.group(2)))  # type: ignore[arg-type]
    assert r.returncode == 0, r.stdout + r.stderr + out
    assert rc == 0 and "complete and verified" in out, out
    assert source.wait(timeout=15) == 0  # the source QEMU quit
    last_src = int(ticks(con_src)[-1].split()[1])
    assert len(ticks(con_src)) >= len(before)
    after = wait_ticks(con_dst, 3, 60)
    # The guest goes on from the next tick, with its RAM (canary) and disk intact.
    assert int(after[0].split()[1]) == last_src + 1, (ticks(con_src)[-3:], after[:3])
    assert all(t.endswith("disk=ok canary=ok") for t in ticks(con_src) + after), after
    assert "BOOTED" not in con_dst.read_text() and f"CANARY {canary}" not in con_dst.read_text()
    last_dst = int(ticks(con_dst)[-1].split()[1])
    disk = (dst.mnt / "disk.raw").read_bytes()
    for n in range(1, last_dst):  # every tick record, from both hosts, is on the disk
        assert disk[n * 4096:n * 4096 + 16].split(b"\n")[0] == f"TICK {n}".encode(), n
    rep = json.loads(report.read_text())
    assert rep["downtime_ms"] is not None and rep["verified"] and rep["device_state_bytes"] > 0
    pc = rep["postcopy"] or {}
    if postcopy:
        # QEMU said where its virtio rings are (it reads them while it loads its state): their
        # regions went with the last set, whatever the warm set's budget
        assert rep["load_reads"] > 0 and rep["load_reads_left_absent"] == 0, rep
        assert rep["postcopy_pages"] > 0 or rep["warm_set_pages"] > 0, rep
        if rep["postcopy_pages"]:
            assert (pc["pages_via_spill"] + pc["pages_via_drain"] + pc["pages_via_demand_fetch"]
                    == rep["postcopy_pages"])
    # The figures for the closing note (pytest -s): what moved, and how.
    print(f"\n{cache} postcopy={postcopy}: downtime {rep['downtime_ms']} ms "
          f"{rep['downtime_breakdown_ms']}, total {rep['total_s']} s, link bytes by file "
          f"{rep['bytes_by_file']}, spill bytes {rep['spill_bytes']}, device state "
          f"{rep['device_state_bytes']}, post-copy pages {rep['postcopy_pages']}: faulted in "
          f"{pc.get('pages_via_spill', 0) + pc.get('pages_via_demand_fetch', 0)} (fetched "
          f"{pc.get('pages_via_demand_fetch')}), drained {pc.get('pages_via_drain')}; faults "
          f"{pc.get('demand_faults')} p99 {pc.get('demand_fault_p99_ms')} ms; warm set "
          f"{rep['warm_set_pages']} pages, QEMU's ring blocks {rep['load_reads']}")


class _Pid:
    """A process we did not start (the destination QEMU), with the Popen calls procs needs."""

    def __init__(self, pid: int, qemu_dir: str) -> None:
        self.pid = pid
        self.dir = qemu_dir  # its private QMP/log directory

    def poll(self) -> int | None:
        return None if os.path.exists(f"/proc/{self.pid}") else 0

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                pass
            time.sleep(0.05)
        shutil.rmtree(self.dir, ignore_errors=True)
        return 0


def test_destination_qemu_failure_conts_the_source(guest: Path, booted: Booted,
                                                   mount_factory: Callable[..., Mount],
                                                   tmp_path: Path,
                                                   procs: list[subprocess.Popen[bytes]]) -> None:
    """Invariant 3 with QEMU: the destination QEMU cannot start; the source guest goes on."""
    src, dst, key = two_hosts(mount_factory, tmp_path)
    source, con_src, qmp_src = boot_source(guest, booted, src, tmp_path, "writeback", procs)
    wait_ticks(con_src, 1, 60)
    cmdline = tmp_path / "bad.cmdline"
    cmdline.write_text(" ".join(qemu_argv(guest, "$MIGRATOR_MOUNT", tmp_path / "c.log",
                                          "writeback")) + " -no-such-option\n")
    dirs = set(Path(tempfile.gettempdir()).glob("migrator-qemu-dst-*"))
    s = Server(dst, key, "--resume", f"qemu:{cmdline}")
    try:
        r = subprocess.run([*MIGRATOR, "migrate", "--mount", str(src.mnt), "--to",
                            f"127.0.0.1:{s.port}", "--key-file", str(key), "--suspend",
                            f"qemu:{qmp_src}", "disk.raw", "vm.mem"],
                           capture_output=True, text=True, timeout=120)
        rc, _out = s.finish(timeout=60)
    finally:
        s.kill()
    assert r.returncode == 1 and rc == 1
    assert "-no-such-option" in r.stderr, r.stderr  # QEMU's own words reach the user
    # (and its private directory is gone: the QEMU tests run one at a time, so any new one
    # would be this serve's)
    assert set(Path(tempfile.gettempdir()).glob("migrator-qemu-dst-*")) <= dirs
    n = len(ticks(con_src))
    wait_ticks(con_src, n + 2, 30)  # the source guest runs on
    assert source.poll() is None
    st = state(dst)
    assert st is not None and st["status"] == "incomplete" and st["role"] == "incomplete"
