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
from typing import Any

import trio

from . import protocol as p
from .errors import KeyMismatch, MigrationError, NotOwner, PeerAborted, PeerMismatch, first_error
from .lineage import sync_record
from .options import MigrateOptions, SourceFile, SourceHooks
from .plan import Policy, RoundPlanner
from .report import SyncReport, SyncRound
from .source import Source, _message

RETRY_FIRST, RETRY_MAX = 1.0, 30.0  # s between attempts after a cut link: doubling, capped
ROUNDS_KEPT = 50  # the last rounds in the report (a sync may run for months)


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
        self.page_size = self.report.page_size = self.progress.page_size = (
            store.page_size or store.block_size)
        self.files = [SourceFile(i, rel, store.size(i)) for i, rel in enumerate(store.names)]

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
        err = first_error(exc) if exc is not None else None
        stopped = err is None or isinstance(err, (trio.Cancelled, KeyboardInterrupt))
        self.sync.status = "stopped" if stopped else "failed"
        if not stopped:
            assert exc is not None
            self.sync.error = _message(exc)

    async def _say_stopped(self) -> None:
        if self.ch is not None:
            s = self.sync
            await self.ch.abort("the sync stopped" if s.error is None
                                else f"the sync stopped: {s.error}", code=p.AbortCode.SYNC_STOPPED)

    async def _run(self) -> None:
        s = self.sync
        await self._open()
        delay = RETRY_FIRST
        while True:
            try:
                await self._session()
            except BaseException as group:  # (errors come wrapped from nurseries)
                exc = first_error(group)
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
        planner = RoundPlanner(self.opts.policy, self.block_size, self.page_size)
        self.t_epoch = t_swap
        # Epochs go on across sessions: the replica's number never goes back.
        n = 0 if s.epoch is None else s.epoch + 1
        blocks, sent = r.blocks_sent, self.progress.sent
        await self._initial_copy(planner, n)  # its RoundDone: acknowledged once durable
        if s.initial_copy_s is None:
            s.initial_copy_s = round(r.initial_copy_s, 3)
        self._acked(n, t_swap, (r.blocks_sent - blocks) * (self.block_size // self.page_size),
                    self.progress.sent - sent, time.monotonic() - t_swap)
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
            pages, nbytes = await self._send_pages(sets)
            await self.ch.send(p.RoundDone(n, pages, nbytes))
            await self.ch.expect(p.RoundAck)
            self._acked(n, t_swap, pages, self.progress.sent - sent, time.monotonic() - t_swap)
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

    def _acked(self, epoch: int, t_swap: float, pages: int, nbytes: int, took: float) -> None:
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
                    SyncRound(epoch, pages, nbytes, round(took, 3), round(lag, 3))]

    @property
    def lag_now(self) -> float | None:
        """The replica's age now: since the swap of its newest whole epoch."""
        return None if self.t_acked is None else time.monotonic() - self.t_acked


def sync_options(mount: str, to: str, key: bytes, files: list[str], **kw: Any) -> MigrateOptions:
    """MigrateOptions for a sync: no switchover policy applies (it never switches over)."""
    return MigrateOptions(mount=mount, to=to, key=key, files=files, policy=Policy(), **kw)
