"""Large VMs (issue 11, item 3): a 64 GiB sparse disk and an 8 GiB memory file; thin images.

Part 1, tracking at scale (one mount, 64 KiB blocks: 1,179,648 blocks tracked). A writer
touches 4 KiB of every memory block and of half the disk's blocks, each in random order: the
worst case for the heat (every run of equal heat is short) and a fragmented dirty set. Then,
through the control socket as the migrator asks them: the heat query and the initial-copy plan
(``migrator.plan.initial_order``) per file, a swap of a fragmented dirty set (in blocks, and
in 4 KiB pages as the migrator's rounds swap), and a status
query; medians of --repeat, plus the first call. The daemon's RSS before and after.

Part 2, a migration at scale: a fresh pair of mounts, the same file sizes holding
--data-mib of data each (1 MiB pieces at random offsets, written through the mount so that
they have heat), an idle VM: total time, bytes on the wire against the allocated data, the
destination's allocation, verification, the peak RSS of both daemons.

Part 3, thin images (issue 28): a dense 64 MiB file migrated alone (the yardstick), a 1 TiB
and a 4 TiB image holding the same 64 MiB alone, then each beside an 8 GiB memory file holding
as much: total time (and against the dense one), bytes, both sides' allocation, the peak RSS of
each process (both daemons, migrate and serve), and on a mount of its own the swap and heat
query times of the thin image with writes at both ends.

    .venv/bin/python scripts/bench_scale.py              # all parts (about 5 minutes)
    .venv/bin/python scripts/bench_scale.py --part 1     # tracking only
    .venv/bin/python scripts/bench_scale.py --part 3 --thin 1T   # thin images, 1 TiB only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blkfs import ctlproto as cp
from blkfs.control import ControlClient
from migrator.plan import initial_order

PY = sys.executable
DISK, MEM = 64 << 30, 8 << 30
BLOCK = 64 << 10
FILES = (("disk.raw", DISK), ("vm.mem", MEM))


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


class Mounts:
    """blkfs mounts under a temp dir; always unmounted."""

    def __init__(self, root: Path, names: tuple[str, ...]) -> None:
        self.root, self.names = root, names
        os.environ["BLKFS_RUNTIME_DIR"] = str(root / "run")
        self.mounted: list[Path] = []

    def __enter__(self) -> Mounts:
        for n in self.names:
            (self.root / f"{n}-backing").mkdir()
            (self.root / n).mkdir()
            subprocess.run([PY, "-m", "blkfs.cli", "mount", str(self.root / f"{n}-backing"),
                            str(self.root / n)], check=True, capture_output=True)
            self.mounted.append(self.root / n)
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.mounted:
            subprocess.run(["fusermount3", "-u", str(m)], capture_output=True)

    def pid(self, name: str) -> int:
        with ControlClient.for_mount(str(self.root / name)) as c:
            return c.call(cp.Info()).pid


def timed(fn: Any, repeat: int) -> tuple[float, float, Any]:
    """(first ms, median ms of the rest, last result)."""
    times, out = [], None
    for _ in range(repeat + 1):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1e3)
    return round(times[0], 1), round(statistics.median(times[1:]), 1), out


def part1(tmp: Path, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with Mounts(tmp, ("m",)) as ms:
        m = tmp / "m"
        pid = ms.pid("m")
        out["rss_mounted_mb"] = round(rss_mb(pid), 1)
        for name, size in FILES:
            with open(m / name, "wb") as f:
                f.truncate(size)
        rng = random.Random(1)
        piece = os.urandom(4096)
        t = time.monotonic()
        fds = {n: os.open(m / n, os.O_RDWR) for n, _ in FILES}
        try:
            for name, blocks in (("disk.raw", rng.sample(range(DISK // BLOCK), DISK // BLOCK // 2)),
                                 ("vm.mem", rng.sample(range(MEM // BLOCK), MEM // BLOCK))):
                for b in blocks:
                    os.pwrite(fds[name], piece, b * BLOCK)
            out["writes"] = DISK // BLOCK // 2 + MEM // BLOCK
            out["write_s"] = round(time.monotonic() - t, 1)
            out["rss_written_mb"] = round(rss_mb(pid), 1)
            with ControlClient.for_mount(str(m)) as c:
                for name, _ in FILES:
                    row: dict[str, Any] = {}
                    first, med, h = timed(lambda n=name: c.call(cp.Heat(n)), repeat)
                    runs = h.heat_runs()
                    row.update(heat_first_ms=first, heat_ms=med, heat_runs=len(runs),
                               blocks=h.blocks)
                    first, med, plan = timed(
                        lambda h=h, r=runs: initial_order(h.blocks, r, h.static_heat), repeat)
                    row.update(plan_ms=med, plan_extents=len(plan[0]) + len(plan[1]))
                    c.call(cp.Dirty(name, swap=True))  # a fresh epoch, then a scattered one
                    for b in rng.sample(range(h.blocks), min(h.blocks, 200_000)):
                        os.pwrite(fds[name], piece, b * BLOCK)
                    t = time.perf_counter()
                    d = c.call(cp.Dirty(name, swap=True))
                    row.update(swap_ms=round((time.perf_counter() - t) * 1e3, 1),
                               swap_extents=len(d.extents))
                    for b in rng.sample(range(h.blocks), min(h.blocks, 200_000)):
                        os.pwrite(fds[name], piece, b * BLOCK)  # again: as the migrator swaps
                    t = time.perf_counter()
                    d = c.call(cp.Dirty(name, swap=True, pages=True))
                    row.update(swap_pages_ms=round((time.perf_counter() - t) * 1e3, 1),
                               swap_page_extents=len(d.extents))
                    out[name] = row
                first, med, _ = timed(lambda: c.call(cp.Status()), repeat)
                out["status_ms"] = med
            out["rss_after_mb"] = round(rss_mb(pid), 1)
            out["rss_peak_mb"] = round(rss_mb(pid, "VmHWM"), 1)
        finally:
            for fd in fds.values():
                os.close(fd)
    return out


def _run(argv: list[str], **kw: Any) -> tuple[subprocess.Popen[str], Any]:
    """A child process's exit and its resource usage (ru_maxrss: its peak RSS, KiB)."""
    proc = subprocess.Popen(argv, text=True, **kw)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc, usage


def migrate_files(tmp: Path, files: list[tuple[str, int, int]], piece: int = 1 << 20,
                  seed: int = 2) -> dict[str, Any]:
    """One migration, on fresh mounts, of files (name, size, MiB of data in `piece`s at random
    offsets, written through the mount so they have heat), an idle VM: times, bytes, the
    allocation on both sides, each process's peak RSS (MB)."""
    key = tmp / "key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o600)
    with Mounts(tmp, ("src", "dst")) as ms:
        src = tmp / "src"
        rng = random.Random(seed)
        for name, size, data_mib in files:
            with open(src / name, "wb") as f:
                f.truncate(size)
                for i in sorted(rng.sample(range(size // piece), data_mib * (1 << 20) // piece)):
                    f.seek(i * piece)
                    f.write(os.urandom(piece))
        pids = {n: ms.pid(n) for n in ("src", "dst")}
        vm = subprocess.Popen(["sleep", "600"])
        serve = subprocess.Popen([PY, "-m", "migrator.cli", "serve", "--mount", str(tmp / "dst"),
                                  "--listen", "127.0.0.1:0", "--key-file", str(key), "--once"],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert serve.stdout is not None
            port = re.search(r":(\d+),", serve.stdout.readline())
            assert port, "serve did not start"
            report = tmp / "report.json"
            t = time.monotonic()
            mig, usage = _run([PY, "-m", "migrator.cli", "migrate", "--mount", str(src), "--to",
                               f"127.0.0.1:{port.group(1)}", "--key-file", str(key),
                               "--suspend", f"pid:{vm.pid}", "--report", str(report),
                               *(n for n, _, _ in files)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            wall = time.monotonic() - t
            if mig.returncode != 0:
                raise SystemExit(f"migrate failed: {mig.stderr.read() if mig.stderr else ''}")
            serve.stdout.read()
            _, _, serve_usage = os.wait4(serve.pid, 0)
            serve.returncode = 0
            rep = json.loads(report.read_text())

            def alloc(side: str) -> int:
                return sum(os.stat(tmp / f"{side}-backing" / n).st_blocks * 512
                           for n, _, _ in files)

            return {
                "files": [{"name": n, "size": sz, "data_mib": d} for n, sz, d in files],
                "total_s": rep["total_s"], "wall_s": round(wall, 2),
                "initial_copy_s": rep.get("initial_copy_s"), "verify_s": rep.get("verify_s"),
                "bytes_sent": rep["bytes_sent"], "allocated_src": alloc("src"),
                "allocated_dst": alloc("dst"), "verified": rep["verified"],
                "downtime_ms": rep["downtime_ms"],
                "downtime_breakdown_ms": rep.get("downtime_breakdown_ms"),
                "rss_peak_src_daemon_mb": round(rss_mb(pids["src"], "VmHWM"), 1),
                "rss_peak_dst_daemon_mb": round(rss_mb(pids["dst"], "VmHWM"), 1),
                "rss_peak_migrate_mb": round(usage.ru_maxrss / 1024, 1),
                "rss_peak_serve_mb": round(serve_usage.ru_maxrss / 1024, 1),
            }
        finally:
            for pr in (vm, serve):
                if pr.poll() is None:
                    pr.kill()
                    pr.wait()


def part2(tmp: Path, data_mib: int) -> dict[str, Any]:
    return migrate_files(tmp, [(n, size, data_mib) for n, size in FILES])


def part3(tmp: Path, sizes: list[int], data_mib: int) -> dict[str, Any]:
    """Thin images (issue 28): a dense file of `data_mib` MiB alone (the yardstick), then each
    thin size holding the same data beside an 8 GiB memory file holding as much: the thin ones
    should cost like their data, not their size."""
    out: dict[str, Any] = {}
    (tmp / "dense").mkdir()
    out["dense"] = migrate_files(tmp / "dense", [("disk.raw", data_mib << 20, data_mib)])
    for size in sizes:  # the thin image alone: issue 28's "at most 2x the dense file's time"
        d = tmp / f"alone-{size >> 40}T"
        d.mkdir()
        out[f"thin_{size >> 40}T_alone"] = row = migrate_files(
            d, [("disk.raw", size, data_mib)])
        row["vs_dense"] = round(row["total_s"] / max(out["dense"]["total_s"], 1e-9), 2)
    for size in sizes:
        d = tmp / f"thin-{size >> 40}T"
        d.mkdir()
        out[f"thin_{size >> 40}T"] = row = migrate_files(
            d, [("disk.raw", size, data_mib), ("vm.mem", MEM, data_mib)])
        row["vs_dense"] = round(row["total_s"] / max(out["dense"]["total_s"], 1e-9), 2)
        row.update(tracking_queries(d, size))
    return out


def tracking_queries(tmp: Path, size: int) -> dict[str, Any]:
    """A thin image's swap and heat query times on a mount of its own, writes at both ends."""
    (tmp / "q").mkdir()
    with Mounts(tmp / "q", ("m",)) as ms:
        m = tmp / "q" / "m"
        with open(m / "disk.raw", "wb") as f:
            f.truncate(size)
        fd = os.open(m / "disk.raw", os.O_RDWR)
        try:
            for off in (0, size // 2, size - BLOCK):
                os.pwrite(fd, os.urandom(BLOCK), off)
        finally:
            os.close(fd)
        with ControlClient.for_mount(str(m)) as c:
            first, med, _ = timed(lambda: c.call(cp.Dirty("disk.raw", swap=True, pages=True)), 3)
            hfirst, hmed, h = timed(lambda: c.call(cp.Heat("disk.raw")), 3)
        return {"swap_first_ms": first, "swap_ms": med, "heat_first_ms": hfirst,
                "heat_ms": hmed, "heat_dynamic_blocks": h.dynamic,
                "query_daemon_rss_peak_mb": round(rss_mb(ms.pid("m"), "VmHWM"), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", type=int, choices=(1, 2, 3), help="run one part only")
    ap.add_argument("--thin", action="append", type=lambda t: int(t.rstrip("T")) << 40,
                    help="part 3's thin image sizes in TiB (repeatable; default 1T and 4T)")
    ap.add_argument("--repeat", type=int, default=5, help="query repeats (median)")
    ap.add_argument("--data-mib", type=int, default=512, help="data in each file, part 2")
    ap.add_argument("--json", default="reports/bench_scale.json")
    a = ap.parse_args()
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as d:
        if a.part in (None, 1):
            (Path(d) / "p1").mkdir()
            res["tracking"] = part1(Path(d) / "p1", a.repeat)
            print(json.dumps(res["tracking"], indent=1))
        if a.part in (None, 2):
            (Path(d) / "p2").mkdir()
            res["migration"] = part2(Path(d) / "p2", a.data_mib)
            print(json.dumps(res["migration"], indent=1))
        if a.part in (None, 3):
            (Path(d) / "p3").mkdir()
            res["thin"] = part3(Path(d) / "p3", a.thin or [1 << 40, 4 << 40], 64)
            print(json.dumps(res["thin"], indent=1))
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
