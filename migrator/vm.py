"""VM adapters: how the migrator suspends the VM on the source at switchover.

``--suspend`` takes one of

* ``pid:PID``          — SIGSTOP / SIGCONT a process (a simulated VM, Firecracker, ...);
* ``cmd:STOP::CONT``   — two shell commands, e.g. ``cmd:virsh suspend vm1::virsh resume vm1``;
* ``freeze``           — blkfs freezes the migrated files (writes wait, reads go on);
* ``qemu:QMP_SOCKET``  — QEMU's ``stop`` and its device state (``migrate`` with
  ``x-ignore-shared``, see migrator.qemu); ``cont`` on failure, ``quit`` after.

Suspend and flush order matters.  A process adapter stops the writer first and
then fsyncs through the mount, so the pages it dirtied in the kernel page cache
(guest RAM through ``mmap``) reach blkfs and are in the last set.  ``freeze``
must flush *before* freezing: writeback into a frozen file would wait for the
thaw, and the fsync with it.  Writes a freeze-suspended VM makes to a shared
mmap after that flush stay in its page cache and are not migrated, so
``freeze`` is exact only for VMs that write with write()/pwrite (e.g. QEMU
disks with cache=none).

After a successful switchover the source copy must not run again: a process
is killed, ``freeze`` leaves the files frozen, ``cmd`` leaves the VM suspended.
Before switchover, any failure resumes it (invariant 3).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Protocol

from blkfs import ctlproto as cp

LOW_RAM = 2 << 30  # guest-physical = RAM file offset below this (x86 pc and q35)


class AdapterError(Exception):
    """The VM could not be suspended or resumed; the message is for the user."""


class VMAdapter(Protocol):
    name: str
    flush_before_suspend: bool

    def suspend(self) -> None: ...

    def resume(self) -> None: ...

    def finish(self) -> str:
        """After a successful switchover: retire the source copy; say what was done."""
        ...


class PidAdapter:
    flush_before_suspend = False

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.throttle_pid = pid  # auto-converge slows this process (migrator.throttle)
        self.name = f"pid:{pid}"
        if _state(pid) is None:
            raise AdapterError(f"no process {pid} to suspend: give the VM's pid "
                               "(--suspend pid:PID)")

    def suspend(self) -> None:
        try:
            os.kill(self.pid, signal.SIGSTOP)
        except ProcessLookupError:
            raise AdapterError(f"the VM process {self.pid} is gone") from None
        deadline = time.monotonic() + 5
        while _state(self.pid) not in ("T", "t", None):  # wait until it really stopped
            if time.monotonic() > deadline:
                raise AdapterError(f"process {self.pid} did not stop within 5 s")
            time.sleep(0.0005)

    def resume(self) -> None:
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def finish(self) -> str:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return f"source VM process {self.pid} killed (it runs on the destination now)"


class CmdAdapter:
    flush_before_suspend = False

    def __init__(self, stop: str, cont: str) -> None:
        if not stop.strip() or not cont.strip():
            raise AdapterError("cmd adapter needs two commands: --suspend 'cmd:STOP::CONT'")
        self.stop, self.cont = stop, cont
        self.name = "cmd"

    @staticmethod
    def _run(cmd: str, what: str) -> None:
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            msg = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
            raise AdapterError(f"{what} command failed: {msg}")

    def suspend(self) -> None:
        self._run(self.stop, "suspend")

    def resume(self) -> None:
        self._run(self.cont, "resume")

    def finish(self) -> str:
        return "source VM left suspended (it runs on the destination now): stop it"


class FreezeAdapter:
    flush_before_suspend = True

    def __init__(self, mountpoint: str, files: list[str]) -> None:
        self.mountpoint, self.files = mountpoint, files
        self.name = "freeze"

    def _call(self, req: cp.Request) -> None:
        """Blocking, as every adapter: the engine calls adapters in a worker thread."""
        from blkfs.control import ControlClient

        with ControlClient.for_mount(self.mountpoint) as c:
            c.call(req)

    def suspend(self) -> None:
        self._call(cp.Freeze(tuple(self.files)))

    def resume(self) -> None:
        self._call(cp.Thaw(tuple(self.files)))

    def finish(self) -> str:
        return (f"source files stay frozen: stop the source VM, then 'blkfs thaw "
                f"{self.mountpoint}'")


class QemuAdapter:
    flush_before_suspend = False  # stop first: then the RAM file's dirty pages are final

    def __init__(self, qmp_path: str) -> None:
        from .qemu import QemuError, QemuSource

        self.name = f"qemu:{qmp_path}"
        self._error = QemuError
        try:
            self.qemu = QemuSource(qmp_path)
        except QemuError as exc:
            raise AdapterError(str(exc)) from None
        self.throttle_pid = self.qemu.pid  # auto-converge slows QEMU (its vCPU threads with it)

    def saved_state(self) -> bytes:
        """QEMU's device state, saved since `suspend` (blocking: run it in a thread)."""
        try:
            return self.qemu.saved()
        except self._error as exc:
            raise AdapterError(str(exc)) from None

    def suspend(self) -> None:
        """Stop the guest; its device state is saved meanwhile (`saved_state`)."""
        try:
            self.qemu.stop()
        except self._error as exc:
            raise AdapterError(str(exc)) from None

    def resume(self) -> None:
        try:
            self.qemu.cont()
        except self._error as exc:
            raise AdapterError(str(exc)) from None

    def finish(self) -> str:
        self.qemu.quit()
        return "source QEMU quit (the guest runs on the destination now)"

    def load_reads(self) -> list[tuple[int, int]]:
        """Byte ranges of the RAM file that the destination QEMU reads while it loads its
        device state (its virtio rings), asked while the guest runs (blocking: a thread).
        Guest-physical addresses below 2 GiB are RAM file offsets on x86's pc and q35
        machines; above, the mapping depends on the machine, and those are left out."""
        return [(a, n) for a, n in self.qemu.ring_ranges() if a + n <= LOW_RAM]


def parse_adapter(spec: str, mountpoint: str, files: list[str]) -> VMAdapter:
    if spec == "freeze":
        return FreezeAdapter(mountpoint, files)
    kind, _, arg = spec.partition(":")
    if kind == "pid":
        try:
            return PidAdapter(int(arg))
        except ValueError:
            raise AdapterError(f"bad pid in --suspend {spec!r}: use pid:1234") from None
    if kind == "cmd":
        stop, sep, cont = arg.partition("::")
        if not sep:
            raise AdapterError("cmd adapter needs two commands: --suspend 'cmd:STOP::CONT'")
        return CmdAdapter(stop, cont)
    if kind == "qemu":
        if not arg:
            raise AdapterError("qemu adapter needs the QMP socket: --suspend qemu:/path/qmp.sock")
        return QemuAdapter(arg)
    raise AdapterError(f"unknown --suspend {spec!r}: use pid:PID, 'cmd:STOP::CONT', "
                       "qemu:QMP_SOCKET or freeze")


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return None
    return None if st in ("Z", "X") else st
