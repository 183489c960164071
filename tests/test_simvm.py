"""The simulated VM: it writes as asked, and its checker catches every kind of damage."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migrator import simvm
from migrator.simvm import DISK, MEM, PAGE, SimVMError

ROOT = Path(__file__).resolve().parents[1]
UNIT = 4096


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migrator.simvm", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


def spawn(*args: str, stdout: int = subprocess.DEVNULL) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "migrator.simvm", *args],
        stdout=stdout,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )


def one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> str:
    assert r.returncode != 0, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def wait_writes(d: Path, at_least: int, timeout: float = 10) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        n = simvm.read_header(d).total_writes
        if n >= at_least:
            return n
        time.sleep(0.01)
    raise AssertionError(f"the VM did not reach {at_least} writes")


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_last(d: Path, file_id: int, unit: int) -> None:
    patch(d / "vm.mem", simvm.OFF_LAST, struct.pack("<IQ", file_id, unit))


def set_ledger(d: Path, h: simvm.Header, file_id: int, unit: int, version: int) -> None:
    patch(d / "vm.mem", PAGE + 4 * h.ledger_index(file_id, unit), struct.pack("<I", version))


def set_total(d: Path, total: int) -> None:
    patch(d / "vm.mem", simvm.OFF_TOTAL, struct.pack("<Q", total))


def write_unit(d: Path, h: simvm.Header, file_id: int, unit: int, content: bytes) -> None:
    name = "disk.raw" if file_id == DISK else "vm.mem"
    patch(d / name, h.offset(file_id, unit), content)


def copy_vm(src: Path, dst: Path) -> None:
    dst.mkdir()
    for name in ("disk.raw", "vm.mem"):
        shutil.copyfile(src / name, dst / name)


@pytest.fixture
def vm(tmp_path: Path) -> Path:
    """A VM that ran briefly: hot units at high versions, many units never written."""
    d = tmp_path / "vm"
    d.mkdir()
    simvm.create(d, disk_size=4 << 20, mem_size=2 << 20)
    assert simvm.run(d, rate_mb_s=0, seconds=0.03) > 0
    assert simvm.check(d).ok
    return d


def pick(d: Path, file_id: int, *, min_version: int = 0, max_version: int = 2**32) -> int:
    """A unit of the file with a version in range that is not the most recent write."""
    h, ledger = simvm.read_ledger(d)
    base = h.ledger_index(file_id, 0)
    for u in range(h.units(file_id)):
        if min_version <= ledger[base + u] <= max_version and (file_id, u) != (
            h.last_file,
            h.last_unit,
        ):
            return u
    raise AssertionError(f"no unit of file {file_id} with version in {min_version}..{max_version}")


def version(d: Path, file_id: int, unit: int) -> int:
    h, ledger = simvm.read_ledger(d)
    return ledger[h.ledger_index(file_id, unit)]


# --- running, stopping, copying, resuming -----------------------------------------------------


def test_run_writes_at_rate_with_hot_skew(tmp_path: Path) -> None:
    r = cli("create", str(tmp_path), "--disk-size", "4M", "--mem-size", "2M", "--seed", "7")
    assert r.returncode == 0, r.stderr
    r = cli("run", str(tmp_path), "--rate", "8", "--seconds", "1")
    assert r.returncode == 0, r.stderr
    writes = int(r.stdout.split()[0])
    assert 1500 <= writes <= 2200  # 8 MiB/s of 4 KiB units for 1 s = 2048
    r = cli("check", str(tmp_path), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert res["ok"] and res["errors"] == [] and res["in_flight"] == 0
    assert res["written_units"] > 0 and res["total_writes"] == writes and res["generation"] == 1

    h, ledger = simvm.read_ledger(tmp_path)
    assert sum(ledger) == writes
    hot = 0
    for f in (DISK, MEM):
        base = h.ledger_index(f, 0)
        hot += sum(ledger[base + u] for u in simvm.hot_units(7, f, h.units(f), 0.1))
    # Picks from the hot set, plus the uniform picks that land in it anyway.
    expected = 0.9 + 0.1 * 0.1
    assert abs(hot / writes - expected) < 0.04, hot / writes
    # Disk and memory get writes in proportion to their sizes.
    disk_share = sum(ledger[: h.disk_units]) / writes
    assert abs(disk_share - h.disk_units / (h.disk_units + h.mem_units)) < 0.05


def wait_stopped(pid: int) -> None:
    """SIGSTOP lands asynchronously: wait until the process shows state T."""
    end = time.monotonic() + 5
    while time.monotonic() < end:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(") ", 1)[1].startswith("T"):
                return
        time.sleep(0.0005)
    raise AssertionError("the VM did not stop")


def test_copy_while_stopped_is_consistent_and_resumes(tmp_path: Path) -> None:
    """Many stops at random points of the write sequence: every copy must check out."""
    src = tmp_path / "src"
    src.mkdir()
    simvm.create(src, disk_size=1 << 20, mem_size=1 << 20)
    p = spawn("run", str(src), "--rate", "0")
    results: list[simvm.CheckResult] = []
    try:
        wait_writes(src, 1000)
        for i in range(60):
            time.sleep(0.002)
            os.kill(p.pid, signal.SIGSTOP)
            wait_stopped(p.pid)
            copy = tmp_path / f"copy{i}"
            copy_vm(src, copy)
            results.append(simvm.check(copy))
            if i < 59:
                os.kill(p.pid, signal.SIGCONT)
                shutil.rmtree(copy)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    for res in results:
        assert res.ok, res.errors
        assert res.in_flight in (0, 1) and res.generation == 1 and res.written_units > 0
    assert results[-1].total_writes > results[0].total_writes

    dst = tmp_path / "copy59"
    before = results[-1]
    r = cli("run", str(dst), "--rate", "8", "--seconds", "0.5", "--resume")
    assert r.returncode == 0, r.stderr
    res = simvm.check(dst)
    assert res.ok, res.errors
    assert res.generation == before.generation + 1
    assert res.total_writes > before.total_writes and res.in_flight == 0


def test_sigterm_ends_cleanly(tmp_path: Path) -> None:
    simvm.create(tmp_path, disk_size=1 << 20, mem_size=1 << 20)
    p = spawn("run", str(tmp_path), "--rate", "4", stdout=subprocess.PIPE)
    try:
        wait_writes(tmp_path, 50)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=10)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0
    res = simvm.check(tmp_path)
    assert res.ok and res.in_flight == 0
    assert int(out.split()[0]) == res.total_writes


def test_run_refuses_a_vm_that_already_ran(vm: Path) -> None:
    with pytest.raises(SimVMError, match="--resume"):
        simvm.run(vm, rate_mb_s=1, seconds=0.1)
    one_line_error(cli("run", str(vm), "--rate", "1", "--seconds", "0.1"), "already ran")


def test_unit_larger_than_a_page(tmp_path: Path) -> None:
    h = simvm.create(tmp_path, disk_size=1 << 20, mem_size=1 << 20, unit=64 << 10)
    assert h.data_start % (64 << 10) == 0 and h.mem_units >= 1
    assert simvm.run(tmp_path, rate_mb_s=0, seconds=0.05) > 0
    res = simvm.check(tmp_path)
    assert res.ok, res.errors


# --- the in-flight write -----------------------------------------------------------------------


def test_one_write_ahead_of_the_ledger_is_in_flight(vm: Path) -> None:
    h = simvm.read_header(vm)
    u = pick(vm, DISK, min_version=1)
    v = version(vm, DISK, u)
    write_unit(vm, h, DISK, u, simvm.unit_content(DISK, u, v + 1, h.generation, UNIT))
    res = simvm.check(vm)
    assert not res.ok and f"disk.raw unit {u} " in res.errors[0]
    assert "not the most recent write" in res.errors[0]

    set_last(vm, DISK, u)
    res = simvm.check(vm)
    assert res.ok and res.in_flight == 1, res.errors

    # Resuming completes it: the ledger catches up and nothing is in flight any more.
    simvm.run(vm, rate_mb_s=1, seconds=0.05, resume=True)
    res = simvm.check(vm)
    assert res.ok and res.in_flight == 0, res.errors
    assert version(vm, DISK, u) >= v + 1


def test_torn_memory_write_is_in_flight_and_resume_completes_it(vm: Path) -> None:
    h = simvm.read_header(vm)
    u = pick(vm, MEM, min_version=1)
    v = version(vm, MEM, u)
    old = simvm.unit_content(MEM, u, v, 1, UNIT)
    new = simvm.unit_content(MEM, u, v + 1, h.generation, UNIT)
    torn = bytes(old[:32]) + new[32:1000] + old[1000:]  # stamp last: it still says v
    write_unit(vm, h, MEM, u, torn)
    assert not simvm.check(vm).ok
    set_last(vm, MEM, u)
    res = simvm.check(vm)
    assert res.ok and res.in_flight == 1, res.errors

    simvm.run(vm, rate_mb_s=1, seconds=0.05, resume=True)
    res = simvm.check(vm)
    assert res.ok and res.in_flight == 0, res.errors
    assert version(vm, MEM, u) >= v + 1


def test_ledger_one_ahead_of_the_count_is_in_flight(vm: Path) -> None:
    total = simvm.read_header(vm).total_writes
    set_total(vm, total - 1)
    res = simvm.check(vm)
    assert res.ok and res.in_flight == 1, res.errors
    set_total(vm, total - 2)
    res = simvm.check(vm)
    assert not res.ok and "the ledger counts" in res.errors[0]


def test_in_flight_write_and_ledger_ahead_at_once_fails(vm: Path) -> None:
    h = simvm.read_header(vm)
    u = pick(vm, DISK, min_version=1)
    v = version(vm, DISK, u)
    write_unit(vm, h, DISK, u, simvm.unit_content(DISK, u, v + 1, h.generation, UNIT))
    set_last(vm, DISK, u)
    set_total(vm, h.total_writes - 1)
    assert not simvm.check(vm).ok


# --- damage the checker must catch -------------------------------------------------------------


def test_flipped_byte(vm: Path) -> None:
    h = simvm.read_header(vm)
    u = pick(vm, DISK, min_version=1)
    off = h.offset(DISK, u) + 1234
    with open(vm / "disk.raw", "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x40]))
    res = simvm.check(vm)
    assert not res.ok and res.error_count == 1
    assert f"disk.raw unit {u} " in res.errors[0] and "byte 1234" in res.errors[0]
    r = cli("check", str(vm))
    one_line_error(r, "disk.raw", f"unit {u} ")
    assert r.returncode == 1


def test_flipped_stamp_byte_in_memory(vm: Path) -> None:
    h = simvm.read_header(vm)
    u = pick(vm, MEM, min_version=1)
    patch(vm / "vm.mem", h.offset(MEM, u) + 9, b"\x07")  # file_id
    res = simvm.check(vm)
    assert not res.ok and f"vm.mem unit {u} " in res.errors[0], res.errors


def test_old_version_written_back(vm: Path) -> None:
    h = simvm.read_header(vm)
    u = pick(vm, DISK, min_version=2)
    v = version(vm, DISK, u)
    write_unit(vm, h, DISK, u, simvm.unit_content(DISK, u, v - 1, 1, UNIT))
    res = simvm.check(vm)
    assert not res.ok
    assert f"disk.raw unit {u} " in res.errors[0] and f"version {v - 1}" in res.errors[0]


def test_lost_write(vm: Path) -> None:
    """The ledger says v5, the disk holds v3 (and the counts agree, so only the unit tells)."""
    h = simvm.read_header(vm)
    u = pick(vm, DISK, max_version=0)
    write_unit(vm, h, DISK, u, simvm.unit_content(DISK, u, 3, 1, UNIT))
    set_ledger(vm, h, DISK, u, 5)
    set_total(vm, h.total_writes + 5)
    res = simvm.check(vm)
    assert not res.ok and res.error_count == 1
    assert f"disk.raw unit {u} " in res.errors[0]
    assert "version 3" in res.errors[0] and "says 5" in res.errors[0]


def test_lost_write_left_zeros(vm: Path) -> None:
    h = simvm.read_header(vm)
    u = pick(vm, MEM, min_version=1)
    write_unit(vm, h, MEM, u, bytes(UNIT))
    res = simvm.check(vm)
    assert not res.ok and f"vm.mem unit {u} " in res.errors[0] and "zeros" in res.errors[0]


@pytest.mark.parametrize("file_id", [DISK, MEM])
def test_unwritten_unit_not_zero(vm: Path, file_id: int) -> None:
    h = simvm.read_header(vm)
    u = pick(vm, file_id, max_version=0)
    patch(vm / ("disk.raw" if file_id == DISK else "vm.mem"), h.offset(file_id, u) + 4000, b"x")
    res = simvm.check(vm)
    assert not res.ok and "never written" in res.errors[0]
    assert f"unit {u} " in res.errors[0]


def test_misplaced_unit(vm: Path) -> None:
    h = simvm.read_header(vm)
    u = pick(vm, DISK, min_version=1)
    w = pick(vm, DISK, max_version=0)
    with open(vm / "disk.raw", "rb") as f:
        f.seek(h.offset(DISK, u))
        data = f.read(UNIT)
    write_unit(vm, h, DISK, w, data)
    res = simvm.check(vm)
    assert not res.ok and f"disk.raw unit {w} " in res.errors[0]


def test_short_file(vm: Path) -> None:
    os.truncate(vm / "disk.raw", 1 << 20)
    res = simvm.check(vm)
    assert not res.ok and "disk.raw is 1048576 bytes, expected 4194304" in res.errors


def test_errors_are_capped(vm: Path) -> None:
    h = simvm.read_header(vm)
    patch(vm / "disk.raw", 0, b"\x55" * h.disk_size)
    res = simvm.check(vm)
    assert not res.ok and len(res.errors) == simvm.MAX_ERRORS
    assert res.error_count == h.disk_units


# --- bad input ----------------------------------------------------------------------------------


def test_mem_size_too_small(tmp_path: Path) -> None:
    with pytest.raises(SimVMError, match="too small") as e:
        simvm.create(tmp_path, disk_size=64 << 20, mem_size=64 << 10)
    assert "use at least" in str(e.value)
    assert not (tmp_path / "disk.raw").exists()
    r = cli("create", str(tmp_path), "--disk-size", "64M", "--mem-size", "8K")
    one_line_error(r, "mem size 8192 is too small", "use at least")
    # The size it suggests does fit.
    need = int(r.stderr.split("use at least ")[1].split()[0])
    simvm.create(tmp_path, disk_size=64 << 20, mem_size=need)


def test_resume_without_magic(vm: Path) -> None:
    patch(vm / "vm.mem", 0, bytes(8))
    with pytest.raises(SimVMError, match=r"holds no simulated VM state.*was it migrated\?"):
        simvm.run(vm, rate_mb_s=1, seconds=0.1, resume=True)
    with pytest.raises(SimVMError, match="no simulated VM state"):
        simvm.check(vm)
    one_line_error(cli("run", str(vm), "--rate", "1", "--resume"), "no simulated VM state")
    one_line_error(cli("check", str(vm)), "no simulated VM state")


def test_create_refuses_existing_files(vm: Path) -> None:
    one_line_error(
        cli("create", str(vm), "--disk-size", "1M", "--mem-size", "1M"), "already exists"
    )
    r = cli("create", str(vm), "--disk-size", "1M", "--mem-size", "1M", "--force")
    assert r.returncode == 0, r.stderr
    assert simvm.read_header(vm).total_writes == 0


@pytest.mark.parametrize(
    "args",
    [
        ["create", "{d}", "--disk-size", "12Q", "--mem-size", "1M"],
        ["create", "{d}", "--disk-size", "1M", "--mem-size", "1M", "--unit", "1000"],
        ["create", "{d}", "--disk-size", "1000", "--mem-size", "1M"],
        ["create", "{d}/nowhere", "--disk-size", "1M", "--mem-size", "1M"],
        ["run", "{d}", "--rate", "-1"],
        ["run", "{d}", "--rate", "1", "--hot-share", "2"],
        ["run", "{d}", "--rate", "1", "--seconds", "0"],
        ["run", "{d}/nowhere", "--rate", "1"],
        ["check", "{d}/nowhere"],
        ["frobnicate"],
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args: list[str]) -> None:
    one_line_error(cli(*[a.format(d=tmp_path) for a in args]))


def test_content_is_a_pure_function() -> None:
    a = simvm.unit_content(DISK, 5, 3, 2, UNIT)
    assert a == simvm.unit_content(DISK, 5, 3, 2, UNIT) and len(a) == UNIT
    assert a[32:] != simvm.unit_content(DISK, 5, 4, 2, UNIT)[32:]
    assert a[32:] != simvm.unit_content(MEM, 5, 3, 2, UNIT)[32:]
    assert simvm.unit_content(MEM, 1, 0, 1, UNIT) == bytes(UNIT)
    hot = simvm.hot_units(3, DISK, 1000, 0.1)
    assert hot == simvm.hot_units(3, DISK, 1000, 0.1) and len(set(hot)) == 100
    assert hot != simvm.hot_units(4, DISK, 1000, 0.1)
