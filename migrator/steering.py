"""A running migration's control socket (the I/O of steerproto.py), beside its status file in
the runtime directory: that directory is 0700, the socket 0600, and a peer of another uid is
refused as blkfs's control socket refuses it."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import trio

from blkfs.control import peer_uid, private_unix_socket

from . import steerproto as sp

log = logging.getLogger(__name__)


async def serve_steering(path: str,
                         apply: Callable[[sp.Set | sp.Cancel | sp.Go], dict[str, Any]],
                         *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Answer requests on `path` until cancelled; `apply` carries one out and says how."""
    sock = await private_unix_socket(path, 4)  # (a dead process's of the same pid replaced)
    owner = os.getuid()

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                if peer_uid(stream.socket) not in (0, owner):
                    await stream.send_all(sp.encode({"ok": False, "error": "permission denied"}))
                    return
                buf = b""
                while True:
                    data = await stream.receive_some(sp.MAX_LINE)
                    if not data:
                        return
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        try:
                            reply = apply(sp.parse_request(line))
                        except sp.SteerError as exc:
                            reply = {"ok": False, "error": str(exc)}
                        await stream.send_all(sp.encode(reply))
                    if len(buf) > sp.MAX_LINE:
                        await stream.send_all(sp.encode({"ok": False, "error": "too long"}))
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                return

    task_status.started()
    try:
        await trio.serve_listeners(handle, [trio.SocketListener(sock)])
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


async def steer(path: str, request: bytes, timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to the migration listening on `path`; its answer. OSError (it ended,
    or never listened) and trio.TooSlowError are the caller's to word."""
    with trio.fail_after(timeout):
        stream = await trio.open_unix_socket(path)
        async with stream:
            buf = b""
            try:
                await stream.send_all(request)
                while b"\n" not in buf:
                    data = await stream.receive_some(sp.MAX_LINE)
                    if not data:
                        raise OSError(f"{path}: closed without an answer")
                    buf += data
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # (a migration that ends as we ask: seen as a crash of evacuate under load)
                raise OSError(f"{path}: the connection broke: {exc}") from None
    return dict(json.loads(buf.split(b"\n", 1)[0]))
