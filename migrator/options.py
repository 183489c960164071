"""What a migration is asked to do (MigrateOptions) and how its engine reaches the world
(SourceHooks: the files, the connection, the words for people, the thread for blocking
work); the defaults are the real ones, the engine tests pass fakes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import defaults
from .errors import MigrationError
from .plan import Policy
from .stores import BlkfsSource, SourceFiles
from .throttle import Throttle
from .transport import IO_TIMEOUT, parse_hostport

CONNECT_TIMEOUT = 10.0


@dataclass
class MigrateOptions:
    mount: str
    to: str
    key: bytes
    files: list[str]
    policy: Policy
    bandwidth_mb_s: float | None = None
    static_heat: float | None = None
    report_path: str | None = None
    # Baselines for comparison (scripts/bench_migrate.py), not for production use:
    stop_and_copy: bool = False  # suspend first, copy everything, resume
    static_first: bool = True  # False: initial copy in block order
    io_timeout: float = IO_TIMEOUT
    postcopy: str = defaults.POSTCOPY  # off | on | auto (when pre-copy stops converging)
    spill_dir: str | None = None
    spill_slots: int = defaults.SPILL_SLOTS
    memory_files: list[str] | None = None  # post-copied files (default: by name, see postcopy)
    spill_rate_mb_s: float | None = None  # cap on writes into the spill area
    warm_set_ms: float = defaults.WARM_SET_MS  # post-copy: hottest memory sent in the downtime
    suspend: str = defaults.SUSPEND  # the --suspend spec, kept in the ownership record for resolve
    compress: str | None = None  # zstd | lz4: blocks go compressed where that pays
    delta: bool = True  # ask what the destination holds; send only the blocks that differ
    lineage: bool = True  # with delta: name a replica both sides can prove (lineage.py)
    plaintext: bool = False  # --insecure-plaintext: frames in clear after the handshake
    vm_name: str | None = None  # --vm NAME: the VM's name (its files, once named)
    max_throttle: int = defaults.THROTTLE_MAX  # auto-converge's most (0: never slow the VM)
    converge_timeout: float = defaults.CONVERGE_TIMEOUT_S  # --on-stall converge gives up


@dataclass
class SourceFile:
    """A file of the migration, as the Manifest names it."""

    file_id: int
    rel: str
    size: int


async def tcp_connect(to: str) -> trio.abc.Stream:
    host, port = parse_hostport(to)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            return await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise MigrationError(f"cannot connect to {host}:{port}: no answer within "
                             f"{CONNECT_TIMEOUT:g} s") from None
    except OSError as exc:
        raise MigrationError(f"cannot connect to {host}:{port}: {exc.strerror or exc} "
                             "(is 'migrator serve' running there?)") from None


@dataclass
class SourceHooks:
    """How the engine reaches the world; the defaults are the real ones."""

    open_files: Callable[[MigrateOptions], SourceFiles | Awaitable[SourceFiles]] = field(
        default=lambda o: BlkfsSource.open(o.mount, o.files, o.vm_name))
    connect: Callable[[MigrateOptions], Awaitable[trio.abc.Stream]] = field(
        default=lambda o: tcp_connect(o.to))
    notify: Callable[[str], None] = field(default=lambda text: None)  # milestones, one line
    # Blocking work (the VM adapter, large reads) off the trio thread.
    run_sync: Callable[..., Awaitable[Any]] = field(default=trio.to_thread.run_sync)
    # Auto-converge: what slows the VM's process (rounds.Throttler), given its pid
    throttle: Callable[[int], Any] = field(default=Throttle)
