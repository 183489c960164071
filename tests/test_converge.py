"""Converging by default: auto-converge (the throttle: applied, stepped, always undone), the
default policy's three ways out (converged, post-copy, stopped at --converge-timeout, the VM
running), --on-stall switchover saying its downtime first; and the real throttle helper on a
real process, also when the migrator that started it is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
import trio

from migrator.options import MigrateOptions
from migrator.plan import AutoConverge, OnStall, Policy
from migrator.source import Source
from migrator.throttle import Throttle, ThrottleError

from .fakes.engine import (
    FakeThrottle,
    FakeVM,
    MemoryDest,
    MemorySource,
    ThrottledVM,
    files,
    migrate,
    options,
)

pytestmark = pytest.mark.quick


def converge_options(**kw: Any) -> MigrateOptions:
    kw.setdefault("policy", Policy(threshold_blocks=0, max_rounds=1000))
    kw.setdefault("converge_timeout", 5.0)
    return options(**kw)


# -- AutoConverge (pure) ----------------------------------------------------------------------


def test_auto_converge_steps_after_two_busy_rounds_and_every_other_round() -> None:
    a = AutoConverge(initial=20, step=10, maximum=40)
    assert a.after_round(60, 100, stalled=False) is None  # once: not yet
    assert a.after_round(60, 100, stalled=False) == 20  # twice in a row
    assert a.after_round(60, 100, stalled=False) is None  # the round after a step: wait
    assert a.after_round(60, 100, stalled=False) == 30
    assert a.after_round(10, 100, stalled=False) is None  # quiet: no step
    assert a.after_round(10, 100, stalled=True) == 40  # not converging: a step
    assert a.at_max and a.after_round(99, 100, stalled=True) is None
    a.reset()
    assert a.level == 0 and not a.at_max


def test_auto_converge_off() -> None:
    a = AutoConverge(maximum=0)
    assert a.at_max and a.after_round(100, 1, stalled=True) is None


# -- the engine --------------------------------------------------------------------------------


async def test_a_busy_vm_is_slowed_until_it_converges_and_never_left_slowed(
        autojump_clock: Any) -> None:
    vm = ThrottledVM([30])  # as many writes every round, until slowed
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, outcome, _ = await migrate(src, vm, dest, converge_options())
    r = source.report
    assert r.status == "completed" and r.verified, r.error
    assert outcome is not None and outcome.completed
    steps = [pct for _, pct in r.throttle_steps]
    assert steps[:2] == [20, 30] and steps == sorted(steps) and r.throttle_max_pct == steps[-1]
    assert r.throttle_s is not None and r.throttle_s >= 0
    # undone before the suspend, never after
    assert vm.events.index("unthrottle") < vm.events.index("suspend"), vm.events
    assert vm.slowed == 0 and vm.events.count("unthrottle") == 1


async def test_the_default_stops_at_the_converge_timeout_with_the_vm_running(
        autojump_clock: Any) -> None:
    """Nothing slows it (freeze, cmd: no process), no post-copy asked: the rounds go on until
    --converge-timeout, then one line says why and what to do; the VM was never suspended."""
    vm = FakeVM([30])
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, outcome, elapsed = await migrate(src, vm, dest, converge_options())
    r = source.report
    assert r.status == "failed" and r.error is not None
    assert r.error.startswith("not converging after 5 s of rounds"), r.error
    assert "the VM runs on here" in r.error and "--on-stall switchover" in r.error
    assert "\n" not in r.error and r.throttle_max_pct is None
    assert vm.running and vm.suspends == 0
    assert outcome is not None and not outcome.completed
    assert dest.status == "incomplete"
    assert elapsed >= 5


async def test_a_vm_slowed_to_the_most_and_still_busy_stops_at_the_timeout_undone(
        autojump_clock: Any) -> None:
    vm = ThrottledVM([3000])  # even at 40 % it dirties every block
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, _, _ = await migrate(src, vm, dest, converge_options(max_throttle=40))
    r = source.report
    assert r.status == "failed" and "slowed by up to 40 %" in (r.error or ""), r.error
    assert vm.running and vm.suspends == 0 and vm.slowed == 0
    assert vm.events[-1] == "unthrottle" and r.throttle_max_pct == 40


async def test_on_stall_switchover_says_the_downtime_before_switching(
        autojump_clock: Any) -> None:
    vm = ThrottledVM([3000])
    src, dest = MemorySource(files(), vm), MemoryDest()
    said: list[str] = []
    source, _, _ = await migrate(src, vm, dest, converge_options(
        max_throttle=30, policy=Policy(threshold_blocks=0, max_rounds=1000,
                                       on_stall=OnStall.SWITCHOVER)), notify=said.append)
    r = source.report
    assert r.status == "completed" and r.verified, r.error
    warned = [s for s in said if "switching over anyway" in s]
    assert warned and "expected downtime" in warned[0]
    assert vm.events.index("unthrottle") < vm.events.index("suspend")


async def test_on_stall_abort_slows_first_then_stops_undone(autojump_clock: Any) -> None:
    vm = ThrottledVM([3000])
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, _, _ = await migrate(src, vm, dest, converge_options(
        max_throttle=30, policy=Policy(threshold_blocks=0, max_rounds=1000,
                                       on_stall=OnStall.ABORT)))
    r = source.report
    assert r.status == "failed" and "aborting as asked" in (r.error or "")
    assert r.throttle_max_pct == 30 and vm.running and vm.slowed == 0


async def test_a_failure_while_throttled_undoes_the_throttle(autojump_clock: Any) -> None:
    vm = ThrottledVM([30])
    src, dest = MemorySource(files(), vm), MemoryDest(fail_after_writes=150)
    source, _, _ = await migrate(src, vm, dest, converge_options())
    assert source.report.status == "failed" and "disk full" in (source.report.error or "")
    assert "throttle 20" in vm.events and vm.events[-1] == "unthrottle" and vm.slowed == 0
    assert vm.running and vm.suspends == 0


async def test_a_throttle_that_cannot_start_is_said_and_the_rounds_go_on(
        autojump_clock: Any) -> None:
    class Broken(FakeThrottle):
        async def set(self, level: int) -> None:
            raise ThrottleError("cannot slow process 4242: no such file")

    vm = ThrottledVM([30])
    src, dest = MemorySource(files(), vm), MemoryDest()
    said: list[str] = []
    source, _, _ = await migrate(src, vm, dest, converge_options(), notify=said.append,
                                 throttle=lambda pid: Broken(vm))
    r = source.report
    assert r.status == "failed" and r.error is not None
    assert r.error.startswith("not converging after 5 s"), r.error
    assert any("going on without auto-converge" in s for s in said), said
    assert vm.running and vm.slowed == 0 and r.throttle_max_pct is None


async def test_no_throttle_when_told_never(autojump_clock: Any) -> None:
    vm = ThrottledVM([30])
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, _, _ = await migrate(src, vm, dest, converge_options(max_throttle=0))
    assert source.report.status == "failed" and not vm.events.count("throttle 20")


# -- the real helper on a real process --------------------------------------------------------

BUSY = "import time\nwhile True:\n    time.sleep(0.001)\n"


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _stopped_share(pid: int, seconds: float) -> float:
    seen = stopped = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        seen += 1
        stopped += _state(pid) in ("T", "t")
        time.sleep(0.002)
    return stopped / seen


def test_the_helper_stops_the_process_its_share_of_the_time_and_always_continues_it() -> None:
    vm = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        async def main() -> None:
            t = Throttle(vm.pid)
            try:
                await t.set(80)
                await trio.sleep(0.3)
                high = await trio.to_thread.run_sync(_stopped_share, vm.pid, 1.0)
                await t.set(20)
                await trio.sleep(0.3)
                low = await trio.to_thread.run_sync(_stopped_share, vm.pid, 1.0)
                assert 0.5 < high < 0.97 and 0.02 < low < high - 0.2, (high, low)
            finally:
                await t.aclose()
            assert _stopped_share(vm.pid, 0.2) == 0

        trio.run(main)
    finally:
        vm.kill()
        vm.wait()


def test_a_killed_migrator_never_leaves_the_vm_slowed() -> None:
    """kill -9 of the process that throttles (the migrator): its helper continues the VM."""
    vm = subprocess.Popen([sys.executable, "-c", BUSY])
    migrator = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import trio
        from migrator.throttle import Throttle, ThrottleError
        async def main():
            t = Throttle({vm.pid})
            await t.set(99)
            print("throttled", flush=True)
            await trio.sleep(60)
        trio.run(main)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert migrator.stdout is not None and migrator.stdout.readline() == "throttled\n"
        deadline = time.monotonic() + 10  # (the helper starts: slow on a loaded machine)
        while _state(vm.pid) not in ("T", "t") and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _stopped_share(vm.pid, 0.5) > 0.3  # 99 %: stopped nearly all the time
        os.kill(migrator.pid, signal.SIGKILL)
        migrator.wait()
        deadline = time.monotonic() + 5
        while _state(vm.pid) in ("T", "t") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _stopped_share(vm.pid, 0.5) == 0  # running, and left running
    finally:
        for p in (migrator, vm):
            if p.poll() is None:
                p.kill()
            p.wait()
        assert migrator.stdout is not None
        migrator.stdout.close()


# -- steered while it runs (migrator set, --timeout) ------------------------------------------


async def test_a_switchover_asked_for_ends_rounds_that_would_never_converge(
        autojump_clock: Any) -> None:
    """(migrator set --postcopy, --timeout suspend) The rounds switch over at their next
    decision, whatever the downtime, and say so; the migration completes, verified."""
    vm = FakeVM([30])
    src, dest = MemorySource(files(), vm), MemoryDest()
    said: list[str] = []

    async def steer(source: Source) -> None:
        while source.progress.round < 3:
            await trio.sleep(0.01)
        assert source.switch_over_soon(False, "--timeout 9 s reached") is None

    source, _, _ = await migrate(src, vm, dest, converge_options(converge_timeout=1e6),
                                 notify=said.append, steer=steer)
    r = source.report
    assert r.status == "completed" and r.verified, r.error
    assert r.switchover_reason.startswith("--timeout 9 s reached: switched over (memory "
                                          "pre-copy), expected downtime"), r.switchover_reason
    assert any(s.startswith("--timeout 9 s reached: switching over") for s in said), said
    assert source.progress.round in (3, 4)  # (the next decision, not later)


async def test_a_switchover_that_cannot_be_is_refused_with_its_reason(
        autojump_clock: Any) -> None:
    vm = FakeVM([30, 30, 0])  # (it converges)
    src, dest = MemorySource(files(), vm), MemoryDest()
    answers: list[str | None] = []

    async def steer(source: Source) -> None:
        answers.append(source.switch_over_soon(True, "asked"))  # started with --postcopy off

    source, _, _ = await migrate(src, vm, dest, converge_options(), steer=steer)
    assert answers[0] is not None and "--postcopy off" in answers[0]
    assert source.switch_now is None and source.report.status == "completed"
    assert source.switch_over_soon(False, "asked") == ("it is past its rounds already "
                                                       "(verifying)")
    assert source.switch_now is None


async def test_a_new_downtime_target_counts_from_the_next_decision(autojump_clock: Any) -> None:
    """(migrator set --downtime) A target no round can meet, then one every round meets: it
    switches over by the new one, which the report and status carry."""
    vm = FakeVM([30])
    src, dest = MemorySource(files(), vm), MemoryDest()

    async def steer(source: Source) -> None:
        assert source.progress.downtime_target_ms == 1e-6
        while source.progress.round < 2:
            await trio.sleep(0.01)
        source.set_downtime(1e9)

    source, _, _ = await migrate(src, vm, dest, converge_options(
        policy=Policy(downtime_ms=1e-6, max_rounds=1000), converge_timeout=1e6), steer=steer)
    r = source.report
    assert r.status == "completed" and r.verified, r.error
    assert "<= 1e+09 ms" in r.switchover_reason, r.switchover_reason
    assert r.downtime_target_ms == 1e9 and [ms for _, ms in r.downtime_steps] == [1e9]
