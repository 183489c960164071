"""The daemon's settings, their defaults and their checks (pure and light: the `blkfs mount`
command reads its arguments with this module, not numpy, trio or pyfuse3, before it starts
the daemon: 0.4 s of CPU less for each mount)."""

from __future__ import annotations

import os
from dataclasses import dataclass

META_DIR = ".blkfs"  # the hidden metadata directory at the backing root
DEFAULT_HALF_LIFE = 60.0  # s in which a block's heat halves
DEFAULT_STATIC_HEAT = 1.0  # heat at or under which a block is static
DEFAULT_DIRTY_LIMIT = 1 << 30  # bytes a writeback mount may hold dirty in the page cache

MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 1 << 20
DEFAULT_BLOCK_SIZE = 64 * 1024


def check_block_size(size: int) -> int:
    """Return log2(size), or raise ValueError if size is not an allowed block size."""
    if size < MIN_BLOCK_SIZE or size > MAX_BLOCK_SIZE or size & (size - 1):
        raise ValueError(f"block size {size} is not a power of two between 4K and 1M")
    return size.bit_length() - 1


def parse_size(text: str) -> int:
    """Parse '64K', '1M', '4096', '2G' (binary units) into bytes."""
    units = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num = t.rstrip("KMGT")
    unit = t[len(num) :]
    if not num or unit not in units:
        raise ValueError(f"cannot read {text!r} as a size (examples: 4096, 64K, 1M)")
    try:
        value = int(num)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size (examples: 4096, 64K, 1M)") from None
    if value < 0:
        raise ValueError(f"size {text!r} is negative")
    return value * units[unit]


class QuietError(Exception):
    """A user error: printed as one line, no traceback."""

    def __init__(self, msg: str, exitcode: int = 1) -> None:
        super().__init__(msg)
        self.exitcode = exitcode


@dataclass
class MountOptions:
    backing: str
    mountpoint: str
    block_size: int
    half_life: float
    static_heat: float
    tracking: bool = True
    xattr: bool = False
    allow_other: bool = False
    control: str | None = None
    debug: bool = False
    spill: str | None = None  # a spill area to show read-only as MOUNTPOINT/.spill
    writeback: bool = False  # the kernel's writeback cache (docs/tracking.md, "Writeback")
    nonempty: bool = False  # mount over files in the mount point (hidden until the unmount)
    dirty_limit: int = DEFAULT_DIRTY_LIMIT  # bytes a writeback mount may hold dirty

    @property
    def meta_dir(self) -> str:
        return os.path.join(self.backing, META_DIR)
