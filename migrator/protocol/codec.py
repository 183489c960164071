"""Events to frames and back, and the checks every field passes on the way (both ways).

Frame: u8 type, u32 big-endian payload length, payload.  Control frames carry a compact JSON
object whose keys are exactly the event's fields (bytes as lowercase hex): a key missing or
unknown is a peer of another protocol, which its version should have said, and is refused.
The one exception is PostcopyDone's figures, read leniently (see PostcopyFigures).  Blocks,
Packed, Digests, Held, SpillRefs and DeviceState are binary.  Nothing here knows the state:
whether a frame may be sent now is state.py's question; sealing it is sealing.py's.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, fields
from itertools import pairwise

from .events import (
    ANSWER_STATUSES,
    EVENT_OF,
    ROLES,
    TYPE_OF,
    Abort,
    AbortCode,
    Absent,
    Answer,
    Auth,
    Blocks,
    Commit,
    DeviceState,
    Digests,
    Done,
    Event,
    Fetch,
    FileAttrs,
    FileEntry,
    Held,
    Hello,
    Lineage,
    Manifest,
    MismatchError,
    Packed,
    Pages,
    Postcopy,
    PostcopyDone,
    PostcopyFigures,
    ProtocolError,
    Query,
    Ready,
    Reattach,
    Resize,
    Resumed,
    RoundAck,
    RoundDone,
    SlotFree,
    SpillFlushed,
    SpillRefs,
    Switchover,
    Verified,
    VerifyDone,
    Zero,
    ZeroDigests,
)
from .fields import (
    check_bytes32,
    check_file_name,
    check_ids,
    check_int,
    check_pairs,
    check_text,
    show,
)
from .limits import (
    HEADER,
    MAX_BLOCK_SIZE,
    MAX_BLOCKS_DATA,
    MAX_COUNT,
    MAX_DIGESTS_PER_FRAME,
    MAX_FILE_SIZE,
    MAX_FILES,
    MAX_ITEMS_PER_FRAME,
    MAX_PAGE_RANGES,
    MAX_PATH,
    MAX_PAYLOAD,
    MAX_REASON,
    MAX_SLOTS,
    MIN_BLOCK_SIZE,
    PROTOCOL_VERSION,
    U32,
    U64,
)

BLOCKS_HEAD = struct.Struct(">IQ")  # file_id, first_block; the data follows
_PACKED = struct.Struct(">IQBI")  # file_id, first_block, codec, size; the compressed data
_PAGES = struct.Struct(">IBI")  # file_id, codec, number of ranges; the ranges, then the data
PAGE_RANGE = struct.Struct(">QI")  # offset, length
_DIGESTS = struct.Struct(">IQI")  # file_id, first_block, count; count u64 follow
DIGESTS_HEAD = _DIGESTS.size  # bytes of a Digests/Held payload before its u64 digests
SPILL_REF = struct.Struct(">IQIQ")  # one of SpillRefs: file_id, block, slot, generation
_HEX_FIELDS = frozenset({"nonce", "mac"})  # bytes fields, as lowercase hex in JSON
_HEX_DIGITS = frozenset("0123456789abcdef")


def _check_manifest(m: Manifest) -> None:
    check_text(m.migration, 64, "Manifest.migration")
    check_text(m.vm, 64, "Manifest.vm")
    if "/" in m.vm or m.vm.startswith("."):
        raise ProtocolError(f"Manifest.vm {show(m.vm)} is not a VM id")
    check_text(m.vm_name, 128, "Manifest.vm_name")
    check_int(m.generation, 0, U32, "Manifest.generation")
    if type(m.delta) is not bool:
        raise ProtocolError(f"Manifest.delta must be true or false, not {show(m.delta)}")
    if type(m.replica) is not bool:
        raise ProtocolError(f"Manifest.replica must be true or false, not {show(m.replica)}")
    check_text(m.lineage, 128, "Manifest.lineage")
    check_ids(m.lineage_files, "Manifest.lineage_files")
    if m.lineage_files and not m.lineage:
        raise ProtocolError("Manifest.lineage_files without a lineage")
    bs = check_int(m.block_size, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE, "block_size")
    if bs & (bs - 1):
        raise ProtocolError(f"block_size {bs} is not a power of two")
    if type(m.files) is not tuple:
        raise ProtocolError("Manifest.files must be a tuple of FileEntry")
    if len(m.files) > MAX_FILES:
        raise ProtocolError(f"manifest lists {len(m.files)} files, more than {MAX_FILES}")
    ids: set[int] = set()
    names: set[str] = set()
    for entry in m.files:
        if type(entry) is not FileEntry:
            raise ProtocolError(f"manifest entry {show(entry)} is not a FileEntry")
        check_int(entry.file_id, 0, MAX_FILES - 1, "file_id")
        check_file_name(entry.name)
        check_int(entry.size, 0, MAX_FILE_SIZE, f"size of {show(entry.name)}")
        check_int(entry.allocated, 0, MAX_FILE_SIZE, f"allocation of {show(entry.name)}")
        if entry.file_id in ids:
            raise ProtocolError(f"manifest has file_id {entry.file_id} twice")
        if entry.name in names:
            raise ProtocolError(f"manifest has file name {show(entry.name)} twice")
        ids.add(entry.file_id)
        names.add(entry.name)
    if not set(m.lineage_files) <= ids:
        raise ProtocolError("Manifest.lineage_files names a file that is not in the manifest")
    # sorted by components, a path that is a directory of others is directly followed by one
    for a, b in pairwise(sorted(tuple(name.split("/")) for name in names)):
        if b[: len(a)] == a:
            raise ProtocolError(f"{show('/'.join(a))} is both a file and a directory")


def _check_page_ranges(ranges: object) -> None:
    if type(ranges) is not tuple or not 1 <= len(ranges) <= MAX_PAGE_RANGES:
        raise ProtocolError(f"Pages.ranges must be a tuple of 1 to {MAX_PAGE_RANGES} ranges")
    end = 0
    for r in ranges:
        if type(r) is not tuple or len(r) != 2:
            raise ProtocolError(f"Pages range {show(r)} is not (offset, length)")
        off = check_int(r[0], 0, MAX_FILE_SIZE, "Pages range offset")
        n = check_int(r[1], 1, MAX_BLOCKS_DATA, "Pages range length")
        if off < end:
            raise ProtocolError("Pages ranges must ascend without overlapping")
        end = off + n


def check_event(event: Event) -> None:
    """Raise ProtocolError unless every field of `event` has the right type and range.

    These are the rules that need no context; Connection adds those that depend on the state,
    the manifest and the handshake."""
    match event:
        case Hello():
            check_int(event.version, 0, U32, "Hello.version")
            if event.role not in ROLES:
                raise ProtocolError(f"Hello.role must be source or dest, not {show(event.role)}")
            check_bytes32(event.nonce, "Hello.nonce")
            if type(event.sealed) is not bool:
                raise ProtocolError(f"Hello.sealed must be true or false, not "
                                    f"{show(event.sealed)}")
        case Auth():
            check_bytes32(event.mac, "Auth.mac")
        case Manifest():
            _check_manifest(event)
        case Blocks():
            check_int(event.file_id, 0, U32, "Blocks.file_id")
            check_int(event.first_block, 0, U64, "Blocks.first_block")
            if type(event.data) is not bytes:
                raise ProtocolError(f"Blocks.data must be bytes, not {type(event.data).__name__}")
            if len(event.data) > MAX_BLOCKS_DATA:
                raise ProtocolError(f"Blocks carry {len(event.data)} bytes, more than 8 MiB")
        case Resize():
            check_int(event.file_id, 0, U32, "Resize.file_id")
            check_int(event.size, 0, MAX_FILE_SIZE, "Resize.size")
        case RoundDone():
            check_int(event.round, 0, MAX_COUNT, "RoundDone.round")
            check_int(event.blocks, 0, MAX_COUNT, "RoundDone.blocks")
            check_int(event.bytes, 0, MAX_COUNT, "RoundDone.bytes")
        case RoundAck():
            check_int(event.round, 0, MAX_COUNT, "RoundAck.round")
        case Resumed():
            if type(event.ms) not in (int, float) or not 0 <= event.ms < math.inf:
                raise ProtocolError(f"Resumed.ms must be a finite number >= 0, not {event.ms!r}")
        case Digests():
            check_int(event.file_id, 0, U32, "Digests.file_id")
            check_int(event.first_block, 0, U64, "Digests.first_block")
            if type(event.digests) is not tuple:
                raise ProtocolError("Digests.digests must be a tuple of u64")
            check_int(len(event.digests), 1, MAX_DIGESTS_PER_FRAME, "number of digests")
        case Verified():
            if type(event.ok) is not bool:
                raise ProtocolError(f"Verified.ok must be a bool, not {type(event.ok).__name__}")
            check_int(event.mismatches, 0, MAX_COUNT, "Verified.mismatches")
            check_text(event.detail, MAX_REASON, "Verified.detail")
            if event.ok and event.mismatches:
                raise ProtocolError(f"Verified says ok with {event.mismatches} mismatches")
        case Abort():
            check_text(event.reason, MAX_REASON, "Abort.reason")
            check_int(event.owner_generation, -1, U32, "Abort.owner_generation")
            if event.code not in set(AbortCode):
                raise ProtocolError(f"Abort.code {show(event.code)} is not one of "
                                    f"{sorted(AbortCode)}")
        case Postcopy():
            check_text(event.migration, 64, "Postcopy.migration")
            check_text(event.spill, MAX_PATH, "Postcopy.spill")
            check_int(event.slots, 1, MAX_SLOTS, "Postcopy.slots")
        case Absent():
            check_int(event.file_id, 0, U32, "Absent.file_id")
            check_pairs(event.extents, "Absent.extents")
        case SpillRefs():
            if type(event.refs) is not tuple or not all(
                    type(r) is tuple and len(r) == 4 for r in event.refs):
                raise ProtocolError("SpillRefs.refs must be a tuple of 4-tuples")
            check_int(len(event.refs), 1, MAX_ITEMS_PER_FRAME, "number of refs")
            for f, b, sl, g in event.refs:
                check_int(f, 0, U32, "ref file_id")
                check_int(b, 0, U64, "ref block")
                check_int(sl, 0, MAX_SLOTS - 1, "ref slot")
                check_int(g, 1, U64, "ref generation")
        case SpillFlushed():
            check_int(event.pages, 0, MAX_COUNT, "SpillFlushed.pages")
        case Fetch():
            check_int(event.file_id, 0, U32, "Fetch.file_id")
            check_int(event.first_block, 0, U64, "Fetch.first_block")
            check_int(event.count, 1, MAX_BLOCKS_DATA // MIN_BLOCK_SIZE, "Fetch.count")
        case SlotFree():
            check_pairs(event.slots, "SlotFree.slots")
        case PostcopyDone():
            if type(event.stats) is not PostcopyFigures:
                raise ProtocolError("PostcopyDone.stats must be PostcopyFigures")
            for f in fields(PostcopyFigures):
                v = getattr(event.stats, f.name)
                if f.type == "int":
                    check_int(v, 0, MAX_COUNT, f"PostcopyDone.{f.name}")
                elif type(v) is not float or not 0 <= v < math.inf:
                    raise ProtocolError(f"PostcopyDone.{f.name} must be a finite number >= 0")
        case DeviceState():
            if type(event.data) is not bytes or not event.data:
                raise ProtocolError("DeviceState.data must be non-empty bytes")
            if len(event.data) > MAX_BLOCKS_DATA:
                raise ProtocolError(f"DeviceState carries {len(event.data)} bytes, more than "
                                    "8 MiB")
        case Commit():
            check_int(event.generation, 0, MAX_COUNT, "Commit.generation")
            check_attrs(event.attrs)
        case Query():
            check_text(event.migration, 64, "Query.migration")
        case Zero():
            check_int(event.file_id, 0, U32, "Zero.file_id")
            check_int(event.first_block, 0, U64, "Zero.first_block")
            check_int(event.count, 1, U64, "Zero.count")
        case ZeroDigests():
            check_int(event.file_id, 0, U32, "ZeroDigests.file_id")
            check_int(event.first_block, 0, U64, "ZeroDigests.first_block")
            check_int(event.count, 1, U64, "ZeroDigests.count")
        case Pages():
            check_int(event.file_id, 0, U32, "Pages.file_id")
            check_int(event.codec, 0, 255, "Pages.codec")
            _check_page_ranges(event.ranges)
            if not isinstance(event.data, (bytes, bytearray)) or not event.data:
                raise ProtocolError("Pages.data must be bytes, and not empty")
            if event.codec == 0 and len(event.data) != event.size:
                raise ProtocolError(f"Pages carry {len(event.data)} bytes for ranges of "
                                    f"{event.size}")
            if len(event.data) > MAX_BLOCKS_DATA:
                raise ProtocolError(f"Pages carry {len(event.data)} bytes, more than 8 MiB")
        case Packed():
            check_int(event.file_id, 0, U32, "Packed.file_id")
            check_int(event.first_block, 0, U64, "Packed.first_block")
            check_int(event.codec, 1, 255, "Packed.codec")
            check_int(event.size, 1, MAX_BLOCKS_DATA, "Packed.size")
            if type(event.data) is not bytes or not event.data:
                raise ProtocolError("Packed.data must be bytes, and not empty")
            if len(event.data) > MAX_BLOCKS_DATA:
                raise ProtocolError(f"Packed carries {len(event.data)} bytes, more than 8 MiB")
        case Reattach():
            check_text(event.migration, 64, "Reattach.migration")
            check_int(event.generation, 0, MAX_COUNT, "Reattach.generation")
            if type(event.postcopy) is not bool:
                raise ProtocolError("Reattach.postcopy must be a bool")
        case Lineage():
            check_ids(event.accepted, "Lineage.accepted")
            check_text(event.detail, MAX_REASON, "Lineage.detail")
        case Answer():
            check_text(event.migration, 64, "Answer.migration")
            if event.status not in ANSWER_STATUSES:
                raise ProtocolError(f"Answer.status must be one of {', '.join(ANSWER_STATUSES)}, "
                                    f"not {show(event.status)}")
            check_int(event.generation, 0, MAX_COUNT, "Answer.generation")
            check_text(event.detail, MAX_REASON, "Answer.detail")
        case Ready() | Switchover() | VerifyDone() | Done():
            pass
        case _:
            raise ProtocolError(f"{show(event)} is not a protocol event")


def encode(event: Event) -> bytes:
    """One frame for `event`, after check_event (whether the state allows it is not checked)."""
    code, parts, size = encode_parts(event)
    return b"".join([HEADER.pack(code, size), *parts])  # one copy of the data


def encode_parts(event: Event) -> tuple[int, list[bytes | bytearray | memoryview], int]:
    """(frame type, the payload in pieces, its size): encode() joins them, a sealed send
    encrypts them one after the other into the frame it writes."""
    check_event(event)
    if type(event) is Blocks:
        parts = [BLOCKS_HEAD.pack(event.file_id, event.first_block), event.data]
    elif type(event) is Packed:
        parts = [_PACKED.pack(event.file_id, event.first_block, event.codec, event.size),
                 event.data]
    elif type(event) is Pages:
        parts = [_PAGES.pack(event.file_id, event.codec, len(event.ranges)),
                 b"".join(PAGE_RANGE.pack(o, n) for o, n in event.ranges), event.data]
    elif type(event) in (Digests, Held):
        try:
            digests = struct.pack(f">{len(event.digests)}Q", *event.digests)
        except struct.error:
            raise ProtocolError("every digest must be an integer in 0..2**64-1") from None
        parts = [_DIGESTS.pack(event.file_id, event.first_block, len(event.digests)), digests]
    elif type(event) is SpillRefs:
        parts = [b"".join(SPILL_REF.pack(*r) for r in event.refs)]
    elif type(event) is DeviceState:
        parts = [event.data]
    else:
        obj = {f.name: getattr(event, f.name) for f in fields(event)}
        for name in _HEX_FIELDS & obj.keys():
            obj[name] = obj[name].hex()
        if "files" in obj:
            obj["files"] = [asdict(entry) for entry in obj["files"]]
        if isinstance(event, Commit):
            obj["attrs"] = [{**asdict(a), "xattrs": [[n, v.hex()] for n, v in a.xattrs]}
                            for a in event.attrs]
        if "stats" in obj:
            obj["stats"] = asdict(obj["stats"])
        parts = [json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()]
    size = sum(map(len, parts))
    if size > MAX_PAYLOAD:
        name = type(event).__name__
        raise ProtocolError(f"{name} needs {size} bytes, more than {MAX_PAYLOAD}")
    return TYPE_OF[type(event)], parts, size


def check_header(code: int, length: int) -> type[Event]:
    """The event class of a frame header; ProtocolError for an unknown type or a payload
    over the limit (before any of it is read)."""
    cls = EVENT_OF.get(code)
    if cls is None:
        raise ProtocolError(f"unknown frame type {code:#04x}")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"{cls.__name__} frame of {length} bytes is over the limit of "
                            f"{MAX_PAYLOAD}")
    return cls


def decode(frame: bytes) -> Event:
    """The event in one whole frame (header included); ProtocolError if it is not exactly one."""
    if len(frame) < HEADER.size:
        raise ProtocolError(f"a frame is at least {HEADER.size} bytes, not {len(frame)}")
    code, length = HEADER.unpack_from(frame)
    cls = check_header(code, length)
    if len(frame) != HEADER.size + length:
        raise ProtocolError(f"frame says {length} payload bytes, has {len(frame) - HEADER.size}")
    return decode_payload(cls, frame[HEADER.size :])


def decode_payload(cls: type[Event], payload: bytes) -> Event:
    """The `cls` event in `payload` (a frame without its header), checked like a sent one."""
    name = cls.__name__
    if cls is Blocks:
        if len(payload) < BLOCKS_HEAD.size:
            raise ProtocolError(f"Blocks frame of {len(payload)} bytes is shorter than its header")
        file_id, first = BLOCKS_HEAD.unpack_from(payload)
        event: Event = Blocks(file_id, first, payload[BLOCKS_HEAD.size :])
    elif cls is Packed:
        if len(payload) <= _PACKED.size:
            raise ProtocolError(f"Packed frame of {len(payload)} bytes carries no data")
        file_id, first, codec, size = _PACKED.unpack_from(payload)
        event = Packed(file_id, first, codec, size, payload[_PACKED.size :])
        check_event(event)
    elif cls is Pages:
        if len(payload) < _PAGES.size:
            raise ProtocolError(f"Pages frame of {len(payload)} bytes is shorter than its header")
        file_id, codec, count = _PAGES.unpack_from(payload)
        check_int(count, 1, MAX_PAGE_RANGES, "number of page ranges")
        head = _PAGES.size + count * PAGE_RANGE.size
        if len(payload) <= head:
            raise ProtocolError(f"Pages frame of {len(payload)} bytes is shorter than its "
                                f"{count} ranges")
        ranges = tuple(PAGE_RANGE.iter_unpack(payload[_PAGES.size:head]))
        event = Pages(file_id, ranges, payload[head:], codec)
    elif cls in (Digests, Held):
        if len(payload) < _DIGESTS.size:
            raise ProtocolError(f"Digests frame of {len(payload)} bytes is shorter than its header")
        file_id, first, count = _DIGESTS.unpack_from(payload)
        check_int(count, 1, MAX_DIGESTS_PER_FRAME, "number of digests")
        if len(payload) != _DIGESTS.size + 8 * count:
            raise ProtocolError(f"Digests frame says {count} digests but carries "
                                f"{len(payload) - _DIGESTS.size} bytes of them")
        event = cls(file_id, first, struct.unpack_from(f">{count}Q", payload, _DIGESTS.size))
    elif cls is DeviceState:
        event = DeviceState(payload)
    elif cls is SpillRefs:
        if not payload or len(payload) % SPILL_REF.size:
            raise ProtocolError(f"SpillRefs frame of {len(payload)} bytes is not whole refs")
        event = SpillRefs(tuple(SPILL_REF.iter_unpack(payload)))
    else:
        obj = _load_json(payload, name)
        if cls is Hello and type(obj.get("version")) is int and obj["version"] != PROTOCOL_VERSION:
            raise MismatchError(f"peer speaks protocol version {obj['version']}, "
                                f"we speak {PROTOCOL_VERSION}: run the same migrator on both "
                                "hosts")
        args = _exact_keys(obj, [f.name for f in fields(cls)], name)
        for key in _HEX_FIELDS & args.keys():
            args[key] = _unhex(args[key], f"{name}.{key}")
        if "files" in args:
            args["files"] = _files(args["files"])
        if cls is Commit:
            args["attrs"] = _attrs(args["attrs"])
        for key in ("lineage_files", "accepted"):
            if key in args and type(args[key]) is list:
                args[key] = tuple(args[key])
        for key in ("extents", "slots"):
            if key in args and cls in (Absent, SlotFree):
                args[key] = _pair_list(args[key], f"{name}.{key}")
        if cls is PostcopyDone:
            args["stats"] = _figures(args["stats"])
        if cls is Resumed and type(args["ms"]) is int:  # a JSON peer may write 12 for 12.0
            args["ms"] = float(args["ms"]) if abs(args["ms"]) < 2**53 else math.inf
        event = cls(**args)
    check_event(event)
    return event


def _load_json(payload: bytes, name: str) -> dict[str, object]:
    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise ProtocolError(f"{name} has a key twice")
        return obj

    def no_constants(word: str) -> object:
        raise ProtocolError(f"{name} contains {word}, which is not JSON")

    try:
        obj = json.loads(payload.decode(), object_pairs_hook=no_duplicates,
                         parse_constant=no_constants)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"{name} payload is not a JSON object: {exc}") from None
    if type(obj) is not dict:
        raise ProtocolError(f"{name} payload must be a JSON object, not {type(obj).__name__}")
    return obj


def _exact_keys(obj: object, names: list[str], what: str) -> dict[str, object]:
    if type(obj) is not dict:
        raise ProtocolError(f"{what} must be a JSON object, not {type(obj).__name__}")
    missing, extra = set(names) - obj.keys(), obj.keys() - set(names)
    if missing:
        raise ProtocolError(f"{what} lacks {', '.join(sorted(missing))}")
    if extra:
        raise ProtocolError(f"{what} has unexpected keys {show(sorted(extra))}")
    return dict(obj)


def _unhex(value: object, what: str) -> bytes:
    if type(value) is not str or len(value) % 2 or not set(value) <= _HEX_DIGITS:
        raise ProtocolError(f"{what} must be lowercase hex, not {show(value)}")
    return bytes.fromhex(value)


def _pair_list(value: object, what: str) -> tuple[tuple[int, int], ...]:
    if type(value) is not list or len(value) > MAX_ITEMS_PER_FRAME:
        raise ProtocolError(f"{what} must be a list of at most {MAX_ITEMS_PER_FRAME} pairs")
    if not all(type(x) is list and len(x) == 2 for x in value):
        raise ProtocolError(f"{what} must be a list of [a, b] pairs")
    return tuple((x[0], x[1]) for x in value)


MAX_XATTRS = 64  # user.* extended attributes carried for one file
MAX_XATTR_VALUE = 65536  # the kernel's limit for one value


def check_attrs(attrs: object) -> None:
    if type(attrs) is not tuple or len(attrs) > MAX_FILES:
        raise ProtocolError("Commit.attrs must be a tuple of at most MAX_FILES FileAttrs")
    ids: set[int] = set()
    for a in attrs:
        if type(a) is not FileAttrs:
            raise ProtocolError(f"Commit.attrs entry {show(a)} is not a FileAttrs")
        check_int(a.file_id, 0, MAX_FILES - 1, "FileAttrs.file_id")
        if a.file_id in ids:
            raise ProtocolError(f"Commit.attrs has file_id {a.file_id} twice")
        ids.add(a.file_id)
        check_int(a.mode, 0, 0o7777, "FileAttrs.mode")
        check_int(a.uid, 0, U32, "FileAttrs.uid")
        check_int(a.gid, 0, U32, "FileAttrs.gid")
        check_int(a.atime_ns, 0, U64, "FileAttrs.atime_ns")
        check_int(a.mtime_ns, 0, U64, "FileAttrs.mtime_ns")
        if type(a.xattrs) is not tuple or len(a.xattrs) > MAX_XATTRS:
            raise ProtocolError(f"FileAttrs.xattrs must be a tuple of at most {MAX_XATTRS}")
        for x in a.xattrs:
            if (type(x) is not tuple or len(x) != 2 or type(x[0]) is not str
                    or not x[0].startswith("user.") or not 5 < len(x[0]) <= 255
                    or "\0" in x[0] or type(x[1]) is not bytes
                    or len(x[1]) > MAX_XATTR_VALUE):
                raise ProtocolError(f"FileAttrs.xattrs entry {show(x)} is not a (user.NAME, "
                                    "value) pair")


def _attrs(value: object) -> tuple[FileAttrs, ...]:
    if type(value) is not list or len(value) > MAX_FILES:
        raise ProtocolError("Commit.attrs must be a list of at most MAX_FILES objects")
    keys = [f.name for f in fields(FileAttrs)]
    out = []
    for item in value:
        args = _exact_keys(item, keys, "Commit.attrs entry")
        xs = args["xattrs"]
        if type(xs) is not list or not all(type(x) is list and len(x) == 2
                                            and type(x[1]) is str for x in xs):
            raise ProtocolError("FileAttrs.xattrs must be a list of [name, hex] pairs")
        args["xattrs"] = tuple((x[0], _unhex(x[1], "FileAttrs.xattrs")) for x in xs)
        out.append(FileAttrs(**args))  # type: ignore[arg-type]
    return tuple(out)


def _files(value: object) -> tuple[FileEntry, ...]:
    if type(value) is not list:
        raise ProtocolError(f"Manifest.files must be a list, not {type(value).__name__}")
    if len(value) > MAX_FILES:
        raise ProtocolError(f"manifest lists {len(value)} files, more than {MAX_FILES}")
    keys = [f.name for f in fields(FileEntry)]
    return tuple(FileEntry(**_exact_keys(item, keys, "manifest entry")) for item in value)


def _figures(value: object) -> PostcopyFigures:
    """PostcopyDone's figures from JSON, leniently (see PostcopyFigures): unknown figures are
    dropped and missing ones read 0, but those given must be numbers of the right kind."""
    if type(value) is not dict:
        raise ProtocolError(f"PostcopyDone.stats must be a JSON object, not {show(value)}")
    args: dict[str, int | float] = {}
    for f in fields(PostcopyFigures):
        if f.name not in value:
            continue
        v = value[f.name]
        if f.type == "int":
            args[f.name] = check_int(v, 0, MAX_COUNT, f"PostcopyDone.stats: {f.name}")
        elif type(v) in (int, float) and 0 <= v < 2**1023:  # an int past it is no float
            args[f.name] = float(v)
        else:
            raise ProtocolError(f"PostcopyDone.stats: {f.name} must be a finite number >= 0, "
                                f"not {show(v)}")
    return PostcopyFigures(**args)
