"""Helpers of the mounted migration tests: `migrator serve` and `migrate` as processes, what
a host's records say, digests of files, and waiting on conditions (never on fixed sleeps).
The fixtures these go with (hosts, key, servers, idle_vm, netns_pair) are in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xxhash

from migrator.simvm.format import read_header

from .conftest import Mount

pytestmark = pytest.mark.mount

MIGRATOR = [sys.executable, "-m", "migrator.cli"]
SIMVM = [sys.executable, "-m", "migrator.simvm"]


def in_netns(netns: str | None) -> list[str]:
    """The prefix that runs a command in network namespace `netns` (none: here), and in our
    mount namespace: `ip netns exec` gives its command a mount namespace of its own, a copy
    of every mount of that moment, so another worker's blkfs mount unmounted meanwhile kept
    its daemon alive until the command ended (measured: teardowns of 5-11 s in the suite)."""
    return ["nsenter", f"--net=/run/netns/{netns}"] if netns else []


class Server:
    """`migrator serve` in the background. Its pipes are unbuffered on our side: a line read
    here is never one that a buffer took and `communicate` then misses (serve prints its
    second line, "... is unfinished here", right after the first)."""

    def __init__(self, dst: Mount, key: Path, *extra: str, netns: str | None = None,
                 listen: str = "127.0.0.1:0", once: bool = True) -> None:
        pre = in_netns(netns)
        self.proc = subprocess.Popen([*pre, *MIGRATOR, "serve", "--mount", str(dst.mnt),
                                      "--listen", listen, "--key-file", str(key),
                                      *(["--once"] if once else []), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                                     start_new_session=True)  # its hooks: see kill()
        line = self.readline()
        m = re.search(r"listening on [^ ]+:(\d+),", line)
        assert m, line + self.communicate(30)[1]
        self.port = int(m.group(1))

    def readline(self) -> str:
        """One line of serve's stdout (read a byte at a time: nothing is held back)."""
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().decode(errors="replace")

    def communicate(self, timeout: float = 30) -> tuple[str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return out.decode(errors="replace"), err.decode(errors="replace")

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        out, err = self.communicate(timeout)
        return self.proc.returncode, out + err

    def kill(self) -> None:
        """Serve and everything its hooks started (a hook's `sleep` would hold its pipes)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()


def migrate(src: Mount, port: int, key: Path, *args: str, host: str = "127.0.0.1",
            netns: str | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    pre = in_netns(netns)
    return subprocess.run([*pre, *MIGRATOR, "migrate", "--mount", str(src.mnt), "--to",
                           f"{host}:{port}", "--key-file", str(key), *args],
                          capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]


def migrate_a_vm(src: Mount, dst: Mount, key: Path, servers: list[Server],
                 *args: str) -> subprocess.CompletedProcess[str]:
    """A migration (files and flags in `args`) of a VM that a `sleep` stands in for, into a
    serve of its own on `dst`: both must complete (the VM is killed afterwards)."""
    vm = subprocess.Popen(["sleep", "300"])
    try:
        s = Server(dst, key)
        servers.append(s)
        r = migrate(src, s.port, key, *args, "--suspend", f"pid:{vm.pid}")
        assert r.returncode == 0, r.stderr
        rc, out = s.finish()
        assert rc == 0 and "complete and verified" in out, out
        return r
    finally:
        vm.kill()
        vm.wait()


def two_vms(src: Mount) -> dict[str, str]:
    """vm1/ and vm2/ on the mount, each an 8 MiB disk.raw and a 4 MiB vm.mem of random
    bytes: {relative path: digest}."""
    out = {}
    for vm in ("vm1", "vm2"):
        (src.mnt / vm).mkdir()
        for name, size in (("disk.raw", 8 << 20), ("vm.mem", 4 << 20)):
            (src.mnt / vm / name).write_bytes(os.urandom(size))
            out[f"{vm}/{name}"] = digest(src.mnt / vm / name)
    return out


def digest(path: Path) -> str:
    """What the file holds, to compare (read in 1 MiB pieces: the 1 GiB disk is not held in
    memory; xxh3-128 hashes at ~10x SHA-256's speed, and no test's data is chosen to collide)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return f"{os.path.getsize(path)}:{h.hexdigest()}"


def vm_records(m: Mount) -> list[dict[str, Any]]:
    """What this host knows of each VM on the mount (migrator's records, in the backing
    directory's .blkfs/vms: the mount never shows them)."""
    out = []
    for f in sorted((m.backing / ".blkfs" / "vms").glob("*/record.json")):
        try:
            out.append(json.loads(f.read_text()))
        except ValueError:
            continue  # (being written)
    return out


def vm_record(m: Mount) -> dict[str, Any]:
    """The record of the VM changed last on this mount ({} if none)."""
    recs = vm_records(m)
    return max(recs, key=lambda r: r["at"]) if recs else {}


def layout_digest(size: int, held: dict[int, bytes]) -> str:
    """digest() of a file of `size` bytes holding `held` (offset: data), zeros elsewhere."""
    h, at, zeros = xxhash.xxh3_128(), 0, bytes(1 << 20)
    for off, data in [*sorted(held.items()), (size, b"")]:
        while at < off:
            n = min(off - at, len(zeros))
            h.update(zeros[:n])
            at += n
        h.update(data)
        at += len(data)
    return f"{size}:{h.hexdigest()}"


def digest_log(m: Mount) -> bool:
    return any((m.backing / ".blkfs" / "vms").glob("*/digests"))


def state(dst: Mount) -> dict[str, Any] | None:
    """The last incoming session's state, with the VM's role (owner: it took the VM)."""
    rec = vm_record(dst)
    if not rec or rec.get("dest_record") is None:
        return None
    return {**rec["dest_record"], "role": rec["role"], "owner": rec["role"] == "owner",
            "generation": rec["generation"]}


def wait_for(pred: Callable[[], object], timeout: float = 60, what: str = "a condition") -> None:
    """Poll `pred` until it holds: tests wait on a condition, never on a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def read_json(path: Path) -> dict[str, object]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def wait_writing(src: Mount, vm: subprocess.Popen[bytes], mib: int = 2) -> None:
    """Until the simulated VM on `src` has written `mib` MiB (its header counts its writes):
    it runs, and there is data to copy, when the migration starts."""
    def wrote() -> bool:
        assert vm.poll() is None, vm.returncode
        h = read_header(src.mnt)
        return h.total_writes * h.unit_size >= mib << 20
    wait_for(wrote, 30, f"the VM to write {mib} MiB")


def wait_mid_copy(status: Path, proc: subprocess.Popen[str], sent: float = 1e6) -> None:
    """Until `migrate --status-file status` is in its initial copy with `sent` bytes out."""
    def copying() -> bool:
        assert proc.poll() is None, proc.communicate()
        st = read_json(status)
        return st.get("phase") == "initial copy" and int(st.get("bytes_sent", 0)) > sent  # type: ignore[call-overload]
    wait_for(copying, 60, "the initial copy")


def hold_until(release: Path, cap: float) -> str:
    """Shell for a resume hook that keeps the switchover window open until the test creates
    `release` (at most `cap` seconds): the window lasts as long as the fault needs, no more."""
    return (f"i=0; while [ ! -e {release} ] && [ $i -lt {round(cap * 20)} ]; do sleep 0.05; "
            "i=$((i+1)); done")


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def last_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert lines, r
    return lines[-1]


def fill_source(src: Mount, mib: int = 16) -> dict[str, str]:
    (src.mnt / "disk.raw").write_bytes(os.urandom(mib << 20))
    (src.mnt / "vm.mem").write_bytes(os.urandom(4 << 20))
    return {n: digest(src.mnt / n) for n in ("disk.raw", "vm.mem")}


def assert_source_whole(src: Mount, before: dict[str, str], vm: subprocess.Popen[bytes]) -> None:
    assert vm.poll() is None and not stopped(vm.pid), "the source VM was left stopped"
    for n, d in before.items():
        assert digest(src.mnt / n) == d, f"{n} changed"
