"""What may change while a migration runs (`migrator set`, `--timeout`): its bandwidth cap,
its downtime target, and a switchover sooner than the rounds would choose. Each takes effect
in the migration's own trio loop, and shows on its live line, status and report."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from .plan import RoundPlanner
from .report import MigrationReport, Progress


class Steerable:
    """The part of source.Source that its control socket and deadlines act on."""

    opts: Any  # MigrateOptions
    report: MigrationReport
    progress: Progress
    planner: RoundPlanner | None
    ch: Any
    store: Any
    memory_ids: set[int]
    switch_now: tuple[bool, str] | None

    def set_bandwidth(self, mb_s: float | None) -> None:
        """A new cap, from now on and on any channel a reattach opens (migrator set)."""
        self.opts.bandwidth_mb_s = self.progress.cap_mb_s = mb_s
        self.report.bandwidth_steps.append((round(time.time() - self.report.started_at, 2), mb_s))
        if self.ch is not None:
            self.ch.set_limit(mb_s * 1e6 if mb_s else None)

    def target_changed(self) -> None:
        """The downtime target now, for the live line, status and report."""
        policy = self.planner.policy if self.planner is not None else self.opts.policy
        self.report.downtime_target_ms = self.progress.downtime_target_ms = (
            None if policy.threshold_blocks is not None else policy.downtime_ms)

    def set_downtime(self, ms: float) -> None:
        """A new downtime target, from the rounds' next decision on (migrator set)."""
        policy = replace(self.opts.policy, threshold_blocks=None, downtime_ms=ms,
                         postcopy_downtime_ms=ms)
        self.opts.policy = policy
        if self.planner is not None:
            self.planner.policy = policy
        self.target_changed()
        self.report.downtime_steps.append((round(time.time() - self.report.started_at, 2), ms))

    def switch_over_soon(self, postcopy: bool, why: str) -> str | None:
        """Switch over at the end of the initial copy or of the round under way, the memory
        post-copy if `postcopy`; the reason it cannot, if it cannot."""
        if postcopy and self.opts.postcopy == "off":
            return ("started with --postcopy off: post-copy needs its spill area, made at the "
                    "start; start it with --postcopy auto")
        if postcopy and self.store is not None and not self.memory_ids:
            return "none of its files is memory: there is nothing to post-copy"
        if self.opts.stop_and_copy:
            return "a --stop-and-copy migration has no rounds to end"
        if self.progress.phase not in ("held", "connecting", "initial copy", "dirty rounds"):
            return f"it is past its rounds already ({self.progress.phase})"
        self.switch_now = (postcopy, why)
        return None
