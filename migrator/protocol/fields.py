"""Checks of single field values (integers in range, text, names, pairs, file ids), shared by
the codec's per-frame checks and the state table's rules: one wording for each refusal."""

from __future__ import annotations

from .events import ProtocolError
from .limits import MAX_COMPONENT_BYTES, MAX_FILES, MAX_ITEMS_PER_FRAME, MAX_NAME_BYTES, U64


def show(value: object) -> str:
    """repr() clipped, for messages that quote what a peer sent."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(value: object, lo: int, hi: int, what: str) -> int:
    """`value` if it is an int (not a bool) in lo..hi; ProtocolError naming `what` if not."""
    if type(value) is not int:  # bool is a subclass of int: refuse it too
        raise ProtocolError(f"{what} must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ProtocolError(f"{what} {value} is outside {lo}..{hi}")
    return value


def check_text(value: object, limit: int, what: str) -> None:
    """A str of at most `limit` characters that encodes as UTF-8 (no lone surrogates)."""
    if type(value) is not str:
        raise ProtocolError(f"{what} must be a string, not {type(value).__name__}")
    if len(value) > limit:
        raise ProtocolError(f"{what} is {len(value)} characters long, more than {limit}")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ProtocolError(f"{what} is not valid UTF-8 text") from None


def check_bytes32(value: object, what: str) -> None:
    """Exactly 32 bytes (nonces, MACs)."""
    if type(value) is not bytes or len(value) != 32:
        raise ProtocolError(f"{what} must be 32 bytes, not {show(value)}")


def check_pairs(value: object, what: str) -> None:
    """A tuple of at most MAX_ITEMS_PER_FRAME (u64, u64) pairs (extents, slots)."""
    if type(value) is not tuple or not all(type(x) is tuple and len(x) == 2 for x in value):
        raise ProtocolError(f"{what} must be a tuple of pairs")
    check_int(len(value), 0, MAX_ITEMS_PER_FRAME, f"number of {what}")
    for a, b in value:
        check_int(a, 0, U64, what)
        check_int(b, 0, U64, what)


def check_ids(value: object, what: str) -> None:
    """A tuple of distinct file ids (Manifest.lineage_files, Lineage.accepted)."""
    if type(value) is not tuple or len(value) > MAX_FILES:
        raise ProtocolError(f"{what} must be a list of at most {MAX_FILES} file ids")
    for v in value:
        check_int(v, 0, MAX_FILES - 1, what)
    if len(set(value)) != len(value):
        raise ProtocolError(f"{what} names a file twice")


def check_file_name(name: object) -> str:
    """Return `name` if it is a plain relative path, so no manifest can make the destination
    write outside its root; raise ProtocolError otherwise."""
    if type(name) is not str:
        raise ProtocolError(f"file name must be a string, not {type(name).__name__}")
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise ProtocolError(f"file name {show(name)} is not valid UTF-8") from None
    if not name:
        raise ProtocolError("file name is empty")
    if size > MAX_NAME_BYTES:
        raise ProtocolError(f"file name is {size} bytes long, more than {MAX_NAME_BYTES}")
    if "\0" in name:
        raise ProtocolError(f"file name {show(name)} contains NUL")
    if name.startswith("/"):
        raise ProtocolError(f"file name {show(name)} is absolute")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            kind = f"a {part!r}" if part else "an empty"
            raise ProtocolError(f"file name {show(name)} has {kind} component")
        if len(part.encode()) > MAX_COMPONENT_BYTES:
            raise ProtocolError(f"file name {show(name)} has a component over 255 bytes")
    return name
