"""The summaries a person reads (pure: a report in, text out)."""

from __future__ import annotations

import io

from rich.console import Console

from migrator.report import SyncReport, print_sync_summary


def summary(r: SyncReport) -> str:
    out = io.StringIO()
    print_sync_summary(r, Console(file=out, width=4096))
    return " ".join(out.getvalue().split())


def test_only_a_sync_that_stopped_well_advises_the_migration() -> None:
    """(issue 26) A failed sync still said "next: 'migrator migrate ...' sends only what
    changed since"."""
    files = [{"name": "disk.raw", "size": 1 << 20}]
    ok = summary(SyncReport(status="stopped", to="h:1", files=files, epoch=3))
    assert "sends only what changed since" in ok
    failed = summary(SyncReport(status="failed", error="connection lost", to="h:1",
                                files=files, epoch=3))
    assert "sync failed: connection lost" in failed
    assert "sends only what changed" not in failed and "keeps its last whole epoch" in failed
    never = summary(SyncReport(status="failed", error="refused", to="h:1", files=files))
    assert "next" not in never.split()
