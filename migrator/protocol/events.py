"""The vocabulary of the wire: every event (one dataclass per frame), its frame type, the roles,
and the errors.

Events are plain frozen values, checked only when sent or received (codec.check_event), so a
test can build a broken one and watch it refused.  A new frame is a dataclass here plus its
FrameType and EVENT_OF entry, its rows in state.py and its checks in codec.py."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .limits import MAX_REASON

SOURCE, DEST = "source", "dest"
ROLES = (SOURCE, DEST)
ANSWER_STATUSES = ("owner", "refused", "unknown", "incomplete")


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


class PeerClosed(RemoteProtocolError):
    """The peer closed the connection where the protocol does not end: it went away (a crash,
    a kill, a cut), which is not a lie about anything."""


class AbortCode(enum.StrEnum):
    """What kind of end an Abort is, where its receiver acts on it (the reason is for
    people and may be reworded)."""

    NONE = ""
    # the destination still runs this migration's first session (a slow resume hook): the
    # source's Reattach is refused for now, and it keeps trying
    STILL_RUNNING = "still-running"
    SYNC_STOPPED = "sync-stopped"  # a migrator sync stops cleanly: the replica is whole


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
    """One migrated file: its id in later frames, its path under the root, its size, and the
    bytes it takes on the source's disk (a thin image is far smaller there than its size: the
    destination checks its free space against that)."""

    file_id: int
    name: str
    size: int
    allocated: int = 0


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
    # A replica the source vouches for (migrator/lineage.py): "sync@round", and the files whose
    # every write since that sync round its tracker holds; the destination says which it accepts
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
class Pages:
    """Byte ranges of a file: the dirty pages a round sends (4 KiB under 64 KiB blocks), so
    a small write costs its page on the wire, not its block.  `data` is the ranges' bytes in
    order, compressed with `codec` (0: raw, else migrator.codecs) where that paid."""

    file_id: int
    ranges: tuple[tuple[int, int], ...]  # (offset, length): ascending, disjoint, not empty
    data: bytes | bytearray
    codec: int = 0

    @property
    def size(self) -> int:
        """Bytes the ranges hold (what `data` decompresses to)."""
        return sum(n for _, n in self.ranges)


@dataclass(frozen=True, slots=True)
class Resize:
    """A file changed size on the source."""

    file_id: int
    size: int


@dataclass(frozen=True, slots=True)
class RoundDone:
    """End of a pre-copy round; the destination acks once the round's data is written."""

    round: int
    blocks: int  # what the round sent: blocks (the initial copy) or pages (a dirty round)
    bytes: int


@dataclass(frozen=True, slots=True)
class RoundAck:
    """The round's data is written on the destination."""

    round: int


@dataclass(frozen=True, slots=True)
class Switchover:
    """The VM is suspended: the Blocks and Resize that follow are the last set."""


@dataclass(frozen=True, slots=True)
class FileAttrs:
    """A migrated file's attributes at the suspend point (its permission bits, owner, times
    in ns, and user.* extended attributes): the destination sets them before the VM starts
    there, so the files arrive as they left."""

    file_id: int
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Commit:
    """The handoff: the last set is sent and the source has durably given the VM up (its
    ownership record says so); the destination may take it, as ownership generation
    `generation`.

    From here on the source resumes its copy only if the destination says Abort (which the
    destination sends only while it has not taken the VM); a connection lost in between is
    ambiguous and settled by `migrator resolve`, never by guessing."""

    generation: int = 0
    attrs: tuple[FileAttrs, ...] = ()  # the files' attributes at the suspend point


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
class ZeroDigests:
    """Blocks [first_block, first_block + count) are all zeros at the source (its holes):
    the destination's must be too. A thin image's holes are verified in a few bytes."""

    file_id: int
    first_block: int
    count: int


@dataclass(frozen=True, slots=True)
class HeldZero(ZeroDigests):
    """Blocks the destination holds as zeros (its holes), for a Manifest that asked (delta):
    Held for a thin image's holes, a few bytes for any run. ZeroDigests' layout and rules."""


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
class PostcopyFigures:
    """The destination daemon's post-copy figures as the wire carries them: the protocol's own
    type (migrator/postcopy.py converts from and to blkfs's), so a figure blkfs adds for
    `blkfs status` changes nothing here until it is added to this class too.  On the way in,
    a figure this side does not know is dropped and a missing one reads 0: figures are for
    the report, and the last frame of a post-copy must not fail over one."""

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


@dataclass(frozen=True, slots=True)
class PostcopyDone:
    """Every absent block is installed on the destination; its daemon's post-copy figures."""

    stats: PostcopyFigures


@dataclass(frozen=True, slots=True)
class Abort:
    """Either side gives up; the reason is for humans (the peer's is untrusted text)."""

    reason: str
    # A destination that refuses because it owns the VM itself (a split brain): its
    # generation, so the source records the split brain too (-1: not that kind of refusal)
    owner_generation: int = -1
    code: str = AbortCode.NONE  # an AbortCode

    @classmethod
    def about(cls, text: str, owner_generation: int = -1, code: str = AbortCode.NONE
              ) -> Abort:
        """An Abort that always encodes (clipped, unencodable characters replaced), for error
        paths that must not fail themselves."""
        return cls(text.encode("utf-8", "replace").decode("utf-8")[:MAX_REASON],
                   owner_generation, str(code))


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
    """Instead of a Manifest: the source of `migration`, handed off as `generation`, lost its
    connection after Commit and asks to finish. The Manifest (the files as they are now) and,
    while post-copy is unfinished, the Postcopy announcement follow; the destination's Answer
    then says ``owner`` (the session goes on) or why not."""

    migration: str
    generation: int
    postcopy: bool  # a Postcopy announcement follows the Manifest (post-copy is unfinished)


@dataclass(frozen=True, slots=True)
class Lineage:
    """The destination's answer to a Manifest that names a replica (lineage): the files whose
    replica it holds unchanged since that sync round, with their digests kept (the source sends
    them only the blocks written since), and why the others are not (they go the digest way)."""

    accepted: tuple[int, ...]
    detail: str


@dataclass(frozen=True, slots=True)
class Answer:
    """The destination's ownership record of the migration asked about: `status` is
    ``owner`` (it took the VM), ``refused`` (it never will), or ``unknown`` (no record of it:
    settle by hand); `generation` the ownership generation it holds."""

    migration: str
    status: str
    generation: int
    detail: str


Event = (
    Hello | Auth | Manifest | Ready | Blocks | Resize | RoundDone | RoundAck | Switchover
    | Commit | Resumed | Digests | Held | VerifyDone | Verified | Abort | Done | Postcopy | Absent
    | SpillRefs | SpillFlushed | Fetch | SlotFree | PostcopyDone | DeviceState | Query | Answer
    | Reattach | Zero | Packed | Lineage | Pages | ZeroDigests | HeldZero
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
    PAGES = 32
    ZERO_DIGESTS = 33
    HELD_ZERO = 34


EVENT_OF: dict[int, type[Event]] = {
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
    FrameType.HELD: Held, FrameType.LINEAGE: Lineage, FrameType.PAGES: Pages,
    FrameType.ZERO_DIGESTS: ZeroDigests, FrameType.HELD_ZERO: HeldZero,
}
TYPE_OF: dict[type[Event], FrameType] = {cls: FrameType(t) for t, cls in EVENT_OF.items()}


class NeedData(enum.Enum):
    """Type of the NEED_DATA sentinel."""

    NEED_DATA = "NEED_DATA"


NEED_DATA = NeedData.NEED_DATA  # next_event(): no complete frame yet, feed more bytes
