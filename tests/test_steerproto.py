"""The requests a running migration's control socket takes (pure)."""

from __future__ import annotations

import pytest

from migrator import steerproto as sp


def test_set_takes_a_positive_cap_or_none() -> None:
    assert sp.parse_request(sp.set_bandwidth(12.5)) == sp.Set(12.5)
    assert sp.parse_request(sp.set_bandwidth(None)) == sp.Set(None)
    assert sp.parse_request(b'{"op": "set", "bandwidth_mb_s": 3}') == sp.Set(3.0)


def test_set_takes_a_downtime_target_and_post_copy_leaving_the_rest() -> None:
    assert sp.parse_request(sp.set_(downtime_ms=200)) == sp.Set(sp.UNCHANGED, 200.0)
    assert sp.parse_request(sp.set_(postcopy=True)) == sp.Set(sp.UNCHANGED, None, True)
    assert sp.parse_request(sp.set_(None, 80, True)) == sp.Set(None, 80.0, True)


def test_cancel_before_the_commit_or_anyway() -> None:
    assert sp.parse_request(sp.cancel()) == sp.Cancel(True)
    assert sp.parse_request(sp.cancel(unless_committed=False)) == sp.Cancel(False)
    assert sp.parse_request(b'{"op": "cancel"}') == sp.Cancel(False)


def test_go_names_its_destination_and_cap_or_keeps_them() -> None:
    assert sp.parse_request(sp.go("10.0.0.2:7070", 25.0)) == sp.Go("10.0.0.2:7070", 25.0)
    assert sp.parse_request(sp.go(mb_s=None)) == sp.Go(None, None)  # no cap
    assert sp.parse_request(sp.go()) == sp.Go(None, sp.UNCHANGED)


@pytest.mark.parametrize(("line", "says"), [
    (b"GET / HTTP/1.1", "not a JSON request"),
    (b"[1, 2]", "unknown request"),
    (b'{"op": "stop"}', "unknown request"),
    (b'{"op": "cancel", "unless_committed": 1}', "true or false"),
    (b'{"op": "cancel", "now": true}', "nothing else"),
    (b'{"op": "set"}', "takes bandwidth_mb_s, downtime_ms or postcopy"),
    (b'{"op": "set", "downtime_ms": 0}', "milliseconds > 0"),
    (b'{"op": "set", "downtime_ms": "short"}', "milliseconds > 0"),
    (b'{"op": "set", "downtime_ms": true}', "milliseconds > 0"),
    (b'{"op": "set", "postcopy": false}', "takes true"),
    (b'{"op": "set", "postcopy": 1}', "takes true"),
    (b'{"op": "set", "bandwidth_mb_s": 1, "x": 2}', "nothing else"),
    (b'{"op": "set", "bandwidth_mb_s": 0}', "at least 0.01"),
    (b'{"op": "set", "bandwidth_mb_s": -4}', "at least 0.01"),
    (b'{"op": "set", "bandwidth_mb_s": true}', "at least 0.01"),
    (b'{"op": "set", "bandwidth_mb_s": "fast"}', "at least 0.01"),
    (b'{"op": "set", "bandwidth_mb_s": NaN}', "at least 0.01"),
    (b'{"op": "set", "bandwidth_mb_s": Infinity}', "at least 0.01"),
    (b'{"op": "go", "to": 7070}', "HOST:PORT"),
    (b'{"op": "go", "to": ""}', "HOST:PORT"),
    (b'{"op": "go", "bandwidth_mb_s": 0}', "at least 0.01"),
    (b'{"op": "go", "now": true}', "nothing else"),
])
def test_anything_else_is_refused_with_its_reason(line: bytes, says: str) -> None:
    with pytest.raises(sp.SteerError, match=says):
        sp.parse_request(line)
