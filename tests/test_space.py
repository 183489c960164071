"""The destination's space check (migrator/space.py): a thin image counts by its data."""

from __future__ import annotations

from migrator.protocol import FileEntry
from migrator.space import MARGIN_MIN, SpaceNeed

TIB, MIB = 1 << 40, 1 << 20


def test_a_thin_image_needs_its_data_and_a_margin_not_its_size() -> None:
    thin = FileEntry(0, "disk.raw", 4 * TIB, 64 * MIB)
    need = SpaceNeed.of([thin], {}, free=100 * MIB)
    assert need.need == 68 * MIB and not need.short  # (a 16th of the data for the rounds)
    assert SpaceNeed.of([thin], {}, free=67 * MIB).short
    tiny = FileEntry(0, "vm.mem", 4 * TIB, 4096)
    assert SpaceNeed.of([tiny], {}, 0).need == 4096 + MARGIN_MIN


def test_a_dense_file_needs_at_most_its_size_and_what_is_here_counts() -> None:
    dense = FileEntry(0, "vm.mem", 8 * MIB, 8 * MIB)
    assert SpaceNeed.of([dense], {}, 0).need == 8 * MIB  # never more than the size
    assert SpaceNeed.of([dense], {"vm.mem": 8 * MIB}, 0).need == 0  # an older copy is here
    big = FileEntry(1, "disk.raw", TIB, 1 << 30)  # margin: a 16th of the data
    assert SpaceNeed.of([dense, big], {"disk.raw": 512 * MIB}, 0).need == (
        8 * MIB + (1 << 30) + (1 << 26) - 512 * MIB)


def test_the_refusal_gives_both_figures_and_the_way_out() -> None:
    need = SpaceNeed.of([FileEntry(0, "disk.raw", TIB, 64 * MIB)], {"disk.raw": 1 * MIB},
                        free=10 * MIB)
    words = need.words("/srv/vms")
    assert words.startswith("the migration needs 67.0 MiB (70254592 bytes: the source's "
                            "64.0 MiB of data, less 1.0 MiB already here")
    assert "/srv/vms has 10.0 MiB (10485760 bytes) free" in words
    assert words.endswith("free space there or choose another destination")
