"""What a running migration's control socket understands (pure): one JSON object a line each
way. `migrator evacuate` re-divides its bandwidth budget with it as migrations start and end.

    {"op": "set", "bandwidth_mb_s": 50.0}     -> {"ok": true, "bandwidth_mb_s": 50.0}
    {"op": "set", "bandwidth_mb_s": null}     -> no cap
    {"op": "set", "downtime_ms": 200}         -> the rounds' downtime target from their next
                                                 decision on (--downtime-ms)
    {"op": "set", "postcopy": true}           -> switch over into post-copy at the end of the
                                                 round under way (QEMU's migrate-start-postcopy)
        (one "set" may carry any of the three; it carries at least one)
    {"op": "go", "to": "HOST:PORT", "bandwidth_mb_s": 50.0}
                                              -> {"ok": true}: a migrate started with --hold
        sets out now, to there (its --to if none), at most that fast (unchanged if absent)
    {"op": "cancel", "unless_committed": true} -> {"ok": true, "cancelled": true} before the
        Commit (the VM runs on here), {"ok": true, "cancelled": false} past it (it finishes):
        decided in the migration's own process, where no Commit can slip in between
    anything else                             -> {"ok": false, "error": "..."}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .defaults import MIN_BANDWIDTH_MB_S

MAX_LINE = 4096  # a request longer than this is not one of ours


class SteerError(ValueError):
    """A request the socket refuses; its text goes back to the client."""


UNCHANGED = "unchanged"  # Set.mb_s and Go.mb_s when the request names no bandwidth


@dataclass(frozen=True)
class Set:
    mb_s: float | str | None = UNCHANGED  # None: no cap
    downtime_ms: float | None = None  # None: unchanged
    postcopy: bool = False  # True: go post-copy now


@dataclass(frozen=True)
class Cancel:
    unless_committed: bool  # past its Commit, a migration finishes (False: stop it anyway)


@dataclass(frozen=True)
class Go:
    to: str | None  # None: the --to it was started with
    mb_s: float | str | None = UNCHANGED


def _bandwidth(mb_s: object) -> float | None:
    if mb_s is None:
        return None
    if isinstance(mb_s, bool) or not isinstance(mb_s, (int, float)) or not (
            math.isfinite(mb_s) and mb_s >= MIN_BANDWIDTH_MB_S):
        raise SteerError(f"bandwidth_mb_s must be a number of at least {MIN_BANDWIDTH_MB_S:g} "
                         f"or null, not {mb_s!r}")
    return float(mb_s)


def parse_request(line: bytes) -> Set | Cancel | Go:
    try:
        doc = json.loads(line)
    except ValueError:
        raise SteerError("not a JSON request") from None
    if isinstance(doc, dict) and doc.get("op") == "go":
        if set(doc) - {"op", "to", "bandwidth_mb_s"}:
            raise SteerError("'go' takes to and bandwidth_mb_s and nothing else")
        to = doc.get("to")
        if to is not None and (not isinstance(to, str) or not to or len(to) > 300):
            raise SteerError(f"to must be HOST:PORT, not {to!r}")
        return Go(to, _bandwidth(doc["bandwidth_mb_s"]) if "bandwidth_mb_s" in doc
                  else UNCHANGED)
    if isinstance(doc, dict) and doc.get("op") == "cancel":
        if set(doc) - {"op", "unless_committed"} or not isinstance(
                doc.get("unless_committed", False), bool):
            raise SteerError("'cancel' takes unless_committed (true or false) and nothing else")
        return Cancel(bool(doc.get("unless_committed", False)))
    if not isinstance(doc, dict) or doc.get("op") != "set":
        raise SteerError("unknown request (only 'set', 'go' and 'cancel' are understood)")
    fields = {"bandwidth_mb_s", "downtime_ms", "postcopy"}
    if set(doc) - {"op"} - fields or not set(doc) & fields:
        raise SteerError("'set' takes bandwidth_mb_s, downtime_ms or postcopy and nothing else")
    downtime = doc.get("downtime_ms")
    if downtime is not None and (isinstance(downtime, bool) or not isinstance(
            downtime, (int, float)) or not (math.isfinite(downtime) and downtime > 0)):
        raise SteerError(f"downtime_ms must be a number of milliseconds > 0, not {downtime!r}")
    if doc.get("postcopy", False) is not True and "postcopy" in doc:
        raise SteerError("postcopy takes true (go post-copy now) and nothing else")
    return Set(_bandwidth(doc["bandwidth_mb_s"]) if "bandwidth_mb_s" in doc else UNCHANGED,
               None if downtime is None else float(downtime), bool(doc.get("postcopy")))


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode() + b"\n"


def set_bandwidth(mb_s: float | None) -> bytes:
    return encode({"op": "set", "bandwidth_mb_s": mb_s})


def set_(mb_s: float | str | None = UNCHANGED, downtime_ms: float | None = None,
         postcopy: bool = False) -> bytes:
    doc: dict[str, Any] = {"op": "set"}
    if mb_s != UNCHANGED:
        doc["bandwidth_mb_s"] = mb_s
    if downtime_ms is not None:
        doc["downtime_ms"] = downtime_ms
    if postcopy:
        doc["postcopy"] = True
    return encode(doc)


def cancel(unless_committed: bool = True) -> bytes:
    return encode({"op": "cancel", "unless_committed": unless_committed})


def go(to: str | None = None, mb_s: float | str | None = UNCHANGED) -> bytes:
    doc: dict[str, Any] = {"op": "go"}
    if to is not None:
        doc["to"] = to
    if mb_s != UNCHANGED:
        doc["bandwidth_mb_s"] = mb_s
    return encode(doc)
