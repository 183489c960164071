"""What a running migration's control socket understands (pure): one JSON object a line each
way. `migrator evacuate` re-divides its bandwidth budget with it as migrations start and end.

    {"op": "set", "bandwidth_mb_s": 50.0}     -> {"ok": true, "bandwidth_mb_s": 50.0}
    {"op": "set", "bandwidth_mb_s": null}     -> no cap
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

MAX_LINE = 4096  # a request longer than this is not one of ours


class SteerError(ValueError):
    """A request the socket refuses; its text goes back to the client."""


@dataclass(frozen=True)
class SetBandwidth:
    mb_s: float | None  # None: no cap


@dataclass(frozen=True)
class Cancel:
    unless_committed: bool  # past its Commit, a migration finishes (False: stop it anyway)


def parse_request(line: bytes) -> SetBandwidth | Cancel:
    try:
        doc = json.loads(line)
    except ValueError:
        raise SteerError("not a JSON request") from None
    if isinstance(doc, dict) and doc.get("op") == "cancel":
        if set(doc) - {"op", "unless_committed"} or not isinstance(
                doc.get("unless_committed", False), bool):
            raise SteerError("'cancel' takes unless_committed (true or false) and nothing else")
        return Cancel(bool(doc.get("unless_committed", False)))
    if not isinstance(doc, dict) or doc.get("op") != "set":
        raise SteerError("unknown request (only 'set' and 'cancel' are understood)")
    if set(doc) - {"op", "bandwidth_mb_s"} or "bandwidth_mb_s" not in doc:
        raise SteerError("'set' takes bandwidth_mb_s and nothing else")
    mb_s = doc["bandwidth_mb_s"]
    if mb_s is None:
        return SetBandwidth(None)
    if isinstance(mb_s, bool) or not isinstance(mb_s, (int, float)) or not (
            math.isfinite(mb_s) and mb_s > 0):
        raise SteerError(f"bandwidth_mb_s must be a positive number or null, not {mb_s!r}")
    return SetBandwidth(float(mb_s))


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode() + b"\n"


def set_bandwidth(mb_s: float | None) -> bytes:
    return encode({"op": "set", "bandwidth_mb_s": mb_s})


def cancel(unless_committed: bool = True) -> bytes:
    return encode({"op": "cancel", "unless_committed": unless_committed})
