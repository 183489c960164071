"""QEMU on both ends: blkfs and the migrator move the disk and the RAM file, QEMU moves only its
device state (migration capability ``x-ignore-shared``: RAM in a shared memory-backend-file is
left out of QEMU's stream).

Source (``--suspend qemu:QMP_SOCKET``): ``stop``, then QEMU's ``migrate`` into a unix socket in
a private (0700) directory that the migrator reads: the device state (~0.4-1 MiB) goes to the
destination over the migration connection, never through a file a stranger could read.  On a
failure before the switchover: ``cont``.  After it: ``quit``.

Destination (``serve --resume qemu:CMDLINE_FILE|QMP_SOCKET``): a QEMU waiting with ``-incoming
defer`` (started by us from the command line in CMDLINE_FILE as soon as the migration's files
exist, or one already running); at the switchover ``migrate-incoming`` from a private unix
socket that the migrator fills with the received device state, wait for ``completed``, then
``cont``.  QEMU reads guest RAM while it loads its device state: in post-copy those reads
arrive at blkfs as reads of absent blocks and are served then.

Blocking code on purpose (the QMP client is blocking): callers run it in a worker thread.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time

from .qmp import DEFAULT_TIMEOUT, QMP, QMPError, QMPRefused

log = logging.getLogger(__name__)

MIGRATE_TIMEOUT = 60.0
MAX_QUEUES = 64  # virtio queues asked of one device at most (virtio-net: 2 per queue pair)
START_TIMEOUT = 20.0


class QemuError(Exception):
    """A QEMU step failed; the message carries QEMU's own words."""


def _private_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix)  # mode 0700: nobody else can reach the socket


def _wait_migration(q: QMP, what: str, timeout: float = MIGRATE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = q.command("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise QemuError(f"QEMU {what} {status}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            raise QemuError(f"QEMU {what} did not complete within {timeout:g} s (status "
                            f"{status})")
        time.sleep(0.002)


def _ignore_shared(q: QMP) -> None:
    q.execute("migrate-set-capabilities",
              {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})


def _connect_qmp(path: str, timeout: float = DEFAULT_TIMEOUT) -> QMP:
    try:
        return QMP(path, timeout)
    except QMPError as exc:
        raise QemuError(str(exc)) from None


class QemuSource:
    """The source QEMU: stop, save the device state, and cont or quit.

    The save runs in a thread of its own once the guest is stopped, so the device state is
    written while the last dirty set travels (both are final once the guest stops); whoever
    needs it (`saved()`) or talks to QEMU next (`cont`, `quit`) waits for that thread first:
    the QMP connection is never used by two threads at once."""

    def __init__(self, qmp_path: str) -> None:
        self.path = qmp_path
        self.q = _connect_qmp(qmp_path)
        try:
            status = self.q.command("query-status")["status"]
            if status == "running":
                _ignore_shared(self.q)  # now, not in the downtime
        except QMPError as exc:
            self.q.close()
            raise QemuError(str(exc)) from None
        if status != "running":
            self.q.close()
            raise QemuError(f"the QEMU on {qmp_path} is {status!r}, not running: nothing to "
                            "migrate live")
        self.pid = self.q.peer_pid()  # QEMU's, seen on the QMP socket
        self.device_state = b""
        self._saver: threading.Thread | None = None
        self._save_error: QemuError | None = None

    def stop(self) -> None:
        """`stop`, then start saving the device state (RAM in the shared file left out)."""
        d = _private_dir("migrator-qemu-")
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            path = os.path.join(d, "state.sock")
            ls.bind(path)
            ls.listen(1)
            ls.settimeout(MIGRATE_TIMEOUT)
            self.q.command("stop")
        except QMPError as exc:
            ls.close()
            shutil.rmtree(d, ignore_errors=True)
            raise QemuError(str(exc)) from None
        except BaseException:
            ls.close()
            shutil.rmtree(d, ignore_errors=True)
            raise
        self._save_error = None
        self._saver = threading.Thread(target=self._save, args=(ls, path, d), daemon=True,
                                       name="qemu-device-state")
        self._saver.start()

    def _save(self, ls: socket.socket, path: str, d: str) -> None:
        try:
            with ls:
                self.q.command("migrate", uri=f"unix:{path}")
                conn, _ = ls.accept()
                with conn:
                    conn.settimeout(MIGRATE_TIMEOUT)
                    chunks = []
                    while data := conn.recv(1 << 20):
                        chunks.append(data)
            _wait_migration(self.q, "migrate (device state)")
            self.device_state = b"".join(chunks)
            if not self.device_state:
                raise QemuError("QEMU wrote an empty device state")
        except QMPError as exc:
            self._save_error = QemuError(str(exc))
        except QemuError as exc:
            self._save_error = exc
        except OSError as exc:
            self._save_error = QemuError(f"reading QEMU's device state: {exc}")
        except Exception as exc:  # a thread's error would vanish: keep it for saved()
            log.exception("saving QEMU's device state")
            self._save_error = QemuError(f"saving QEMU's device state failed: {exc!r}")
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def ring_ranges(self) -> list[tuple[int, int]]:
        """(guest-physical address, length) of every virtio queue's rings: what QEMU reads of
        guest RAM while it loads its device state (virtio_load checks each ring's indices).
        From QEMU's introspection commands (x-query-virtio*, QEMU 7.2+): none where QEMU has
        them not, since this is a hint for what to send first, never needed."""
        out: list[tuple[int, int]] = []
        try:
            devices = self.q.command("x-query-virtio")
            for dev in devices:
                for queue in range(MAX_QUEUES):
                    try:
                        st = self.q.command("x-query-virtio-queue-status", path=dev["path"],
                                            queue=queue)
                    except QMPError:
                        break  # (past its last queue)
                    num = int(st.get("vring-num", 0))
                    for key, size in (("vring-desc", 16 * num), ("vring-avail", 6 + 2 * num),
                                      ("vring-used", 6 + 8 * num)):
                        if st.get(key):
                            out.append((int(st[key]), size))
        except (QMPError, KeyError, TypeError, ValueError) as exc:
            log.info("no virtio ring addresses from QEMU (%s)", exc)
        return out

    def _join(self) -> None:
        if self._saver is not None:
            self._saver.join()
            self._saver = None

    def saved(self) -> bytes:
        """The device state, once its save is over; QemuError if it failed."""
        self._join()
        if self._save_error is not None:
            raise self._save_error
        return self.device_state

    def cont(self) -> None:
        self._join()  # (a failed save leaves QEMU stopped and able to go on)
        try:
            self.q.command("cont")
        except QMPError as exc:
            raise QemuError(str(exc)) from None

    def quit(self) -> None:
        self._join()
        try:
            self.q.command("quit")
        except (QMPError, OSError):
            pass  # it may close the socket before it answers
        self.q.close()


class QemuTarget:
    """The destination QEMU, waiting for its device state with `-incoming defer`."""

    def __init__(self, spec: str, mount: str) -> None:
        self.spec = spec
        self.mount = mount
        self.proc: subprocess.Popen[bytes] | None = None
        self.q: QMP | None = None
        self.dir = ""
        self.log = ""
        self.state_path = ""
        try:
            is_sock = stat.S_ISSOCK(os.stat(spec).st_mode)
        except FileNotFoundError:
            raise QemuError(f"--resume qemu:{spec}: no such file (give a QEMU command-line "
                            "file or the QMP socket of a QEMU started with -incoming defer)"
                            ) from None
        self.attach = is_sock
        if not is_sock:
            with open(spec) as f:
                text = " ".join(line.strip() for line in f
                                if line.strip() and not line.lstrip().startswith("#"))
            # Not through os.environ: a long-lived serve would keep its first session's mount
            text = text.replace("${MIGRATOR_MOUNT}", mount).replace("$MIGRATOR_MOUNT", mount)
            self.argv = shlex.split(os.path.expandvars(text))
            if not self.argv:
                raise QemuError(f"{spec} holds no QEMU command line")

    def start(self) -> None:
        """Start (or reach) the waiting QEMU; it opens its files on the mount."""
        if self.attach:
            self.q = _connect_qmp(self.spec)
            status = self.q.command("query-status")["status"]
            if status != "inmigrate":
                raise QemuError(f"the QEMU on {self.spec} is {status!r}: start it with "
                                "-incoming defer")
            self.dir = _private_dir("migrator-qemu-dst-")
            self._listen()
            return
        self.dir = _private_dir("migrator-qemu-dst-")
        qmp = os.path.join(self.dir, "qmp.sock")
        self.log = os.path.join(self.dir, "qemu.log")
        argv = [*self.argv, "-S", "-incoming", "defer", "-qmp", f"unix:{qmp},server=on,wait=off"]
        with open(self.log, "wb") as log:
            try:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=log, start_new_session=True,
                                             env=dict(os.environ, MIGRATOR_MOUNT=self.mount))
            except OSError as exc:
                raise QemuError(f"cannot start {argv[0]}: {exc.strerror}") from None
        # The socket file appears at QEMU's bind(), a moment before its listen(): a connect
        # in between is refused, so refusals are retried while QEMU lives (seen under load).
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise QemuError(f"the destination QEMU exited at start: {self._last_words()}")
            if time.monotonic() > deadline:
                raise QemuError(f"the destination QEMU opened no QMP socket within "
                                f"{START_TIMEOUT:g} s")
            if os.path.exists(qmp):
                try:
                    self.q = QMP(qmp, DEFAULT_TIMEOUT)
                    break
                except QMPRefused:
                    pass  # (not listening yet: the loop sees if it exited)
                except QMPError as exc:
                    raise QemuError(str(exc)) from None
            time.sleep(0.02)
        self._listen()

    def _listen(self) -> None:
        """QEMU listens for its device state now, so the switchover only has to send it."""
        assert self.q is not None
        self.state_path = os.path.join(self.dir, "state.sock")
        try:
            _ignore_shared(self.q)
            self.q.command("migrate-incoming", uri=f"unix:{self.state_path}")
        except QMPError as exc:
            raise QemuError(str(exc)) from None

    def _last_words(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                lines = [ln.strip() for ln in f if ln.strip()]
        except OSError:
            lines = []
        return lines[-1] if lines else "no message"

    def incoming(self, state: bytes) -> None:
        """Load the device state and `cont`: the VM runs here from now on."""
        assert self.q is not None
        q = self.q
        path = self.state_path
        try:
            deadline = time.monotonic() + START_TIMEOUT
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                while True:
                    try:
                        s.connect(path)
                        break
                    except (FileNotFoundError, ConnectionRefusedError):
                        if time.monotonic() > deadline:
                            raise QemuError("QEMU did not listen for its device state") from None
                        time.sleep(0.001)
                t0 = time.monotonic()
                s.sendall(state)
            t1 = time.monotonic()
            _wait_migration(q, "migrate-incoming")
            t2 = time.monotonic()
            q.command("cont")
            log.info("destination QEMU: state sent in %.1f ms, loaded %.1f ms later, cont "
                     "%.1f ms", (t1 - t0) * 1000, (t2 - t1) * 1000,
                     (time.monotonic() - t2) * 1000)
        except QMPError as exc:
            raise QemuError(str(exc)) from None
        except OSError as exc:
            raise QemuError(f"feeding QEMU its device state: {exc}") from None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def abort(self) -> None:
        """Before `cont`: a QEMU we started goes away, and its private directory with it (its
        last words are in the error already); one we attached to is left as it is."""
        if self.q is not None:
            self.q.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def detach(self) -> None:
        """After `cont`: QEMU runs on, without us."""
        if self.q is not None:
            self.q.close()
        if self.attach and self.dir:  # only our state socket was there
            shutil.rmtree(self.dir, ignore_errors=True)
