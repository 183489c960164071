"""A simulated VM whose every write can be proven present after a migration.

The migrator's demo, tests and benchmark need a VM that writes like a real one (a disk through
``pwrite``, RAM through a shared ``mmap``, most writes on a few hot blocks) and whose files can be
checked byte for byte on the destination.  This is it: a process that stamps every write with
(file, unit, version, generation) and fills the rest of the unit with bytes derived from
(file, unit, version), so a checker that knows the latest version of each unit can verify every
byte.  The latest versions live in a ledger *inside the memory file*, the way a real VM's state
lives in its RAM: migrate ``vm.mem`` and the VM can resume on the destination from it.

Files in DIR (names configurable):

``vm.mem``
    page 0 (4096 bytes) is the header, little-endian and packed (no padding):

    ====== ===== ==========================================================================
    offset type  field
    ====== ===== ==========================================================================
    0      8s    magic ``SIMVM001``
    8      u32   unit_size: the stamping unit (default 4096, not the blkfs block size)
    12     u64   disk_size
    20     u64   mem_size
    28     u64   total_writes, over all generations
    36     u64   seed
    44     u32   ledger_pages
    48     u64   generation: 0 after create, +1 at each (re)start
    56     u32   last_file: file of the most recent write (0 disk, 1 mem, 0xFFFFFFFF none)
    60     u64   last_unit: its unit; both are set *before* that write's data
    ====== ===== ==========================================================================

    then the ledger (``ledger_pages`` pages): one u32 version per disk unit, then one per memory
    data unit; then the memory data region, which starts at ``4096 * (1 + ledger_pages)``
    (aligned to the unit, so units line up with blkfs blocks) and runs to ``mem_size``.
``disk.raw``
    ``disk_size`` bytes, ``disk_size / unit_size`` units.

A unit at version v > 0 holds a 32-byte stamp (``SVMBLK01``, u32 file_id, u64 unit, u32 version,
u64 generation of the writer) followed by the filler: a 64-byte BLAKE2b digest of
(file_id, unit, version) repeated, minus its first 32 bytes.  A unit at version 0 is all zeros.

Each write picks the disk or the memory region with probability proportional to their unit
counts (so both get the same write rate per byte; ``--mem-share`` overrides it, e.g. for a VM
that dirties RAM far more than its disk), then a unit: with probability ``hot_share``
from the file's hot set (a fraction ``hot_fraction`` of its units, drawn from the seed),
otherwise uniformly.  Order: header ``last_*``, data (memory: filler first, stamp last), ledger
entry, header ``total_writes``.  A SIGSTOP can land anywhere in that order, so `check` accepts
exactly one in-flight write, and only the most recent one: its unit may be ahead of the ledger
(even torn between the two versions, for memory), or the ledger may be one ahead of
``total_writes``.  ``run(resume=True)`` completes such a write before going on.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import mmap
import os
import random
import signal
import struct
import sys
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from blkfs.bitmap import parse_size

PROG = "simvm"
PAGE = 4096
MAGIC = b"SIMVM001"
BLOCK_MAGIC = b"SVMBLK01"
DISK, MEM = 0, 1
NO_FILE = 0xFFFFFFFF
MIN_UNIT = 512
MAX_UNIT = 1 << 20
MAX_ERRORS = 20

HEADER = struct.Struct("<8sIQQQQIQIQ")
OFF_TOTAL = struct.calcsize("<8sIQQ")
OFF_GENERATION = struct.calcsize("<8sIQQQQI")
OFF_LAST = struct.calcsize("<8sIQQQQIQ")
STAMP = struct.Struct("<8sIQIQ")  # 32 bytes
STAMP_FIXED = struct.calcsize("<8sIQ")  # magic, file_id, unit: equal in every version
_LAST = struct.Struct("<IQ")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_FILL_KEY = struct.Struct("<IQI")

assert STAMP.size == 32 and HEADER.size <= PAGE


class SimVMError(Exception):
    """Bad input or state; the message is one line meant for the user."""


@dataclass(frozen=True)
class Header:
    """The header of a vm.mem file, plus the layout it implies."""

    unit_size: int
    disk_size: int
    mem_size: int
    total_writes: int
    seed: int
    ledger_pages: int
    generation: int
    last_file: int = NO_FILE
    last_unit: int = 0

    @property
    def disk_units(self) -> int:
        return self.disk_size // self.unit_size

    @property
    def data_start(self) -> int:
        """Offset in vm.mem of memory unit 0."""
        return PAGE * (1 + self.ledger_pages)

    @property
    def mem_units(self) -> int:
        return max(0, (self.mem_size - self.data_start) // self.unit_size)

    def units(self, file_id: int) -> int:
        return self.disk_units if file_id == DISK else self.mem_units

    def ledger_index(self, file_id: int, unit: int) -> int:
        """Index of (file_id, unit) in the ledger: disk units first, then memory units."""
        return unit if file_id == DISK else self.disk_units + unit

    def offset(self, file_id: int, unit: int) -> int:
        """Byte offset of the unit in its file."""
        base = 0 if file_id == DISK else self.data_start
        return base + unit * self.unit_size

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            self.unit_size,
            self.disk_size,
            self.mem_size,
            self.total_writes,
            self.seed,
            self.ledger_pages,
            self.generation,
            self.last_file,
            self.last_unit,
        )


@dataclass
class CheckResult:
    """What `check` found. ``in_flight`` counts the one interrupted write it tolerated."""

    ok: bool
    units_checked: int
    written_units: int
    in_flight: int
    errors: list[str] = field(default_factory=list)
    total_writes: int = 0
    generation: int = 0
    error_count: int = 0


# --- layout and content (pure) ---------------------------------------------------------------


def _check_unit_size(unit: int) -> None:
    if unit < MIN_UNIT or unit > MAX_UNIT or unit & (unit - 1):
        raise SimVMError(f"unit {unit} is not a power of two from 512 to 1M")


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def layout(unit: int, disk_size: int, mem_size: int) -> tuple[int, int]:
    """Return (ledger_pages, mem_units) for these sizes, or raise SimVMError if they don't fit."""
    _check_unit_size(unit)
    if disk_size < unit or disk_size % unit:
        raise SimVMError(f"disk size {disk_size} is not a positive multiple of the unit ({unit})")
    if mem_size % unit:
        raise SimVMError(f"mem size {mem_size} is not a multiple of the unit ({unit})")
    ledger_pages, mem_units = _fit(unit, disk_size // unit, mem_size)
    if mem_units < 1:
        need = mem_size + unit
        while _fit(unit, disk_size // unit, need)[1] < 1:
            need += unit
        raise SimVMError(
            f"mem size {mem_size} is too small: the header and the ledger of "
            f"{disk_size // unit} disk units need {ledger_pages + 1} pages, leaving no room "
            f"for memory data; use at least {need} bytes ({_human(need)})"
        )
    return ledger_pages, mem_units


def _fit(unit: int, disk_units: int, mem_size: int) -> tuple[int, int]:
    # The ledger is sized for mem_size // unit memory units, an upper bound: a few spare
    # entries cost nothing and keep the layout a one-step computation.
    ledger_bytes = 4 * (disk_units + mem_size // unit)
    data_start = _align(PAGE + _align(ledger_bytes, PAGE), max(PAGE, unit))
    return data_start // PAGE - 1, max(0, (mem_size - data_start) // unit)


def _human(n: int) -> str:
    for suffix, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


def filler(file_id: int, unit: int, version: int, unit_size: int) -> bytes:
    """The unit-sized pattern of (file_id, unit, version); its first 32 bytes give way to the
    stamp. A 64-byte digest repeated: cheap, yet no two versions share a byte pattern."""
    pattern = hashlib.blake2b(_FILL_KEY.pack(file_id, unit, version), digest_size=64).digest()
    return pattern * (unit_size // 64)


def unit_content(file_id: int, unit: int, version: int, generation: int, unit_size: int) -> bytes:
    """The exact bytes of a unit at `version`, written by `generation` (zeros for version 0)."""
    if version == 0:
        return bytes(unit_size)
    body = filler(file_id, unit, version, unit_size)
    return STAMP.pack(BLOCK_MAGIC, file_id, unit, version, generation) + body[32:]


def hot_units(seed: int, file_id: int, n_units: int, hot_fraction: float) -> list[int]:
    """The hot set of a file: the same units for the same seed, in every generation."""
    if n_units <= 0 or hot_fraction <= 0:
        return []
    k = min(n_units, max(1, round(hot_fraction * n_units)))
    return random.Random(f"simvm-hot:{seed}:{file_id}").sample(range(n_units), k)


def parse_header(page: bytes, what: str = "vm.mem", hint: str = "was it migrated?") -> Header:
    """Decode and validate a header page; SimVMError names `what` if it is not one."""
    if len(page) < HEADER.size or page[:8] != MAGIC:
        raise SimVMError(f"{what} holds no simulated VM state (no {MAGIC.decode()} magic): {hint}")
    f = HEADER.unpack_from(page)
    h = Header(*f[1:])
    try:
        _check_unit_size(h.unit_size)
        if h.disk_size < h.unit_size or h.disk_size % h.unit_size or h.mem_size % h.unit_size:
            raise SimVMError("sizes are not multiples of the unit")
        if h.data_start % h.unit_size or h.mem_units < 1:
            raise SimVMError("the memory data region is misplaced")
        if 4 * (h.disk_units + h.mem_units) > PAGE * h.ledger_pages:
            raise SimVMError("the ledger is too small for the units")
        if h.last_file not in (DISK, MEM, NO_FILE):
            raise SimVMError(f"last_file is {h.last_file}")
    except SimVMError as exc:
        raise SimVMError(f"{what}: the simulated VM header is corrupt: {exc}") from None
    return h


def _ledger_from(raw: bytes | bytearray | mmap.mmap, h: Header) -> array[int]:
    n = h.disk_units + h.mem_units
    ledger = array("I")
    ledger.frombytes(raw[PAGE : PAGE + 4 * n])
    if sys.byteorder != "little":
        ledger.byteswap()
    return ledger


def _classify_torn(
    data: bytes | bytearray, off: int, file_id: int, unit: int, v: int, gen: int, size: int
) -> bool:
    """True if the unit is an interrupted write from version v to v+1: every byte from either.

    Only the generation field is read as a whole (the old version's writer is unknown)."""
    new = unit_content(file_id, unit, v + 1, gen, size)
    old = unit_content(file_id, unit, v, 1, size)  # generation bytes are checked apart
    got = data[off : off + size]
    if len(got) != size:
        return False
    stamp_gen = _U64.unpack_from(got, 24)[0]
    if not (v == 0 and stamp_gen == 0) and not 1 <= stamp_gen <= gen:
        return False
    if got[:24] == new[:24] or got[:24] == old[:24]:
        pass
    elif any(g != a and g != b for g, a, b in zip(got[:24], old[:24], new[:24], strict=True)):
        return False
    if got.startswith(new[32:], 32) or got.startswith(old[32:], 32):
        return True
    return all(g in (a, b) for g, a, b in zip(got[32:], old[32:], new[32:], strict=True))


# --- create ----------------------------------------------------------------------------------


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


def read_header(dir: str | os.PathLike[str], mem_name: str = "vm.mem") -> Header:
    """The header as it is now (e.g. to watch total_writes grow)."""
    path = Path(dir) / mem_name
    try:
        with open(path, "rb") as f:
            return parse_header(f.read(PAGE), str(path))
    except OSError as exc:
        raise SimVMError(f"cannot read {path}: {exc.strerror}") from None


def read_ledger(dir: str | os.PathLike[str], mem_name: str = "vm.mem") -> tuple[Header, array[int]]:
    """Header and ledger (versions, disk units first), e.g. to measure where writes went."""
    path = Path(dir) / mem_name
    try:
        with open(path, "rb") as f:
            h = parse_header(f.read(PAGE), str(path))
            raw = f.read(PAGE * h.ledger_pages).ljust(PAGE * h.ledger_pages, b"\0")
    except OSError as exc:
        raise SimVMError(f"cannot read {path}: {exc.strerror}") from None
    return h, _ledger_from(bytes(PAGE) + raw, h)


# --- run -------------------------------------------------------------------------------------


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
            _put(mm, OFF_GENERATION, _U64.pack(gen))
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
    ledger = _ledger_from(mm, h)
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
        if not _is_version(data, 0, f, u, v, h.generation, size) and _classify_torn(
            data, 0, f, u, v, h.generation, size
        ):
            content = unit_content(f, u, v + 1, gen, size)
            if f == DISK:
                os.pwrite(disk_fd, content, off)
            else:
                mm[off : off + size] = content
            _put(mm, PAGE + 4 * li, _U32.pack(v + 1))
            excess = 1
    if excess:
        _put(mm, OFF_TOTAL, _U64.pack(h.total_writes + 1))
    return h.total_writes + excess


def _put(mm: mmap.mmap, offset: int, data: bytes) -> None:
    """Store a header or ledger field with one memcpy.

    Not ``struct.pack_into``: it zeroes the field before writing it, and a SIGSTOP between the
    two would leave a copy with a zero ledger entry or write count."""
    mm[offset : offset + len(data)] = data


@functools.cache
def _zeros(size: int) -> bytes:
    return bytes(size)


def _is_version(
    data: bytes | bytearray, off: int, file_id: int, unit: int, v: int, max_gen: int, size: int
) -> bool:
    """True if the unit at `off` is exactly version v, from any generation up to max_gen."""
    if v == 0:
        return data.startswith(_zeros(size), off)
    magic, f, u, ver, g = STAMP.unpack_from(data, off)
    if magic != BLOCK_MAGIC or (f, u, ver) != (file_id, unit, v) or not 1 <= g <= max_gen:
        return False
    return data.startswith(memoryview(filler(file_id, unit, v, size))[32:], off + 32)


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
    key, stamp_pack, u32, u64, last = _FILL_KEY.pack, STAMP.pack, _U32.pack, _U64.pack, _LAST.pack
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
        v = _U32.unpack_from(mm, loff)[0] + 1
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


# --- check -----------------------------------------------------------------------------------


def check(
    dir: str | os.PathLike[str], disk_name: str = "disk.raw", mem_name: str = "vm.mem"
) -> CheckResult:
    """Verify every byte of both files against the ledger (of a stopped VM, or a copy).

    Raises SimVMError if vm.mem holds no VM at all; every other problem is in the result."""
    d = Path(dir)
    h, ledger = read_ledger(d, mem_name)
    res = CheckResult(
        ok=False,
        units_checked=h.disk_units + h.mem_units,
        written_units=h.disk_units + h.mem_units - ledger.count(0),
        in_flight=0,
        total_writes=h.total_writes,
        generation=h.generation,
    )

    def error(msg: str) -> None:
        res.error_count += 1
        if len(res.errors) < MAX_ERRORS:
            res.errors.append(msg)

    ahead: list[tuple[int, int]] = []
    for file_id, name in ((DISK, disk_name), (MEM, mem_name)):
        path = d / name
        want = h.disk_size if file_id == DISK else h.mem_size
        try:
            with open(path, "rb", buffering=0) as f:
                got = os.fstat(f.fileno()).st_size
                if got != want:
                    error(f"{name} is {got} bytes, expected {want}")
                _check_file(f, name, file_id, h, ledger, error, ahead)
        except OSError as exc:
            error(f"cannot read {path}: {exc.strerror}")
    excess = sum(ledger) - h.total_writes
    last = (h.last_file, h.last_unit)
    if excess not in (0, 1):
        error(f"the ledger counts {sum(ledger)} writes but the header {h.total_writes}")
    for f, u in ahead:
        name = disk_name if f == DISK else mem_name
        where = f"{name} unit {u} (offset {h.offset(f, u)})"
        if (f, u) != last:
            error(f"{where} is one version ahead of the ledger but not the most recent write")
        elif excess:
            error(f"{where} is ahead of the ledger, which is ahead of the write count")
    if res.error_count == 0:
        res.in_flight = 1 if ahead or excess else 0
    res.ok = res.error_count == 0
    return res


def _check_file(
    f: Any,
    name: str,
    file_id: int,
    h: Header,
    ledger: array[int],
    error: Any,
    ahead: list[tuple[int, int]],
) -> None:
    size = h.unit_size
    n = h.units(file_id)
    base_off = h.offset(file_id, 0)
    lbase = h.ledger_index(file_id, 0)
    chunk_units = max(1, (8 << 20) // size)
    buf = bytearray(chunk_units * size)
    zeros = bytes(len(buf))
    gen = h.generation
    last = (h.last_file, h.last_unit)
    for first in range(0, n, chunk_units):
        cnt = min(chunk_units, n - first)
        length = cnt * size
        f.seek(base_off + first * size)
        view = memoryview(buf)
        got = 0
        while got < length:
            r = f.readinto(view[got:length])
            if not r:
                break
            got += r
        view.release()
        buf[got:length] = bytes(length - got)  # past EOF reads as zeros; the size is an error
        versions = ledger[lbase + first : lbase + first + cnt]
        if not any(versions) and buf.startswith(memoryview(zeros)[:length]):
            continue
        for i, v in enumerate(versions):
            off = i * size
            u = first + i
            if _is_version(buf, off, file_id, u, v, gen, size):
                continue
            if _is_version(buf, off, file_id, u, v + 1, gen, size) and (
                STAMP.unpack_from(buf, off)[4] == gen
            ):
                ahead.append((file_id, u))
                continue
            if (file_id, u) == last and _classify_torn(buf, off, file_id, u, v, gen, size):
                ahead.append((file_id, u))
                continue
            where = f"{name} unit {u} (offset {base_off + u * size})"
            error(f"{where}: {_describe(buf, off, file_id, u, v, gen, size)}")


def _describe(
    data: bytearray, off: int, file_id: int, unit: int, v: int, gen: int, size: int
) -> str:
    """Say what is wrong with a unit that failed, as precisely as the stamp allows."""
    if v == 0:
        return "never written, yet not all zeros"
    magic, f, u, ver, g = STAMP.unpack_from(data, off)
    if magic != BLOCK_MAGIC:
        if data.startswith(bytes(size), off):
            return f"all zeros, the ledger says version {v} (lost write)"
        return f"no stamp, the ledger says version {v}"
    if (f, u) != (file_id, unit):
        return f"holds the stamp of file {f} unit {u} (misplaced write)"
    if ver < v:
        return f"holds version {ver}, the ledger says {v} (lost write: old content)"
    if ver > v + 1:
        return f"holds version {ver}, the ledger says only {v}"
    if ver == v + 1 and g != gen:
        return f"holds version {ver} of generation {g}, ahead of the ledger ({v})"
    if not 1 <= g <= gen:
        return f"stamp names generation {g}, the VM is at {gen}"
    expect = filler(file_id, unit, ver, size)
    at = next((i for i in range(32, size) if data[off + i] != expect[i]), 0)
    return f"version {ver} content differs at byte {at} of the unit"


# --- CLI -------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line: what is wrong and where to look, not a usage dump.
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _number(lo: float, hi: float | None, what: str, strict: bool = False) -> Any:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        ok = (v > lo if strict else v >= lo) and (hi is None or v <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"python -m migrator.{PROG}",
        description="A simulated VM that stamps every write, so that a migrated copy of its "
        "disk and memory files can be verified byte for byte.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser, metavar="COMMAND")

    def files(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("dir", metavar="DIR", help="directory of the VM files (e.g. a blkfs mount)")
        sp.add_argument("--disk-name", default="disk.raw", help="disk file (default disk.raw)")
        sp.add_argument("--mem-name", default="vm.mem", help="memory file (default vm.mem)")

    c = sub.add_parser("create", help="create a sparse disk and a memory file with a header")
    files(c)
    c.add_argument("--disk-size", type=_size, required=True, metavar="SIZE", help="e.g. 64M")
    c.add_argument("--mem-size", type=_size, required=True, metavar="SIZE", help="e.g. 32M")
    c.add_argument(
        "--unit", type=_size, default=4096, metavar="SIZE", help="stamping unit (default 4096)"
    )
    c.add_argument("--seed", type=int, default=1, help="seed of the hot set and writes")
    c.add_argument("--force", action="store_true", help="overwrite existing files")

    r = sub.add_parser("run", help="write at a rate until --seconds pass or SIGTERM")
    files(r)
    r.add_argument(
        "--rate",
        type=_number(0, None, "a rate >= 0"),
        required=True,
        metavar="MIB_S",
        help="MiB/s of writes, one unit each (0: as fast as possible)",
    )
    r.add_argument("--seconds", type=_number(0, None, "a positive number", strict=True))
    r.add_argument("--hot-fraction", type=_number(0, 1, "between 0 and 1"), default=0.1)
    r.add_argument("--hot-share", type=_number(0, 1, "between 0 and 1"), default=0.9)
    r.add_argument("--resume", action="store_true", help="continue a VM that ran before")
    r.add_argument("--mem-share", type=_number(0, 1, "between 0 and 1"), metavar="F",
                   help="fraction of writes that go to memory (default: by size)")

    k = sub.add_parser("check", help="verify every unit of both files (exit 1 if not ok)")
    files(k)
    k.add_argument("--json", action="store_true", help="print the full result as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; every failure is one line on stderr and a non-zero exit."""
    a = build_parser().parse_args(argv)
    try:
        if a.cmd == "create":
            h = create(
                a.dir,
                a.disk_name,
                a.mem_name,
                disk_size=a.disk_size,
                mem_size=a.mem_size,
                unit=a.unit,
                seed=a.seed,
                overwrite=a.force,
            )
            print(
                f"created {a.disk_name} ({h.disk_units} units) and {a.mem_name} "
                f"({h.mem_units} units after {1 + h.ledger_pages} header+ledger pages)"
            )
            return 0
        if a.cmd == "run":
            t0 = time.monotonic()
            n = run(
                a.dir,
                a.disk_name,
                a.mem_name,
                rate_mb_s=a.rate,
                seconds=a.seconds,
                hot_fraction=a.hot_fraction,
                hot_share=a.hot_share,
                resume=a.resume,
                mem_share=a.mem_share,
            )
            h = read_header(a.dir, a.mem_name)
            print(f"{n} writes in {time.monotonic() - t0:.2f} s (generation {h.generation})")
            return 0
        res = check(a.dir, a.disk_name, a.mem_name)
        if a.json:
            print(json.dumps(asdict(res)))
        if res.ok:
            if not a.json:
                print(
                    f"ok: {res.units_checked} units checked, {res.written_units} written, "
                    f"{res.total_writes} writes, generation {res.generation}, "
                    f"in flight {res.in_flight}"
                )
            return 0
        more = f" (and {res.error_count - 1} more)" if res.error_count > 1 else ""
        print(f"{PROG}: check failed: {res.errors[0]}{more}", file=sys.stderr)
        return 1
    except SimVMError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
