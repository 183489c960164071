"""Per-call cost of blkfs's write handler with and without tracking, in process.

The FUSE round trip (~35 us of pyfuse3 and kernel per 4 KiB request here) and
the machine's noise dominate any fio figure; this isolates what tracking adds
to the handler itself, repeatably: BlkFS.write is awaited directly on a temp
file (no mount), best of 5 passes over random offsets.

    .venv/bin/python scripts/bench_handlers.py      (pin it: taskset -c 0 ...)
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from types import SimpleNamespace

import pyfuse3
import trio

from blkfs.fs import BlkFS
from blkfs.registry import Registry

CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), umask=0o022)
SIZE = 256 << 20


async def write_cost_us(tracking: bool, bs: int, n: int) -> float:
    d = tempfile.mkdtemp(prefix="bench-handlers-")
    try:
        fs = BlkFS(Registry(d, shift=16, half_life=60.0, static_heat=1.0, tracking=tracking))
        fi, _ = await fs.create(pyfuse3.ROOT_INODE, b"f", 0o644, os.O_RDWR, CTX)
        await fs.write(fi.fh, SIZE - 1, b"\0")  # full size, so writes do not grow it
        buf = os.urandom(bs)
        offs = [random.randrange(SIZE // bs) * bs for _ in range(n)]
        write = fs.write
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for o in offs:
                await write(fi.fh, o, buf)
            best = min(best, (time.perf_counter() - t) / n)
            fs.registry.settle_heat()  # what the daemon does once a second
        await fs.release(fi.fh)
        fs.close_all()
        return best * 1e6
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def main() -> None:
    print("write handler cost per call, best of 5 (no FUSE round trip included)")
    for bs, n in ((4096, 50000), (65536, 20000), (1 << 20, 2000)):
        plain = await write_cost_us(False, bs, n)
        tracked = await write_cost_us(True, bs, n)
        print(f"{bs // 1024:>5} KiB: no tracking {plain:7.2f} us, tracking {tracked:7.2f} us, "
              f"tracking adds {tracked - plain:5.2f} us")


if __name__ == "__main__":
    trio.run(main)
