"""Benchmark: live migration of a busy simulated VM, against two baselines.

Each scenario runs on a fresh pair of blkfs mounts (source and destination on
this machine, loopback TCP): a simulated VM (migrator.simvm, 64 KiB units so
that "90 % of writes on 10 % of the blocks" holds at blkfs's block size)
writes to a disk and a memory file for a warm-up period, then is migrated:

* stop-and-copy — suspend, copy everything, resume (``--stop-and-copy``);
* pre-copy in block order — no static-first ordering (``--no-static-first``);
* ours — static blocks coldest first, dirty rounds, switchover.

Also measured: an idle ``cp`` of the same files from the source mount to the
destination mount (both through FUSE, VM not running). Every migration is
verified by the migrator and checked against the VM's own ledger.

    .venv/bin/python scripts/bench_migrate.py            # 1 GiB disk + 256 MiB memory
    .venv/bin/python scripts/bench_migrate.py --quick    # 256 MiB + 64 MiB, shorter warm-up
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

PY = sys.executable
console = Console()
UNIT = 65536


def sh(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} failed: {r.stderr.strip()[-500:]}")
    return r


class Hosts:
    """Two blkfs mounts in a temp dir; always unmounted."""

    def __init__(self, root: Path) -> None:
        self.root = root
        os.environ["BLKFS_RUNTIME_DIR"] = str(root / "run")
        self.src, self.dst = root / "src", root / "dst"
        self.mounted: list[Path] = []

    def __enter__(self) -> Hosts:
        for m in (self.src, self.dst):
            (self.root / f"{m.name}-backing").mkdir()
            m.mkdir()
            sh(PY, "-m", "blkfs.cli", "mount", str(self.root / f"{m.name}-backing"), str(m))
            self.mounted.append(m)
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.mounted:
            r = subprocess.run([PY, "-m", "blkfs.cli", "umount", str(m)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True)


def idle_cp(a: argparse.Namespace, root: Path) -> float:
    with Hosts(root) as h:
        sh(PY, "-m", "migrator.simvm", "create", str(h.src), "--disk-size", a.disk_size,
           "--mem-size", a.mem_size, "--unit", str(UNIT))
        t = time.monotonic()
        for name in ("disk.raw", "vm.mem"):
            sh("cp", "--sparse=never", str(h.src / name), str(h.dst / name))
        return time.monotonic() - t


def scenario(a: argparse.Namespace, root: Path, name: str, flags: list[str]) -> dict[str, Any]:
    key = root / "key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o600)
    with Hosts(root) as h:
        sh(PY, "-m", "migrator.simvm", "create", str(h.src), "--disk-size", a.disk_size,
           "--mem-size", a.mem_size, "--unit", str(UNIT))
        vm = subprocess.Popen([PY, "-m", "migrator.simvm", "run", str(h.src), "--rate",
                               str(a.write_rate / 1.048576), "--hot-fraction", "0.1",
                               "--hot-share", "0.9"], stdout=subprocess.DEVNULL)
        serve = subprocess.Popen([PY, "-m", "migrator.cli", "serve", "--mount", str(h.dst),
                                  "--listen", "127.0.0.1:0", "--key-file", str(key), "--once"],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert serve.stdout is not None
            port = re.search(r":(\d+),", serve.stdout.readline())
            if not port:
                raise SystemExit("migrator serve did not start")
            time.sleep(a.warmup)
            report = root / "report.json"
            cmd = [PY, "-m", "migrator.cli", "migrate", "--mount", str(h.src), "--to",
                   f"127.0.0.1:{port.group(1)}", "--key-file", str(key), "--suspend",
                   f"pid:{vm.pid}", "--report", str(report), *flags, "disk.raw", "vm.mem"]
            if a.bandwidth:
                cmd += ["--bandwidth", str(a.bandwidth)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{name}: migration failed: {r.stderr.strip()[-300:]}")
            serve.communicate(timeout=60)
            vm.wait(timeout=10)
            chk = subprocess.run([PY, "-m", "migrator.simvm", "check", str(h.dst)],
                                 capture_output=True, text=True)
            rep = json.loads(report.read_text())
            rep["ledger_check"] = chk.returncode == 0
            return rep
        finally:
            for pr in (vm, serve):
                if pr.poll() is None:
                    pr.kill()
                    pr.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--disk-size", default="1G")
    ap.add_argument("--mem-size", default="256M")
    ap.add_argument("--write-rate", type=float, default=20.0, metavar="MB/s")
    ap.add_argument("--warmup", type=float, default=5.0, metavar="S",
                    help="seconds the VM runs before the migration starts (default 5)")
    ap.add_argument("--bandwidth", type=float, metavar="MB/s", help="cap the link")
    ap.add_argument("--json", default="reports/bench_migrate.json")
    ap.add_argument("--quick", action="store_true", help="256M + 64M, 2 s warm-up")
    a = ap.parse_args()
    if a.quick:
        a.disk_size, a.mem_size, a.warmup = "256M", "64M", 2.0
    results: dict[str, Any] = {"params": vars(a)}
    scenarios = [("stop-and-copy", ["--stop-and-copy"]),
                 ("pre-copy, block order", ["--no-static-first"]),
                 ("ours (static first)", [])]
    with tempfile.TemporaryDirectory(prefix="bench-migrate-") as tmp:
        console.print(f"idle cp of {a.disk_size} + {a.mem_size} between the two mounts ...")
        (Path(tmp) / "cp").mkdir()
        results["idle_cp_s"] = round(idle_cp(a, Path(tmp) / "cp"), 3)
        for name, flags in scenarios:
            console.print(f"{name} ...")
            root = Path(tmp) / re.sub(r"\W+", "-", name)
            root.mkdir()
            results[name] = scenario(a, root, name, flags)
            shutil.rmtree(root, ignore_errors=True)
    t = Table(title=f"live migration, {a.disk_size} disk + {a.mem_size} memory, VM writing "
              f"{a.write_rate:g} MB/s (90 % on 10 % of the blocks)")
    for col in ("scenario", "total s", "downtime ms", "sent / data", "rounds", "verified"):
        t.add_column(col, justify="left" if col == "scenario" else "right")
    for name, _ in scenarios:
        r = results[name]
        t.add_row(name, f"{r['total_s']:.2f}", f"{r['downtime_ms']:.1f}",
                  f"{r['bytes_sent'] / r['data_bytes']:.3f}", str(len(r["rounds"])),
                  "yes" if r["verified"] and r["ledger_check"] else "NO")
    t.add_row("idle cp (mount to mount)", f"{results['idle_cp_s']:.2f}", "-", "1.000", "-", "-")
    console.print(t)
    ours, sac = results["ours (static first)"], results["stop-and-copy"]
    targets = {
        "downtime <= 50 ms": ours["downtime_ms"] <= 50,
        "downtime >= 50x shorter than stop-and-copy":
            sac["downtime_ms"] >= 50 * ours["downtime_ms"],
        "bytes sent <= 1.15 x data": ours["bytes_sent"] <= 1.15 * ours["data_bytes"],
        "total <= 1.5 x idle cp": ours["total_s"] <= 1.5 * results["idle_cp_s"],
    }
    results["targets"] = targets
    for k, ok in targets.items():
        console.print(f"  {'[green]met[/]' if ok else '[red]MISSED[/]'}  {k}")
    ratio = sac["downtime_ms"] / ours["downtime_ms"]
    console.print(f"  stop-and-copy downtime / ours: {ratio:.0f}x; "
                  f"total / idle cp: {ours['total_s'] / results['idle_cp_s']:.2f}x")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    console.print(f"JSON: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
