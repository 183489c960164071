"""blkfs demo: a simulated VM writes to its disk and memory files on a blkfs mount
with a hot/cold pattern; blkfs reports which blocks changed and which are hot.

Everything runs on local defaults in a temporary directory and is unmounted at
the end, even on Ctrl-C.  Run it through ``scripts/demo.sh`` (which sets up the
venv first), or directly: ``.venv/bin/python scripts/blkfs_demo.py --help``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from blkfs.bitmap import parse_size
from blkfs.control import ControlClient, flush_file

BLKFS = [sys.executable, "-m", "blkfs.cli"]
WRITE_SIZE = 4096

console = Console()


def run(*args: str) -> str:
    r = subprocess.run([*BLKFS, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr.strip() or f"blkfs {args[0]} failed")
    return r.stdout


def simulated_vm(mnt: Path, files: dict[str, int], block: int, rate: float, seconds: float,
                 hot_fraction: float, hot_share: float, seed: int) -> None:
    """Writer process: 4 KiB writes, `hot_share` of them into `hot_fraction` of the blocks.

    The disk is written with pwrite (like a virtio disk with cache=none), the
    memory file through a shared mmap (like guest RAM in a memory-backend-file).
    """
    rnd = random.Random(seed)
    fds = {n: os.open(mnt / n, os.O_RDWR) for n in files}
    maps = {n: mmap.mmap(fds[n], size, mmap.MAP_SHARED) for n, size in files.items()
            if n.endswith(".mem")}
    hot = {n: hot_blocks(size // block, hot_fraction, seed) for n, size in files.items()}
    names = list(files)
    interval = WRITE_SIZE / (rate * 1e6)
    start = time.monotonic()
    n = 0
    payload = os.urandom(WRITE_SIZE)
    while (now := time.monotonic()) - start < seconds:
        name = names[n % len(names)]
        nblocks = files[name] // block
        b = rnd.choice(hot[name]) if rnd.random() < hot_share else rnd.randrange(nblocks)
        off = b * block + rnd.randrange(block // WRITE_SIZE) * WRITE_SIZE
        if name in maps:
            maps[name][off:off + WRITE_SIZE] = payload
        else:
            os.pwrite(fds[name], payload, off)
        n += 1
        delay = start + n * interval - now
        if delay > 0:
            time.sleep(delay)
    for m in maps.values():
        m.close()
    for fd in fds.values():
        os.close(fd)


def hot_blocks(nblocks: int, fraction: float, seed: int) -> list[int]:
    return sorted(random.Random(seed + nblocks).sample(range(nblocks),
                                                       max(1, int(nblocks * fraction))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--disk-size", default="64M", help="disk image size (default 64M)")
    ap.add_argument("--mem-size", default="32M", help="memory file size (default 32M)")
    ap.add_argument("--write-rate", type=float, default=20.0, metavar="MB/s",
                    help="simulated VM write rate (default 20)")
    ap.add_argument("--seconds", type=float, default=8.0, help="how long the VM runs (default 8)")
    ap.add_argument("--block-size", default="64K", help="blkfs block size (default 64K)")
    ap.add_argument("--report", default="reports/blkfs-demo.json",
                    help="where to write the JSON report (default reports/blkfs-demo.json)")
    a = ap.parse_args()
    try:
        disk, mem, block = (parse_size(a.disk_size), parse_size(a.mem_size),
                            parse_size(a.block_size))
    except ValueError as exc:
        ap.error(str(exc))
    if disk % block or mem % block or disk <= 0 or mem <= 0:
        ap.error("sizes must be positive multiples of the block size")

    work = Path(tempfile.mkdtemp(prefix="blkfs-demo-"))
    os.environ["BLKFS_RUNTIME_DIR"] = str(work / "run")
    backing, mnt = work / "backing", work / "mnt"
    backing.mkdir()
    mnt.mkdir()
    mounted = False
    try:
        console.print(f"[bold]blkfs demo[/] in {work}")
        # A short demo needs a short half-life; blocks written more than ~4 times in
        # the last few seconds count as dynamic.
        console.print(run("mount", str(backing), str(mnt), "--block-size", a.block_size,
                          "--heat-half-life", "10", "--static-heat", "4").strip())
        mounted = True
        files = {"disk.raw": disk, "vm.mem": mem}
        for name, size in files.items():
            with open(mnt / name, "wb") as f:
                f.truncate(size)
        with ControlClient.for_mount(str(mnt)) as c:
            for name in files:  # what a first full copy would take; start a fresh epoch
                c.call("dirty", file=name, swap=True)
            console.print(f"VM files: disk.raw {a.disk_size}, vm.mem {a.mem_size}; block size "
                          f"{a.block_size}; VM writes {a.write_rate:g} MB/s for {a.seconds:g}s, "
                          "90 % of writes on 10 % of the blocks")
            vm = multiprocessing.get_context("fork").Process(
                target=simulated_vm, name="simulated-vm",
                args=(mnt, files, block, a.write_rate, a.seconds, 0.1, 0.9, 42))
            vm.start()
            t0 = time.monotonic()
            with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                          TextColumn("{task.fields[dirty]}"), TimeRemainingColumn(),
                          console=console, transient=False) as prog:
                task = prog.add_task("simulated VM writing", total=a.seconds, dirty="")
                while vm.is_alive():
                    # What a migrator does each round: flush through the mount, so
                    # guest-RAM writes sitting in the page cache reach blkfs.
                    for name in files:
                        flush_file(str(mnt / name))
                    st = c.call("status")
                    dirty = ", ".join(f"{f['file']}: {f['dirty']} dirty / {f['dynamic']} hot"
                                      for f in st["files"])
                    prog.update(task, completed=min(a.seconds, time.monotonic() - t0),
                                dirty=dirty)
                    time.sleep(0.25)
                prog.update(task, completed=a.seconds)
            vm.join()
            if vm.exitcode != 0:
                raise SystemExit(f"the simulated VM failed (exit {vm.exitcode})")
            for name in files:
                flush_file(str(mnt / name))  # mmap writes reach blkfs at fsync
            status = c.call("status")
            heat = {n: c.call("heat", file=n) for n in files}
            dirty = {n: c.call("dirty", file=n) for n in files}
        report = summarize(status, heat, dirty, files, block, a)
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text(json.dumps(report, indent=1) + "\n")
        console.print(f"JSON report: {a.report}")
        return 0
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    finally:
        if mounted:
            console.print(run("umount", str(mnt)).strip())
        shutil.rmtree(work, ignore_errors=True)


def summarize(status: dict[str, Any], heat: dict[str, Any], dirty: dict[str, Any],
              files: dict[str, int], block: int, a: argparse.Namespace) -> dict[str, Any]:
    t = Table(title="what blkfs recorded", caption="dirty: written in this epoch; "
              "hot found: dynamic blocks that are in the writer's true hot set")
    for col in ("file", "blocks", "dirty", "static", "dynamic", "hot found", "hottest (heat)"):
        t.add_column(col, justify="left" if col == "file" else "right")
    out: dict[str, Any] = {"block_size": block, "write_rate_mb_s": a.write_rate,
                           "seconds": a.seconds, "files": {}}
    for f in status["files"]:
        name = f["file"]
        truth = set(hot_blocks(files[name] // block, 0.1, 42))
        dyn = {b for first, count in heat[name]["dynamic_extents"]
               for b in range(first, first + count)}
        found = len(dyn & truth)
        hottest = f["hottest"][0] if f["hottest"] else [None, 0]
        t.add_row(name, str(f["blocks"]), str(f["dirty"]), str(f["static"]), str(f["dynamic"]),
                  f"{found} of {len(truth)}", f"{hottest[0]} ({hottest[1]:.1f})")
        out["files"][name] = {
            "blocks": f["blocks"], "dirty_blocks": f["dirty"], "static": f["static"],
            "dynamic": f["dynamic"], "true_hot_blocks": len(truth), "dynamic_in_hot_set": found,
            "dirty_extents": dirty[name]["extents"], "hottest": f["hottest"],
        }
    console.print(t)
    console.print("A migrator would copy the static blocks first (coldest first), then the "
                  "dynamic ones, then only each epoch's dirty set.")
    return out


if __name__ == "__main__":
    sys.exit(main())
