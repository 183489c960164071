"""Benchmark (issue 25): `migrator evacuate` of busy simulated VMs, against the same VMs
migrated one after the other, on one machine (loopback TCP, two blkfs mounts).

Each row starts from fresh mounts: N VMs (default 4) of DISK + MEM (default 256 MiB + 64 MiB,
full of data: a VM that ran a while, not a sparse new one), each a `migrator.simvm` process
writing W MB/s (default 5; 90 % of its writes on 10 % of its blocks) for a warm-up, then
evacuated into one `migrator serve`.

* capped: `--bandwidth 100` (the budget of all migrations together) with --parallel 2, and
  --parallel 1 (the serial migrations); target: total <= 1.15 x (bytes sent / 100 MB/s),
  every downtime <= 50 ms, every VM verified;
* uncapped: --parallel 1, 2, 4: total time, and the CPU seconds of the source and
  destination daemons, of the migrate processes (with evacuate) and of serve.

Every VM is verified by the migrator, and each copy compared byte for byte with its source
(which stays as it was at the suspend: the VM is retired there).

    .venv/bin/python scripts/bench_evacuate.py            # (also: bench_migrate.py --evacuate)
    .venv/bin/python scripts/bench_evacuate.py --vms 2 --disk-size 64M --mem-size 16M  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

PY = sys.executable
UNIT = 65536
console = Console(width=200)


def sh(*args: str) -> str:
    r = subprocess.run(list(args), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} failed: {r.stderr.strip()[-500:]}")
    return r.stdout


def cpu_s(pid: int) -> float:
    """utime + stime of a live process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_pid(mnt: Path) -> int:
    from blkfs.runtime import DaemonInfo

    info = DaemonInfo.find(str(mnt))
    assert info is not None, f"no blkfs daemon on {mnt}"
    return info.pid


def digest(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def fill(vm: Path) -> None:
    """Data everywhere but the VM's header and ledger (bench_migrate's, for one VM's dir)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_migrate import fill_with_data

    fill_with_data(vm)


def row(a: argparse.Namespace, tmp: Path, name: str, parallel: int,
        bandwidth: float | None) -> dict[str, Any]:
    console.print(f"{name} ...")
    root = tmp / re.sub(r"\W+", "-", name)
    root.mkdir()
    os.environ["BLKFS_RUNTIME_DIR"] = str(root / "run")
    key = root / "key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o600)
    mounts = []
    vms: dict[str, subprocess.Popen[bytes]] = {}
    serve = None
    try:
        for m in ("src", "dst"):
            (root / f"{m}-backing").mkdir()
            (root / m).mkdir()
            sh(PY, "-m", "blkfs.cli", "mount", str(root / f"{m}-backing"), str(root / m))
            mounts.append(root / m)
        src, dst = mounts
        for i in range(1, a.vms + 1):
            d = src / f"vm{i}"
            d.mkdir()
            sh(PY, "-m", "migrator.simvm", "create", str(d), "--disk-size", a.disk_size,
               "--mem-size", a.mem_size, "--unit", str(UNIT), "--seed", str(i))
            fill(d)
        for i in range(1, a.vms + 1):
            vms[f"vm{i}"] = subprocess.Popen(
                [PY, "-m", "migrator.simvm", "run", str(src / f"vm{i}"), "--rate",
                 str(a.write_rate / 1.048576), "--hot-fraction", "0.1", "--hot-share", "0.9"],
                stdout=subprocess.DEVNULL)
        serve = subprocess.Popen([PY, "-m", "migrator.cli", "serve", "--mount", str(dst),
                                  "--listen", "127.0.0.1:0", "--key-file", str(key)],
                                 stdout=subprocess.PIPE, text=True)
        assert serve.stdout is not None
        port = re.search(r":(\d+),", serve.stdout.readline())
        assert port, "serve did not start"
        time.sleep(a.warmup)
        daemons = [daemon_pid(m) for m in mounts]
        cpu0 = [cpu_s(p) for p in (*daemons, serve.pid)]
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        report = root / "evacuation.json"
        cmd = [PY, "-m", "migrator.cli", "evacuate", "--mount", str(src), "--to",
               f"127.0.0.1:{port.group(1)}", "--key-file", str(key), "--parallel",
               str(parallel), "--report", str(report),
               *(f"--suspend=vm{i}=pid:{vms[f'vm{i}'].pid}" for i in range(1, a.vms + 1))]
        if bandwidth:
            cmd += ["--bandwidth", f"{bandwidth:g}"]
        t = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.monotonic() - t
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu1 = [cpu_s(p) for p in (*daemons, serve.pid)]
        if r.returncode != 0:
            raise SystemExit(f"{name}: evacuate failed: {r.stderr.strip()[-400:]}")
        doc = json.loads(report.read_text())
        for v in vms.values():
            v.wait(timeout=30)  # retired: pid: kills it
        # The source copies are as they were at each suspend (their VMs were retired):
        # each destination copy must equal them byte for byte
        same = all(digest(src / n / f) == digest(dst / n / f) for n in vms
                   for f in ("disk.raw", "vm.mem"))
        recs = doc["vms"]
        return {
            "row": name, "parallel": parallel, "bandwidth_mb_s": bandwidth,
            "total_s": round(wall, 2), "bytes_sent": doc["bytes_sent"],
            "floor_s": round(doc["bytes_sent"] / (bandwidth * 1e6), 2) if bandwidth else None,
            "sum_of_migrations_s": round(sum(v["total_s"] or 0 for v in recs), 2),
            "downtime_ms": [v["downtime_ms"] for v in recs],
            "verified": all(v["verified"] for v in recs), "identical": same,
            "cpu_s": {"src daemon": round(cpu1[0] - cpu0[0], 2),
                      "dst daemon": round(cpu1[1] - cpu0[1], 2),
                      "serve": round(cpu1[2] - cpu0[2], 2),
                      "evacuate + migrates": round(
                          kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime, 2)},
            "evacuate_total_s": doc["total_s"],
            "vms": {v["vm"]: {"to_s": v["total_s"], "downtime_ms": v["downtime_ms"],
                              "bytes_sent": v["bytes_sent"],
                              "timeline": [{k: x[k] for k in ("started_s", "phases_s", "ended_s")}
                                           for x in v["attempts"]]} for v in recs},
        }
    finally:
        for v in vms.values():
            if v.poll() is None:
                v.kill()
                v.wait()
        if serve is not None and serve.poll() is None:
            serve.kill()
            serve.wait()
        for m in mounts:
            if subprocess.run([PY, "-m", "blkfs.cli", "umount", str(m)],
                              capture_output=True).returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=4)
    ap.add_argument("--disk-size", default="256M")
    ap.add_argument("--mem-size", default="64M")
    ap.add_argument("--write-rate", type=float, default=5.0, metavar="MB/s")
    ap.add_argument("--warmup", type=float, default=3.0, metavar="S")
    ap.add_argument("--bandwidth", type=float, default=100.0, metavar="MB/s",
                    help="the capped rows' budget (default 100)")
    ap.add_argument("--parallel", type=int, action="append",
                    help="the uncapped rows (default 1, 2, 4)")
    ap.add_argument("--only", choices=("capped", "uncapped"))
    ap.add_argument("--json", default="reports/bench_evacuate.json")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-evacuate-") as tmp:
        if a.only != "uncapped":
            for p in (2, 1):
                rows.append(row(a, Path(tmp), f"capped {a.bandwidth:g} MB/s, parallel {p}", p,
                                a.bandwidth))
        if a.only != "capped":
            for p in a.parallel or (1, 2, 4):
                rows.append(row(a, Path(tmp), f"uncapped, parallel {p}", p, None))
    t = Table(title=f"evacuate {a.vms} VMs of {a.disk_size} + {a.mem_size}, each writing "
              f"{a.write_rate:g} MB/s")
    for col in ("row", "total s", "floor s", "total / floor", "sum of migrations s", "MB sent",
                "downtimes ms", "verified", "CPU s: src daemon / dst daemon / serve / migrates"):
        t.add_column(col)
    for r in rows:
        c = r["cpu_s"]
        t.add_row(r["row"], f"{r['total_s']:.2f}",
                  "-" if r["floor_s"] is None else f"{r['floor_s']:.2f}",
                  "-" if r["floor_s"] is None else f"{r['total_s'] / r['floor_s']:.3f}",
                  f"{r['sum_of_migrations_s']:.2f}", f"{r['bytes_sent'] / 1e6:.1f}",
                  ", ".join(f"{d:.1f}" if d is not None else "-" for d in r["downtime_ms"]),
                  "yes" if r["verified"] and r["identical"] else "NO",
                  " / ".join(f"{v:.1f}" for v in c.values()))
    console.print(t)
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    console.print(f"JSON: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
