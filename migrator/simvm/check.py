"""Verify every byte of a VM's files against its ledger: the proof that a migration lost nothing.

Apart from the writer because it runs on a copy (the destination of a migration) that no writer
has opened, and reports every problem instead of stopping at the first.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .format import (
    BLOCK_MAGIC,
    DISK,
    MEM,
    STAMP,
    Header,
    classify_torn,
    filler,
    is_version,
    read_ledger,
)

MAX_ERRORS = 20


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
            if is_version(buf, off, file_id, u, v, gen, size):
                continue
            if is_version(buf, off, file_id, u, v + 1, gen, size) and (
                STAMP.unpack_from(buf, off)[4] == gen
            ):
                ahead.append((file_id, u))
                continue
            if (file_id, u) == last and classify_torn(buf, off, file_id, u, v, gen, size):
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
