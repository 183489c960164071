"""`migrator resolve`: settle a handoff that was cut (docs/migration.md, "The handoff").

On the source, a VM record in the role ``handing-off`` means the VM may run on the
destination, so the source copy stays suspended.  Resolve asks the destination's `migrator
serve` what its records say of that migration (a Query on an authenticated connection) and
acts on the answer: ``owner`` retires the source copy, ``refused`` resumes it.  When the
destination cannot be asked, a person decides: ``--resume-here`` (the destination copy is
stopped) or ``--retire-here`` (it runs there).  A split brain (both hosts say owner) is
settled the same way, by a person, on each host.  Elsewhere resolve says what this host's
records hold (ownership.describe).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from . import ownership as own
from . import protocol as p
from .errors import BadPeer, MigrationError
from .ownership import VMRecord
from .transport import IO_TIMEOUT, Channel
from .vm import AdapterError, VMAdapter


@dataclass
class Settled:
    done: bool  # the record is settled (or there was nothing to settle)
    text: str
    record: VMRecord | None = None  # the record as settled (the caller writes it)


async def ask(stream: trio.abc.Stream, key: bytes, migration: str,
              io_timeout: float = IO_TIMEOUT, *, sealed: bool = True) -> p.Answer:
    """The destination's Answer about `migration`."""
    ch = Channel(stream, "source", key, io_timeout=io_timeout, sealed=sealed)
    try:
        await ch.handshake()
        await ch.send(p.Query(migration))
        answer = await ch.expect(p.Answer)
        if answer.migration != migration:
            raise BadPeer(f"answered about {answer.migration}")
        return answer
    finally:
        await ch.aclose()


def act(record: VMRecord, action: str, adapter: Callable[[], VMAdapter], why: str,
        by_hand: bool = False) -> tuple[VMRecord, str]:
    """Retire or resume the source copy as settled: (the record to write, what was done)."""
    if action == "retire":
        try:
            did = adapter().finish()
        except AdapterError as exc:  # e.g. the process is gone already
            did = f"nothing left to stop ({exc})"
        out = own.retired_by_hand(record) if by_hand else own.retired(record, why)
    elif action == "resume":
        try:
            a = adapter()
            a.resume()
        except AdapterError as exc:
            raise MigrationError(f"cannot resume the source VM: {exc}") from None
        did = f"source VM resumed ({a.name})"
        out = own.resumed_by_hand(record) if by_hand else own.handoff_off(record, why, True)
    else:
        raise ValueError(action)
    return out, did


async def resolve_source(record: VMRecord, adapter: Callable[[], VMAdapter],
                         write: Callable[[VMRecord], None],
                         connect: Callable[[], Awaitable[trio.abc.Stream]] | None,
                         key: bytes | None, decision: str | None, *, sealed: bool = True
                         ) -> Settled:
    """Settle an unsettled handoff (or a split brain): by a person's `decision`, or by
    asking the destination."""
    name = f"VM {record.name} (migration {record.migration})"
    if record.split_brain and decision is not None:
        if decision == "retire":  # a person says the copy there is the one
            out = own.retired_by_hand(record)
            did = "this copy is retired; the VM is the other host's"
        else:  # (the other host's copy must be retired there by hand too)
            out = own.resumed_by_hand(record)
            did = ("this copy is the owner; retire the other with 'migrator resolve "
                   "--retire-here' there")
        write(out)
        return Settled(True, f"split brain of VM {record.name} settled by hand: {did}", out)
    if not record.unsettled:
        return Settled(True, f"{name} is settled: {own.describe(record)}", record)
    if decision is not None:
        out, did = act(record, decision, adapter, f"settled by hand: {decision}", True)
        write(out)
        return Settled(True, f"{name}: {did} (generation {out.generation})", out)
    if connect is None or key is None:
        return Settled(False, f"{name} to {record.peer} is unsettled ({record.detail}): ask the "
                       "destination (--to HOST:PORT --key-file KEY, with 'migrator serve' "
                       "running there), or decide: --resume-here if the VM is stopped there, "
                       "--retire-here if it runs there")
    answer = await ask(await connect(), key, record.migration, sealed=sealed)
    action = own.settle(answer.status)
    if answer.status == own.INCOMPLETE_ANSWER:
        return Settled(False, f"the destination says: {answer.detail}; the source copy is the "
                       "only whole one and stays suspended: stop the VM on the destination "
                       "('blkfs spill MOUNT --give-up' there ends its waiting reads), then "
                       "resume it here with --resume-here")
    if action is None:
        return Settled(False, f"the destination says: {answer.detail}; nothing is changed "
                       "here: check the destination by hand, then --resume-here or "
                       "--retire-here")
    out, did = act(record, action, adapter, f"the destination says: {answer.detail}")
    write(out)
    return Settled(True, f"{name}: the destination says {answer.status} ({answer.detail}): "
                   f"{did}", out)
