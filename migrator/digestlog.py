"""The destination's digests of what it received, kept so a later session can verify.

A destination knows a block arrived intact only by its digest of what it wrote, compared with
the source's after the resume.  Those digests live in the `migrator serve` process; if it dies
after the switchover, the session that the source reattaches (protocol.Reattach) would have
nothing to compare with.  So once the VM runs, the destination writes them to a file beside
its state record, and a reattached session reads them back.  Pure: bytes in, bytes out.

Format 2: a magic line, one JSON line ({"migration", "block_size", "files": [[file_id, n, z]
...]}), then per file n little-endian (block, xxh3) u64 pairs and z (first block, count) u64
pairs of its runs of zero blocks (a thin image's holes: a 4 TiB image holding 64 MiB writes
its 1,024 digests and a few runs, not 64 Mi of them), then the xxh3-64 of all of it, so a torn
or foreign file is refused (read as "no digests"), never trusted. Format 1 (no runs, files
[[file_id, n]...]) is still read.
"""

from __future__ import annotations

import json
import struct
from array import array
from collections.abc import Iterable, Iterator
from itertools import chain

import xxhash

from .blockdigests import BlockDigests

MAGIC = b"migrator-digests 2\n"
MAGIC_1 = b"migrator-digests 1\n"
_SUM = struct.Struct("<Q")


class DigestLogError(ValueError):
    pass


def _u64s(values: Iterable[int]) -> bytes:
    out = array("Q", values)
    if out.itemsize != 8:  # pragma: no cover (every platform we run on)
        raise DigestLogError("array('Q') is not 64-bit here")
    if struct.pack("=H", 1) != struct.pack("<H", 1):  # pragma: no cover
        out.byteswap()
    return out.tobytes()


def _pairs(raw: bytes) -> Iterator[tuple[int, int]]:
    values = array("Q")
    values.frombytes(raw)
    if struct.pack("=H", 1) != struct.pack("<H", 1):  # pragma: no cover
        values.byteswap()
    it = iter(values)
    return zip(it, it, strict=True)


def encode(migration: str, block_size: int, digests: dict[int, BlockDigests]) -> bytes:
    """The file for {file_id: BlockDigests}."""
    files = sorted(digests)
    head = json.dumps({"migration": migration, "block_size": block_size, "files": [
        [fid, len(digests[fid].data), len(digests[fid].zeros.starts)] for fid in files]}).encode()
    parts = [MAGIC, head, b"\n"]
    for fid in files:
        parts.append(_u64s(chain.from_iterable(digests[fid].data.items())))
        parts.append(_u64s(chain.from_iterable(digests[fid].zeros)))
    body = b"".join(parts)
    return body + _SUM.pack(xxhash.xxh3_64_intdigest(body))


def decode(data: bytes, migration: str, block_size: int) -> dict[int, BlockDigests]:
    """{file_id: BlockDigests} of a file written by encode (or format 1) for this migration."""
    magic = MAGIC if data.startswith(MAGIC) else MAGIC_1 if data.startswith(MAGIC_1) else None
    if len(data) < len(MAGIC) + _SUM.size or magic is None:
        raise DigestLogError("not a digest log")
    body, (total,) = data[:-_SUM.size], _SUM.unpack(data[-_SUM.size:])
    if xxhash.xxh3_64_intdigest(body) != total:
        raise DigestLogError("the digest log is torn or corrupt (its checksum differs)")
    end = body.index(b"\n", len(magic))
    try:
        head = json.loads(body[len(magic):end])
        files = [(int(x[0]), int(x[1]), int(x[2]) if magic == MAGIC else 0)
                 for x in head["files"]]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise DigestLogError(f"the digest log's header is bad: {exc}") from None
    if head.get("migration") != migration or head.get("block_size") != block_size:
        raise DigestLogError(f"the digest log is of migration {head.get('migration')}, "
                             f"not {migration}")
    out: dict[int, BlockDigests] = {}
    pos = end + 1
    for fid, n, z in files:
        chunk = body[pos:pos + 16 * (n + z)]
        if len(chunk) != 16 * (n + z):
            raise DigestLogError("the digest log is shorter than its header says")
        got = out[fid] = BlockDigests(dict(_pairs(chunk[:16 * n])))
        for first, count in _pairs(chunk[16 * n:]):
            got.zeros.add(first, first + count)
        pos += 16 * (n + z)
    if pos != len(body):
        raise DigestLogError("the digest log is longer than its header says")
    return out
