"""The destination's digest log (pure): round trip, and a torn or foreign log is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrator import digestlog

U64 = st.integers(0, 2**64 - 1)


@given(st.dictionaries(st.integers(0, 100), st.dictionaries(U64, U64, max_size=50), max_size=5))
def test_round_trip(digests: dict[int, dict[int, int]]) -> None:
    data = digestlog.encode("m-1", 4096, digests)
    assert digestlog.decode(data, "m-1", 4096) == digests


def test_a_flipped_bit_anywhere_is_refused() -> None:
    data = digestlog.encode("m-1", 4096, {0: {1: 2, 3: 4}, 5: {6: 7}})
    for i in range(len(data)):
        torn = bytearray(data)
        torn[i] ^= 0x10
        with pytest.raises(digestlog.DigestLogError):
            digestlog.decode(bytes(torn), "m-1", 4096)


def test_a_truncated_log_is_refused() -> None:
    data = digestlog.encode("m-1", 4096, {0: {1: 2}})
    for n in range(len(data)):
        with pytest.raises(digestlog.DigestLogError):
            digestlog.decode(data[:n], "m-1", 4096)


@pytest.mark.parametrize(("migration", "bs"), [("m-2", 4096), ("m-1", 8192)])
def test_another_migrations_log_is_refused(migration: str, bs: int) -> None:
    data = digestlog.encode("m-1", 4096, {0: {1: 2}})
    with pytest.raises(digestlog.DigestLogError, match=r"not m-2|of migration"):
        digestlog.decode(data, migration, bs)
