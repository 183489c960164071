"""The migrator's errors, each carrying its reason as data.

Code that must tell one failure from another tests the type and reads the fields, never the
message: the message is for people and may be reworded at any time. `str()` of each is the
one line a user reads. Pure: no trio, no sockets.
"""

from __future__ import annotations


class MigrationError(Exception):
    """A failure to report to the user in one line."""


class ConnectionLost(MigrationError):
    """The link broke or went silent: the peer did not lie, so trying again (a reattach) may
    help."""


class BadPeer(MigrationError):
    """The peer broke the protocol (a wrong frame, a wrong value); `reason` says how, without
    the "bad peer: " the user reads in front of it."""

    prefix = "bad peer: "

    def __init__(self, reason: str) -> None:
        super().__init__(f"{self.prefix}{reason}")
        self.reason = reason


class KeyMismatch(BadPeer):
    """The peer's proof of the shared key is wrong (another key file, or a stranger)."""


class PeerMismatch(BadPeer):
    """The peer is a migrator set up differently: another version, or --insecure-plaintext
    on one side only."""


class Tampered(BadPeer):
    """A sealed frame failed its tag: someone on the path changed the stream, or it broke.
    Its reason already says so in the user's words."""

    prefix = ""


class PeerAborted(MigrationError):
    """The peer said Abort, for `reason`. `owner_generation` is its Abort's (>= 0: it refused
    because it owns the VM itself, at that generation: a split brain); `code` says what kind
    of end it was where the receiver acts on it (protocol.AbortCode)."""

    def __init__(self, reason: str, owner_generation: int = -1, code: str = "") -> None:
        super().__init__(f"the peer aborted: {reason}")
        self.reason = reason
        self.owner_generation = owner_generation
        self.code = code


class NotOwner(MigrationError):
    """A destination asked to go on with a migration (a Reattach) does not hold the VM;
    `status` is its Answer's (ownership: refused, unknown, incomplete)."""

    def __init__(self, status: str, text: str) -> None:
        super().__init__(text)
        self.status = status


class VerificationFailed(MigrationError):
    """The destination's files differ from the source's after the switchover."""


def first_error(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from trio nurseries."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
