"""migrator.codecs (pure): compression that pays or is not used, and decompression that
yields exactly the stated size or is refused."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.codecs import CODECS, CodecError, compressor, decompress, packed

TEXT = b"".join(b"guest log line %d: all is well\n" % i for i in range(4000))


@pytest.mark.parametrize("name", ["zstd", "lz4"])
def test_compressible_data_round_trips_and_random_data_is_left_alone(name: str) -> None:
    c = compressor(name)
    small = packed(c, TEXT)
    assert small is not None and len(small) < len(TEXT) // 4
    assert decompress(CODECS[name], small, len(TEXT)) == TEXT
    assert packed(c, os.urandom(65536)) is None  # does not pay: sent as Blocks


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["zstd", "lz4"]), st.binary(min_size=1, max_size=5000),
       st.integers(1, 8))
def test_round_trip_of_anything(name: str, data: bytes, repeat: int) -> None:
    raw = data * repeat
    assert decompress(CODECS[name], compressor(name)(raw), len(raw)) == raw


@pytest.mark.parametrize("name", ["zstd", "lz4"])
def test_a_lying_peer_is_refused(name: str) -> None:
    small = compressor(name)(TEXT)
    with pytest.raises(CodecError):
        decompress(CODECS[name], small, len(TEXT) - 1)  # it says fewer bytes than it holds
    with pytest.raises(CodecError):
        decompress(CODECS[name], small, len(TEXT) + 1)  # or more
    with pytest.raises(CodecError):
        decompress(CODECS[name], b"\x00garbage" * 10, len(TEXT))
    with pytest.raises(CodecError, match="unknown codec"):
        decompress(77, small, len(TEXT))
