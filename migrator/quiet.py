"""One line per kind of refusal and window (pure): a peer that keeps knocking with the wrong
key must not fill the operator's log, yet the operator must learn that it keeps knocking."""

from __future__ import annotations

from dataclasses import dataclass, field

WINDOW_S = 10.0


@dataclass
class RepeatedLines:
    """Say the first line of a kind; hold the rest of that kind for `window` seconds, then say
    the next one with how many were held."""

    window: float = WINDOW_S
    _since: dict[str, float] = field(default_factory=dict)  # kind -> when its line was said
    _held: dict[str, int] = field(default_factory=dict)  # kind -> lines held since

    def line(self, kind: str, text: str, now: float) -> str | None:
        """The line to say now for `text` of `kind`, or None (held, counted)."""
        said = self._since.get(kind)
        if said is not None and now - said < self.window:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        held = self._held.pop(kind, 0)
        self._since[kind] = now
        if held and said is not None:
            return f"{text} (and {held} more like it in the {now - said:.0f} s before)"
        return text
