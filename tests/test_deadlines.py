"""When a migration that takes too long ends (pure): --timeout and the progress timeout."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrator.deadlines import Deadlines, OnTimeout

MiB = 1 << 20


def test_the_timeout_fires_once_what_on_timeout_says() -> None:
    d = Deadlines(timeout_s=30, on_timeout=OnTimeout.POSTCOPY)
    assert d.due(29.9, 0, 100 * MiB) is None
    due = d.due(30.0, 0, 100 * MiB)
    assert due is not None and due.action is OnTimeout.POSTCOPY and not due.progress
    assert due.reason == "--timeout 30 s reached"
    assert d.due(31, 0, 100 * MiB) is None  # (once)


def test_the_timeout_waits_for_a_phase_that_counts() -> None:
    """Held, connecting or past the rounds: nothing to end by switching over."""
    d = Deadlines(timeout_s=5)
    assert d.due(9, 0, None) is None
    due = d.due(10, 0, 0)
    assert due is not None and due.action is OnTimeout.SUSPEND


def test_no_progress_for_the_progress_timeout_stops_it() -> None:
    d = Deadlines(progress_timeout_s=150)
    assert d.due(0, 0, 100 * MiB) is None
    assert d.due(100, 0, 60 * MiB) is None  # smaller: progress
    assert d.due(249, 0, 80 * MiB) is None  # larger again, 149 s since the least
    due = d.due(250, 0, 70 * MiB)
    assert due is not None and due.action is OnTimeout.ABORT and due.progress
    assert due.reason == ("no progress for 150 s: 70.0 MiB still to send, never less than "
                          "60.0 MiB (--progress-timeout; 0: never)")
    assert d.due(500, 0, 70 * MiB) is None  # (once)


def test_a_step_of_auto_converge_counts_as_progress() -> None:
    d = Deadlines(progress_timeout_s=10)
    d.due(0, 0, 50 * MiB)
    assert d.due(9, 0, 50 * MiB, throttle_pct=20) is None
    assert d.due(18, 0, 50 * MiB, throttle_pct=20) is None  # 9 s since the step
    assert d.due(19, 0, 50 * MiB, throttle_pct=20) is not None


def test_the_progress_clock_starts_over_outside_the_phases_that_count() -> None:
    d = Deadlines(progress_timeout_s=10)
    d.due(0, 0, 50 * MiB)
    assert d.due(8, 0, None) is None  # (e.g. a reattach's connecting)
    assert d.due(17, 0, 50 * MiB) is None  # counting again from 17
    assert d.due(26, 0, 50 * MiB) is None
    assert d.due(27, 0, 50 * MiB) is not None


def test_zero_or_none_is_never() -> None:
    d = Deadlines(timeout_s=None, progress_timeout_s=None)
    assert all(d.due(t, 0, MiB) is None for t in range(0, 10_000, 100))
    with pytest.raises(ValueError):
        Deadlines(timeout_s=-1)
    with pytest.raises(ValueError):
        Deadlines(progress_timeout_s=float("nan"))


@given(st.lists(st.tuples(st.floats(0, 20), st.integers(0, 100)), max_size=40))
def test_the_progress_timeout_fires_only_after_that_long_without_a_new_least(
        steps: list[tuple[float, int]]) -> None:
    d, now, least, since = Deadlines(progress_timeout_s=30), 0.0, None, 0.0
    for dt, remaining in steps:
        now += dt
        due = d.due(now, 0, remaining)
        if least is None or remaining < least:
            least, since = remaining, now
            assert due is None
        elif due is not None:
            assert now - since >= 30 and due.progress
            return
        else:
            assert now - since < 30
