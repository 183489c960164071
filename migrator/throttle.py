"""Auto-converge: slow a VM whose writes outrun the link, by stopping and continuing its
process in a duty cycle (what QEMU's cpu-throttle does to its vCPU threads, done from outside:
any process, QEMU included).

The duty cycle runs in a helper process of its own (``python -m migrator.throttle PID``), told
the level on its stdin, one percentage per line.  It exists so that no death leaves the VM
slowed: when the migrator goes (an exit, Ctrl-C, ``kill -9``), the helper reads end-of-file
(or gets SIGTERM from the kernel, PR_SET_PDEATHSIG), continues the VM and exits.  A level of
p % stops the VM for p/(100-p) of each RUN_SLICE it runs: 20 % costs it a fifth of its time,
99 % leaves it one part in a hundred.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys

import trio

RUN_SLICE = 0.02  # s the VM runs between two stops
CLOSE_WAIT = 5.0  # s the helper has to continue the VM and exit before it is killed
PR_SET_PDEATHSIG = 1


class ThrottleError(Exception):
    """The VM cannot be slowed (no helper, or it went away): the rounds go on without."""


class Throttle:
    """The helper of one VM process, from the engine (trio): `set` a level, `aclose` always
    (the VM runs at full speed again once it returns)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.level = 0
        self._proc: trio.Process | None = None

    async def set(self, level: int) -> None:
        try:
            if self._proc is None:
                self._proc = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "migrator.throttle", str(self.pid)],
                    stdin=subprocess.PIPE, start_new_session=True)  # (Ctrl-C is ours)
            assert self._proc.stdin is not None
            await self._proc.stdin.send_all(f"{level}\n".encode())
        except (OSError, trio.BrokenResourceError) as exc:
            raise ThrottleError(f"cannot slow process {self.pid}: {exc}") from None
        self.level = level

    async def aclose(self) -> None:
        """End the duty cycle: the helper continues the VM and exits (killed if it does not,
        and the VM continued here)."""
        proc, self._proc = self._proc, None
        self.level = 0
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            assert proc.stdin is not None
            try:
                await proc.stdin.aclose()
                with trio.move_on_after(CLOSE_WAIT):
                    await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                _continue(self.pid)


def _continue(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def duty_cycle(pid: int, rd: int) -> None:
    """Read levels from `rd` and apply them to `pid` until end-of-file; continue it always."""
    level, buf = 0, b""
    try:
        while True:
            if level:
                os.kill(pid, signal.SIGSTOP)
                stopped = RUN_SLICE * level / (100 - level)
                ready, _, _ = select.select([rd], [], [], stopped)
                os.kill(pid, signal.SIGCONT)
                if not ready:
                    ready, _, _ = select.select([rd], [], [], RUN_SLICE)
            else:
                ready, _, _ = select.select([rd], [], [])
            if ready:
                chunk = os.read(rd, 4096)
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        level = max(0, min(99, int(line)))
    except ProcessLookupError:
        return  # the VM is gone: nothing to slow
    finally:
        _continue(pid)


def main() -> int:
    pid = int(sys.argv[1])

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # the migrator died: continue the VM
    except (OSError, AttributeError):
        pass  # (end-of-file on stdin says the same, a little later)
    if os.getppid() == 1:  # the parent died before the prctl
        _continue(pid)
        return 0
    duty_cycle(pid, sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
