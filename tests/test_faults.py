"""Faults at the switchover with real processes: real mounts, TCP, kill -9 (slow tier).

The in-process cases are in tests/test_handoff.py; these check that the real commands keep
the promise: at most one VM runs, each side says in one line what happened, and
`migrator resolve` settles it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import Mount
from .test_migrate import MIGRATOR, SIMVM, Server, hosts, key, servers, state

pytestmark = [pytest.mark.mount, pytest.mark.slow]
__all__ = ["hosts", "key", "servers"]  # fixtures, re-exported for pytest


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None
    return None if st in ("Z", "X") else st


def wait_for(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_kill9_of_serve_while_the_vm_starts_there_leaves_one_vm_and_resolve_settles_it(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server], tmp_path: Path) -> None:
    src, dst = hosts
    subprocess.run([*SIMVM, "create", str(src.mnt), "--disk-size", "8M", "--mem-size", "4M"],
                   check=True, capture_output=True)
    vm = subprocess.Popen([*SIMVM, "run", str(src.mnt), "--rate", "5"],
                          stdout=subprocess.DEVNULL)
    pidfile = tmp_path / "dest-vm.pid"
    # The hook starts the VM on the destination, then takes its time: the window is wide.
    hook = (f"{' '.join(SIMVM)} run \"$MIGRATOR_MOUNT\" --resume --rate 5 --seconds 6 "
            f">/dev/null 2>&1 & echo $! > {pidfile}; sleep 30")
    s = Server(dst, key, "--resume-cmd", hook)
    servers.append(s)
    dest_vm = 0
    try:
        time.sleep(0.5)
        m = subprocess.Popen([*MIGRATOR, "migrate", "--mount", str(src.mnt), "--to",
                              f"127.0.0.1:{s.port}", "--key-file", str(key), "--suspend",
                              f"pid:{vm.pid}", "--io-timeout", "3", "disk.raw", "vm.mem"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 60,
                 "the VM to start on the destination")
        dest_vm = int(pidfile.read_text())
        s.proc.kill()  # kill -9 of migrator serve while its resume hook runs
        out, err = m.communicate(timeout=60)
        assert m.returncode == 1, out + err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "migrator resolve" in lines[0], err
        assert "Traceback" not in out + err
        # One VM: the destination's runs, the source's is held stopped (not resumed).
        assert proc_state(vm.pid) in ("T", "t"), proc_state(vm.pid)
        assert proc_state(dest_vm) not in (None, "T", "t")
        rec = json.loads((src.mnt / ".migration-source.json").read_text())
        assert rec["state"] == "handed-off"
        st = state(dst)
        assert st is not None and st["owner"] and st["migration"] == rec["migration"]
        # A re-run before settling is refused in one line.
        r = subprocess.run([*MIGRATOR, "migrate", "--mount", str(src.mnt), "--to",
                            f"127.0.0.1:{s.port}", "--key-file", str(key), "disk.raw"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "never settled" in r.stderr, r.stderr
        # Settle it: a serve again on the destination, then resolve on the source.
        s2 = Server(dst, key)
        servers.append(s2)
        r = subprocess.run([*MIGRATOR, "resolve", "--mount", str(src.mnt), "--to",
                            f"127.0.0.1:{s2.port}", "--key-file", str(key)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "owner" in r.stdout, r.stdout + r.stderr
        wait_for(lambda: proc_state(vm.pid) is None, 10, "the source VM to be retired")
        assert json.loads((src.mnt / ".migration-source.json").read_text())["state"] == (
            "retired")
        r = subprocess.run([*MIGRATOR, "resolve", "--mount", str(dst.mnt)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "the VM is this host's" in r.stdout, r.stdout
        wait_for(lambda: proc_state(dest_vm) is None, 30, "the destination VM's run to end")
    finally:
        for pid in (vm.pid, dest_vm):
            if pid and proc_state(pid) is not None:
                os.kill(pid, signal.SIGKILL)
        vm.wait()
    chk = subprocess.run([*SIMVM, "check", str(dst.mnt)], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stdout + chk.stderr  # no lost write on the side that ran
