"""`migrator resolve`: settle a handoff that was cut (docs/migration.md, "The handoff").

On the source, a record that says ``handed-off`` (or ``unverified``) means the VM may run on
the destination, so the source copy stays suspended.  Resolve asks the destination's
`migrator serve` what its record says (a Query on an authenticated connection) and acts on
the answer: ``owner`` retires the source copy, ``refused`` resumes it.  When the
destination cannot be asked, a person decides: ``--resume-here`` (the destination copy is
stopped) or ``--retire-here`` (it runs there).  On the destination, resolve says what this
host's record holds.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from . import protocol as p
from .ownership import RESUMED, RETIRED, SourceRecord, dest_answer, settle
from .transport import IO_TIMEOUT, Channel, MigrationError
from .vm import AdapterError, VMAdapter


@dataclass
class Settled:
    done: bool  # the source record is settled (or there was nothing to settle)
    text: str


async def ask(stream: trio.abc.Stream, key: bytes, migration: str,
              io_timeout: float = IO_TIMEOUT, *, sealed: bool = True) -> p.Answer:
    """The destination's Answer about `migration`."""
    ch = Channel(stream, "source", key, io_timeout=io_timeout, sealed=sealed)
    try:
        await ch.handshake()
        await ch.send(p.Query(migration))
        answer = await ch.expect(p.Answer)
        if answer.migration != migration:
            raise MigrationError(f"bad peer: answered about {answer.migration}")
        return answer
    finally:
        await ch.aclose()


def act(record: SourceRecord, action: str, adapter: Callable[[], VMAdapter],
        why: str) -> str:
    """Retire or resume the source copy as settled; returns what was done. The record is
    the caller's to write (after this returned)."""
    if action == "retire":
        try:
            did = adapter().finish()
        except AdapterError as exc:  # e.g. the process is gone already
            did = f"nothing left to stop ({exc})"
        record.state = RETIRED
    elif action == "resume":
        try:
            a = adapter()
            a.resume()
        except AdapterError as exc:
            raise MigrationError(f"cannot resume the source VM: {exc}") from None
        did = f"source VM resumed ({a.name})"
        record.state = RESUMED
    else:
        raise ValueError(action)
    record.detail, record.updated_at = why, time.time()
    return did


async def resolve_source(record: SourceRecord, adapter: Callable[[], VMAdapter],
                         write: Callable[[SourceRecord], None],
                         connect: Callable[[], Awaitable[trio.abc.Stream]] | None,
                         key: bytes | None, decision: str | None, *, sealed: bool = True
                         ) -> Settled:
    """Settle an unsettled source record: by a person's `decision`, or by asking."""
    if not record.unsettled:
        return Settled(True, f"migration {record.migration} is settled: {record.state}"
                       + (f" ({record.detail})" if record.detail else ""))
    if decision is not None:
        did = act(record, decision, adapter, f"settled by hand: {decision}")
        write(record)
        return Settled(True, f"migration {record.migration}: {did}")
    if connect is None or key is None:
        return Settled(False, f"migration {record.migration} to {record.to} is unsettled "
                       f"({record.state}): ask the destination (--to HOST:PORT --key-file "
                       "KEY, with 'migrator serve' running there), or decide: --resume-here "
                       "if the VM is stopped there, --retire-here if it runs there")
    answer = await ask(await connect(), key, record.migration, sealed=sealed)
    action = settle(answer.status)
    if answer.status == "incomplete":
        return Settled(False, f"the destination says: {answer.detail}; the source copy is the "
                       "only whole one and stays suspended: stop the VM on the destination "
                       "('blkfs spill MOUNT --give-up' there ends its waiting reads), then "
                       "resume it here with --resume-here")
    if action is None:
        return Settled(False, f"the destination says: {answer.detail}; nothing is changed "
                       "here: check the destination by hand, then --resume-here or "
                       "--retire-here")
    did = act(record, action, adapter, f"the destination says: {answer.detail}")
    write(record)
    return Settled(True, f"migration {record.migration}: the destination says "
                   f"{answer.status} ({answer.detail}): {did}")


def describe_dest(record: dict[str, object]) -> str:
    """What a destination's record says, for a person on that host."""
    migration = str(record.get("migration", "?"))
    if record.get("status") == "replica":
        rep = record.get("replica")
        epoch = rep.get("epoch") if isinstance(rep, dict) else None
        return (f"sync {migration}: a replica, not runnable (every write up to its epoch "
                f"{epoch} is here; the VM is not this host's): 'migrator migrate' to this host "
                "starts from it")
    status, _epoch, detail = dest_answer(record, migration)
    if status in ("owner", "incomplete"):
        return (f"migration {migration}: {detail}: the VM is this host's; if it is not "
                "running, start it from these files; the source retires its copy when its "
                "'migrator resolve' asks here")
    return (f"migration {migration}: {detail}: the VM is not this host's (the source may run "
            "its copy)")
