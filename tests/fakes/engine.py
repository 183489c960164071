"""Fakes of the world the migration engine reaches through its seams (stores.SourceFiles,
stores.DestFiles, vmrecords.VMRecords, the VM adapter, the worker thread), and the helper
that runs a whole migration in memory: tests/test_engine.py and the histories, handoff and
sync tests build on them (trio's autojump clock: no FUSE, no sockets, no real waiting)."""

from __future__ import annotations

import copy
import random
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio.testing

from migrator import protocol as p
from migrator.delta import file_digests
from migrator.dest import SessionOutcome
from migrator.options import MigrateOptions, SourceHooks
from migrator.ownership import VMRecord
from migrator.plan import Policy
from migrator.serving import ServeOptions, Sessions, serve_one
from migrator.source import Source
from migrator.transport import MigrationError
from migrator.vm import AdapterError

BS = 4096
KEY = b"k" * 32


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    """No worker threads: the autojump clock would jump while one runs."""
    return fn(*args)


class FakeVM:
    """A VM adapter whose writes land in a MemorySource at each flush while it runs."""

    name = "fake"
    flush_before_suspend = False

    def __init__(self, writes_per_flush: list[int], seed: int = 1) -> None:
        self.plan = list(writes_per_flush)  # writes at the 1st, 2nd, ... flush; then the last
        self.rng = random.Random(seed)
        self.running = True
        self.suspends = self.resumes = 0
        self.finished = False
        self.fail_suspend: str | None = None
        self.slowed = 0  # % of its time auto-converge takes away (FakeThrottle)
        self.events: list[str] = []  # suspend, resume, throttle N, unthrottle: in order

    def suspend(self) -> None:
        if self.fail_suspend:
            raise AdapterError(self.fail_suspend)
        self.running = False
        self.suspends += 1
        self.events.append("suspend")

    def resume(self) -> None:
        self.running = True
        self.resumes += 1
        self.events.append("resume")

    def finish(self) -> str:
        self.finished = True
        return "fake VM retired"

    def write_some(self, src: MemorySource) -> None:
        if not self.running:
            return
        n = self.plan.pop(0) if len(self.plan) > 1 else self.plan[0]
        n = n * (100 - self.slowed) // 100  # auto-converge: a slowed VM writes less
        for _ in range(n):
            fid = self.rng.randrange(len(src.data))
            src.dirty[fid].add(self.write_one(src.data[fid]))

    def write_one(self, buf: bytearray) -> int:
        """One write of the guest into `buf`; returns the block it touched."""
        off = self.rng.randrange(len(buf) // BS) * BS + self.rng.randrange(BS - 8)
        buf[off:off + 8] = self.rng.randbytes(8)
        return off // BS


class ThrottledVM(FakeVM):
    """A FakeVM auto-converge can slow (a process with a pid, as pid: and qemu: are)."""

    throttle_pid = 4242


class FakeThrottle:
    """rounds.Throttler over a FakeVM: a level slows its writes by as much."""

    def __init__(self, vm: FakeVM) -> None:
        self.vm = vm
        self.level = 0
        self.closed = False

    async def set(self, level: int) -> None:
        self.level = self.vm.slowed = level
        self.vm.events.append(f"throttle {level}")

    async def aclose(self) -> None:
        self.level = self.vm.slowed = 0
        self.closed = True
        self.vm.events.append("unthrottle")


class MemoryRecords:
    """VMRecords in memory (one host's): every record written is kept, in order, in `log`."""

    def __init__(self) -> None:
        self.recs: dict[str, dict[str, Any]] = {}
        self.log: list[VMRecord] = []
        self.syncs: dict[str, dict[str, Any]] = {}
        self.digests: dict[str, bytes] = {}

    def all(self) -> list[VMRecord]:
        return [r for r in (VMRecord.from_dict(d) for d in self.recs.values()) if r]

    def get(self, vm: str) -> VMRecord | None:
        d = self.recs.get(vm)
        return VMRecord.from_dict(d) if d else None

    def put(self, rec: VMRecord) -> None:
        self.recs[rec.id] = copy.deepcopy(rec.to_dict())
        self.log.append(copy.deepcopy(rec))

    def drop(self, vm: str) -> None:
        self.recs.pop(vm, None)
        self.syncs.pop(vm, None)
        self.digests.pop(vm, None)

    def read_sync(self, vm: str) -> dict[str, Any] | None:
        return self.syncs.get(vm)

    def write_sync(self, vm: str, record: dict[str, Any]) -> None:
        self.syncs[vm] = dict(record)

    def read_digests(self, vm: str) -> bytes | None:
        return self.digests.get(vm)

    def write_digests(self, vm: str, data: bytes) -> None:
        self.digests[vm] = data

    def close(self) -> None:
        pass

    @property
    def last(self) -> VMRecord | None:
        return self.log[-1] if self.log else None


class MemorySource:
    """SourceFiles in memory: bytes, a dirty set per file (swap empties it), no heat."""

    block_size = BS
    page_size = BS  # (pages are blocks here)
    writeback = False

    def __init__(self, files: dict[str, bytes], vm: FakeVM,
                 records: MemoryRecords | None = None) -> None:
        self.names = list(files)
        self.data = [bytearray(b) for b in files.values()]
        self.dirty: list[set[int]] = [set(range(-(-len(b) // BS))) for b in self.data]
        self.vm = vm
        self.closed = False
        self.records = records if records is not None else MemoryRecords()
        self.epochs = [0] * len(self.data)  # blkfs epochs: a swap ends one
        self.ended: dict[int, int] = {}
        self.trust = True
        self.file_attrs: tuple[p.FileAttrs, ...] = ()  # what attrs() says (none by default)

    def size(self, file_id: int) -> int:
        return len(self.data[file_id])

    def attrs(self) -> tuple[p.FileAttrs, ...]:
        return self.file_attrs

    def allocated(self, file_id: int) -> int:
        return len(self.data[file_id])  # (dense)

    def read(self, file_id: int, offset: int, length: int) -> bytes:
        return bytes(self.data[file_id][offset:offset + length])

    def read_into(self, file_id: int, offset: int, buf: memoryview) -> int:
        data = self.read(file_id, offset, len(buf))
        buf[:len(data)] = data
        return len(data)

    def data_ranges(self, file_id: int, start: int, end: int) -> list[tuple[int, int]]:
        return [(start, end)]

    async def swap(self, file_id: int) -> list[tuple[int, int]]:
        blocks, self.dirty[file_id] = sorted(self.dirty[file_id]), set()
        self.ended[file_id] = self.epochs[file_id]
        self.epochs[file_id] += 1
        return [(b, 1) for b in blocks]

    async def swap_all(self, file_ids: list[int]) -> dict[int, list[tuple[int, int]]]:
        return {fid: await self.swap(fid) for fid in file_ids}

    def last_epoch(self, file_id: int) -> int | None:
        return self.ended.get(file_id)

    async def trust_lost(self) -> bool:
        return not self.trust

    async def clear(self, file_id: int, extents: list[tuple[int, int]]) -> None:
        for first, count in extents:
            self.dirty[file_id] -= set(range(first, first + count))

    async def heat(self, file_id: int, static_heat: float | None
                   ) -> tuple[tuple[Any, ...], float]:
        return (), 1.0

    async def flush(self) -> None:
        await trio.sleep(0.05)  # (time passes on the autojump clock: a timeout can come)
        self.vm.write_some(self)

    async def claim(self, migration: str, holder: str) -> None:
        pass

    @property
    def sync_record(self) -> dict[str, Any] | None:
        last = self.records.last
        return self.records.read_sync(last.id) if last is not None else None

    @property
    def state(self) -> str | None:
        """The role of this host's record of the VM (the last one written)."""
        last = self.records.last
        return last.role if last is not None else None

    def close(self) -> None:
        self.closed = True


class PagedSource(MemorySource):
    """A MemorySource whose blocks are four of its pages (BS): the dirty sets are pages, as a
    blkfs mount's under 64 KiB blocks; heat, the copy and clear go by block."""

    block_size = 4 * BS
    page_size = BS

    async def clear(self, file_id: int, extents: list[tuple[int, int]]) -> None:
        await super().clear(file_id, [(first * 4, count * 4) for first, count in extents])


class MemoryDest:
    """DestFiles in memory; `fail_after_writes` makes a write fail like a full disk."""

    mount = "/nonexistent-dest"
    force = False

    def __init__(self, fail_after_writes: int | None = None,
                 holds: dict[str, bytes] | None = None,
                 records: MemoryRecords | None = None) -> None:
        self.records = records if records is not None else MemoryRecords()
        self.holds = holds or {}  # older copies of files, by name, there before the migration
        self.data: dict[int, bytearray] = {}
        self.names: dict[int, str] = {}
        self.writes = 0
        self.unsettled = 0  # writes the mount does not show yet (MountDest.settle)
        self.fail_after_writes = fail_after_writes
        self.reattached: str | None = None
        self.own: dict[str, tuple[int, set[int]]] = {}  # name -> this mount's (epoch, dirty)
        self.attrs: dict[int, p.FileAttrs] = {}  # Commit.attrs, by file id

    async def prepare(self, manifest: p.Manifest, holder: str) -> None:
        pass

    async def reattach(self, manifest: p.Manifest, holder: str, postcopy: str | None) -> None:
        self.reattached = holder

    async def postcopy_absent(self) -> int:
        return 0

    def set_attrs(self, attrs: tuple[p.FileAttrs, ...]) -> list[str]:
        self.attrs = {a.file_id: a for a in attrs}
        return []

    def create(self, manifest: p.Manifest) -> None:
        for f in manifest.files:
            old = self.holds.get(f.name, b"")[:f.size]
            self.data[f.file_id] = bytearray(old + bytes(f.size - len(old)))
            self.names[f.file_id] = f.name

    def write(self, file_id: int, offset: int, data: bytes) -> None:
        if self.fail_after_writes is not None and self.writes >= self.fail_after_writes:
            raise MigrationError(f"destination disk full writing {self.names[file_id]}")
        self.writes += 1
        self.unsettled += 1
        buf = self.data[file_id]
        buf[offset:offset + len(data)] = data
        self.mark(self.names[file_id], offset, len(data))

    def read(self, file_id: int, offset: int, length: int) -> bytes:
        return bytes(self.data[file_id][offset:offset + length])

    def mark(self, name: str, offset: int, length: int) -> None:
        """A write through this mount, as its blkfs tracks it."""
        _, dirty = self.own.setdefault(name, (0, set()))
        dirty.update(range(offset // BS, -(-(offset + length) // BS)))

    async def own_swap(self, name: str) -> tuple[int, list[tuple[int, int]]] | None:
        if name not in self.own and name not in self.names.values():
            return None
        epoch, dirty = self.own.get(name, (0, set()))
        self.own[name] = (epoch + 1, set())
        return epoch, [(b, 1) for b in sorted(dirty)]

    async def settle(self, only_if_many: bool = False) -> None:
        if not only_if_many:
            self.unsettled = 0

    def fresh(self, file_id: int) -> bool:
        return self.names[file_id] not in self.holds

    def held(self, file_id: int, block_size: int, first: int, count: int) -> list[int] | None:
        if self.fresh(file_id):
            return None
        data = bytes(self.data[file_id])
        return file_digests(lambda off, n: data[off:off + n], [(0, len(data))], len(data),
                            block_size, first, count)

    def held_holes(self, file_id: int, block_size: int, least: int) -> list[tuple[int, int]]:
        return []  # (dense)

    async def zero(self, file_id: int, offset: int, length: int) -> None:
        self.write(file_id, offset, bytes(length))

    def resize(self, file_id: int, size: int) -> None:
        buf = self.data[file_id]
        del buf[size:]
        buf.extend(bytes(size - len(buf)))

    async def sync(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    @property
    def digest_log(self) -> bytes | None:
        last = self.records.last
        return self.records.read_digests(last.id) if last is not None else None

    @digest_log.setter
    def digest_log(self, value: None) -> None:
        self.records.digests.clear()

    @property
    def states(self) -> list[dict[str, Any]]:
        """The incoming session's state, as each record write left it (with the role)."""
        return [{**(r.dest_record.to_dict() if r.dest_record else {}), "role": r.role,
                 "owner": r.role == "owner", "generation": r.generation}
                for r in self.records.log]

    @property
    def status(self) -> str | None:
        last = self.records.last
        if last is None or last.dest_record is None:
            return None
        return last.dest_record.status


def files(seed: int = 7) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"disk.raw": rng.randbytes(64 * BS + 123), "vm.mem": rng.randbytes(32 * BS)}


def options(**kw: Any) -> MigrateOptions:
    kw.setdefault("policy", Policy(threshold_blocks=2, max_rounds=10))
    return MigrateOptions(mount="/nonexistent-src", to="memory", key=KEY, files=[], **kw)


async def migrate(src: MemorySource, vm: FakeVM, dest: MemoryDest, opts: MigrateOptions,
                  *, peer: Callable[[trio.abc.Stream], Awaitable[Any]] | None = None,
                  resume_hook: Callable[[], Awaitable[None]] | None = None,
                  wrap: Callable[[trio.abc.Stream], trio.abc.Stream] | None = None,
                  notify: Callable[[str], None] = lambda text: None,
                  throttle: Callable[[int], Any] | None = None,
                  steer: Callable[[Source], Awaitable[None]] | None = None,
                  ) -> tuple[Source, SessionOutcome | None, float]:
    """Run both ends; returns the source (its report), the destination's outcome and the
    migration's time on the (virtual) clock. `wrap` wraps the source's end of the link;
    `steer` runs beside the migration (as its control socket's requests would), cancelled
    when it ends."""
    left, right = trio.testing.memory_stream_pair()
    link = wrap(left) if wrap is not None else left
    source = Source(opts, vm, SourceHooks(open_files=lambda o: src,
                                          connect=lambda o: _ready(link), run_sync=inline,
                                          throttle=throttle or (lambda pid: FakeThrottle(vm)),
                                          notify=notify))
    outcome: list[SessionOutcome] = []
    sopts = ServeOptions(mount=dest.mount, key=KEY, io_timeout=opts.io_timeout,
                         open_files=lambda mount, force: dest, resume_hook=resume_hook,
                         plaintext=opts.plaintext)

    async def destination() -> None:
        if peer is not None:
            await peer(right)
        else:
            outcome.append(await serve_one(right, sopts, Sessions(), "memory"))

    t0 = trio.current_time()
    steering = trio.CancelScope()

    async def steered() -> None:
        with steering:
            assert steer is not None
            await steer(source)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(destination)
        if steer is not None:
            nursery.start_soon(steered)
        try:
            await source.run()
        except* (MigrationError, AdapterError, p.ProtocolError):
            pass  # the report says it: source.report.error (a send's inside a nursery's group)
        finally:
            steering.cancel()
    return source, (outcome[0] if outcome else None), trio.current_time() - t0


async def _ready(stream: trio.abc.Stream) -> trio.abc.Stream:
    return stream


def suspend_point(src: MemorySource) -> list[bytes]:
    return [bytes(b) for b in src.data]
