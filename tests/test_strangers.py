"""No door for strangers (issue 13, item 3): connections that never prove the shared key —
a connect/close flood, hundreds of idle sockets, a slowloris dribbling a Hello — neither keep
a real source out, nor end a `--once` serve, nor cost the destination's daemon anything."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from migrator import protocol as p
from migrator.serving import MAX_HANDSHAKES

from .conftest import Mount
from .hosts import (
    Server,
    digest,
    fill_source,
    migrate,
)

pytestmark = [pytest.mark.mount, pytest.mark.slow]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_flood_of_strangers_does_not_keep_the_real_source_out(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server],
        idle_vm: subprocess.Popen[bytes], tmp_path: Path) -> None:
    src, dst = hosts
    before = fill_source(src, 8)
    s = Server(dst, key)  # --once: one migration, and strangers must not count as one
    servers.append(s)
    daemon_fds = fds(dst.pid)
    addr = ("127.0.0.1", s.port)
    stop = threading.Event()
    flooded = [0]

    def flood() -> None:  # connect and close, as fast as it goes
        while not stop.is_set() and flooded[0] < 1000:
            with contextlib.suppress(OSError), socket.create_connection(addr, timeout=2):
                flooded[0] += 1

    def slowloris() -> None:  # a Hello one byte at a time, never finished
        hello = p.HEADER.pack(int(p.FrameType.HELLO), 40) + b"x" * 40
        with contextlib.suppress(OSError), socket.create_connection(addr) as sk:
            for b in hello:
                if stop.wait(0.3):
                    return
                sk.send(bytes([b]))

    idle = [socket.create_connection(addr) for _ in range(200)]
    threads = [threading.Thread(target=f) for f in (flood, slowloris, slowloris)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        # Idle strangers past the limit were dropped: the serve holds no more than that,
        # and none of them reached the blkfs daemon.
        assert fds(s.proc.pid) < MAX_HANDSHAKES + 40
        assert fds(dst.pid) <= daemon_fds
        report = tmp_path / "report.json"
        r = migrate(src, s.port, key, "disk.raw", "vm.mem", "--suspend", f"pid:{idle_vm.pid}",
                    "--report", str(report))
    finally:
        stop.set()
        for t in threads:
            t.join()
        for sk in idle:
            sk.close()
    assert r.returncode == 0, r.stderr
    assert flooded[0] > 100, flooded
    rc, out = s.finish()
    assert rc == 0 and "complete and verified" in out, out
    assert len(out.strip().splitlines()) <= 3, out  # listening, complete: no line per probe
    for n, d in before.items():
        assert digest(dst.mnt / n) == d
    rep = json.loads(report.read_text())
    print(f"\nunder the flood ({flooded[0]} connects, 200 idle, 2 slowloris): total "
          f"{rep['total_s']} s, downtime {rep['downtime_ms']} ms")
