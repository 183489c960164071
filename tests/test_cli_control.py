"""The CLI's one-line errors, and who may talk to the control socket (invariant 6)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from blkfs.runtime import process_gone

from .conftest import Mount, run_blkfs

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


def one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> str:
    assert r.returncode != 0, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("blkfs") and " error: " in lines[0], lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_help_works() -> None:
    r = run_blkfs("--help", check=True)
    for cmd in ("mount", "umount", "status", "dirty", "heat", "freeze", "thaw"):
        assert cmd in r.stdout
        assert run_blkfs(cmd, "--help", check=True).stdout.startswith("usage: blkfs " + cmd)


def test_bad_arguments(tmp_path: Path, runtime_dir: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "b").mkdir()
    one_line_error(run_blkfs("mount", str(tmp_path / "nope"), str(tmp_path / "m")),
                   "backing directory", "does not exist")
    one_line_error(run_blkfs("mount", str(tmp_path / "b"), str(tmp_path / "missing")),
                   "does not exist", "mkdir")
    for bad in ("3K", "banana", "2M", "1K"):
        one_line_error(run_blkfs("mount", str(tmp_path / "b"), str(tmp_path / "m"),
                                 "--block-size", bad), "bad block size", "power of two")
    (tmp_path / "b" / "inner").mkdir()
    one_line_error(run_blkfs("mount", str(tmp_path / "b"), str(tmp_path / "b" / "inner")),
                   "must not contain each other")
    full = tmp_path / "full"  # (issue 26: mounted over, its files vanished without a word)
    full.mkdir()
    (full / "keep.img").write_bytes(b"k")
    one_line_error(run_blkfs("mount", str(tmp_path / "b"), str(full)), "is not empty",
                   "keep.img", "--nonempty")
    one_line_error(run_blkfs("umount", str(tmp_path / "m")), "not mounted")
    one_line_error(run_blkfs("status", str(tmp_path / "m")), "not mounted", "blkfs mount")
    one_line_error(run_blkfs("status", str(tmp_path / "nowhere")), "does not exist")
    one_line_error(run_blkfs("frobnicate"), "invalid choice")


@pytest.mark.mount
def test_errors_against_a_mount(mount_factory: Callable[..., Mount], tmp_path: Path) -> None:
    m = mount_factory()
    m.path("f").write_bytes(b"x")
    one_line_error(run_blkfs("dirty", str(m.mnt), "nofile"), "no such file", "relative")
    one_line_error(run_blkfs("dirty", str(m.mnt), "/etc/passwd"), "not under")
    one_line_error(run_blkfs("mount", str(m.backing), str(m.mnt)), "busy", "already mounted")
    other = tmp_path / "m2"
    other.mkdir()
    one_line_error(run_blkfs("mount", str(m.backing), str(other)), "already served")
    (other / "keep.img").write_bytes(b"k")  # --nonempty: hidden while mounted, there after
    (tmp_path / "b2").mkdir()
    run_blkfs("mount", str(tmp_path / "b2"), str(other), "--nonempty", check=True)
    try:
        assert os.listdir(other) == []
    finally:
        run_blkfs("umount", str(other), check=True)
    assert (other / "keep.img").read_bytes() == b"k"
    fd = os.open(m.path("f"), os.O_RDONLY)
    try:
        one_line_error(run_blkfs("umount", str(m.mnt)), "busy", "fuser")
    finally:
        os.close(fd)
    assert m.mounted()
    os.kill(m.pid, 9)
    while not process_gone(m.pid):
        time.sleep(0.01)
    one_line_error(run_blkfs("status", str(m.mnt)), "not running", "fusermount3 -u")
    r = run_blkfs("umount", str(m.mnt))
    assert r.returncode == 0 and "daemon had died" in r.stdout


@pytest.mark.quick  # a mount smoke test of the quick tier
@pytest.mark.mount
def test_status_heat_json(mount: Mount) -> None:
    mount.path("a").write_bytes(b"\0" * 200000)
    st = json.loads(run_blkfs("status", str(mount.mnt), "--json", check=True).stdout)
    (f,) = st["files"]
    assert f["file"] == "a" and f["size"] == 200000 and f["blocks"] == 4 and f["dirty"] == 4
    assert f["static"] + f["dynamic"] == 4
    h = json.loads(run_blkfs("heat", str(mount.mnt), "a", "--json", check=True).stdout)
    assert h["blocks"] == 4 and h["static"] + h["dynamic"] == 4
    text = run_blkfs("status", str(mount.mnt), check=True).stdout
    assert "a" in text and "dynamic" in text


CONNECT = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sys.argv[1])
    except OSError as e:
        print("CONNECT", e.errno); sys.exit(0)
    try:
        s.sendall(b'{"op": "status"}\\n')
    except BrokenPipeError:
        pass  # refused before we spoke: the reason is waiting to be read
    print("REPLY", s.recv(65536).decode().strip())
""")


def as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    # The system Python, from a directory nobody can enter, with a clean environment.
    r = subprocess.run([SYSTEM_PYTHON or "python3", "-I", "-c", code, *args], user=65534,
                       group=65534, extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.mount
@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="needs /usr/bin/python3 runnable by nobody")
def test_control_socket_refuses_other_uids(
    mount_factory: Callable[..., Mount], tmp_path: Path
) -> None:
    ctl_dir = Path("/tmp") / f"blkfs-ctl-test-{os.getpid()}"
    ctl_dir.mkdir(mode=0o755, exist_ok=True)
    sock = ctl_dir / "ctl.sock"
    try:
        m = mount_factory("--control", str(sock))
        assert m.call("info")["tracking"]
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        # 1. The socket's mode keeps other users out.
        r = as_nobody(CONNECT, str(sock))
        assert r.stdout.split() == ["CONNECT", "13"], r.stdout
        # 2. Even with the mode opened up, the peer-credential check refuses them.
        os.chmod(sock, 0o666)
        r = as_nobody(CONNECT, str(sock))
        assert r.stdout.startswith("REPLY"), r.stdout
        reply = json.loads(r.stdout.split(" ", 1)[1])
        assert reply["ok"] is False and "uid 65534" in reply["error"]
        assert m.call("info")["tracking"]  # the owner still gets in
    finally:
        shutil.rmtree(ctl_dir, ignore_errors=True)
