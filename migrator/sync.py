"""`migrator sync`: keep a replica of a running VM's files on a destination, ahead of time.

The engine of `migrate` up to its rounds (handshake, Held: what the destination already
holds, the initial copy coldest first), then rounds for as long as it runs: each one swaps
the epoch, sends its dirty set under the bandwidth cap, and is acknowledged by the
destination only once durable there (dest.py `_replica_synced`). It never suspends the VM
and never sends a Switchover (the protocol refuses one in a replica session), so the copy
there stays "replica, not runnable"; and it writes no ownership record here: the VM stays
this host's.

Each acknowledged epoch is recorded on both sides (lineage.py), so a later `migrator migrate`
to that destination (or this sync run again) starts from the replica and reads and sends only
the blocks written since; where either side cannot prove that, it compares digests (delta).
Its verification still covers every block.

Faults: Ctrl-C or SIGTERM stops it with an Abort that says so, once the round in flight is
acknowledged (a second one at once); a cut link is retried with backoff; kill -9 loses the
round in flight, and a restart finds the rest there.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from . import protocol as p
from .dest import SYNC_STOPPED
from .lineage import sync_record
from .plan import Policy, RoundPlanner
from .source import MigrateOptions, Source, SourceHooks, _File, _message
from .transport import KeyMismatch, MigrationError, NotOwner, PeerAborted, PeerMismatch, leaf

RETRY_FIRST, RETRY_MAX = 1.0, 30.0  # s between attempts after a cut link: doubling, capped
ROUNDS_KEPT = 50  # the last rounds in the report (a sync may run for months)


@dataclass
class SyncRound:
    epoch: int
    blocks: int
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
    rounds: list[SyncRound] = field(default_factory=list)  # the last ROUNDS_KEPT
    total_s: float = 0.0
    started_at: float = field(default_factory=time.time)

    def write(self, path: str) -> None:
        import json

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, path)


class _NoVM:
    """A sync never suspends, resumes or retires the VM."""

    flush_before_suspend = True

    def suspend(self) -> None:
        raise AssertionError("migrator sync never suspends the VM")

    resume = suspend

    def finish(self) -> str:
        raise AssertionError("migrator sync never retires the VM")


class Syncer(Source):
    """One `migrator sync`: sessions (one, unless the link is cut) of endless rounds."""

    def __init__(self, opts: MigrateOptions, lag: float, hooks: SourceHooks | None = None
                 ) -> None:
        super().__init__(opts, _NoVM(), hooks)  # type: ignore[arg-type]
        self.lag = lag
        self.sync = SyncReport(sync=str(uuid.uuid4()), to=opts.to, lag_target_s=lag,
                               bandwidth_mb_s=opts.bandwidth_mb_s)
        self.t_acked: float | None = None  # the swap whose epoch is the replica's (monotonic)
        self.ended: dict[str, int] = {}  # the round's swap: name -> the epoch it ended
        self._scope = trio.CancelScope()  # the whole sync: cancelled to stop
        self.stopping = False  # asked to stop: once the round in flight is acknowledged
        self.in_round = False  # between a round's swap and its acknowledgement
        self.t0 = time.monotonic()

    def stop(self) -> None:
        """Ctrl-C / SIGTERM: a round in flight is finished first, so the replica stays at a
        whole epoch that both sides can prove (lineage.py) and a migration from it reads only
        what changed; the wait between rounds, the first copy or a retry stop at once, and so
        does a second call."""
        if self.stopping or not self.in_round:
            self._scope.cancel()
        self.stopping = True

    async def _open(self) -> None:
        await self._open_vm()
        store = self._store
        await store.claim(self.sync.sync, f"migrator sync pid {os.getpid()} to {self.opts.to}")
        self.block_size = self.report.block_size = store.block_size
        self.files = [_File(i, rel, store.size(i)) for i, rel in enumerate(store.names)]

    async def run(self) -> SyncReport:  # type: ignore[override]
        """Until stopped (stop(), or cancelled): the report says stopped, or why it failed."""
        s = self.sync
        self.t0 = time.monotonic()
        try:
            with self._scope:
                await self._run()
            self._stopped(None)
        except BaseException as exc:
            self._stopped(exc)
            with trio.CancelScope(shield=True):
                await self._say_stopped()
            raise
        else:
            await self._say_stopped()
        finally:
            s.total_s = round(time.monotonic() - self.t0, 3)
            with trio.CancelScope(shield=True):
                await self._close_channel()
            if self.store is not None:
                self.store.close()
            if self.opts.report_path:
                s.write(self.opts.report_path)
        return s

    def _stopped(self, exc: BaseException | None) -> None:
        err = leaf(exc) if exc is not None else None
        stopped = err is None or isinstance(err, (trio.Cancelled, KeyboardInterrupt))
        self.sync.status = "stopped" if stopped else "failed"
        if not stopped:
            assert exc is not None
            self.sync.error = _message(exc)

    async def _say_stopped(self) -> None:
        if self.ch is not None:
            s = self.sync
            await self.ch.abort(SYNC_STOPPED if s.error is None else f"{SYNC_STOPPED}: {s.error}")

    async def _run(self) -> None:
        s = self.sync
        await self._open()
        delay = RETRY_FIRST
        while True:
            try:
                await self._session()
            except BaseException as group:  # (errors come wrapped from nurseries)
                exc = leaf(group)
                if (not isinstance(exc, MigrationError) or s.sessions == 0
                        or isinstance(exc, (PeerAborted, NotOwner, KeyMismatch, PeerMismatch))):
                    # the destination refused, or is not ours, or was never reached (a wrong
                    # address): a person must look; and a cancellation is a stop
                    raise
                self.in_round = False  # (that round is lost: a stop need not wait for it)
                if self.stopping:
                    raise
                self.hooks.notify(f"sync to {self.opts.to} cut ({exc}); again in {delay:g} s "
                                  f"(the replica keeps epoch {s.epoch})")
                await self._close_channel()
                await trio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX)

    async def _close_channel(self) -> None:
        if self.ch is not None:
            self.sync.bytes_sent = self.progress.sent
            self.progress.sent_before = self.progress.sent
            await self.ch.aclose()
            self.ch = self.progress.channel = None

    async def _session(self) -> None:
        s, r = self.sync, self.report
        self._phase("connecting")
        await self._connect()
        assert self.ch is not None
        s.sessions += 1
        self.dest_has, r.delta, self.lineage_ok = {}, "none", set()
        r.lineage_detail, r.lineage_files = "", []
        await self._store.flush()
        t_swap = time.monotonic()
        man = await self._start_epoch(s.sync, replica=True)  # its first round sends what changed
        self._ended()
        s.files = [{"name": f.rel, "size": f.size} for f in self.files]
        s.data_bytes = self.progress.total = sum(f.size for f in self.files)
        await self.ch.send(man)
        held, kept = r.held_blocks, r.lineage_blocks
        await self._what_the_destination_holds(man)
        s.held_blocks += r.held_blocks - held
        s.lineage_blocks += r.lineage_blocks - kept
        s.delta, s.lineage_detail = r.delta, r.lineage_detail
        s.status = "syncing"
        planner = RoundPlanner(self.opts.policy, self.block_size)
        self.t_epoch = t_swap
        # Epochs go on across sessions: the replica's number never goes back.
        n = 0 if s.epoch is None else s.epoch + 1
        blocks, sent = r.blocks_sent, self.progress.sent
        await self._initial_copy(planner, n)  # its RoundDone: acknowledged once durable
        if s.initial_copy_s is None:
            s.initial_copy_s = round(r.initial_copy_s, 3)
        self._acked(n, t_swap, r.blocks_sent - blocks, self.progress.sent - sent,
                    time.monotonic() - t_swap)
        self._phase("synced")
        while True:
            assert self.t_acked is not None
            # Half the target apart: a round that takes up to the other half keeps the lag
            # under it; a slower one starts the next at once (and the report says so).
            await trio.sleep(max(0.0, self.t_acked + self.lag / 2 - time.monotonic()))
            n += 1
            self._phase("syncing")
            await self._store.flush()
            t_swap = time.monotonic()
            self.in_round = True  # from this swap on, a stop waits for the acknowledgement
            sets = await self._swap()
            self._ended()
            self.progress.pending = sum(c for exts in sets.values() for _, c in exts)
            sent = self.progress.sent
            blocks, nbytes = await self._send_sets(sets)
            await self.ch.send(p.RoundDone(n, blocks, nbytes))
            await self.ch.expect(p.RoundAck)
            self._acked(n, t_swap, blocks, self.progress.sent - sent, time.monotonic() - t_swap)
            self.in_round = False
            self._phase("synced")
            if self.stopping:
                self._scope.cancel()
                await trio.lowlevel.checkpoint()

    def _ended(self) -> None:
        for f in self.files:
            epoch = self._store.last_epoch(f.file_id)
            assert epoch is not None  # (just swapped)
            self.ended[f.rel] = epoch

    def _acked(self, epoch: int, t_swap: float, blocks: int, nbytes: int, took: float) -> None:
        """The destination holds epoch `epoch` durably: say so here too, for a migration that
        starts from it (lineage.py), then count."""
        s = self.sync
        assert self.vm is not None
        self._store.records.write_sync(self.vm.id, sync_record(s.sync, self.opts.to, epoch, {
            f.rel: (self.ended[f.rel], f.size) for f in self.files}, time.time()))
        now = time.monotonic()
        lag = now - (self.t_acked if self.t_acked is not None else t_swap)
        if s.caught_up_s is None and self.t_acked is not None and lag <= self.lag:
            s.caught_up_s = round(now - self.t0, 3)  # (the first copy's epoch is old by then)
        elif s.caught_up_s is not None:
            s.lag_max_s = round(max(s.lag_max_s, lag), 3)
            if lag > self.lag:
                s.lag_over_target += 1
        self.t_acked = t_swap
        s.epoch, s.synced_at, s.lag_s = epoch, time.time(), round(lag, 3)
        s.epochs += 1
        s.bytes_sent = self.progress.sent
        self.progress.round = epoch
        self.progress.pending = 0
        s.rounds = [*s.rounds[-(ROUNDS_KEPT - 1):],
                    SyncRound(epoch, blocks, nbytes, round(took, 3), round(lag, 3))]

    @property
    def lag_now(self) -> float | None:
        """The replica's age now: since the swap of its newest whole epoch."""
        return None if self.t_acked is None else time.monotonic() - self.t_acked


def sync_options(mount: str, to: str, key: bytes, files: list[str], **kw: Any) -> MigrateOptions:
    """MigrateOptions for a sync: no switchover policy applies (it never switches over)."""
    return MigrateOptions(mount=mount, to=to, key=key, files=files, policy=Policy(), **kw)


def print_sync_summary(s: SyncReport, console: Any) -> None:
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
        ("next", f"'migrator migrate --to {s.to} ...' sends only what changed since"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


class LiveSyncLine:
    """One line, five times a second: epoch, lag against its target, pending, sent, rate."""

    def __init__(self, syncer: Syncer, console: Any) -> None:
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
                live.update(f"sync to {sy.opts.to}: {pr.phase}; {what}; {pr.pending} dirty "
                            f"blocks; sent {human_bytes(sent)} ({rate:.0f} MB/s average)")
                await trio.sleep(0.2)
