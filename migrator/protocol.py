"""The migration wire protocol as a sans-IO state machine (pure: no sockets, no trio, no I/O).

Like h11, a :class:`Connection` turns received bytes into events (``receive_data`` +
``next_event``) and events into bytes to write (``send``), and holds the one state table that says
who may send what when.  The I/O shell only moves bytes; every limit and check lives here, so a
broken or hostile peer is refused in one place and the whole protocol is tested in memory.

A session (S = source, D = dest; the right column is the state in which those frames are legal)::

    S                                         D
    Hello  ---------------------------------->        both at once, any order    HELLO
           <---------------------------------- Hello
    Auth   ---------------------------------->        each after the peer's      AUTH
           <---------------------------------- Auth   Hello (MAC binds nonces)
    Manifest -------------------------------->                                   MANIFEST
           <---------------------------------- Lineage  (a replica was named)    READY
           <---------------------------------- Held ...  (delta: what it holds)  READY
           <---------------------------------- Ready  files created              READY
    Blocks, Resize ..., RoundDone(n) -------->                                   COPYING
    Blocks, Resize ... (next round, pipelined)                                   ROUND_END
           <---------------------------------- RoundAck(n)  round n is written
    ... more rounds ...
    Switchover ------------------------------>        VM suspended               COPYING
    Blocks, Resize ..., Commit -------------->        the last set               SWITCHOVER
           <---------------------------------- Resumed(ms)                       RESUMING
    Digests ..., VerifyDone ----------------->        xxh3 of every block        VERIFYING
           <---------------------------------- Verified(ok, mismatches, detail)  VERDICT
    Done ------------------------------------>        both CLOSED                FINISHING

Post-copy (announced by Postcopy + Absent in SWITCHOVER) changes the end::

    Switchover, Postcopy, Absent ..., Blocks ..., Commit ->  pages left absent  SWITCHOVER
    SpillRefs ..., Blocks (fetched) ... ----->        from Commit on             RESUMING
           <---------------------------------- Fetch ..., SlotFree ...
           <---------------------------------- Resumed(ms)                       RESUMING
    SpillRefs ..., Blocks ..., SpillFlushed ->  <-- Fetch ..., SlotFree ...      POSTCOPY
           <---------------------------------- PostcopyDone(stats)  all installed
    (SpillRefs, Blocks, SpillFlushed already on the wire)                       POSTCOPY_END
    Digests ..., VerifyDone ----------------->                                   VERIFYING
           <---------------------------------- Verified(ok, mismatches, detail)  VERDICT
    Done ------------------------------------>        both CLOSED                FINISHING

A replica session (``Manifest.replica``: migrator sync) is the same up to the rounds, which go
on for as long as it runs; no Switchover is ever legal in it, so its destination is never
runnable.

Reattach: a source whose connection broke after Commit reconnects and, instead of a Manifest,
re-states the migration so the session can go on where it broke (the destination's record
decides whether it may)::

    Reattach(migration, epoch), Manifest, [Postcopy] ->                          REATTACH
           <---------------------------------- Answer(owner: go on; else CLOSED)
    (post-copy not finished: the POSTCOPY exchange above, from PostcopyDone on)  POSTCOPY
    (otherwise: Digests ..., VerifyDone, Verified, Done as above)                VERIFYING

A hypervisor's device state (DeviceState chunks, e.g. QEMU's migration stream with RAM left
out) may follow Switchover, before Commit, in either kind of session.

Abort(reason) may come from either side in any state but CLOSED (even before Auth); both sides
then end in ABORTED.  A broken rule from the peer moves the connection to ERROR for good.

Frame: u8 type, u32 big-endian payload length, payload.  Control frames carry a compact JSON object
whose keys are exactly the event's fields (bytes as lowercase hex); Blocks and Digests are binary.
The handshake proves that the peer knows the shared key.  Every frame after a side's Auth is
sealed (unless both sides run with ``sealed=False``, ``--insecure-plaintext``): AES-256-GCM under
a key of that direction's own, derived with HKDF from the shared key and both nonces, the nonce
being the frame's number in its direction and the 5-byte header the associated data.  The header
stays in clear (it frames the stream) but is authenticated; the payload is ciphertext plus a
16-byte tag.  A frame changed, dropped, replayed or moved on the way fails its tag: the
connection goes to ERROR with a TamperedError before the frame is parsed.  See docs/migration.md
("The channel") for the threat model.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from itertools import pairwise
from types import MappingProxyType
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import AEADDecryptionContext, Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blkfs.ctlproto import ControlError, PostcopyStats, conform
from blkfs.spill import REF as _REF
from blkfs.spill import pack_refs, unpack_refs

PROTOCOL_VERSION = 7  # 2: the handoff (Manifest.migration, Commit.epoch, Query/Answer);
# 3: Reattach, Zero; 4: Packed; 5: sealed frames (Hello.sealed), Held (Manifest.delta);
# 6: replica sessions (Manifest.replica, migrator sync), Lineage (Manifest.lineage);
# 7: VM identity (Manifest.vm, vm_name, generation; Abort.owner_generation)
MAX_PAYLOAD = 8 * 2**20 + 64  # one Blocks frame of MAX_BLOCKS_DATA plus its header, with room
HEADER = struct.Struct(">BI")  # frame type, payload length
TAG_SIZE = 16  # AES-GCM's tag, after each sealed payload
MAX_FRAME = HEADER.size + MAX_PAYLOAD + TAG_SIZE  # the most unparsed input a peer can make us hold
MAX_BLOCKS_DATA = 8 * 2**20
MAX_DIGESTS_PER_FRAME = 65536
MAX_ITEMS_PER_FRAME = 65536  # extents in Absent, refs in SpillRefs, slots in SlotFree
MAX_SLOTS = 1 << 24
MAX_PATH = 4096
MAX_DEVICE_STATE = 256 * 2**20  # a hypervisor's device state (QEMU: ~0.4-1 MiB) in all
MAX_FILES = 1024
MAX_FILE_SIZE = 2**50
MAX_NAME_BYTES = 4096
MAX_COMPONENT_BYTES = 255  # NAME_MAX on Linux: longer names cannot be created anyway
MAX_REASON = 1000
NONCE_SIZE = 32
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 4096, 2**20
SOURCE, DEST = "source", "dest"
ANSWER_STATUSES = ("owner", "refused", "unknown", "incomplete")
ROLES = (SOURCE, DEST)

_U32, _U64, _MAX_COUNT = 2**32 - 1, 2**64 - 1, 2**63 - 1
_BLOCKS = struct.Struct(">IQ")  # file_id, first_block; the data follows
_PACKED = struct.Struct(">IQBI")  # file_id, first_block, codec, size; the compressed data
BIG_DATA = 1 << 18  # Blocks frames from this size on are received into their own buffer
_DIGESTS = struct.Struct(">IQI")  # file_id, first_block, count; count u64 follow
DIGESTS_HEAD = _DIGESTS.size  # bytes of a Digests/Held payload before its u64 digests
_MAC_CONTEXT = b"blkfs-migrator/1|"
_SEAL_CONTEXT = b"blkfs-migrator/5 frames|"


class ProtocolError(Exception):
    """A rule of the protocol was broken; the message says which."""


class LocalProtocolError(ProtocolError):
    """We tried to send something illegal: nothing was sent and the state did not change."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something illegal: the connection is now in ERROR."""


class AuthenticationError(RemoteProtocolError):
    """The peer's Auth MAC is wrong: it does not know the shared key."""


class MismatchError(RemoteProtocolError):
    """The peer is a migrator set up differently (protocol version, --insecure-plaintext)."""


class TamperedError(RemoteProtocolError):
    """A sealed frame fails its tag: changed, dropped, replayed, reordered or cut on the way."""


# -- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of each side: who it is and a fresh nonce, so a MAC cannot be replayed;
    `sealed` says whether its frames after Auth are sealed (both sides must agree)."""

    version: int
    role: str
    nonce: bytes
    sealed: bool = True


@dataclass(frozen=True, slots=True)
class Auth:
    """Proof that the sender knows the shared key: HMAC over its role and both nonces."""

    mac: bytes


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One migrated file: its id in later frames, its path under the root, its size."""

    file_id: int
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """The files to migrate; fixes the block size and the sizes that later frames must respect.
    `migration` names the migration in both sides' ownership records."""

    block_size: int
    files: tuple[FileEntry, ...]
    migration: str = ""
    delta: bool = False  # the destination says what it holds (Held) before Ready
    # `migrator sync`: rounds without end, each acknowledged once durable there; never a
    # Switchover, so the destination keeps a replica that is never runnable
    replica: bool = False
    # A replica the source vouches for (migrator/lineage.py): "sync@epoch", and the files whose
    # every write since that epoch its tracker holds; the destination says which it accepts
    # (Lineage) before any Held
    lineage: str = ""
    lineage_files: tuple[int, ...] = ()
    # The VM these files are (ownership.py): its id, its name, and the generation at which
    # the source owns it (a Commit hands it over as generation + 1)
    vm: str = ""
    vm_name: str = ""
    generation: int = 0


@dataclass(frozen=True, slots=True)
class Ready:
    """The destination created the files and can take blocks."""


@dataclass(frozen=True, slots=True)
class Blocks:
    """A run of whole blocks (or a run that ends at the end of the file)."""

    file_id: int
    first_block: int
    data: bytes | bytearray  # received: a bytearray of its own (Connection's big frames)


@dataclass(frozen=True, slots=True)
class Zero:
    """A run of blocks that are all zeros (holes, zero pages): sent as a few bytes, never
    read twice; the destination leaves them unwritten where they are fresh, else punches
    them. The last block of a file counts whole (its tail beyond the size is no data)."""

    file_id: int
    first_block: int
    count: int


@dataclass(frozen=True, slots=True)
class Packed:
    """A run of blocks, compressed (`migrate --compress`): `size` bytes once decompressed
    with `codec` (migrator.codecs), to be written like the Blocks they are."""

    file_id: int
    first_block: int
    codec: int
    size: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Resize:
    """A file changed size on the source."""

    file_id: int
    size: int


@dataclass(frozen=True, slots=True)
class RoundDone:
    """End of a pre-copy round; the destination acks once the round's data is written."""

    round: int
    blocks: int
    bytes: int


@dataclass(frozen=True, slots=True)
class RoundAck:
    """The round's data is written on the destination."""

    round: int


@dataclass(frozen=True, slots=True)
class Switchover:
    """The VM is suspended: the Blocks and Resize that follow are the last set."""


@dataclass(frozen=True, slots=True)
class Commit:
    """The handoff: the last set is sent and the source has durably given the VM up (its
    ownership record says so); the destination may take it, as ownership epoch `epoch`.

    From here on the source resumes its copy only if the destination says Abort (which the
    destination sends only while it has not taken the VM); a connection lost in between is
    ambiguous and settled by `migrator resolve`, never by guessing."""

    epoch: int = 0


@dataclass(frozen=True, slots=True)
class Resumed:
    """The destination's resume hook ran, after `ms` milliseconds."""

    ms: float


@dataclass(frozen=True, slots=True)
class Digests:
    """xxh3_64 of consecutive blocks, for the destination to compare with its own."""

    file_id: int
    first_block: int
    digests: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Held(Digests):
    """xxh3_64 of blocks the destination already holds, for a Manifest that asked (delta):
    the source sends only the blocks whose digest differs. Digests' layout and rules."""


@dataclass(frozen=True, slots=True)
class VerifyDone:
    """Every digest is sent."""


@dataclass(frozen=True, slots=True)
class Verified:
    """The destination's verdict on the digests."""

    ok: bool
    mismatches: int
    detail: str


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A chunk of the hypervisor's device state (QEMU's migration stream without RAM), sent
    after the VM stopped and before Commit; the destination feeds it to its hypervisor."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Postcopy:
    """The pages named by the Absent frames that follow stay absent on the destination; the
    source writes them into the spill area `spill` (`slots` slots) of migration `migration`."""

    migration: str
    spill: str
    slots: int


@dataclass(frozen=True, slots=True)
class Absent:
    """Blocks of one file that the destination must treat as absent: (first, count) runs."""

    file_id: int
    extents: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class SpillRefs:
    """Where absent pages are: (file_id, block, slot, generation) each."""

    refs: tuple[tuple[int, int, int, int], ...]


@dataclass(frozen=True, slots=True)
class SpillFlushed:
    """Every remaining page is in the spill area and durable: the source may now vanish."""

    pages: int


@dataclass(frozen=True, slots=True)
class Fetch:
    """The destination needs these blocks now (a read waits): send them ahead of the rest."""

    file_id: int
    first_block: int
    count: int


@dataclass(frozen=True, slots=True)
class SlotFree:
    """The destination installed the pages of these (slot, generation): reuse them."""

    slots: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class PostcopyDone:
    """Every absent block is installed on the destination; its daemon's post-copy figures."""

    stats: PostcopyStats


@dataclass(frozen=True, slots=True)
class Abort:
    """Either side gives up; the reason is for humans (the peer's is untrusted text)."""

    reason: str
    # A destination that refuses because it owns the VM itself (a split brain): its
    # generation, so the source records the split brain too (-1: not that kind of refusal)
    owner_generation: int = -1

    @classmethod
    def about(cls, text: str, owner_generation: int = -1) -> Abort:
        """An Abort that always encodes (clipped, unencodable characters replaced), for error
        paths that must not fail themselves."""
        return cls(text.encode("utf-8", "replace").decode("utf-8")[:MAX_REASON],
                   owner_generation)


@dataclass(frozen=True, slots=True)
class Done:
    """The migration is over; both sides close."""


@dataclass(frozen=True, slots=True)
class Query:
    """Instead of a Manifest: what does the destination's record say of `migration`?
    (`migrator resolve` on a source whose handoff was cut.)"""

    migration: str


@dataclass(frozen=True, slots=True)
class Reattach:
    """Instead of a Manifest: the source of `migration`, handed off as `epoch`, lost its
    connection after Commit and asks to finish. The Manifest (the files as they are now) and,
    while post-copy is unfinished, the Postcopy announcement follow; the destination's Answer
    then says ``owner`` (the session goes on) or why not."""

    migration: str
    epoch: int
    postcopy: bool  # a Postcopy announcement follows the Manifest (post-copy is unfinished)


@dataclass(frozen=True, slots=True)
class Lineage:
    """The destination's answer to a Manifest that names a replica (lineage): the files whose
    replica it holds unchanged since that epoch, with their digests kept (the source sends
    them only the blocks written since), and why the others are not (they go the digest way)."""

    accepted: tuple[int, ...]
    detail: str


@dataclass(frozen=True, slots=True)
class Answer:
    """The destination's ownership record of the migration asked about: `status` is
    ``owner`` (it took the VM), ``refused`` (it never will), or ``unknown`` (no record of it:
    settle by hand); `epoch` the ownership epoch it holds."""

    migration: str
    status: str
    epoch: int
    detail: str


Event = (
    Hello | Auth | Manifest | Ready | Blocks | Resize | RoundDone | RoundAck | Switchover
    | Commit | Resumed | Digests | Held | VerifyDone | Verified | Abort | Done | Postcopy | Absent
    | SpillRefs | SpillFlushed | Fetch | SlotFree | PostcopyDone | DeviceState | Query | Answer
    | Reattach | Zero | Packed | Lineage
)


class FrameType(enum.IntEnum):
    """The type byte of each frame."""

    HELLO = 1
    AUTH = 2
    MANIFEST = 3
    READY = 4
    BLOCKS = 5
    RESIZE = 6
    ROUND_DONE = 7
    ROUND_ACK = 8
    SWITCHOVER = 9
    COMMIT = 10
    RESUMED = 11
    DIGESTS = 12
    VERIFY_DONE = 13
    VERIFIED = 14
    ABORT = 15
    DONE = 16
    POSTCOPY = 17
    ABSENT = 18
    SPILL_REFS = 19
    SPILL_FLUSHED = 20
    FETCH = 21
    SLOT_FREE = 22
    POSTCOPY_DONE = 23
    DEVICE_STATE = 24
    QUERY = 25
    ANSWER = 26
    REATTACH = 27
    ZERO = 28
    PACKED = 29
    HELD = 30
    LINEAGE = 31


_EVENT_OF: dict[int, type[Event]] = {
    FrameType.HELLO: Hello, FrameType.AUTH: Auth, FrameType.MANIFEST: Manifest,
    FrameType.READY: Ready, FrameType.BLOCKS: Blocks, FrameType.RESIZE: Resize,
    FrameType.ROUND_DONE: RoundDone, FrameType.ROUND_ACK: RoundAck,
    FrameType.SWITCHOVER: Switchover, FrameType.COMMIT: Commit, FrameType.RESUMED: Resumed,
    FrameType.DIGESTS: Digests, FrameType.VERIFY_DONE: VerifyDone,
    FrameType.VERIFIED: Verified, FrameType.ABORT: Abort, FrameType.DONE: Done,
    FrameType.POSTCOPY: Postcopy, FrameType.ABSENT: Absent, FrameType.SPILL_REFS: SpillRefs,
    FrameType.SPILL_FLUSHED: SpillFlushed, FrameType.FETCH: Fetch,
    FrameType.SLOT_FREE: SlotFree, FrameType.POSTCOPY_DONE: PostcopyDone,
    FrameType.DEVICE_STATE: DeviceState, FrameType.QUERY: Query, FrameType.ANSWER: Answer,
    FrameType.REATTACH: Reattach, FrameType.ZERO: Zero, FrameType.PACKED: Packed,
    FrameType.HELD: Held, FrameType.LINEAGE: Lineage,
}
_TYPE_OF: dict[type[Event], FrameType] = {cls: FrameType(t) for t, cls in _EVENT_OF.items()}


class NeedData(enum.Enum):
    """Type of the NEED_DATA sentinel."""

    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA  # next_event(): no complete frame yet, feed more bytes


# -- the state table -------------------------------------------------------------------------


class State(enum.Enum):
    """Where the conversation is; both sides pass through the same states."""

    HELLO = enum.auto()  # each side sends Hello once
    AUTH = enum.auto()  # each side sends Auth once
    MANIFEST = enum.auto()  # the source sends the Manifest
    READY = enum.auto()  # the dest creates the files
    COPYING = enum.auto()  # pre-copy rounds
    ROUND_END = enum.auto()  # a RoundDone waits for its RoundAck
    SWITCHOVER = enum.auto()  # the VM is suspended; the last set flows
    RESUMING = enum.auto()  # the dest resumes the VM (post-copy traffic may flow)
    POSTCOPY = enum.auto()  # resumed; absent pages flow through the spill and fetches
    POSTCOPY_END = enum.auto()  # the dest has every page; frames already sent still arrive
    VERIFYING = enum.auto()  # digests flow
    VERDICT = enum.auto()  # the dest compares
    FINISHING = enum.auto()  # the source says Done
    ANSWER = enum.auto()  # a Query waits for its Answer (resolve, instead of a migration)
    REATTACH = enum.auto()  # a source re-states a migration broken after Commit
    CLOSED = enum.auto()
    ABORTED = enum.auto()
    ERROR = enum.auto()


# (state, sender, event) -> next state.  Hello and Auth are the exception: each side sends one,
# the two may cross on the wire, and the state moves on when both have (_BOTH_SIDES).
_TABLE: dict[tuple[State, str, type[Event]], State] = {
    (State.HELLO, SOURCE, Hello): State.AUTH,
    (State.HELLO, DEST, Hello): State.AUTH,
    (State.AUTH, SOURCE, Auth): State.MANIFEST,
    (State.AUTH, DEST, Auth): State.MANIFEST,
    (State.MANIFEST, SOURCE, Manifest): State.READY,
    (State.MANIFEST, SOURCE, Query): State.ANSWER,
    (State.ANSWER, DEST, Answer): State.CLOSED,
    (State.MANIFEST, SOURCE, Reattach): State.REATTACH,
    (State.REATTACH, SOURCE, Manifest): State.REATTACH,
    (State.REATTACH, SOURCE, Postcopy): State.REATTACH,
    (State.REATTACH, DEST, Answer): State.CLOSED,  # owner: POSTCOPY or VERIFYING (_apply)
    (State.READY, DEST, Held): State.READY,
    (State.READY, DEST, Lineage): State.READY,
    (State.READY, DEST, Ready): State.COPYING,
    (State.COPYING, SOURCE, Blocks): State.COPYING,
    (State.COPYING, SOURCE, Zero): State.COPYING,
    (State.ROUND_END, SOURCE, Zero): State.ROUND_END,
    (State.SWITCHOVER, SOURCE, Zero): State.SWITCHOVER,
    (State.COPYING, SOURCE, Packed): State.COPYING,  # pre-copy only: fetches go as Blocks
    (State.ROUND_END, SOURCE, Packed): State.ROUND_END,
    (State.SWITCHOVER, SOURCE, Packed): State.SWITCHOVER,
    (State.COPYING, SOURCE, Resize): State.COPYING,
    (State.COPYING, SOURCE, RoundDone): State.ROUND_END,
    (State.ROUND_END, SOURCE, Blocks): State.ROUND_END,
    (State.ROUND_END, SOURCE, Resize): State.ROUND_END,
    (State.ROUND_END, DEST, RoundAck): State.COPYING,
    (State.COPYING, SOURCE, Switchover): State.SWITCHOVER,
    (State.SWITCHOVER, SOURCE, Blocks): State.SWITCHOVER,
    (State.SWITCHOVER, SOURCE, Resize): State.SWITCHOVER,
    (State.SWITCHOVER, SOURCE, Commit): State.RESUMING,
    (State.RESUMING, DEST, Resumed): State.VERIFYING,
    (State.VERIFYING, SOURCE, Digests): State.VERIFYING,
    (State.VERIFYING, SOURCE, VerifyDone): State.VERDICT,
    (State.VERDICT, DEST, Verified): State.FINISHING,
    (State.FINISHING, SOURCE, Done): State.CLOSED,
    # post-copy (legal only once Postcopy was sent; see _check_context)
    (State.SWITCHOVER, SOURCE, Postcopy): State.SWITCHOVER,
    (State.SWITCHOVER, SOURCE, Absent): State.SWITCHOVER,
    (State.SWITCHOVER, SOURCE, DeviceState): State.SWITCHOVER,
    (State.POSTCOPY, DEST, PostcopyDone): State.POSTCOPY_END,
    (State.POSTCOPY_END, SOURCE, Digests): State.VERIFYING,
    (State.POSTCOPY_END, SOURCE, VerifyDone): State.VERDICT,
}
for _st in (State.RESUMING, State.POSTCOPY, State.POSTCOPY_END):
    for _cls in (Blocks, SpillRefs, SpillFlushed):
        _TABLE[(_st, SOURCE, _cls)] = _st
for _st in (State.RESUMING, State.POSTCOPY):
    for _cls in (Fetch, SlotFree):
        _TABLE[(_st, DEST, _cls)] = _st
_POSTCOPY_ONLY = {(State.RESUMING, Blocks), (State.RESUMING, SpillRefs),
                  (State.RESUMING, SpillFlushed), (State.RESUMING, Fetch),
                  (State.RESUMING, SlotFree), (State.SWITCHOVER, Absent)}
_FINAL = {State.CLOSED, State.ABORTED, State.ERROR}
# either side may give up at any point until the end
_TABLE.update(
    {(st, who, Abort): State.ABORTED for st in State if st not in _FINAL for who in ROLES})
_BOTH_SIDES = {(State.HELLO, Hello), (State.AUTH, Auth)}


# -- field checks (shared by send and receive) -----------------------------------------------


def _show(value: object) -> str:
    """repr() clipped, for messages that quote what a peer sent."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value: object, lo: int, hi: int, what: str) -> int:
    if type(value) is not int:  # bool is a subclass of int: refuse it too
        raise ProtocolError(f"{what} must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ProtocolError(f"{what} {value} is outside {lo}..{hi}")
    return value


def _text(value: object, limit: int, what: str) -> None:
    if type(value) is not str:
        raise ProtocolError(f"{what} must be a string, not {type(value).__name__}")
    if len(value) > limit:
        raise ProtocolError(f"{what} is {len(value)} characters long, more than {limit}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ProtocolError(f"{what} is not valid UTF-8 text") from None


def _bytes32(value: object, what: str) -> None:
    if type(value) is not bytes or len(value) != 32:
        raise ProtocolError(f"{what} must be 32 bytes, not {_show(value)}")


def check_file_name(name: object) -> str:
    """Return `name` if it is a plain relative path, so no manifest can make the destination
    write outside its root; raise ProtocolError otherwise."""
    if type(name) is not str:
        raise ProtocolError(f"file name must be a string, not {type(name).__name__}")
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise ProtocolError(f"file name {_show(name)} is not valid UTF-8") from None
    if not name:
        raise ProtocolError("file name is empty")
    if size > MAX_NAME_BYTES:
        raise ProtocolError(f"file name is {size} bytes long, more than {MAX_NAME_BYTES}")
    if "\0" in name:
        raise ProtocolError(f"file name {_show(name)} contains NUL")
    if name.startswith("/"):
        raise ProtocolError(f"file name {_show(name)} is absolute")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            kind = f"a {part!r}" if part else "an empty"
            raise ProtocolError(f"file name {_show(name)} has {kind} component")
        if len(part.encode()) > MAX_COMPONENT_BYTES:
            raise ProtocolError(f"file name {_show(name)} has a component over 255 bytes")
    return name


def _check_manifest(m: Manifest) -> None:
    _text(m.migration, 64, "Manifest.migration")
    _text(m.vm, 64, "Manifest.vm")
    if "/" in m.vm or m.vm.startswith("."):
        raise ProtocolError(f"Manifest.vm {_show(m.vm)} is not a VM id")
    _text(m.vm_name, 128, "Manifest.vm_name")
    _int(m.generation, 0, _U32, "Manifest.generation")
    if type(m.delta) is not bool:
        raise ProtocolError(f"Manifest.delta must be true or false, not {_show(m.delta)}")
    if type(m.replica) is not bool:
        raise ProtocolError(f"Manifest.replica must be true or false, not {_show(m.replica)}")
    _text(m.lineage, 128, "Manifest.lineage")
    _ids(m.lineage_files, "Manifest.lineage_files")
    if m.lineage_files and not m.lineage:
        raise ProtocolError("Manifest.lineage_files without a lineage")
    bs = _int(m.block_size, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE, "block_size")
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
            raise ProtocolError(f"manifest entry {_show(entry)} is not a FileEntry")
        _int(entry.file_id, 0, MAX_FILES - 1, "file_id")
        check_file_name(entry.name)
        _int(entry.size, 0, MAX_FILE_SIZE, f"size of {_show(entry.name)}")
        if entry.file_id in ids:
            raise ProtocolError(f"manifest has file_id {entry.file_id} twice")
        if entry.name in names:
            raise ProtocolError(f"manifest has file name {_show(entry.name)} twice")
        ids.add(entry.file_id)
        names.add(entry.name)
    if not set(m.lineage_files) <= ids:
        raise ProtocolError("Manifest.lineage_files names a file that is not in the manifest")
    # sorted by components, a path that is a directory of others is directly followed by one
    for a, b in pairwise(sorted(tuple(name.split("/")) for name in names)):
        if b[: len(a)] == a:
            raise ProtocolError(f"{_show('/'.join(a))} is both a file and a directory")


def check_event(event: Event) -> None:
    """Raise ProtocolError unless every field of `event` has the right type and range.

    These are the rules that need no context; Connection adds those that depend on the state,
    the manifest and the handshake."""
    match event:
        case Hello():
            _int(event.version, 0, _U32, "Hello.version")
            if event.role not in ROLES:
                raise ProtocolError(f"Hello.role must be source or dest, not {_show(event.role)}")
            _bytes32(event.nonce, "Hello.nonce")
            if type(event.sealed) is not bool:
                raise ProtocolError(f"Hello.sealed must be true or false, not "
                                    f"{_show(event.sealed)}")
        case Auth():
            _bytes32(event.mac, "Auth.mac")
        case Manifest():
            _check_manifest(event)
        case Blocks():
            _int(event.file_id, 0, _U32, "Blocks.file_id")
            _int(event.first_block, 0, _U64, "Blocks.first_block")
            if type(event.data) is not bytes:
                raise ProtocolError(f"Blocks.data must be bytes, not {type(event.data).__name__}")
            if len(event.data) > MAX_BLOCKS_DATA:
                raise ProtocolError(f"Blocks carry {len(event.data)} bytes, more than 8 MiB")
        case Resize():
            _int(event.file_id, 0, _U32, "Resize.file_id")
            _int(event.size, 0, MAX_FILE_SIZE, "Resize.size")
        case RoundDone():
            _int(event.round, 0, _MAX_COUNT, "RoundDone.round")
            _int(event.blocks, 0, _MAX_COUNT, "RoundDone.blocks")
            _int(event.bytes, 0, _MAX_COUNT, "RoundDone.bytes")
        case RoundAck():
            _int(event.round, 0, _MAX_COUNT, "RoundAck.round")
        case Resumed():
            if type(event.ms) not in (int, float) or not 0 <= event.ms < math.inf:
                raise ProtocolError(f"Resumed.ms must be a finite number >= 0, not {event.ms!r}")
        case Digests():
            _int(event.file_id, 0, _U32, "Digests.file_id")
            _int(event.first_block, 0, _U64, "Digests.first_block")
            if type(event.digests) is not tuple:
                raise ProtocolError("Digests.digests must be a tuple of u64")
            _int(len(event.digests), 1, MAX_DIGESTS_PER_FRAME, "number of digests")
        case Verified():
            if type(event.ok) is not bool:
                raise ProtocolError(f"Verified.ok must be a bool, not {type(event.ok).__name__}")
            _int(event.mismatches, 0, _MAX_COUNT, "Verified.mismatches")
            _text(event.detail, MAX_REASON, "Verified.detail")
            if event.ok and event.mismatches:
                raise ProtocolError(f"Verified says ok with {event.mismatches} mismatches")
        case Abort():
            _text(event.reason, MAX_REASON, "Abort.reason")
            _int(event.owner_generation, -1, _U32, "Abort.owner_generation")
        case Postcopy():
            _text(event.migration, 64, "Postcopy.migration")
            _text(event.spill, MAX_PATH, "Postcopy.spill")
            _int(event.slots, 1, MAX_SLOTS, "Postcopy.slots")
        case Absent():
            _int(event.file_id, 0, _U32, "Absent.file_id")
            _pairs(event.extents, "Absent.extents")
        case SpillRefs():
            if type(event.refs) is not tuple or not all(
                    type(r) is tuple and len(r) == 4 for r in event.refs):
                raise ProtocolError("SpillRefs.refs must be a tuple of 4-tuples")
            _int(len(event.refs), 1, MAX_ITEMS_PER_FRAME, "number of refs")
            for f, b, sl, g in event.refs:
                _int(f, 0, _U32, "ref file_id")
                _int(b, 0, _U64, "ref block")
                _int(sl, 0, MAX_SLOTS - 1, "ref slot")
                _int(g, 1, _U64, "ref generation")
        case SpillFlushed():
            _int(event.pages, 0, _MAX_COUNT, "SpillFlushed.pages")
        case Fetch():
            _int(event.file_id, 0, _U32, "Fetch.file_id")
            _int(event.first_block, 0, _U64, "Fetch.first_block")
            _int(event.count, 1, MAX_BLOCKS_DATA // MIN_BLOCK_SIZE, "Fetch.count")
        case SlotFree():
            _pairs(event.slots, "SlotFree.slots")
        case PostcopyDone():
            if type(event.stats) is not PostcopyStats:
                raise ProtocolError("PostcopyDone.stats must be PostcopyStats")
            for f in fields(PostcopyStats):
                v = getattr(event.stats, f.name)
                if f.type == "int":
                    _int(v, 0, _MAX_COUNT, f"PostcopyDone.{f.name}")
                elif type(v) is not float or not 0 <= v < math.inf:
                    raise ProtocolError(f"PostcopyDone.{f.name} must be a finite number >= 0")
        case DeviceState():
            if type(event.data) is not bytes or not event.data:
                raise ProtocolError("DeviceState.data must be non-empty bytes")
            if len(event.data) > MAX_BLOCKS_DATA:
                raise ProtocolError(f"DeviceState carries {len(event.data)} bytes, more than "
                                    "8 MiB")
        case Commit():
            _int(event.epoch, 0, _MAX_COUNT, "Commit.epoch")
        case Query():
            _text(event.migration, 64, "Query.migration")
        case Zero():
            _int(event.file_id, 0, _U32, "Zero.file_id")
            _int(event.first_block, 0, _U64, "Zero.first_block")
            _int(event.count, 1, _U64, "Zero.count")
        case Packed():
            _int(event.file_id, 0, _U32, "Packed.file_id")
            _int(event.first_block, 0, _U64, "Packed.first_block")
            _int(event.codec, 1, 255, "Packed.codec")
            _int(event.size, 1, MAX_BLOCKS_DATA, "Packed.size")
            if type(event.data) is not bytes or not event.data:
                raise ProtocolError("Packed.data must be bytes, and not empty")
            if len(event.data) > MAX_BLOCKS_DATA:
                raise ProtocolError(f"Packed carries {len(event.data)} bytes, more than 8 MiB")
        case Reattach():
            _text(event.migration, 64, "Reattach.migration")
            _int(event.epoch, 0, _MAX_COUNT, "Reattach.epoch")
            if type(event.postcopy) is not bool:
                raise ProtocolError("Reattach.postcopy must be a bool")
        case Lineage():
            _ids(event.accepted, "Lineage.accepted")
            _text(event.detail, MAX_REASON, "Lineage.detail")
        case Answer():
            _text(event.migration, 64, "Answer.migration")
            if event.status not in ANSWER_STATUSES:
                raise ProtocolError(f"Answer.status must be one of {', '.join(ANSWER_STATUSES)}, "
                                    f"not {_show(event.status)}")
            _int(event.epoch, 0, _MAX_COUNT, "Answer.epoch")
            _text(event.detail, MAX_REASON, "Answer.detail")
        case Ready() | Switchover() | VerifyDone() | Done():
            pass
        case _:
            raise ProtocolError(f"{_show(event)} is not a protocol event")


def _pairs(value: object, what: str) -> None:
    if type(value) is not tuple or not all(type(x) is tuple and len(x) == 2 for x in value):
        raise ProtocolError(f"{what} must be a tuple of pairs")
    _int(len(value), 0, MAX_ITEMS_PER_FRAME, f"number of {what}")
    for a, b in value:
        _int(a, 0, _U64, what)
        _int(b, 0, _U64, what)


# -- encoding --------------------------------------------------------------------------------

_HEX_FIELDS = frozenset({"nonce", "mac"})  # bytes fields, as lowercase hex in JSON
_HEX_DIGITS = frozenset("0123456789abcdef")


def encode(event: Event) -> bytes:
    """One frame for `event`, after check_event (whether the state allows it is not checked)."""
    code, parts, size = _encode_parts(event)
    return b"".join([HEADER.pack(code, size), *parts])  # one copy of the data


def _encode_parts(event: Event) -> tuple[int, list[bytes | bytearray | memoryview], int]:
    """(frame type, the payload in pieces, its size): encode() joins them, a sealed send
    encrypts them one after the other into the frame it writes."""
    check_event(event)
    if type(event) is Blocks:
        parts = [_BLOCKS.pack(event.file_id, event.first_block), event.data]
    elif type(event) is Packed:
        parts = [_PACKED.pack(event.file_id, event.first_block, event.codec, event.size),
                 event.data]
    elif type(event) in (Digests, Held):
        try:
            digests = struct.pack(f">{len(event.digests)}Q", *event.digests)
        except struct.error:
            raise ProtocolError("every digest must be an integer in 0..2**64-1") from None
        parts = [_DIGESTS.pack(event.file_id, event.first_block, len(event.digests)), digests]
    elif type(event) is SpillRefs:
        parts = [pack_refs(event.refs)]
    elif type(event) is DeviceState:
        parts = [event.data]
    else:
        obj = {f.name: getattr(event, f.name) for f in fields(event)}
        for name in _HEX_FIELDS & obj.keys():
            obj[name] = obj[name].hex()
        if "files" in obj:
            obj["files"] = [asdict(entry) for entry in obj["files"]]
        if "stats" in obj:
            obj["stats"] = asdict(obj["stats"])
        parts = [json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()]
    size = sum(map(len, parts))
    if size > MAX_PAYLOAD:
        name = type(event).__name__
        raise ProtocolError(f"{name} needs {size} bytes, more than {MAX_PAYLOAD}")
    return _TYPE_OF[type(event)], parts, size


def _check_header(code: int, length: int) -> type[Event]:
    cls = _EVENT_OF.get(code)
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
    cls = _check_header(code, length)
    if len(frame) != HEADER.size + length:
        raise ProtocolError(f"frame says {length} payload bytes, has {len(frame) - HEADER.size}")
    return _decode_payload(cls, frame[HEADER.size :])


def _decode_payload(cls: type[Event], payload: bytes) -> Event:
    name = cls.__name__
    if cls is Blocks:
        if len(payload) < _BLOCKS.size:
            raise ProtocolError(f"Blocks frame of {len(payload)} bytes is shorter than its header")
        file_id, first = _BLOCKS.unpack_from(payload)
        event: Event = Blocks(file_id, first, payload[_BLOCKS.size :])
    elif cls is Packed:
        if len(payload) <= _PACKED.size:
            raise ProtocolError(f"Packed frame of {len(payload)} bytes carries no data")
        file_id, first, codec, size = _PACKED.unpack_from(payload)
        event = Packed(file_id, first, codec, size, payload[_PACKED.size :])
        check_event(event)
    elif cls in (Digests, Held):
        if len(payload) < _DIGESTS.size:
            raise ProtocolError(f"Digests frame of {len(payload)} bytes is shorter than its header")
        file_id, first, count = _DIGESTS.unpack_from(payload)
        _int(count, 1, MAX_DIGESTS_PER_FRAME, "number of digests")
        if len(payload) != _DIGESTS.size + 8 * count:
            raise ProtocolError(f"Digests frame says {count} digests but carries "
                                f"{len(payload) - _DIGESTS.size} bytes of them")
        event = cls(file_id, first, struct.unpack_from(f">{count}Q", payload, _DIGESTS.size))
    elif cls is DeviceState:
        event = DeviceState(payload)
    elif cls is SpillRefs:
        if not payload or len(payload) % _REF.size:
            raise ProtocolError(f"SpillRefs frame of {len(payload)} bytes is not whole refs")
        event = SpillRefs(tuple(unpack_refs(payload)))
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
        for key in ("lineage_files", "accepted"):
            if key in args and type(args[key]) is list:
                args[key] = tuple(args[key])
        for key in ("extents", "slots"):
            if key in args and cls in (Absent, SlotFree):
                args[key] = _pair_list(args[key], f"{name}.{key}")
        if cls is PostcopyDone:
            try:
                args["stats"] = conform(PostcopyStats, args["stats"], "PostcopyDone.stats")
            except ControlError as exc:
                raise ProtocolError(str(exc)) from None
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
        raise ProtocolError(f"{what} has unexpected keys {_show(sorted(extra))}")
    return dict(obj)


def _unhex(value: object, what: str) -> bytes:
    if type(value) is not str or len(value) % 2 or not set(value) <= _HEX_DIGITS:
        raise ProtocolError(f"{what} must be lowercase hex, not {_show(value)}")
    return bytes.fromhex(value)


def _ids(value: object, what: str) -> None:
    if type(value) is not tuple or len(value) > MAX_FILES:
        raise ProtocolError(f"{what} must be a list of at most {MAX_FILES} file ids")
    for v in value:
        _int(v, 0, MAX_FILES - 1, what)
    if len(set(value)) != len(value):
        raise ProtocolError(f"{what} names a file twice")


def _pair_list(value: object, what: str) -> tuple[tuple[int, int], ...]:
    if type(value) is not list or len(value) > MAX_ITEMS_PER_FRAME:
        raise ProtocolError(f"{what} must be a list of at most {MAX_ITEMS_PER_FRAME} pairs")
    if not all(type(x) is list and len(x) == 2 for x in value):
        raise ProtocolError(f"{what} must be a list of [a, b] pairs")
    return tuple((x[0], x[1]) for x in value)


def _files(value: object) -> tuple[FileEntry, ...]:
    if type(value) is not list:
        raise ProtocolError(f"Manifest.files must be a list, not {type(value).__name__}")
    if len(value) > MAX_FILES:
        raise ProtocolError(f"manifest lists {len(value)} files, more than {MAX_FILES}")
    keys = [f.name for f in fields(FileEntry)]
    return tuple(FileEntry(**_exact_keys(item, keys, "manifest entry")) for item in value)


# -- the connection --------------------------------------------------------------------------


def frame_key(key: bytes, source_nonce: bytes, dest_nonce: bytes, sender: str) -> bytes:
    """The AES-256 key of the frames `sender` seals in the session of these two nonces.

    HKDF-SHA256 with both nonces as salt: every session, and each direction in it, has a key
    of its own, so counting frames from 0 never reuses a (key, nonce) pair."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=source_nonce + dest_nonce,
                info=_SEAL_CONTEXT + sender.encode())
    return hkdf.derive(key)


class _Sealer:
    """One direction of sealed frames: AES-256-GCM, the nonce the frame's number.

    Frames are sealed from their pieces and big ones opened as they arrive, with GCM's
    streaming interface: no buffer just to join or gather them (a new 8 MiB buffer per frame
    cost more than the cipher: 0.9 s of CPU per 1.3 GB copied, against 0.2 s for AES-GCM)."""

    def __init__(self, key: bytes, sender: str) -> None:
        self._key = key
        self._aead = AESGCM(key)
        self.sender = sender
        self.frames = 0

    def _cipher(self) -> Cipher[modes.GCM]:
        return Cipher(algorithms.AES(self._key), modes.GCM(self._nonce()))

    def _nonce(self) -> bytes:
        nonce = self.frames.to_bytes(12, "big")
        self.frames += 1
        return nonce

    def seal(self, code: int, parts: list[bytes | bytearray | memoryview], size: int
             ) -> bytearray:
        """The sealed frame (header, ciphertext, tag) of a payload given in pieces."""
        out = bytearray(HEADER.size + size + TAG_SIZE)
        HEADER.pack_into(out, 0, code, size + TAG_SIZE)
        enc = self._cipher().encryptor()
        enc.authenticate_additional_data(bytes(out[:HEADER.size]))
        at = HEADER.size
        with memoryview(out) as view:
            for part in parts:  # update_into wants 15 bytes to spare: the tag's room has 16
                if len(part):
                    enc.update_into(part, view[at:])
                    at += len(part)
            enc.finalize()
            view[at:] = enc.tag
        return out

    def opening(self, head: bytes, size: int) -> _Opening:
        """A big frame of `size` sealed bytes after `head`, to decrypt as it arrives."""
        dec = self._cipher().decryptor()
        dec.authenticate_additional_data(head)
        return _Opening(self, dec, size)

    def tampered(self, what: str) -> TamperedError:
        return TamperedError(f"the connection was tampered with or corrupted: {what} from the "
                             f"{self.sender} fails its check (changed, dropped, replayed or "
                             "reordered on the way)")

    def open(self, head: bytes, sealed: bytes | bytearray | memoryview) -> bytes:
        """The payload of a sealed frame, or TamperedError if its tag does not match."""
        try:
            return self._aead.decrypt(self._nonce(), sealed, head)
        except InvalidTag:
            raise self.tampered(f"frame {self.frames - 1}") from None


class _Gathering:
    """A big frame's data in clear, copied once into a buffer of its own as it arrives."""

    def __init__(self, size: int) -> None:
        self.size, self.fill = size, 0
        self._data = bytearray(size)

    def take(self, data: memoryview) -> int:
        n = min(self.size - self.fill, len(data))
        self._data[self.fill:self.fill + n] = data[:n]
        self.fill += n
        return n

    def finish(self) -> bytearray:
        return self._data


class _Opening:
    """A big sealed frame decrypted as it arrives, into the buffer its data ends in; nothing
    of it comes out before the tag at its end proves all of it."""

    def __init__(self, sealer: _Sealer, dec: AEADDecryptionContext, size: int) -> None:
        self.size, self.fill = size, 0
        self._sealer, self._dec, self._frame = sealer, dec, sealer.frames - 1
        self._body = size - TAG_SIZE
        self._out = bytearray(self._body + 15)  # update_into wants 15 bytes to spare
        self._tag = bytearray()

    def take(self, data: memoryview) -> int:
        n = min(self.size - self.fill, len(data))
        body = max(0, min(n, self._body - self.fill))
        if body:
            with memoryview(self._out) as out:
                self._dec.update_into(data[:body], out[self.fill:])
        self._tag += data[body:n]
        self.fill += n
        return n

    def finish(self) -> bytearray:
        """The payload, or TamperedError."""
        try:
            self._dec.finalize_with_tag(bytes(self._tag))
        except InvalidTag:
            raise self._sealer.tampered(f"frame {self._frame}") from None
        del self._out[self._body:]
        return self._out


class Connection:
    """One side of a migration: bytes in, events out; events in, bytes out.  No I/O."""

    def __init__(self, role: str, key: bytes, nonce: bytes | None = None, *,
                 sealed: bool = True) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be 'source' or 'dest', not {role!r}")
        if type(key) is not bytes or not key:
            raise ValueError("the shared key must be non-empty bytes")
        nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        if type(nonce) is not bytes or len(nonce) != NONCE_SIZE:
            raise ValueError(f"the nonce must be {NONCE_SIZE} bytes")
        self.role = role
        self.peer_role = DEST if role == SOURCE else SOURCE
        self._key = key
        self._nonce = nonce
        self._peer_nonce = b""
        self.sealed = sealed  # frames after Auth are sealed (False: --insecure-plaintext)
        self._seal_out: _Sealer | None = None  # from our Auth on
        self._seal_in: _Sealer | None = None  # from the peer's Auth on
        self._state = State.HELLO
        self._done: set[str] = set()  # who sent this HELLO/AUTH phase's event
        self._buf = bytearray()
        self._big: _Gathering | _Opening | None = None  # a big Blocks frame, as it comes
        self._big_head = b""
        self._eof = False
        self._why = ""  # the error or abort that ended the connection
        self._manifest: Manifest | None = None
        self._sizes: dict[int, int] = {}
        self._round = -1  # the last RoundDone's round
        self._lineage_said = self._held_said = False
        self._postcopy: Postcopy | None = None
        self._device_state = 0  # bytes of DeviceState so far
        self._reattach: Reattach | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def why(self) -> str:
        """What ended the connection (an error, or an Abort), once it ended."""
        return self._why

    @property
    def postcopy(self) -> Postcopy | None:
        """The Postcopy announcement, once sent: the session ends with post-copy."""
        return self._postcopy

    @property
    def manifest(self) -> Manifest | None:
        return self._manifest

    @property
    def reattach(self) -> Reattach | None:
        """The Reattach that opened this session, if it is one."""
        return self._reattach

    @property
    def sizes(self) -> Mapping[int, int]:
        """Current size of each file by file_id: the manifest's, updated by Resize."""
        return MappingProxyType(self._sizes)

    def hello_event(self) -> Hello:
        """Our Hello (the only one send() accepts)."""
        return Hello(PROTOCOL_VERSION, self.role, self._nonce, self.sealed)

    def auth_event(self) -> Auth:
        """Our Auth, once both Hellos are known (the MAC covers the peer's nonce)."""
        if self._state is not State.AUTH:
            raise LocalProtocolError(f"Auth needs both Hellos first (state {self._state.name})")
        return Auth(self._mac(self.role))

    def send(self, event: Event) -> bytes:
        """The bytes to write for `event`; LocalProtocolError, state unchanged, if illegal."""
        try:
            code, parts, size = _encode_parts(event)
            seal = self._seal_out  # our Auth itself goes in clear
            if not (self._state is State.ERROR and type(event) is Abort):  # may say why we quit
                self._apply(event, self.role)
        except ProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None
        if seal is not None:
            return seal.seal(code, parts, size)
        return b"".join([HEADER.pack(code, size), *parts])  # one copy of the data

    def seal(self, frame: bytes) -> bytes:
        """A frame made by hand, as send() would write it (sealed once our Auth is out), with
        no rule checked and no state changed: for tests that play a peer breaking the rules."""
        if self._seal_out is None:
            return frame
        return bytes(self._seal_out.seal(frame[0], [memoryview(frame)[HEADER.size:]],
                                         len(frame) - HEADER.size))

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer (b"" means EOF); next_event() parses them."""
        self._refuse_if_over()
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if not data:
            self._eof = True
            return
        if len(self._buf) >= MAX_FRAME:
            raise LocalProtocolError("call next_event() until NEED_DATA before feeding more")
        big = self._big
        if big is not None and big.fill < big.size:
            n = big.take(memoryview(data))
            if n == len(data):
                return
            data = memoryview(data)[n:]
        self._buf += data
        try:
            if big is None:
                self._header()  # refuse a bad header now, before its payload arrives
                self._start_big()
        except ProtocolError as exc:
            raise self._fail(exc) from None

    def _start_big(self) -> None:
        """The front frame is Blocks of BIG_DATA or more, not all here: its data goes into a
        buffer of its own as it comes, so it is copied once (not into the buffer, out as the
        payload, out again as the data). Only a peek: the header is checked for the state
        when the frame is taken (our own sends may change what is legal meanwhile).  A sealed
        frame is decrypted as it comes, its Blocks header too (it is ciphertext)."""
        if len(self._buf) < HEADER.size:
            return
        code, length = HEADER.unpack_from(self._buf)
        sealed = self._seal_in is not None
        if code != FrameType.BLOCKS or not BIG_DATA <= length <= MAX_PAYLOAD + sealed * TAG_SIZE:
            return
        pre, end = HEADER.size + (0 if sealed else _BLOCKS.size), HEADER.size + length
        if not pre <= len(self._buf) < end:
            return
        self._big_head = bytes(self._buf[:pre])
        self._big = (_Gathering(end - pre) if self._seal_in is None
                     else self._seal_in.opening(self._big_head, end - pre))
        with memoryview(self._buf) as view:
            self._big.take(view[pre:])
        self._buf = bytearray()

    def next_event(self) -> Event | Literal[NeedData.NEED_DATA]:
        """The peer's next event, or NEED_DATA; RemoteProtocolError (state ERROR) if illegal."""
        self._refuse_if_over()
        if self._big is not None:
            return self._big_event()
        try:
            length = self._header()
            end = HEADER.size + length if length is not None else 0
            if length is None or len(self._buf) < end:
                if self._eof and (self._buf or self._state is not State.CLOSED):
                    where = " in the middle of a frame" if self._buf else ""
                    raise ProtocolError(
                        f"peer closed the connection during {self._state.name}{where}")
                return NEED_DATA
            code = self._buf[0]
            with memoryview(self._buf) as view:
                if self._seal_in is None:
                    payload = bytes(view[HEADER.size : end])
                else:
                    payload = self._seal_in.open(bytes(view[: HEADER.size]),
                                                 view[HEADER.size : end])
            del self._buf[:end]
            event = _decode_payload(self._typed(code, len(payload)), payload)
            self._apply(event, self.peer_role)
            self._start_big()
        except ProtocolError as exc:
            raise self._fail(exc) from None
        return event

    def _big_event(self) -> Event | Literal[NeedData.NEED_DATA]:
        assert self._big is not None
        try:
            if self._big.fill < self._big.size:
                if self._eof:
                    raise ProtocolError(f"peer closed the connection during "
                                        f"{self._state.name} in the middle of a frame")
                return NEED_DATA
            code, length = HEADER.unpack_from(self._big_head)
            data = self._big.finish()  # sealed: TamperedError unless the tag proves it
            if self._seal_in is None:
                self._typed(code, length)
                file_id, first = _BLOCKS.unpack_from(self._big_head, HEADER.size)
            else:
                self._typed(code, len(data))
                file_id, first = _BLOCKS.unpack_from(data)
                del data[: _BLOCKS.size]  # O(1) at a bytearray's front: no copy
            self._big = None
            event = Blocks(file_id, first, data)
            self._apply(event, self.peer_role)
            self._start_big()
        except ProtocolError as exc:
            raise self._fail(exc) from None
        return event

    # -- internals ------------------------------------------------------------------------

    def _refuse_if_over(self) -> None:
        if self._state is State.ERROR:
            raise RemoteProtocolError(f"connection is in ERROR: {self._why}")
        if self._state is State.ABORTED:
            raise ProtocolError(f"connection was aborted: {self._why}")

    def _fail(self, exc: ProtocolError) -> RemoteProtocolError:
        self._state = State.ERROR
        self._why = str(exc)
        self._buf = bytearray()
        self._big = None
        return exc if isinstance(exc, RemoteProtocolError) else RemoteProtocolError(str(exc))

    def _header(self) -> int | None:
        """The front frame's payload length once its 5 header bytes are in.  A clear frame's
        type is checked for the state now, before its payload arrives; a sealed one's only
        once its tag proves the header is the peer's (a changed header must read as
        tampering, not as a peer breaking the rules)."""
        if len(self._buf) < HEADER.size:
            return None
        code, length = HEADER.unpack_from(self._buf)
        if self._seal_in is None:
            self._typed(code, length)
        elif not TAG_SIZE <= length <= MAX_PAYLOAD + TAG_SIZE:
            raise self._seal_in.tampered(f"a sealed frame of {length} bytes")
        return length

    def _typed(self, code: int, length: int) -> type[Event]:
        """The event class of a frame with this header, if the state allows it now."""
        cls = _check_header(code, length)
        self._next_state(self._state, self.peer_role, cls)
        return cls

    def _frame_key(self, sender: str) -> bytes:
        source, dest = ((self._nonce, self._peer_nonce) if self.role == SOURCE
                        else (self._peer_nonce, self._nonce))
        return frame_key(self._key, source, dest, sender)

    def _next_state(self, state: State, sender: str, cls: type[Event]) -> State:
        nxt = _TABLE.get((state, sender, cls))
        who = "peer" if sender == self.peer_role else "we"
        if nxt is None:
            raise ProtocolError(f"{who} ({sender}) may not send {cls.__name__} in state "
                                f"{state.name}")
        if (state, cls) in _BOTH_SIDES and sender in self._done:
            raise ProtocolError(f"{who} ({sender}) already sent {cls.__name__}")
        return nxt

    def _mac(self, sender: str) -> bytes:
        nonces = self._peer_nonce + self._nonce if sender == self.role else (
            self._nonce + self._peer_nonce)  # receiver's nonce, then the sender's
        message = _MAC_CONTEXT + sender.encode() + b"|" + nonces
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _apply(self, event: Event, sender: str) -> None:
        """Check `event` from `sender` against the table and what we know, then commit it."""
        nxt = self._next_state(self._state, sender, type(event))
        self._check_context(event, sender)
        match event:  # nothing changed before this point
            case Hello() if sender == self.peer_role:
                self._peer_nonce = event.nonce
            case Auth() if self.sealed and sender == self.role:
                self._seal_out = _Sealer(self._frame_key(sender), sender)
            case Auth() if self.sealed:
                self._seal_in = _Sealer(self._frame_key(sender), sender)
            case Lineage():
                self._lineage_said = True
            case Held():
                self._held_said = True
            case Manifest():
                self._manifest = event
                self._sizes = {entry.file_id: entry.size for entry in event.files}
            case Resize():
                self._sizes[event.file_id] = event.size
            case RoundDone():
                self._round = event.round
            case Postcopy():
                self._postcopy = event
            case Reattach():
                self._reattach = event
            case Answer() if self._state is State.REATTACH and event.status == "owner":
                nxt = State.POSTCOPY if self._postcopy is not None else State.VERIFYING
            case Resumed() if self._postcopy is not None:
                nxt = State.POSTCOPY
            case DeviceState():
                self._device_state += len(event.data)
            case Abort():
                self._why = f"{'peer' if sender == self.peer_role else 'we'} said {event.reason!r}"
        if (self._state, type(event)) in _BOTH_SIDES:
            self._done.add(sender)
            if len(self._done) < len(ROLES):
                return
            self._done.clear()
        self._state = nxt

    def _check_run(self, file_id: int, first: int, nbytes: int, what: str, verb: str,
                   lie: str) -> None:
        """A run of block data (Blocks, or Packed once decompressed) fits its file: it ends
        inside it, in whole blocks or at the file's end."""
        size, bs = self._size_of(file_id, lie), self._block_size()
        end = first * bs + nbytes
        where = f"{what} for file {file_id} at block {first}"
        if end > size:
            raise ProtocolError(f"{lie}: {where} end at byte {end}, past its size {size}")
        if nbytes % bs and end != size:
            raise ProtocolError(f"{lie}: {where} {verb} {nbytes} bytes: not whole "
                                f"blocks of {bs}, nor the tail of the file")

    def _check_context(self, event: Event, sender: str) -> None:
        """The rules that depend on the handshake, the manifest and the rounds."""
        remote = sender == self.peer_role
        lie = "peer lies about sizes" if remote else "refusing to lie about sizes"
        if (self._state, type(event)) in _POSTCOPY_ONLY and self._postcopy is None:
            raise ProtocolError(f"{type(event).__name__} in state {self._state.name} without "
                                "a Postcopy announcement")
        match event:
            case Hello() if not remote:
                if event != self.hello_event():
                    raise ProtocolError("send hello_event(): a Hello carries our role and nonce")
            case Hello():
                if event.role == self.role:
                    raise ProtocolError(f"peer says it is the {event.role}, and so are we")
                if event.nonce == self._nonce:
                    raise ProtocolError("peer echoed our nonce")
                if event.sealed != self.sealed:  # said the same way on both sides
                    clear, sealed = ((self.role, self.peer_role) if event.sealed
                                     else (self.peer_role, self.role))
                    raise MismatchError(f"the {clear} runs with --insecure-plaintext and the "
                                        f"{sealed} seals its frames: run both sides with "
                                        "--insecure-plaintext, or neither")
            case Auth() if not remote:
                if event.mac != self._mac(sender):
                    raise ProtocolError("send auth_event(): this Auth does not carry our MAC")
            case Auth():
                if not hmac.compare_digest(event.mac, self._mac(sender)):
                    raise AuthenticationError("the peer does not know the shared key "
                                              "(its Auth MAC is wrong)")
            case Blocks():
                if not event.data:
                    raise ProtocolError(f"{lie}: Blocks for file {event.file_id} at block "
                                        f"{event.first_block} carry no data")
                self._check_run(event.file_id, event.first_block, len(event.data),
                                "Blocks", "carry", lie)
            case Packed():
                self._check_run(event.file_id, event.first_block, event.size,
                                "Packed blocks", "hold", lie)
            case Resize():
                self._size_of(event.file_id, lie)
            case Zero():
                nblocks = self._nblocks(event.file_id, lie)
                if event.first_block + event.count > nblocks:
                    raise ProtocolError(f"{lie}: Zero run {event.first_block}+{event.count} of "
                                        f"file {event.file_id} is outside its {nblocks} blocks")
            case Switchover() | Postcopy() if self._manifest and self._manifest.replica:
                raise ProtocolError(f"{type(event).__name__} in a replica session (migrator "
                                    "sync): a replica is never switched over to")
            case Lineage():
                assert self._manifest is not None
                if not self._manifest.lineage:
                    raise ProtocolError("Lineage answers a Manifest that names a replica")
                if self._lineage_said or self._held_said:
                    raise ProtocolError("Lineage twice, or after Held")
                if not set(event.accepted) <= set(self._manifest.lineage_files):
                    raise ProtocolError("Lineage accepts a file the source did not vouch for")
            case Held() if not self._manifest or not self._manifest.delta:
                raise ProtocolError("Held frames answer a Manifest that asks for them (delta)")
            case Digests():  # and Held
                size, bs = self._size_of(event.file_id, lie), self._block_size()
                nblocks, stop = -(-size // bs), event.first_block + len(event.digests)
                if stop > nblocks:
                    raise ProtocolError(f"{lie}: Digests for file {event.file_id} reach block "
                                        f"{stop - 1}, it has {nblocks} blocks")
            case RoundDone():
                if event.round <= self._round:
                    raise ProtocolError(f"RoundDone for round {event.round} after round "
                                        f"{self._round}: rounds must increase")
            case DeviceState():
                if self._device_state + len(event.data) > MAX_DEVICE_STATE:
                    raise ProtocolError(f"device state over {MAX_DEVICE_STATE} bytes")
            case Postcopy():
                if self._postcopy is not None:
                    raise ProtocolError("Postcopy sent twice")
                if self._state is State.REATTACH and (
                        self._manifest is None or not self._reattach.postcopy):
                    raise ProtocolError("Postcopy in a Reattach that does not announce it, or "
                                        "before its Manifest")
            case Manifest() if self._state is State.REATTACH:
                assert self._reattach is not None
                if self._manifest is not None:
                    raise ProtocolError("Manifest sent twice")
                if event.migration != self._reattach.migration:
                    raise ProtocolError(f"Reattach of {self._reattach.migration} re-states "
                                        f"migration {_show(event.migration)}")
            case Answer() if self._state is State.REATTACH:
                assert self._reattach is not None
                if self._manifest is None or (self._reattach.postcopy
                                              and self._postcopy is None):
                    raise ProtocolError("Answer to a Reattach before its Manifest and Postcopy")
                if event.migration != self._reattach.migration:
                    raise ProtocolError(f"Answer about {_show(event.migration)} to a Reattach of "
                                        f"{self._reattach.migration}")
            case Absent():
                if self._postcopy is None:
                    raise ProtocolError("Absent before Postcopy")
                nblocks = self._nblocks(event.file_id, lie)
                for first, count in event.extents:
                    if count < 1 or first + count > nblocks:
                        raise ProtocolError(f"{lie}: Absent run {first}+{count} of file "
                                            f"{event.file_id} is outside its {nblocks} blocks")
            case SpillRefs():
                assert self._postcopy is not None
                for f, b, sl, _g in event.refs:
                    if b >= self._nblocks(f, lie):
                        raise ProtocolError(f"{lie}: spill ref for block {b} of file {f}, "
                                            "past its end")
                    if sl >= self._postcopy.slots:
                        raise ProtocolError(f"spill ref to slot {sl} of "
                                            f"{self._postcopy.slots}")
            case Fetch():
                nblocks = self._nblocks(event.file_id, lie)
                if event.first_block + event.count > nblocks:
                    raise ProtocolError(f"Fetch of blocks {event.first_block}+{event.count} of "
                                        f"file {event.file_id}: it has {nblocks}")
                if event.count * self._block_size() > MAX_BLOCKS_DATA:
                    raise ProtocolError(f"Fetch of {event.count} blocks is over 8 MiB")
            case SlotFree():
                assert self._postcopy is not None
                if any(sl >= self._postcopy.slots for sl, _g in event.slots):
                    raise ProtocolError("SlotFree names a slot past the spill area")
            case RoundAck():
                if event.round != self._round:
                    raise ProtocolError(f"RoundAck for round {event.round}, but round "
                                        f"{self._round} is the one waiting")

    def _nblocks(self, file_id: int, lie: str) -> int:
        return -(-self._size_of(file_id, lie) // self._block_size())

    def _size_of(self, file_id: int, lie: str) -> int:
        if file_id not in self._sizes:
            raise ProtocolError(f"{lie}: file_id {file_id} is not in the manifest")
        return self._sizes[file_id]

    def _block_size(self) -> int:
        assert self._manifest is not None  # the table allows sizes only after the Manifest
        return self._manifest.block_size
