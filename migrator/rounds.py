"""The dirty rounds of a live migration (source side): flush, swap, send the pages the VM
wrote since, until the planner says the last set fits the downtime target; and what is done
when they do not converge, in this order (docs/migration.md, "Converging"):

1. slow the VM down (auto-converge: plan.AutoConverge says when, throttle.py how), in steps,
   said on the live line; undone when the rounds end, however they end;
2. with ``--postcopy auto``, memory goes post-copy (the disks go on converging alone);
3. then ``--on-stall``: converge (the default) goes on until ``--converge-timeout`` and then
   stops, the VM running on here; switchover says the expected downtime and switches over;
   abort stops at once.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import trio

from . import protocol as p
from .errors import BadPeer, MigrationError
from .plan import AutoConverge, Decision, OnStall, RoundPlanner, RoundStats, Verdict, union_extents
from .report import MigrationReport, Progress
from .throttle import ThrottleError

Extent = tuple[int, int]
Sets = dict[int, list[Extent]]


class Throttler(Protocol):
    level: int

    async def set(self, level: int) -> None: ...

    async def aclose(self) -> None: ...


class Migration(Protocol):
    """What the rounds use of the migration (source.Source)."""

    ch: Any
    opts: Any
    adapter: Any
    hooks: Any
    report: MigrationReport
    progress: Progress
    use_postcopy: bool
    memory_ids: set[int]
    page_size: int
    t_epoch: float
    _store: Any
    switch_now: tuple[bool, str] | None

    def target_changed(self) -> None: ...

    def _phase(self, phase: str) -> None: ...

    async def _swap(self) -> Sets: ...

    async def _send_pages(self, sets: Sets) -> tuple[int, int]: ...


class DirtyRounds:
    def __init__(self, m: Migration, planner: RoundPlanner) -> None:
        self.m = m
        self.planner = planner
        self.auto = AutoConverge(maximum=m.opts.max_throttle)
        self.throttle: Throttler | None = None
        self.t0 = time.monotonic()  # the rounds began
        self.deadline = 0.0  # on trio's clock: --converge-timeout after the rounds began
        self.t_throttled: float | None = None  # since when the VM is slowed
        self.backlog: Sets = {}  # memory dirtied in rounds, held for post-copy

    def _pending(self, sets: Sets) -> int:
        return sum(c for exts in sets.values() for _, c in exts)

    def _hold_memory(self, sets: Sets) -> None:
        for fid in self.m.memory_ids:
            self.backlog[fid] = union_extents(self.backlog.get(fid, []), sets.pop(fid, []))

    async def run(self) -> Sets:
        """Iterate until the planner says switch over; returns the swapped set held back.

        With post-copy on, memory is not sent in rounds: whatever of it is dirtied goes
        post-copy anyway, so the rounds carry the disks alone, stay short, and their dirty
        set alone decides when to switch over.  Memory's dirty sets accumulate meanwhile."""
        try:
            return await self._run()
        finally:
            await self._unthrottle()

    async def _run(self) -> Sets:
        m, planner, prog, r = self.m, self.planner, self.m.progress, self.m.report
        self.t0 = time.monotonic()
        self.deadline = trio.current_time() + m.opts.converge_timeout
        moved = 0  # bytes the last round sent
        while True:
            m._phase("dirty rounds")
            await m._store.flush()
            sets = await m._swap()
            r.dirty_sync_count += 1
            dirty_rate = self._dirty_rate(sets)
            if m.use_postcopy:
                self._hold_memory(sets)
            prog.pending = self._pending(sets)
            decision = planner.decide(prog.pending, dirty_rate * 1e6)
            r.expected_downtime_ms = prog.expected_downtime_ms = round(
                planner.expected_downtime_ms(prog.pending), 2)
            if m.switch_now is not None:  # (migrator set --postcopy, --timeout)
                decision = await self._switch_now(sets, *m.switch_now)
            elif decision.verdict is not Verdict.SWITCHOVER or decision.stalled:
                decision = await self._not_converging(decision, prog.pending * m.page_size,
                                                      moved)
                if decision is WENT_POSTCOPY:
                    self._hold_memory(sets)
                    prog.pending = self._pending(sets)
                    decision = planner.decide(prog.pending)
            if decision.verdict is Verdict.SWITCHOVER:
                r.switchover_reason = decision.reason
                return {**sets, **self.backlog}
            if decision.verdict is Verdict.ABORT:
                raise MigrationError(f"{decision.reason}: aborting as asked (--on-stall abort); "
                                     "the VM runs on here")
            moved = await self._round(sets, dirty_rate)

    async def _switch_now(self, sets: Sets, postcopy: bool, why: str) -> Decision:
        """Switch over whatever the downtime, as asked: the memory's dirty set left for
        post-copy if `postcopy` (and not already)."""
        m = self.m
        m.switch_now = None
        if postcopy and not m.use_postcopy and m.memory_ids:
            await self._go_postcopy(why)
            self._hold_memory(sets)
            m.progress.pending = self._pending(sets)
        expect = self.planner.expected_downtime_ms(m.progress.pending)
        how = "into post-copy" if m.use_postcopy else "(memory pre-copy)"
        m.hooks.notify(f"{why}: switching over {how}, expected downtime {expect:.0f} ms")
        return Decision(Verdict.SWITCHOVER, f"{why}: switched over {how}, expected downtime "
                        f"{expect:.0f} ms", stalled=True)

    async def _go_postcopy(self, reason: str) -> None:
        """From now on memory goes post-copy; the disks go on converging alone."""
        m = self.m
        m.use_postcopy = True
        self.planner.enter_postcopy()
        m.target_changed()
        m.report.postcopy_reason = reason
        await self._unthrottle()  # (its memory is no longer iterated: the VM runs free)
        self.auto.reset()

    async def _not_converging(self, decision: Decision, dirtied: int, moved: int) -> Decision:
        """A set over the target: slow the VM down, go post-copy, or act on --on-stall."""
        m, policy = self.m, self.m.opts.policy
        level = (self.auto.after_round(dirtied, moved, decision.stalled)
                 if self._can_throttle() else None)
        if level is not None:
            try:
                await self._slow_down(level, decision)
                return Decision(Verdict.CONTINUE, decision.reason)
            except ThrottleError as exc:  # (the VM runs on at full speed: say so, go on)
                m.hooks.notify(f"{exc}: going on without auto-converge")
                self.auto.maximum = 0
                await self._unthrottle()
        late = policy.on_stall is OnStall.CONVERGE and trio.current_time() > self.deadline
        if not decision.stalled and not late:
            return decision
        if not late and not self.auto.at_max and self._can_throttle():
            return Decision(Verdict.CONTINUE, decision.reason)  # (the next step comes)
        if m.opts.postcopy == "auto" and not m.use_postcopy and m.memory_ids:
            # Memory outruns the link: it goes post-copy; the disks go on converging alone.
            await self._go_postcopy(decision.reason)
            m.hooks.notify(f"not converging ({decision.reason}): memory goes post-copy")
            return WENT_POSTCOPY
        expect = self.planner.expected_downtime_ms(m.progress.pending)
        if policy.on_stall is OnStall.SWITCHOVER:
            m.hooks.notify(f"not converging ({decision.reason}): switching over anyway "
                           f"(--on-stall switchover), expected downtime {expect:.0f} ms")
            return Decision(Verdict.SWITCHOVER, f"{decision.reason}; switched over anyway "
                            f"(--on-stall switchover), expected downtime {expect:.0f} ms",
                            stalled=True)
        if late:
            slowed = f", the VM slowed by up to {self.auto.level} %" if self.auto.level else ""
            raise MigrationError(
                f"not converging after {m.opts.converge_timeout:g} s of rounds{slowed}: the VM "
                f"dirties {m.report.dirty_rate_mb_s:g} MB/s, the link moves "
                f"{self.planner.bandwidth / 1e6:.0f} MB/s, the last set would cost "
                f"{expect:.0f} ms (target {policy.downtime_ms:g}); the VM runs on here: raise "
                "--downtime-ms or --bandwidth, add --postcopy auto, or accept the downtime "
                "with --on-stall switchover")
        return decision

    def _can_throttle(self) -> bool:
        return self.auto.maximum > 0 and getattr(self.m.adapter, "throttle_pid", None) is not None

    async def _slow_down(self, level: int, decision: Decision) -> None:
        """Throttle the VM to `level` %."""
        m = self.m
        if self.throttle is None:
            self.throttle = m.hooks.throttle(m.adapter.throttle_pid)
            self.t_throttled = time.monotonic()
        assert self.throttle is not None
        await self.throttle.set(level)
        r = m.report
        r.throttle_max_pct = max(r.throttle_max_pct or 0, level)
        r.throttle_steps.append((round(time.monotonic() - self.t0, 2), level))
        m.progress.throttle_pct = level
        m.hooks.notify(f"the VM dirties faster than the link moves ({decision.reason}): "
                       f"slowed by {level} %")

    async def _unthrottle(self) -> None:
        if self.throttle is None:
            return
        throttle, self.throttle = self.throttle, None
        await throttle.aclose()
        if self.t_throttled is not None:
            r = self.m.report
            r.throttle_s = round((r.throttle_s or 0) + time.monotonic() - self.t_throttled, 3)
            self.t_throttled = None
        self.m.progress.throttle_pct = 0

    async def _round(self, sets: Sets, dirty_rate: float) -> int:
        m, prog = self.m, self.m.progress
        prog.round += 1
        t = time.monotonic()
        pages, nbytes = await m._send_pages(sets)
        await m.ch.send(p.RoundDone(prog.round, pages, nbytes))
        ack = await m.ch.expect(p.RoundAck)
        if ack.round != prog.round:
            raise BadPeer(f"acknowledged round {ack.round}, not {prog.round}")
        stats = RoundStats(prog.round, pages, nbytes, round(time.monotonic() - t, 4),
                           dirty_rate)
        self.planner.record_round(stats)
        m.report.rounds.append(stats)
        return nbytes

    def _dirty_rate(self, sets: Sets) -> float:
        """MB/s the VM dirtied in the epoch a swap just ended (what QEMU calls the dirty
        page rate), for the report and the status."""
        m = self.m
        now = time.monotonic()
        dirty = self._pending(sets) * m.page_size
        rate = round(dirty / max(now - m.t_epoch, 1e-6) / 1e6, 2)
        m.t_epoch = now
        m.report.dirty_rate_mb_s = rate
        return rate


WENT_POSTCOPY = Decision(Verdict.CONTINUE, "memory went post-copy")
