"""Who may send what when: the states, the table of transitions, and every rule that depends on
what was said before (h11's Rule 1: everything that affects the state lives here).

The session these rows allow is drawn in the package's docstring (migrator/protocol/__init__.py).

Unlike h11's state machine this one knows which side is ours: the handshake's rules differ for
our frames (they must be exactly ours) and the peer's (they must not echo ours), and a refusal
says who broke the rule.  What may be said, and when, is the same for both.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable
from typing import Any

from .events import (
    DEST,
    ROLES,
    SOURCE,
    Abort,
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
    Held,
    HeldZero,
    Hello,
    Lineage,
    Manifest,
    MismatchError,
    Packed,
    Pages,
    Postcopy,
    PostcopyDone,
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
from .fields import show
from .limits import MAX_BLOCKS_DATA, MAX_DEVICE_STATE


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


FINAL = frozenset({State.CLOSED, State.ABORTED, State.ERROR})


# -- the table -------------------------------------------------------------------------------


def _after_answer(cs: ConnectionState, event: Answer) -> State:
    """A Reattach's Answer: ``owner`` goes on where the session broke, anything else ends it."""
    if event.status != "owner":
        return State.CLOSED
    return State.POSTCOPY if cs.postcopy is not None else State.VERIFYING


def _after_resumed(cs: ConnectionState, event: Resumed) -> State:
    """The VM runs on the destination: post-copy goes on until PostcopyDone, else verify."""
    return State.POSTCOPY if cs.postcopy is not None else State.VERIFYING


Next = State | Callable[[Any, Any], State]  # fixed, or decided by what was said before

# (state, sender, event) -> next state
TABLE: dict[tuple[State, str, type[Event]], Next] = {
    (State.HELLO, SOURCE, Hello): State.AUTH,  # once both have (EACH_SIDE_ONCE)
    (State.HELLO, DEST, Hello): State.AUTH,
    (State.AUTH, SOURCE, Auth): State.MANIFEST,  # once both have (EACH_SIDE_ONCE)
    (State.AUTH, DEST, Auth): State.MANIFEST,
    (State.MANIFEST, SOURCE, Manifest): State.READY,
    (State.MANIFEST, SOURCE, Query): State.ANSWER,
    (State.ANSWER, DEST, Answer): State.CLOSED,
    (State.MANIFEST, SOURCE, Reattach): State.REATTACH,
    (State.REATTACH, SOURCE, Manifest): State.REATTACH,
    (State.REATTACH, SOURCE, Postcopy): State.REATTACH,
    (State.REATTACH, DEST, Answer): _after_answer,
    (State.READY, DEST, Held): State.READY,
    (State.READY, DEST, HeldZero): State.READY,
    (State.READY, DEST, Lineage): State.READY,
    (State.READY, DEST, Ready): State.COPYING,
    (State.COPYING, SOURCE, Blocks): State.COPYING,
    (State.COPYING, SOURCE, Zero): State.COPYING,
    (State.ROUND_END, SOURCE, Zero): State.ROUND_END,
    (State.SWITCHOVER, SOURCE, Zero): State.SWITCHOVER,
    (State.COPYING, SOURCE, Packed): State.COPYING,  # pre-copy only: fetches go as Blocks
    (State.ROUND_END, SOURCE, Packed): State.ROUND_END,
    (State.SWITCHOVER, SOURCE, Packed): State.SWITCHOVER,
    (State.COPYING, SOURCE, Pages): State.COPYING,  # pre-copy only, like Packed
    (State.ROUND_END, SOURCE, Pages): State.ROUND_END,
    (State.SWITCHOVER, SOURCE, Pages): State.SWITCHOVER,
    (State.COPYING, SOURCE, Resize): State.COPYING,
    (State.COPYING, SOURCE, RoundDone): State.ROUND_END,
    (State.ROUND_END, SOURCE, Blocks): State.ROUND_END,
    (State.ROUND_END, SOURCE, Resize): State.ROUND_END,
    (State.ROUND_END, DEST, RoundAck): State.COPYING,
    (State.COPYING, SOURCE, Switchover): State.SWITCHOVER,
    (State.SWITCHOVER, SOURCE, Blocks): State.SWITCHOVER,
    (State.SWITCHOVER, SOURCE, Resize): State.SWITCHOVER,
    (State.SWITCHOVER, SOURCE, DeviceState): State.SWITCHOVER,
    (State.SWITCHOVER, SOURCE, Commit): State.RESUMING,
    (State.RESUMING, DEST, Resumed): _after_resumed,
    (State.VERIFYING, SOURCE, Digests): State.VERIFYING,
    (State.VERIFYING, SOURCE, ZeroDigests): State.VERIFYING,
    (State.VERIFYING, SOURCE, VerifyDone): State.VERDICT,
    (State.VERDICT, DEST, Verified): State.FINISHING,
    (State.FINISHING, SOURCE, Done): State.CLOSED,
    # post-copy (the rows of POSTCOPY_ONLY need a Postcopy announcement)
    (State.SWITCHOVER, SOURCE, Postcopy): State.SWITCHOVER,
    (State.SWITCHOVER, SOURCE, Absent): State.SWITCHOVER,
    (State.POSTCOPY, DEST, PostcopyDone): State.POSTCOPY_END,
    (State.POSTCOPY_END, SOURCE, Digests): State.VERIFYING,
    (State.POSTCOPY_END, SOURCE, ZeroDigests): State.VERIFYING,
    (State.POSTCOPY_END, SOURCE, VerifyDone): State.VERDICT,
}
for _st in (State.RESUMING, State.POSTCOPY, State.POSTCOPY_END):
    for _cls in (Blocks, SpillRefs, SpillFlushed):
        TABLE[(_st, SOURCE, _cls)] = _st
for _st in (State.RESUMING, State.POSTCOPY):
    for _cls in (Fetch, SlotFree):
        TABLE[(_st, DEST, _cls)] = _st
# either side may give up at any point until the end
TABLE.update({(st, who, Abort): State.ABORTED for st in State if st not in FINAL for who in ROLES})

# Hello and Auth: each side sends one, the two may cross on the wire, and the state moves on
# when both have.
EACH_SIDE_ONCE = frozenset({(State.HELLO, Hello), (State.AUTH, Auth)})
# Rows legal only once a Postcopy was announced (in RESUMING: post-copy traffic before Resumed).
POSTCOPY_ONLY = frozenset({
    (State.RESUMING, Blocks), (State.RESUMING, SpillRefs), (State.RESUMING, SpillFlushed),
    (State.RESUMING, Fetch), (State.RESUMING, SlotFree), (State.SWITCHOVER, Absent)})


# -- the rules that depend on what was said before ----------------------------------------------


def _hello(cs: ConnectionState, ev: Hello, sender: str) -> None:
    if sender == cs.role:
        if ev != cs.hello:
            raise ProtocolError("send hello_event(): a Hello carries our role and nonce")
        return
    if ev.role == cs.role:
        raise ProtocolError(f"peer says it is the {ev.role}, and so are we")
    if ev.nonce == cs.hello.nonce:
        raise ProtocolError("peer echoed our nonce")
    if ev.sealed != cs.hello.sealed:  # said the same way on both sides
        clear, sealed = ((cs.role, cs.peer_role) if ev.sealed else (cs.peer_role, cs.role))
        raise MismatchError(f"the {clear} runs with --insecure-plaintext and the {sealed} seals "
                            "its frames: run both sides with --insecure-plaintext, or neither")


def _auth(cs: ConnectionState, ev: Auth, sender: str) -> None:
    if sender == cs.role:
        if ev.mac != cs.expected_mac(sender):
            raise ProtocolError("send auth_event(): this Auth does not carry our MAC")
    elif not hmac.compare_digest(ev.mac, cs.expected_mac(sender)):
        raise AuthenticationError("the peer does not know the shared key (its Auth MAC is wrong)")


def _blocks(cs: ConnectionState, ev: Blocks, sender: str) -> None:
    if not ev.data:
        raise ProtocolError(f"{cs.lie(sender)}: Blocks for file {ev.file_id} at block "
                            f"{ev.first_block} carry no data")
    cs.check_run(ev.file_id, ev.first_block, len(ev.data), "Blocks", "carry", sender)


def _packed(cs: ConnectionState, ev: Packed, sender: str) -> None:
    cs.check_run(ev.file_id, ev.first_block, ev.size, "Packed blocks", "hold", sender)


def _pages(cs: ConnectionState, ev: Pages, sender: str) -> None:
    size = cs.size_of(ev.file_id, sender)
    off, n = ev.ranges[-1]
    if off + n > size:
        raise ProtocolError(f"{cs.lie(sender)}: Pages for file {ev.file_id} end at byte "
                            f"{off + n}, past its size {size}")


def _resize(cs: ConnectionState, ev: Resize, sender: str) -> None:
    cs.size_of(ev.file_id, sender)


def _zero(cs: ConnectionState, ev: Zero, sender: str) -> None:
    nblocks = cs.nblocks(ev.file_id, sender)
    if ev.first_block + ev.count > nblocks:
        raise ProtocolError(f"{cs.lie(sender)}: Zero run {ev.first_block}+{ev.count} of file "
                            f"{ev.file_id} is outside its {nblocks} blocks")


def _not_in_replica(cs: ConnectionState, ev: Switchover | Postcopy, sender: str) -> None:
    if cs.manifest and cs.manifest.replica:
        raise ProtocolError(f"{type(ev).__name__} in a replica session (migrator sync): a "
                            "replica is never switched over to")


def _lineage(cs: ConnectionState, ev: Lineage, sender: str) -> None:
    assert cs.manifest is not None
    if not cs.manifest.lineage:
        raise ProtocolError("Lineage answers a Manifest that names a replica")
    if cs.lineage_said or cs.held_said:
        raise ProtocolError("Lineage twice, or after Held")
    if not set(ev.accepted) <= set(cs.manifest.lineage_files):
        raise ProtocolError("Lineage accepts a file the source did not vouch for")


def _held(cs: ConnectionState, ev: Held | HeldZero, sender: str) -> None:
    if not cs.manifest or not cs.manifest.delta:
        raise ProtocolError("Held frames answer a Manifest that asks for them (delta)")


def _digests(cs: ConnectionState, ev: Digests, sender: str) -> None:
    nblocks, stop = cs.nblocks(ev.file_id, sender), ev.first_block + len(ev.digests)
    if stop > nblocks:
        raise ProtocolError(f"{cs.lie(sender)}: Digests for file {ev.file_id} reach block "
                            f"{stop - 1}, it has {nblocks} blocks")


def _zero_digests(cs: ConnectionState, ev: ZeroDigests, sender: str) -> None:
    nblocks = cs.nblocks(ev.file_id, sender)
    if ev.first_block + ev.count > nblocks:
        raise ProtocolError(f"{cs.lie(sender)}: {type(ev).__name__} for file {ev.file_id} "
                            f"reach block {ev.first_block + ev.count - 1}, it has {nblocks} "
                            "blocks")


def _round_done(cs: ConnectionState, ev: RoundDone, sender: str) -> None:
    if ev.round <= cs.round:
        raise ProtocolError(f"RoundDone for round {ev.round} after round {cs.round}: rounds "
                            "must increase")


def _round_ack(cs: ConnectionState, ev: RoundAck, sender: str) -> None:
    if ev.round != cs.round:
        raise ProtocolError(f"RoundAck for round {ev.round}, but round {cs.round} is the one "
                            "waiting")


def _device_state(cs: ConnectionState, ev: DeviceState, sender: str) -> None:
    if cs.device_state + len(ev.data) > MAX_DEVICE_STATE:
        raise ProtocolError(f"device state over {MAX_DEVICE_STATE} bytes")


def _postcopy(cs: ConnectionState, ev: Postcopy, sender: str) -> None:
    if cs.postcopy is not None:
        raise ProtocolError("Postcopy sent twice")
    if cs.state is State.REATTACH and (cs.manifest is None or not cs.reattach.postcopy):
        raise ProtocolError("Postcopy in a Reattach that does not announce it, or before its "
                            "Manifest")


def _manifest(cs: ConnectionState, ev: Manifest, sender: str) -> None:
    if cs.state is not State.REATTACH:
        return
    assert cs.reattach is not None
    if cs.manifest is not None:
        raise ProtocolError("Manifest sent twice")
    if ev.migration != cs.reattach.migration:
        raise ProtocolError(f"Reattach of {cs.reattach.migration} re-states migration "
                            f"{show(ev.migration)}")


def _answer(cs: ConnectionState, ev: Answer, sender: str) -> None:
    if cs.state is not State.REATTACH:
        return
    assert cs.reattach is not None
    if cs.manifest is None or (cs.reattach.postcopy and cs.postcopy is None):
        raise ProtocolError("Answer to a Reattach before its Manifest and Postcopy")
    if ev.migration != cs.reattach.migration:
        raise ProtocolError(f"Answer about {show(ev.migration)} to a Reattach of "
                            f"{cs.reattach.migration}")


def _absent(cs: ConnectionState, ev: Absent, sender: str) -> None:
    if cs.postcopy is None:
        raise ProtocolError("Absent before Postcopy")
    nblocks = cs.nblocks(ev.file_id, sender)
    for first, count in ev.extents:
        if count < 1 or first + count > nblocks:
            raise ProtocolError(f"{cs.lie(sender)}: Absent run {first}+{count} of file "
                                f"{ev.file_id} is outside its {nblocks} blocks")


def _spill_refs(cs: ConnectionState, ev: SpillRefs, sender: str) -> None:
    assert cs.postcopy is not None
    for f, b, sl, _g in ev.refs:
        if b >= cs.nblocks(f, sender):
            raise ProtocolError(f"{cs.lie(sender)}: spill ref for block {b} of file {f}, past "
                                "its end")
        if sl >= cs.postcopy.slots:
            raise ProtocolError(f"spill ref to slot {sl} of {cs.postcopy.slots}")


def _fetch(cs: ConnectionState, ev: Fetch, sender: str) -> None:
    nblocks = cs.nblocks(ev.file_id, sender)
    if ev.first_block + ev.count > nblocks:
        raise ProtocolError(f"Fetch of blocks {ev.first_block}+{ev.count} of file {ev.file_id}: "
                            f"it has {nblocks}")
    if ev.count * cs.block_size() > MAX_BLOCKS_DATA:
        raise ProtocolError(f"Fetch of {ev.count} blocks is over 8 MiB")


def _slot_free(cs: ConnectionState, ev: SlotFree, sender: str) -> None:
    assert cs.postcopy is not None
    if any(sl >= cs.postcopy.slots for sl, _g in ev.slots):
        raise ProtocolError("SlotFree names a slot past the spill area")


Rule = Callable[[Any, Any, str], None]  # (ConnectionState, the event, its sender)

# event -> the rules it must pass, in order, given what was said before (after TABLE said the
# state allows it).  An event with no entry needs nothing but its row.
RULES: dict[type[Event], tuple[Rule, ...]] = {
    Hello: (_hello,), Auth: (_auth,), Manifest: (_manifest,), Blocks: (_blocks,),
    Packed: (_packed,), Pages: (_pages,), Resize: (_resize,), Zero: (_zero,),
    Switchover: (_not_in_replica,),
    Postcopy: (_not_in_replica, _postcopy), Lineage: (_lineage,), Held: (_held, _digests),
    Digests: (_digests,), ZeroDigests: (_zero_digests,), HeldZero: (_held, _zero_digests),
    RoundDone: (_round_done,),
    RoundAck: (_round_ack,),
    DeviceState: (_device_state,), Answer: (_answer,), Absent: (_absent,),
    SpillRefs: (_spill_refs,), Fetch: (_fetch,), SlotFree: (_slot_free,),
}


# -- the machine -----------------------------------------------------------------------------


class ConnectionState:
    """Everything said so far that decides what may be said next: the state, the handshake's
    nonces, and what the Manifest, the rounds and the announcements fixed.  Fed every event
    either side sends (process), it checks the event against TABLE and RULES and only then
    records it, so a refused event changes nothing."""

    def __init__(self, hello: Hello, mac: Callable[[str, bytes, bytes], bytes]) -> None:
        """`hello` is our own Hello; mac(sender, receiver_nonce, sender_nonce) the MAC that
        sender's Auth must carry (sealing.auth_mac with the shared key)."""
        self.hello = hello
        self.role = hello.role
        self.peer_role = DEST if self.role == SOURCE else SOURCE
        self._mac = mac
        self.state = State.HELLO
        self.why = ""  # the error or abort that ended the connection
        self.peer_nonce = b""
        self._done: set[str] = set()  # who sent this EACH_SIDE_ONCE phase's event
        self.manifest: Manifest | None = None
        self.sizes: dict[int, int] = {}  # file_id -> size: the manifest's, updated by Resize
        self.round = -1  # the last RoundDone's round
        self.lineage_said = self.held_said = False
        self.postcopy: Postcopy | None = None
        self.device_state = 0  # bytes of DeviceState so far
        self.reattach: Reattach | None = None

    def expected_mac(self, sender: str) -> bytes:
        """The MAC `sender`'s Auth carries: over the receiver's nonce, then the sender's."""
        ours, theirs = self.hello.nonce, self.peer_nonce
        return self._mac(sender, *((theirs, ours) if sender == self.role else (ours, theirs)))

    def check_legal(self, sender: str, cls: type[Event]) -> Next:
        """The table's row for `cls` from `sender` now; ProtocolError if it has none.  Enough to
        refuse a frame from its header, before its payload arrives."""
        nxt = TABLE.get((self.state, sender, cls))
        who = "peer" if sender == self.peer_role else "we"
        if nxt is None:
            raise ProtocolError(f"{who} ({sender}) may not send {cls.__name__} in state "
                                f"{self.state.name}")
        if (self.state, cls) in EACH_SIDE_ONCE and sender in self._done:
            raise ProtocolError(f"{who} ({sender}) already sent {cls.__name__}")
        return nxt

    def process(self, event: Event, sender: str) -> None:
        """Check `event` from `sender` against the table and what was said, then record it."""
        if self.state is State.ERROR and type(event) is Abort and sender == self.role:
            return  # we may still say why we quit; nothing changes
        nxt = self.check_legal(sender, type(event))
        if (self.state, type(event)) in POSTCOPY_ONLY and self.postcopy is None:
            raise ProtocolError(f"{type(event).__name__} in state {self.state.name} without a "
                                "Postcopy announcement")
        for rule in RULES.get(type(event), ()):
            rule(self, event, sender)
        if not isinstance(nxt, State):
            nxt = nxt(self, event)
        self._record(event, sender)  # nothing changed before this point
        if (self.state, type(event)) in EACH_SIDE_ONCE:
            self._done.add(sender)
            if len(self._done) < len(ROLES):
                return
            self._done.clear()
        self.state = nxt

    def process_error(self, why: str) -> None:
        """A rule was broken (by the peer, or on the way): ERROR for good."""
        self.state = State.ERROR
        self.why = why

    def _record(self, event: Event, sender: str) -> None:
        match event:
            case Hello() if sender == self.peer_role:
                self.peer_nonce = event.nonce
            case Lineage():
                self.lineage_said = True
            case Held() | HeldZero():
                self.held_said = True
            case Manifest():
                self.manifest = event
                self.sizes = {entry.file_id: entry.size for entry in event.files}
            case Resize():
                self.sizes[event.file_id] = event.size
            case RoundDone():
                self.round = event.round
            case Postcopy():
                self.postcopy = event
            case Reattach():
                self.reattach = event
            case DeviceState():
                self.device_state += len(event.data)
            case Abort():
                self.why = f"{'peer' if sender == self.peer_role else 'we'} said {event.reason!r}"

    # -- what the rules ask ---------------------------------------------------------------

    def lie(self, sender: str) -> str:
        """How a refusal about sizes starts: the peer lies, or we refuse to."""
        return "peer lies about sizes" if sender == self.peer_role else (
            "refusing to lie about sizes")

    def check_run(self, file_id: int, first: int, nbytes: int, what: str, verb: str,
                  sender: str) -> None:
        """A run of block data (Blocks, or Packed once decompressed) fits its file: it ends
        inside it, in whole blocks or at the file's end."""
        size, bs, lie = self.size_of(file_id, sender), self.block_size(), self.lie(sender)
        end = first * bs + nbytes
        where = f"{what} for file {file_id} at block {first}"
        if end > size:
            raise ProtocolError(f"{lie}: {where} end at byte {end}, past its size {size}")
        if nbytes % bs and end != size:
            raise ProtocolError(f"{lie}: {where} {verb} {nbytes} bytes: not whole "
                                f"blocks of {bs}, nor the tail of the file")

    def nblocks(self, file_id: int, sender: str) -> int:
        """Blocks in file `file_id` now (its last one may be partial)."""
        return -(-self.size_of(file_id, sender) // self.block_size())

    def size_of(self, file_id: int, sender: str) -> int:
        """The current size of `file_id`; ProtocolError if the manifest has no such file."""
        if file_id not in self.sizes:
            raise ProtocolError(f"{self.lie(sender)}: file_id {file_id} is not in the manifest")
        return self.sizes[file_id]

    def block_size(self) -> int:
        """The Manifest's block size."""
        assert self.manifest is not None  # the table allows sizes only after the Manifest
        return self.manifest.block_size
