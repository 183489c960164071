"""Fixtures: real blkfs mounts on temporary mount points, always unmounted."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from hypothesis import settings

from blkfs import ctlproto as cp
from blkfs.control import ControlClient
from blkfs.runtime import DaemonInfo, mount_fstype, process_gone

# No per-example deadline: it is a timed assert, and fails on a loaded machine (seen: a first
# example of test_chunked_masks_... took 555 ms beside a full run). Speed is the benchmarks'.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")

if TYPE_CHECKING:
    from .hosts import Server

BLKFS = [sys.executable, "-m", "blkfs.cli"]
T = TypeVar("T")


def fuse_available() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (apt-get install fuse3)"
    return None


# How long a test's kind takes, roughly: the scheduler hands out the long ones first, so that
# no worker starts a 20 s test when the others are done (see docs/testing.md).
_FIRST = ("serial", "slow", "mount")


def _weight(item: pytest.Item) -> int:
    return next((i for i, m in enumerate(_FIRST) if item.get_closest_marker(m)), len(_FIRST))


@pytest.hookimpl(tryfirst=True)  # before -m selects: `quick` and the groups are set here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = fuse_available()
    for item in items:
        mounts = item.get_closest_marker("mount") is not None
        if reason is not None and mounts:
            item.add_marker(pytest.mark.skip(reason=reason))
        if not mounts:
            item.add_marker(pytest.mark.quick)  # pure modules and the engine in memory
        if item.get_closest_marker("serial"):
            item.add_marker(pytest.mark.xdist_group("serial"))
        elif group := item.get_closest_marker("group"):
            item.add_marker(pytest.mark.xdist_group(group.args[0]))
    items.sort(key=_weight)  # stable: the order within a kind stays the files' order


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A `cache` test runs twice: on a plain mount and on a writeback mount."""
    if metafunc.definition.get_closest_marker("cache") and "cache_mode" in metafunc.fixturenames:
        metafunc.parametrize("cache_mode", ["plain", "writeback"], indirect=True)


@pytest.fixture
def cache_mode(request: pytest.FixtureRequest) -> str | None:
    """The page-cache mode of every mount the test makes (mount_factory says it on the command
    line): "plain" or "writeback" for a `cache` test, else None, as $BLKFS_WRITEBACK says."""
    return getattr(request, "param", None)


def cache_flags(mode: str | None) -> tuple[str, ...]:
    """The `blkfs mount` flag of a cache mode. Without one, the suite's own knob decides:
    BLKFS_WRITEBACK=1 scripts/test.sh makes every mount a writeback one (a test variable, read
    here only: blkfs's default is off whatever the environment says)."""
    if mode is None and os.environ.get("BLKFS_WRITEBACK", "") not in ("", "0"):
        mode = "writeback"
    return () if mode is None else ("--writeback",) if mode == "writeback" else (
        "--no-writeback",)


def run_blkfs(*args: str, check: bool = False, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*BLKFS, *args], capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"blkfs {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


def force_unmount(mnt: str, pid: int | None = None) -> None:
    """Last-resort cleanup: lazy unmount and kill the daemon."""
    if mount_fstype(mnt) is not None:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Mount:
    backing: Path
    mnt: Path
    pid: int = 0

    def path(self, rel: str) -> Path:
        return self.mnt / rel

    def client(self) -> ControlClient:
        return ControlClient.for_mount(str(self.mnt))

    def call(self, op: str, **args: Any) -> Any:
        """The reply to `op` as the JSON it travels as (checked as the daemon checks it)."""
        with self.client() as c:
            req = cp.from_dict(cp.OPS[op], args, op)
            req.check()
            reply = c.call(req)
            doc = reply.to_json() if hasattr(reply, "to_json") else cp.to_dict(reply)
            return json.loads(json.dumps(doc))

    def dirty(self, rel: str, swap: bool = False) -> list[tuple[int, int]]:
        return [tuple(e) for e in self.call("dirty", file=rel, swap=swap)["extents"]]

    def swap(self, rel: str) -> list[tuple[int, int]]:
        return self.dirty(rel, swap=True)

    def mounted(self) -> bool:
        return mount_fstype(str(self.mnt)) == "fuse.blkfs"

    def umount(self) -> None:
        run_blkfs("umount", str(self.mnt), check=True)

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not process_gone(self.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)


def together(*calls: Callable[[], T]) -> list[T]:
    """The calls run at once, each in a thread of its own; their results in order (the first
    error is raised). For `blkfs mount`s: each waits on processes of its own, as two hosts'
    would, so a test need not wait for one to be up before it starts the other."""
    with ThreadPoolExecutor(len(calls)) as ex:
        futures = [ex.submit(c) for c in calls]
        return [f.result() for f in futures]


@pytest.fixture
def runtime_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path_factory.mktemp("rt")
    monkeypatch.setenv("BLKFS_RUNTIME_DIR", str(d))
    return d


@pytest.fixture
def mount_factory(
    tmp_path: Path, runtime_dir: Path, cache_mode: str | None
) -> Iterator[Callable[..., Mount]]:
    mounts: list[Mount] = []

    def make(*extra: str, backing: Path | None = None, mnt: Path | None = None) -> Mount:
        b = backing or tmp_path / "backing"
        m = mnt or tmp_path / "mnt"
        b.mkdir(exist_ok=True)
        m.mkdir(exist_ok=True)
        # The test's own flags last: a --no-writeback there wins (freeze needs one).
        r = run_blkfs("mount", str(b), str(m), *cache_flags(cache_mode), *extra, check=True)
        info = DaemonInfo.find(str(m))
        mount = Mount(b, m, info.pid if info is not None else 0)
        mounts.append(mount)  # before any check: a failed one still unmounts it below
        assert "mounted" in r.stdout
        assert info is not None
        return mount

    yield make
    for mount in mounts:  # all of them first: their daemons then save their state together
        mnt = str(mount.mnt)
        if mount_fstype(mnt) is not None:
            r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
            if r.returncode != 0:
                force_unmount(mnt, mount.pid)
    for mount in mounts:
        deadline = time.monotonic() + 20
        while not process_gone(mount.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not process_gone(mount.pid):
            force_unmount(str(mount.mnt), mount.pid)


@pytest.fixture
def mount(mount_factory: Callable[..., Mount]) -> Mount:
    return mount_factory("--block-size", "64K")


# -- two hosts, their key and serve processes (the mounted migration tests) ------------------


@pytest.fixture
def hosts(mount_factory: Callable[..., Mount], tmp_path: Path) -> tuple[Mount, Mount]:
    src, dst = together(
        lambda: mount_factory(backing=tmp_path / "src-backing", mnt=tmp_path / "src"),
        lambda: mount_factory(backing=tmp_path / "dst-backing", mnt=tmp_path / "dst"))
    return src, dst


@pytest.fixture
def freeze_hosts(mount_factory: Callable[..., Mount], tmp_path: Path) -> tuple[Mount, Mount]:
    """Hosts whose source is never a --writeback mount (BLKFS_WRITEBACK=1 included): for the
    tests of the default suspend, blkfs freeze, which a writeback mount refuses."""
    src, dst = together(
        lambda: mount_factory("--no-writeback", backing=tmp_path / "src-backing",
                              mnt=tmp_path / "src"),
        lambda: mount_factory(backing=tmp_path / "dst-backing", mnt=tmp_path / "dst"))
    return src, dst


@pytest.fixture
def key(tmp_path: Path) -> Path:
    k = tmp_path / "key"
    k.write_text(os.urandom(32).hex())
    k.chmod(0o600)
    return k


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.kill()


@pytest.fixture
def idle_vm() -> Iterator[subprocess.Popen[bytes]]:
    """A process standing in for the VM: it must never be left stopped by a failure."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


@contextlib.contextmanager
def _netns_star(tag: str, peers: int) -> Iterator[list[str]]:
    """Network namespaces: a hub (index 0) joined to each of `peers` others by a veth pair of
    its own, the i-th on 10.231.(76+i).0/24 (hub .1, peer .2); [hub, peer..., hub's veth
    ends...]. Deleted after, whatever happened."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 (ip netns)")
    hub = f"{tag}a"
    names = [hub, *(f"{tag}{chr(ord('b') + i)}" for i in range(peers))]
    ends = [f"{tag}x{i or ''}" for i in range(peers)]
    cmds = [["ip", "netns", "add", n] for n in names]
    cmds.append(["ip", "-n", hub, "link", "set", "lo", "up"])
    for i, (peer, x) in enumerate(zip(names[1:], ends, strict=True), 1):
        y, net = f"{tag}y{i - 1 or ''}", f"10.231.{76 + i}"
        cmds += [["ip", "link", "add", x, "type", "veth", "peer", "name", y],
                 ["ip", "link", "set", x, "netns", hub], ["ip", "link", "set", y, "netns", peer],
                 ["ip", "-n", hub, "addr", "add", f"{net}.1/24", "dev", x],
                 ["ip", "-n", peer, "addr", "add", f"{net}.2/24", "dev", y],
                 ["ip", "-n", hub, "link", "set", x, "up"],
                 ["ip", "-n", peer, "link", "set", y, "up"],
                 ["ip", "-n", peer, "link", "set", "lo", "up"]]
    try:
        for c in cmds:
            r = subprocess.run(c, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"network namespaces unavailable here: {' '.join(c)}: {r.stderr}")
        yield [*names, *ends]
    finally:
        for n in names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


@pytest.fixture
def netns_pair() -> Iterator[tuple[str, str, str]]:
    """Two network namespaces joined by a veth pair: (ns_a, ns_b, veth end in ns_a); ns_a is
    10.231.77.1, ns_b 10.231.77.2."""
    with _netns_star(f"bk{os.getpid() % 100000}", 1) as (a, b, x):
        yield a, b, x


@pytest.fixture
def netns_three() -> Iterator[tuple[str, str, str]]:
    """Three hosts: a source namespace (10.231.77.1 and 10.231.78.1) and two destinations,
    10.231.77.2 and 10.231.78.2: (ns_src, ns_b, ns_c)."""
    with _netns_star(f"bt{os.getpid() % 100000}", 2) as (a, b, c, *_):
        yield a, b, c
