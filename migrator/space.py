"""What a migration will allocate on the destination's disk, against what is free there (pure).

A thin image takes on disk what its data takes, not its size: a 1 TiB image holding 64 MiB
lands as 64 MiB (the destination writes data runs, never the holes, into a sparse file). So
the check counts, per file, the source's allocation plus a margin for what the VM writes into
holes during the rounds, less what the destination's copy of the file already takes, and never
more than the file's size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from blkfs.cliutil import human_bytes

from .protocol import FileEntry

MARGIN_SHARE = 16  # for the rounds: a 16th of the file's data, for what the VM writes into
MARGIN_MIN = 1 << 20  # holes meanwhile (1 MiB at least); a disk that fills later still ends
# the migration cleanly ("destination disk full writing ..."): this only refuses early


def margin(allocated: int) -> int:
    return max(MARGIN_MIN, allocated // MARGIN_SHARE)


@dataclass(frozen=True, slots=True)
class SpaceNeed:
    """Bytes the migration may allocate here (`need`), of them the source's data (`data`) less
    what is here (`held`), and what is free (`free`)."""

    need: int
    data: int
    held: int
    free: int

    @classmethod
    def of(cls, files: Iterable[FileEntry], held: Mapping[str, int], free: int) -> SpaceNeed:
        """`held`: bytes each destination file (by name) takes now (0: none yet)."""
        need = data = here = 0
        for f in files:
            h = held.get(f.name, 0)
            data += f.allocated
            here += h
            need += max(0, min(f.size, f.allocated + margin(f.allocated)) - h)
        return cls(need, data, here, free)

    @property
    def short(self) -> bool:
        return self.need > self.free

    def words(self, where: str) -> str:
        """The refusal's line: both figures, and where they come from."""
        held = f", less {human_bytes(self.held)} already here" if self.held else ""
        return (f"the migration needs {human_bytes(self.need)} ({self.need} bytes: the "
                f"source's {human_bytes(self.data)} of data{held}, plus room for the rounds) "
                f"and {where} has {human_bytes(self.free)} ({self.free} bytes) free; free "
                "space there or choose another destination")
