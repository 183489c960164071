"""migrator sync in process: a Syncer against DestSessions over in-memory streams, files in
memory, on trio's autojump clock (tests/test_engine.py has the fakes)."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from migrator.dest import SessionOutcome
from migrator.errors import MigrationError, first_error
from migrator.options import SourceHooks
from migrator.serving import ServeOptions, Sessions, serve_one
from migrator.sync import Syncer, sync_options

from .fakes.engine import BS, KEY, FakeVM, MemoryDest, MemorySource, files, inline, migrate, options


class Cut(trio.abc.Stream):
    """A stream that breaks (like a pulled cable) once `after` bytes went through it."""

    def __init__(self, inner: trio.abc.Stream, after: int) -> None:
        self.inner, self.left = inner, after

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) > self.left:
            await self.inner.aclose()
            raise trio.BrokenResourceError("cut")
        self.left -= len(data)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


class LastingDest(MemoryDest):
    """A MemoryDest whose files outlive a session, as a mount's do: the next session finds
    them there (an older copy it says it holds)."""

    def create(self, manifest: Any) -> None:
        for f in manifest.files:
            old = next((bytes(self.data[i]) for i, n in self.names.items() if n == f.name), b"")
            if old:
                self.holds[f.name] = old
        super().create(manifest)


class Lab:
    """A sync against a destination that serves every connection it makes."""

    def __init__(self, src: MemorySource, dest: MemoryDest, cut_first_after: int | None = None,
                 **kw: Any) -> None:
        self.dest = dest
        self.outcomes: list[SessionOutcome] = []
        self.sessions = Sessions()
        self.cut = cut_first_after
        self.nursery: trio.Nursery | None = None
        lag = kw.pop("lag", 2.0)
        self.syncer = Syncer(sync_options("/nonexistent-src", "memory", KEY, [], **kw), lag,
                             SourceHooks(open_files=lambda o: src, connect=self.connect,
                                         run_sync=inline))

    async def connect(self, opts: Any) -> trio.abc.Stream:
        left, right = trio.testing.memory_stream_pair()
        sopts = ServeOptions(mount=self.dest.mount, key=KEY,
                             open_files=lambda mount, force: self.dest)

        async def one() -> None:
            self.outcomes.append(await serve_one(right, sopts, self.sessions, "memory"))

        assert self.nursery is not None
        self.nursery.start_soon(one)
        if self.cut is not None:
            cut, self.cut = self.cut, None
            return Cut(left, cut)
        return left

    async def run_for(self, seconds: float) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            with trio.move_on_after(seconds):
                try:
                    await self.syncer.run()
                except BaseException as exc:
                    if not isinstance(first_error(exc), MigrationError):
                        raise
                    # the report says it
            await trio.sleep(1)  # the destination hears the Abort and ends its session


async def test_a_sync_keeps_a_replica_that_is_never_runnable(autojump_clock: Any) -> None:
    vm = FakeVM([20, 10, 5, 3, 0])  # then quiet: the last epochs must equal the source
    src, dest = MemorySource(files(), vm), MemoryDest()
    lab = Lab(src, dest)
    await lab.run_for(20)
    s = lab.syncer.sync
    assert s.status == "stopped" and s.error is None, s
    assert s.epochs >= 6 and s.epoch == s.epochs - 1 and s.sessions == 1, s
    assert vm.suspends == 0 and vm.resumes == 0 and not vm.finished  # never touched
    # the VM's record here says owner from the start (a new VM), and nothing changes it: the
    # VM stays the source's
    assert [(r.role, r.generation) for r in src.records.log] == [("owner", 0)]
    st = dest.states[-1]
    assert st["status"] == "replica" and not st["owner"], st
    assert st["replica"]["sync_round"] == s.epoch and st["migration"] == s.sync
    assert st["stopped_at"] and st["stopped"] == "the sync stopped"
    assert all(x["status"] == "replica" and not x["owner"] for x in dest.states)
    assert [bytes(dest.data[i]) for i in range(2)] == [bytes(b) for b in src.data]
    assert lab.outcomes and "stopped: the replica here holds every write up to its epoch" in (
        lab.outcomes[0].text), lab.outcomes
    assert s.rounds[-1].pages == 0 and s.lag_max_s >= 0


async def test_each_epoch_is_durable_before_it_is_acknowledged(autojump_clock: Any) -> None:
    """The replica's record names an epoch only after a sync of the files (RoundAck follows)."""
    vm = FakeVM([5])
    src, dest = MemorySource(files(), vm), MemoryDest()
    order: list[str] = []
    sync, put = dest.sync, dest.records.put

    async def synced() -> None:
        order.append("sync")
        await sync()

    def state(rec: Any) -> None:
        rep = rec.dest_record.replica if rec.dest_record else None
        order.append(f"epoch {rep.sync_round if rep else None}")
        put(rec)

    dest.sync, dest.records.put = synced, state  # type: ignore[method-assign]
    lab = Lab(src, dest)
    await lab.run_for(5)
    first = [order.index(x) for x in dict.fromkeys(order) if x.startswith("epoch ")
             and x != "epoch None"]  # where each epoch is named first
    assert len(first) >= 3 and all(order[i - 1] == "sync" for i in first), order


async def test_a_cut_link_is_retried_and_the_epochs_go_on(autojump_clock: Any) -> None:
    vm = FakeVM([10, 5, 0])
    src, dest = MemorySource(files(), vm), LastingDest()
    lab = Lab(src, dest, cut_first_after=150_000)  # inside the initial copy (~390 KB)
    await lab.run_for(30)
    s = lab.syncer.sync
    assert s.status == "stopped" and s.sessions == 2, s
    assert s.held_blocks > 0, s  # the second session found the first one's blocks there
    assert dest.states[-1]["replica"]["sync_round"] == s.epoch
    assert [bytes(dest.data[i]) for i in range(2)] == [bytes(b) for b in src.data]
    assert "cut" in lab.outcomes[0].text and "no whole epoch yet" in lab.outcomes[0].text


async def test_a_destination_that_refuses_ends_the_sync_with_its_reason(
        autojump_clock: Any) -> None:
    vm = FakeVM([3])
    src, dest = MemorySource(files(), vm), MemoryDest(fail_after_writes=2)
    lab = Lab(src, dest)
    await lab.run_for(10)
    s = lab.syncer.sync
    assert s.status == "failed" and "destination disk full" in (s.error or ""), s
    assert s.sessions == 1  # a refusal is not retried: a person must look
    assert dest.states[-1]["status"] == "replica"


def test_blkfs_status_names_a_replica_never_a_vm() -> None:
    from blkfs.cli import VM_RECORDS, vm_line
    from migrator.vmrecords import VMS

    assert VM_RECORDS == VMS  # blkfs reads the records migrator writes
    rec = {"name": "web", "role": "replica", "generation": 2, "peer": "a:1",
           "dest_record": {"migration": "s1", "status": "replica",
                           "replica": {"sync_round": 7, "synced_at": 100.0}}}
    line = vm_line(rec, 130.0)
    assert "REPLICA, NOT RUNNABLE" in line and "epoch 7" in line and "30 s ago" in line
    assert "syncing" in line
    rec["dest_record"]["stopped_at"] = 131.0  # type: ignore[index]
    rec["dest_record"]["replica"] = {"sync_round": None, "synced_at": None}  # type: ignore[index]
    assert "no whole epoch yet" in vm_line(rec, 140.0) and "stopped" in vm_line(rec, 140.0)
    assert "this host's" in vm_line({"name": "m", "role": "owner", "generation": 1}, 0)
    assert "NOT RUNNABLE" in vm_line({"name": "m", "role": "incomplete", "generation": 1}, 0)
    assert "runs at b:2" in vm_line({"name": "m", "role": "retired", "peer": "b:2"}, 0)
    assert "SPLIT BRAIN" in vm_line({"name": "m", "role": "owner", "split_brain": {
        "peer": "b:2", "generation": 3}}, 0)


# -- lineage: a migration from the replica reads and sends only what changed since ----------


async def synced(writes: list[int]) -> tuple[MemorySource, FakeVM, LastingDest, Lab]:
    vm = FakeVM(writes)
    src, dest = MemorySource(files(), vm), LastingDest()
    lab = Lab(src, dest)
    await lab.run_for(10)
    assert lab.syncer.sync.status == "stopped" and src.sync_record is not None
    return src, vm, dest, lab


async def test_a_migration_from_a_synced_replica_sends_only_the_change(
        autojump_clock: Any) -> None:
    src, vm, dest, lab = await synced([6, 3, 0])
    tag = src.sync_record["tag"]  # type: ignore[index]
    assert tag == f"{lab.syncer.sync.sync}@{lab.syncer.sync.epoch}"
    vm.plan = [4, 2, 0]  # the VM writes on: 4 + 2 blocks (at the flush) before the first swap
    vm.write_some(src)
    source, outcome, _ = await migrate(src, vm, dest, options())
    r = source.report
    assert r.status == "completed" and r.verified, r.error
    assert r.delta == "lineage" and r.lineage_files == ["disk.raw", "vm.mem"], r
    nblocks = sum(-(-len(b) // BS) for b in src.data)
    assert r.lineage_blocks >= nblocks - 6 and r.held_digest_bytes == 0, r
    assert r.blocks_sent <= 6, r.blocks_sent  # those 6, then nothing (the VM went quiet)
    assert [bytes(dest.data[i]) for i in range(2)] == [bytes(b) for b in src.data]
    assert outcome is not None and outcome.completed


async def test_a_replica_written_after_its_sync_goes_the_digest_way(autojump_clock: Any) -> None:
    src, vm, dest, _ = await synced([6, 0])
    fid = next(i for i, n in dest.names.items() if n == "disk.raw")
    dest.data[fid][5 * BS:5 * BS + 3] = b"bad"  # someone wrote the replica through its mount
    dest.mark("disk.raw", 5 * BS, 3)
    source, _, _ = await migrate(src, vm, dest, options())
    r = source.report
    assert r.verified and r.lineage_files == ["vm.mem"] and "digests" in r.delta, r
    assert "disk.raw: written here since the sync" in r.lineage_detail, r.lineage_detail
    assert [bytes(dest.data[i]) for i in range(2)] == [bytes(b) for b in src.data]


async def test_a_swap_between_the_sync_and_the_migration_breaks_the_lineage(
        autojump_clock: Any) -> None:
    """Another swap took a dirty set the migration would never see: never trusted."""
    src, vm, dest, _ = await synced([6, 0])
    await src.swap(0)
    vm.write_some(src)
    source, _, _ = await migrate(src, vm, dest, options())
    r = source.report
    assert r.verified and r.lineage_files == ["vm.mem"], r
    assert "disk.raw: its blkfs epoch moved on since the sync" in r.lineage_detail


async def test_without_the_replica_s_digest_log_nothing_is_trusted(autojump_clock: Any) -> None:
    src, vm, dest, _ = await synced([6, 0])
    dest.digest_log = None  # the serve died before the sync stopped
    source, _, _ = await migrate(src, vm, dest, options())
    r = source.report
    assert r.verified and r.delta == "digests" and not r.lineage_files, r
    assert "digest log is missing" in r.lineage_detail


async def test_lineage_is_refused_when_blkfs_lost_track_of_a_write(autojump_clock: Any) -> None:
    src, vm, dest, _ = await synced([6, 0])
    src.trust = False
    source, _, _ = await migrate(src, vm, dest, options())
    assert source.report.verified and source.report.delta == "digests"
    assert "trust lost" in source.report.lineage_detail


async def test_a_restarted_sync_starts_from_its_own_replica(autojump_clock: Any) -> None:
    src, _, dest, lab = await synced([6, 0])
    first = lab.syncer.sync.epoch
    lab2 = Lab(src, dest)
    await lab2.run_for(10)
    s = lab2.syncer.sync
    assert s.status == "stopped" and s.delta == "lineage" and s.lineage_blocks > 0, s
    assert s.rounds[0].pages == 0  # nothing changed: nothing read, nothing sent
    assert dest.states[-1]["replica"]["sync_round"] == s.epoch and first is not None


async def test_a_stop_in_mid_round_waits_for_its_acknowledgement(autojump_clock: Any) -> None:
    """SIGTERM while a round flows: it is finished first, so the replica stays at a whole
    epoch both sides can prove, and the migration that follows uses it."""
    vm = FakeVM([6, 3, 3, 3])  # a round always has something to send

    class StopsMidRound(LastingDest):
        def write(self, file_id: int, offset: int, data: bytes) -> None:
            super().write(file_id, offset, data)
            sy = lab.syncer
            if sy.in_round and not sy.stopping and (sy.sync.epoch or 0) >= 2:
                sy.stop()  # (as the CLI does on the first SIGTERM)

    src, dest = MemorySource(files(), vm), StopsMidRound()
    lab = Lab(src, dest)
    await lab.run_for(60)
    s = lab.syncer.sync
    assert s.status == "stopped" and s.epoch == 3 and s.rounds[-1].pages > 0, (
        s.epoch, s.rounds)
    assert dest.states[-1]["replica"]["sync_round"] == 3 and dest.digest_log is not None
    vm.plan = [0]
    source, _, _ = await migrate(src, vm, dest, options())
    assert source.report.delta == "lineage" and source.report.verified, source.report
