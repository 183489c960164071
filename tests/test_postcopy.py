"""Post-copy through the spill area, between two real blkfs mounts (invariant 4).

The destination's "VM" is a reader that mmaps vm.mem through the destination mount as soon
as the resume hook runs and reads every page: each page it sees must be the source's final
page, whether the drain installed it from a spill slot or the read waited for a demand fetch.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from blkfs.spill import FLAG_FILLED, HEADER_SIZE, SlotHeader

from .conftest import Mount
from .hosts import (
    MIGRATOR,
    SIMVM,
    Server,
    digest,
    hold_until,
    read_json,
    state,
    stopped,
    wait_for,
    wait_writing,
)

pytestmark = pytest.mark.mount

BS = 65536
READER = r"""
import hashlib, json, mmap, os, sys, time
path, out, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
pages = []
for off in range(0, size, 65536):
    pages.append(hashlib.sha256(mm[off:off + 65536]).hexdigest())
    time.sleep(pause)
json.dump(pages, open(out + ".tmp", "w")); os.rename(out + ".tmp", out)
"""


def block_hashes(path: Path) -> list[str]:
    data = path.read_bytes()
    return [hashlib.sha256(data[i:i + BS]).hexdigest() for i in range(0, len(data), BS)]


@pytest.fixture
def vm(hosts: tuple[Mount, Mount]) -> Iterator[subprocess.Popen[bytes]]:
    """A simulated VM that dirties its memory faster than pre-copy likes."""
    src, _ = hosts
    subprocess.run([*SIMVM, "create", str(src.mnt), "--disk-size", "8M", "--mem-size", "24M",
                    "--unit", "65536"], check=True, capture_output=True)
    proc = subprocess.Popen([*SIMVM, "run", str(src.mnt), "--rate", "60", "--hot-fraction",
                             "0.5"], stdout=subprocess.DEVNULL)
    wait_writing(src, proc, 12)  # (its memory is dirty: there is something to post-copy)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class Migration:
    """`migrator migrate --postcopy` in the background, its stderr read line by line."""

    def __init__(self, src: Mount, port: int, key: Path, vm_pid: int, *args: str) -> None:
        self.status = src.backing.parent / f"migrate-{port}.status.json"
        self.proc = subprocess.Popen(
            [*MIGRATOR, "migrate", "--mount", str(src.mnt), "--to", f"127.0.0.1:{port}",
             "--key-file", str(key), "--suspend", f"pid:{vm_pid}", "--postcopy",
             "--status-file", str(self.status), *args, "disk.raw", "vm.mem"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)  # (as Server's)

    def wait_spill_flushed(self, timeout: float = 60) -> None:
        """Until every remaining page is in the spill area, as migrate's status file says."""
        wait_for(lambda: read_json(self.status).get("spill_flushed")
                 or self.proc.poll() is not None, timeout, "the spill flushed")
        assert read_json(self.status).get("spill_flushed"), self.finish()

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, (out + err).decode(errors="replace")

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.communicate()


@pytest.mark.cache
def test_postcopy_reader_sees_only_final_pages(hosts: tuple[Mount, Mount], key: Path,
                                                servers: list[Server], tmp_path: Path,
                                                vm: subprocess.Popen[bytes]) -> None:
    src, dst = hosts
    seen, early = tmp_path / "seen.json", tmp_path / "early.bin"
    # The hook reads the VM's first page synchronously (as QEMU reads RAM while loading its
    # state, before it resumes), then starts the reader and returns.
    hook = (f"head -c 4096 \"$MIGRATOR_MOUNT/vm.mem\" > {early} && "
            f"{sys.executable} -c '{READER}' \"$MIGRATOR_MOUNT/vm.mem\" {seen} 0.004 "
            f"</dev/null >/dev/null 2>&1 &")
    s = Server(dst, key, "--resume-cmd", hook)
    servers.append(s)
    report = tmp_path / "report.json"
    # (no warm set: every dirty memory block goes post-copy, through 8 slots, and the reader
    # faults; the warm set has its own test)
    m = Migration(src, s.port, key, vm.pid, "--spill", str(tmp_path / "spill"),
                  "--spill-slots", "8", "--spill-bandwidth", "8", "--warm-set", "0",
                  "--report", str(report))
    rc, out = m.finish()
    assert rc == 0, out
    assert vm.wait(timeout=10) == -signal.SIGKILL
    rc, sout = s.finish()
    assert rc == 0 and "complete and verified" in sout, sout
    deadline = time.monotonic() + 30
    while not seen.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    final = block_hashes(src.backing / "vm.mem")  # the source at the suspend point
    assert json.loads(seen.read_text()) == final  # every page the reader saw was final
    assert early.read_bytes() == (src.backing / "vm.mem").read_bytes()[:4096]
    assert digest(dst.mnt / "vm.mem") == digest(src.mnt / "vm.mem")
    assert digest(dst.mnt / "disk.raw") == digest(src.mnt / "disk.raw")
    rep = json.loads(report.read_text())
    pc = rep["postcopy"]  # the destination daemon's figures, as it sent them
    assert rep["verified"] and rep["postcopy_pages"] > 8, rep
    assert (pc["pages_via_spill"] + pc["pages_via_drain"] + pc["pages_via_demand_fetch"]
            == rep["postcopy_pages"])
    assert pc["demand_faults"] > 0 and pc["pages_via_demand_fetch"] > 0
    assert pc["demand_fault_p99_ms"] is not None and rep["resume_ms"] is not None
    if rep["pages_spilled"] > 8:
        assert rep["slot_reuses"] >= rep["pages_spilled"] - 8  # N=8 slots carried them all
    for k in ("postcopy_s", "resume_ms", "slot_reuses", "postcopy"):
        assert k in rep, k
    for k in ("demand_faults", "demand_fault_p50_ms", "demand_fault_p99_ms", "pages_via_spill",
              "pages_via_demand_fetch", "generation_mismatches"):
        assert k in pc, k
    st = state(dst)
    assert st is not None and st["status"] == "complete"
    chk = subprocess.run([*SIMVM, "check", str(dst.mnt)], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    spill = subprocess.run([sys.executable, "-m", "blkfs.cli", "spill", str(dst.mnt), "--json"],
                           capture_output=True, text=True, check=True)
    info = json.loads(spill.stdout)
    assert info["postcopy"]["remaining"] == 0, info
    # Done: nobody will read the area again, and the source removed it (its directory of its
    # own in --spill DIR; the mount's read-only view of a live one: the test below)
    assert not info["exists"] and list((tmp_path / "spill").iterdir()) == []


@pytest.mark.parametrize("warm_ms", ["500", "1e6"])
def test_the_warm_set_goes_with_the_last_set(hosts: tuple[Mount, Mount], key: Path,
                                             servers: list[Server], tmp_path: Path,
                                             vm: subprocess.Popen[bytes], warm_ms: str) -> None:
    """The hottest memory goes with the last set, whole 2 MiB regions of it, as much as the
    link moves in --warm-set ms (here capped at 10 MB/s: 500 ms is 5 MB, a few of the hot
    regions; 1e6 ms all of them, and the migration commits without post-copy); the rest is
    post-copied, and a reader on the destination sees only the source's final pages."""
    src, dst = hosts
    seen = tmp_path / "seen.json"
    s = Server(dst, key, "--resume-cmd", f"{sys.executable} -c '{READER}' "
               f"\"$MIGRATOR_MOUNT/vm.mem\" {seen} 0 </dev/null >/dev/null 2>&1 &")
    servers.append(s)
    report = tmp_path / "report.json"
    m = Migration(src, s.port, key, vm.pid, "--spill", str(tmp_path / "spill"), "--bandwidth",
                  "10", "--warm-set", warm_ms, "--report", str(report))
    rc, out = m.finish()
    assert rc == 0, out
    assert s.finish()[0] == 0
    wait_for(seen.exists, 30, "the reader's pages")
    assert json.loads(seen.read_text()) == block_hashes(src.backing / "vm.mem")
    assert digest(dst.mnt / "vm.mem") == digest(src.mnt / "vm.mem")
    rep = json.loads(report.read_text())
    assert rep["verified"] and rep["warm_set_pages"] > 0, rep
    assert rep["last_set_pages"] >= rep["warm_set_pages"]
    if warm_ms == "500":
        assert rep["postcopy_pages"] > 0 and rep["postcopy"]["remaining"] == 0, rep
        assert rep["warm_set_pages"] * 4096 <= 5.5e6  # within the budget, at most
    else:
        assert rep["postcopy_pages"] == 0 and rep["postcopy"] is None, rep
    chk = subprocess.run([*SIMVM, "check", str(dst.mnt)], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr


@pytest.mark.cache
def test_postcopy_auto_comes_after_the_throttle(hosts: tuple[Mount, Mount], key: Path,
                                                servers: list[Server], tmp_path: Path) -> None:
    """--postcopy auto on a VM whose memory outruns the link (its disk quiet): first it is
    slowed (auto-converge, here up to 30 %), then its memory goes post-copy with the throttle
    undone; completed, verified, and the destination holds the suspend point."""
    src, dst = hosts
    subprocess.run([*SIMVM, "create", str(src.mnt), "--disk-size", "2M", "--mem-size", "8M",
                    "--unit", "65536"], check=True, capture_output=True)
    vm = subprocess.Popen([*SIMVM, "run", str(src.mnt), "--rate", "40", "--hot-fraction",
                           "0.5", "--mem-share", "0.99"], stdout=subprocess.DEVNULL)
    wait_writing(src, vm, 4)
    s = Server(dst, key, "--resume-cmd", "true")
    servers.append(s)
    report = tmp_path / "report.json"
    # (6 MB/s: the hot 4 MiB costs 700 ms at it, so the rounds never converge even when a
    # loaded machine starves the VM; at 12 MB/s they once did, beside a full run)
    m = Migration(src, s.port, key, vm.pid, "--postcopy=auto", "--max-throttle", "30",
                  "--bandwidth", "6", "--spill", str(tmp_path / "spill"), "--report",
                  str(report))
    try:
        rc, out = m.finish()
        assert rc == 0, out
        assert vm.wait(timeout=10) == -signal.SIGKILL  # retired: killed, never left stopped
    finally:
        if vm.poll() is None:
            vm.kill()
        vm.wait()
    rc, sout = s.finish()
    assert rc == 0 and "complete and verified" in sout, sout
    rep = json.loads(report.read_text())
    assert rep["verified"] and rep["postcopy_reason"], rep
    assert [pct for _, pct in rep["throttle_steps"]] == [20, 30], rep["throttle_steps"]
    assert rep["throttle_max_pct"] == 30 and rep["throttle_s"] > 0
    flat = " ".join(out.split())  # (the console wraps its lines)
    assert "slowed by 20 %" in flat and "memory goes post-copy" in flat, out
    assert flat.index("slowed by 30 %") < flat.index("memory goes post-copy"), out
    assert digest(dst.mnt / "vm.mem") == digest(src.mnt / "vm.mem")
    assert digest(dst.mnt / "disk.raw") == digest(src.mnt / "disk.raw")


def stop_dest_on_resume() -> str:
    """A resume hook that freezes `migrator serve` itself: nothing more reaches its daemon."""
    return "kill -STOP $PPID"


FORGED = b"forged!!"


def tamper_with_slots(spill: Path, how: str) -> int:
    """What anyone who can write the shared area can do to its filled slots: flip a byte of
    each (the headers stay), or forge each (other data, its xxh3 in the header, no MAC:
    the key is not theirs). Returns how many slots it changed. `spill` is the --spill DIR:
    the migration's area is the directory of its own in it."""
    [spill] = [d.parent for d in spill.glob("*/manifest.json")]
    manifest = json.loads((spill / "manifest.json").read_text())
    fd = os.open(spill / "slots", os.O_RDWR)
    hfd = os.open(spill / "headers", os.O_RDWR)
    n = 0
    try:
        for slot in range(manifest["slots"]):
            h = SlotHeader.unpack(os.pread(hfd, HEADER_SIZE, slot * HEADER_SIZE))
            if not h.flags & FLAG_FILLED:
                continue
            n += 1
            if how == "flip":
                b = os.pread(fd, 1, slot * BS + 100)
                os.pwrite(fd, bytes([b[0] ^ 0xFF]), slot * BS + 100)
                continue
            fake = FORGED * (h.length // 8) + b"?" * (h.length % 8)
            os.pwrite(fd, fake, slot * BS)
            os.pwrite(hfd, dataclasses.replace(h, digest=xxhash.xxh3_64_intdigest(fake)).pack(),
                      slot * HEADER_SIZE)
    finally:
        os.close(fd)
        os.close(hfd)
    return n


@pytest.mark.cache
def test_source_killed_after_spill_flush_dest_completes(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server], tmp_path: Path,
        vm: subprocess.Popen[bytes]) -> None:
    src, dst = hosts
    # (--once waits its io timeout for the source to reattach before it exits: 3 s, the
    # timeout the fault cells hold on a busy machine; the wait is the only use of more)
    s = Server(dst, key, "--resume-cmd", stop_dest_on_resume(), "--io-timeout", "3")
    servers.append(s)
    m = Migration(src, s.port, key, vm.pid, "--spill", str(tmp_path / "spill"),
                  "--spill-bandwidth", "50")
    try:
        m.wait_spill_flushed()
    finally:
        m.kill9()  # kill -9 the source migrator: only the spill area is left
        os.kill(s.proc.pid, signal.SIGCONT)
    completed_from_the_spill_alone(s, src, dst, vm)
    # The area stays (the source died: nobody knew it was done with), shown read-only by the
    # mount (flushed.json: the source got every page in)
    assert set(os.listdir(dst.mnt / ".spill")) == {
        "flushed.json", "headers", "installed", "manifest.json", "slots"}
    with pytest.raises(OSError) as e:
        (dst.mnt / ".spill" / "slots").write_bytes(b"x")
    assert e.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def completed_from_the_spill_alone(s: Server, src: Mount, dst: Mount,
                                   vm: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """The serve says so, the files are complete and equal to the source's at the suspend."""
    rc, out = s.finish(timeout=timeout)
    assert rc == 0 and "completed from the spill area alone" in out, out
    vm.kill()
    vm.wait()
    st = state(dst)
    assert st is not None and st["status"] == "complete", st
    assert digest(dst.mnt / "vm.mem") == digest(src.backing / "vm.mem")
    assert digest(dst.mnt / "disk.raw") == digest(src.backing / "disk.raw")


def test_forged_slots_with_the_source_gone_are_missing_never_installed(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server], tmp_path: Path,
        vm: subprocess.Popen[bytes]) -> None:
    """The source is gone after "spill flushed" and someone forged every slot: with no one
    else to ask, the pages are missing (reads fail with EIO), never the forgery; it was
    "completed from the spill area alone" with 258 wrong blocks before the MACs."""
    src, dst = hosts
    spill = tmp_path / "spill"
    s = Server(dst, key, "--resume-cmd", stop_dest_on_resume(), "--io-timeout", "3")
    servers.append(s)
    m = Migration(src, s.port, key, vm.pid, "--spill", str(spill), "--spill-bandwidth", "50")
    try:
        m.wait_spill_flushed()
    finally:
        m.kill9()
    try:
        forged = tamper_with_slots(spill, "forge")
    finally:
        os.kill(s.proc.pid, signal.SIGCONT)
    assert forged > 0
    rc, out = s.finish(timeout=60)
    assert rc == 1 and "missing" in out and "completed from the spill area alone" not in out, out
    vm.kill()
    vm.wait()
    st = state(dst)
    assert st is not None and st["status"] != "complete", st
    r = subprocess.run([sys.executable, "-m", "blkfs.cli", "spill", str(dst.mnt)],
                       capture_output=True, text=True, check=True)
    refused = re.search(r"(\d+) forged; (\d+) missing", r.stdout)
    assert refused and int(refused[1]) >= forged == int(refused[2]), r.stdout
    assert "ENDED without" in r.stdout and "PAUSED" not in r.stdout, r.stdout
    fd = os.open(dst.mnt / "vm.mem", os.O_RDONLY)
    try:
        bad = [b for b in range(24 * 16) if _read_fails(fd, b)]
        assert len(bad) == forged, (bad, forged)
        good = [b for b in range(24 * 16) if b not in set(bad)]
        for b in good:
            assert FORGED not in os.pread(fd, BS, b * BS)
    finally:
        os.close(fd)


def test_source_killed_before_spill_flush_dest_waits_then_gives_up_on_request(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server], tmp_path: Path,
        vm: subprocess.Popen[bytes]) -> None:
    """The source died before every page was in the spill area. Nothing says those pages will
    never come, so their readers wait (post-copy is paused, and says so) and the mount will
    not unmount; once a person gives them up, they are errors, never zeros or stale bytes."""
    src, dst = hosts
    s = Server(dst, key, "--resume-cmd", stop_dest_on_resume(), "--io-timeout", "3")
    servers.append(s)
    # 2 slots and a frozen destination: the source cannot get every page into the spill.
    m = Migration(src, s.port, key, vm.pid, "--spill", str(tmp_path / "spill"),
                  "--spill-slots", "2")
    wait_for(lambda: stopped(s.proc.pid), 60, "the destination to resume (and stop itself)")
    m.kill9()
    os.kill(s.proc.pid, signal.SIGCONT)
    rc, out = s.finish(timeout=60)
    assert rc == 1 and "post-copy paused" in out and "--give-up" in out, out
    st = state(dst)
    assert st is not None and st["owner"] and st["status"] == "running", st
    info = json.loads(subprocess.run([sys.executable, "-m", "blkfs.cli", "status",
                                      str(dst.mnt), "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    waiting = info["postcopy_absent"]
    assert waiting > 0 and info["postcopy_paused"] and info["postcopy_missing"] == 0, info
    r = subprocess.run([sys.executable, "-m", "blkfs.cli", "umount", str(dst.mnt)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "still waits for" in r.stderr and "--force" in r.stderr, r
    assert dst.mounted()
    r = subprocess.run([sys.executable, "-m", "blkfs.cli", "spill", str(dst.mnt), "--give-up"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and f"gave up {waiting} absent blocks" in r.stdout, r
    spill = json.loads(subprocess.run([sys.executable, "-m", "blkfs.cli", "spill",
                                       str(dst.mnt), "--json"], capture_output=True, text=True,
                                      check=True).stdout)
    assert spill["postcopy"]["missing_count"] == waiting
    # Never zeros or stale bytes: a missing page is an error; everything else is served.
    fd = os.open(dst.mnt / "vm.mem", os.O_RDONLY)
    try:
        missing = [b for b in range(24 * 16) if _read_fails(fd, b)]
        assert len(missing) == waiting or missing, missing
        present = next(b for b in range(24 * 16) if b not in set(missing))
        assert os.pread(fd, 4096, present * BS) == \
            (src.backing / "vm.mem").read_bytes()[present * BS:present * BS + 4096]
    finally:
        os.close(fd)
    assert digest(dst.mnt / "disk.raw") == digest(src.backing / "disk.raw")
    vm.kill()
    vm.wait()


def _read_fails(fd: int, block: int) -> bool:
    try:
        os.pread(fd, 4096, block * BS)
    except OSError as e:
        assert e.errno == errno.EIO
        return True
    return False


@pytest.mark.cache
@pytest.mark.parametrize("how", ["flip", "forge"])
def test_corrupted_spill_slot_is_refused_and_fetched(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server], tmp_path: Path,
        vm: subprocess.Popen[bytes], how: str) -> None:
    """A flipped byte fails the hash; a forged page (other data, its xxh3 in the header:
    what anyone who can write the shared area can do) fails the MAC. Neither is installed."""
    src, dst = hosts
    spill = tmp_path / "spill"
    s = Server(dst, key, "--resume-cmd", stop_dest_on_resume())
    servers.append(s)
    report = tmp_path / "report.json"
    m = Migration(src, s.port, key, vm.pid, "--spill", str(spill), "--spill-bandwidth", "50",
                  "--report", str(report))
    try:
        m.wait_spill_flushed()
        tamper_with_slots(spill, how)
    finally:
        os.kill(s.proc.pid, signal.SIGCONT)
    rc, out = m.finish()
    assert rc == 0, out
    rc, sout = s.finish()
    assert rc == 0 and "complete and verified" in sout, sout
    assert digest(dst.mnt / "vm.mem") == digest(src.mnt / "vm.mem")
    rep = json.loads(report.read_text())
    pc = rep["postcopy"]
    refused = pc["hash_mismatches"] if how == "flip" else pc["mac_mismatches"]
    assert refused > 0 and pc["pages_via_demand_fetch"] > 0, rep
    assert (pc["pages_via_spill"] + pc["pages_via_drain"] + pc["pages_via_demand_fetch"]
            == rep["postcopy_pages"])


@pytest.mark.cache
def test_few_slots_carry_many_pages(hosts: tuple[Mount, Mount], key: Path,
                                    servers: list[Server], tmp_path: Path,
                                    vm: subprocess.Popen[bytes]) -> None:
    """N = 4 slots for ~100 pages: freed slots are reused at once, under new generations."""
    src, dst = hosts
    s = Server(dst, key)
    servers.append(s)
    report = tmp_path / "report.json"
    m = Migration(src, s.port, key, vm.pid, "--spill", str(tmp_path / "spill"),
                  "--spill-slots", "4", "--report", str(report))
    rc, out = m.finish()
    assert rc == 0, out
    assert s.finish()[0] == 0
    rep = json.loads(report.read_text())
    assert rep["pages_spilled"] > 4 and rep["slot_reuses"] == rep["pages_spilled"] - 4, rep
    assert rep["postcopy"]["generation_mismatches"] == 0 and rep["verified"]
    assert rep["postcopy"]["hash_mismatches"] == 0  # the daemon checks the MACs with its key
    assert rep["postcopy"]["mac_mismatches"] == 0
    assert digest(dst.mnt / "vm.mem") == digest(src.mnt / "vm.mem")
    assert list((tmp_path / "spill").iterdir()) == []  # (done: the source removed its area)


def test_postcopy_with_nothing_left_to_move_commits_plainly(freeze_hosts: tuple[Mount, Mount],
                                                           key: Path, servers: list[Server],
                                                           tmp_path: Path) -> None:
    src, dst = freeze_hosts
    (src.mnt / "disk.raw").write_bytes(os.urandom(1 << 20))
    (src.mnt / "vm.mem").write_bytes(os.urandom(1 << 20))
    s = Server(dst, key)
    servers.append(s)
    report = tmp_path / "report.json"
    r = subprocess.run([*MIGRATOR, "migrate", "--mount", str(src.mnt), "--to",
                        f"127.0.0.1:{s.port}", "--key-file", str(key), "--postcopy", "--spill",
                        str(tmp_path / "spill"), "--report", str(report), "disk.raw", "vm.mem"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert s.finish()[0] == 0
    rep = json.loads(report.read_text())
    assert rep["verified"] and rep["postcopy_pages"] == 0
    assert digest(dst.mnt / "vm.mem") == digest(src.mnt / "vm.mem")
    subprocess.run([sys.executable, "-m", "blkfs.cli", "thaw", str(src.mnt)], check=True,
                   capture_output=True)


def test_two_vms_post_copied_at_once_into_one_mount(hosts: tuple[Mount, Mount], key: Path,
                                                     servers: list[Server],
                                                     tmp_path: Path) -> None:
    """(issue 25) vm1 and vm2 go post-copy at once, into one mount through one serve, with one
    --spill DIR: each area is a directory of its own there, each post-copy its own in the
    daemon. vm1's is held open (its resume hook waits, lazy mode on, its memory absent) while
    vm2's goes all the way; then vm1's completes. Both copies equal their sources at their
    suspend points, and both areas are gone at the end."""
    src, dst = hosts
    vms = {}
    for name in ("vm1", "vm2"):
        d = src.mnt / name
        d.mkdir()
        subprocess.run([*SIMVM, "create", str(d), "--disk-size", "4M", "--mem-size", "16M",
                        "--unit", "65536", "--seed", name[-1]], check=True, capture_output=True)
        vms[name] = subprocess.Popen([*SIMVM, "run", str(d), "--rate", "40", "--hot-fraction",
                                      "0.5"], stdout=subprocess.DEVNULL)
    held, release = tmp_path / "held", tmp_path / "release"
    s = Server(dst, key, "--resume-cmd", f'[ "$MIGRATOR_VM" != vm1 ] || {{ touch {held}; '
               f'{hold_until(release, 60)}; }}', once=False)
    servers.append(s)
    spill = tmp_path / "spill"
    procs = {}

    def start(name: str, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*MIGRATOR, "migrate", f"{name}/disk.raw", f"{name}/vm.mem", "--mount",
             str(src.mnt), "--to", f"127.0.0.1:{s.port}", "--key-file", str(key),
             "--suspend", f"pid:{vms[name].pid}", "--postcopy=on", "--spill", str(spill),
             "--warm-set", "0", "--report", str(tmp_path / f"{name}.json"), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    try:
        time.sleep(0.5)  # (the VMs have written: there is memory to post-copy)
        procs["vm1"] = start("vm1", "--spill-bandwidth", "4")
        wait_for(held.exists, 60, "vm1's post-copy begun, its resume held")
        os.kill(procs["vm1"].pid, signal.SIGSTOP)  # its pages stay absent meanwhile
        try:
            procs["vm2"] = start("vm2")
            out, err = procs["vm2"].communicate(timeout=120)
            assert procs["vm2"].returncode == 0, out + err
            info = json.loads(subprocess.run(
                [sys.executable, "-m", "blkfs.cli", "status", str(dst.mnt), "--json"],
                capture_output=True, text=True, check=True).stdout)
            assert info["postcopy_absent"] > 0, info  # vm1's memory, still to come
        finally:
            os.kill(procs["vm1"].pid, signal.SIGCONT)
        release.touch()
        out, err = procs["vm1"].communicate(timeout=120)
        assert procs["vm1"].returncode == 0, out + err
    finally:
        release.touch()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        for vm in vms.values():
            if vm.poll() is None:
                vm.kill()
            vm.wait()
    for name in vms:
        rep = json.loads((tmp_path / f"{name}.json").read_text())
        assert rep["verified"] and rep["postcopy_pages"] > 0, rep
        for f in ("disk.raw", "vm.mem"):  # (the source as it was at its suspend: retired)
            assert digest(dst.mnt / name / f) == digest(src.backing / name / f), (name, f)
    assert list(spill.iterdir()) == []
