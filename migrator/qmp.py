"""A small blocking client for QEMU's QMP monitor (a unix socket speaking JSON lines).

Blocking on purpose: the QEMU adapter issues a handful of commands at switchover
(``stop``, ``migrate``, ``cont``) from a plain thread or a script, and must not
drag an event loop into ``vm.py`` or into the end-to-end test.  Stdlib only.

    with QMP("/run/vm1/qmp.sock") as q:
        q.command("stop")
        q.execute("migrate-set-capabilities",
                  {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
        q.command("migrate", uri="exec:cat > /tmp/state")
        q.command("query-migrate")  # poll until "completed"

QMP argument names often contain hyphens: pass those through ``execute`` (a
dict) or as ``command(name, **{"x-name": v})``; names are sent unchanged.
"""

from __future__ import annotations

import array
import json
import socket
import struct
import time
from types import TracebackType
from typing import Any

DEFAULT_TIMEOUT = 10.0
_MAX_LINE = 16 << 20  # a reply longer than this is not QMP (query-* replies are small)


class QMPError(Exception):
    """A QMP failure to report in one line: QEMU's own error, or a broken connection."""

    def __init__(self, message: str, *, command: str | None = None,
                 error_class: str | None = None, desc: str | None = None) -> None:
        super().__init__(message)
        self.command = command
        self.error_class = error_class  # QEMU's "class", e.g. "GenericError"
        self.desc = desc                # QEMU's "desc", verbatim


class QMPRefused(QMPError):
    """Nobody listens on the socket (yet: QEMU binds it a moment before it listens; or any
    more: it exited and left the file behind)."""


class QMPTimeout(QMPError):
    """No reply (or event) in time: QEMU is stuck, busy, or serving another client."""


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end of a unix socket (QEMU, for auto-converge)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", creds)[0]
    return pid or None


class QMP:
    """One QMP session: connect, read the greeting, leave capabilities negotiation.

    QEMU serves one QMP client per monitor at a time; a second client connects but
    gets no greeting until the first one leaves, so it fails here with a timeout.
    """

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.greeting: dict[str, Any] = {}
        self._buf = b""
        self._next_id = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._connect()
        except BaseException:
            self._sock.close()
            raise

    def peer_pid(self) -> int | None:
        return peer_pid(self._sock)

    def _connect(self) -> None:
        self._sock.settimeout(self.timeout)
        try:
            self._sock.connect(self.path)
        except FileNotFoundError:
            raise QMPError(f"QMP socket {self.path} does not exist (is QEMU running with "
                           f"-qmp unix:{self.path},server=on,wait=off?)") from None
        except ConnectionRefusedError:
            raise QMPRefused(f"connection refused on QMP socket {self.path} "
                           "(QEMU has exited and left the socket behind?)") from None
        except TimeoutError:
            raise QMPTimeout(f"timed out connecting to QMP socket {self.path}") from None
        except OSError as exc:
            raise QMPError(f"cannot connect to QMP socket {self.path}: {exc.strerror}") from None
        deadline = time.monotonic() + self.timeout
        try:
            greeting = self._read_message(deadline, "the QMP greeting")
        except QMPTimeout:
            raise QMPTimeout(f"no QMP greeting on {self.path} within {self.timeout:g} s (not a "
                             "QMP socket, or another client holds the monitor?)") from None
        if not isinstance(greeting.get("QMP"), dict):
            raise QMPError(f"{self.path} is not a QMP socket: greeting was "
                           f"{json.dumps(greeting)[:200]}")
        self.greeting = greeting["QMP"]
        self.command("qmp_capabilities")

    @property
    def version(self) -> str:
        """QEMU's version from the greeting, e.g. "7.2.22"."""
        q = self.greeting.get("version", {}).get("qemu", {})
        return f"{q.get('major', '?')}.{q.get('minor', '?')}.{q.get('micro', '?')}"

    # --- commands ---------------------------------------------------------------

    def command(self, name: str, /, **args: Any) -> Any:
        """Run one command with keyword arguments; return its "return" value."""
        return self.execute(name, args or None)

    def execute(self, name: str, args: dict[str, Any] | None = None, *,
                timeout: float | None = None, fds: list[int] | None = None) -> Any:
        """Run one command; ``fds`` go along as SCM_RIGHTS (for ``getfd``/``add-fd``).

        Raises QMPError with QEMU's ``desc`` verbatim when the command fails.
        """
        self._next_id += 1
        msg_id = self._next_id
        msg: dict[str, Any] = {"execute": name, "id": msg_id}
        if args:
            msg["arguments"] = args
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._send(json.dumps(msg).encode() + b"\n", fds, deadline, name)
        while True:
            reply = self._read_message(deadline, f"the reply to {name}")
            if "event" in reply:
                continue  # asynchronous events (STOP, RESUME, ...): nothing waits for them
            # Replies carry our id; a parse error on QEMU's side comes back without one.
            if reply.get("id", msg_id) != msg_id:
                continue
            if "error" in reply:
                err = reply["error"] if isinstance(reply["error"], dict) else {}
                desc = str(err.get("desc", reply["error"]))
                raise QMPError(f"QMP {name}: {desc}", command=name,
                               error_class=err.get("class"), desc=desc)
            if "return" in reply:
                return reply["return"]
            raise QMPError(f"QMP {name}: unexpected reply {json.dumps(reply)[:200]}",
                           command=name)

    def close(self) -> None:
        """Close the connection (QEMU goes on running)."""
        self._sock.close()

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- wire -------------------------------------------------------------------

    def _send(self, data: bytes, fds: list[int] | None, deadline: float, what: str) -> None:
        self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = self._sock.sendmsg([data], anc)
                data = data[sent:]
            if data:
                self._sock.sendall(data)
        except TimeoutError:
            raise QMPTimeout(f"QMP {what}: timed out sending the command") from None
        except OSError as exc:
            raise QMPError(f"QMP {what}: connection to {self.path} lost "
                           f"({exc.strerror or exc})") from None

    def _read_message(self, deadline: float, what: str) -> dict[str, Any]:
        """The next JSON object from QEMU, waiting until ``deadline`` at most."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPTimeout(f"QMP: timed out waiting for {what}")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise QMPTimeout(f"QMP: timed out waiting for {what}") from None
            except OSError as exc:
                raise QMPError(f"QMP: connection to {self.path} lost while waiting for "
                               f"{what} ({exc.strerror or exc})") from None
            if not chunk:
                raise QMPError(f"QMP: QEMU closed the connection on {self.path} while we "
                               f"waited for {what}")
            self._buf += chunk
            if len(self._buf) > _MAX_LINE:
                raise QMPError(f"QMP: {self.path} sent {len(self._buf)} bytes without a "
                               "newline: not QMP")
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QMPError(f"{self.path} is not speaking QMP: got {line[:80]!r}") from None
        if not isinstance(msg, dict):
            raise QMPError(f"{self.path} is not speaking QMP: got {line[:80]!r}")
        return msg

