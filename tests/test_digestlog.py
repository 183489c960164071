"""The destination's digest log (pure): round trip, and a torn or foreign log is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrator import digestlog
from migrator.blockdigests import BlockDigests

U64 = st.integers(0, 2**64 - 1)


def bd(data: dict[int, int], zeros: tuple[tuple[int, int], ...] = ()) -> BlockDigests:
    out = BlockDigests(dict(data))
    for first, count in zeros:
        out.zeros.add(first, first + count)
    return out


@given(st.dictionaries(st.integers(0, 100), st.tuples(
    st.dictionaries(U64, U64, max_size=50),
    st.lists(st.tuples(st.integers(0, 2**62), st.integers(1, 2**40)), max_size=5)),
    max_size=5))
def test_round_trip(files: dict[int, tuple[dict[int, int], list[tuple[int, int]]]]) -> None:
    digests = {fid: bd(d, tuple(z)) for fid, (d, z) in files.items()}
    data = digestlog.encode("m-1", 4096, digests)
    assert digestlog.decode(data, "m-1", 4096) == digests


def test_a_4_tib_hole_is_one_run_and_a_format_1_log_still_reads() -> None:
    thin = bd({0: 7, (1 << 26) - 1: 8}, ((1, (1 << 26) - 2),))
    data = digestlog.encode("m-1", 65536, {0: thin})
    assert len(data) < 200 and digestlog.decode(data, "m-1", 65536) == {0: thin}
    import json
    import struct

    import xxhash

    body = (digestlog.MAGIC_1 + json.dumps({"migration": "m-1", "block_size": 4096,
                                            "files": [[3, 1]]}).encode() + b"\n"
            + struct.pack("<QQ", 5, 99))
    old = body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
    assert digestlog.decode(old, "m-1", 4096) == {3: bd({5: 99})}


def test_a_flipped_bit_anywhere_is_refused() -> None:
    data = digestlog.encode("m-1", 4096, {0: bd({1: 2, 3: 4}, ((9, 3),)), 5: bd({6: 7})})
    for i in range(len(data)):
        torn = bytearray(data)
        torn[i] ^= 0x10
        with pytest.raises(digestlog.DigestLogError):
            digestlog.decode(bytes(torn), "m-1", 4096)


def test_a_truncated_log_is_refused() -> None:
    data = digestlog.encode("m-1", 4096, {0: bd({1: 2})})
    for n in range(len(data)):
        with pytest.raises(digestlog.DigestLogError):
            digestlog.decode(data[:n], "m-1", 4096)


@pytest.mark.parametrize(("migration", "bs"), [("m-2", 4096), ("m-1", 8192)])
def test_another_migrations_log_is_refused(migration: str, bs: int) -> None:
    data = digestlog.encode("m-1", 4096, {0: bd({1: 2})})
    with pytest.raises(digestlog.DigestLogError, match=r"not m-2|of migration"):
        digestlog.decode(data, migration, bs)
