"""The migration wire protocol as a sans-IO state machine (pure: no sockets, no trio, no I/O).

Like h11, a :class:`Connection` turns received bytes into events (``receive_data`` +
``next_event``) and events into bytes to write (``send``), and one state table says who may send
what when.  The I/O shell only moves bytes; every limit and check lives here, so a broken or
hostile peer is refused in one place and the whole protocol is tested in memory.

The package, h11's way (a new frame touches events.py, state.py and codec.py, nothing else):

    events.py      the events (a dataclass per frame), FrameType, the roles, the errors
    state.py       State, the table of transitions and every rule that depends on what was
                   said before (ConnectionState)
    codec.py       events to frames and back, and the checks of every field
    fields.py      checks of single values (ranges, text, file names), shared by both
    sealing.py     the Auth MAC, frame keys (HKDF), AES-256-GCM sealing and opening
    connection.py  Connection: buffers, big frames, sealing, all the above put together
    limits.py      PROTOCOL_VERSION, the frame header and every limit

It imports nothing from blkfs: the wire is its own (PostcopyFigures is converted to and from
the daemon's figures in migrator/postcopy.py).

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
    Digests/ZeroDigests ..., VerifyDone ----->        xxh3 of every block        VERIFYING
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

    Reattach(migration, generation), Manifest, [Postcopy] ->                     REATTACH
           <---------------------------------- Answer(owner: go on; else CLOSED)
    (post-copy not finished: the POSTCOPY exchange above, from PostcopyDone on)  POSTCOPY
    (otherwise: Digests ..., VerifyDone, Verified, Done as above)                VERIFYING

A hypervisor's device state (DeviceState chunks, e.g. QEMU's migration stream with RAM left
out) may follow Switchover, before Commit, in either kind of session.

Abort(reason) may come from either side in any state but CLOSED (even before Auth); both sides
then end in ABORTED.  A broken rule from the peer moves the connection to ERROR for good.
"""

from .codec import DIGESTS_HEAD, check_event, decode, encode
from .connection import Connection
from .events import (
    ANSWER_STATUSES,
    DEST,
    NEED_DATA,
    ROLES,
    SOURCE,
    Abort,
    AbortCode,
    Absent,
    Answer,
    Auth,
    AuthenticationError,
    Blocks,
    Commit,
    DeviceState,
    Digests,
    Done,
    Event,
    Fetch,
    FileAttrs,
    FileEntry,
    FrameType,
    Held,
    HeldZero,
    Hello,
    Lineage,
    LocalProtocolError,
    Manifest,
    MismatchError,
    NeedData,
    Packed,
    Pages,
    PeerClosed,
    Postcopy,
    PostcopyDone,
    PostcopyFigures,
    ProtocolError,
    Query,
    Ready,
    Reattach,
    RemoteProtocolError,
    Resize,
    Resumed,
    RoundAck,
    RoundDone,
    SlotFree,
    SpillFlushed,
    SpillRefs,
    Switchover,
    TamperedError,
    Verified,
    VerifyDone,
    Zero,
    ZeroDigests,
)
from .fields import check_file_name
from .limits import (
    BIG_DATA,
    HEADER,
    MAX_BLOCK_SIZE,
    MAX_BLOCKS_DATA,
    MAX_COMPONENT_BYTES,
    MAX_DEVICE_STATE,
    MAX_DIGESTS_PER_FRAME,
    MAX_FILE_SIZE,
    MAX_FILES,
    MAX_FRAME,
    MAX_ITEMS_PER_FRAME,
    MAX_NAME_BYTES,
    MAX_PAGE_RANGES,
    MAX_PATH,
    MAX_PAYLOAD,
    MAX_REASON,
    MAX_SLOTS,
    MIN_BLOCK_SIZE,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    TAG_SIZE,
)
from .sealing import frame_key
from .state import State

__all__ = [
    "ANSWER_STATUSES",
    "BIG_DATA",
    "DEST",
    "DIGESTS_HEAD",
    "HEADER",
    "MAX_BLOCKS_DATA",
    "MAX_BLOCK_SIZE",
    "MAX_COMPONENT_BYTES",
    "MAX_DEVICE_STATE",
    "MAX_DIGESTS_PER_FRAME",
    "MAX_FILES",
    "MAX_FILE_SIZE",
    "MAX_FRAME",
    "MAX_ITEMS_PER_FRAME",
    "MAX_NAME_BYTES",
    "MAX_PAGE_RANGES",
    "MAX_PATH",
    "MAX_PAYLOAD",
    "MAX_REASON",
    "MAX_SLOTS",
    "MIN_BLOCK_SIZE",
    "NEED_DATA",
    "NONCE_SIZE",
    "PROTOCOL_VERSION",
    "ROLES",
    "SOURCE",
    "TAG_SIZE",
    "Abort",
    "AbortCode",
    "Absent",
    "Answer",
    "Auth",
    "AuthenticationError",
    "Blocks",
    "Commit",
    "Connection",
    "DeviceState",
    "Digests",
    "Done",
    "Event",
    "Fetch",
    "FileAttrs",
    "FileEntry",
    "FrameType",
    "Held",
    "HeldZero",
    "Hello",
    "Lineage",
    "LocalProtocolError",
    "Manifest",
    "MismatchError",
    "NeedData",
    "Packed",
    "Pages",
    "PeerClosed",
    "Postcopy",
    "PostcopyDone",
    "PostcopyFigures",
    "ProtocolError",
    "Query",
    "Ready",
    "Reattach",
    "RemoteProtocolError",
    "Resize",
    "Resumed",
    "RoundAck",
    "RoundDone",
    "SlotFree",
    "SpillFlushed",
    "SpillRefs",
    "State",
    "Switchover",
    "TamperedError",
    "Verified",
    "VerifyDone",
    "Zero",
    "ZeroDigests",
    "check_event",
    "check_file_name",
    "decode",
    "encode",
    "frame_key",
]
