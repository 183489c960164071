"""Copy speed of an idle migration on loopback, and where the CPU goes (issue 11, item 2).

A dense file set (default 1 GiB disk + 256 MiB memory, random bytes) on a fresh pair of
blkfs mounts, an idle VM (`sleep`), one migration: the initial-copy bandwidth, the
verification and total times, and the CPU seconds of each process (source migrator, serve,
both blkfs daemons). Compares code versions in one run, alternating:

    .venv/bin/python scripts/bench_copy.py --runs 3 --tree /tmp/old-worktree --tree .

With --compress off --compress lz4 --compress zstd --bandwidth 100 --data mixed it compares
compression on a slow link (issue 11, item 2). With --channel sealed --channel plaintext it
measures what sealing the frames costs (issue 13: target <= 10 % at full loopback speed).

Before each run it syncs and, as root, drops the page cache: on this machine a cache full of
earlier runs' pages made the same copy 2-3x slower (every new page had to be reclaimed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def daemon_pid(mnt: Path, env: dict[str, str], tree: Path) -> int:
    out = subprocess.run([PY, "-m", "blkfs.cli", "status", str(mnt), "--json"], env=env,
                         cwd=tree, capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)["pid"])


def piece(i: int, kind: str) -> bytes:
    """1 MiB of test data: random, or (mixed) a third each of log text, random bytes and
    sparse bytes (every other byte zero), as a guest's pages are: some compress, some not."""
    if kind == "random" or i % 3 == 1:
        return os.urandom(1 << 20)
    if i % 3 == 0:
        text = b"".join(b"%08d kernel: eth0 link up, 1000 Mbps, full duplex\n" % (i * 20000 + j)
                        for j in range(20000))
        return text[: 1 << 20]
    out = bytearray(1 << 20)
    out[::2] = os.urandom(1 << 19)
    return bytes(out)


def one(tree: Path, disk_mib: int, mem_mib: int, compress: str | None = None,
        bandwidth: float | None = None, data_kind: str = "random",
        channel: str = "sealed") -> dict[str, float]:
    clear = ["--insecure-plaintext"] if channel == "plaintext" else []
    os.sync()  # the last run's dirty pages would be written back during this one
    if os.geteuid() == 0:  # and a page cache full of them makes every new page cost: the
        with open("/proc/sys/vm/drop_caches", "w") as f:  # same run went 314 -> 1034 MB/s
            f.write("3\n")
    env = dict(os.environ, PYTHONPATH=str(tree))
    with tempfile.TemporaryDirectory(prefix="bench-copy-") as d:
        w = Path(d)
        env["BLKFS_RUNTIME_DIR"] = str(w / "run")
        key = w / "key"
        key.write_text(os.urandom(32).hex())
        key.chmod(0o600)
        mounts: list[Path] = []
        vm = subprocess.Popen(["sleep", "600"])
        serve = None
        try:
            for side in ("src", "dst"):
                (w / f"{side}-b").mkdir()
                (w / side).mkdir()
                subprocess.run([PY, "-m", "blkfs.cli", "mount", str(w / f"{side}-b"),
                                str(w / side)], env=env, cwd=tree, check=True,
                               capture_output=True)
                mounts.append(w / side)
            for name, mib in (("disk.raw", disk_mib), ("vm.mem", mem_mib)):
                with open(w / "src" / name, "wb") as f:
                    for i in range(mib):
                        f.write(piece(i, data_kind))
            os.sync()  # the fill's writeback must not run during the copy
            daemons = [daemon_pid(m, env, tree) for m in mounts]
            serve = subprocess.Popen([PY, "-m", "migrator.cli", "serve", "--mount",
                                      str(w / "dst"), "--listen", "127.0.0.1:0", "--key-file",
                                      str(key), "--once", *clear], env=env, cwd=tree,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
            assert serve.stdout is not None
            port = re.search(r":(\d+),", serve.stdout.readline())
            assert port, "serve did not start"
            before = [cpu_s(p) for p in (*daemons, serve.pid)]
            report = w / "report.json"
            mig = subprocess.Popen([PY, "-m", "migrator.cli", "migrate", "--mount",
                                    str(w / "src"), "--to", f"127.0.0.1:{port.group(1)}",
                                    "--key-file", str(key), "--suspend", f"pid:{vm.pid}",
                                    "--report", str(report), "disk.raw", "vm.mem",
                                    *(["--compress", compress] if compress else []),
                                    *(["--bandwidth", str(bandwidth)] if bandwidth else []),
                                    *clear],
                                   env=env,
                                   cwd=tree, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
            mig_cpu = 0.0
            while mig.poll() is None:
                mig_cpu = max(mig_cpu, cpu_s(mig.pid))
                try:
                    mig.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
            if mig.returncode != 0:
                raise SystemExit(f"migrate failed in {tree}: {mig.stderr.read().strip()}")
            after = [cpu_s(p) for p in (*daemons, serve.pid)]
            serve.wait(timeout=30)
            rep = json.loads(report.read_text())
            data = rep["data_bytes"]
            return {"initial_copy_MBps": round(data / rep["initial_copy_s"] / 1e6, 1),
                    "initial_copy_s": round(rep["initial_copy_s"], 3),
                    "verify_s": rep["verify_s"], "total_s": rep["total_s"],
                    "sent_MB": round(rep["bytes_sent"] / 1e6, 1),
                    "cpu_source_s": round(mig_cpu, 2),
                    "cpu_src_daemon_s": round(after[0] - before[0], 2),
                    "cpu_dst_daemon_s": round(after[1] - before[1], 2),
                    "cpu_serve_s": round(after[2] - before[2], 2)}
        finally:
            vm.kill()
            vm.wait()
            if serve is not None and serve.poll() is None:
                serve.kill()
            for m in reversed(mounts):
                subprocess.run([PY, "-m", "blkfs.cli", "umount", str(m)], env=env, cwd=tree,
                               capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", type=Path, help="a checkout (repeatable)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--mem-mib", type=int, default=256)
    ap.add_argument("--compress", action="append", choices=("off", "zstd", "lz4"),
                    help="compare these (repeatable; default off)")
    ap.add_argument("--bandwidth", type=float, metavar="MB/s", help="cap the link")
    ap.add_argument("--data", choices=("random", "mixed"), default="random",
                    help="random bytes, or a mix that partly compresses (see piece())")
    ap.add_argument("--channel", action="append", choices=("sealed", "plaintext"),
                    help="compare these (repeatable; default sealed; plaintext runs both "
                    "sides with --insecure-plaintext)")
    a = ap.parse_args()
    trees = [t.resolve() for t in (a.tree or [Path(".")])]
    ways = [(t, c, ch) for t in trees for c in (a.compress or ["off"])
            for ch in (a.channel or ["sealed"])]
    got: dict[tuple[Path, str, str], list[dict[str, float]]] = {w: [] for w in ways}
    for i in range(a.runs):
        for t, c, ch in ways:
            r = one(t, a.disk_mib, a.mem_mib, None if c == "off" else c, a.bandwidth, a.data,
                    ch)
            got[(t, c, ch)].append(r)
            print(f"run {i + 1} {t} compress {c} channel {ch}: {r}", flush=True)
    for (t, c, ch), rs in got.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"{t} compress {c} channel {ch}: medians over {len(rs)} runs: {med}")


if __name__ == "__main__":
    main()
