"""Optional compression of block data on the wire (pure: no I/O, no trio).

For slow links (`migrate --compress zstd|lz4`). Each run of blocks the source sends is
compressed, and goes compressed only if that pays (at most PAYS of its size); random data or
encrypted disks go as they are, so the option costs CPU but never bytes. The destination
decompresses into exactly the size the frame states, and the verification's block digests
prove the result like any other block.
"""

from __future__ import annotations

from collections.abc import Callable

import lz4.block
import zstandard

CODECS = {"zstd": 1, "lz4": 2}  # the codec byte of a Packed frame
NAMES = {v: k for k, v in CODECS.items()}
PAYS = 0.9  # send compressed only when it saves at least a tenth
ZSTD_LEVEL = 1  # ~0.5-1 GB/s a core: the link is slow, the CPU should not become so


class CodecError(ValueError):
    """Data that does not decompress to what its frame says."""


def compressor(name: str) -> Callable[[bytes | memoryview], bytes]:
    """A function that compresses one run of blocks with codec `name`."""
    if name == "zstd":
        zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        return zc.compress
    if name == "lz4":
        return lambda data: lz4.block.compress(data, store_size=False)
    raise ValueError(f"unknown codec {name!r} (zstd or lz4)")


def packed(compress: Callable[[bytes | memoryview], bytes], data: bytes) -> bytes | None:
    """`data` compressed, or None if that does not pay."""
    out = compress(data)
    return out if len(out) <= len(data) * PAYS else None


def decompress(codec: int, data: bytes | bytearray, size: int) -> bytes:
    """The `size` bytes `data` holds; CodecError if it holds anything else."""
    try:
        if codec == CODECS["zstd"]:
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        elif codec == CODECS["lz4"]:
            out = lz4.block.decompress(data, uncompressed_size=size)
        else:
            raise CodecError(f"unknown codec {codec}")
    except (zstandard.ZstdError, lz4.block.LZ4BlockError) as exc:
        raise CodecError(f"{NAMES.get(codec, codec)} data does not decompress: {exc}") from None
    if len(out) != size:
        raise CodecError(f"{NAMES[codec]} data decompresses to {len(out)} bytes, not {size}")
    return out
