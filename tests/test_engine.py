"""The migration engine in process: a Source against a DestSession over an in-memory stream,
files in memory, on trio's autojump clock (no FUSE, no sockets, no real waiting).

The fake VM writes at each flush (the barrier before every swap) until it is suspended, so
every run is the same; the tests check what the mounted tests check, in milliseconds:
the destination equals the source at the suspend point, and every failure before the
switchover leaves the source VM running and the destination marked incomplete.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing

from migrator import protocol as p
from migrator.dest import DestSession
from migrator.plan import OnStall, Policy, Verdict
from migrator.transport import Channel, MigrationError
from migrator.vm import AdapterError

from .fakes.engine import (
    BS,
    KEY,
    FakeVM,
    MemoryDest,
    MemorySource,
    PagedSource,
    files,
    migrate,
    options,
    suspend_point,
)

# -- the tests ----------------------------------------------------------------------------------


async def test_a_whole_precopy_migration_copies_the_suspend_point(autojump_clock: Any) -> None:
    vm = FakeVM([20, 10, 5, 1, 0])
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, outcome, _ = await migrate(src, vm, dest, options())
    r = source.report
    assert r.status == "completed" and r.verified, r.error
    assert outcome is not None and outcome.completed, outcome
    assert [bytes(dest.data[i]) for i in range(2)] == suspend_point(src)  # invariant 2
    assert vm.suspends == 1 and vm.resumes == 0 and vm.finished
    assert len(r.rounds) >= 1 and r.downtime_ms is not None
    assert dest.states[0]["status"] == "incomplete" and dest.status == "complete"
    assert src.closed


async def test_rounds_send_the_dirty_pages_not_their_blocks(autojump_clock: Any) -> None:
    """Pages smaller than blocks: every round and the last set carry only the pages written
    (Pages frames, one block read back whole for its digest there), verified, and the
    destination equals the suspend point."""
    vm = FakeVM([20, 10, 5, 1, 0])
    src, dest = PagedSource(files(), vm), MemoryDest()
    source, _, _ = await migrate(src, vm, dest, options(policy=Policy(
        threshold_blocks=0, max_rounds=10)))
    r = source.report
    assert r.status == "completed" and r.verified, r.error
    assert [bytes(dest.data[i]) for i in range(2)] == suspend_point(src)
    assert (r.block_size, r.page_size) == (4 * BS, BS)
    assert r.rounds and all(0 < x.bytes <= x.dirty_pages * BS for x in r.rounds)  # not blocks
    assert r.pages_sent == sum(x.dirty_pages for x in r.rounds) + r.last_set_pages


async def test_a_lost_page_write_there_fails_verification(autojump_clock: Any) -> None:
    """The digest of a block that pages were written into is of the block as it is there:
    a page the destination did not write is found."""
    vm = FakeVM([20, 10, 5, 1, 0])
    src, dest = PagedSource(files(), vm), MemoryDest()
    real = dest.write
    dropped: list[int] = []

    def lossy(file_id: int, offset: int, data: Any) -> None:
        if len(data) == BS and not dropped and offset % (4 * BS):  # one page, mid-block
            dropped.append(offset)
            return
        real(file_id, offset, data)

    dest.write = lossy  # type: ignore[method-assign]
    source, _, _ = await migrate(src, vm, dest, options(policy=Policy(threshold_blocks=0,
                                                                      max_rounds=10)))
    assert dropped and not source.report.verified
    assert "VERIFICATION FAILED" in (source.report.error or "")


async def test_a_round_that_stalls_aborts_and_the_vm_runs_on(autojump_clock: Any) -> None:
    vm = FakeVM([30])  # as many dirty blocks every round: never converges
    src, dest = MemorySource(files(), vm), MemoryDest()
    opts = options(policy=Policy(threshold_blocks=0, max_rounds=20, on_stall=Verdict.ABORT))
    source, outcome, _ = await migrate(src, vm, dest, opts)
    assert source.report.status == "failed"
    assert "stopped shrinking" in (source.report.error or ""), source.report.error
    assert vm.running and vm.suspends == 0  # never suspended: it just runs on
    assert outcome is not None and not outcome.completed and "aborting as asked" in outcome.text
    assert dest.status == "incomplete"  # invariant 3


async def test_a_stall_with_switchover_policy_still_completes(autojump_clock: Any) -> None:
    vm = FakeVM([30])
    src, dest = MemorySource(files(), vm), MemoryDest()
    opts = options(policy=Policy(threshold_blocks=0, max_rounds=20, on_stall=OnStall.SWITCHOVER))
    source, outcome, _ = await migrate(src, vm, dest, opts)
    assert source.report.verified and "stopped shrinking" in source.report.switchover_reason
    assert "switched over anyway (--on-stall switchover), expected downtime" in (
        source.report.switchover_reason)
    assert outcome is not None and outcome.completed
    assert [bytes(dest.data[i]) for i in range(2)] == suspend_point(src)


async def test_destination_abort_reaches_the_source_which_resumes(autojump_clock: Any) -> None:
    vm = FakeVM([20, 10, 5, 0])
    src, dest = MemorySource(files(), vm), MemoryDest(fail_after_writes=1)
    source, outcome, _ = await migrate(src, vm, dest, options())
    err = source.report.error or ""
    assert source.report.status == "failed" and "destination disk full" in err, err
    assert vm.running and not vm.finished  # the VM ran on, never retired
    assert outcome is not None and not outcome.completed
    assert dest.status == "incomplete"


async def test_source_abort_at_suspend_resumes_nothing_and_marks_dest(
        autojump_clock: Any) -> None:
    vm = FakeVM([3, 0])
    vm.fail_suspend = "the hypervisor refused to stop"
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, outcome, _ = await migrate(src, vm, dest, options())
    assert "hypervisor refused" in (source.report.error or "")
    assert vm.running and not vm.finished
    assert outcome is not None and not outcome.completed
    assert "the peer aborted: the hypervisor refused to stop" in outcome.text
    assert dest.status == "incomplete"
    # The record said handing-off before the suspend; no Commit went out, so it is owner again,
    # at the generation it had.
    assert [(r.role, r.generation) for r in src.records.log][-2:] == [("handing-off", 0),
                                                                      ("owner", 0)]


async def test_a_peer_that_stops_talking_times_out_on_the_virtual_clock(
        autojump_clock: Any) -> None:
    async def silent(stream: trio.abc.Stream) -> None:
        ch = Channel(stream, "dest", KEY)
        await ch.handshake()
        await ch.expect(p.Manifest)
        while await stream.receive_some(1 << 16):  # alive, but says nothing more (a hung
            pass  # host); it goes when the source closes

    vm = FakeVM([0])
    src = MemorySource(files(), vm)
    with trio.move_on_after(3600) as cs:
        source, _, elapsed = await migrate(src, vm, MemoryDest(), options(io_timeout=60.0),
                                           peer=silent)
    assert not cs.cancelled_caught
    assert "nothing from the peer for 60 s" in (source.report.error or ""), source.report.error
    assert 60 <= elapsed < 61 and vm.running and vm.suspends == 0


async def test_a_peer_that_speaks_garbage_is_refused(autojump_clock: Any) -> None:
    async def garbage(stream: trio.abc.Stream) -> None:
        await stream.send_all(b"\xff" * 64)
        with trio.move_on_after(5):
            while await stream.receive_some(1 << 16):
                pass

    vm = FakeVM([0])
    source, _, _ = await migrate(MemorySource(files(), vm), vm, MemoryDest(), options(),
                                 peer=garbage)
    assert "bad peer" in (source.report.error or ""), source.report.error
    assert vm.running


async def test_a_destination_session_alone_refuses_a_wrong_key(autojump_clock: Any) -> None:
    left, right = trio.testing.memory_stream_pair()
    session = DestSession(MemoryDest(), Channel(right, "dest", KEY))

    async def stranger() -> None:
        ch = Channel(left, "source", b"x" * 32)
        with pytest.raises(MigrationError):
            await ch.handshake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stranger)
        with pytest.raises(MigrationError, match="shared key"):
            await session.run("memory")


class ZeroingVM(FakeVM):
    """Writes data into zero blocks, and zeroes blocks that held data (a guest freeing RAM)."""

    def write_one(self, buf: bytearray) -> int:
        b = self.rng.randrange(len(buf) // BS)
        zero = self.rng.random() < 0.5
        buf[b * BS:(b + 1) * BS] = bytes(BS) if zero else self.rng.randbytes(BS)
        return b


async def test_zero_blocks_travel_as_zero_runs_and_the_copy_is_exact(
        autojump_clock: Any) -> None:
    rng = random.Random(3)
    disk = b"".join(bytes(BS) if rng.random() < 0.6 else rng.randbytes(BS) for _ in range(64))
    mem = bytes(30 * BS) + rng.randbytes(BS) + bytes(BS // 2)  # and a short zero tail
    vm = ZeroingVM([12, 6, 3, 1, 0])
    src, dest = MemorySource({"disk.raw": disk, "vm.mem": mem}, vm), MemoryDest()
    source, outcome, _ = await migrate(src, vm, dest, options())
    r = source.report
    assert r.status == "completed" and r.verified, r.error  # zero blocks verified too
    assert [bytes(dest.data[i]) for i in range(2)] == suspend_point(src)
    assert r.bytes_by_kind["zero"] > 30 * BS and r.bytes_by_kind["normal"] < len(disk)
    assert r.bytes_sent < r.bytes_by_kind["normal"] + 64 * 1024  # zeros cost a few bytes
    assert outcome is not None and outcome.completed


async def test_the_report_splits_bytes_around_the_downtime_and_rates_each_round(
        autojump_clock: Any) -> None:
    """Item 5 of issue 11: bytes before / during / after the downtime add up to the bytes
    sent, the last set travels in the downtime, every round has the VM's dirty rate, and
    the status document says what query-migrate would."""
    from migrator.report import status_doc, status_line

    vm = FakeVM([20, 10, 5, 1, 0])
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, _, _ = await migrate(src, vm, dest, options())
    r = source.report
    assert r.status == "completed", r.error
    phase = r.bytes_by_phase
    assert sum(phase.values()) == r.bytes_sent
    assert phase["before_downtime"] > phase["during_downtime"] > 0  # the last set, Commit
    assert phase["after_downtime"] > 0  # verification
    assert r.rounds and all(x.dirty_rate_mb_s > 0 for x in r.rounds)
    assert r.dirty_rate_mb_s is not None  # the last swap's, the one that switched over
    assert r.blocks_per_s > 0
    doc = status_doc(source.progress, r, 2.0)
    assert doc["status"] == "completed" and doc["bytes_sent"] == r.bytes_sent
    assert doc["remaining_bytes"] == source.progress.pending * r.page_size
    assert r.migration in status_line(doc) and "downtime" in status_line(doc)


async def test_the_vm_starts_only_on_settled_writes(autojump_clock: Any) -> None:
    """The destination writes backing files directly; every write must be settled (the
    daemon told, the kernel's cache dropped) before the VM starts there."""
    vm = FakeVM([20, 10, 5, 1, 0])
    src, dest = MemorySource(files(), vm), MemoryDest()
    at_start: list[int] = []

    async def resume() -> None:
        at_start.append(dest.unsettled)

    source, _, _ = await migrate(src, vm, dest, options(), resume_hook=resume)
    assert source.report.status == "completed", source.report.error
    assert dest.writes and at_start == [0]


class SavingVM(FakeVM):
    """A hypervisor whose device state is saved after the stop, while the last set travels
    (the QEMU adapter's saved_state); `fail_save` makes that save fail."""

    def __init__(self, *args: Any, fail_save: str | None = None) -> None:
        super().__init__(*args)
        self.fail_save = fail_save
        self.saved_while_stopped: list[bool] = []

    def saved_state(self) -> bytes:
        self.saved_while_stopped.append(not self.running)
        if self.fail_save:
            raise AdapterError(self.fail_save)
        return b""  # (a destination without --resume qemu refuses a device state)


async def test_the_device_state_is_taken_after_the_last_set_and_its_failure_resumes(
        autojump_clock: Any) -> None:
    vm = SavingVM([20, 10, 5, 1, 0])
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, _, _ = await migrate(src, vm, dest, options())
    assert source.report.status == "completed", source.report.error
    assert vm.saved_while_stopped == [True]  # asked for once, after the stop

    vm = SavingVM([20, 10, 5, 1, 0], fail_save="QEMU migrate (device state) failed: boom")
    src, dest = MemorySource(files(), vm), MemoryDest()
    source, outcome, _ = await migrate(src, vm, dest, options())
    assert source.report.status == "failed" and "boom" in (source.report.error or "")
    assert vm.running and vm.resumes == 1 and not vm.finished  # before the Commit: it runs on
    assert outcome is not None and not outcome.completed


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
async def test_compressed_blocks_arrive_exact_and_random_ones_go_as_they_are(
        autojump_clock: Any, codec: str) -> None:
    text = b"".join(b"log %06d: the guest is fine\n" % i for i in range(40000))
    data = {"disk.raw": text[: 64 * BS + 123], "vm.mem": random.Random(3).randbytes(32 * BS)}
    vm = FakeVM([20, 10, 5, 1, 0])
    src, dest = MemorySource(data, vm), MemoryDest()
    source, _, _ = await migrate(src, vm, dest, options(compress=codec))
    r = source.report
    assert r.status == "completed" and r.verified, r.error
    assert [bytes(dest.data[i]) for i in range(2)] == suspend_point(src)
    assert r.bytes_by_kind["compressed"] >= 60 * BS  # the text went compressed ...
    assert r.bytes_by_kind["normal"] >= 32 * BS  # ... the random memory as it was
    assert r.bytes_sent < r.data_bytes * 0.75


async def test_past_the_limit_the_oldest_stranger_is_dropped() -> None:
    """Handshakes in progress are bounded: a new connection evicts the oldest one that has
    not proved the key, so idle strangers can neither pile up nor keep a real source out."""
    from migrator.serving import Handshakes

    hs = Handshakes(limit=2)
    dropped: list[int] = []

    async def stranger(i: int, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with hs.admit() as scope:
            task_status.started()
            await trio.sleep_forever()
        if scope.cancelled_caught:
            dropped.append(i)

    async with trio.open_nursery() as n:
        for i in range(4):
            await n.start(stranger, i)
        await trio.testing.wait_all_tasks_blocked()
        assert dropped == [0, 1] and hs.dropped == 2 and len(hs.pending) == 2
        n.cancel_scope.cancel()
    assert not hs.pending


async def test_an_older_copy_on_the_destination_is_sent_only_where_it_differs(
        autojump_clock: Any) -> None:
    """The retired copy of an A -> B -> A migration: the destination says what it holds
    (Held), the source sends the blocks that differ, and the verification covers them all."""
    vm = FakeVM([4, 2, 1, 0])
    mine = files()
    older = {name: bytearray(data) for name, data in mine.items()}
    for b in (3, 17, 40):
        older["disk.raw"][b * BS] ^= 1
    older["vm.mem"] = older["vm.mem"][: 20 * BS]  # and a file that grew since
    src = MemorySource(mine, vm)
    dest = MemoryDest(holds={n: bytes(d) for n, d in older.items()})
    source, _, _ = await migrate(src, vm, dest, options())
    r = source.report
    assert r.status == "completed" and r.verified, r.error
    assert [bytes(dest.data[i]) for i in range(2)] == suspend_point(src)
    assert r.delta == "digests" and r.held_blocks == 65 + 32  # at the new sizes
    assert r.bytes_by_kind["held"] >= (65 + 20 - 3 - 7) * BS - 123  # but 3 + 7 dirtied
    normal = r.bytes_by_kind.get("normal", 0)
    assert normal <= (3 + 12 + 7) * BS + 123, normal  # flipped, grown, dirtied by the VM
    assert 0 < r.held_digest_bytes < (65 + 32) * 8 + 200


async def test_without_delta_everything_travels(autojump_clock: Any) -> None:
    vm = FakeVM([2, 0])
    src = MemorySource(files(), vm)
    dest = MemoryDest(holds=files())
    source, _, _ = await migrate(src, vm, dest, options(delta=False))
    r = source.report
    assert r.status == "completed" and r.verified and r.delta == "none"
    assert "held" not in r.bytes_by_kind and r.bytes_by_kind["normal"] >= 96 * BS


