"""The test guest migrated by the project and by QEMU's own migration, side by side (issue 11).

Four ways, alternating, medians of --runs each, per guest RAM size (default 128M and 512M):

* ``qemu``: QEMU 7.2's own live migration, no FUSE: ``migrate`` with block migration
  (``blk``) of the 64 MiB disk, ``downtime-limit 50``, ``max-bandwidth`` 10 GiB/s;
* ``qemu-default-bw``: the same at QEMU's default ``max-bandwidth`` (128 MiB/s): its estimate
  of the last set is better there and its downtime often lower; the summary compares ours with
  the lower of the two ("QEMU at its best");
* ``qemu-postcopy``: the same with ``postcopy-ram``, ``migrate-start-postcopy`` at once;
* ``ours``: blkfs mounts on both sides, ``migrator migrate --suspend qemu:`` into ``serve
  --resume qemu:`` (QEMU moves only its device state; RAM is a shared memory-backend-file);
* ``ours-postcopy``: the same with ``--postcopy``.

Downtime is measured the same way for all: from the source QEMU's ``STOP`` event to the
destination QEMU's ``RESUME`` event (QMP event timestamps, the same clock: one machine), on a
second QMP monitor of each QEMU. Also: total time, bytes on the wire (QEMU: RAM + disk
transferred; ours: the report's ``bytes_sent``, frames and verification included), and each
tool's own downtime figure. Every run checks that the guest ticks on at the destination.

    .venv/bin/python scripts/bench_qemu.py                  # 3 runs of each, 128M and 512M
    .venv/bin/python scripts/bench_qemu.py --runs 1 --ram 128M
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from migrator.qmp import QMP  # noqa: E402

PY = sys.executable
DISK = 64 << 20
WAYS = ("qemu", "qemu-default-bw", "ours", "qemu-postcopy", "ours-postcopy")


class Events:
    """A second QMP monitor that only listens: event name -> wall-clock timestamps."""

    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:  # (QEMU binds the socket a moment before it listens on it)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise SystemExit(f"no QMP socket listening at {path}") from None
                time.sleep(0.005)
        self.f = self.sock.makefile("rwb")
        json.loads(self.f.readline())  # greeting
        self.f.write(b'{"execute": "qmp_capabilities"}\n')
        self.f.flush()
        json.loads(self.f.readline())
        self.seen: dict[str, list[float]] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in self.f:
                msg = json.loads(line)
                if "event" in msg:
                    ts = msg["timestamp"]
                    self.seen.setdefault(msg["event"], []).append(
                        ts["seconds"] + ts["microseconds"] / 1e6)

    def first(self, name: str, timeout: float = 60.0) -> float | None:
        deadline = time.monotonic() + timeout
        while name not in self.seen and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.seen.get(name, [None])[0]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def qemu_argv(guest: Path, ram: str, disk: str, console: Path, mem_path: str | None,
              *qmp: Path) -> list[str]:
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", ram, "-display", "none", "-no-reboot",
            "-nodefaults", "-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.gz"),
            "-append", "console=ttyS0 quiet panic=-1", "-serial", f"file:{console}",
            "-drive", f"file={disk},format=raw,if=virtio,cache=writeback"]
    if mem_path:
        argv += ["-object", f"memory-backend-file,id=mem,size={ram},mem-path={mem_path},share=on",
                 "-machine", "memory-backend=mem"]
    for q in qmp:
        argv += ["-qmp", f"unix:{q},server=on,wait=off"]
    return argv


def ticks(console: Path) -> list[int]:
    try:
        text = console.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [int(n) for n in re.findall(r"TICK (\d+) disk=ok canary=ok", text)]


def wait_ticks(console: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(ticks(console)) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"the guest did not tick {n} times within {timeout:g} s ({console})")
        time.sleep(0.1)


def ticks_on(before: Path, after: Path, timeout: float = 60.0) -> bool:
    """The destination's guest goes on from where the source stopped (its RAM moved)."""
    last = max(ticks(before), default=0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = ticks(after)
        if t and t[-1] > last:
            return min(t) >= last
        time.sleep(0.2)
    return False


def kill_by_arg(marker: str) -> None:
    """SIGKILL every process one of whose arguments holds `marker`."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(marker.encode() in a for a in args):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)


def kill(procs: list[subprocess.Popen[Any]]) -> None:
    for pr in procs:
        if pr.poll() is None:
            pr.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            pr.wait(timeout=10)


def boot(guest: Path, ram: str, w: Path, disk: str, mem: str | None,
         procs: list[subprocess.Popen[Any]]) -> tuple[Path, Path, Path]:
    console, qmp, ev = w / "console-src.log", w / "qmp-src.sock", w / "ev-src.sock"
    with open(w / "qemu-src.log", "wb") as log:
        procs.append(subprocess.Popen(qemu_argv(guest, ram, disk, console, mem, qmp, ev),
                                      stdout=log, stderr=log))
    wait_ticks(console, 2, 120)
    return console, qmp, ev


def run_qemu(guest: Path, ram: str, w: Path, postcopy: bool,
             max_bandwidth: int | None = 10 << 30) -> dict[str, Any]:
    procs: list[subprocess.Popen[Any]] = []
    events: list[Events] = []
    try:
        (w / "a").mkdir()
        (w / "b").mkdir()
        for side in ("a", "b"):
            with open(w / side / "disk.raw", "wb") as f:
                f.truncate(DISK)
        con_src, qmp_src, ev_src = boot(guest, ram, w, str(w / "a" / "disk.raw"), None, procs)
        con_dst, qmp_dst, ev_dst = w / "console-dst.log", w / "qmp-dst.sock", w / "ev-dst.sock"
        with open(w / "qemu-dst.log", "wb") as log:
            procs.append(subprocess.Popen(
                [*qemu_argv(guest, ram, str(w / "b" / "disk.raw"), con_dst, None, qmp_dst,
                            ev_dst), "-incoming", "defer"], stdout=log, stderr=log))
        events += [Events(ev_src), Events(ev_dst)]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        caps = [{"capability": "postcopy-ram", "state": True}] if postcopy else []
        with QMP(str(qmp_dst)) as qd:
            if caps:
                qd.command("migrate-set-capabilities", capabilities=caps)
            qd.command("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        with QMP(str(qmp_src)) as q:
            if caps:
                q.command("migrate-set-capabilities", capabilities=caps)
            params: dict[str, int] = {"downtime-limit": 50}
            if max_bandwidth is not None:  # (None: QEMU's default)
                params["max-bandwidth"] = max_bandwidth
            q.command("migrate-set-parameters", **params)
            t0 = time.monotonic()
            q.command("migrate", uri=f"tcp:127.0.0.1:{port}", blk=True)
            if postcopy:
                while q.command("query-migrate").get("status") == "setup":
                    time.sleep(0.001)
                q.command("migrate-start-postcopy")
            disk: dict[str, Any] = {}  # block migration's figures vanish when it ends
            while True:
                info = q.command("query-migrate")
                if info.get("disk", {}).get("transferred", 0) >= disk.get("transferred", 0):
                    disk = info.get("disk", disk)
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.002)
            total = time.monotonic() - t0
        if info["status"] != "completed":
            raise SystemExit(f"QEMU's migration {info['status']}: {info.get('error-desc')}")
        stop, resume = events[0].first("STOP"), events[1].first("RESUME")
        sent = info.get("ram", {}).get("transferred", 0) + disk.get("transferred", 0)
        return {"downtime_ms": None if stop is None or resume is None else
                round((resume - stop) * 1e3, 1), "own_downtime_ms": info.get("downtime"),
                "total_s": round(total, 3), "bytes": sent, "ticks_on": ticks_on(con_src, con_dst),
                "detail": {"ram": info.get("ram", {}), "disk": disk}}
    finally:
        for e in events:
            e.close()
        kill(procs)


def run_ours(guest: Path, ram: str, w: Path, postcopy: bool,
             extra: tuple[str, ...] = ()) -> dict[str, Any]:
    env = dict(os.environ, BLKFS_RUNTIME_DIR=str(w / "run"))
    procs: list[subprocess.Popen[Any]] = []
    mounts: list[Path] = []
    events: list[Events] = []
    try:
        for side in ("src", "dst"):
            (w / f"{side}-b").mkdir()
            (w / side).mkdir()
            subprocess.run([PY, "-m", "blkfs.cli", "mount", str(w / f"{side}-b"), str(w / side)],
                           env=env, check=True, capture_output=True)
            mounts.append(w / side)
        src, dst = w / "src", w / "dst"
        ram_bytes = int(ram.rstrip("M")) << 20
        for name, size in (("disk.raw", DISK), ("vm.mem", ram_bytes)):
            with open(src / name, "wb") as f:
                f.truncate(size)
        con_src, qmp_src, ev_src = boot(guest, ram, w, f"{src}/disk.raw", f"{src}/vm.mem", procs)
        events.append(Events(ev_src))
        con_dst, ev_dst = w / "console-dst.log", w / "ev-dst.sock"
        cmdline = w / "qemu-dst.cmdline"
        cmdline.write_text(" ".join(shlex.quote(x) for x in qemu_argv(
            guest, ram, "$MIGRATOR_MOUNT/disk.raw", con_dst, "$MIGRATOR_MOUNT/vm.mem",
            ev_dst)) + "\n")
        key = w / "key"
        key.write_text(os.urandom(32).hex())
        key.chmod(0o600)
        serve = subprocess.Popen([PY, "-m", "migrator.cli", "serve", "--mount", str(dst),
                                  "--listen", "127.0.0.1:0", "--key-file", str(key), "--once",
                                  "--resume", f"qemu:{cmdline}"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(serve)
        assert serve.stdout is not None
        m = re.search(r"listening on [^:]+:(\d+)", serve.stdout.readline())
        if not m:
            raise SystemExit("migrator serve did not start")
        report = w / "report.json"
        cmd = [PY, "-m", "migrator.cli", "migrate", "--mount", str(src), "--to",
               f"127.0.0.1:{m.group(1)}", "--key-file", str(key), "--suspend", f"qemu:{qmp_src}",
               "--report", str(report), "disk.raw", "vm.mem"]
        if postcopy:
            cmd += ["--postcopy", "--spill", str(w / "spill")]
        cmd += extra
        t0 = time.monotonic()
        mig = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
        procs.append(mig)
        with contextlib.suppress(SystemExit):
            events.append(Events(ev_dst, timeout=60))
        _, err = mig.communicate(timeout=300)
        total = time.monotonic() - t0
        out, _ = serve.communicate(timeout=60)
        if mig.returncode != 0:
            raise SystemExit(f"migrator migrate failed: {err.strip().splitlines()[-1:]}")
        pm = re.search(r"QEMU pid (\d+) \(QMP and log in (\S+)\)", out)
        dest_log = [ln.strip() for ln in out.splitlines() if " ms" in ln]
        rep = json.loads(report.read_text())
        stop = events[0].first("STOP")
        resume = events[1].first("RESUME") if len(events) > 1 else None
        result = {"downtime_ms": None if stop is None or resume is None else
                  round((resume - stop) * 1e3, 1), "own_downtime_ms": rep["downtime_ms"],
                  "total_s": round(total, 3), "bytes": rep["bytes_sent"],
                  "ticks_on": ticks_on(con_src, con_dst),
                  "detail": {k: rep.get(k) for k in ("bytes_by_kind", "bytes_by_phase",
                                                      "bytes_by_file", "device_state_bytes",
                                                      "downtime_breakdown_ms", "last_set_pages",
                                                      "warm_set_pages", "load_reads",
                                                      "load_reads_left_absent", "postcopy_pages",
                                                      "rounds")},
                  "dest_log": dest_log}
        if pm:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pm.group(1)), 9)
            time.sleep(0.5)
            shutil.rmtree(pm.group(2), ignore_errors=True)  # (its QMP socket and log)
        return result
    finally:
        for e in events:
            e.close()
        kill(procs)
        # The destination QEMU runs detached from serve: found by its own event socket, so a
        # run that failed before serve named its pid leaves none behind either
        kill_by_arg(str(w / "ev-dst.sock"))
        for mnt in mounts:  # (blkfs umount waits for the daemon: its state file is written)
            for _ in range(20):
                if subprocess.run([PY, "-m", "blkfs.cli", "umount", str(mnt)],
                                  capture_output=True, env=env).returncode == 0:
                    break
                time.sleep(0.25)
            else:
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ram", action="append", help="guest RAM (repeatable; default 128M, 512M)")
    ap.add_argument("--ways", default=",".join(WAYS), help=f"comma list of {', '.join(WAYS)}")
    ap.add_argument("--json", default="reports/bench_qemu.json")
    ap.add_argument("--ours-flag", action="append", default=[], metavar="FLAG",
                    help="a flag for our `migrator migrate` (repeatable), e.g. --ours-flag="
                    "--warm-set=2")
    a = ap.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        raise SystemExit("qemu-system-x86_64 is missing: apt-get install qemu-system-x86")
    r = subprocess.run([str(ROOT / "scripts" / "build_guest.sh")], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"building the guest failed: {r.stderr.strip()[-300:]}")
    guest = Path(r.stdout.strip().splitlines()[-1])
    ways = a.ways.split(",")
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for ram in a.ram or ["128M", "512M"]:
        rows[ram] = {w: [] for w in ways}
        for i in range(a.runs):
            for way in ways:
                with tempfile.TemporaryDirectory(prefix="bench-qemu-") as d:
                    if way == "qemu-default-bw":
                        res = run_qemu(guest, ram, Path(d), False, None)
                    elif way.startswith("qemu"):
                        res = run_qemu(guest, ram, Path(d), way.endswith("postcopy"))
                    else:
                        res = run_ours(guest, ram, Path(d), way.endswith("postcopy"),
                                       tuple(a.ours_flag))
                print(f"{ram} run {i + 1} {way}: {res}", flush=True)
                rows[ram][way].append(res)
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    print("\n| RAM | way | downtime ms (STOP -> RESUME) | its own figure | total s | MB on "
          "the wire | guest ticks on |\n|---|---|---|---|---|---|---|")
    for ram, by_way in rows.items():
        summary[ram] = {}
        for way, runs in by_way.items():
            def med(k: str, runs: list[dict[str, Any]] = runs) -> float | None:
                vals = [x[k] for x in runs if x.get(k) is not None]
                return round(statistics.median(vals), 3) if vals else None
            s = {k: med(k) for k in ("downtime_ms", "own_downtime_ms", "total_s", "bytes")}
            s["ticks_on"] = all(x["ticks_on"] for x in runs)
            summary[ram][way] = s
            print(f"| {ram} | {way} | {s['downtime_ms']} | {s['own_downtime_ms']} | "
                  f"{s['total_s']} | {(s['bytes'] or 0) / 1e6:.1f} | "
                  f"{'yes' if s['ticks_on'] else 'NO'} |")
    print()
    for ram, s in summary.items():
        pre = [s[w]["downtime_ms"] for w in ("qemu", "qemu-default-bw")
               if w in s and s[w]["downtime_ms"] is not None]
        for ours, theirs in (("ours", min(pre) if pre else None),
                             ("ours-postcopy", s.get("qemu-postcopy", {}).get("downtime_ms"))):
            mine = s.get(ours, {}).get("downtime_ms")
            if mine is not None and theirs is not None:
                print(f"{ram}: {ours} {mine} ms against QEMU at its best {theirs} ms: "
                      f"{'at or below' if mine <= theirs else 'ABOVE'}")
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": rows, "medians": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
