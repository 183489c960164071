#!/usr/bin/env python3
"""Benchmark blkfs against the bare backing directory with fio.

What it measures: fio throughput (psync engine, one job, buffered I/O: direct=0) on a file of
--size, for each case below, on these targets, all mounted at once and run interleaved (every
case runs on every target before the next case, the target order rotating per repeat), so the
ratios come from the same minutes of a noisy machine:

* native    -- the backing directory itself (ext4 or whatever holds --dir);
* blkfs     -- blkfs with dirty-block tracking (the default mount);
* no-track  -- blkfs --no-tracking (plain passthrough, nothing recorded);
* reference -- with --reference: pyfuse3's own examples/passthroughfs.py, taken at run time
  from the pyfuse3 sdist of the installed version (pip download, untarred in the temp dir);
* xattr     -- with --xattr-check: blkfs --xattr, 4 KiB random writes only, to show the cost
  of answering getxattr (the kernel asks GETXATTR security.capability before every write);
* wb, wb-notrack -- with --writeback: blkfs --writeback (the kernel's writeback cache, the
  mount's dirty budget lifted to --dirty-limit), with and without tracking;
* reference-wb, reference-wb-bdi -- with --writeback and --reference: the pyfuse3 example with
  its writeback cache on, under the kernel's default per-mount dirty limit, and with the same
  bdi knobs blkfs --writeback sets (strict_limit 0, max_bytes = --dirty-limit).

Cases: seq write 1 MiB, seq read 1 MiB, rand write 4 KiB, rand read 4 KiB, rand write 64 KiB,
rand read 64 KiB, and the three write cases again with an fsync at the end (end_fsync=1).
Each case is time_based (--runtime seconds after a 2 s ramp), repeated --repeat times; the
table shows the median MB/s (10^6 bytes) and kIOPS per target and the ratios blkfs/native,
blkfs/no-track and blkfs/reference.

Method: every target has its own backing directory and file, laid out once by a sequential
fio write through the target (so reads find real data). The kernel page cache of the backing
file is kept warm (it is read natively before every read case; fio runs with invalidate=0 on
the native target) because cold random reads measure the disk, not FUSE.  On FUSE targets fio
keeps its default invalidate=1, which drops only the FUSE-side page cache of the file at the
start of each run: the reads have to reach the daemon.  For each FUSE run the script also
records how many bytes the daemon itself moved (/proc/PID/io: its preads for read cases, its
pwrites for write cases) per byte fio moved, which shows whether the requests reached the
daemon or were served by the kernel's page cache (shares below 0.9 are flagged).
`sync` runs before every fio run so that one run's dirty pages do not load the next.
With --pin CPU (default 0) fio and every filesystem daemon run on that one CPU: on this
2-core machine that gives much steadier figures (an idle second CPU slows FUSE round trips).

Run (from the repository, with the project's venv):

    .venv/bin/python scripts/bench_fs.py --quick                  # smoke run, ~3 minutes
    .venv/bin/python scripts/bench_fs.py                          # 1G, 10 s, 3 repeats
    .venv/bin/python scripts/bench_fs.py --size 512M --runtime 8 --reference --xattr-check
    .venv/bin/python scripts/bench_fs.py --size 512M --runtime 8 --reference --writeback

Needs fio (apt-get install fio), fusermount3 and /dev/fuse. Results go to the terminal as a
Markdown table and in full to --json (default reports/bench_fs.json).  Everything is created
in a temporary directory under --dir and removed at the end, mounts included.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

PROG = "bench_fs"
REPO = Path(__file__).resolve().parent.parent
VENV_PY = REPO / ".venv" / "bin" / "python"
FILE_NAME = "bench.dat"
MOUNT_TIMEOUT = 30.0
MB = 1_000_000


class BenchError(Exception):
    """A failure reported as one line, without a traceback."""


@dataclass(frozen=True)
class Case:
    id: str
    label: str
    rw: str  # fio's rw=
    bs: str  # fio's bs=
    fsync: bool = False

    @property
    def is_read(self) -> bool:
        return "read" in self.rw


CASES: tuple[Case, ...] = (
    Case("seqwrite-1m", "seq write 1 MiB", "write", "1M"),
    Case("seqread-1m", "seq read 1 MiB", "read", "1M"),
    Case("randwrite-4k", "rand write 4 KiB", "randwrite", "4k"),
    Case("randread-4k", "rand read 4 KiB", "randread", "4k"),
    Case("randwrite-64k", "rand write 64 KiB", "randwrite", "64k"),
    Case("randread-64k", "rand read 64 KiB", "randread", "64k"),
    Case("seqwrite-1m-fsync", "seq write 1 MiB + fsync", "write", "1M", True),
    Case("randwrite-4k-fsync", "rand write 4 KiB + fsync", "randwrite", "4k", True),
    Case("randwrite-64k-fsync", "rand write 64 KiB + fsync", "randwrite", "64k", True),
)
XATTR_CASE = "randwrite-4k"


@dataclass
class Target:
    name: str  # key in the results: native, blkfs, notrack, reference, xattr
    label: str
    kind: str  # native | blkfs | reference
    backing: Path
    mountpoint: Path | None = None
    blkfs_flags: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None  # case ids to run; None: all
    pid: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return (self.mountpoint or self.backing) / FILE_NAME

    @property
    def backing_file(self) -> Path:
        return self.backing / FILE_NAME

    def runs(self, case: Case) -> bool:
        return self.only is None or case.id in self.only


# -- small helpers --------------------------------------------------------------------------


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 128M, 512M or 1G")
    n = int(m.group(1)) << (10 * " kmgt".index(m.group(2) or " "))
    if n < 16 << 20:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small: use at least 16M")
    return n


def human_size(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _unescape(field_: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mount_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at `path` (from /proc/self/mountinfo), or None."""
    target = os.path.abspath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and _unescape(fields[4]) == target:
                found = right.split()[0]
    return found


def fs_of(path: Path) -> str:
    """The type and source of the filesystem holding `path`, e.g. 'ext4 /dev/vda'."""
    real = os.path.realpath(path)
    best, best_len = "unknown", -1
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 2:
                continue
            mnt = _unescape(fields[4])
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= best_len:
                best, best_len = f"{rfields[0]} {rfields[1]}", len(mnt)
    return best


def other_fuse_mounts() -> list[str]:
    """FUSE mount points that exist before this run (someone else's load on the machine)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype = (right.split() or [""])[0]
            if (fstype == "fuse" or fstype.startswith("fuse.")) and len(left.split()) > 4:
                found.append(_unescape(left.split()[4]))
    return found


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def pin_process(pid: int, cpu: int) -> None:
    """Pin every thread of `pid` to `cpu` (threads started later inherit it)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, {cpu})
        except (ProcessLookupError, PermissionError):
            pass


def daemon_io(pid: int | None) -> tuple[int, int] | None:
    """(rchar, wchar): bytes the process has read and written through syscalls so far."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/io") as f:
            vals = dict(line.split(":", 1) for line in f if ":" in line)
        return int(vals["rchar"]), int(vals["wchar"])
    except (OSError, KeyError, ValueError):
        return None


def warm(path: Path) -> None:
    """Read `path` natively so that its page cache is warm."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def run_quiet(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def git_describe() -> str:
    try:
        head = run_quiet(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run_quiet(["git", "-C", str(REPO), "status", "--porcelain", "--", "blkfs"])
        return head + ("+dirty" if dirty.stdout.strip() else "") if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -- fio ----------------------------------------------------------------------------------


@dataclass
class Fio:
    exe: str
    size: int
    runtime: int
    ramp: int
    pin: int | None
    outdir: Path

    def _cmd(self, args: list[str]) -> list[str]:
        if self.pin is None:
            return [self.exe, *args]
        if shutil.which("taskset"):
            return ["taskset", "-c", str(self.pin), self.exe, *args]
        return [self.exe, *args]  # pinned by _preexec below

    def _preexec(self) -> None:
        if self.pin is not None:
            os.sched_setaffinity(0, {self.pin})

    def _run(self, args: list[str], what: str, timeout: float) -> dict[str, Any]:
        out = self.outdir / "fio.json"
        out.unlink(missing_ok=True)
        cmd = self._cmd([*args, "--output-format=json", f"--output={out}"])
        try:
            r = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                preexec_fn=None if shutil.which("taskset") else self._preexec,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"fio hung on {what} (no result after {timeout:.0f}s)") from None
        text = out.read_text() if out.exists() else ""
        if r.returncode != 0:
            raise BenchError(f"fio failed on {what}: {last_line(r.stderr or text)}")
        try:
            return json.loads(text[text.index("{") :])
        except ValueError:
            raise BenchError(f"fio wrote no JSON for {what}: {last_line(r.stderr)}") from None

    def layout(self, path: Path) -> float:
        """Write the whole file sequentially (and fsync it); returns the seconds it took."""
        t0 = time.monotonic()
        self._run(
            [
                "--name=layout",
                f"--filename={path}",
                f"--size={self.size}",
                "--ioengine=psync",
                "--direct=0",
                "--rw=write",
                "--bs=1M",
                "--fallocate=none",
                "--end_fsync=1",
            ],
            f"layout of {path}",
            timeout=600 + self.size / (10 * MB),
        )
        return time.monotonic() - t0

    def case(self, path: Path, case: Case, invalidate: bool) -> dict[str, Any]:
        args = [
            f"--name={case.id}",
            f"--filename={path}",
            f"--size={self.size}",
            "--ioengine=psync",
            "--direct=0",
            "--numjobs=1",
            f"--rw={case.rw}",
            f"--bs={case.bs}",
            "--time_based",
            f"--runtime={self.runtime}",
            f"--ramp_time={self.ramp}",
            f"--invalidate={int(invalidate)}",
            "--fallocate=none",
        ]
        if case.fsync:
            args.append("--end_fsync=1")
        data = self._run(args, f"{case.label} on {path}", timeout=self.runtime + self.ramp + 600)
        job = data["jobs"][0]
        side = job["read" if case.is_read else "write"]
        clat = side.get("clat_ns") or {}
        pct = clat.get("percentile") or {}
        return {
            "bw_kib_s": side["bw"],
            "mb_s": side["bw"] * 1024 / MB,
            "iops": side["iops"],
            "io_bytes": side["io_bytes"],
            "runtime_ms": side["runtime"],
            "clat_mean_us": clat.get("mean", 0) / 1000,
            "clat_p99_us": pct.get("99.000000", 0) / 1000,
            # end_fsync counts in the job's time: what it took beyond --runtime
            "end_fsync_ms": max(0, side["runtime"] - self.runtime * 1000) if case.fsync else None,
            "usr_cpu": job.get("usr_cpu"),
            "sys_cpu": job.get("sys_cpu"),
        }


# -- the filesystems ------------------------------------------------------------------------


class Mounts:
    """Starts and stops the filesystems under test; stop_all() always leaves nothing mounted."""

    def __init__(self, work: Path, py: str, pin: int | None) -> None:
        self.work = work
        self.py = py
        self.pin = pin
        self.runtime_dir = work / "runtime"
        self.runtime_dir.mkdir(mode=0o700)
        self.env = {**os.environ, "BLKFS_RUNTIME_DIR": str(self.runtime_dir)}
        self.targets: list[Target] = []

    def _dirs(self, name: str) -> tuple[Path, Path]:
        b, m = self.work / f"backing-{name}", self.work / f"mnt-{name}"
        b.mkdir()
        m.mkdir()
        return b, m

    def native(self) -> Target:
        b = self.work / "backing-native"
        b.mkdir()
        t = Target("native", "native", "native", b)
        self.targets.append(t)
        return t

    def blkfs(
        self, name: str, label: str, flags: tuple[str, ...], only: tuple[str, ...] | None = None
    ) -> Target:
        b, m = self._dirs(name)
        t = Target(name, label, "blkfs", b, m, blkfs_flags=flags, only=only)
        self.targets.append(t)  # before mounting: stop_all() then cleans up a half-made mount
        r = run_quiet(
            [self.py, "-m", "blkfs.cli", "mount", str(b), str(m), *flags],
            env=self.env,
            timeout=MOUNT_TIMEOUT + 30,
        )
        if r.returncode != 0:
            raise BenchError(
                f"blkfs mount {' '.join(flags) or '(default)'} failed: "
                + last_line(r.stderr).removeprefix("blkfs: error: ")
            )
        t.pid = self._blkfs_pid(b, m)
        if t.pid is None:
            t.notes.append("daemon pid not found: not pinned, no daemon I/O counts")
        return t

    def _blkfs_pid(self, backing: Path, mnt: Path) -> int | None:
        real = os.path.realpath(mnt)
        for p in self.runtime_dir.glob("*.json"):
            try:
                info = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if info.get("mountpoint") == real and isinstance(info.get("pid"), int):
                return int(info["pid"])
        pattern = f"blkfs.cli mount {re.escape(str(backing))} {re.escape(str(mnt))}( |$)"
        r = run_quiet(["pgrep", "-f", "--", pattern])
        pids = [int(x) for x in r.stdout.split()]
        return pids[0] if len(pids) == 1 else None

    def reference(self, script: Path, name: str = "reference", label: str = "pyfuse3 example",
                  writeback: bool = False, dirty_limit: int | None = None) -> Target:
        """The pyfuse3 example; with `writeback` its own --enable-writeback-cache, with
        `dirty_limit` the bdi knobs blkfs --writeback sets too."""
        b, m = self._dirs(name)
        t = Target(name, label, "reference", b, m)
        self.targets.append(t)
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 -- lives with the daemon
        argv = [self.py, str(script), str(b), str(m)]
        if writeback:
            argv.append("--enable-writeback-cache")
        t.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(self.work),
        )
        log.close()
        t.pid = t.proc.pid
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not (mount_fstype(m) or "").startswith("fuse"):
            if t.proc.poll() is not None:
                raise BenchError(
                    f"the pyfuse3 example exited ({t.proc.returncode}) without mounting: "
                    f"{last_line((self.work / 'reference.log').read_text(errors='replace'))}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"the pyfuse3 example did not mount within {MOUNT_TIMEOUT:g}s")
            time.sleep(0.05)
        if dirty_limit is not None:
            sys.path.insert(0, str(REPO))
            from blkfs.bdi import apply_budget

            try:
                got = apply_budget(str(m), dirty_limit)
            except OSError as exc:
                raise BenchError(f"cannot set the bdi knobs of {m}: {exc}") from None
            t.notes.append(f"bdi {got.bdi}: strict_limit 0, {got.how} {got.limit}")
        return t

    def repin(self) -> None:
        if self.pin is None:
            return
        for t in self.targets:
            if t.pid is not None:
                pin_process(t.pid, self.pin)

    def _lazy(self, mnt: Path) -> None:
        if mount_fstype(mnt) is not None:
            run_quiet(["fusermount3", "-u", "-z", str(mnt)])

    def stop(self, t: Target) -> list[str]:
        """Unmount one target and end its daemon; returns notes about anything unusual."""
        notes: list[str] = []
        if t.mountpoint is None:
            return notes
        mnt = t.mountpoint
        if t.kind == "blkfs":
            if mount_fstype(mnt) is not None:
                r = run_quiet([self.py, "-m", "blkfs.cli", "umount", str(mnt)], env=self.env)
                if r.returncode != 0:
                    notes.append(f"blkfs umount {mnt} failed ({last_line(r.stderr)}): lazy unmount")
                    self._lazy(mnt)
            deadline = time.monotonic() + 20
            while t.pid is not None and process_alive(t.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if t.pid is not None and process_alive(t.pid):
                notes.append(f"blkfs daemon {t.pid} still running after unmount: SIGTERM")
                os.kill(t.pid, signal.SIGTERM)
        elif t.proc is not None:
            if mount_fstype(mnt) is not None:
                r = run_quiet(["fusermount3", "-u", str(mnt)])
                if r.returncode != 0:
                    notes.append(f"fusermount3 -u {mnt} failed ({last_line(r.stderr)})")
            try:
                t.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                notes.append("the pyfuse3 example did not exit after unmount: killed")
                t.proc.kill()
                t.proc.wait(timeout=10)
            self._lazy(mnt)
        self._lazy(mnt)  # last resort; a no-op when nothing is mounted
        return notes

    def stop_all(self) -> list[str]:
        notes: list[str] = []
        for t in reversed(self.targets):
            try:
                notes += self.stop(t)
            except (OSError, subprocess.SubprocessError) as exc:
                notes.append(f"stopping {t.label}: {exc}")
                if t.mountpoint is not None:
                    self._lazy(t.mountpoint)
        return notes

    def still_mounted(self) -> list[Path]:
        return [
            t.mountpoint
            for t in self.targets
            if t.mountpoint is not None and mount_fstype(t.mountpoint) is not None
        ]


def fetch_reference(work: Path, py: str) -> tuple[Path | None, str]:
    """pyfuse3's examples/passthroughfs.py for the installed version; (None, why) on failure."""
    r = run_quiet([py, "-c", "import importlib.metadata as m; print(m.version('pyfuse3'))"])
    version = r.stdout.strip()
    if r.returncode != 0 or not version:
        return None, f"pyfuse3 is not installed for {py}"
    dl = work / "pyfuse3-sdist"
    dl.mkdir()
    why = "no sdist downloaded"
    for _ in range(2):  # the sdist's build requirements are fetched too: retry a hiccup once
        cmd = [py, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q"]
        try:
            r = run_quiet([*cmd, f"pyfuse3=={version}", "-d", str(dl)], timeout=300)
            why = last_line(r.stderr) if r.returncode else why
        except subprocess.TimeoutExpired:
            why = "pip download timed out"
        if list(dl.glob("pyfuse3-*.tar.gz")):
            break
    tars = sorted(dl.glob("pyfuse3-*.tar.gz"))
    if not tars:
        return None, f"pip download pyfuse3=={version} failed: {why}"
    try:
        with tarfile.open(tars[0]) as tf:
            member = next(
                (m for m in tf.getmembers() if m.name.endswith("/examples/passthroughfs.py")), None
            )
            src = tf.extractfile(member) if member is not None else None
            if src is None:
                return None, f"{tars[0].name} has no examples/passthroughfs.py"
            data = src.read()
    except (tarfile.TarError, OSError) as exc:
        return None, f"cannot read {tars[0].name}: {exc}"
    out = work / "reference" / "passthroughfs.py"
    out.parent.mkdir()
    out.write_bytes(data)
    return out, f"pyfuse3 {version} examples/passthroughfs.py"


# -- the benchmark ------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    iops = [r["iops"] for r in runs]
    med = statistics.median(iops)
    shares = [r["daemon_share"] for r in runs if r.get("daemon_share") is not None]
    return {
        "mb_s": statistics.median(r["mb_s"] for r in runs),
        "iops": med,
        "iops_min": min(iops),
        "iops_max": max(iops),
        "spread_pct": (max(iops) - min(iops)) / med * 100 if med else 0.0,
        "daemon_share": statistics.median(shares) if shares else None,
        "runs": runs,
    }


def ratio(results: dict[str, Any], a: str, b: str) -> float | None:
    ra, rb = results.get(a), results.get(b)
    if not ra or not rb or not rb["iops"]:
        return None
    return ra["iops"] / rb["iops"]


def run_bench(a: argparse.Namespace, fio_exe: str, work: Path, py: str) -> dict[str, Any]:
    notes: list[str] = []
    fio = Fio(fio_exe, a.size, a.runtime, a.ramp_time, a.pin, work)
    mounts = Mounts(work, py, a.pin)
    results: dict[str, dict[str, Any]] = {}
    layout_s: dict[str, float] = {}
    xattr_probe: dict[str, str] = {}
    ref_source = None
    script: Path | None = None
    try:
        targets = [mounts.native()]
        if not a.only_writeback:
            targets.append(mounts.blkfs("blkfs", "blkfs", ()))
            targets.append(mounts.blkfs("notrack", "no-track", ("--no-tracking",)))
        if a.reference:
            script, ref_source = fetch_reference(work, py)
            if script is None:
                notes.append(f"reference row skipped: {ref_source}")
                print(f"{PROG}: note: {notes[-1]}", flush=True)
            else:
                try:
                    if not a.only_writeback:
                        targets.append(mounts.reference(script))
                    notes.append(
                        "the pyfuse3 example has no fsync handler (ENOSYS, after which the "
                        "kernel skips FSYNC): its '+ fsync' rows do not sync the backing file"
                    )
                except BenchError as exc:
                    notes.append(f"reference row skipped: {exc}")
                    print(f"{PROG}: note: {notes[-1]}", flush=True)
                    notes += mounts.stop(mounts.targets.pop())
        if a.xattr_check:
            targets.append(mounts.blkfs("xattr", "blkfs --xattr", ("--xattr",), (XATTR_CASE,)))
        if a.writeback or a.only_writeback:
            limit = ("--dirty-limit", str(a.dirty_limit))
            targets.append(mounts.blkfs("wb", "blkfs --writeback", ("--writeback", *limit)))
            targets.append(mounts.blkfs("wb-notrack", "wb no-track",
                                        ("--writeback", "--no-tracking", *limit)))
            if a.reference and script is not None:
                targets.append(mounts.reference(script, "reference-wb", "example wb",
                                                writeback=True))
                targets.append(mounts.reference(script, "reference-wb-bdi", "example wb+bdi",
                                                writeback=True, dirty_limit=a.dirty_limit))
        mounts.repin()
        for t in targets:
            print(f"laying out {human_size(a.size)} on {t.label} ({t.path}) ...", flush=True)
            layout_s[t.name] = round(fio.layout(t.path), 2)
            if t.kind == "blkfs":  # does the mount answer xattr calls? (ENOTSUP when not)
                try:
                    xattr_probe[t.name] = f"listxattr -> {os.listxattr(t.path)}"
                except OSError as exc:
                    xattr_probe[t.name] = f"listxattr -> {os.strerror(exc.errno or 0)}"

        plan = [
            (rep, case, t)
            for rep in range(a.repeat)
            for case in CASES
            for t in targets[rep % len(targets) :] + targets[: rep % len(targets)]
            if t.runs(case) and (not a.cases or case.id in a.cases)
        ]
        est = len(plan) * (a.runtime + a.ramp_time + 1.5)
        print(
            f"{len(plan)} fio runs of {a.runtime}+{a.ramp_time} s: about {est / 60:.0f} min",
            flush=True,
        )
        raw: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for i, (rep, case, t) in enumerate(plan, 1):
            if case.is_read:
                warm(t.backing_file)
            os.sync()
            mounts.repin()
            before = daemon_io(t.pid)
            r = fio.case(t.path, case, invalidate=t.kind != "native")
            after = daemon_io(t.pid)
            r["repeat"] = rep
            r["daemon_share"] = None
            if before is not None and after is not None and r["io_bytes"]:
                # The daemon's side of the data: preads of the backing file for reads
                # (rchar), pwrites for writes (wchar); the other direction is /dev/fuse.
                # fio's io_bytes leave out the ramp: scale them up to the whole run.
                side = 0 if case.is_read else 1
                moved = r["io_bytes"] * (a.runtime + a.ramp_time) / a.runtime
                r["daemon_share"] = round((after[side] - before[side]) / moved, 3)
            raw.setdefault((case.id, t.name), []).append(r)
            print(
                f"[{i:>3}/{len(plan)}] rep {rep + 1}/{a.repeat} {case.label:<26} {t.label:<16}"
                f"{r['mb_s']:>9.0f} MB/s {r['iops'] / 1000:>8.1f} kIOPS",
                flush=True,
            )
        for (cid, tname), runs in raw.items():
            results.setdefault(cid, {})[tname] = summarize(runs)
    finally:
        notes += mounts.stop_all()
        left = mounts.still_mounted()
        if left:
            notes.append(f"still mounted after cleanup: {', '.join(map(str, left))}")

    ratios = {
        cid: {
            "blkfs/native": ratio(res, "blkfs", "native"),
            "blkfs/no-track": ratio(res, "blkfs", "notrack"),
            "blkfs/reference": ratio(res, "blkfs", "reference"),
            "wb/wb-notrack": ratio(res, "wb", "wb-notrack"),
            "wb/reference-wb": ratio(res, "wb", "reference-wb"),
            "wb/reference-wb-bdi": ratio(res, "wb", "reference-wb-bdi"),
        }
        for cid, res in results.items()
    }
    xattr = None
    if a.xattr_check and XATTR_CASE in results and "xattr" in results[XATTR_CASE]:
        xattr = {
            "case": XATTR_CASE,
            "without_xattr_iops": results[XATTR_CASE]["blkfs"]["iops"],
            "with_xattr_iops": results[XATTR_CASE]["xattr"]["iops"],
            "with/without": ratio(results[XATTR_CASE], "xattr", "blkfs"),
            "probe": xattr_probe,
        }
    return {
        "targets": {
            t.name: {
                "label": t.label,
                "kind": t.kind,
                "blkfs_flags": list(t.blkfs_flags),
                "cases": list(t.only) if t.only else [c.id for c in CASES],
                "layout_seconds": layout_s.get(t.name),
                "notes": t.notes,
            }
            for t in mounts.targets
        },
        "reference_source": ref_source,
        "results": results,
        "ratios": ratios,
        "xattr_check": xattr,
        "notes": notes,
    }


# -- output -------------------------------------------------------------------------------


def _fmt_k(iops: float) -> str:
    k = iops / 1000
    return f"{k:.0f}" if k >= 100 else f"{k:.1f}"


def _fmt_r(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(report: dict[str, Any]) -> str:
    res, rat = report["results"], report["ratios"]
    names = [n for n in ("native", "blkfs", "notrack", "reference", "wb", "wb-notrack",
                         "reference-wb", "reference-wb-bdi") if n in report["targets"]]
    labels = {n: report["targets"][n]["label"] for n in names}
    head = ["case"]
    for n in names:
        head += [f"{labels[n]} MB/s", "kIOPS"]
    ratio_cols = ["blkfs/native", "blkfs/no-track"]
    if "reference" in names:
        ratio_cols.append("blkfs/reference")
    if "wb" in names:
        ratio_cols.append("wb/wb-notrack")
    if "reference-wb" in names:
        ratio_cols += ["wb/reference-wb", "wb/reference-wb-bdi"]
    head += ratio_cols
    rows = [head]
    for case in CASES:
        if case.id not in res:
            continue
        row = [case.label]
        for n in names:
            s = res[case.id].get(n)
            row += [f"{s['mb_s']:.0f}", _fmt_k(s["iops"])] if s else ["-", "-"]
        row += [_fmt_r(rat[case.id][c]) for c in ratio_cols]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        out = [cells[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)
        ]
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])


def print_report(report: dict[str, Any]) -> None:
    m = report["meta"]
    print()
    print(
        f"fio {m['fio_version']}, psync, 1 job, direct=0, {m['size']} file, {m['runtime_s']} s "
        f"(+{m['ramp_s']} s ramp), median of {m['repeat']}, "
        + (f"pinned to CPU {m['pin_cpu']}" if m["pin_cpu"] is not None else "not pinned")
        + f"; backing {m['backing_fs']}; kernel {m['kernel']}; blkfs {m['blkfs_commit']}"
    )
    print()
    print(table(report))
    x = report.get("xattr_check")
    if x:
        print()
        print(
            f"xattr check, rand write 4 KiB (tracking on): without --xattr "
            f"{x['without_xattr_iops'] / 1000:.1f} kIOPS, with --xattr "
            f"{x['with_xattr_iops'] / 1000:.1f} kIOPS: {_fmt_r(x['with/without'])}x"
        )
    spreads = []
    low_share = []
    for cid, per in report["results"].items():
        for tname, s in per.items():
            spreads.append((s["spread_pct"], cid, tname))
            share = s.get("daemon_share")
            if share is not None and share < 0.9:
                low_share.append(f"{cid} on {tname}: {share:.3f}")
    if report["meta"]["repeat"] > 1 and spreads:
        worst = max(spreads)
        print(
            f"run-to-run spread (max-min)/median: worst {worst[0]:.0f}% ({worst[1]} on "
            f"{worst[2]}), median {statistics.median(s[0] for s in spreads):.0f}%"
        )
    if low_share:
        print(
            "served partly by the kernel's cache (daemon bytes per fio byte < 0.9): "
            + "; ".join(low_share)
        )
    for n in report["notes"]:
        print(f"note: {n}")


# -- main ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="fio benchmark of blkfs (tracking / no tracking) against the native "
        "backing directory, optionally against pyfuse3's passthrough example.",
    )
    p.add_argument("--size", type=parse_size, default=1 << 30, help="file size (default 1G)")
    p.add_argument("--runtime", type=int, default=10, help="seconds per case (default 10)")
    p.add_argument("--ramp-time", type=int, default=2, help="fio ramp_time (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="runs per case; median (default 3)")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: --size 128M --runtime 3 --repeat 1"
    )
    pin = p.add_mutually_exclusive_group()
    pin.add_argument(
        "--pin", type=int, default=0, metavar="CPU", help="CPU for fio and the daemons (default 0)"
    )
    pin.add_argument("--no-pin", action="store_true", help="do not pin anything")
    p.add_argument(
        "--reference", action="store_true", help="also the plain pyfuse3 passthrough example"
    )
    p.add_argument(
        "--xattr-check", action="store_true", help="also 4 KiB rand writes on blkfs --xattr"
    )
    p.add_argument(
        "--writeback", action="store_true",
        help="also blkfs --writeback (with and without tracking) and, with --reference, the "
        "pyfuse3 example with its writeback cache (default and lifted dirty limit)",
    )
    p.add_argument(
        "--only-writeback", action="store_true",
        help="the --writeback rows (and native) without the plain blkfs and example rows",
    )
    p.add_argument(
        "--cases", type=lambda t: t.split(","), default=None, metavar="ID,...",
        help="only these cases (" + ", ".join(c.id for c in CASES) + ")",
    )
    p.add_argument(
        "--dirty-limit", type=parse_size, default=1 << 30, metavar="SIZE",
        help="the writeback mounts' dirty budget (default 1G)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=REPO / "reports" / "bench_fs.json",
        metavar="PATH",
        help="where to write the full results (default reports/bench_fs.json)",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where to make the temp dir (default: system temp)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (files, logs) afterwards")
    return p


def _on_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


@contextmanager
def workdir(parent: Path, keep: bool) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="bench_fs.", dir=parent))
    try:
        yield work
    finally:
        with open("/proc/self/mountinfo") as f:
            busy = any(_unescape(ln.split()[4]).startswith(f"{work}/") for ln in f)
        if keep or busy:
            print(f"{PROG}: note: left {work} in place", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.quick:
        a.size, a.runtime, a.repeat = 128 << 20, 3, 1
    if a.no_pin:
        a.pin = None
    unknown = sorted(set(a.cases or ()) - {c.id for c in CASES})
    if unknown:
        print(f"{PROG}: error: unknown case {unknown[0]!r}: choose from "
              + ", ".join(c.id for c in CASES), file=sys.stderr)
        return 2
    if a.runtime < 1 or a.repeat < 1 or a.ramp_time < 0:
        print(
            f"{PROG}: error: --runtime and --repeat must be >= 1, --ramp-time >= 0", file=sys.stderr
        )
        return 2
    if a.pin is not None and a.pin not in os.sched_getaffinity(0):
        print(
            f"{PROG}: error: CPU {a.pin} is not available here "
            f"(have {sorted(os.sched_getaffinity(0))})",
            file=sys.stderr,
        )
        return 2
    fio_exe = shutil.which("fio")
    if fio_exe is None:
        print(f"{PROG}: error: fio not found: install fio: apt-get install fio", file=sys.stderr)
        return 1
    py = str(VENV_PY) if VENV_PY.exists() else sys.executable
    if run_quiet([py, "-c", "import blkfs.cli, pyfuse3"]).returncode != 0:
        print(
            f"{PROG}: error: {py} cannot import blkfs and pyfuse3: run scripts/setup.sh",
            file=sys.stderr,
        )
        return 1
    if not a.dir.is_dir():
        print(f"{PROG}: error: --dir {a.dir} is not a directory", file=sys.stderr)
        return 2
    n_files = 3 + a.reference + a.xattr_check
    free = shutil.disk_usage(a.dir).free
    if free < n_files * a.size + (256 << 20):
        print(
            f"{PROG}: error: {a.dir} has {free >> 20} MiB free, the run needs "
            f"{(n_files * a.size) >> 20} MiB: use a smaller --size or another --dir",
            file=sys.stderr,
        )
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = dt.datetime.now(dt.UTC)
    commit = git_describe()  # now: the daemons run the code as it is when they are mounted
    load_start = os.getloadavg()
    others = other_fuse_mounts()
    if others:
        print(
            f"{PROG}: note: {len(others)} other FUSE mount(s) on this machine: "
            "figures may be noisier",
            flush=True,
        )
    fio_version = run_quiet([fio_exe, "--version"]).stdout.strip()
    try:
        with workdir(a.dir, a.keep) as work:
            print(f"{PROG}: working in {work}", flush=True)
            report = run_bench(a, fio_exe, work, py)
            backing_fs = fs_of(work)
    except BenchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; everything unmounted", file=sys.stderr)
        return 130
    report["meta"] = {
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fio_version": fio_version,
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": py,
        "blkfs_commit": commit,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "other_fuse_mounts_at_start": others,
        "size": human_size(a.size),
        "size_bytes": a.size,
        "runtime_s": a.runtime,
        "ramp_s": a.ramp_time,
        "repeat": a.repeat,
        "pin_cpu": a.pin,
        "backing_fs": backing_fs,
        "cases": [dataclasses.asdict(c) for c in CASES],
        "mb": "10^6 bytes; ratios are of median IOPS",
    }
    report = {"meta": report.pop("meta"), **report}
    print_report(report)
    try:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    except OSError as exc:
        print(f"{PROG}: error: cannot write {a.json}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"\nfull results: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
