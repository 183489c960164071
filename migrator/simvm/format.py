"""The on-disk format of the simulated VM, and the pure functions that read it.

The writer (writer.py) and the checker (check.py) share these definitions; nothing here starts a
process or handles a signal.

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

Order of a write: header ``last_*``, data (memory: filler first, stamp last), ledger entry,
header ``total_writes``.  A SIGSTOP can land anywhere in that order, so `check` accepts exactly
one in-flight write, and only the most recent one: its unit may be ahead of the ledger (even torn
between the two versions, for memory), or the ledger may be one ahead of ``total_writes``.
``run(resume=True)`` completes such a write before going on.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import random
import struct
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path

PAGE = 4096
MAGIC = b"SIMVM001"
BLOCK_MAGIC = b"SVMBLK01"
DISK, MEM = 0, 1
NO_FILE = 0xFFFFFFFF
MIN_UNIT = 512
MAX_UNIT = 1 << 20

HEADER = struct.Struct("<8sIQQQQIQIQ")
OFF_TOTAL = struct.calcsize("<8sIQQ")
OFF_GENERATION = struct.calcsize("<8sIQQQQI")
OFF_LAST = struct.calcsize("<8sIQQQQIQ")
STAMP = struct.Struct("<8sIQIQ")  # 32 bytes
STAMP_FIXED = struct.calcsize("<8sIQ")  # magic, file_id, unit: equal in every version
LAST = struct.Struct("<IQ")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
FILL_KEY = struct.Struct("<IQI")

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
    pattern = hashlib.blake2b(FILL_KEY.pack(file_id, unit, version), digest_size=64).digest()
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


def ledger_from(raw: bytes | bytearray | mmap.mmap, h: Header) -> array[int]:
    n = h.disk_units + h.mem_units
    ledger = array("I")
    ledger.frombytes(raw[PAGE : PAGE + 4 * n])
    if sys.byteorder != "little":
        ledger.byteswap()
    return ledger


def classify_torn(
    data: bytes | bytearray, off: int, file_id: int, unit: int, v: int, gen: int, size: int
) -> bool:
    """True if the unit is an interrupted write from version v to v+1: every byte from either.

    Only the generation field is read as a whole (the old version's writer is unknown)."""
    new = unit_content(file_id, unit, v + 1, gen, size)
    old = unit_content(file_id, unit, v, 1, size)  # generation bytes are checked apart
    got = data[off : off + size]
    if len(got) != size:
        return False
    stamp_gen = U64.unpack_from(got, 24)[0]
    if not (v == 0 and stamp_gen == 0) and not 1 <= stamp_gen <= gen:
        return False
    if got[:24] == new[:24] or got[:24] == old[:24]:
        pass
    elif any(g != a and g != b for g, a, b in zip(got[:24], old[:24], new[:24], strict=True)):
        return False
    if got.startswith(new[32:], 32) or got.startswith(old[32:], 32):
        return True
    return all(g in (a, b) for g, a, b in zip(got[32:], old[32:], new[32:], strict=True))


@functools.cache
def _zeros(size: int) -> bytes:
    return bytes(size)


def is_version(
    data: bytes | bytearray, off: int, file_id: int, unit: int, v: int, max_gen: int, size: int
) -> bool:
    """True if the unit at `off` is exactly version v, from any generation up to max_gen."""
    if v == 0:
        return data.startswith(_zeros(size), off)
    magic, f, u, ver, g = STAMP.unpack_from(data, off)
    if magic != BLOCK_MAGIC or (f, u, ver) != (file_id, unit, v) or not 1 <= g <= max_gen:
        return False
    return data.startswith(memoryview(filler(file_id, unit, v, size))[32:], off + 32)


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
    return h, ledger_from(bytes(PAGE) + raw, h)
