"""The summaries a person reads (pure: a report in, text out)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
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


async def test_an_incoming_status_that_cannot_be_kept_is_logged_and_serve_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """(keep_incoming_status runs in serve's nursery: an error there must not end serve)"""
    import trio

    from migrator.report import keep_incoming_status

    class Broken:  # a session whose figures cannot be read
        dest_record = object()
        migration = "m1"

    class Sessions:
        def __init__(self) -> None:
            self.running = [Broken()]

    with trio.move_on_after(0.3):
        await keep_incoming_status(Sessions(), str(tmp_path), "/mnt", interval=0.05)
    assert "cannot keep the incoming status" in caplog.text, caplog.text
