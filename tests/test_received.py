"""The destination's writes of Blocks (pure over a recording store): into a file this
migration created, the all-zero pages of a block nothing wrote yet stay holes; anything
written before is written whole (zeros over data must land)."""

from __future__ import annotations

import os

from migrator import protocol as p
from migrator.received import Received, ReceivedFile

BS, PAGE = 64 << 10, 4 << 10


class Recorder:
    def __init__(self, fresh: bool) -> None:
        self.is_fresh = fresh
        self.writes: list[tuple[int, int]] = []  # (offset, length)

    def fresh(self, file_id: int) -> bool:
        return self.is_fresh

    def write(self, file_id: int, offset: int, data: bytes | memoryview) -> None:
        self.writes.append((offset, len(data)))

    def resize(self, file_id: int, size: int) -> None:
        pass


def received(fresh: bool, size: int = 4 * BS) -> tuple[Received, Recorder]:
    store = Recorder(fresh)
    rx = Received(store)  # type: ignore[arg-type]
    rx.block_size = BS
    rx.files[0] = ReceivedFile(p.FileEntry(0, "disk.raw", size), size)
    return rx, store


def block(pages: str) -> bytes:
    """A block of 16 pages: 'd' data, '.' zeros."""
    return b"".join(os.urandom(PAGE) if c == "d" else bytes(PAGE) for c in pages)


def test_zero_pages_of_a_fresh_file_stay_holes() -> None:
    rx, store = received(fresh=True)
    rx.write_blocks(p.Blocks(0, 1, block("d.dd" + "." * 11 + "d") + block("." * 16)))
    assert store.writes == [(BS, PAGE), (BS + 2 * PAGE, 2 * PAGE), (BS + 15 * PAGE, PAGE)]
    assert rx.files[0].digests.get(1, BS, 4 * BS) is not None  # (each block's digest kept)
    assert rx.files[0].digests.get(2, BS, 4 * BS) is not None


def test_a_block_written_before_is_written_whole() -> None:
    rx, store = received(fresh=True)
    rx.write_blocks(p.Blocks(0, 0, block("d" * 16)))
    store.writes.clear()
    rx.write_blocks(p.Blocks(0, 0, block("d" + "." * 15)))  # its zeros cover data
    assert store.writes == [(0, BS)]


def test_blocks_past_a_resize_are_written_whole() -> None:
    rx, store = received(fresh=True, size=2 * BS + 100)
    rx.write_blocks(p.Blocks(0, 2, os.urandom(100)))
    rx.resize(p.Resize(0, 2 * BS + 200))  # (its partial last block: its digest forgotten)
    assert rx.files[0].digests.get(2, BS, 2 * BS + 200) is None
    store.writes.clear()
    rx.write_blocks(p.Blocks(0, 2, bytes(200)))  # zeros over the 100 bytes written before
    assert store.writes == [(2 * BS, 200)]


def test_a_file_that_existed_is_written_whole() -> None:
    rx, store = received(fresh=False)
    rx.write_blocks(p.Blocks(0, 0, block("d" + "." * 15)))
    assert store.writes == [(0, BS)]


def test_a_short_last_block_keeps_its_tail() -> None:
    rx, store = received(fresh=True, size=BS + PAGE + 10)
    rx.write_blocks(p.Blocks(0, 1, bytes(PAGE) + b"\x01" * 10))
    assert store.writes == [(BS + PAGE, 10)]
