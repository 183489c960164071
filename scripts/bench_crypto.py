"""What the channel's and the spill area's cryptography cost, in memory (issue 13).

* sealing and opening frames (migrator.protocol: AES-256-GCM over a frame's pieces, big frames
  opened as they arrive), against building the same frame in clear;
* a spill page's checks (blkfs.spill.checked_read: xxh3, then the keyed BLAKE2b MAC) and the
  MAC alone, per page, at 4 KiB and 64 KiB.

    .venv/bin/python scripts/bench_crypto.py

The end-to-end figure (a migration sealed against --insecure-plaintext on loopback) is
scripts/bench_copy.py --channel sealed --channel plaintext.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blkfs.spill import SlotRef, checked_read, fill_header, slot_mac, spill_key
from migrator import protocol as p
from migrator.protocol.codec import BLOCKS_HEAD
from migrator.protocol.sealing import Sealer


def per_call(fn: Callable[[], object], budget_s: float = 0.5) -> float:
    """Seconds per call, the best of 3 timed batches."""
    n, best = 1, float("inf")
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt > budget_s / 10:
            break
        n *= 2
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def sessions() -> tuple[p.Connection, p.Connection]:
    key = os.urandom(32)
    s, d = p.Connection("source", key), p.Connection("dest", key)
    for a, b in ((s, d), (d, s)):
        b.receive_data(a.send(a.hello_event()))
        b.next_event()
    for a, b in ((s, d), (d, s)):
        b.receive_data(a.send(a.auth_event()))
        b.next_event()
    return s, d


def frame_row(size: int) -> str:
    data = os.urandom(size)
    ev = p.Blocks(0, 0, data)
    clear = per_call(lambda: p.encode(ev))
    seal = sessions()[0]._seal_out
    assert seal is not None
    code, parts = int(p.FrameType.BLOCKS), [BLOCKS_HEAD.pack(0, 0), data]
    sealed = per_call(lambda: seal.seal(code, parts, size + 12))
    opener = Sealer(os.urandom(32), "source")
    frame = bytes(opener.seal(code, parts, size + 12))
    head, body = frame[:p.HEADER.size], memoryview(frame)[p.HEADER.size:]

    def open_big() -> None:
        opener.frames = 0  # the same frame again: its number must be the one it was sealed at
        o = opener.opening(head, len(body))
        o.take(body)
        o.finish()

    opened = per_call(open_big)
    mb = size / 1e6
    return (f"  {size >> 10:>5} KiB: clear {mb / clear:6.0f} MB/s, seal {mb / sealed:6.0f} "
            f"MB/s, open {mb / opened:6.0f} MB/s ({p.TAG_SIZE} bytes longer)")


def page_row(size: int, key: bytes) -> str:
    page = os.urandom(size)
    ref = SlotRef(3, 7)
    h = fill_header(1, 9, ref, page, key)
    mac = per_call(lambda: slot_mac(key, 1, 9, 7, page))
    check = per_call(lambda: checked_read(ref, 1, 9, h, page, h, key))
    return (f"  {size >> 10:>2} KiB: MAC {mac * 1e6:6.2f} us ({size / mac / 1e6:5.0f} MB/s), "
            f"all checks (xxh3 + MAC) {check * 1e6:6.2f} us")


def main() -> None:
    print("frames (a Blocks frame, one direction):")
    for size in (256 << 10, 8 << 20):
        print(frame_row(size))
    print("spill pages (per page):")
    key = spill_key(os.urandom(32), "bench")
    for size in (4096, 65536):
        print(page_row(size, key))


if __name__ == "__main__":
    main()
