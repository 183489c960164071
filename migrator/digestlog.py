"""The destination's digests of what it received, kept so a later session can verify.

A destination knows a block arrived intact only by its digest of what it wrote, compared with
the source's after the resume.  Those digests live in the `migrator serve` process; if it dies
after the switchover, the session that the source reattaches (protocol.Reattach) would have
nothing to compare with.  So once the VM runs, the destination writes them to a file beside
its state record, and a reattached session reads them back.  Pure: bytes in, bytes out.

Format: a magic line, one JSON line ({"migration", "block_size", "files": [[file_id, n]...]}),
then per file n little-endian (block, xxh3) u64 pairs, then the xxh3-64 of all of it, so a
torn or foreign file is refused (read as "no digests"), never trusted.
"""

from __future__ import annotations

import json
import struct
from array import array
from itertools import chain

import xxhash

MAGIC = b"migrator-digests 1\n"
_SUM = struct.Struct("<Q")


class DigestLogError(ValueError):
    pass


def encode(migration: str, block_size: int, digests: dict[int, dict[int, int]]) -> bytes:
    """The file for {file_id: {block: xxh3}}."""
    files = sorted(digests)
    head = json.dumps({"migration": migration, "block_size": block_size,
                       "files": [[fid, len(digests[fid])] for fid in files]}).encode()
    parts = [MAGIC, head, b"\n"]
    for fid in files:
        pairs = array("Q", chain.from_iterable(digests[fid].items()))
        if pairs.itemsize != 8:  # pragma: no cover (every platform we run on)
            raise DigestLogError("array('Q') is not 64-bit here")
        if struct.pack("=H", 1) != struct.pack("<H", 1):  # pragma: no cover
            pairs.byteswap()
        parts.append(pairs.tobytes())
    body = b"".join(parts)
    return body + _SUM.pack(xxhash.xxh3_64_intdigest(body))


def decode(data: bytes, migration: str, block_size: int) -> dict[int, dict[int, int]]:
    """{file_id: {block: xxh3}} of a file written by encode for this migration."""
    if len(data) < len(MAGIC) + _SUM.size or not data.startswith(MAGIC):
        raise DigestLogError("not a digest log")
    body, (total,) = data[:-_SUM.size], _SUM.unpack(data[-_SUM.size:])
    if xxhash.xxh3_64_intdigest(body) != total:
        raise DigestLogError("the digest log is torn or corrupt (its checksum differs)")
    end = body.index(b"\n", len(MAGIC))
    try:
        head = json.loads(body[len(MAGIC):end])
        files = [(int(fid), int(n)) for fid, n in head["files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DigestLogError(f"the digest log's header is bad: {exc}") from None
    if head.get("migration") != migration or head.get("block_size") != block_size:
        raise DigestLogError(f"the digest log is of migration {head.get('migration')}, "
                             f"not {migration}")
    out: dict[int, dict[int, int]] = {}
    pos = end + 1
    for fid, n in files:
        chunk = body[pos:pos + 16 * n]
        if len(chunk) != 16 * n:
            raise DigestLogError("the digest log is shorter than its header says")
        pairs = array("Q")
        pairs.frombytes(chunk)
        if struct.pack("=H", 1) != struct.pack("<H", 1):  # pragma: no cover
            pairs.byteswap()
        it = iter(pairs)
        out[fid] = dict(zip(it, it, strict=True))
        pos += 16 * n
    if pos != len(body):
        raise DigestLogError("the digest log is longer than its header says")
    return out
