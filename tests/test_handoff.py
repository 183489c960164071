"""The switchover as a handoff (invariant 7, "one VM"), in process on the autojump clock.

Each test counts the running copies: the source VM (FakeVM.running) and the destination's
(DestVM.running, started by the resume hook). At most one may run, whatever is cut when;
the source copy is retired only after the destination's copy is verified.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from migrator import protocol as p
from migrator.ownership import HANDING_OFF, OWNER, RETIRED, VMRecord
from migrator.resolve import resolve_source
from migrator.serving import ServeOptions, Sessions, serve_one
from migrator.transport import MigrationError

from .fakes.engine import (
    KEY,
    FakeVM,
    MemoryDest,
    MemoryRecords,
    MemorySource,
    files,
    migrate,
    options,
)


class DestVM:
    """The destination's copy: the resume hook starts it, optionally misbehaving."""

    def __init__(self, fail: str | None = None, then: Any = None) -> None:
        self.running = False
        self.fail = fail
        self.then = then  # awaited after the VM started: a cut, a long start ...

    async def start(self) -> None:
        if self.fail:
            raise MigrationError(self.fail)
        self.running = True
        if self.then is not None:
            await self.then()


def running(vm: FakeVM, dvm: DestVM) -> int:
    return int(vm.running) + int(dvm.running)


class CuttableStream(trio.abc.Stream):
    """The source's end of the link; `cut()` breaks it both ways (a pulled cable)."""

    def __init__(self, inner: trio.abc.Stream, flip_blocks_frame: int | None = None) -> None:
        self.inner = inner
        self.cut_now = False
        self.flip = flip_blocks_frame  # corrupt one byte of the N-th Blocks frame on the wire
        self.blocks_frames = 0

    def cut(self) -> None:
        self.cut_now = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.cut_now:
            raise trio.BrokenResourceError("link cut")
        data = bytes(data)
        if data[:1] == bytes([5]):  # a Blocks frame
            self.blocks_frames += 1
            if self.blocks_frames == self.flip:
                data = data[:-1] + bytes([data[-1] ^ 0x01])
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.cut_now:
            raise trio.BrokenResourceError("link cut")
        data = await self.inner.receive_some(max_bytes)
        if self.cut_now:
            raise trio.BrokenResourceError("link cut")
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def ask_dest(dest: MemoryDest, record: VMRecord | None, vm: FakeVM,
                   decision: str | None = None) -> Any:
    """`migrator resolve` on the source, against a serve that answers from `dest`."""
    left, right = trio.testing.memory_stream_pair()
    sopts = ServeOptions(mount=dest.mount, key=KEY, open_files=lambda mount, force: dest)
    written: list[VMRecord] = []
    assert record is not None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_one, right, sopts, Sessions(), "memory")

        async def connect() -> trio.abc.Stream:
            return left

        out = await resolve_source(record, lambda: vm, written.append, connect, KEY, decision)
    return out, written


# -- the tests ----------------------------------------------------------------------------------


async def test_the_source_is_retired_only_after_the_copy_is_verified(
        autojump_clock: Any) -> None:
    vm, dvm = FakeVM([10, 2, 0]), DestVM()
    src, dest = MemorySource(files(), vm), MemoryDest()
    seen_at_finish: list[str | None] = []
    vm.finish = lambda: (seen_at_finish.append(dest.status), "retired")[1]  # type: ignore
    source, outcome, _ = await migrate(src, vm, dest, options(), resume_hook=dvm.start)
    assert source.report.verified and outcome is not None and outcome.completed
    assert seen_at_finish == ["complete"]  # the destination had verified its copy
    assert [(r.role, r.generation) for r in src.records.log] == [
        (OWNER, 0), (HANDING_OFF, 0), (RETIRED, 1)]
    owner = [s for s in dest.states if s.get("owner")]
    assert owner and owner[0]["status"] == "running"  # written before the VM started
    assert dest.states[-1]["status"] == "complete" and dest.states[-1]["generation"] == 1
    assert running(vm, dvm) == 1 and dvm.running


async def test_a_flipped_bit_on_the_wire_stops_the_migration_before_the_switchover(
        autojump_clock: Any) -> None:
    """Sealed frames: the flip fails its tag at once, the VM runs on at the source."""
    vm, dvm = FakeVM([10, 2, 0]), DestVM()
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, outcome, _ = await migrate(src, vm, dest, options(), resume_hook=dvm.start,
                                       wrap=lambda s: CuttableStream(s, flip_blocks_frame=1))
    r = source.report
    assert r.status == "failed" and "tampered with or corrupted" in (r.error or ""), r.error
    assert vm.running and not vm.finished and not dvm.running and running(vm, dvm) == 1
    assert src.state == OWNER  # as it was
    assert outcome is not None and "tampered with or corrupted" in outcome.text


async def test_a_flipped_bit_keeps_the_source_copy_suspended_and_says_how_to_fall_back(
        autojump_clock: Any) -> None:
    """A flip the channel cannot see (in clear here; for real, a bad disk or memory on the
    destination) is caught by the verification, after the switchover."""
    vm, dvm = FakeVM([10, 2, 0]), DestVM()
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, outcome, _ = await migrate(src, vm, dest, options(plaintext=True),
                                       resume_hook=dvm.start,
                                       wrap=lambda s: CuttableStream(s, flip_blocks_frame=1))
    r = source.report
    assert r.status == "failed" and not r.verified and r.mismatched_blocks == 1
    assert "VERIFICATION FAILED" in (r.error or "") and "--resume-here" in (r.error or "")
    assert not vm.finished and not vm.running and vm.resumes == 0  # the good copy, kept
    last = src.records.last
    assert last is not None and last.role == HANDING_OFF and "unverified" in last.detail
    assert "kept suspended" in r.source_vm
    assert outcome is not None and "VERIFICATION FAILED" in outcome.text
    assert running(vm, dvm) == 1
    # The fallback: the VM stopped there by a person, then resumed here by hand.
    dvm.running = False
    out, written = await ask_dest(dest, src.records.last, vm, "resume")
    assert out.done and vm.running and written[-1].role == OWNER


async def test_a_cut_while_the_destination_starts_the_vm_leaves_one_vm(
        autojump_clock: Any) -> None:
    link: list[CuttableStream] = []

    async def cut_after_start() -> None:
        link[0].cut()  # the Resumed never reaches the source

    vm, dvm = FakeVM([10, 2, 0]), DestVM(then=cut_after_start)
    src, dest = MemorySource(files(), vm), MemoryDest()

    def wrap(s: trio.abc.Stream) -> trio.abc.Stream:
        link.append(CuttableStream(s))
        return link[0]

    source, outcome, _ = await migrate(src, vm, dest, options(io_timeout=30.0),
                                       resume_hook=dvm.start, wrap=wrap)
    r = source.report
    assert r.status == "failed" and "migrator resolve" in (r.error or ""), r.error
    assert not vm.running and vm.resumes == 0 and not vm.finished  # held, not resumed
    assert src.state == HANDING_OFF
    assert dvm.running and running(vm, dvm) == 1
    assert outcome is not None and "the VM runs here" in outcome.text
    assert dest.states[-1]["owner"] and dest.states[-1]["status"] == "running"
    # Settling: the destination says it owns the VM, so the source copy is retired.
    out, written = await ask_dest(dest, src.records.last, vm)
    assert out.done and "owner" in out.text and vm.finished and written[-1].role == RETIRED
    assert running(vm, dvm) == 1


async def test_a_cut_before_the_destination_saw_commit_resumes_after_resolve(
        autojump_clock: Any) -> None:
    """The Commit is lost on the wire: the destination never took the VM."""
    vm, dvm = FakeVM([10, 2, 0]), DestVM()
    src, dest = MemorySource(files(), vm), MemoryDest()
    link: list[CuttableStream] = []

    class CutAtCommit(CuttableStream):
        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            if bytes(data[:1]) == bytes([p.FrameType.COMMIT]):
                self.cut()
            await super().send_all(data)

    def wrap(s: trio.abc.Stream) -> trio.abc.Stream:
        link.append(CutAtCommit(s))
        return link[0]

    source, outcome, _ = await migrate(src, vm, dest, options(io_timeout=30.0),
                                       resume_hook=dvm.start, wrap=wrap)
    assert source.report.status == "failed" and src.state == HANDING_OFF
    assert not vm.running and not dvm.running  # none runs until it is settled: never two
    assert outcome is not None and not outcome.completed
    assert not dest.states[-1]["owner"]
    out, written = await ask_dest(dest, src.records.last, vm)
    assert out.done and "refused" in out.text and vm.running and written[-1].role == OWNER
    assert running(vm, dvm) == 1


async def test_a_destination_that_cannot_start_the_vm_refuses_and_the_source_runs_on(
        autojump_clock: Any) -> None:
    vm, dvm = FakeVM([10, 2, 0]), DestVM(fail="the hypervisor would not start")
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, outcome, _ = await migrate(src, vm, dest, options(), resume_hook=dvm.start)
    assert source.report.status == "failed" and "would not start" in (source.report.error or "")
    assert vm.running and vm.resumes == 1 and src.state == OWNER
    assert dest.states[-1]["status"] == "refused" and not dest.states[-1]["owner"]
    assert outcome is not None and "would not start" in outcome.text
    assert running(vm, dvm) == 1


async def test_an_interrupt_after_commit_never_resumes_the_source(autojump_clock: Any) -> None:
    async def slow_start() -> None:
        await trio.sleep(5)  # a hypervisor that takes its time

    vm, dvm = FakeVM([10, 2, 0]), DestVM(then=slow_start)
    src, dest = MemorySource(files(), vm), MemoryDest()
    stop = trio.CancelScope()

    async def interrupt_when_handed_off() -> None:
        while not any(s.get("owner") for s in dest.states):
            await trio.sleep(0.001)
        stop.cancel()  # Ctrl-C, right after the Commit (the destination is starting the VM)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(interrupt_when_handed_off)
        with stop:
            await migrate(src, vm, dest, options(), resume_hook=dvm.start)
        nursery.cancel_scope.cancel()
    assert not vm.running and vm.resumes == 0 and src.state == HANDING_OFF
    assert dvm.running and dest.states[-1]["owner"]  # the Commit was honoured there
    assert running(vm, dvm) == 1


async def test_a_new_migration_is_refused_while_a_handoff_is_unsettled(
        autojump_clock: Any) -> None:
    vm = FakeVM([0])
    src = MemorySource(files(), vm)
    src.records.put(VMRecord("vm-1", "disk", list(files()), 2, HANDING_OFF, "dst:7070",
                             "m-old", suspend="pid:1"))
    dest = MemoryDest()
    source, _, _ = await migrate(src, vm, dest, options())
    assert "never settled" in (source.report.error or "") and "migrator resolve" in (
        source.report.error or "")
    assert dest.records.log == [] and vm.running  # nothing sent, nothing suspended


async def test_the_destination_answers_unknown_for_a_migration_it_never_saw(
        autojump_clock: Any) -> None:
    vm = FakeVM([0])
    vm.running = False
    dest = MemoryDest()
    dest.records.put(VMRecord("vm-2", "other", ["other.raw"], 1, OWNER, "a:1", "other"))
    rec = VMRecord("vm-1", "disk", ["disk.raw"], 0, HANDING_OFF, "dst:7070", "m-lost")
    out, written = await ask_dest(dest, rec, vm)
    assert not out.done and "no record of migration m-lost" in out.text and not written
    assert not vm.running and not vm.finished  # nothing is guessed


# -- reattach: the source reconnects after the link broke past Commit ---------------------------


class Network:
    """Each connect of the source opens a new link to a new serve session on `dest` (as a
    real `migrator serve` accepts one connection after another); `wrap` may wrap the N-th."""

    def __init__(self, nursery: trio.Nursery, dest: MemoryDest, opts: ServeOptions,
                 wrap: Any = None) -> None:
        self.nursery, self.dest, self.opts, self.wrap = nursery, dest, opts, wrap
        self.sessions = Sessions()
        self.links: list[trio.abc.Stream] = []
        self.outcomes: list[Any] = []

    async def connect(self, _opts: Any = None) -> trio.abc.Stream:
        left, right = trio.testing.memory_stream_pair()

        async def session() -> None:
            self.outcomes.append(await serve_one(right, self.opts, self.sessions, "memory"))

        self.nursery.start_soon(session)
        link = self.wrap(len(self.links), left) if self.wrap else left
        self.links.append(link)
        return link


async def migrate_over(network_wrap: Any, dest: MemoryDest, src: MemorySource, vm: FakeVM,
                       dvm: DestVM, **kw: Any) -> tuple[Any, Network]:
    from migrator.options import SourceHooks
    from migrator.source import Source

    from .fakes.engine import inline

    opts = options(**kw)
    sopts = ServeOptions(mount=dest.mount, key=KEY, io_timeout=opts.io_timeout,
                         open_files=lambda mount, force: dest, resume_hook=dvm.start)
    async with trio.open_nursery() as nursery:
        net = Network(nursery, dest, sopts, network_wrap)
        source = Source(opts, vm, SourceHooks(open_files=lambda o: src, connect=net.connect,
                                              run_sync=inline))
        try:
            await source.run()
        except* MigrationError:
            pass
        await trio.sleep(2)  # the sessions say how they ended
        nursery.cancel_scope.cancel()  # (a serve session left waiting for nothing)
    return source, net


def cut_first_link_after_start(dvm: DestVM) -> Any:
    links: list[CuttableStream] = []

    async def cut() -> None:
        if links:
            links[0].cut()  # the Resumed never reaches the source

    dvm.then = cut

    def wrap(n: int, s: trio.abc.Stream) -> trio.abc.Stream:
        if n == 0:
            links.append(CuttableStream(s))
            return links[0]
        return s

    return wrap


async def test_a_cut_after_commit_is_healed_by_the_source_reattaching(
        autojump_clock: Any) -> None:
    vm, dvm = FakeVM([10, 2, 0]), DestVM()
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, net = await migrate_over(cut_first_link_after_start(dvm), dest, src, vm, dvm,
                                     io_timeout=30.0)
    r = source.report
    assert r.status == "completed" and r.verified and r.reattaches == 1, r.error
    assert vm.finished and src.state == RETIRED  # retired after the reattached verification
    assert dvm.running and running(vm, dvm) == 1
    assert dest.states[-1]["status"] == "complete" and dest.states[-1]["reattaches"] == 1
    assert dest.digest_log is not None and dest.reattached
    texts = [o.text for o in net.outcomes]
    assert any("reconnects within its io timeout" in t for t in texts), texts
    assert any("the source reattached" in t for t in texts), texts


async def test_a_destination_still_starting_the_vm_is_waited_for_past_the_io_timeout(
        autojump_clock: Any) -> None:
    """The link breaks after Commit while the destination's resume hook still runs (a slow
    start: 3 io timeouts). Its Abort says still-running (AbortCode, not its words), so the
    source keeps trying past its io timeout, and reattaches once the session there ended."""
    vm = FakeVM([10, 2, 0])
    links: list[CuttableStream] = []

    async def slow_start() -> None:
        links[0].cut()  # the Resumed never reaches the source
        await trio.sleep(30.0)

    dvm = DestVM(then=slow_start)

    def wrap(n: int, st: trio.abc.Stream) -> trio.abc.Stream:
        if n == 0:
            links.append(CuttableStream(st))
            return links[0]
        return st

    src, dest = MemorySource(files(), vm), MemoryDest()
    source, net = await migrate_over(wrap, dest, src, vm, dvm, io_timeout=10.0)
    r = source.report
    assert r.status == "completed" and r.verified and r.reattaches == 1, r.error
    assert running(vm, dvm) == 1 and dvm.running
    assert len(net.links) > 2  # refused (still running) at least once before it got in


async def test_a_reattach_without_the_digest_log_cannot_verify_and_keeps_the_source(
        autojump_clock: Any) -> None:
    class NoLog(MemoryRecords):
        def write_digests(self, vm: str, data: bytes) -> None:
            raise OSError(28, "No space left on device")

    vm, dvm = FakeVM([10, 2, 0]), DestVM()
    src, dest = MemorySource(files(), vm), MemoryDest(records=NoLog())
    source, _ = await migrate_over(cut_first_link_after_start(dvm), dest, src, vm, dvm,
                                   io_timeout=30.0)
    r = source.report
    assert r.status == "failed" and r.verified is False and r.reattaches == 1
    assert "cannot be verified" in (r.verify_detail or ""), r.verify_detail
    assert not vm.finished and not vm.running and src.state == HANDING_OFF  # the good copy
    assert running(vm, dvm) == 1


async def test_a_reattach_to_a_destination_that_never_took_the_vm_resumes_the_source(
        autojump_clock: Any) -> None:
    class CutAtCommit(CuttableStream):
        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            if bytes(data[:1]) == bytes([p.FrameType.COMMIT]):
                self.cut()
            await super().send_all(data)

    vm, dvm = FakeVM([10, 2, 0]), DestVM()
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, _ = await migrate_over(lambda n, s: CutAtCommit(s) if n == 0 else s, dest, src,
                                   vm, dvm, io_timeout=30.0)
    r = source.report
    assert r.status == "failed" and "never took the VM" in (r.error or ""), r.error
    assert vm.running and vm.resumes == 1 and src.state == OWNER and not dvm.running
    assert running(vm, dvm) == 1


async def test_a_destination_that_stays_away_leaves_the_source_held_after_its_timeout(
        autojump_clock: Any) -> None:
    vm, dvm = FakeVM([10, 2, 0]), DestVM()
    src, dest = MemorySource(files(), vm), MemoryDest()
    wrap = cut_first_link_after_start(dvm)

    def cut_all(n: int, s: trio.abc.Stream) -> trio.abc.Stream:
        if n == 0:
            return wrap(n, s)
        c = CuttableStream(s)
        c.cut()  # the destination host is unreachable from now on
        return c

    t0 = trio.current_time()
    source, net = await migrate_over(cut_all, dest, src, vm, dvm, io_timeout=20.0)
    r = source.report
    assert r.status == "failed" and "reconnecting for 20 s failed" in (r.error or ""), r.error
    assert "migrator resolve" in (r.error or "") and src.state == HANDING_OFF
    assert not vm.running and not vm.finished and running(vm, dvm) == 1
    assert 20 <= trio.current_time() - t0 < 60 and len(net.links) > 3  # backoff, bounded


async def test_two_owners_meet_as_a_split_brain_reported_by_both(autojump_clock: Any) -> None:
    """A cut after the VM started there, then a person forces --resume-here on the source:
    both hosts say owner at generation 1. The next migration between them finds it, both
    record it with both generations, nothing is overwritten, and only a person settles it."""
    link: list[CuttableStream] = []

    async def cut_after_start() -> None:
        link[0].cut()

    vm, dvm = FakeVM([10, 2, 0]), DestVM(then=cut_after_start)
    src, dest = MemorySource(files(), vm), MemoryDest()

    def wrap(s: trio.abc.Stream) -> trio.abc.Stream:
        link.append(CuttableStream(s))
        return link[-1]

    await migrate(src, vm, dest, options(io_timeout=30.0), resume_hook=dvm.start, wrap=wrap)
    assert src.state == HANDING_OFF and dest.records.last is not None
    assert (dest.records.last.role, dest.records.last.generation) == (OWNER, 1)
    dvm.running = False  # the person thinks it stopped there (it did not: its record says so)
    out, written = await ask_dest(dest, src.records.last, vm, "resume")
    assert out.done and (written[-1].role, written[-1].generation) == (OWNER, 1)
    src.records.put(written[-1])
    before = [bytes(b) for b in dest.data.values()]
    again = MemoryDest(records=dest.records)
    source, outcome, _ = await migrate(src, vm, again, options())
    r = source.report
    assert r.status == "failed" and "split brain" in (r.error or ""), r.error
    assert outcome is not None and "split brain" in outcome.text
    mine, theirs = src.records.last, dest.records.last
    assert mine is not None and theirs is not None
    assert mine.split_brain is not None and mine.split_brain["generation"] == 1
    assert theirs.split_brain is not None and theirs.split_brain["generation"] == 1
    assert again.data == {} and [bytes(b) for b in dest.data.values()] == before
    assert vm.running  # the source's copy runs on, as the person forced it
    # Neither hands it off until a person settles it: retire one copy, keep the other.
    source, _, _ = await migrate(src, vm, MemoryDest(), options())
    assert "split brain" in (source.report.error or "") and "--retire-here" in (
        source.report.error or "")
    out, written = await ask_dest(dest, theirs, DestVM(), "retire")  # (on the destination)
    assert out.done and written[-1].role == RETIRED and written[-1].split_brain is None
    dest.records.put(written[-1])
    out, written = await ask_dest(dest, mine, vm, "resume")
    assert out.done and written[-1].role == OWNER and written[-1].split_brain is None
    src.records.put(written[-1])
    source, outcome, _ = await migrate(src, vm, MemoryDest(records=dest.records), options())
    assert source.report.status == "completed", source.report.error
    assert dest.records.last is not None and dest.records.last.generation == 2


async def test_a_destination_that_cannot_write_its_record_refuses_and_the_source_runs_on(
        autojump_clock: Any) -> None:
    """The disk under the destination's records is full: its first record write (incoming,
    before any file is touched) fails, so nothing is written and the source VM runs on."""
    class Full(MemoryRecords):
        def put(self, rec: VMRecord) -> None:
            raise MigrationError(f"cannot write the record of VM {rec.name} in /x: No space "
                                 "left on device")

    vm, dvm = FakeVM([10, 2, 0]), DestVM()
    src, dest = MemorySource(files(), vm), MemoryDest(records=Full())
    source, outcome, _ = await migrate(src, vm, dest, options(), resume_hook=dvm.start)
    r = source.report
    assert r.status == "failed" and "No space left on device" in (r.error or ""), r.error
    assert vm.running and vm.resumes == 0 and not dvm.running and src.state == OWNER
    assert dest.data == {}  # no file touched
    assert outcome is not None and "No space left" in outcome.text


async def test_a_source_that_cannot_write_handing_off_never_suspends(autojump_clock: Any) -> None:
    """Its disk fills before the switchover: the record cannot say handing-off, so the VM is
    never suspended, no Commit goes out, and the destination's copy stays not runnable."""
    class FullLater(MemoryRecords):
        def put(self, rec: VMRecord) -> None:
            if rec.role == HANDING_OFF:
                raise MigrationError("cannot write the record of VM disk in /x: No space left "
                                     "on device")
            super().put(rec)

    vm, dvm = FakeVM([10, 2, 0]), DestVM()
    src, dest = MemorySource(files(), vm, FullLater()), MemoryDest()
    source, outcome, _ = await migrate(src, vm, dest, options(), resume_hook=dvm.start)
    assert source.report.status == "failed" and "No space" in (source.report.error or "")
    assert outcome is not None and not outcome.completed
    assert vm.running and vm.suspends == 0 and not dvm.running and src.state == OWNER
    assert dest.records.last is not None and dest.records.last.role == "incomplete"
