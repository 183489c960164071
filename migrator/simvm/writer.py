"""The VM itself: create its files, then write to them the way a VM would, until stopped.

Each write picks the disk or the memory region with probability proportional to their unit
counts (so both get the same write rate per byte; ``mem_share`` overrides it, e.g. for a VM
that dirties RAM far more than its disk), then a unit: with probability ``hot_share``
from the file's hot set (a fraction ``hot_fraction`` of its units, drawn from the seed),
otherwise uniformly.  Writes follow the order of format.py, so a SIGSTOP leaves at most one
in flight; SIGTERM and SIGINT stop the loop between two writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .format import (
    BLOCK_MAGIC,
    DISK,
    FILL_KEY,
    LAST,
    MEM,
    NO_FILE,
    OFF_GENERATION,
    OFF_LAST,
    OFF_TOTAL,
    PAGE,
    STAMP,
    U32,
    U64,
    Header,
    SimVMError,
    classify_torn,
    hot_units,
    is_version,
    layout,
    ledger_from,
    parse_header,
    unit_content,
)


def create(
    dir: str | os.PathLike[str],
    disk_name: str = "disk.raw",
    mem_name: str = "vm.mem",
    *,
    disk_size: int,
    mem_size: int,
    unit: int = 4096,
    seed: int = 1,
    overwrite: bool = False,
) -> Header:
    """Create a sparse disk and a memory file holding a fresh header (generation 0).

    Existing files are refused unless `overwrite`: they may hold a VM someone still needs."""
    ledger_pages, _ = layout(unit, disk_size, mem_size)
    if not 0 <= seed < 1 << 64:
        raise SimVMError(f"seed {seed} is not in 0 .. 2**64-1")
    d = Path(dir)
    if not d.is_dir():
        raise SimVMError(f"{d} is not a directory")
    h = Header(unit, disk_size, mem_size, 0, seed, ledger_pages, 0)
    flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    for name, size in ((disk_name, disk_size), (mem_name, mem_size)):
        try:
            fd = os.open(d / name, flags, 0o644)
        except FileExistsError:
            raise SimVMError(f"{d / name} already exists (remove it, or use --force)") from None
        except OSError as exc:
            raise SimVMError(f"cannot create {d / name}: {exc.strerror}") from None
        try:
            os.ftruncate(fd, size)
            if name == mem_name:
                os.pwrite(fd, h.pack(), 0)
        finally:
            os.close(fd)
    return h


@contextmanager
def _stop_on_signals(stop: list[bool]) -> Iterator[None]:
    """SIGTERM and SIGINT end the loop between two writes, so the state is left complete."""

    def handler(signum: int, frame: Any) -> None:
        stop[0] = True

    saved = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            saved[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: the caller stops us with `seconds`
        pass
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def run(
    dir: str | os.PathLike[str],
    disk_name: str = "disk.raw",
    mem_name: str = "vm.mem",
    *,
    rate_mb_s: float,
    seconds: float | None = None,
    hot_fraction: float = 0.1,
    hot_share: float = 0.9,
    resume: bool = False,
    mem_share: float | None = None,
) -> int:
    """Write until `seconds` pass (None: until SIGTERM/SIGINT); return the writes done.

    `rate_mb_s` is in MiB/s (0: as fast as possible). A fresh VM starts with `resume=False`;
    one that ran before (here, or on the source of a migration) needs `resume=True`."""
    if not rate_mb_s >= 0:
        raise SimVMError(f"rate {rate_mb_s} is not a number >= 0")
    if seconds is not None and not seconds > 0:
        raise SimVMError(f"seconds {seconds} is not a positive number")
    if not 0 <= hot_fraction <= 1 or not 0 <= hot_share <= 1:
        raise SimVMError("hot fraction and hot share must be between 0 and 1")
    if mem_share is not None and not 0 <= mem_share <= 1:
        raise SimVMError("mem share must be between 0 and 1")
    d = Path(dir)
    mem_path, disk_path = d / mem_name, d / disk_name
    fds: list[int] = []
    stop = [False]
    with _stop_on_signals(stop), _closing(fds):
        try:
            fds.append(os.open(mem_path, os.O_RDWR))
            fds.append(os.open(disk_path, os.O_RDWR))
        except OSError as exc:
            raise SimVMError(f"cannot open {exc.filename}: {exc.strerror}") from None
        mem_fd, disk_fd = fds
        hint = "was it migrated?" if resume else "create it first (simvm create)"
        h = parse_header(os.pread(mem_fd, PAGE, 0), str(mem_path), hint)
        if not resume and (h.generation or h.total_writes):
            raise SimVMError(
                f"{mem_path} holds a VM that already ran (generation {h.generation}, "
                f"{h.total_writes} writes): use --resume to continue it"
            )
        for path, fd, size in ((mem_path, mem_fd, h.mem_size), (disk_path, disk_fd, h.disk_size)):
            if os.fstat(fd).st_size < size:
                raise SimVMError(
                    f"{path} is {os.fstat(fd).st_size} bytes, the VM needs {size}: incomplete copy?"
                )
        mm = mmap.mmap(mem_fd, h.mem_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            gen = h.generation + 1
            _put(mm, OFF_GENERATION, U64.pack(gen))
            if resume:
                h = dataclasses.replace(h, total_writes=_recover(mm, disk_fd, h, gen))
            return _write_loop(
                mm, disk_fd, h, gen, rate_mb_s, seconds, hot_fraction, hot_share, stop,
                mem_share,
            )
        finally:
            mm.flush()
            mm.close()


@contextmanager
def _closing(fds: list[int]) -> Iterator[None]:
    try:
        yield
    finally:
        for fd in fds:
            os.close(fd)


def _recover(mm: mmap.mmap, disk_fd: int, h: Header, gen: int) -> int:
    """Finish the write a suspend (or kill) interrupted, so the ledger is exact again.

    Returns the write count, which then matches the ledger."""
    ledger = ledger_from(mm, h)
    excess = sum(ledger) - h.total_writes
    if excess not in (0, 1):
        raise SimVMError(
            f"ledger counts {sum(ledger)} writes, the header {h.total_writes}: "
            "the VM state is corrupt (see: simvm check)"
        )
    if h.last_file != NO_FILE and excess == 0:
        f, u = h.last_file, h.last_unit
        if u >= h.units(f):
            raise SimVMError(f"last unit {u} is out of range: the VM state is corrupt")
        off, size = h.offset(f, u), h.unit_size
        data = os.pread(disk_fd, size, off) if f == DISK else mm[off : off + size]
        li = h.ledger_index(f, u)
        v = ledger[li]
        if not is_version(data, 0, f, u, v, h.generation, size) and classify_torn(
            data, 0, f, u, v, h.generation, size
        ):
            content = unit_content(f, u, v + 1, gen, size)
            if f == DISK:
                os.pwrite(disk_fd, content, off)
            else:
                mm[off : off + size] = content
            _put(mm, PAGE + 4 * li, U32.pack(v + 1))
            excess = 1
    if excess:
        _put(mm, OFF_TOTAL, U64.pack(h.total_writes + 1))
    return h.total_writes + excess


def _put(mm: mmap.mmap, offset: int, data: bytes) -> None:
    """Store a header or ledger field with one memcpy.

    Not ``struct.pack_into``: it zeroes the field before writing it, and a SIGSTOP between the
    two would leave a copy with a zero ledger entry or write count."""
    mm[offset : offset + len(data)] = data


def _write_loop(
    mm: mmap.mmap,
    disk_fd: int,
    h: Header,
    gen: int,
    rate_mb_s: float,
    seconds: float | None,
    hot_fraction: float,
    hot_share: float,
    stop: list[bool],
    mem_share: float | None = None,
) -> int:
    size = h.unit_size
    reps = size // 64
    n_units = (h.disk_units, h.mem_units)
    hot = (
        hot_units(h.seed, DISK, h.disk_units, hot_fraction),
        hot_units(h.seed, MEM, h.mem_units, hot_fraction),
    )
    ledger_base = (PAGE, PAGE + 4 * h.disk_units)
    data_start = h.data_start
    p_disk = h.disk_units / (h.disk_units + h.mem_units) if mem_share is None else 1 - mem_share
    rnd = random.Random(f"simvm-run:{h.seed}:{gen}").random
    blake2b = hashlib.blake2b
    key, stamp_pack, u32, u64, last = FILL_KEY.pack, STAMP.pack, U32.pack, U64.pack, LAST.pack
    monotonic = time.monotonic
    interval = size / (rate_mb_s * (1 << 20)) if rate_mb_s > 0 else 0.0
    start = monotonic()
    deadline = start + seconds if seconds is not None else float("inf")
    due = start
    total = h.total_writes
    writes = 0
    while not stop[0]:
        now = monotonic()
        if now >= deadline:
            break
        if interval:
            if due > now:
                _nap(min(due, deadline), stop)
                continue
            if now - due > 0.1:  # behind (e.g. after SIGSTOP): a VM does not catch up
                due = now
            due += interval
        f = DISK if rnd() < p_disk else MEM
        hs = hot[f]
        u = hs[int(rnd() * len(hs))] if hs and rnd() < hot_share else int(rnd() * n_units[f])
        loff = ledger_base[f] + 4 * u
        v = U32.unpack_from(mm, loff)[0] + 1
        # Fields go in by slice assignment (one memcpy), never struct.pack_into: see _put.
        mm[OFF_LAST : OFF_LAST + 12] = last(f, u)
        body = blake2b(key(f, u, v), digest_size=64).digest() * reps
        stamp = stamp_pack(BLOCK_MAGIC, f, u, v, gen)
        if f == DISK:
            os.pwrite(disk_fd, stamp + memoryview(body)[32:], u * size)
        else:
            o = data_start + u * size
            mm[o + 32 : o + size] = memoryview(body)[32:]
            mm[o : o + 32] = stamp
        mm[loff : loff + 4] = u32(v)
        total += 1
        mm[OFF_TOTAL : OFF_TOTAL + 8] = u64(total)
        writes += 1
    return writes


def _nap(until: float, stop: list[bool]) -> None:
    """Sleep until `until`, in short naps so a stop signal is seen promptly."""
    while not stop[0]:
        left = until - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))
