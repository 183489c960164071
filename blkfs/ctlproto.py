"""The control socket's protocol (pure: no sockets, no trio, no FUSE).

One request type and one reply type per op, frozen dataclasses whose annotations are the
schema; one codec that the server and both clients (blocking and trio) use.  On the wire a
request is one JSON line ``{"op": "dirty", "file": "disk.raw", "swap": true}``, followed by
``data_len`` bytes of binary payload for the ops that carry one (the request's ``data``
field); a reply is one line ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error":
"..."}``, followed by ``data_len`` bytes for the replies with a bytes field (dirty sets and
heat runs: packed numbers read straight into an array, not base64 or JSON in the line).
Every field is checked against its annotation in one place (`conform`), on the way in on the
server and on the way back in the clients, and every limit is here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import numpy as np

MAX_REQUEST = 1 << 20  # bytes in one request or reply line
MAX_DATA = 16 << 20  # bytes of binary payload after a request line
MAX_REPLY_DATA = 1 << 30  # bytes of binary payload after a reply line (heat runs: 53M runs)
LAZY_WAIT_MAX = 5.0  # seconds a lazy_wait long poll may hold the connection
MAX_LISTED = 1000  # missing blocks listed in one reply (the count is exact)

Extent = tuple[int, int]


class ControlError(Exception):
    """A request the daemon refused (or could not be asked), with a message for the user."""


# Heat runs travel packed, 20 bytes a run, as the reply's payload: a million runs as JSON
# triples would be 15 MB and a second of encoding on each side, and as base64 in the line
# still 40 ms of encoding and decoding.
HEAT_RUN = np.dtype([("first", "<u8"), ("count", "<u4"), ("heat", "<f8")])


def pack_heat_runs(firsts: Any, counts: Any, heats: Any) -> bytes:
    runs = np.empty(len(firsts), dtype=HEAT_RUN)
    runs["first"], runs["count"], runs["heat"] = firsts, counts, heats
    return runs.tobytes()


# Dirty sets travel the same way, 16 bytes an extent: a swap of 160,000 scattered extents as
# JSON pairs took 180 ms of building, encoding, decoding and checking tuples.
EXTENT = np.dtype([("first", "<u8"), ("count", "<u8")])


def pack_extents(firsts: Any, counts: Any) -> bytes:
    exts = np.empty(len(firsts), dtype=EXTENT)
    exts["first"], exts["count"] = firsts, counts
    return exts.tobytes()


def unpack_extents(raw: bytes) -> np.ndarray:
    """A structured array with fields first, count; ControlError if malformed."""
    if len(raw) % EXTENT.itemsize:
        raise ControlError(f"extents: {len(raw)} bytes is not a whole number of extents")
    return np.frombuffer(raw, dtype=EXTENT)


def unpack_heat_runs(raw: bytes) -> np.ndarray:
    """A structured array with fields first, count, heat; ControlError if malformed."""
    if len(raw) % HEAT_RUN.itemsize:
        raise ControlError(f"heat runs: {len(raw)} bytes is not a whole number of runs")
    return np.frombuffer(raw, dtype=HEAT_RUN)


# -- requests and replies --------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    OP: ClassVar[str]
    Reply: ClassVar[type]

    def check(self) -> None:
        """Rules beyond the types (ranges between fields); raise ControlError."""


@dataclass(frozen=True)
class InfoReply:
    pid: int
    mountpoint: str
    backing: str
    block_size: int
    tracking: bool
    half_life: float
    static_heat: float
    frozen_all: bool
    faults: int
    trust_lost: bool = False  # a write may have gone unmarked: the state will not be saved
    postcopy_absent: int = 0  # blocks an incoming post-copy has not installed yet
    postcopy_missing: int = 0  # of those, given up for good (reads fail with EIO)
    postcopy_paused: str | None = None  # why nobody fetches them now
    writeback: bool = False  # the kernel's writeback cache: writes arrive at writeback
    dirty_limit: int = 0  # bytes the kernel may hold dirty for this mount (0: its default)


@dataclass(frozen=True)
class Info(Request):
    OP = "info"
    Reply = InfoReply


@dataclass(frozen=True)
class FileStatus:
    file: str
    size: int
    # None for a file that is not tracked (--no-tracking)
    block_size: int | None = None
    blocks: int | None = None
    epoch: int | None = None
    dirty: int | None = None
    static: int | None = None
    dynamic: int | None = None
    hottest: tuple[tuple[int, float], ...] = ()
    writes: int | None = None
    frozen: bool = False
    restored: bool = False


@dataclass(frozen=True)
class StatusReply(InfoReply):
    files: tuple[FileStatus, ...] = ()


@dataclass(frozen=True)
class Status(Request):
    OP = "status"
    Reply = StatusReply
    static_heat: float | None = None  # the split threshold for this query (default the mount's)


@dataclass(frozen=True)
class DirtyReply:
    file: str
    epoch: int
    block_size: int
    size: int
    runs: bytes  # the dirty extents, packed (pack_extents); the payload
    page_size: int = 0  # asked for pages: the runs are of pages of this size, not blocks

    @property
    def extents(self) -> list[Extent]:
        exts = unpack_extents(self.runs)
        return list(zip(exts["first"].tolist(), exts["count"].tolist(), strict=True))

    @property
    def blocks(self) -> int:
        """How many units (blocks, or pages when asked for pages) the runs hold."""
        return int(unpack_extents(self.runs)["count"].sum())

    @property
    def unit(self) -> int:
        return self.page_size or self.block_size

    def to_json(self) -> dict[str, Any]:
        """As people and scripts read it (`blkfs dirty --json`): the extents as pairs."""
        return {**to_dict(self), "extents": self.extents}


@dataclass(frozen=True)
class Dirty(Request):
    """The current epoch's dirty extents; with swap, end the epoch and return its set; with
    pages, in pages (the unit of tracking under a block), else in blocks."""

    OP = "dirty"
    Reply = DirtyReply
    file: str
    swap: bool = False
    pages: bool = False


@dataclass(frozen=True)
class ClearReply:
    file: str
    epoch: int


@dataclass(frozen=True)
class Clear(Request):
    """Forget these blocks' dirty marks: the caller is about to read them."""

    OP = "clear"
    Reply = ClearReply
    file: str
    extents: tuple[Extent, ...]


@dataclass(frozen=True)
class HeatReply:
    file: str
    block_size: int
    blocks: int
    half_life: float
    static_heat: float
    static: int
    dynamic: int
    dynamic_extents: tuple[Extent, ...]  # the first MAX_LISTED, in block order
    runs: bytes  # every written block's (first, count, heat) run: pack_heat_runs; the payload

    def heat_runs(self) -> np.ndarray:
        return unpack_heat_runs(self.runs)


@dataclass(frozen=True)
class Heat(Request):
    OP = "heat"
    Reply = HeatReply
    file: str
    static_heat: float | None = None


@dataclass(frozen=True)
class Count:
    count: int  # files frozen or thawed


@dataclass(frozen=True)
class Freeze(Request):
    """Hold writes to these files (every file when empty) until thaw."""

    OP = "freeze"
    Reply = Count
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class Thaw(Request):
    OP = "thaw"
    Reply = Count
    files: tuple[str, ...] = ()


@dataclass
class PostcopyStats:
    """Post-copy figures of the destination daemon, counted in place by lazy mode; the
    migrator reports them, and sends them in its own wire type (protocol.PostcopyFigures,
    converted by migrator/postcopy.py)."""

    demand_faults: int = 0  # reads (or writes) that waited for an absent block
    pages_via_spill: int = 0  # installed from a slot for a waiting read
    pages_via_drain: int = 0  # installed from a slot by the background drain
    pages_via_demand_fetch: int = 0  # fetched from the source over TCP
    generation_mismatches: int = 0  # slot reads refused as stale: the slot was reused
    hash_mismatches: int = 0  # refused as torn: changed during the read, or not its xxh3
    mac_mismatches: int = 0  # refused as forged: its xxh3 fits, its MAC does not
    refs_received: int = 0
    remaining: int = 0  # blocks still absent
    missing_count: int = 0  # absent blocks no one can supply any more
    demand_fault_p50_ms: float = 0.0
    demand_fault_p99_ms: float = 0.0
    postcopy_s: float = 0.0  # lazy mode on -> every block installed

    @property
    def pages_from_spill(self) -> int:
        return self.pages_via_spill + self.pages_via_drain

    @property
    def slot_reads_refused(self) -> int:
        return self.generation_mismatches + self.hash_mismatches + self.mac_mismatches


@dataclass(frozen=True)
class SpillReply:
    path: str
    exists: bool
    error: str | None = None  # why the area cannot be read (exists False)
    migration: str | None = None
    block_size: int = 0
    slots: int = 0
    in_use: int = 0
    free: int = 0
    unused: int = 0
    max_generation: int = 0
    slot_headers: tuple[tuple[int, int, int, int, int], ...] = ()  # slot, file, block, gen, flags
    postcopy_migration: str | None = None
    postcopy: PostcopyStats | None = None
    postcopy_paused: str | None = None


@dataclass(frozen=True)
class Spill(Request):
    OP = "spill"
    Reply = SpillReply
    slots: bool = False  # list every used slot's header


@dataclass(frozen=True)
class Punch(Request):
    """Make bytes [offset, offset+length) of FILE read as zeros, freeing their space (a zero
    run a migration writes over data): tracked as a write, the kernel's cache dropped."""

    OP = "punch"
    Reply = Count
    file: str
    offset: int
    length: int

    def check(self) -> None:
        if self.offset < 0 or self.length < 0:
            raise ControlError("punch: offset and length must be >= 0")


@dataclass(frozen=True)
class Written(Request):
    """Byte ranges of FILE a migration wrote into the backing file directly (the destination
    before its VM runs, to skip FUSE): tracked as writes, the kernel's cache dropped."""

    OP = "written"
    Reply = Count
    file: str
    ranges: tuple[Extent, ...]  # (offset, length) in bytes


@dataclass(frozen=True)
class LazyFileSpec:
    file_id: int
    file: str
    extents: tuple[Extent, ...]  # the absent blocks


@dataclass(frozen=True)
class Remaining:
    remaining: int  # blocks still absent


@dataclass(frozen=True)
class LazyBegin(Request):
    """Turn lazy mode on: these blocks are absent until installed (docs/spill.md)."""

    OP = "lazy_begin"
    Reply = Remaining
    migration: str
    block_size: int
    spill: str | None
    files: tuple[LazyFileSpec, ...]
    spill_key: str | None = None  # hex, 32 bytes: the spill area's MAC key (blkfs.spill)

    def check(self) -> None:
        if not self.files:
            raise ControlError("lazy_begin: files must not be empty")
        if self.spill is not None:
            try:
                ok = self.spill_key is not None and len(bytes.fromhex(self.spill_key)) == 32
            except ValueError:
                ok = False
            if not ok:
                raise ControlError("lazy_begin: a spill area needs its spill_key (64 hex "
                                   "digits): its slots are read only when their MAC verifies")


@dataclass(frozen=True)
class LazyRefs(Request):
    """Where absent pages are, as packed spill refs (blkfs.spill.pack_refs)."""

    OP = "lazy_refs"
    Reply = Remaining
    data: bytes
    migration: str | None = None  # which post-copy (none: the only one running)


@dataclass(frozen=True)
class Installed:
    installed: int
    remaining: int


@dataclass(frozen=True)
class LazyInstall(Request):
    """Blocks fetched from the source, from `first_block` on."""

    OP = "lazy_install"
    Reply = Installed
    file_id: int
    first_block: int
    data: bytes
    migration: str | None = None  # which post-copy (none: the only one running)


@dataclass(frozen=True)
class News:
    """What the migrator must carry to the source: blocks a reader waits for, slots freed."""

    wanted: tuple[tuple[int, int], ...] = ()  # (file_id, block)
    freed: tuple[tuple[int, int], ...] = ()  # (slot, generation)
    remaining: int = 0
    done: bool = False
    given_up: bool = False  # blocks still absent will never come (missing: EIO)
    missing: tuple[tuple[str, int], ...] = ()  # (file, block), the first MAX_LISTED
    missing_count: int = 0


@dataclass(frozen=True)
class LazyWait(Request):
    """Long poll: return the news at once if any, else within `timeout` seconds."""

    OP = "lazy_wait"
    Reply = News
    timeout: float = 1.0
    migration: str | None = None  # which post-copy (none: the only one running)

    def check(self) -> None:
        if self.timeout > LAZY_WAIT_MAX:
            raise ControlError(f"lazy_wait: timeout must be 0..{LAZY_WAIT_MAX} s")


@dataclass(frozen=True)
class LazyReportReply:
    stats: PostcopyStats
    digests: tuple[tuple[int, int, int], ...] = ()  # (file_id, block, xxh3) of installed pages


@dataclass(frozen=True)
class LazyReport(Request):
    OP = "lazy_report"
    Reply = LazyReportReply
    digests: bool = False
    migration: str | None = None  # which post-copy (none: the only one running)


@dataclass(frozen=True)
class SourceLostReply:
    found_in_spill: int
    news: News


@dataclass(frozen=True)
class LazySourceLost(Request):
    """The source is gone: complete from the spill headers, name what is missing."""

    OP = "lazy_source_lost"
    Reply = SourceLostReply
    migration: str | None = None  # which post-copy (none: the only one running)


@dataclass(frozen=True)
class LazyGiveUp(Request):
    """Every block still absent is missing for good: its readers get EIO (the documented
    way out when the spill area will never hold them, e.g. `blkfs umount --force`)."""

    OP = "lazy_give_up"
    Reply = Count
    migration: str | None = None  # which post-copy (none: every one running)


@dataclass(frozen=True)
class Reattached:
    remaining: int  # blocks still absent
    given_up: bool  # some will never come (lazy_give_up, or the area was flushed without them)


@dataclass(frozen=True)
class LazyReattach(Request):
    """A new migrator session of the running post-copy `migration` (its source reconnected
    after the old one went away): fetch for it again. Needs the claim on this connection."""

    OP = "lazy_reattach"
    Reply = Reattached
    migration: str


@dataclass(frozen=True)
class Claimed:
    migration: str


@dataclass(frozen=True)
class Claim(Request):
    """Take these files of the mount (a VM's) for one migration, sync or serve session, for
    as long as this connection is open: one at a time per file, whatever the processes, and
    any number at once for VMs whose files differ. No files: the whole mount."""

    OP = "claim"
    Reply = Claimed
    migration: str
    holder: str  # who, for the refusal's message (e.g. "migrator serve pid 123, from HOST")
    files: tuple[str, ...] = ()  # relative to the mount


OPS: dict[str, type[Request]] = {cls.OP: cls for cls in (
    Info, Status, Dirty, Clear, Heat, Freeze, Thaw, Spill, LazyBegin, LazyRefs, LazyInstall,
    LazyWait, LazyReport, LazySourceLost, LazyGiveUp, LazyReattach, Claim, Punch, Written)}


# -- checking values against annotations ------------------------------------------------------


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer >= 0"
    if tp is float:
        return "a number >= 0"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return f"an object ({', '.join(f.name for f in dataclasses.fields(tp))})"
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a)
                           for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            inner = args[0]
            if typing.get_origin(inner) is tuple:
                return f"a list of [{', '.join(_short(a) for a in typing.get_args(inner))}]"
            return f"a list of {_short(inner)}"
        return f"a list [{', '.join(_short(a) for a in args)}]"
    return str(tp)


def _short(tp: Any) -> str:
    return {int: "int", float: "number", str: "string", bool: "bool"}.get(tp, _describe(tp))


_EXTENTS = (Extent, Ellipsis)


def _extent_tuple(value: list[Any] | tuple[Any, ...]) -> tuple[Extent, ...] | None:
    """`value` as extents, or None if any is not a pair of non-negative ints."""
    try:
        out = tuple((f, c) for f, c in value)  # ValueError/TypeError unless all are pairs
    except (TypeError, ValueError):
        return None
    if all(type(f) is int and type(c) is int and f >= 0 and c >= 0 for f, c in out):
        return out
    return None


def conform(tp: Any, value: Any, what: str) -> Any:
    """`value` (from JSON, or from a caller) as the annotated type `tp`: lists become
    tuples, objects dataclasses; ControlError naming `what` if it does not fit."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is bool:
        if type(value) is bool:
            return value
    elif tp is int:
        if type(value) is int and value >= 0:  # bool is an int subclass: refused above
            return value
    elif tp is float:
        if type(value) in (int, float) and 0 <= value < math.inf:
            return float(value)
    elif tp is str:
        if type(value) is str:
            return value
    elif tp is bytes:
        if type(value) in (bytes, bytearray, memoryview):
            return bytes(value)
    elif origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return conform(a, value, what)
                except ControlError:
                    pass
    elif origin is tuple:
        args = typing.get_args(tp)
        if type(value) in (list, tuple):
            if args == _EXTENTS:  # the big lists (dirty sets): checked in one pass
                out = _extent_tuple(value)
                if out is not None:
                    return out
            elif len(args) == 2 and args[1] is Ellipsis:
                try:
                    return tuple(conform(args[0], v, what) for v in value)
                except ControlError:
                    if dataclasses.is_dataclass(args[0]):
                        raise  # its own message names the field inside
                    # else: the whole list is named below
            if len(value) == len(args):
                return tuple(conform(a, v, what) for a, v in zip(args, value, strict=True))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if type(value) is dict:
            return from_dict(tp, value, what)
    raise ControlError(f"{what} must be {_describe(tp)}, not {_show(value)}")


def _show(value: Any) -> str:
    text = json.dumps(value) if type(value) in (list, dict, str, int, float, bool) else repr(
        value)
    return text if len(text) <= 60 else text[:57] + "..."


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    h = _HINTS.get(cls)
    if h is None:
        h = _HINTS[cls] = typing.get_type_hints(cls)
    return h


def from_dict(cls: type, obj: dict[str, Any], what: str) -> Any:
    """A `cls` from a JSON object: unknown keys refused, missing ones take their default."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    extra = obj.keys() - names
    if extra:
        raise ControlError(f"{what}: unknown field {sorted(extra)[0]!r}")
    args = {}
    for f in dataclasses.fields(cls):
        if f.name in obj:
            args[f.name] = conform(hints[f.name], obj[f.name], f"{what}: {f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ControlError(f"{what}: {f.name} is required")
    return cls(**args)


def to_dict(obj: Any) -> Any:
    """A dataclass (or a value inside one) as JSON-ready data; bytes are left out."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not isinstance(getattr(obj, f.name), _BYTES)}
    if isinstance(obj, (tuple, list)) and obj and dataclasses.is_dataclass(obj[0]):
        return [to_dict(v) for v in obj]
    return obj  # json writes tuples of plain values as arrays: no copy of a dirty set


# -- the codec ---------------------------------------------------------------------------------


_BYTES = (bytes, bytearray, memoryview)


def _payload(req: Request) -> bytes | bytearray | memoryview:
    data = getattr(req, "data", b"")
    return data if isinstance(data, _BYTES) else b""


def encode_request(req: Request) -> bytes:
    data = _payload(req)
    if len(data) > MAX_DATA:
        raise ControlError(f"{req.OP}: {len(data)} bytes of data, more than {MAX_DATA}")
    obj = {"op": req.OP, **to_dict(req)}
    if data or "data" in {f.name for f in dataclasses.fields(req)}:
        obj["data_len"] = len(data)
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n" + data


def _bytes_field(cls: type) -> str | None:
    """The one field of a reply dataclass that travels as the payload, if it has one."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if hints[f.name] is bytes]
    return names[0] if names else None


def encode_reply(result: Any) -> bytes:
    """A reply line (a reply dataclass, or a ControlError for the user) and its payload."""
    data: bytes | bytearray | memoryview = b""
    if isinstance(result, ControlError):
        obj: dict[str, Any] = {"ok": False, "error": str(result)}
    else:
        obj = {"ok": True, "result": to_dict(result)}
        name = _bytes_field(type(result)) if dataclasses.is_dataclass(result) else None
        if name is not None:
            data = getattr(result, name)
            obj["data_len"] = len(data)
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n" + data


def take_reply(buf: bytearray) -> tuple[bytes, bytes] | None:
    """Client side: the first whole reply (line, payload) cut from `buf`, or None while it is
    still arriving."""
    end = buf.find(b"\n")
    if end == -1:
        return None
    need = _data_len(bytes(buf[:end]), MAX_REPLY_DATA)
    if len(buf) < end + 1 + need:
        return None
    line, data = bytes(buf[:end]), bytes(buf[end + 1:end + 1 + need])
    del buf[:end + 1 + need]
    return line, data


def decode_reply(line: bytes, req: Request, data: bytes = b"") -> Any:
    """The reply to `req` from its line and payload; ControlError with the daemon's message
    if refused."""
    try:
        obj = json.loads(line)
    except ValueError:
        raise ControlError("the daemon's reply is not JSON") from None
    if type(obj) is not dict or type(obj.get("ok")) is not bool:
        raise ControlError("the daemon's reply is not a control reply")
    if not obj["ok"]:
        raise ControlError(str(obj.get("error", "unknown error")))
    result = obj.get("result")
    name = _bytes_field(req.Reply) if dataclasses.is_dataclass(req.Reply) else None
    if name is not None and type(result) is dict:
        if obj.get("data_len", 0) != len(data):
            raise ControlError(f"reply to {req.OP}: its payload is not data_len bytes")
        if "data_len" in obj:
            result[name] = data
    elif data:
        raise ControlError(f"reply to {req.OP} carries a payload it should not")
    return conform(req.Reply, result, f"reply to {req.OP}")


class RequestReader:
    """Server side, sans-IO: bytes in, requests (or the error to answer) out, in order."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._line: bytes | None = None  # a parsed line waiting for its payload
        self._need = 0
        self.closed = False  # a fatal error was answered: the connection must end

    def feed(self, data: bytes) -> None:
        self._buf += data

    def wants(self) -> int:
        """Bytes still missing from the pending payload (a hint for the read size)."""
        return max(0, self._need - len(self._buf)) if self._line is not None else 0

    def __iter__(self) -> Iterator[Request | ControlError]:
        return self

    def __next__(self) -> Request | ControlError:
        if self.closed:
            raise StopIteration
        if self._line is None:
            end = self._buf.find(b"\n")
            if end == -1:
                if len(self._buf) > MAX_REQUEST:
                    self.closed = True
                    return ControlError("request too large")
                raise StopIteration
            self._line = bytes(self._buf[:end])
            del self._buf[:end + 1]
            self._need = _data_len(self._line)
        if len(self._buf) < self._need:
            raise StopIteration
        data = bytes(self._buf[:self._need])
        del self._buf[:self._need]
        line, self._line = self._line, None
        try:
            return decode_request(line, data)
        except ControlError as exc:
            return exc


def _data_len(line: bytes, limit: int = MAX_DATA) -> int:
    try:
        obj = json.loads(line)
    except ValueError:
        return 0
    n = obj.get("data_len", 0) if isinstance(obj, dict) else 0
    return n if type(n) is int and 0 <= n <= limit else 0


def decode_request(line: bytes, data: bytes = b"") -> Request:
    try:
        obj = json.loads(line)
    except ValueError:
        raise ControlError("request is not valid JSON") from None
    if type(obj) is not dict or type(obj.get("op")) is not str:
        raise ControlError('a request is a JSON object with an "op" string')
    op = obj.pop("op")
    cls = OPS.get(op)
    if cls is None:
        raise ControlError(f"unknown op {op!r}")
    n = obj.pop("data_len", 0)
    takes_data = "data" in {f.name for f in dataclasses.fields(cls)}
    if not takes_data and (n or data):
        raise ControlError(f"op {op!r} takes no data")
    if "data" in obj:
        raise ControlError(f"{op}: data travels as the payload, not in the JSON line")
    if takes_data:
        if type(n) is not int or n != len(data):
            raise ControlError(f"{op}: data_len must be the payload's length, at most {MAX_DATA}")
        obj["data"] = data
    req = from_dict(cls, obj, op)
    req.check()
    return req


