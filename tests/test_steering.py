"""`migrator set` and `migrator cancel`: a running migration steered through its control
socket, as a person would (real mounts, real processes)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    vm_records,
    wait_for,
    wait_mid_copy,
    wait_writing,
)

pytestmark = pytest.mark.mount


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`migrator ARGS`, run in this process (no interpreter start to wait for): its exit
    status and what it printed."""
    import contextlib
    import io

    from migrator.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as exc:  # (argparse)
            rc = int(exc.code or 0)
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


def start(src: Mount, port: int, key: Path, vm: subprocess.Popen[bytes], tmp_path: Path,
          *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*MIGRATOR, "migrate", "disk.raw", "vm.mem", "--mount", str(src.mnt),
                             "--to", f"127.0.0.1:{port}", "--key-file", str(key), "--suspend",
                             f"pid:{vm.pid}", "--status-file", str(tmp_path / "status.json"),
                             "--report", str(tmp_path / "report.json"), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def running(proc: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """A migrate process that is never left behind, whatever the test asserts."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture
def busy_vm(hosts: tuple[Mount, Mount]) -> Iterator[subprocess.Popen[bytes]]:
    """A simulated VM writing 5 MiB/s into its disk and memory on the source mount: under a
    2 MB/s cap (NEVER) its rounds never meet a target of a microsecond."""
    src = hosts[0]
    subprocess.run([*SIMVM, "create", str(src.mnt), "--disk-size", "2M", "--mem-size", "2M",
                    "--unit", "65536"], check=True, capture_output=True)
    vm = subprocess.Popen([*SIMVM, "run", str(src.mnt), "--rate", "5"],
                          stdout=subprocess.DEVNULL)
    try:
        wait_writing(src, vm, 1)
        yield vm
    finally:
        if vm.poll() is None:
            vm.kill()
        vm.wait()


def check_vm(dst: Mount) -> None:
    chk = subprocess.run([*SIMVM, "check", str(dst.mnt)], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr


def fill(src: Mount, mib: int) -> dict[str, str]:
    for name, size in (("disk.raw", mib << 20), ("vm.mem", 2 << 20)):
        (src.mnt / name).write_bytes(os.urandom(size))
    return {n: digest(src.mnt / n) for n in ("disk.raw", "vm.mem")}


def test_set_lifts_the_cap_of_a_running_migration(hosts: tuple[Mount, Mount], key: Path,
                                                  servers: list[Server], tmp_path: Path,
                                                  idle_vm: subprocess.Popen[bytes]) -> None:
    src, dst = hosts
    before = fill(src, 48)
    s = Server(dst, key)
    servers.append(s)
    r = cli("set", "--bandwidth", "none")
    assert r.returncode == 1 and "no running migration" in r.stderr, r.stderr
    # (6 s at 8 MB/s)
    with running(start(src, s.port, key, idle_vm, tmp_path, "--bandwidth", "8")) as m:
        wait_mid_copy(tmp_path / "status.json", m, sent=1e6)
        assert read_json(tmp_path / "status.json")["bandwidth_cap_mb_s"] == 8
        # (issue 26) the initial copy is counted as it goes: blocks sent, what is left
        wait_for(lambda: read_json(tmp_path / "status.json").get("blocks_sent", 0) > 0, 30)
        st = read_json(tmp_path / "status.json")
        assert 0 < st["remaining_bytes"] < st["data_bytes"], st
        # (50 MiB at 8 MB/s: about 6 s in all; what is left of it, at the rate so far)
        assert 0 < st["initial_copy_eta_s"] < 30, st  # type: ignore[operator]
        line = cli("status").stdout
        assert " remaining, " in line and "initial copy done in ~" in line, line
        r = cli("set", "--bandwidth", "fast")
        assert r.returncode == 2 and "fast" in r.stderr
        r = cli("set", str(m.pid), "--bandwidth", "none")
        assert r.returncode == 0, r.stderr
        assert "bandwidth cap 8 MB/s -> none" in r.stdout, r.stdout
        wait_for(lambda: read_json(tmp_path / "status.json").get("bandwidth_cap_mb_s", 8)
                 is None or m.poll() is not None, 10, "the cap lifted")
        _, err = m.communicate(timeout=30)  # the rest at full speed
    assert m.returncode == 0, err
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["verified"] and [c for _, c in rep["bandwidth_steps"]] == [None], rep
    for n, d in before.items():
        assert digest(dst.mnt / n) == d


def test_cancel_before_the_commit_and_past_it(hosts: tuple[Mount, Mount], key: Path,
                                              servers: list[Server], tmp_path: Path,
                                              idle_vm: subprocess.Popen[bytes]) -> None:
    """Before its Commit: stopped, the VM runs on here, its files as they were. Past it (held
    in the destination's resume hook): refused, the migration finishes."""
    src, dst = hosts
    before = fill(src, 24)
    held, release = tmp_path / "held", tmp_path / "release"
    s = Server(dst, key, "--resume-cmd", f"touch {held}; {hold_until(release, 60)}",
               once=False)
    servers.append(s)
    with running(start(src, s.port, key, idle_vm, tmp_path, "--bandwidth", "4")) as m:
        wait_mid_copy(tmp_path / "status.json", m, sent=1e6)
        r = cli("cancel")
        assert r.returncode == 0 and "before its Commit, its VM runs on here" in r.stdout, r
        _, err = m.communicate(timeout=30)
    assert m.returncode == 1
    assert err.strip().splitlines()[-1] == (
        "migrator: error: cancelled ('migrator cancel', or its evacuation stopped)"), err
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["status"] == "failed" and rep["error"].startswith("cancelled"), rep
    assert not stopped(idle_vm.pid) and idle_vm.poll() is None
    for n, d in before.items():
        assert digest(src.mnt / n) == d
    assert {r["name"]: r["role"] for r in vm_records(src)}.popitem()[1] == "owner"
    # Past its Commit: it finishes
    try:
        with running(start(src, s.port, key, idle_vm, tmp_path)) as m:
            wait_for(held.exists, 60, "the resume hook")
            r = cli("cancel")
            assert r.returncode == 1 and "is past its Commit and finishes" in r.stdout, r
            release.touch()
            _, err = m.communicate(timeout=60)
    finally:
        release.touch()
    assert m.returncode == 0, err
    for n, d in before.items():
        assert digest(dst.mnt / n) == d


def test_a_held_migration_sends_nothing_until_its_go(hosts: tuple[Mount, Mount], key: Path,
                                                     servers: list[Server], tmp_path: Path,
                                                     idle_vm: subprocess.Popen[bytes]) -> None:
    """--hold (evacuate's next migration, ready): it waits, connected to nothing, until a
    'go' names where and how fast; cancelled while held, it sent nothing and the VM runs on."""
    src, dst = hosts
    before = fill(src, 4)
    s = Server(dst, key, once=False)
    servers.append(s)
    status = tmp_path / "status.json"
    # (port 1: nothing listens there)
    with running(start(src, 1, key, idle_vm, tmp_path, "--hold")) as m:
        wait_for(lambda: read_json(status).get("phase") == "held", 30, "held")
        assert "held" in cli("status").stdout
        r = cli("go", "--to", "nowhere")
        assert r.returncode == 1 and "bad address" in r.stderr, r.stderr
        r = cli("cancel")
        assert r.returncode == 0, r.stderr
        _, err = m.communicate(timeout=30)
    assert m.returncode == 1 and "while held: nothing was sent, the VM runs here" in err, err
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "failed"
    assert state(dst) is None and os.listdir(dst.mnt) == []
    assert not stopped(idle_vm.pid) and idle_vm.poll() is None
    # Held again, then sent on its way to the real port, capped: it completes.
    status.unlink()  # (the last status stays there: the first one's, held)
    with running(start(src, 1, key, idle_vm, tmp_path, "--hold")) as m:
        wait_for(lambda: read_json(status).get("phase") == "held", 30, "held")
        r = cli("go", "--to", f"127.0.0.1:{s.port}", "--bandwidth", "50")
        assert r.returncode == 0 and f"sets out to 127.0.0.1:{s.port}" in r.stdout, r
        r = cli("go")
        assert r.returncode == 1 and (  # it runs already (or it is done: 4 MiB at 50 MB/s)
            "not held" in r.stderr or "no running migration" in r.stderr), r
        _, err = m.communicate(timeout=60)
    assert m.returncode == 0, err
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["verified"] and rep["bandwidth_steps"] == [], rep
    assert read_json(status)["bandwidth_cap_mb_s"] == 50
    for n, d in before.items():
        assert digest(dst.mnt / n) == d


def test_a_migration_that_ends_as_it_is_asked_is_an_oserror(tmp_path: Path) -> None:
    """steer's callers (evacuate's ticks, its stop) catch OSError: a socket that closes
    mid-request was a trio.BrokenResourceError, and it ended an evacuation under load with
    VMs still running."""
    import socket as so
    import threading

    import trio

    from migrator.steering import steer

    path = str(tmp_path / "m.sock")
    srv = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def hang_up() -> None:
        conn, _ = srv.accept()
        conn.setsockopt(so.SOL_SOCKET, so.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # (a reset: the request's send or the read breaks)

    t = threading.Thread(target=hang_up)
    t.start()
    try:
        with pytest.raises(OSError):
            trio.run(steer, path, b'{"op": "cancel"}\n' * 100000, 5.0)
    finally:
        t.join()
        srv.close()


NEVER = ("--downtime-ms", "0.001", "--max-throttle", "0", "--converge-timeout", "600",
         "--bandwidth", "2")


def test_set_downtime_lets_rounds_that_never_met_their_target_switch_over(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server], tmp_path: Path,
        busy_vm: subprocess.Popen[bytes]) -> None:
    """(virsh migrate-setmaxdowntime) A target no round meets, then `migrator set --downtime`:
    the rounds switch over by the new one, shown in the status and the report."""
    src, dst = hosts
    s = Server(dst, key)
    servers.append(s)
    status = tmp_path / "status.json"
    with running(start(src, s.port, key, busy_vm, tmp_path, *NEVER)) as m:
        wait_for(lambda: read_json(status).get("round", 0) >= 3, 60, "three rounds")  # type: ignore[operator]
        st = read_json(status)
        assert st["downtime_target_ms"] == 0.001 and st["phase"] == "dirty rounds", st
        r = cli("set", "--downtime", "0")
        assert r.returncode == 2 and "'0' is not a positive number" in r.stderr, r.stderr
        r = cli("set")
        assert r.returncode == 1 and "nothing to set" in r.stderr, r.stderr
        r = cli("set", "--postcopy")
        assert r.returncode == 1 and ("cannot go post-copy: started with --postcopy off"
                                      in r.stderr), r.stderr
        r = cli("set", "--downtime", "60000")
        assert r.returncode == 0, r.stderr
        assert "downtime target 0.001 ms -> 60000 ms, from its next round on" in r.stdout
        _, err = m.communicate(timeout=60)
    assert m.returncode == 0, err
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["verified"] and rep["downtime_target_ms"] == 60000, rep
    assert [ms for _, ms in rep["downtime_steps"]] == [60000], rep["downtime_steps"]
    assert "<= 60000 ms" in rep["switchover_reason"], rep["switchover_reason"]
    check_vm(dst)


def test_timeout_abort_stops_it_running_here_and_suspend_switches_over(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server], tmp_path: Path,
        busy_vm: subprocess.Popen[bytes]) -> None:
    """(virsh migrate --timeout) abort: one line, the VM runs on here, still this host's;
    suspend (the default): rounds that would never converge switch over when it is up."""
    src, dst = hosts
    s = Server(dst, key, once=False)
    servers.append(s)
    r = cli("migrate", "disk.raw", "vm.mem", "--mount", str(src.mnt), "--to", "127.0.0.1:1",
            "--key-file", str(key), "--on-timeout", "postcopy", "--timeout", "5")
    assert r.returncode == 1 and "--on-timeout postcopy needs --postcopy auto" in r.stderr, r
    with running(start(src, s.port, key, busy_vm, tmp_path, "--bandwidth", "1", "--timeout",
                       "1", "--on-timeout", "abort")) as m:
        _, err = m.communicate(timeout=30)
    assert m.returncode == 1
    assert err.strip().splitlines()[-1] == (
        "migrator: error: --timeout 1 s reached (--on-timeout abort): stopped before the "
        "switchover, the VM runs on here"), err
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["status"] == "failed" and rep["phase"] in ("initial copy", "dirty rounds"), rep
    assert rep["downtime_ms"] is None, rep  # (never suspended)
    assert busy_vm.poll() is None and not stopped(busy_vm.pid)
    assert {r["name"]: r["role"] for r in vm_records(src)}.popitem()[1] == "owner"
    with running(start(src, s.port, key, busy_vm, tmp_path, *NEVER, "--timeout", "2")) as m:
        _, err = m.communicate(timeout=60)
    assert m.returncode == 0, err
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["verified"], rep
    assert rep["switchover_reason"].startswith(
        "--timeout 2 s reached (--on-timeout suspend): switched over (memory pre-copy), "
        "expected downtime"), rep["switchover_reason"]
    flat = " ".join(err.split())  # (the console wraps its lines)
    assert "--timeout 2 s reached: switching over at the end of this round" in flat, err
    check_vm(dst)


def test_a_destination_that_stops_taking_data_meets_the_progress_timeout(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server], tmp_path: Path,
        idle_vm: subprocess.Popen[bytes]) -> None:
    """(KubeVirt's progressTimeout) serve stopped (SIGSTOP) mid-copy: its TCP is alive, so
    --io-timeout (60 s) would wait; no less data left for --progress-timeout stops it, one
    line, the VM and its files as they were."""
    src, dst = hosts
    before = fill(src, 48)
    s = Server(dst, key, once=False)
    servers.append(s)
    with running(start(src, s.port, key, idle_vm, tmp_path, "--bandwidth", "8",
                       "--progress-timeout", "2")) as m:
        wait_mid_copy(tmp_path / "status.json", m, sent=2e6)
        os.kill(s.proc.pid, signal.SIGSTOP)
        try:
            _, err = m.communicate(timeout=30)
        finally:
            os.kill(s.proc.pid, signal.SIGCONT)
    assert m.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("migrator: error: no progress for 2 s: "), err
    assert last.endswith("(--progress-timeout; 0: never): stopped before the switchover, "
                         "the VM runs on here"), err
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["status"] == "failed" and rep["phase"] == "initial copy", rep
    assert not stopped(idle_vm.pid) and idle_vm.poll() is None
    for n, d in before.items():
        assert digest(src.mnt / n) == d
    assert {r["name"]: r["role"] for r in vm_records(src)}.popitem()[1] == "owner"
    # `migrator cancel` of one stuck the same way: its frame under way gets 3 s, not the
    # rest of --io-timeout (60 s), then the link goes
    with running(start(src, s.port, key, idle_vm, tmp_path, "--bandwidth", "8",
                       "--progress-timeout", "0")) as m:
        wait_mid_copy(tmp_path / "status.json", m, sent=2e6)
        os.kill(s.proc.pid, signal.SIGSTOP)
        try:
            wait_for(lambda: stalled(tmp_path / "status.json"), 20, "the link to stall")
            r = cli("cancel")
            assert r.returncode == 0 and "its VM runs on here" in r.stdout, r
            _, err = m.communicate(timeout=20)
        finally:
            os.kill(s.proc.pid, signal.SIGCONT)
    assert m.returncode == 1 and err.strip().splitlines()[-1].startswith(
        "migrator: error: cancelled"), err
    assert not stopped(idle_vm.pid) and idle_vm.poll() is None
    for n, d in before.items():
        assert digest(src.mnt / n) == d


def stalled(status: Path) -> bool:
    """Nothing more sent nor left for 2 s (frames of up to 8 MiB at 8 MB/s: the peer takes no
    data, the socket buffers are full, a frame hangs half sent)."""
    import time

    def now() -> tuple[object, object]:
        st = read_json(status)
        return st.get("bytes_sent"), st.get("remaining_bytes")

    was = now()
    time.sleep(2)
    return now() == was


def test_set_postcopy_switches_over_into_post_copy_at_once(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server], tmp_path: Path,
        busy_vm: subprocess.Popen[bytes]) -> None:
    """(virsh migrate-postcopy) A --postcopy auto migration whose rounds go on: `migrator set
    --postcopy` ends them at the round under way, its memory going post-copy; the VM whole."""
    src, dst = hosts
    s = Server(dst, key, "--resume-cmd", "true")
    servers.append(s)
    status = tmp_path / "status.json"
    with running(start(src, s.port, key, busy_vm, tmp_path, *NEVER, "--postcopy=auto",
                       "--spill", str(tmp_path / "spill"))) as m:
        wait_for(lambda: read_json(status).get("round", 0) >= 2, 60, "two rounds")  # type: ignore[operator]
        r = cli("set", "--postcopy")
        assert r.returncode == 0, r.stderr
        assert "switches over into post-copy at the end of" in r.stdout, r.stdout
        _, err = m.communicate(timeout=60)
    assert m.returncode == 0, err
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["verified"], rep
    asked = "asked to go post-copy ('migrator set --postcopy')"
    assert rep["postcopy_reason"] == asked, rep["postcopy_reason"]
    assert rep["switchover_reason"].startswith(f"{asked}: switched over into post-copy"), rep
    assert rep["postcopy_pages"] > 0, rep
    check_vm(dst)


def test_the_destination_shows_an_incoming_migration_as_it_arrives_and_once_its_serve_died(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server], tmp_path: Path,
        idle_vm: subprocess.Popen[bytes]) -> None:
    """(issue 26) `migrator status` and `blkfs status` on the destination: one arriving now
    is "incoming" with its progress; once its serve is killed, "no serve takes it now"."""
    from .conftest import run_blkfs

    src, dst = hosts
    fill(src, 32)
    s = Server(dst, key)
    servers.append(s)
    with running(start(src, s.port, key, idle_vm, tmp_path, "--bandwidth", "6")) as m:
        wait_mid_copy(tmp_path / "status.json", m, sent=2e6)
        wait_for(lambda: "incoming " in cli("status").stdout, 10, "the incoming status")
        out = cli("status").stdout
        line = next(ln for ln in out.splitlines() if ln.startswith("incoming "))
        assert "of VM disk from 127.0.0.1:" in line, line
        assert (f" into {dst.mnt} (serve pid {s.proc.pid}): "
                "receiving, ") in line and " received of 34.0 MiB of data" in line, out
        assert line.endswith("not runnable yet"), line
        mine = cli("status", "--mount", str(dst.mnt)).stdout
        assert "VM disk" in mine and "arriving from" in mine and "no serve" not in mine, mine
        assert "incoming " in mine, mine  # (the same line, under its mount)
        st = run_blkfs("status", str(dst.mnt)).stdout
        assert "arriving from 127.0.0.1 " in st, st
        assert f"(serve pid {s.proc.pid}: receiving, " in st, st
        # (the source counts what left, not what it read ahead: at most a frame apart)
        mid = read_json(tmp_path / "status.json")
        assert mid["remaining_bytes"] >= mid["data_bytes"] - mid["bytes_sent"] - (9 << 20), mid
        s.kill()
        _, err = m.communicate(timeout=60)
    assert m.returncode == 1, err
    st = run_blkfs("status", str(dst.mnt)).stdout
    assert "NOT RUNNABLE: no serve on this host takes it now (its serve is gone" in st, st
    out = cli("status", "--mount", str(dst.mnt)).stdout
    assert not any(ln.startswith("incoming ") for ln in out.splitlines()), out
    assert "NOT RUNNABLE: no serve on this host takes it now" in out, out
