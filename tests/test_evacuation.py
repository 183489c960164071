"""Evacuation's bookkeeping (pure): the order, the spread, the shares, and what becomes of
each VM, against any sequence of ends, failures, dead destinations and stops."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from migrator.evacuation import Candidate, Evacuation, Outcome, hands_over, order, shares

MiB = 1 << 20


def vm(name: str, data: int, hot: int = 0) -> Candidate:
    return Candidate(name, (f"{name}/disk.raw",), data * MiB, hot * MiB)


def test_the_soonest_done_go_first_a_hot_one_later() -> None:
    got = order([vm("big", 64), vm("hot", 8, 16), vm("small", 4), vm("quiet", 16)])
    assert [c.name for c in got] == ["small", "quiet", "hot", "big"]  # hot: 8 + 3 x 16


def test_shares_split_the_budget_and_converging_weighs_twice() -> None:
    assert shares(None, {"a": "initial copy"}) == {"a": None}
    assert shares(90.0, {"a": "initial copy", "b": "dirty rounds"}) == {"a": 30.0, "b": 60.0}
    assert shares(100.0, {"a": "connecting", "b": "initial copy"}) == {"a": 50.0, "b": 50.0}
    got = shares(100.0, {"a": "initial copy", "b": "verifying"})  # (8 bytes a block)
    assert got["a"] > 90 and got["b"] < 10
    assert sum(shares(100.0, {"a": "switchover", "b": "x", "c": "y"}).values()) == 100.0


def test_spread_over_the_least_loaded_and_retry_elsewhere() -> None:
    ev = Evacuation([vm("v1", 1), vm("v2", 2), vm("v3", 3)], ["A", "B"], parallel=2)
    assert ev.next_start() == (ev.vms["v1"].candidate, "A")
    assert ev.next_start() == (ev.vms["v2"].candidate, "B")
    assert ev.next_start() is None  # the limit
    ev.finished("v1", Outcome.STAYED, "refused", dest_down=True)
    assert ev.next_start() == (ev.vms["v1"].candidate, "B")  # first in line, not on A again
    assert ev.next_start() is None
    ev.finished("v2", Outcome.MOVED)
    assert ev.next_start() == (ev.vms["v3"].candidate, "B")  # A is down
    ev.finished("v1", Outcome.STAYED, "bad disk")
    assert ev.vms["v1"].outcome is Outcome.STAYED  # tried on every destination left
    assert "failed on A, B: bad disk" in ev.vms["v1"].why_here
    ev.finished("v3", Outcome.UNSETTLED, "cut")
    assert ev.done and ev.next_start() is None


def test_a_migration_hands_its_place_over_near_its_end() -> None:
    st = {"phase": "initial copy", "data_bytes": 400_000_000, "bytes_sent": 100_000_000}
    assert not hands_over(st, 100.0)  # 3 s left
    assert hands_over({**st, "bytes_sent": 350_000_000}, 100.0)  # 0.5 s left
    assert not hands_over({**st, "bytes_sent": 350_000_000}, None)  # (no rate known)
    assert not hands_over({**st, "phase": "dirty rounds", "bytes_sent": 399_000_000}, 100.0)
    assert hands_over({"phase": "verifying"}, None)  # its VM runs at the destination


def test_a_vm_switched_over_frees_its_place() -> None:
    ev = Evacuation([vm("v1", 1), vm("v2", 2), vm("v3", 3)], ["A"], parallel=1)
    ev.next_start()
    assert ev.next_start() is None
    ev.release("v1")  # verifying: its VM runs at A
    assert ev.next_start() == (ev.vms["v2"].candidate, "A")
    assert sorted(ev.running()) == ["v1", "v2"] and ev.holding() == ["v2"]
    ev.finished("v1", Outcome.MOVED)
    assert ev.next_start() is None  # v2 holds the one place


def test_stop_leaves_the_queued_here_and_the_running_run() -> None:
    ev = Evacuation([vm("v1", 1), vm("v2", 2), vm("v3", 3)], ["A"], parallel=1)
    ev.next_start()
    ev.stop()
    assert ev.vms["v2"].outcome is ev.vms["v3"].outcome is Outcome.STAYED
    assert "stopped" in ev.vms["v2"].why_here and not ev.done
    ev.finished("v1", Outcome.STAYED, "interrupted")  # not retried after a stop
    assert ev.done and ev.vms["v1"].outcome is Outcome.STAYED


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Evacuation([], ["A"], parallel=0)
    with pytest.raises(ValueError):
        Evacuation([], [])
    ev = Evacuation([vm("v1", 1)], ["A"])
    with pytest.raises(ValueError, match="not running"):
        ev.finished("v1", Outcome.MOVED)


class EvacuationHistory(RuleBasedStateMachine):
    """Any sequence of starts, ends of any kind, dead destinations and a stop."""

    def __init__(self) -> None:
        super().__init__()
        self.dests = ["A", "B", "C"]
        self.ev = Evacuation([vm(f"v{i}", i % 4, i % 3) for i in range(6)], self.dests,
                             parallel=2)
        self.started: list[tuple[str, str]] = []

    @rule()
    def start(self) -> None:
        down = set(self.ev.down)
        queue, free = list(self.ev.queue), len(self.ev.holding()) < self.ev.parallel
        ups = self.ev.upcoming(3)  # (the processes evacuate makes ready, the first starts)
        assert self.ev.queue == queue and len(ups) <= 3
        assert len({c.name for c, _, _ in ups}) == len(ups)
        got = self.ev.next_start()
        if free:
            assert (got is None) == (not ups)
        if got is not None:
            assert ups and got == ups[0][:2]
            assert len(self.ev.vms[got[0].name].attempts) == ups[0][2]
            c, to = got
            assert to not in down and not self.ev.stopping
            assert (c.name, to) not in self.started  # never twice on one destination
            self.started.append((c.name, to))

    @precondition(lambda self: bool(self.ev.running()))
    @rule(data=st.data(), outcome=st.sampled_from(list(Outcome)), down=st.booleans())
    def end(self, data: st.DataObject, outcome: Outcome, down: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.ev.running())))
        self.ev.finished(name, outcome, "why", dest_down=down)

    @precondition(lambda self: bool(self.ev.running()))
    @rule(data=st.data())
    def switch_over(self, data: st.DataObject) -> None:
        self.ev.release(data.draw(st.sampled_from(sorted(self.ev.running()))))

    @rule()
    def stop(self) -> None:
        self.ev.stop()

    @invariant()
    def held(self) -> None:
        running = self.ev.running()
        assert len(self.ev.holding()) <= self.ev.parallel
        assert self.ev.released <= set(running)
        for name, v in self.ev.vms.items():
            assert (v.outcome is None) or name not in running  # settled means not running
            assert (name in self.ev.queue) + (name in running) <= 1
            if v.outcome is Outcome.MOVED or v.outcome is Outcome.UNSETTLED:
                assert v.attempts[-1].outcome is v.outcome  # as its last attempt ended
        if not running and not self.ev.queue:
            assert self.ev.done  # every VM has exactly one outcome


TestEvacuationHistory = EvacuationHistory.TestCase
TestEvacuationHistory.settings = settings(max_examples=200, stateful_step_count=30,
                                          deadline=None)
