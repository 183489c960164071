"""`migrator demo`: a live migration on one machine with nothing to set up.

Two blkfs mounts in a temporary directory play the two hosts; a simulated VM
(migrator.simvm) writes to its disk and memory files on the source mount; a
`migrator serve` and a `migrator migrate` move it over loopback TCP while it
runs, resume it on the destination, and verify.  Then the VM's own ledger is
checked on the destination, and everything is unmounted.

With ``--postcopy`` the VM dirties its memory faster than the (capped) link, so
pre-copy alone would never converge: the memory pages of the last dirty set stay
absent on the destination, the VM resumes there at once and faults them in while
the rest drains through a spill area in the work directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blkfs.bitmap import parse_size

from .report import out_console

PY = sys.executable
console = out_console()  # (into a log: lines whole, never wrapped)


class DemoError(Exception):
    pass


Env = dict[str, str]


def _run(*args: str, what: str, env: Env) -> str:
    r = subprocess.run(list(args), capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise DemoError(f"{what} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return r.stdout


def _blkfs(*args: str, env: Env) -> str:
    return _run(PY, "-m", "blkfs.cli", *args, what="blkfs " + args[0], env=env)


def _simvm(*args: str, env: Env) -> str:
    return _run(PY, "-m", "migrator.simvm", *args, what="simvm " + args[0], env=env)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except (FileNotFoundError, IndexError):
            return
        time.sleep(0.05)


def _workdir(prefix: str) -> tuple[Path, Path, Env]:
    """A private work dir, a fresh key in it, and the environment of the demo's processes: a
    blkfs runtime registry of their own in the work dir (only the children need it, so this
    process's environment stays as it was)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    key = work / "key"
    key.write_bytes(os.urandom(32).hex().encode())
    key.chmod(0o600)
    return work, key, dict(os.environ, BLKFS_RUNTIME_DIR=str(work / "run"))


def _mount_hosts(work: Path, mounts: list[Path], env: Env, *flags: str) -> tuple[Path, Path]:
    """Two blkfs mounts, src and dst, standing for the two hosts (appended to `mounts`)."""
    for side in ("src", "dst"):
        (work / f"{side}-backing").mkdir()
        (work / side).mkdir()
        _blkfs("mount", str(work / f"{side}-backing"), str(work / side), *flags, env=env)
        mounts.append(work / side)
    return mounts[0], mounts[1]


def _teardown(procs: list[subprocess.Popen[bytes]], mounts: list[Path], work: Path,
              env: Env) -> None:
    """Processes first (nothing may hold a mount), then the mounts, then the work dir."""
    for pr in procs:
        if pr.poll() is None:
            pr.kill()
            pr.wait()
    for mnt in reversed(mounts):
        r = subprocess.run([PY, "-m", "blkfs.cli", "umount", str(mnt)], capture_output=True,
                           env=env)
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)


def run_demo(a: argparse.Namespace) -> int:
    if a.vm == "qemu":
        return run_qemu_demo(a)
    try:
        disk, mem = parse_size(a.disk_size), parse_size(a.mem_size)
    except ValueError as exc:
        raise DemoError(str(exc)) from None
    work, key, env = _workdir("migrator-demo-")
    mounts: list[Path] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        console.print(f"[bold]migrator demo[/] in {work}")
        src, dst = _mount_hosts(work, mounts, env, "--heat-half-life", "5", "--static-heat", "2")
        console.print(f"source mount {src}, destination mount {dst} (two blkfs daemons)")
        # 64 KiB units: the VM's hot set is 10 % of blkfs's 64 KiB blocks
        _simvm("create", str(src), "--disk-size", str(disk), "--mem-size", str(mem),
               "--unit", "65536", env=env)
        rate, bandwidth = a.write_rate, a.bandwidth
        vm_flags: list[str] = []
        if a.postcopy:  # memory hotter than the link: pre-copy alone would not converge
            rate = max(rate, 60.0)
            bandwidth = bandwidth or rate / 2
            vm_flags = ["--mem-share", "0.9", "--hot-fraction", "0.5"]
        vm = subprocess.Popen([PY, "-m", "migrator.simvm", "run", str(src), "--rate",
                               str(rate / 1.048576), *vm_flags], stdout=subprocess.DEVNULL,
                              env=env)
        procs.append(vm)
        what = ("90 % of them to memory, half of its blocks hot" if a.postcopy
                else "90 % of writes on 10 % of the blocks")
        console.print(f"simulated VM pid {vm.pid}: disk.raw {a.disk_size}, vm.mem {a.mem_size}, "
                      f"writing {rate:g} MB/s ({what})")
        dest_vm_log = work / "dest-vm.log"
        pidfile = work / "dest-vm.pid"
        resume = (f"{shlex.quote(PY)} -m migrator.simvm run \"$MIGRATOR_MOUNT\" --resume "
                  f"--rate {rate / 1.048576:.3f} {' '.join(vm_flags)} --seconds 2 "
                  f">{shlex.quote(str(dest_vm_log))} 2>&1 & echo $! >{shlex.quote(str(pidfile))}")
        serve = subprocess.Popen([PY, "-m", "migrator.cli", "serve", "--mount", str(dst),
                                  "--listen", "127.0.0.1:0", "--key-file", str(key), "--once",
                                  "--resume-cmd", resume], stdout=subprocess.PIPE, text=True,
                                 env=env)
        procs.append(serve)  # type: ignore[arg-type]
        assert serve.stdout is not None
        line = serve.stdout.readline()
        m = re.search(r"listening on [^:]+:(\d+)", line)
        if not m:
            raise DemoError(f"migrator serve did not start: {line.strip() or 'no output'}")
        port = m.group(1)
        console.print(f"migrator serve listening on 127.0.0.1:{port}; letting the VM run 3 s "
                      "so blkfs learns which blocks are hot")
        time.sleep(3)
        cmd = [PY, "-m", "migrator.cli", "migrate", "--mount", str(src), "--to",
               f"127.0.0.1:{port}", "--key-file", str(key), "--suspend", f"pid:{vm.pid}",
               "--report", a.report, "disk.raw", "vm.mem"]
        if bandwidth:
            cmd += ["--bandwidth", str(bandwidth)]
        if a.postcopy:
            cmd += ["--postcopy", "--spill", str(work / "spill"), "--spill-slots", "256"]
            console.print(f"post-copy: link capped at {bandwidth:g} MB/s; spill area "
                          f"{work / 'spill'} (256 slots of 64 KiB)")
        console.rule("migrator migrate")
        rc = subprocess.run(cmd, env=env).returncode
        console.rule()
        out, _ = serve.communicate(timeout=60)
        for ln in out.strip().splitlines():
            console.print(ln)
        if rc != 0:
            raise DemoError("the migration failed (see above); the source VM keeps running")
        vm.wait(timeout=10)
        if pidfile.exists():
            dest_pid = int(pidfile.read_text())
            console.print(f"the VM resumed on the destination (pid {dest_pid}) and writes there "
                          "for 2 s")
            _wait_gone(dest_pid, 30)
        console.print(_simvm("check", str(dst), env=env).strip())
        if a.postcopy:
            console.print(_blkfs("spill", str(dst), env=env).strip())
        console.print(f"[bold green]done[/]: the VM moved from {src} to {dst} while writing; "
                      f"report: {a.report}")
        return 0
    except DemoError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
    finally:
        _teardown(procs, mounts, work, env)


# -- a real QEMU guest -----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
GUEST_RAM = "128M"


def _qemu_argv(guest: Path, mount: str, console: Path) -> list[str]:
    return ["qemu-system-x86_64", "-accel", "tcg", "-m", GUEST_RAM, "-display", "none",
            "-no-reboot", "-nodefaults", "-kernel", str(guest / "vmlinuz"),
            "-initrd", str(guest / "initrd.gz"), "-append", "console=ttyS0 quiet panic=-1",
            "-serial", f"file:{console}",
            "-drive", f"file={mount}/disk.raw,format=raw,if=virtio,cache=writeback",
            "-object",
            f"memory-backend-file,id=mem,size={GUEST_RAM},mem-path={mount}/vm.mem,share=on",
            "-machine", "memory-backend=mem"]


def _console(path: Path) -> list[str]:
    try:
        return [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return []


def _wait_console(path: Path, text: str, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _console(path)
        if sum(text in ln for ln in lines) >= count:
            return lines
        time.sleep(0.2)
    raise DemoError(f"the guest did not print {count} x {text!r} within {timeout:g} s "
                    f"(console {path})")


def run_qemu_demo(a: argparse.Namespace) -> int:
    """Boot a tiny Debian-kernel guest on one mount, migrate it live to the other."""
    if shutil.which("qemu-system-x86_64") is None and os.geteuid() != 0:
        raise DemoError("qemu-system-x86_64 is missing: apt-get install qemu-system-x86")
    work, key, env = _workdir("migrator-qemu-demo-")
    mounts: list[Path] = []
    pids: list[int] = []
    qemu_dirs: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        console.print(f"[bold]migrator demo --vm qemu[/] in {work}")
        console.print("building (or reusing) the guest from Debian packages ...")
        r = subprocess.run([str(ROOT / "scripts" / "build_guest.sh")], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise DemoError(f"building the guest failed: "
                            f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
        guest = Path(r.stdout.strip().splitlines()[-1])
        src, dst = _mount_hosts(work, mounts, env)
        for name, size in (("disk.raw", 64 << 20), ("vm.mem", 128 << 20)):
            with open(src / name, "wb") as f:
                f.truncate(size)
        con_src, con_dst = work / "console-src.log", work / "console-dst.log"
        qmp = work / "qmp-src.sock"
        with open(work / "qemu-src.log", "wb") as log:
            vm = subprocess.Popen([*_qemu_argv(guest, str(src), con_src), "-qmp",
                                   f"unix:{qmp},server=on,wait=off"], stdout=log, stderr=log)
        procs.append(vm)
        console.print(f"QEMU (TCG, {GUEST_RAM} RAM in {src}/vm.mem, 64M disk {src}/disk.raw) "
                      f"pid {vm.pid} booting ...")
        _wait_console(con_src, "TICK", 3, 90)
        console.rule("source serial console")
        for ln in _console(con_src)[-5:]:
            console.print(ln)
        cmdline = work / "qemu-dst.cmdline"
        cmdline.write_text(" ".join(shlex.quote(x) for x in
                                    _qemu_argv(guest, "$MIGRATOR_MOUNT", con_dst)) + "\n")
        serve = subprocess.Popen([PY, "-m", "migrator.cli", "serve", "--mount", str(dst),
                                  "--listen", "127.0.0.1:0", "--key-file", str(key), "--once",
                                  "--resume", f"qemu:{cmdline}"], stdout=subprocess.PIPE,
                                 text=True, env=env)
        procs.append(serve)  # type: ignore[arg-type]
        assert serve.stdout is not None
        m = re.search(r"listening on [^:]+:(\d+)", serve.stdout.readline())
        if not m:
            raise DemoError("migrator serve did not start")
        cmd = [PY, "-m", "migrator.cli", "migrate", "--mount", str(src), "--to",
               f"127.0.0.1:{m.group(1)}", "--key-file", str(key), "--suspend", f"qemu:{qmp}",
               "--report", a.report, "disk.raw", "vm.mem"]
        if a.postcopy:
            cmd += ["--postcopy", "--spill", str(work / "spill")]
        if a.bandwidth:
            cmd += ["--bandwidth", str(a.bandwidth)]
        console.rule("migrator migrate" + (" --postcopy" if a.postcopy else ""))
        rc = subprocess.run(cmd, env=env).returncode
        console.rule()
        out, _ = serve.communicate(timeout=60)
        for ln in out.strip().splitlines():
            console.print(ln)
        pm = re.search(r"QEMU pid (\d+) \(QMP and log in (\S+)\)", out)
        if pm:
            pids.append(int(pm.group(1)))
            qemu_dirs.append(pm.group(2))
        if rc != 0:
            raise DemoError("the migration failed (see above); the source guest keeps running")
        vm.wait(timeout=15)
        last = [ln for ln in _console(con_src) if ln.startswith("TICK")][-1]
        _wait_console(con_dst, "TICK", 3, 60)
        console.rule("destination serial console")
        console.print(f"(the source's last line was: {last})")
        for ln in _console(con_dst)[:5]:
            console.print(ln)
        console.print(f"[bold green]done[/]: the guest moved from {src} to {dst} and ticks on "
                      f"there with its RAM canary intact; source QEMU exited "
                      f"(status {vm.returncode}); report: {a.report}")
        return 0
    except DemoError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        return 1
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 10)
        for d in qemu_dirs:
            shutil.rmtree(d, ignore_errors=True)
        _teardown(procs, mounts, work, env)
