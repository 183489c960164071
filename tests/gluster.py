"""A single-brick GlusterFS volume served from one network namespace and mounted, through the
glusterfs FUSE client, from any others: the shared spill area of two hosts on one machine.

Used by tests/test_gluster.py and scripts/bench_gluster.py. Everything it starts it stops:
glusterd runs in the foreground (-N) with its state in a directory of ours (not
/var/lib/glusterd), and what it leaves in /run/gluster is removed on the way out.

Facts measured here (issue 13): the CLI refuses 127.0.0.1/localhost as a brick address, so
the brick is on the veth address; a mount made under `ip netns exec` lives in a mount
namespace of its own, so mounts are made with `nsenter --net` and everyone sees them; with
the default client options a reader holding a file open did not see another client's
fsynced write for ~1 s, and `direct-io-mode=enable` plus `performance.quick-read off` gave
read-after-write coherence every time (40 of 40).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

RUN = Path("/run/gluster")
SOCKET = Path("/run/glusterd.socket")  # glusterd ignores listen-path: the CLI's default
VOLFILE = """volume management
    type mgmt/glusterd
    option working-directory {state}
    option transport-type socket
    option transport.socket.bind-address {addr}
    option transport.socket.listen-port 24007
    option ping-timeout 0
    option event-threads 1
    option max-port 60999
end-volume
"""
COHERENT = ["direct-io-mode=enable"]  # + performance.quick-read off on the volume
VOLUME_OPTIONS = {"performance.quick-read": "off"}


class GlusterError(Exception):
    pass


def missing() -> str | None:
    """Why GlusterFS cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("glusterd", "gluster", "mount.glusterfs", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return (f"{tool} not found: scripts/test.sh installs glusterfs-server and "
                    "glusterfs-client (apt-get install glusterfs-server glusterfs-client)")
    return None


def _run(cmd: list[str], timeout: float = 30) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise GlusterError(f"{' '.join(cmd)}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


@contextlib.contextmanager
def volume(workdir: Path, server_ns: str, addr: str, clients: dict[str, Path],
           name: str = "spill") -> Iterator[dict[str, float]]:
    """Serve `name` from `addr` in `server_ns`, mount it at each clients[ns] (made here),
    yield the set-up times in seconds, then tear all of it down."""
    workdir.mkdir(parents=True, exist_ok=True)
    state, brick = workdir / "state", workdir / "brick"
    state.mkdir()
    brick.mkdir()
    vol = workdir / "glusterd.vol"
    vol.write_text(VOLFILE.format(state=state, addr=addr))
    run_before = set(os.listdir(RUN)) if RUN.is_dir() else set()
    vols_before = set(os.listdir(RUN / "vols")) if (RUN / "vols").is_dir() else set()
    socket_before = SOCKET.exists()
    cli = ["nsenter", f"--net=/run/netns/{server_ns}", "gluster", "--mode=script"]
    times: dict[str, float] = {}
    mounted: list[Path] = []
    t0 = time.monotonic()
    glusterd = subprocess.Popen(["nsenter", f"--net=/run/netns/{server_ns}", "glusterd", "-N", "-f",
                                 str(vol), "-l", str(workdir / "glusterd.log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            r = subprocess.run([*cli, "volume", "list"], capture_output=True, text=True)
            if r.returncode == 0:
                break
            if glusterd.poll() is not None or time.monotonic() > deadline:
                log = (workdir / "glusterd.log").read_text()[-2000:]
                raise GlusterError(f"glusterd did not start: {r.stderr.strip()}\n{log}")
            time.sleep(0.1)
        times["glusterd_start_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        _run([*cli, "volume", "create", name, f"{addr}:{brick}", "force"])
        for key, value in VOLUME_OPTIONS.items():
            _run([*cli, "volume", "set", name, key, value])
        _run([*cli, "volume", "start", name])
        for ns, mnt in clients.items():
            mnt.mkdir(parents=True, exist_ok=True)
            _run(["nsenter", f"--net=/run/netns/{ns}", "mount", "-t", "glusterfs", "-o",
                  ",".join(COHERENT), f"{addr}:/{name}", str(mnt)])
            mounted.append(mnt)
        times["volume_and_mounts_s"] = time.monotonic() - t1
        yield times
    finally:
        for mnt in mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        subprocess.run([*cli, "volume", "stop", name], capture_output=True, timeout=60)
        glusterd.send_signal(signal.SIGTERM)
        try:
            glusterd.wait(timeout=10)
        except subprocess.TimeoutExpired:
            glusterd.kill()
            glusterd.wait()
        # a brick process that outlived the stop (it daemonizes): ours name our brick
        subprocess.run(["pkill", "-KILL", "-f", f"glusterfsd.*{brick}"], capture_output=True)
        for entry in set(os.listdir(RUN)) - run_before if RUN.is_dir() else ():
            with contextlib.suppress(OSError):
                p = RUN / entry
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        for entry in set(os.listdir(RUN / "vols")) - vols_before if (RUN / "vols").is_dir() \
                else ():
            shutil.rmtree(RUN / "vols" / entry, ignore_errors=True)
        if not socket_before:
            with contextlib.suppress(FileNotFoundError):
                SOCKET.unlink()


@contextlib.contextmanager
def hosts(a: str, b: str, addr_a: str, addr_b: str) -> Iterator[None]:
    """Network namespaces `a` and `b` joined by a veth pair, addresses addr_a/24, addr_b/24."""
    x, y = f"{a}x", f"{b}y"
    cmds = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
            ["ip", "link", "add", x, "type", "veth", "peer", "name", y],
            ["ip", "link", "set", x, "netns", a], ["ip", "link", "set", y, "netns", b],
            ["ip", "-n", a, "addr", "add", f"{addr_a}/24", "dev", x],
            ["ip", "-n", b, "addr", "add", f"{addr_b}/24", "dev", y],
            ["ip", "-n", a, "link", "set", x, "up"], ["ip", "-n", b, "link", "set", y, "up"],
            ["ip", "-n", a, "link", "set", "lo", "up"], ["ip", "-n", b, "link", "set", "lo", "up"]]
    try:
        for c in cmds:
            _run(c)
        yield
    finally:
        subprocess.run(["ip", "netns", "del", a], capture_output=True)
        subprocess.run(["ip", "netns", "del", b], capture_output=True)
