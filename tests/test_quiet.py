"""One line per kind of refusal and window (pure)."""

from __future__ import annotations

from migrator.quiet import RepeatedLines


def test_the_first_line_is_said_the_rest_counted_then_said_with_the_count() -> None:
    q = RepeatedLines(window=10)
    assert q.line("key", "refused a", 0.0) == "refused a"
    assert q.line("key", "refused b", 1.0) is None
    assert q.line("key", "refused c", 9.9) is None
    assert q.line("mismatch", "refused d", 5.0) == "refused d"  # another kind: its own window
    assert q.line("key", "refused e", 12.0) == "refused e (and 2 more like it in the 12 s before)"
    assert q.line("key", "refused f", 30.0) == "refused f"  # nothing held since
