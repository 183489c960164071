"""Evacuating a host (pure): which VM goes next, where, with what share of the bandwidth, and
what became of each. `migrator evacuate` (evacuate.py) runs a `migrate` process per VM and
tells this module what happened; nothing here knows of processes or sockets.

- Order: the VMs that are done soonest go first (the least data plus hot set), so that as
  many VMs as possible have left when something goes wrong, and the large hot ones get the
  link to themselves at the end.
- Spread: a VM goes to the destination running the fewest migrations now, never to one that
  is down or that it already failed on.
- Shares: the budget is split by weight among the running migrations; one in its dirty rounds
  or switchover weighs twice one in its initial copy, so that it converges and frees its
  share; one that is verifying (its VM runs at the destination) next to nothing, and it no
  longer holds one of the `parallel` places.
- A VM whose migration failed and that still runs here is tried once more on another
  destination, if one is left; else it stays here, and the summary says so.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .defaults import MIN_BANDWIDTH_MB_S

PARALLEL = 2  # migrations at once (OpenStack's max_concurrent_live_migrations is 1, vSphere 8)
ROUNDS_GUESS = 3  # the hot set is sent about this many times before the switchover
# A phase's weight in the shares (1 if not named): converging ones twice, so that they end and
# free their share; a verification sends 8 bytes a block, its share goes to the others
WEIGHTS = {"dirty rounds": 2.0, "switchover": 2.0, "post-copy": 2.0, "verifying": 0.1}
# A migration hands its place to the next one once its VM runs at the destination (little
# is left to send), or once its initial copy is within LEAD_S of its end: the next one's
# start (a process, a handshake, a first swap: 0.5-1 s on 2 busy cores) overlaps this one's
# end instead of leaving the link idle (scripts/bench_evacuate.py).
SWITCHED = ("verifying",)
LEAD_S = 0.6


def hands_over(status: dict[str, object], rate_mb_s: float | None) -> bool:
    """Whether a running migration (its status document) gives its place to the next."""
    phase = status.get("phase")
    if phase in SWITCHED:
        return True
    data, sent = status.get("data_bytes"), status.get("bytes_sent")
    if phase != "initial copy" or not rate_mb_s or not isinstance(data, int) or not isinstance(
            sent, int):
        return False
    return (data - sent) / (rate_mb_s * 1e6) < LEAD_S
# The phases after which the VM is the destination's business: an evacuation that is told to
# stop lets these finish (the Commit is sent in the switchover)
PAST_COMMIT = ("switchover", "post-copy", "verifying")


@dataclass(frozen=True)
class Candidate:
    """A VM of the mount, as evacuate found it."""

    name: str
    files: tuple[str, ...]
    data_bytes: int  # allocated: what the initial copy reads
    hot_bytes: int = 0  # its dynamic blocks (heat above the static threshold)
    suspend: str = ""  # the adapter it is suspended with ("" : the command's default)
    known: bool = True  # it has a record here (else its files are named to migrate)

    @property
    def cost(self) -> int:
        return self.data_bytes + ROUNDS_GUESS * self.hot_bytes


def order(candidates: list[Candidate]) -> list[Candidate]:
    """Soonest done first; by name among equals, so that a run is repeatable."""
    return sorted(candidates, key=lambda c: (c.cost, c.name))


def shares(total_mb_s: float | None, phases: dict[str, str]) -> dict[str, float | None]:
    """Each running VM's cap (MB/s) out of the budget, by the WEIGHTS of their phases."""
    if total_mb_s is None:
        return dict.fromkeys(phases)
    weights = {vm: WEIGHTS.get(phase, 1.0) for vm, phase in phases.items()}
    whole = sum(weights.values())
    return {vm: max(MIN_BANDWIDTH_MB_S, round(total_mb_s * w / whole, 3))
            for vm, w in weights.items()}


class Outcome(enum.Enum):
    MOVED = "moved"  # completed and verified: it runs at the destination
    STAYED = "stayed"  # it runs here, as it did (failed before its Commit, or not started)
    UNSETTLED = "unsettled"  # cut after its Commit: 'migrator resolve' says where it runs


@dataclass
class Attempt:
    to: str
    outcome: Outcome | None = None  # None while it runs
    error: str = ""


@dataclass
class VMState:
    candidate: Candidate
    attempts: list[Attempt] = field(default_factory=list)
    outcome: Outcome | None = None  # final
    why_here: str = ""  # STAYED: why it did not leave

    @property
    def running(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].outcome is None


class Evacuation:
    """The bookkeeping of one evacuation: what runs where and what each VM became.

    Rules held (tests/test_evacuation.py, against any sequence of events): at most `parallel`
    migrations hold a place at once (those that did not hand it over), a VM runs at most
    once at a time and never twice on a destination, no migration starts on a destination
    known down or after stop(), and every VM ends with exactly one outcome."""

    def __init__(self, candidates: list[Candidate], destinations: list[str],
                 parallel: int = PARALLEL) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        if not destinations:
            raise ValueError("no destination")
        self.destinations = list(dict.fromkeys(destinations))
        self.parallel = parallel
        self.vms = {c.name: VMState(c) for c in order(candidates)}
        self.queue = list(self.vms)  # names, in the order they go
        self.down: set[str] = set()
        self.released: set[str] = set()  # running, but handed its place over (hands_over)
        self.stopping = False

    def running(self) -> dict[str, str]:
        """VM name -> the destination it goes to now."""
        return {n: v.attempts[-1].to for n, v in self.vms.items() if v.running}

    def release(self, name: str) -> None:
        """Its place goes to the next (hands_over said so)."""
        if self.vms[name].running:
            self.released.add(name)

    def holding(self) -> list[str]:
        """The running migrations that hold one of the `parallel` places."""
        return [n for n in self.running() if n not in self.released]

    def _load(self, dest: str) -> int:
        return sum(1 for to in self.running().values() if to == dest)

    def _where(self, vm: VMState) -> str | None:
        tried = {a.to for a in vm.attempts}
        free = [d for d in self.destinations if d not in self.down and d not in tried]
        return min(free, key=self._load) if free else None

    def next_start(self) -> tuple[Candidate, str] | None:
        """The next VM to start and where, or None (the limit is reached, or none is left)."""
        if self.stopping or len(self.holding()) >= self.parallel:
            return None
        for name in list(self.queue):
            vm = self.vms[name]
            to = self._where(vm)
            self.queue.remove(name)
            if to is None:
                self._settle(vm, Outcome.STAYED, self._why_nowhere(vm))
                continue
            vm.attempts.append(Attempt(to))
            return vm.candidate, to
        return None

    def upcoming(self, n: int = 1) -> list[tuple[Candidate, str, int]]:
        """The next `n` VMs next_start will start as places free (each VM, where it would go
        now, and its attempt's number), changing nothing: evacuate makes their processes
        ready. The first is the one next_start returns; the others' destinations are
        guesses (the load changes meanwhile)."""
        if self.stopping:
            return []
        out = []
        for name in self.queue:
            vm = self.vms[name]
            to = self._where(vm)
            if to is not None:
                out.append((vm.candidate, to, len(vm.attempts) + 1))
                if len(out) == n:
                    break
        return out

    def _why_nowhere(self, vm: VMState) -> str:
        if vm.attempts:
            return f"failed on {', '.join(a.to for a in vm.attempts)}: {vm.attempts[-1].error}"
        return f"no destination left ({', '.join(sorted(self.down))} down)"

    def finished(self, name: str, outcome: Outcome, error: str = "",
                 dest_down: bool = False) -> None:
        """Its migrate process ended: how (a STAYED VM is tried again elsewhere, if it can)."""
        vm = self.vms[name]
        if not vm.running:
            raise ValueError(f"{name} is not running")
        attempt = vm.attempts[-1]
        attempt.outcome, attempt.error = outcome, error
        self.released.discard(name)
        if dest_down:
            self.down.add(attempt.to)
        if outcome is Outcome.STAYED and not self.stopping and self._where(vm) is not None:
            self.queue.insert(0, name)  # first in line: it has waited longest
            return
        self._settle(vm, outcome, self._why_nowhere(vm) if outcome is Outcome.STAYED else "")

    def _settle(self, vm: VMState, outcome: Outcome, why: str) -> None:
        vm.outcome = outcome
        vm.why_here = why

    def stop(self) -> None:
        """No new migration starts; the VMs still queued stay here."""
        self.stopping = True
        for name in self.queue:
            self._settle(self.vms[name], Outcome.STAYED, "not started: the evacuation was "
                         "stopped")
        self.queue.clear()

    @property
    def done(self) -> bool:
        return all(v.outcome is not None for v in self.vms.values())
