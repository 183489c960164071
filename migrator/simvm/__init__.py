"""A simulated VM whose every write can be proven present after a migration.

The migrator's demo, tests and benchmark need a VM that writes like a real one (a disk through
``pwrite``, RAM through a shared ``mmap``, most writes on a few hot blocks) and whose files can be
checked byte for byte on the destination.  This is it: a process that stamps every write with
(file, unit, version, generation), keeping the latest versions in a ledger *inside the memory
file*, the way a real VM's state lives in its RAM: migrate ``vm.mem`` and the VM can resume on the
destination from it.

It is a test tool, not part of the migrator: it imports nothing of the engine (only the
pure size parser and one-line argument errors of blkfs).
format.py holds the on-disk format (pure), writer.py the VM (create, run), check.py the checker,
cli.py the command (``python -m migrator.simvm create|run|check``).
"""

from .check import MAX_ERRORS, CheckResult, check
from .cli import PROG, build_parser, main
from .format import (
    BLOCK_MAGIC,
    DISK,
    HEADER,
    MAGIC,
    MAX_UNIT,
    MEM,
    MIN_UNIT,
    NO_FILE,
    OFF_GENERATION,
    OFF_LAST,
    OFF_TOTAL,
    PAGE,
    STAMP,
    STAMP_FIXED,
    Header,
    SimVMError,
    filler,
    hot_units,
    layout,
    parse_header,
    read_header,
    read_ledger,
    unit_content,
)
from .writer import create, run

__all__ = [
    "BLOCK_MAGIC",
    "DISK",
    "HEADER",
    "MAGIC",
    "MAX_ERRORS",
    "MAX_UNIT",
    "MEM",
    "MIN_UNIT",
    "NO_FILE",
    "OFF_GENERATION",
    "OFF_LAST",
    "OFF_TOTAL",
    "PAGE",
    "PROG",
    "STAMP",
    "STAMP_FIXED",
    "CheckResult",
    "Header",
    "SimVMError",
    "build_parser",
    "check",
    "create",
    "filler",
    "hot_units",
    "layout",
    "main",
    "parse_header",
    "read_header",
    "read_ledger",
    "run",
    "unit_content",
]
