"""Reconnecting after the handoff: with backoff, for up to the io timeout, and longer while
the destination says it is still busy with this very migration (AbortCode.STILL_RUNNING:
alive, not lost)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from . import protocol as p
from .errors import MigrationError, NotOwner, PeerAborted

RECONNECT_FIRST, RECONNECT_MAX = 0.25, 4.0  # s between attempts: doubling, capped
REATTACH_PATIENCE = 10  # io timeouts at most, while the destination says it is still busy


async def keep_trying(attempt: Callable[[], Awaitable[None]], timeout: float, why: str) -> None:
    """`attempt` until it succeeds; NotOwner at once (the destination answered: no); a
    MigrationError naming the last failure once `timeout` passed with no success."""
    start = trio.current_time()
    deadline = start + timeout
    delay, last = RECONNECT_FIRST, why
    while True:
        with trio.move_on_after(max(0.0, deadline - trio.current_time())):
            try:
                await attempt()
                return
            except NotOwner:
                raise
            except MigrationError as exc:
                last = str(exc)
                if isinstance(exc, PeerAborted) and exc.code == p.AbortCode.STILL_RUNNING:
                    deadline = min(trio.current_time() + timeout,
                                   start + REATTACH_PATIENCE * timeout)
        left = deadline - trio.current_time()
        if left <= 0:
            raise MigrationError(f"{why}; reconnecting for {timeout:g} s failed: {last}")
        await trio.sleep(min(delay, left))  # the last try at the deadline itself
        delay = min(2 * delay, RECONNECT_MAX)
