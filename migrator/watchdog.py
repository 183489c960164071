"""The deadlines of a running migrate (the I/O of deadlines.py): a look twice a second at
where it is, and what is due done in its own trio loop, where no Commit can slip in between
the look and the act."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from .deadlines import Deadlines, OnTimeout

COUNTED = ("initial copy", "dirty rounds")  # the phases whose remaining data counts
TICK_S = 0.5


def remaining(progress: Any) -> int | None:
    """Bytes left to send before the switchover, in a phase where that counts."""
    if progress.phase not in COUNTED or not progress.page_size:
        return None
    return int(progress.pending * progress.page_size)


async def watch_deadlines(src: Any, deadlines: Deadlines, stop: Callable[[str], object],
                          notify: Callable[[str], None]) -> None:
    """Until cancelled: `stop(why)` a migration whose time is up (abort; a frame under way
    to a peer that takes no data gets a few seconds: Channel.hurry), or have its rounds
    switch over at their next decision (suspend, postcopy)."""
    started = trio.current_time()
    while True:
        await trio.sleep(TICK_S)
        p = src.progress
        due = deadlines.due(trio.current_time(), started, remaining(p), p.throttle_pct)
        if due is None:
            continue
        if due.action is OnTimeout.ABORT:
            why = due.reason if due.progress else f"{due.reason} (--on-timeout abort)"
            notify(f"{why}: stopping")
            stop(f"{why}: stopped before the switchover, the VM runs on here")
            continue  # (past its Commit already it finishes: the other deadline may follow)
        cannot = src.switch_over_soon(due.action is OnTimeout.POSTCOPY,
                                      f"{due.reason} (--on-timeout {due.action.value})")
        if cannot:
            notify(f"{due.reason}, but {cannot}: going on")
        else:
            where = "the initial copy" if p.phase == "initial copy" else "this round"
            notify(f"{due.reason}: switching over at the end of {where} (--on-timeout "
                   f"{due.action.value})")
