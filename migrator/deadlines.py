"""When a migration that takes too long ends (pure): what virsh's `migrate --timeout` and
KubeVirt's `progressTimeout` do.

* `--timeout S`: S seconds after it set out, the migration does what `--on-timeout` says:
  abort (stop, the VM runs on here), suspend (switch over at the end of the initial copy or of
  the round under way, whatever the downtime: virsh's --timeout-suspend) or postcopy (the same,
  with the memory going post-copy: virsh's --timeout-postcopy).
* the progress timeout: a migration whose remaining data (the rest of the initial copy, or the
  last dirty set) has not become smaller for S seconds is stopped, the VM running on here.  A
  step of auto-converge counts as progress: it is what is being done about it.

The migration's process asks `due` a few times a second (migrator/watchdog.py); each deadline
fires once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from blkfs.cliutil import human_bytes


class OnTimeout(Enum):
    ABORT = "abort"
    SUSPEND = "suspend"
    POSTCOPY = "postcopy"


@dataclass(frozen=True)
class Due:
    action: OnTimeout
    reason: str  # for the user's line and the report
    progress: bool = False  # the progress timeout's (else --timeout's)


@dataclass
class Deadlines:
    timeout_s: float | None = None  # --timeout (None: none)
    on_timeout: OnTimeout = OnTimeout.SUSPEND
    progress_timeout_s: float | None = None  # None or 0: never
    _timeout_fired: bool = False
    _progress_fired: bool = False
    _least: float = math.inf  # the least remaining data seen
    _since: float | None = None  # when it was last seen to shrink (or counting began)
    _throttle: int = 0

    def __post_init__(self) -> None:
        for name in ("timeout_s", "progress_timeout_s"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be >= 0, not {v!r}")
        self.on_timeout = OnTimeout(self.on_timeout)

    def due(self, now: float, started: float, remaining: int | None,
            throttle_pct: int = 0) -> Due | None:
        """What is due at `now` for a migration that set out at `started` and has `remaining`
        bytes to send before its switchover (None: in no phase that counts, such as its
        connecting or anything past the rounds)."""
        if (self.timeout_s and not self._timeout_fired and remaining is not None
                and now - started >= self.timeout_s):
            self._timeout_fired = True
            return Due(self.on_timeout, f"--timeout {self.timeout_s:g} s reached")
        if remaining is None:
            self._since = None  # (counting starts over where it counts again)
            return None
        if self._since is None or remaining < self._least or throttle_pct > self._throttle:
            self._least, self._since = min(self._least, remaining), now
            self._throttle = max(self._throttle, throttle_pct)
            return None
        limit = self.progress_timeout_s
        if limit and not self._progress_fired and now - self._since >= limit:
            self._progress_fired = True
            return Due(OnTimeout.ABORT, f"no progress for {limit:g} s: "
                       f"{human_bytes(remaining)} still to send, never less than "
                       f"{human_bytes(int(self._least))} (--progress-timeout; 0: never)",
                       progress=True)
        return None
