"""The spill area on disk (SpillArea): a real slot directory, reused slots, late readers.

tests/test_spill.py holds the pure rules (headers, allocator, checked_read); this
file drives the plain-file I/O around them.  The stateful test plays the source
(SlotAllocator + SpillArea.put/mark_free), the destination (installs told pages
and frees their slots), late readers holding stale references, disk corruption
and a writer caught between its two header writes, and checks invariant 4 on
every read: a read is used only with the slot's current generation, returns
exactly the page put under that reference, and never a corrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from blkfs.spill import (
    FLAG_FILLED,
    FLAG_FREE,
    HEADER_SIZE,
    HEADERS_NAME,
    MANIFEST_NAME,
    SLOTS_NAME,
    Refused,
    SlotAllocator,
    SlotHeader,
    SlotRef,
    SpillArea,
    SpillError,
    spill_key,
)

BS = 4096
MIGRATION = "m-1"


def key_of(migration: str) -> bytes:
    return spill_key(b"t" * 32, migration)


def page(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)



def used(got: bytes | Refused) -> bytes | None:
    return None if isinstance(got, Refused) else got


@dataclass(frozen=True)
class Told:
    """What the destination was told: a reference and the page the source put under it."""

    ref: SlotRef
    file_id: int
    block: int
    data: bytes
    header: SlotHeader


file_ids = st.integers(0, 2)  # few files and blocks: reused slots often hold the same block
blocks = st.integers(0, 3)
lengths = st.one_of(st.just(BS), st.integers(0, BS))
seeds = st.integers(0, 2**32 - 1)


class SpillAreaMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir: str | None = None
        self.area: SpillArea | None = None
        self.reader: SpillArea | None = None

    @initialize(nslots=st.integers(1, 4))
    def setup(self, nslots: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="spill-test-")
        self.nslots = nslots
        self.area = SpillArea.create(self.dir, MIGRATION, BS, nslots, {0: "a", 1: "b", 2: "c"},
                                     key_of(MIGRATION))
        self.reader = SpillArea.open(self.dir, MIGRATION, key_of(MIGRATION))  # the destination
        self.alloc = SlotAllocator(nslots)
        self.told: list[Told] = []  # every reference ever handed out, stale ones included
        self.current: dict[int, Told] = {}  # slot -> the page its current generation holds
        self.live: dict[int, Told] = {}  # told, not installed yet (slot not on the free list)
        self.pending: dict[int, tuple[SlotRef, int, int, bytes]] = {}  # being written
        self.freed: set[int] = set()  # released, not reallocated
        self.corrupted: set[tuple[int, int]] = set()  # (slot, generation) with bad data
        self.hfd = os.open(os.path.join(self.dir, HEADERS_NAME), os.O_RDWR)
        self.sfd = os.open(os.path.join(self.dir, SLOTS_NAME), os.O_RDWR)

    def teardown(self) -> None:
        for a in (self.area, self.reader):
            if a is not None:
                a.close()
        if self.dir is not None:
            os.close(self.hfd)
            os.close(self.sfd)
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- model ------------------------------------------------------------------------

    def expected(self, t: Told) -> bytes | None:
        slot, gen = t.ref.slot, t.ref.generation
        if slot in self.pending or self.alloc.generations[slot] != gen:
            return None  # reallocated since (or being rewritten): never performed
        if (slot, gen) in self.corrupted:
            return None
        return t.data

    def check_read(self, t: Told) -> bytes | None:
        """The page served for `t`, or None if the read was refused."""
        assert self.reader is not None
        got = used(self.reader.read(t.ref, t.file_id, t.block))
        want = self.expected(t)
        if got is not None:
            # whatever happens, a page that is served is the one put under this ref
            assert got == t.data, f"{t.ref} served another page ({len(got)} bytes)"
        assert got == want, f"{t.ref}: got {got is not None}, expected {want is not None}"
        # the same slot asked for another page (file or block) is always refused
        assert isinstance(self.reader.read(t.ref, t.file_id, t.block + 1), Refused)
        assert isinstance(self.reader.read(t.ref, t.file_id + 1, t.block), Refused)
        return got

    def allocate(self) -> SlotRef | None:
        ref = self.alloc.allocate()
        if ref is None:
            assert len(self.live) + len(self.pending) == self.nslots
            assert not self.freed
            return None
        assert ref.slot not in self.live and ref.slot not in self.pending
        self.freed.discard(ref.slot)
        self.current.pop(ref.slot, None)
        return ref

    def record(self, ref: SlotRef, file_id: int, block: int, data: bytes,
               h: SlotHeader) -> None:
        assert (h.generation, h.length, h.flags) == (ref.generation, len(data), FLAG_FILLED)
        t = Told(ref, file_id, block, data, h)
        self.told.append(t)
        self.current[ref.slot] = t
        self.live[ref.slot] = t
        assert self.check_read(t) == data  # just written: readable at once

    # -- source -----------------------------------------------------------------------

    @rule(file_id=file_ids, block=blocks, seed=seeds, length=lengths)
    def put(self, file_id: int, block: int, seed: int, length: int) -> None:
        ref = self.allocate()
        if ref is None:
            return
        assert self.area is not None
        data = page(seed, length)
        self.record(ref, file_id, block, data, self.area.put(ref, file_id, block, data))

    @rule(file_id=file_ids, block=blocks, seed=seeds, length=lengths,
          cut=st.floats(0, 1), with_data=st.booleans())
    def start_torn_write(self, file_id: int, block: int, seed: int, length: int, cut: float,
                         with_data: bool) -> None:
        """A writer stopped between its header writes: new generation, not FLAG_FILLED."""
        ref = self.allocate()
        if ref is None:
            return
        data = page(seed, length)
        os.pwrite(self.hfd, SlotHeader(file_id, block, ref.generation, 0, 0, 0).pack(),
                  ref.slot * HEADER_SIZE)
        if with_data:  # part of the new page already over the old one
            os.pwrite(self.sfd, data[:int(len(data) * cut)], ref.slot * BS)
        self.pending[ref.slot] = (ref, file_id, block, data)
        # a reader told the new reference too early is refused as well
        assert self.reader is not None
        assert isinstance(self.reader.read(ref, file_id, block), Refused)

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def finish_torn_write(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.pending)))
        ref, file_id, block, page_ = self.pending.pop(slot)
        assert self.area is not None
        self.record(ref, file_id, block, page_, self.area.put(ref, file_id, block, page_))

    @rule()
    def flush(self) -> None:
        assert self.area is not None
        self.area.flush()

    # -- destination --------------------------------------------------------------------

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def install(self, data: st.DataObject) -> None:
        """The destination installs a told page (or falls back) and frees the slot."""
        slot = data.draw(st.sampled_from(sorted(self.live)))
        t = self.live.pop(slot)
        self.check_read(t)
        assert self.alloc.release(t.ref)
        assert not self.alloc.release(t.ref)  # a second release is ignored
        assert self.area is not None
        self.area.mark_free(t.ref, t.header)
        self.freed.add(slot)
        assert self.reader is not None
        h = self.reader.header(slot)
        assert h.flags == FLAG_FILLED | FLAG_FREE
        assert h.generation == t.ref.generation
        # still served to a reader that holds the current generation (content kept)
        assert self.check_read(t) == self.expected(t)

    @precondition(lambda self: self.told)
    @rule(data=st.data())
    def late_read(self, data: st.DataObject) -> None:
        """Any reference ever told, possibly stale: served only while still current."""
        self.check_read(data.draw(st.sampled_from(self.told)))

    @precondition(lambda self: self.told)
    @rule(data=st.data())
    def stale_release(self, data: st.DataObject) -> None:
        t = data.draw(st.sampled_from(self.told))
        if t.ref.slot in self.live and self.live[t.ref.slot] is t:
            return  # not stale
        assert not self.alloc.release(t.ref)

    # -- the disk -----------------------------------------------------------------------

    def corruptible(self) -> list[int]:
        return sorted(s for s, t in self.current.items()
                      if t.data and (s, t.ref.generation) not in self.corrupted)

    @precondition(lambda self: self.corruptible())
    @rule(data=st.data())
    def corrupt(self, data: st.DataObject) -> None:
        """Flip a byte of a slot's page on disk (within the page: the hash covers it)."""
        slot = data.draw(st.sampled_from(self.corruptible()))
        t = self.current[slot]
        pos = data.draw(st.integers(0, len(t.data) - 1))
        off = slot * BS + pos
        (b,) = os.pread(self.sfd, 1, off)
        os.pwrite(self.sfd, bytes([b ^ data.draw(st.integers(1, 255))]), off)
        self.corrupted.add((slot, t.ref.generation))
        assert self.check_read(t) is None

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def summary_adds_up(self) -> None:
        if self.reader is None:
            return
        s = self.reader.summary()
        assert s["in_use"] + s["free"] + s["unused"] == self.nslots == s["slots"]
        assert s["unused"] == sum(1 for g in self.alloc.generations if g == 0)
        assert s["free"] == len(self.freed)
        assert s["in_use"] == len(self.live) + len(self.pending)
        assert s["max_generation"] == max(self.alloc.generations)
        assert s["migration"] == MIGRATION and s["block_size"] == BS
        for slot, h in enumerate(self.reader.scan()):
            assert h.generation == self.alloc.generations[slot]
            assert bool(h.flags & FLAG_FILLED) == (h.generation > 0 and slot not in self.pending)
            assert bool(h.flags & FLAG_FREE) == (slot in self.freed)


SpillAreaMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None
)
TestSpillAreaMachine = SpillAreaMachine.TestCase


# -- plain tests ----------------------------------------------------------------------------


def make(path: str, migration: str = MIGRATION, nslots: int = 2) -> SpillArea:
    return SpillArea.create(path, migration, BS, nslots, {1: "disk.img"}, key_of(migration))


def test_create_writes_a_manifest_and_sized_files(tmp_path) -> None:
    area = make(str(tmp_path), nslots=3)
    try:
        assert os.path.getsize(tmp_path / HEADERS_NAME) == 3 * HEADER_SIZE
        assert os.path.getsize(tmp_path / SLOTS_NAME) == 3 * BS
        assert not (tmp_path / (MANIFEST_NAME + ".tmp")).exists()
        opened = SpillArea.open(str(tmp_path))
        assert (opened.migration, opened.block_size, opened.nslots) == (MIGRATION, BS, 3)
        assert opened.manifest["files"] == {"1": "disk.img"}
        assert opened.summary()["unused"] == 3
        opened.close()
    finally:
        area.close()


@pytest.mark.parametrize("nslots", [0, -1])
def test_create_refuses_no_slots(tmp_path, nslots: int) -> None:
    with pytest.raises(SpillError, match="--spill-slots"):
        make(str(tmp_path), nslots=nslots)


def test_create_replaces_an_older_area(tmp_path) -> None:
    old = make(str(tmp_path), "old")
    alloc = SlotAllocator(2)
    refs = [alloc.allocate(), alloc.allocate()]
    assert None not in refs
    for i, ref in enumerate(refs):
        old.put(ref, 1, i, page(i, BS))  # type: ignore[arg-type]
    old.close()

    new = make(str(tmp_path), "new")
    try:
        reader = SpillArea.open(str(tmp_path), "new", key_of("new"))
        assert reader.migration == "new"
        assert all(h == SlotHeader(0, 0, 0, 0, 0, 0) for h in reader.scan())  # zeroed
        for i, ref in enumerate(refs):
            assert isinstance(reader.read(ref, 1, i), Refused)  # an old ref no longer matches
        assert reader.summary()["unused"] == 2
        with pytest.raises(SpillError, match="belongs to migration new, not old"):
            SpillArea.open(str(tmp_path), "old", key_of("old"))
        reader.close()
    finally:
        new.close()


def test_open_with_the_wrong_migration_says_which(tmp_path) -> None:
    make(str(tmp_path), "abc").close()
    with pytest.raises(SpillError) as exc:
        SpillArea.open(str(tmp_path), "xyz", key_of("xyz"))
    msg = str(exc.value)
    assert "abc" in msg and "xyz" in msg and "--spill" in msg and str(tmp_path) in msg
    SpillArea.open(str(tmp_path), "abc", key_of("abc")).close()  # the right one opens


def test_open_without_a_manifest_points_at_spill(tmp_path) -> None:
    with pytest.raises(SpillError, match=r"no spill area.*--spill"):
        SpillArea.open(str(tmp_path))
    with pytest.raises(SpillError, match="--spill"):
        SpillArea.open(str(tmp_path / "missing"))


@pytest.mark.parametrize("damage", ["slots-short", "slots-long", "headers-short"])
def test_open_of_a_truncated_area_says_damaged(tmp_path, damage: str) -> None:
    make(str(tmp_path), nslots=3).close()
    name = HEADERS_NAME if damage.startswith("headers") else SLOTS_NAME
    size = os.path.getsize(tmp_path / name)
    os.truncate(tmp_path / name, size + (BS if damage.endswith("long") else -100))
    with pytest.raises(SpillError, match="damaged"):
        SpillArea.open(str(tmp_path))


@pytest.mark.parametrize(
    "manifest",
    ["not json", "[]", '{"version": 99}',
     '{"version": 1, "migration": "m", "block_size": 0, "slots": 1}',
     '{"version": 1, "migration": "m", "block_size": 4096}'],
)
def test_open_of_a_bad_manifest_raises_spill_error(tmp_path, manifest: str) -> None:
    make(str(tmp_path)).close()
    (tmp_path / MANIFEST_NAME).write_text(manifest)
    with pytest.raises(SpillError):
        SpillArea.open(str(tmp_path))


def test_put_of_a_page_larger_than_a_block_is_refused(tmp_path) -> None:
    area = make(str(tmp_path))
    try:
        ref = SlotAllocator(2).allocate()
        assert ref is not None
        with pytest.raises(SpillError, match=f"{BS + 1} bytes"):
            area.put(ref, 1, 0, b"x" * (BS + 1))
        assert area.header(ref.slot) == SlotHeader(0, 0, 0, 0, 0, 0)  # nothing written
        assert isinstance(area.read(ref, 1, 0), Refused)
    finally:
        area.close()


@pytest.mark.parametrize("length", [0, 1, 100, BS - 1, BS])
def test_a_short_last_page_round_trips_with_its_length(tmp_path, length: int) -> None:
    area = make(str(tmp_path))
    try:
        alloc = SlotAllocator(1)
        first = alloc.allocate()
        assert first is not None
        area.put(first, 1, 0, b"\xff" * BS)  # old bytes left behind a shorter page
        assert alloc.release(first)
        ref = alloc.allocate()
        assert ref is not None and ref.slot == first.slot
        data = page(length, length)
        h = area.put(ref, 1, 7, data)
        assert h.length == length
        reader = SpillArea.open(str(tmp_path), MIGRATION, key_of(MIGRATION))
        got = reader.read(ref, 1, 7)
        reader.close()
        assert got == data and len(got) == length
        assert isinstance(area.read(first, 1, 0), Refused)
    finally:
        area.close()


def test_mark_free_keeps_the_page_for_its_generation(tmp_path) -> None:
    area = make(str(tmp_path))
    try:
        alloc = SlotAllocator(1)
        ref = alloc.allocate()
        assert ref is not None
        data = page(1, BS)
        h = area.put(ref, 2, 5, data)
        assert alloc.release(ref)
        area.mark_free(ref, h)
        area.flush()
        reader = SpillArea.open(str(tmp_path), MIGRATION, key_of(MIGRATION))
        assert reader.header(ref.slot).flags == FLAG_FILLED | FLAG_FREE
        assert reader.read(ref, 2, 5) == data  # installed, yet still served
        assert reader.summary()["free"] == 1
        new = alloc.allocate()
        assert new == SlotRef(ref.slot, ref.generation + 1)
        area.put(new, 2, 5, page(2, BS))  # same file and block, new page
        assert isinstance(reader.read(ref, 2, 5), Refused)  # the old generation is gone
        assert reader.read(new, 2, 5) == page(2, BS)
        assert reader.summary()["in_use"] == 1
        reader.close()
    finally:
        area.close()


def test_read_of_a_slot_outside_the_area_is_refused(tmp_path) -> None:
    area = make(str(tmp_path))
    try:
        assert isinstance(area.read(SlotRef(2, 1), 1, 0), Refused)
        assert isinstance(area.read(SlotRef(-1, 1), 1, 0), Refused)
    finally:
        area.close()


def test_a_read_only_area_cannot_be_written(tmp_path) -> None:
    make(str(tmp_path)).close()
    reader = SpillArea.open(str(tmp_path))
    try:
        with pytest.raises(OSError):
            reader.put(SlotRef(0, 1), 1, 0, b"x")
    finally:
        reader.close()


@pytest.mark.parametrize(
    "writer", ["realloc-header", "realloc-partial", "realloc-full", "realloc-same-page",
               "mark-free", "nothing"],
)
def test_a_writer_between_the_two_header_reads(tmp_path, writer: str) -> None:
    """The source moves on while a reader is between its header reads and the data."""
    area = make(str(tmp_path), nslots=1)
    reader = SpillArea.open(str(tmp_path), MIGRATION, key_of(MIGRATION))
    try:
        alloc = SlotAllocator(1)
        ref = alloc.allocate()
        assert ref is not None
        old = page(1, BS)
        h = area.put(ref, 1, 3, old)
        assert alloc.release(ref)

        def move_on() -> None:
            if writer == "mark-free":
                area.mark_free(ref, h)
                return
            if writer == "nothing":
                return
            new = alloc.allocate()
            assert new is not None and new.slot == ref.slot
            data = old if writer == "realloc-same-page" else page(2, BS)
            if writer in ("realloc-full", "realloc-same-page"):
                area.put(new, 1, 3, data)
                return
            area._header_at(new.slot, SlotHeader(1, 3, new.generation, 0, 0, 0))
            if writer == "realloc-partial":
                os.pwrite(area._sfd, data[:BS // 2], new.slot * BS)

        calls = 0
        real_header = reader.header

        def header(slot: int) -> SlotHeader:
            nonlocal calls
            calls += 1
            got = real_header(slot)
            if calls == 1:
                move_on()  # after the reader saw the old header, before it reads the data
            return got

        reader.header = header  # type: ignore[method-assign]
        got = reader.read(ref, 1, 3)
        assert calls == 2  # the header is read again after the data
        if writer in ("mark-free", "nothing"):
            assert got == old  # the content is kept: still served
        else:
            assert isinstance(got, Refused)  # never the new page, a torn mix, or the old one
    finally:
        reader.close()
        area.close()


def test_the_installed_file_is_the_destinations_word_per_slot(tmp_path) -> None:
    from blkfs.spill import SlotRef, SpillArea

    area = SpillArea.create(str(tmp_path / "spill"), "m1", 4096, 3, {0: "vm.mem"}, key_of("m1"))
    reader = SpillArea.open(str(tmp_path / "spill"), "m1", key_of("m1"))
    assert area.installed() == [0, 0, 0]
    reader.mark_installed([SlotRef(2, 5), SlotRef(0, 1), SlotRef(9, 1)])  # (9: not a slot)
    assert area.installed() == [1, 0, 5]
    reader.close()
    area.close()
    again = SpillArea.create(str(tmp_path / "spill"), "m2", 4096, 3, {0: "vm.mem"}, key_of("m2"))
    assert again.installed() == [0, 0, 0]  # a new migration's area forgets the old word
    again.close()


def test_a_slot_forged_without_the_key_is_refused(tmp_path) -> None:
    """Anyone who can write the area can write a page and its xxh3 (a checksum, not a MAC):
    without the spill key its MAC does not verify, and the reader refuses it like a stale
    slot. A reader opened without the key reads nothing at all."""
    area = make(str(tmp_path))
    reader = SpillArea.open(str(tmp_path), MIGRATION, key_of(MIGRATION))
    try:
        ref = SlotRef(0, 1)
        area.put(ref, 1, 7, b"R" * BS)
        assert reader.read(ref, 1, 7) == b"R" * BS
        forger = SpillArea(str(tmp_path), area.manifest, writable=True, key=b"\0" * 32)
        forger.put(ref, 1, 7, b"F" * BS)  # same slot, generation, file and block; valid xxh3
        forger.close()
        assert isinstance(reader.read(ref, 1, 7), Refused)
        with pytest.raises(SpillError, match="without its key"):
            SpillArea.open(str(tmp_path)).read(ref, 1, 7)
    finally:
        reader.close()
        area.close()


@pytest.mark.parametrize("how", ["other-key", "edited"])
def test_a_manifest_not_written_with_the_key_is_refused(tmp_path, how: str) -> None:
    make(str(tmp_path)).close()
    key = key_of(MIGRATION)
    if how == "other-key":
        key = spill_key(b"u" * 32, MIGRATION)
    else:  # someone edits what the files are
        doc = json.loads((tmp_path / MANIFEST_NAME).read_text())
        doc["files"]["1"] = "other.img"
        (tmp_path / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(SpillError, match="MAC"):
        SpillArea.open(str(tmp_path), MIGRATION, key)
