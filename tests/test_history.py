"""Histories, not sessions: three hosts and two VMs through random sequences of migrations
(there, back, to a third host), faults at any phase (a cut link, a lost Commit, a VM that
will not start, Ctrl-C, kill -9 of either side), settlements and retries, over the
in-memory engine (hypothesis RuleBasedStateMachine on trio's autojump clock).

Each host keeps its files, its blkfs tracking (epochs and dirty sets, which outlive a
session as a mount's do) and its VM records across the whole history. After every step:

* at most one copy of each VM runs, and where none runs a handoff is open (handing-off)
  for `migrator resolve` to settle: the VM is never lost;
* the host where it runs says owner, at the highest generation any host knows, and no
  other host says owner;
* no write is ever lost: a copy starts on a destination only equal to the source's at
  its suspend, and the verification of every completed migration holds;
* no host refuses a legitimate migration: the owner that runs the VM migrates it to any
  other host, with no fault, and it completes.

The default run is quick (HISTORY_EXAMPLES, default 25 histories); a long one:
``HISTORY_EXAMPLES=20000 .venv/bin/pytest tests/test_history.py``.
"""

from __future__ import annotations

import os
import random
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from migrator import ownership as own
from migrator.errors import MigrationError, first_error
from migrator.options import MigrateOptions, SourceHooks
from migrator.plan import Policy
from migrator.protocol import ProtocolError
from migrator.resolve import resolve_source
from migrator.serving import ServeOptions, Sessions, serve_one
from migrator.source import Source
from migrator.vm import AdapterError

from .fakes.engine import BS, KEY, FakeVM, MemoryDest, MemoryRecords, MemorySource, inline
from .test_handoff import CuttableStream

HOSTS = ("h0", "h1", "h2")
VMS = {"a": ["a/disk.raw", "a/vm.mem"], "b": ["b/disk.raw"]}
ORIGIN = {"a": "h0", "b": "h1"}
FAULTS = ("none", "cut", "cut-for-good", "drop-commit", "refuse-start", "interrupt",
          "kill-source", "kill-dest")
EXAMPLES = int(os.environ.get("HISTORY_EXAMPLES", "25"))


class Records(MemoryRecords):
    """A host's records; `frozen` while its process is dead (kill -9 writes nothing more)."""

    frozen = False

    def put(self, rec: own.VMRecord) -> None:
        if not self.frozen:
            super().put(rec)

    def write_sync(self, vm: str, record: dict[str, Any]) -> None:
        if not self.frozen:
            super().write_sync(vm, record)

    def write_digests(self, vm: str, data: bytes) -> None:
        if not self.frozen:
            super().write_digests(vm, data)


class Host:
    """A host: its files, its blkfs tracking of each file ([epoch, dirty blocks]) and its
    records, for the whole history."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.data: dict[str, bytearray] = {}
        self.tracker: dict[str, list[Any]] = {}
        self.records = Records()
        self.running: dict[str, bool] = {}

    def track(self, name: str) -> list[Any]:
        if name not in self.tracker:  # blkfs starts a file it never saw at epoch 0, all dirty
            self.tracker[name] = [0, set(range(-(-len(self.data[name]) // BS)))]
        return self.tracker[name]

    def write(self, name: str, rng: random.Random) -> None:
        """The running VM writes one block of a file (blkfs marks it)."""
        buf = self.data[name]
        off = rng.randrange(len(buf) // BS) * BS + rng.randrange(BS - 8)
        buf[off:off + 8] = rng.randbytes(8)
        self.track(name)[1].add(off // BS)

    def vm(self, name: str) -> own.VMRecord | None:
        return next((r for r in self.records.all() if r.name == name), None)


class HostVM(FakeVM):
    """The VM's copy on a host, seen by the source's adapter; `dead` once migrate was
    killed (nothing resumes or retires it then: it stays as the kill left it)."""

    def __init__(self, host: Host, vm: str, seed: int) -> None:
        self.host, self.vmname = host, vm
        self.plan, self.rng = [1], random.Random(seed)
        self.suspends = self.resumes = 0
        self.finished = False
        self.fail_suspend = None
        self.dead = False
        self.slowed, self.events = 0, []

    @property  # type: ignore[override]
    def running(self) -> bool:
        return self.host.running.get(self.vmname, False)

    @running.setter
    def running(self, value: bool) -> None:
        self.host.running[self.vmname] = value

    def resume(self) -> None:
        if not self.dead:
            super().resume()

    def finish(self) -> str:
        if self.dead:
            return "nothing (migrate is dead)"
        self.running, self.finished = False, True
        return "retired"

    def write_some(self, src: MemorySource) -> None:
        if self.running:  # a write or two at every flush, while it runs
            for _ in range(self.rng.randrange(3)):
                self.host.write(self.rng.choice(src.names), self.rng)


class HostSource(MemorySource):
    """The host's files of a VM as a source sees them; swaps end the host's own epochs."""

    def __init__(self, host: Host, vm: str, adapter: HostVM) -> None:
        names = VMS[vm]
        super().__init__({n: b"" for n in names}, adapter, host.records)
        self.host = host
        self.data = [host.data[n] for n in names]
        self.dirty = [host.track(n)[1] for n in names]

    async def swap(self, file_id: int) -> list[tuple[int, int]]:
        t = self.host.track(self.names[file_id])
        blocks = sorted(t[1])
        t[1].clear()
        self.ended[file_id] = t[0]
        t[0] += 1
        return [(b, 1) for b in blocks]


class HostDest(MemoryDest):
    """The host's mount as a destination: files that outlive the session."""

    def __init__(self, host: Host) -> None:
        super().__init__(holds={n: bytes(d) for n, d in host.data.items()},
                         records=host.records)
        self.host = host

    def create(self, manifest: Any) -> None:
        for f in manifest.files:
            buf = self.host.data.setdefault(f.name, bytearray())
            self.host.track(f.name)
            del buf[f.size:]
            buf.extend(bytes(f.size - len(buf)))
            self.data[f.file_id] = buf
            self.names[f.file_id] = f.name

    def mark(self, name: str, offset: int, length: int) -> None:
        self.host.track(name)[1].update(range(offset // BS, -(-(offset + length) // BS)))

    async def own_swap(self, name: str) -> tuple[int, list[tuple[int, int]]] | None:
        if name not in self.host.data:
            return None
        t = self.host.track(name)
        ended, blocks = t[0], sorted(t[1])
        t[1].clear()
        t[0] += 1
        return ended, [(b, 1) for b in blocks]


class Link(CuttableStream):
    """The source's end of one connection; `at` is called with each frame it sends (and may
    cut it then)."""

    def __init__(self, inner: trio.abc.Stream, at: Any) -> None:
        super().__init__(inner)
        self.at = at

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.at(bytes(data[:1]), self)
        await super().send_all(data)


COMMIT = bytes([10])  # protocol.FrameType.COMMIT


class History(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.hosts = {n: Host(n) for n in HOSTS}
        rng = random.Random(1)
        for vm, host in ORIGIN.items():
            h = self.hosts[host]
            for i, name in enumerate(VMS[vm]):
                h.data[name] = bytearray(rng.randbytes((24 + 8 * i) * BS + 100 * i))
            h.running[vm] = True
        self.steps: list[str] = []
        self.bad_starts: list[str] = []
        self.seed = 0

    def story(self) -> str:
        return "\n".join(["the history so far:", *self.steps])

    # -- what a person does --------------------------------------------------------------------

    def where(self, vm: str) -> list[Host]:
        return [h for h in self.hosts.values() if h.running.get(vm)]

    @rule(vm=st.sampled_from(sorted(VMS)), data=st.data())
    def vm_writes(self, vm: str, data: st.DataObject) -> None:
        for h in self.where(vm):
            rng = random.Random(data.draw(st.integers(0, 1 << 30)))
            for _ in range(rng.randrange(1, 4)):
                h.write(rng.choice(VMS[vm]), rng)

    @rule(vm=st.sampled_from(sorted(VMS)), src=st.sampled_from(HOSTS),
          dst=st.sampled_from(HOSTS), fault=st.sampled_from(FAULTS),
          at=st.integers(1, 16))
    def migrate(self, vm: str, src: str, dst: str, fault: str, at: int) -> None:
        s, d = self.hosts[src], self.hosts[dst]
        if src == dst or not all(n in s.data for n in VMS[vm]):
            return  # (no such files there: the CLI says so before the engine runs)
        rec = s.vm(vm)
        legit = (fault == "none" and s.running.get(vm, False)
                 and (rec is None or rec.role == own.OWNER))
        self.seed += 1
        report = trio.run(self._migrate, vm, s, d, fault, at,
                          clock=trio.testing.MockClock(autojump_threshold=0))
        event(f"migrate {fault}: {report.status}"
              + (f" ({rec.role if rec else 'new'} source)" if report.status == "failed"
                 else ""))
        self.steps.append(f"migrate {vm} {src}->{dst} {fault}@{at}: {report.status} "
                          f"{report.error or ''}")
        if legit:  # no host refuses a legitimate migration
            assert report.status == "completed" and report.verified, self.story()
        if report.status == "completed":
            assert report.verified, self.story()  # (every block compared)
        s.records.frozen = d.records.frozen = False  # the processes are back

    async def _migrate(self, vm: str, s: Host, d: Host, fault: str, at: int) -> Any:
        adapter = HostVM(s, vm, self.seed)
        store = HostSource(s, vm, adapter)
        frames = [0]
        dest_scopes: list[trio.CancelScope] = []
        links: list[Link] = []
        stop = trio.CancelScope()

        def on_frame(kind: bytes, link: Link) -> None:
            frames[0] += 1
            if fault == "drop-commit" and kind == COMMIT:
                link.cut()
            if frames[0] != at:
                return
            if fault in ("cut", "cut-for-good"):
                link.cut()
            elif fault == "interrupt":
                stop.cancel()  # Ctrl-C: migrate says why and settles what it can
            elif fault == "kill-source":
                s.records.frozen, adapter.dead = True, True  # kill -9: nothing more
                stop.cancel()
            elif fault == "kill-dest":
                d.records.frozen = True
                for scope in dest_scopes:
                    scope.cancel()
                link.cut()

        async def resume_hook() -> None:
            if fault == "refuse-start":
                raise MigrationError("the hypervisor would not start")
            if any(h.running.get(vm) for h in self.hosts.values()):
                self.bad_starts.append(f"{vm} started on {d.name} while it runs elsewhere")
            if [bytes(d.data[n]) for n in VMS[vm]] != [bytes(s.data[n]) for n in VMS[vm]]:
                self.bad_starts.append(f"{vm} started on {d.name} on other data than "
                                       f"{s.name}'s at its suspend")
            d.running[vm] = True

        sopts = ServeOptions(mount=d.name, key=KEY, io_timeout=5.0,
                             open_files=lambda mount, force: HostDest(d),
                             resume_hook=resume_hook)
        sessions = Sessions()

        async with trio.open_nursery() as nursery:
            async def connect(_opts: Any) -> trio.abc.Stream:
                if links and (fault in ("cut-for-good", "kill-dest") or stop.cancel_called):
                    raise MigrationError(f"cannot connect to {d.name}: connection refused")
                left, right = trio.testing.memory_stream_pair()
                scope = trio.CancelScope()
                dest_scopes.append(scope)

                async def session() -> None:
                    with scope:
                        await serve_one(right, sopts, sessions, s.name)

                nursery.start_soon(session)
                links.append(Link(left, on_frame))
                return links[-1]

            opts = MigrateOptions(mount=s.name, to=d.name, key=KEY, files=VMS[vm],
                                  policy=Policy(threshold_blocks=2, max_rounds=6),
                                  io_timeout=5.0)
            source = Source(opts, adapter, SourceHooks(open_files=lambda o: store,
                                                       connect=connect, run_sync=inline))
            with stop:
                try:
                    await source.run()
                except BaseException as exc:
                    expected = (MigrationError, AdapterError, ProtocolError)
                    if not isinstance(first_error(exc), expected):
                        raise  # (the report says why it failed)
            await trio.sleep(6)  # the sessions end (or wait for a reattach that never comes)
            nursery.cancel_scope.cancel()
        return source.report

    @rule(vm=st.sampled_from(sorted(VMS)), host=st.sampled_from(HOSTS))
    def resolve(self, vm: str, host: str) -> None:
        """`migrator resolve` where a handoff is open: ask the peer; if it cannot say, a
        careful person decides by where the VM runs."""
        h = self.hosts[host]
        rec = h.vm(vm)
        if rec is None or not rec.unsettled:
            return
        peer = self.hosts[rec.peer]
        adapter = HostVM(h, vm, 0)

        async def settle(decision: str | None) -> Any:
            left, right = trio.testing.memory_stream_pair()
            sopts = ServeOptions(mount=peer.name, key=KEY,
                                 open_files=lambda mount, force: HostDest(peer))

            async def connect() -> trio.abc.Stream:
                return left

            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_one, right, sopts, Sessions(), h.name)
                out = await resolve_source(rec, lambda: adapter, h.records.put, connect, KEY,
                                           decision)
                nursery.cancel_scope.cancel()
            return out

        clock = trio.testing.MockClock(autojump_threshold=0)
        out = trio.run(settle, None, clock=clock)
        trio_asked = out.done
        if not out.done:
            elsewhere = any(x.running.get(vm) for x in self.hosts.values() if x is not h)
            out = trio.run(settle, "retire" if elsewhere else "resume", clock=clock)
        event("resolve: " + ("asked" if trio_asked else "by hand"))
        self.steps.append(f"resolve {vm} on {host}: {out.text}")
        assert out.done, out.text

    # -- what must hold after every step ---------------------------------------------------------

    @invariant()
    def one_vm_on_the_right_data(self) -> None:
        assert not self.bad_starts, (self.bad_starts, self.story())
        for vm in VMS:
            runs = self.where(vm)
            assert len(runs) <= 1, (vm, [h.name for h in runs], self.story())
            recs = {h.name: h.vm(vm) for h in self.hosts.values()}
            known = {n: r for n, r in recs.items() if r is not None}
            owners = [n for n, r in known.items() if r.role == own.OWNER]
            if runs:
                here = runs[0].name
                if not known:  # never migrated: its origin runs it, nobody else knows it
                    assert here == ORIGIN[vm]
                    continue
                r = known.get(here)
                assert r is not None and r.role == own.OWNER, (vm, here, r, self.story())
                assert owners == [here], (vm, owners, self.story())
                top = max(max(x.generation, x.next_generation if x.unsettled else 0)
                          for x in known.values())
                assert r.generation == top, (vm, here, r.generation, top, self.story())
            else:  # suspended by an open handoff: resolve settles it; never lost
                assert not owners, (vm, owners, self.story())
                assert any(r.unsettled for r in known.values()), (vm, known, self.story())
            ids = {r.id for r in known.values()}
            assert len(ids) <= 1, (vm, ids)  # one identity that travels with it

    def teardown(self) -> None:
        # Settle what is open and take every VM once more around the hosts: the history
        # left nothing that refuses a legitimate migration.
        for vm in VMS:
            for h in HOSTS:
                self.resolve(vm, h)
            runs = self.where(vm)
            if not runs:
                continue
            src = runs[0].name
            dst = HOSTS[(HOSTS.index(src) + 1) % len(HOSTS)]
            self.migrate(vm, src, dst, "none", 1)
            self.one_vm_on_the_right_data()


History.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=12,
                                     deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
test_histories = History.TestCase
