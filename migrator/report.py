"""Migration metrics: the JSON report, the summary and the live progress line.

The engine fills a `MigrationReport` and a `Progress`; only this module and the CLI show them.
Field names follow QEMU's ``query-migrate`` where one fits (total time,
downtime, expected downtime, setup time, mbps, dirty-sync count), in
snake_case with their unit as a suffix.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import trio
from rich.console import Console
from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from blkfs.cliutil import human_bytes
from blkfs.ctlproto import PostcopyStats

from .plan import RoundStats

log = logging.getLogger(__name__)


class _Counted(Protocol):
    bytes_sent: int


@dataclass
class Progress:
    """Where a running migration is, for the live line (the engine updates it)."""

    phase: str = "connecting"
    round: int = 0
    pending: int = 0  # dirty pages to send
    page_size: int = 0  # bytes of each
    bytes_sent: int = 0
    total: int = 0  # data bytes of the migrated files
    channel: _Counted | None = None  # bytes on the wire, frames included, as they go
    sent_before: int = 0  # on the channels a reattach replaced
    migration: str = ""
    spill_flushed: bool = False  # post-copy: every remaining page is in the spill area
    expected_downtime_ms: float | None = None  # the last set at the measured bandwidth
    throttle_pct: int = 0  # auto-converge: how much the VM is slowed now
    cap_mb_s: float | None = None  # the bandwidth cap now (--bandwidth, migrator set)
    downtime_target_ms: float | None = None  # the rounds' target now (--downtime-ms, set)
    vm_name: str = ""

    @property
    def sent(self) -> int:
        return self.sent_before + (self.channel.bytes_sent if self.channel is not None
                                   else self.bytes_sent)


@dataclass
class MigrationReport:
    status: str = "setup"  # setup | active | completed | failed
    phase: str = ""  # the phase it ended in (connecting, initial copy ... verifying)
    error: str | None = None
    migration: str = ""  # its id in both sides' ownership records
    vm: str = ""  # the VM's id (ownership.py), the same on every host that held it
    vm_name: str = ""
    generation: int | None = None  # the VM's at the destination, once handed over
    files: list[dict[str, Any]] = field(default_factory=list)
    block_size: int = 0
    page_size: int = 0  # the unit of the dirty rounds (4 KiB under 64 KiB blocks)
    total_s: float = 0.0
    setup_ms: float = 0.0
    downtime_ms: float | None = None
    downtime_breakdown_ms: dict[str, float] = field(default_factory=dict)
    handoff_record_ms: float | None = None  # the durable "handed-off" write, before suspend
    reattaches: int = 0  # times the link broke after Commit and the source reconnected
    expected_downtime_ms: float | None = None
    bytes_sent: int = 0  # on the wire, frames and headers included
    data_bytes: int = 0  # size of the migrated files
    blocks_sent: int = 0  # by the initial copy (and post-copy)
    pages_sent: int = 0  # by the dirty rounds and the last set
    bytes_by_file: dict[str, int] = field(default_factory=dict)  # block data over the link
    # Bytes of blocks by how they travelled: normal (as data), compressed (--compress: their
    # size before), zero (all-zero blocks, as Zero runs), hole (holes of the source's files:
    # never read, sent as Zero runs)
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    # On the wire before the VM stopped, while it was stopped (last set, device state, the
    # handoff), and after it ran on the destination (post-copy, verification)
    bytes_by_phase: dict[str, int] = field(default_factory=dict)
    # How the destination's older copy was used: "none" (it held nothing, or --delta off),
    # "digests" (it sent the xxh3 of each block it held; only blocks that differ travelled),
    # "lineage" (a replica of a known epoch: only the blocks written since), or both
    delta: str = "none"
    held_blocks: int = 0  # blocks the destination said it held
    held_digest_bytes: int = 0  # what saying so cost, on the wire (8 bytes a block + frames)
    # "lineage": files the destination holds as a replica of a known epoch (migrator sync):
    # only their blocks written since travelled, none of the others was read or digested
    lineage_files: list[str] = field(default_factory=list)
    lineage_blocks: int = 0  # blocks of those files not sent, nor read, nor digested
    lineage_detail: str = ""  # why a replica was not (wholly) used, if it was named
    # A figure that was never measured (the migration ended before) is None, never 0
    blocks_per_s: float | None = None  # blocks sent per second, initial copy to resume
    dirty_rate_mb_s: float | None = None  # the last round's: how fast the VM dirtied blocks
    spill_bytes: int = 0  # post-copy pages written into the spill area
    static_blocks: int = 0
    dynamic_blocks: int = 0
    initial_copy_s: float | None = None
    rounds: list[RoundStats] = field(default_factory=list)
    dirty_sync_count: int = 0
    last_set_pages: int = 0
    switchover_reason: str = ""
    # Auto-converge: the most the VM was slowed (%), for how long, and each step as
    # (s since the rounds began, %); absent when it never was
    throttle_max_pct: int | None = None
    throttle_s: float | None = None
    throttle_steps: list[tuple[float, int]] = field(default_factory=list)
    mbps: float | None = None  # the rate measured over what was sent
    # The cap as it was changed while the migration ran (its control socket: evacuate's
    # shares): (s since the start, MB/s or None for none)
    bandwidth_steps: list[tuple[float, float | None]] = field(default_factory=list)
    # The downtime target (--downtime-ms; None under --threshold-blocks) and its changes
    # ('migrator set --downtime'): (s since the start, ms)
    downtime_target_ms: float | None = None
    downtime_steps: list[tuple[float, float]] = field(default_factory=list)
    verified: bool = False
    verify_s: float | None = None
    mismatched_blocks: int = 0  # verification: blocks that differ on the destination
    verify_detail: str = ""  # the first of them, by file and block
    source_vm: str = ""
    device_state_bytes: int = 0  # the hypervisor's own state (QEMU), sent in the downtime
    started_at: float = field(default_factory=time.time)
    # post-copy (None/0 in a pure pre-copy migration)
    postcopy_files: list[str] = field(default_factory=list)
    postcopy_reason: str = ""  # --postcopy=auto: why pre-copy of memory was given up
    postcopy_pages: int = 0  # memory pages left absent at switchover
    warm_set_pages: int = 0  # post-copy: the hottest memory pages sent with the last set instead
    load_reads: int = 0  # blocks the hypervisor said it reads while it loads (QEMU: its rings)
    load_reads_left_absent: int = 0  # of those, left absent all the same (the budget was short)
    postcopy_s: float | None = None  # Commit -> the destination has every page
    resume_ms: float | None = None  # suspend -> running on the destination
    spill_flushed_s: float | None = None  # Commit -> every page durable in the spill area
    pages_spilled: int = 0
    slot_reuses: int = 0
    postcopy: PostcopyStats | None = None  # the destination daemon's figures, as it sent them

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)  # (with the phase it ended in: "phase")
        ratio = self.bytes_sent / self.data_bytes if self.data_bytes else None
        d["bytes_sent_ratio"] = None if ratio is None else round(ratio, 4)
        return d

    def write(self, path: str) -> None:
        write_json(path, self.to_json())


LOG_WIDTH = 4096  # columns of a console that is not a terminal: a line is never cut


def out_console() -> Console:
    """The console of summaries on stdout: a terminal's width, or, into a pipe or a file (a
    log read with less and grep), lines whole: never wrapped nor cut with an ellipsis."""
    c = Console()
    return c if c.is_terminal else Console(width=LOG_WIDTH, soft_wrap=True)


def write_json(path: str, doc: Any) -> None:
    """A report, whole or not at all (a reader never sees half of it, nor a stale one)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def print_summary(r: MigrationReport, console: Console) -> None:
    """The summary: every value in it was measured; a row of what never happened (a
    verification of a migration that failed in its initial copy) is left out."""
    ok = r.status == "completed" and r.verified
    head = "[bold green]migration completed[/]" if ok else f"[bold red]migration {r.status}[/]"
    console.print(head + (f": {r.error}" if r.error else ""))
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    dt = "-" if r.downtime_ms is None else f"{r.downtime_ms:.1f} ms"
    edt = "-" if r.expected_downtime_ms is None else f"{r.expected_downtime_ms:.1f} ms"
    rows = [
        ("files", ", ".join(f"{f['name']} ({human_bytes(f['size'])})" for f in r.files)),
        *([("ended in", f"{r.phase or 'its start'}")] if not ok else []),
        ("total time", f"{r.total_s:.2f} s" + (
            f" (initial copy {r.initial_copy_s:.2f} s)" if r.initial_copy_s is not None
            else " (the initial copy did not finish)")),
        *([("downtime", f"{dt} (expected {edt}; "
                        + ", ".join(f"{k} {v:.1f}" for k, v in r.downtime_breakdown_ms.items())
                        + ")")] if r.downtime_ms is not None or r.downtime_breakdown_ms else []),
        ("data / sent", f"{human_bytes(r.data_bytes)} / {human_bytes(r.bytes_sent)}"
                        + (f" ({r.bytes_sent / r.data_bytes:.3f}x)" if r.data_bytes else "")),
        *([("by kind", ", ".join(f"{k} {human_bytes(v)}" for k, v in (
            ("as data", r.bytes_by_kind.get("normal", 0)),
            ("compressed", r.bytes_by_kind.get("compressed", 0)),
            ("zero blocks as runs", r.bytes_by_kind.get("zero", 0)),
            ("holes, never read", r.bytes_by_kind.get("hole", 0)),
            ("held by the destination already", r.bytes_by_kind.get("held", 0))) if v))]
          if set(r.bytes_by_kind) - {"normal"} else []),
        *([("replica", f"{', '.join(r.lineage_files)}: the destination holds them as of a "
            f"synced epoch; {r.lineage_blocks} unchanged blocks neither read nor sent (every "
            "block verified)")] if r.lineage_files else []),
        *([("older copy", f"the destination held {r.held_blocks} blocks and said so in "
            f"{human_bytes(r.held_digest_bytes)} of digests: only the blocks that differ "
            "travelled (every block verified)")] if "digests" in r.delta else []),
        *([("replica not used", r.lineage_detail)]  # (said when there was one to use)
          if r.lineage_detail and r.lineage_detail != "no replica here" else []),
        *([("initial copy", f"{r.static_blocks} static blocks, then {r.dynamic_blocks} "
            "dynamic")] if r.initial_copy_s is not None else []),
        *([("rounds", (f"{len(r.rounds)}: " + _few(str(x.dirty_pages) for x in r.rounds)
                       + f" dirty pages of {human_bytes(r.page_size)} (the VM dirtying " + _few(
                           f"{x.dirty_rate_mb_s:.1f}" for x in r.rounds) + " MB/s)"
                       if r.rounds else "none")
           + (f"; last set {r.last_set_pages} pages" if r.switchover_reason else ""))]
          if r.rounds or r.switchover_reason else []),
        *([("by phase", "before the downtime {}, during it {}, after it {}".format(
            *(human_bytes(r.bytes_by_phase.get(k, 0))
              for k in ("before_downtime", "during_downtime", "after_downtime"))))]
          if r.bytes_by_phase else []),
        *([("switchover", r.switchover_reason)] if r.switchover_reason else []),
        *([("auto-converge", f"the VM slowed by up to {r.throttle_max_pct} % for "
            f"{r.throttle_s or 0:.1f} s (steps: " + ", ".join(
                f"{pct} % at {t:g} s" for t, pct in r.throttle_steps) + ")")]
          if r.throttle_max_pct else []),
        *([("bandwidth", f"{r.mbps:.0f} MB/s" + (
            f", {r.blocks_per_s:.0f} blocks/s" if r.blocks_per_s is not None else ""))]
          if r.mbps is not None else []),
        *([("verified", f"{'yes' if r.verified else 'NO'} ({r.verify_s:.2f} s, after resume)")]
          if r.verify_s is not None else []),
    ]
    pc = r.postcopy
    if r.postcopy_files and pc is not None:
        rows.append(("post-copy", f"{r.postcopy_pages} pages of {', '.join(r.postcopy_files)} "
                     f"in {r.postcopy_s if r.postcopy_s is not None else '-'} s "
                     f"({r.warm_set_pages} of the hottest went with the last set): "
                     f"{pc.pages_from_spill} from the spill area ({pc.pages_via_drain} by the "
                     f"drain), {pc.pages_via_demand_fetch} fetched; {pc.demand_faults} faults, "
                     f"p50 {pc.demand_fault_p50_ms} ms, p99 {pc.demand_fault_p99_ms} ms; "
                     f"{r.slot_reuses} slot reuses; {pc.slot_reads_refused} slot reads "
                     f"refused ({pc.generation_mismatches} stale, {pc.hash_mismatches} torn, "
                     f"{pc.mac_mismatches} forged)"))
    if r.source_vm:
        rows.append(("source VM", r.source_vm))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def _few(items: Iterable[str], head: int = 4, tail: int = 3) -> str:
    """A long list as its first and last few (the report's JSON has them all)."""
    listed = list(items)
    if len(listed) <= head + tail + 1:
        return ", ".join(listed)
    return ", ".join([*listed[:head], "…", *listed[-tail:]])


def status_doc(progress: Progress, report: MigrationReport, elapsed: float) -> dict[str, Any]:
    """What `migrator status` shows: query-migrate's fields, in the report's words."""
    sent = progress.sent
    left = progress.pending * progress.page_size if progress.page_size else None
    rate = sent / elapsed if elapsed > 0 else 0.0
    eta = (round(left / rate, 1) if progress.phase == "initial copy" and left is not None
           and rate > 0 else None)  # (of the initial copy: the rounds' end is not a rate's)
    return {
        "migration": progress.migration, "vm": report.vm_name or progress.vm_name,
        "status": report.status, "phase": progress.phase, "bandwidth_cap_mb_s": progress.cap_mb_s,
        "round": progress.round, "dirty_pages": progress.pending,
        "remaining_bytes": left, "initial_copy_eta_s": eta,
        "bytes_sent": sent, "data_bytes": progress.total,
        "mbps": round(sent / elapsed / 1e6, 1) if elapsed > 0 else 0.0,
        "blocks_sent": report.blocks_sent, "bytes_by_kind": report.bytes_by_kind,
        "dirty_rate_mb_s": report.dirty_rate_mb_s,
        "expected_downtime_ms": report.expected_downtime_ms,
        "downtime_target_ms": progress.downtime_target_ms,
        "throttle_pct": progress.throttle_pct,
        "downtime_ms": report.downtime_ms, "spill_flushed": progress.spill_flushed,
        "source_vm": report.source_vm, "error": report.error,
        "elapsed_s": round(elapsed, 2), "updated_at": time.time(),
    }


RUNNING = ("setup", "active", "syncing")  # statuses of a process that is not done


def incoming_doc(session: Any, mount: str) -> dict[str, Any]:
    """What `migrator status` on the destination shows of one incoming session."""
    files = list(session.files.values())
    phase = ("replica (migrator sync)" if session.replica else "receiving"
             if not session.resumed.is_set() else "resumed here, finishing (post-copy, "
             "verification)")
    return {"kind": "incoming", "status": "incoming", "pid": os.getpid(),
            "migration": session.migration, "vm": session.vm_name, "from": session.peer,
            "mount": mount, "phase": phase, "files": [f.entry.name for f in files],
            "bytes_received": session.ch.bytes_received,
            "data_bytes": sum(f.size for f in files), "blocks_written":
            session.rx.blocks_written, "updated_at": time.time()}


async def keep_incoming_status(sessions: Any, directory: str, mount: str,
                               interval: float = 0.5) -> None:
    """One status file per incoming session in `directory` (incoming-MIGRATION.json), as
    keep_status_file is for a migrate: current twice a second, removed when it leaves."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    mine: set[str] = set()
    try:
        while True:
            now = set()
            for session in list(sessions.running):
                if session.dest_record is None:
                    continue  # (before its Manifest: nothing to say yet)
                path = os.path.join(directory, f"incoming-{session.migration}.json")
                now.add(path)
                try:
                    await trio.to_thread.run_sync(_replace_file, path,
                                                  json.dumps(incoming_doc(session, mount)))
                except Exception:  # (a status is no reason to stop serving: say it, go on)
                    log.exception("cannot keep the incoming status %s", path)
            for path in mine - now:
                _unlink(path)
            mine = now
            await trio.sleep(interval)
    finally:
        for path in mine:
            _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def status_line(doc: dict[str, Any]) -> str:
    """One line for a status document (`migrator status`)."""
    if doc.get("kind") == "incoming":
        got, size = doc.get("bytes_received") or 0, doc.get("data_bytes") or 0
        return (f"incoming {doc.get('migration') or '?'} of VM {doc.get('vm') or '?'} from "
                f"{doc.get('from')} into {doc.get('mount')} (serve pid {doc.get('pid')}): "
                f"{doc.get('phase')}, {human_bytes(got)} received of {human_bytes(size)} of "
                f"data, {doc.get('blocks_written') or 0} blocks written; not runnable yet")
    if doc.get("kind") == "sync":
        lag = doc.get("lag_s")
        parts = [f"{doc.get('phase')}",
                 "no whole epoch yet" if doc.get("replica_epoch") is None else
                 f"replica at epoch {doc['replica_epoch']}, lag {lag:.1f} s (target "
                 f"{doc.get('lag_target_s'):g} s)" if lag is not None else
                 f"replica at epoch {doc['replica_epoch']}",
                 f"{human_bytes(doc.get('remaining_bytes') or 0)} dirty",
                 f"sent {human_bytes(doc.get('bytes_sent') or 0)}"]
        if doc.get("error"):
            parts.append(f"error: {doc['error']}")
        return (f"sync {doc.get('migration') or '?'} to {doc.get('to')} ({doc.get('status')}): "
                + ", ".join(parts))
    parts = [f"{doc.get('phase')}", f"round {doc.get('round')}",
             f"{doc.get('dirty_pages')} dirty pages"]
    if doc.get("remaining_bytes") is not None:
        parts.append(f"{human_bytes(doc['remaining_bytes'])} remaining")
    parts.append(f"sent {human_bytes(doc.get('bytes_sent') or 0)} of "
                 f"{human_bytes(doc.get('data_bytes') or 0)} at {doc.get('mbps', 0):g} MB/s")
    if doc.get("initial_copy_eta_s") is not None:
        parts.append(f"initial copy done in ~{doc['initial_copy_eta_s']:g} s")
    if doc.get("dirty_rate_mb_s") is not None:
        parts.append(f"dirtied at {doc['dirty_rate_mb_s']:g} MB/s")
    if doc.get("throttle_pct"):
        parts.append(f"VM slowed {doc['throttle_pct']} %")
    if doc.get("downtime_ms") is not None:
        parts.append(f"downtime {doc['downtime_ms']:g} ms")
    elif doc.get("expected_downtime_ms") is not None:
        parts.append(f"expected downtime {doc['expected_downtime_ms']:g} ms"
                     + (f" (target {doc['downtime_target_ms']:g})"
                        if doc.get("downtime_target_ms") is not None else ""))
    if doc.get("error"):
        parts.append(f"error: {doc['error']}")
    return f"{doc.get('migration') or '?'} ({doc.get('status')}): " + ", ".join(parts)


async def keep_status_file(progress: Progress, report: MigrationReport, path: str,
                           interval: float = 0.2, extra: dict[str, Any] | None = None,
                           more: Callable[[], dict[str, Any]] | None = None) -> None:
    """Keep a JSON status file current while a migration runs, for other processes (what
    QEMU's query-migrate answers): phase, round, dirty blocks, bytes, post-copy state;
    `more` adds fields as they are now (a sync's epoch and lag)."""
    t0 = time.monotonic()

    def text() -> str:
        doc = status_doc(progress, report, time.monotonic() - t0)
        doc.update(extra or {}, pid=os.getpid())
        doc.update(more() if more is not None else {})
        return json.dumps(doc)

    try:
        while True:
            # In a worker thread: on ext4 a rename over the old file waits for the new one's
            # data behind the copy's writeback (20 ms and more), which must not stall the loop.
            await trio.to_thread.run_sync(_replace_file, path, text())
            await trio.sleep(interval)
    finally:
        _replace_file(path, text())  # the end: its status and error


def _replace_file(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class LiveProgress:
    """A progress line: phase, round, dirty blocks, MB/s, ETA, refreshed five times a second.

    The bar counts bytes on the wire against the data size and never runs backwards."""

    def __init__(self, progress: Progress, console: Console) -> None:
        self.p = progress
        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                console=console, transient=True)

    async def run(self) -> None:
        with self.bar:
            task = self.bar.add_task("connecting", total=None, info="")
            t0 = time.monotonic()
            shown = 0
            while True:
                p = self.p
                elapsed = time.monotonic() - t0
                sent = p.sent
                mbps = sent / elapsed / 1e6 if elapsed > 0 else 0.0
                total = p.total or None
                info = (f"round {p.round}, {human_bytes(p.pending * p.page_size)} dirty, "
                        f"{mbps:.0f} MB/s")
                if p.cap_mb_s:
                    info += f" (cap {p.cap_mb_s:g})"
                if p.throttle_pct:
                    info += f", VM slowed {p.throttle_pct} %"
                if p.expected_downtime_ms is not None and p.phase == "dirty rounds":
                    info += f", expected downtime {p.expected_downtime_ms:.0f} ms"
                    if p.downtime_target_ms is not None:
                        info += f" (target {p.downtime_target_ms:g})"
                if p.phase == "initial copy" and total and mbps > 0:
                    info += f", ETA {max(0.0, (total - sent) / 1e6 / mbps):.1f} s"
                shown = max(shown, min(sent, total or sent))
                self.bar.update(task, description=p.phase, info=info, total=total,
                                completed=shown)
                await trio.sleep(0.2)


# -- migrator sync ---------------------------------------------------------------------------


@dataclass
class SyncRound:
    epoch: int
    pages: int  # dirty pages sent (the first round: the blocks of the initial copy, in pages)
    bytes: int  # on the wire
    s: float  # swap -> acknowledged durable there
    lag_s: float  # how old the replica was just before this acknowledgement


@dataclass
class SyncReport:
    """What `migrator sync` did, as JSON; the lag is the age of the newest whole epoch there."""

    status: str = "setup"  # setup | syncing | stopped | failed
    error: str | None = None
    sync: str = ""  # the id the destination's replica record carries
    to: str = ""
    files: list[dict[str, Any]] = field(default_factory=list)
    data_bytes: int = 0
    bytes_sent: int = 0  # on the wire, all sessions, frames included
    sessions: int = 0  # connections (more than 1: the link was cut and retried)
    delta: str = "none"  # the last session: "digests" if the destination held an older copy
    held_blocks: int = 0  # blocks that destination said it held (not sent), all sessions
    lineage_blocks: int = 0  # blocks its replica held as of our last epoch (not read at all)
    lineage_detail: str = ""  # the last session: why the replica's epoch could not be used
    initial_copy_s: float | None = None  # the first session's
    epoch: int | None = None  # the replica's: every write of this sync epoch is there
    synced_at: float | None = None
    epochs: int = 0  # rounds acknowledged, all sessions
    lag_target_s: float = 0.0
    lag_s: float | None = None  # the last acknowledged round's
    # The first copy takes what it takes; then the replica catches up (its lag falls under
    # the target) and from then on the lag should stay there:
    caught_up_s: float | None = None  # start -> the first epoch acknowledged within the target
    lag_max_s: float = 0.0  # worst since it caught up
    lag_over_target: int = 0  # rounds since it caught up whose lag passed the target
    bandwidth_mb_s: float | None = None
    rounds: list[SyncRound] = field(default_factory=list)  # the last sync.ROUNDS_KEPT
    total_s: float = 0.0
    started_at: float = field(default_factory=time.time)

    def write(self, path: str) -> None:
        write_json(path, asdict(self))


def print_sync_summary(s: SyncReport, console: Console) -> None:
    """What the sync left on the destination, in words and a table."""
    from rich.table import Table

    from blkfs.cliutil import human_bytes

    if s.status == "stopped":
        head = "[bold green]sync stopped[/]"
    else:
        head = f"[bold red]sync {s.status}[/]" + (f": {s.error}" if s.error else "")
    console.print(head)
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    epoch = ("no whole epoch (the first round never finished)" if s.epoch is None else
             f"epoch {s.epoch}, synced {time.time() - (s.synced_at or time.time()):.1f} s ago "
             f"(replica of sync {s.sync}, not runnable)")
    lag = ("-" if s.lag_s is None else
           f"last {s.lag_s:.2f} s, never caught up (target {s.lag_target_s:g} s)"
           if s.caught_up_s is None else
           f"last {s.lag_s:.2f} s, worst {s.lag_max_s:.2f} s since it caught up at "
           f"{s.caught_up_s:.1f} s (target {s.lag_target_s:g} s; {s.lag_over_target} rounds "
           "over it)")
    rows = [
        ("files", ", ".join(f"{f['name']} ({human_bytes(f['size'])})" for f in s.files)),
        ("replica there", epoch),
        ("lag", lag),
        ("rounds", f"{s.epochs} acknowledged in {s.sessions} session(s)"
                   + (f"; initial copy {s.initial_copy_s:.2f} s" if s.initial_copy_s else "")),
        ("data / sent", f"{human_bytes(s.data_bytes)} / {human_bytes(s.bytes_sent)}"),
        *([("replica used", f"{s.lineage_blocks} blocks the destination held unchanged as of "
            "an earlier epoch: neither read nor sent")] if s.lineage_blocks else []),
        *([("older copy", f"the destination held {s.held_blocks} blocks already: only the "
            "blocks that differed travelled")] if s.held_blocks else []),
        *([("replica not used", s.lineage_detail)]
          if s.lineage_detail and s.lineage_detail != "no replica here" else []),
        ("time", f"{s.total_s:.1f} s"
                 + (f" at most {s.bandwidth_mb_s:g} MB/s" if s.bandwidth_mb_s else "")),
        *([("next", f"'migrator migrate --to {s.to} ...' sends only what changed since")]
          if s.status == "stopped" and s.epoch is not None else
          [("next", "the replica there keeps its last whole epoch: run the sync again once "
                    "the error above is mended")] if s.epoch is not None else []),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


class LiveSyncLine:
    """One line, five times a second: epoch, lag against its target, pending, sent, rate."""

    def __init__(self, syncer: Any, console: Console) -> None:  # a sync.Syncer
        self.s = syncer
        self.console = console

    async def run(self) -> None:
        from rich.live import Live

        from blkfs.cliutil import human_bytes

        t0 = time.monotonic()
        with Live(console=self.console, transient=True, refresh_per_second=5) as live:
            while True:
                sy, pr = self.s, self.s.progress
                lag = sy.lag_now
                sent = pr.sent
                rate = sent / max(time.monotonic() - t0, 1e-6) / 1e6
                what = (f"epoch {sy.sync.epoch}, lag {lag:.1f} s (target {sy.lag:g} s)"
                        if lag is not None else "no whole epoch yet")
                if pr.phase == "initial copy" and pr.total:
                    what += f", initial copy {min(sent, pr.total) * 100 // pr.total}%"
                live.update(f"sync to {sy.opts.to}: {pr.phase}; {what}; "
                            f"{human_bytes(pr.pending * pr.page_size)} dirty; sent "
                            f"{human_bytes(sent)} ({rate:.0f} MB/s average)")
                await trio.sleep(0.2)
