"""The spill area on a real GlusterFS volume between two hosts (two network namespaces).

The source (namespace a) writes the spill area through its glusterfs client, the
destination (namespace b) reads it through its own, and the migration's TCP runs over the
veth pair. The source is killed after "spill flushed": the destination completes from the
volume alone. And a reader racing a writer across the two clients never takes a torn slot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blkfs.spill import Refused, SlotAllocator, SpillArea, spill_key

from . import gluster
from .conftest import Mount
from .hosts import (
    MIGRATOR,
    Server,
    in_netns,
)
from .test_postcopy import completed_from_the_spill_alone, stop_dest_on_resume, vm

pytestmark = [pytest.mark.mount, pytest.mark.slow, pytest.mark.group("gluster")]  # one glusterd
__all__ = ["vm"]  # a fixture of test_postcopy, re-exported for pytest

SERVER_ADDR, DEST_ADDR = "10.231.78.1", "10.231.78.2"


@dataclass
class Lab:
    a: str  # the source host's network namespace (it also serves the volume)
    b: str  # the destination's
    mount_a: Path  # the volume, as the source host sees it
    mount_b: Path  # and the destination


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two hosts joined by a veth pair, and a GlusterFS volume both mount."""
    why = gluster.missing()
    if why is not None:
        pytest.fail(f"GlusterFS unavailable: {why}")
    tmp = tmp_path_factory.mktemp("gluster")
    tag = f"gl{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    with gluster.hosts(a, b, SERVER_ADDR, DEST_ADDR):
        mounts = {a: tmp / "a", b: tmp / "b"}
        with gluster.volume(tmp / "server", a, SERVER_ADDR, mounts, f"spill{tag}") as times:
            print(f"gluster set-up: {times}")
            yield Lab(a, b, mounts[a], mounts[b])


def test_the_destination_completes_from_the_gluster_volume_alone(
        hosts: tuple[Mount, Mount], key: Path, servers: list[Server], lab: Lab,
        vm: subprocess.Popen[bytes]) -> None:
    src, dst = hosts
    a, b = lab.a, lab.b
    spill_a, spill_b = lab.mount_a / "area", lab.mount_b / "area"
    s = Server(dst, key, "--resume-cmd", stop_dest_on_resume(), "--io-timeout", "5",
               "--spill", str(spill_b), netns=b, listen=f"{DEST_ADDR}:0")
    servers.append(s)
    m = subprocess.Popen([*in_netns(a), *MIGRATOR, "migrate", "--mount",
                          str(src.mnt), "--to", f"{DEST_ADDR}:{s.port}", "--key-file", str(key),
                          "--suspend", f"pid:{vm.pid}", "--postcopy", "--spill",
                          str(spill_a), "--spill-bandwidth", "50", "disk.raw", "vm.mem"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert m.stderr is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = m.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "spill flushed" in line:
                break
        assert any("spill flushed" in x for x in lines), "".join(lines)
    finally:
        m.kill()  # kill -9 the source: only the volume is left
        m.communicate()
        os.kill(s.proc.pid, signal.SIGCONT)
    completed_from_the_spill_alone(s, src, dst, vm, timeout=90)
    spill = json.loads(subprocess.run([sys.executable, "-m", "blkfs.cli", "spill",
                                       str(dst.mnt), "--json"], capture_output=True, text=True,
                                      check=True).stdout)
    pc = spill["postcopy"]
    assert pc["pages_via_spill"] + pc["pages_via_drain"] > 0 and pc["missing_count"] == 0, pc
    assert pc["pages_via_demand_fetch"] == 0  # the source was gone: all of it from the volume
    print(f"gluster post-copy: {pc}")


def test_a_reader_racing_a_writer_on_the_other_client_never_takes_a_torn_slot(
        lab: Lab) -> None:
    """Seen on GlusterFS: 27 of 4,416 racing reads tore a 64 KiB slot although its header
    matched before and after. The writer (client a) rewrites 4 slots under new generations
    as fast as it can; the reader (client b) reads the newest ref it was told: every page it
    takes is exactly the one written under that ref, the rest are refused and counted."""
    bs, key = 65536, spill_key(b"k" * 32, "race")
    writer = SpillArea.create(str(lab.mount_a / "race"), "race", bs, 4, {1: "vm.mem"}, key)
    alloc = SlotAllocator(4)
    told: dict[int, tuple[object, bytes]] = {}  # slot -> (ref, page) of its last write
    stop = threading.Event()
    writes = 0

    def write() -> None:
        nonlocal writes
        while not stop.is_set():
            ref = alloc.allocate()
            if ref is None:
                for old, _ in list(told.values()):
                    alloc.release(old)  # type: ignore[arg-type]
                continue
            page = bytes([writes % 251]) * bs
            writer.put(ref, 1, ref.slot, page)
            told[ref.slot] = (ref, page)
            writes += 1

    t = threading.Thread(target=write, daemon=True)
    t.start()
    time.sleep(0.5)  # the first slots exist
    reader = SpillArea.open(str(lab.mount_b / "race"), "race", key)
    taken = 0
    refused: dict[Refused, int] = {}
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for slot, (ref, page) in list(told.items()):
                got = reader.read(ref, 1, slot)  # type: ignore[arg-type]
                if isinstance(got, Refused):
                    refused[got] = refused.get(got, 0) + 1
                else:
                    assert got == page, f"slot {slot}: a page other than the one told"
                    taken += 1
    finally:
        stop.set()
        t.join(timeout=10)
        reader.close()
        writer.close()
    print(f"gluster race: {writes} writes, {taken} reads taken, refused {refused}")
    assert taken > 0 and writes > 10
    assert Refused.FORGED not in refused  # the key is the writer's: never "forged"
