"""`migrator`: live migration of a VM's files between two blkfs mounts."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from rich.console import Console

from blkfs import package_version
from blkfs.cliutil import OneLineParser, human_bytes, non_negative, positive, whole_number
from blkfs.control import ControlError

from . import defaults
from . import protocol as p
from .deadlines import Deadlines, OnTimeout
from .errors import MigrationError, first_error
from .evacuation import PARALLEL
from .plan import OnStall, Policy
from .report import out_console, print_summary
from .transport import parse_hostport, read_key
from .vm import AdapterError, parse_adapter

if TYPE_CHECKING:
    from .serving import ServeOptions

PROG = "migrator"
# The flag groups below are shared by the commands that move a VM's files (migrate, sync, and
# the coming evacuate): one definition each, their defaults from migrator.defaults.
def percentage(text: str) -> int:
    n = whole_number(text)
    if n > 99:
        raise argparse.ArgumentTypeError(f"{text} is more than 99 (a percentage of the VM's time)")
    return n


BENCH_TITLE = "for benchmarks and comparisons, never for real VMs"
NO_CAP = "default: no cap"


def _warn_plaintext(a: argparse.Namespace) -> bool:
    if a.insecure_plaintext:
        Console(stderr=True).print(
            f"[bold red]migrator {a.cmd}: WARNING: --insecure-plaintext: the VM's data crosses "
            "the network in clear and unauthenticated; anyone on the path can read and change "
            "it. For benchmarks on a link you own, never for real VMs.[/]")
    return a.insecure_plaintext


VM_HELP = ("the VM's name, the same on every host (default: its files' directory, or the "
           "first file's stem); given once with its FILEs, later alone")


def _bench_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The group of flags that exist for scripts/bench_*.py and the tests (every command that
    talks to a peer has --insecure-plaintext); apart, so that nobody takes them for tuning."""
    g = parser.add_argument_group(BENCH_TITLE)
    g.add_argument("--insecure-plaintext", action="store_true",
                   help="INSECURE: after the handshake, frames go in clear and "
                   "unauthenticated (both sides must say it; default: sealed, AES-GCM)")
    return g


def _baseline_flags(parser: argparse.ArgumentParser) -> None:
    """The bench group of a migration: the baselines scripts/bench_migrate.py compares with."""
    g = _bench_flags(parser)
    g.add_argument("--stop-and-copy", action="store_true",
                   help="baseline: suspend first, copy everything, resume (default: live "
                   "pre-copy)")
    g.add_argument("--no-static-first", action="store_true",
                   help="baseline: initial copy in block order (default: static blocks first, "
                   "coldest first)")
    g.add_argument("--no-lineage", action="store_true",
                   help="do not start from a replica both sides can prove unchanged since an "
                   "epoch (a migrator sync's, or the copy a migration away from the "
                   "destination retired), compare digests instead (default: the proof where "
                   "there is one)")


def _io_timeout_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                     then: str = "abort", after: str = "") -> None:
    """--io-timeout, the same default on both sides; `then`: what a timeout does on this
    command, `after`: what follows it."""
    parser.add_argument("--io-timeout", type=positive, default=defaults.IO_TIMEOUT, metavar="S",
                        help=f"{then} when the peer takes or sends nothing for S seconds "
                        f"(default {defaults.IO_TIMEOUT:g}){after}")


def _peer_flags(parser: argparse.ArgumentParser) -> None:
    """Connection and auth of a source: its mount, the destination, the shared key."""
    g = parser.add_argument_group("source, destination, key")
    g.add_argument("--mount", required=True, help="the source blkfs mount point")
    g.add_argument("--to", required=True, metavar="HOST:PORT",
                   help="the destination's 'migrator serve'")
    g.add_argument("--key-file", required=True, metavar="FILE",
                   help="shared key (the same file on both hosts, mode 0600)")


def _vm_flags(parser: argparse.ArgumentParser) -> None:
    """Which VM: its FILEs, or its name once they were named."""
    g = parser.add_argument_group("the VM")
    g.add_argument("files", nargs="*", metavar="FILE",
                   help="the VM's files: relative to the mount, or paths under it")
    g.add_argument("--vm", metavar="NAME", help=VM_HELP)


def _link_flags(parser: argparse.ArgumentParser, *, bandwidth: float | None = None,
                bandwidth_why: str = "", timeout_then: str = "abort",
                timeout_after: str = "", capped: str = "the link bandwidth") -> None:
    """The link: bandwidth cap, io timeout, compression. `bandwidth`: this command's default
    cap (None: none), `bandwidth_why` says why it has one, `capped` what it caps;
    `timeout_*`: see _io_timeout_flag."""
    g = parser.add_argument_group("link")
    default = NO_CAP if bandwidth is None else f"default {bandwidth:g}{bandwidth_why}"
    g.add_argument("--bandwidth", type=_bandwidth, default=bandwidth, metavar="MB/s",
                   help=f"cap {capped} ({default})")
    _io_timeout_flag(g, timeout_then, timeout_after)
    g.add_argument("--compress", choices=("zstd", "lz4"),
                   help="compress blocks on the wire where that saves a tenth or more (for "
                   "slow links: costs CPU; lz4 is the faster, zstd the smaller; default: raw)")


def _copy_flags(parser: argparse.ArgumentParser) -> None:
    """What is sent first, and what not at all (delta)."""
    g = parser.add_argument_group("copy")
    g.add_argument("--static-heat", type=float, metavar="H",
                   help="blocks with heat <= H are static (default: the mount's)")
    g.add_argument("--no-delta", action="store_true",
                   help="send every block, even where the destination holds an older copy "
                   "(default: it says what it holds, an xxh3 per block, and only the blocks "
                   "that differ travel; a migration's verification still covers every block)")


def _switchover_flags(parser: argparse.ArgumentParser, *, suspend: bool = True) -> None:
    """When and how a migration switches over: the planner's policy and (`suspend`) the VM's
    suspend."""
    g = parser.add_argument_group("switchover")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--threshold-blocks", type=whole_number, metavar="N",
                   help="switch over once a round leaves at most N dirty blocks (default: by "
                   "--downtime-ms)")
    x.add_argument("--downtime-ms", type=positive, metavar="MS",
                   help="switch over once the dirty set fits in MS at the measured bandwidth "
                   f"(default {defaults.DOWNTIME_MS:g}; {defaults.POSTCOPY_DOWNTIME_MS:g} for the "
                   "disks' set once memory goes post-copy)")
    g.add_argument("--max-rounds", type=whole_number, default=defaults.MAX_ROUNDS, metavar="R",
                   help="after R rounds the rounds count as not converging (default "
                   f"{defaults.MAX_ROUNDS})")
    g.add_argument("--on-stall", choices=[s.value for s in OnStall], default=defaults.ON_STALL,
                   help="when the rounds stop converging and slowing the VM did not help: "
                   "converge goes on (memory post-copy with --postcopy auto) and stops after "
                   "--converge-timeout, the VM running here; switchover switches over anyway, "
                   "saying the expected downtime first; abort stops at once (default "
                   f"{defaults.ON_STALL})")
    g.add_argument("--converge-timeout", type=positive, metavar="S",
                   default=defaults.CONVERGE_TIMEOUT_S,
                   help="--on-stall converge: rounds that have not met the downtime target after "
                   f"S seconds stop the migration (default {defaults.CONVERGE_TIMEOUT_S:g})")
    g.add_argument("--timeout", type=positive, metavar="S",
                   help="S seconds after it set out, do what --on-timeout says (default: no "
                   "timeout)")
    g.add_argument("--on-timeout", choices=[t.value for t in OnTimeout],
                   default=defaults.ON_TIMEOUT,
                   help="abort: stop, the VM runs on here; suspend: switch over at the end of "
                   "the initial copy or of the round under way, whatever the downtime; "
                   "postcopy: the same, the memory going post-copy (needs --postcopy auto); "
                   f"as virsh migrate --timeout (default {defaults.ON_TIMEOUT})")
    g.add_argument("--progress-timeout", type=non_negative, metavar="S",
                   default=defaults.PROGRESS_TIMEOUT_S,
                   help="stop a migration whose remaining data (the rest of the initial copy, "
                   "or the last dirty set) has not become smaller for S seconds, the VM running "
                   "on here; a step of auto-converge counts as progress (default "
                   f"{defaults.PROGRESS_TIMEOUT_S:g}, as KubeVirt's progressTimeout; 0: never)")
    g.add_argument("--max-throttle", type=percentage, metavar="PCT",
                   default=defaults.THROTTLE_MAX,
                   help="auto-converge: while the VM dirties faster than the link moves, slow "
                   f"its process (pid:, qemu:) in steps ({defaults.THROTTLE_INITIAL} %%, then "
                   f"+{defaults.THROTTLE_STEP}) up to PCT %% of its time; 0: never (default "
                   f"{defaults.THROTTLE_MAX})")
    if suspend:
        g.add_argument("--suspend", default=defaults.SUSPEND, metavar="ADAPTER",
                       help="how to suspend the VM: pid:PID, 'cmd:STOP::CONT', "
                       f"qemu:QMP_SOCKET or freeze (default {defaults.SUSPEND})")


def _postcopy_flags(parser: argparse.ArgumentParser) -> None:
    """Post-copy of the memory through a spill area (docs/spill.md)."""
    pc = parser.add_argument_group("post-copy (docs/spill.md)")
    pc.add_argument("--postcopy", nargs="?", const="on", default=defaults.POSTCOPY,
                    type=_postcopy_mode, metavar="on|auto|off",
                    help="leave the memory pages of the last dirty set absent on the "
                    "destination, resume it at once and move them through the spill area; "
                    f"'auto': only when pre-copy stops converging (default {defaults.POSTCOPY})")
    pc.add_argument("--spill", metavar="DIR",
                    help="where spill areas go, on storage both hosts reach (NFS, CephFS, "
                    "GlusterFS; any local directory on one machine): each migration's is a "
                    "directory of its own in DIR, removed when it is done; default "
                    f"{defaults.SPILL_DIR}")
    pc.add_argument("--spill-slots", type=whole_number, default=defaults.SPILL_SLOTS, metavar="N",
                    help="slots in the spill area, one block each (default "
                    f"{defaults.SPILL_SLOTS}); may be far fewer than the pages to move: freed "
                    "slots are reused")
    pc.add_argument("--spill-bandwidth", type=positive, metavar="MB/s",
                    help=f"cap writes into the spill area (shared storage other hosts use; "
                    f"{NO_CAP})")
    pc.add_argument("--warm-set", type=non_negative, default=defaults.WARM_SET_MS, metavar="MS",
                    help="of the memory left for post-copy, send the hottest (whole 2 MiB "
                    "regions) with the last set, as much as the link moves in MS "
                    "milliseconds, so the destination starts without waiting for those "
                    "pages; with --suspend qemu: first the regions QEMU reads while it loads "
                    f"its state, whatever MS (default {defaults.WARM_SET_MS:g}; 0: none)")
    pc.add_argument("--memory", action="append", metavar="FILE",
                    help="a memory file to post-copy (repeatable; default: the files named "
                    "*.mem, *.ram, mem*, *memory*); disks always stay pre-copy")


def _reporting_flags(parser: argparse.ArgumentParser, *, when: str = "",
                     status_file: bool = True, json_out: bool = True) -> None:
    """The JSON report (written `when`) and, for a migration, where its live status goes."""
    g = parser.add_argument_group("reporting")
    g.add_argument("--report", metavar="PATH",
                   help=f"write the JSON report here{when} (default: none; the summary is "
                   "printed)")
    if json_out:
        g.add_argument("--json", action="store_true",
                       help="print the JSON report on stdout instead of the summary (also on "
                       "a failure; the live line and errors stay on stderr)")
    if status_file:
        g.add_argument("--status-file", metavar="PATH",
                       help="keep a JSON status (phase, round, dirty blocks, bytes, expected "
                       "downtime) current in PATH too, and leave the last one there (always: "
                       "in the runtime directory, removed at the end; 'migrator status' reads "
                       "it)")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog=PROG, description="Live-migrate a running VM's disk and memory files "
                 "between two blkfs mounts over TCP: static blocks first, iterative dirty "
                 "rounds, a short suspend, verified with xxh3.")
    ap.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser,
                            metavar="COMMAND")

    s = sub.add_parser("serve", help="destination: receive migrations into a blkfs mount",
                       description="Receives migrations into a blkfs mount, one session per "
                       "VM at once, until stopped (or one, with --once): checks the source's "
                       "proof of the shared key, writes the files, takes the VM at the "
                       "switchover (its record, then --resume-cmd or --resume) and verifies "
                       "every block.")
    s.add_argument("--mount", required=True, help="the destination blkfs mount point")
    s.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to listen on (port 0: any free port)")
    s.add_argument("--key-file", required=True, metavar="FILE",
                   help="shared key (same file on both hosts, mode 0600)")
    s.add_argument("--resume-cmd", metavar="CMD",
                   help="shell command that starts the VM on the destination at switchover "
                   "(env: MIGRATOR_MOUNT the mount, MIGRATOR_VM the VM's name, MIGRATOR_VM_ID "
                   "its id); the downtime ends when it returns")
    s.add_argument("--resume", metavar="qemu:CMDLINE_FILE|QMP_SOCKET",
                   help="resume a QEMU guest at switchover: start QEMU from the command line "
                   "in CMDLINE_FILE ($MIGRATOR_MOUNT expanded; -incoming defer and a QMP "
                   "socket are added) as soon as the files exist, or use the QEMU already "
                   "waiting on QMP_SOCKET; it loads the device state the source sends, then "
                   "cont")
    s.add_argument("--force", action="store_true",
                   help="overwrite files that belong to a VM which runs on this host (its "
                   "record says so); without it such a migration is refused")
    s.add_argument("--once", action="store_true",
                   help="exit after one migration (status 0 only if it completed); if its "
                   "source was lost after the handoff, first wait --io-timeout for it to "
                   "reattach")
    _io_timeout_flag(s)
    s.add_argument("--spill", metavar="DIR",
                   help="post-copy: where this host sees the sources' --spill DIR (each "
                   "migration's area is a directory of its own in it; default: the path the "
                   "source announces, which is right on one machine or a same-path mount)")
    _bench_flags(s)

    m = sub.add_parser("migrate", help="source: migrate FILEs to a 'migrator serve'",
                       description="Live-migrates a running VM's files to a 'migrator serve': "
                       "static blocks first, dirty rounds until the last set fits "
                       "--downtime-ms, a short suspend, the handoff, and the verification of "
                       "every block after the VM runs there. Any failure before the handoff "
                       "leaves the VM running here, its files as they were.")
    _peer_flags(m)
    _vm_flags(m)
    _switchover_flags(m)
    _link_flags(m)
    _copy_flags(m)
    _postcopy_flags(m)
    _reporting_flags(m)
    _baseline_flags(m)
    m.add_argument("--hold", action="store_true",
                   help="start, then wait for a 'go' on the control socket before connecting "
                   "('migrator evacuate' keeps its next migration ready so: its start then "
                   "costs no process start and no imports)")

    y = sub.add_parser(
        "sync", help="source: keep a replica of FILEs on a 'migrator serve', ahead of a "
        "migration", description="Keeps a replica of a running VM's files on the destination, "
        "for as long as it runs (a service: Ctrl-C or SIGTERM stops it; the replica keeps its "
        "last whole epoch): the static blocks first, then each epoch's dirty set under "
        "--bandwidth, an epoch every --lag/2 s. The destination marks the files 'replica, not "
        "runnable'. A later 'migrator migrate' to it sends only what changed since.")
    _peer_flags(y)
    _vm_flags(y)
    y.add_argument("--lag", type=positive, default=defaults.SYNC_LAG_S, metavar="S",
                   help="target: the replica is never more than S seconds behind (default "
                   f"{defaults.SYNC_LAG_S:g}; an epoch is sent every S/2 s; the report says when "
                   "it fell behind)")
    _link_flags(y, bandwidth=defaults.SYNC_BANDWIDTH_MB_S,
                bandwidth_why=": a sync shares the link with the VMs' own traffic for hours",
                timeout_then="a session is cut", timeout_after="; it is retried with backoff")
    _copy_flags(y)
    _reporting_flags(y, when=" when it stops", status_file=False)
    _bench_flags(y)

    e = sub.add_parser(
        "evacuate", help="source: move every VM of a mount away, a few at once",
        description="Moves every VM this host runs from the mount (those its records say it "
        "owns, and each directory of files no record names: a VM by its directory's name) to "
        "the destinations, at most --parallel at once, each by a 'migrator migrate' of its "
        "own: the soonest done first, each to the destination running the fewest, sharing "
        "--bandwidth (those in their dirty rounds get twice the share of those in their "
        "initial copy). A VM that fails runs on here and is tried once on another "
        "destination. Ctrl-C: no new migration starts, those before their Commit stop (their "
        "VMs run on here), those past it finish.")
    e.add_argument("--mount", required=True, help="the source blkfs mount point")
    e.add_argument("--to", required=True, metavar="HOST:PORT[,HOST:PORT...]",
                   help="the destinations' 'migrator serve' (each takes several at once)")
    e.add_argument("--key-file", required=True, metavar="FILE",
                   help="shared key (the same file on every host, mode 0600)")
    e.add_argument("--vm", action="append", metavar="NAME",
                   help="only this VM (repeatable; default: every VM this host runs from "
                   "the mount)")
    e.add_argument("--parallel", type=_at_least_one, default=PARALLEL, metavar="N",
                   help=f"migrations at once (default {PARALLEL})")
    e.add_argument("--suspend", action="append", metavar="[NAME=]ADAPTER",
                   help="how to suspend the VMs (pid:PID, 'cmd:STOP::CONT', qemu:QMP_SOCKET, "
                   "freeze), or with NAME= one VM; repeatable (default: the one its record "
                   f"keeps, else {defaults.SUSPEND})")
    e.add_argument("--dry-run", action="store_true",
                   help="say which VMs would go, in which order, and stop")
    _switchover_flags(e, suspend=False)
    _link_flags(e, capped="all the migrations together, shared by weight")
    _copy_flags(e)
    _postcopy_flags(e)
    _reporting_flags(e, when=" at the end, a record per VM", status_file=False)
    _bench_flags(e)

    r = sub.add_parser(
        "resolve", help="settle a handoff that was cut: which host runs the VM",
        description="After a migration was cut at the switchover, the source keeps its VM "
        "suspended and says so. On the source, this asks the destination's 'migrator serve' "
        "what its record says and retires or resumes the source copy; or a person decides "
        "with --resume-here / --retire-here (also how a split brain, two hosts that both "
        "say owner, is settled). Elsewhere it says what this host's records hold.")
    r.add_argument("--mount", required=True, help="the blkfs mount of the VM's files")
    r.add_argument("--vm", metavar="NAME", help="the VM to settle (when the mount has several)")
    r.add_argument("--to", metavar="HOST:PORT",
                   help="the destination's 'migrator serve' (default: the one migrated to)")
    r.add_argument("--key-file", metavar="FILE", help="shared key, to ask the destination")
    _bench_flags(r)
    dg = r.add_mutually_exclusive_group()
    dg.add_argument("--resume-here", action="store_true",
                    help="resume the source copy (only once the VM is stopped on the "
                    "destination)")
    dg.add_argument("--retire-here", action="store_true",
                    help="retire the source copy (the VM runs on the destination)")

    st = sub.add_parser("status", help="the migrations running on this host, as "
                        "query-migrate would say (phase, round, remaining, rates); with "
                        "--mount, also every VM that mount's host knows (role, generation)",
                        description="Shows every migration and sync running on this host (of "
                        "this user), one line each, as QEMU's query-migrate would: phase, "
                        "round, what is left, rates, expected downtime; with --mount, those of "
                        "one mount and every VM its records know.")
    st.add_argument("--mount", metavar="MOUNT",
                    help="list the VMs this host knows on this blkfs mount, and its migrations")
    st.add_argument("--status-file", metavar="PATH",
                    help="read this status file (a 'migrate --status-file'), not the "
                    "running ones")
    st.add_argument("--json", action="store_true", help="print the status documents as JSON")

    ID_HELP = ("the migration: its id (or the first 8 characters of it), its pid or its VM's "
               "name, as 'migrator status' shows them (default: the only one running)")
    c = sub.add_parser("cancel", help="stop a running migrate (or sync) of this host",
                       description="Stops a running migration through its control socket. "
                       "Before its Commit it stops at once and its VM runs on here, as after "
                       "Ctrl-C; past its Commit it finishes (the VM may already run at the "
                       "destination), unless --force. A sync stops as on SIGTERM: its replica "
                       "keeps its last whole epoch.")
    c.add_argument("id", nargs="?", metavar="ID", help=ID_HELP)
    c.add_argument("--force", action="store_true",
                   help="past its Commit too: its VM's copy here stays suspended and the "
                   "handoff unsettled ('migrator resolve' settles it)")
    se = sub.add_parser("set", help="change a running migrate (or sync): its bandwidth cap, "
                        "downtime target, post-copy", description="Changes a running "
                        "migration through its control socket: shown on its live line and "
                        "status, and in its report (bandwidth_steps, downtime_steps, "
                        "switchover_reason). As virsh's migrate-setspeed, "
                        "migrate-setmaxdowntime and migrate-postcopy. A sync takes a new "
                        "--bandwidth only.")
    se.add_argument("id", nargs="?", metavar="ID", help=ID_HELP)
    se.add_argument("--bandwidth", type=_cap, default=False, metavar="MB/s|none",
                    help="the new cap, or 'none' for no cap (within a second)")
    se.add_argument("--downtime", type=positive, metavar="MS",
                    help="the new downtime target (as --downtime-ms), from the rounds' next "
                    "decision on")
    se.add_argument("--postcopy", action="store_true",
                    help="switch over at the end of the initial copy or of the round under "
                    "way, the memory left to post-copy (a migrate started with --postcopy "
                    "auto or on)")

    go = sub.add_parser("go", help="start a migrate that waits (--hold)",
                        description="Sends a migrate started with --hold on its way, through "
                        "its control socket: to --to if given (else the one it was started "
                        "with), at --bandwidth if given.")
    go.add_argument("id", nargs="?", metavar="ID", help=ID_HELP)
    go.add_argument("--to", metavar="HOST:PORT", help="the destination's 'migrator serve' "
                    "(default: the --to of the migrate)")
    go.add_argument("--bandwidth", type=_cap, default=False, metavar="MB/s|none",
                    help="its cap (default: its own --bandwidth)")

    k = sub.add_parser("keygen", help="write a new shared key file (mode 0600) to copy to "
                       "both hosts", description="Writes a new random 256-bit key (hex) to "
                       "FILE, mode 0600. Every host of a migration needs the same file: it "
                       "proves each side to the other and keys the sealed frames.")
    k.add_argument("file", metavar="FILE", help="where to write it, e.g. /etc/migrator.key")
    k.add_argument("--force", action="store_true", help="replace a key file that exists")

    d = sub.add_parser("demo", help="everything on one machine: two mounts, a simulated VM, "
                       "a live migration over loopback, verification",
                       description="Everything on one machine: two blkfs mounts, a VM writing "
                       "(simulated, or a real QEMU guest), a live migration over loopback "
                       "while it writes, and the check of its copy; a JSON report.")
    d.add_argument("--disk-size", default="256M", help="simulated VM disk (default 256M)")
    d.add_argument("--mem-size", default="64M", help="simulated VM memory (default 64M)")
    d.add_argument("--write-rate", type=float, default=20.0, metavar="MB/s",
                   help="how fast the VM writes (default 20)")
    d.add_argument("--bandwidth", type=_bandwidth, metavar="MB/s",
                   help="cap the link bandwidth")
    d.add_argument("--report", default="reports/migrate-demo.json", metavar="PATH",
                   help="JSON report (default reports/migrate-demo.json)")
    d.add_argument("--vm", choices=("sim", "qemu"), default="sim",
                   help="sim: the simulated VM (default); qemu: a real QEMU guest (TCG) built "
                   "from Debian packages, migrated with its serial console shown")
    d.add_argument("--postcopy", action="store_true",
                   help="post-copy the memory through a spill area (with a VM that writes "
                   "memory faster than the link, so pre-copy alone would not converge)")
    return ap


def _bandwidth(text: str) -> float:
    mb_s = positive(text)
    if mb_s < defaults.MIN_BANDWIDTH_MB_S:  # (1e-9 MB/s: not even the handshake goes out)
        raise argparse.ArgumentTypeError(
            f"{text} MB/s is too low: at least {defaults.MIN_BANDWIDTH_MB_S:g} MB/s (10 kB/s)")
    return mb_s


def _cap(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else _bandwidth(text)


def _at_least_one(text: str) -> int:
    n = whole_number(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: at least 1")
    return n


def _postcopy_mode(text: str) -> str:
    if text not in ("on", "auto", "off"):
        raise argparse.ArgumentTypeError(
            f"takes on, auto or off, not {text!r} (a FILE right after a bare --postcopy is "
            "read as its value: write --postcopy=on, or put the FILEs first)")
    return text


def _policy(a: argparse.Namespace) -> Policy:
    if a.max_rounds < 1:
        raise MigrationError("--max-rounds must be at least 1")
    return Policy(threshold_blocks=a.threshold_blocks,
                  downtime_ms=a.downtime_ms or defaults.DOWNTIME_MS,
                  postcopy_downtime_ms=a.downtime_ms or defaults.POSTCOPY_DOWNTIME_MS,
                  max_rounds=a.max_rounds, on_stall=OnStall(a.on_stall))


def _say(prefix: str) -> Callable[[str], None]:
    def say(text: str) -> None:
        print(f"{prefix}: {text}", flush=True)

    return say


def cmd_serve(a: argparse.Namespace) -> int:
    from .serving import ServeOptions
    from .stores import check_blkfs_mount

    mount = os.path.abspath(a.mount)
    check_blkfs_mount(mount)
    host, port = parse_hostport(a.listen, listen=True)
    key = read_key(a.key_file)
    spill = os.path.abspath(a.spill) if a.spill else None
    qemu = None
    if a.resume:
        kind, _, spec = a.resume.partition(":")
        if kind != "qemu" or not spec:
            raise MigrationError(f"--resume {a.resume!r}: use qemu:CMDLINE_FILE or "
                                 "qemu:QMP_SOCKET")
        if a.resume_cmd:
            raise MigrationError("--resume and --resume-cmd exclude each other")
        if not os.path.exists(spec):
            raise MigrationError(f"--resume qemu:{spec}: no such file")
        if not stat.S_ISSOCK(os.stat(spec).st_mode) and shutil.which(
                "qemu-system-x86_64") is None:
            raise MigrationError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
        qemu = os.path.abspath(spec)
    opts = ServeOptions(mount, key, a.resume_cmd, a.io_timeout, spill, qemu,
                        say=_say("migrator serve"), force=a.force,
                        plaintext=_warn_plaintext(a))

    lock = _one_serve_per_mount(mount)
    signal.signal(signal.SIGTERM, _serve_terminated)
    try:
        ok = trio.run(_serve_main, opts, host, port, a.once, mount)
    finally:
        os.close(lock)
    return 0 if ok or not a.once else 1


def _one_serve_per_mount(mount: str) -> int:
    """A lock held while serve runs (its fd): a second serve on the same mount is refused at
    its start, not when two sessions come to overlap. One serve takes many sessions at once."""
    import fcntl

    from blkfs.runtime import ensure_runtime_dir, mount_key

    path = os.path.join(ensure_runtime_dir(), mount_key(os.path.realpath(mount)) + ".serve")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise MigrationError(f"another 'migrator serve' (pid {pid}) takes migrations into "
                             f"{mount} already: one serve per mount takes them all (stop it "
                             "first to start this one)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _serve_terminated(signum: int, frame: object) -> None:
    """SIGTERM ends serve as it always did (at once, as a kill does: the fault matrix's
    kill of serve is what a session then goes through), but with a line saying so."""
    os.write(2, b"migrator serve: stopped by SIGTERM; a migration it was taking is cut off "
                b"(its source resumes its VM, or reattaches to a serve started again)\n")
    os._exit(128 + signum)


async def _serve_main(opts: ServeOptions, host: str, port: int, once: bool, mount: str) -> bool:
    from .serving import serve, unfinished_here
    from .stores import MountDest

    result: list[bool] = []

    from .report import keep_incoming_status

    watch = partial(keep_incoming_status, directory=_status_dir(), mount=mount)

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        result.append(await serve(opts, host, port, once, task_status=task_status,
                                  watch=watch))

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(run)
        print(f"migrator serve: listening on {host}:{bound}, writing into {mount}", flush=True)
        note = unfinished_here(MountDest(mount))
        if note:
            print(f"migrator serve: {note}", flush=True)
    return bool(result and result[0])


def cmd_migrate(a: argparse.Namespace) -> int:
    from .options import MigrateOptions, SourceHooks
    from .report import LiveProgress, keep_status_file
    from .source import Source
    from .steering import serve_steering
    from .watchdog import watch_deadlines

    console = Console(stderr=True)
    key = read_key(a.key_file)
    a.files = _vm_files(a)
    adapter = parse_adapter(a.suspend, a.mount, a.files)
    if a.postcopy != "off" and a.stop_and_copy:
        raise MigrationError("--postcopy and --stop-and-copy exclude each other")
    if a.spill_slots < 1:
        raise MigrationError("--spill-slots must be at least 1")
    _check_on_timeout(a)
    deadlines = Deadlines(a.timeout, OnTimeout(a.on_timeout), a.progress_timeout or None)
    opts = MigrateOptions(mount=a.mount, to=a.to, key=key, files=a.files, policy=_policy(a),
                          bandwidth_mb_s=a.bandwidth, static_heat=a.static_heat,
                          report_path=a.report, stop_and_copy=a.stop_and_copy,
                          static_first=not a.no_static_first, io_timeout=a.io_timeout,
                          postcopy=a.postcopy,
                          spill_dir=os.path.abspath(a.spill or defaults.SPILL_DIR),
                          spill_slots=a.spill_slots, memory_files=a.memory,
                          spill_rate_mb_s=a.spill_bandwidth, warm_set_ms=a.warm_set,
                          suspend=a.suspend,
                          compress=a.compress, plaintext=_warn_plaintext(a),
                          delta=not a.no_delta, lineage=not a.no_lineage, vm_name=a.vm,
                          max_throttle=a.max_throttle, converge_timeout=a.converge_timeout)
    def notify(text: str) -> None:
        console.print(f"migrator: {text}")

    src = Source(opts, adapter, SourceHooks(notify=notify))

    where = {"mount": os.path.abspath(a.mount), "to": a.to}
    go = trio.Event() if a.hold else None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signals, nursery.cancel_scope, src, console)
            if go is not None:
                src.progress.phase = "held"
            for path in status_paths:  # (the runtime dir's: 'migrator status', set, cancel)
                nursery.start_soon(partial(keep_status_file, extra=where), src.progress,
                                   src.report, path)
            run = trio.CancelScope()  # (a cancel through the socket: not its own answer's)
            await nursery.start(serve_steering, steering_socket(status_paths[0]),
                                partial(_steer_source, src, run, go, where))
            try:
                with run:
                    if go is not None:
                        await go.wait()  # (cancelled meanwhile: nothing was sent)
                        src.progress.phase = "connecting"
                    nursery.start_soon(LiveProgress(src.progress, console).run)
                    nursery.start_soon(watch_deadlines, src, deadlines,
                                       partial(_stop_before_commit, src, run), notify)
                    await src.run()
            finally:
                nursery.cancel_scope.cancel()
                if go is not None and not go.is_set():
                    src.report.status, src.report.error = "failed", (
                        f"{src.cancelled_by or 'stopped'} while held: nothing was sent, the VM "
                        "runs here")
                    if a.report:
                        src.report.write(a.report)

    status_paths = [_own_status_file(), *([os.path.abspath(a.status_file)] if a.status_file
                                          else [])]
    try:
        trio.run(main)
    except Exception:
        if not src.report.error:
            raise
        # The report's error is the whole story (e.g. where the VM runs and how to settle it)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(status_paths[0])  # (--status-file's stays: its last status)
        if a.json:
            print(json.dumps(src.report.to_json(), indent=1), flush=True)
        elif src.report.files:  # got past the handshake: there is something to summarize
            print_summary(src.report, out_console())
        if a.report and not a.json:
            print(f"JSON report: {a.report}")
    if src.report.status != "completed":
        raise MigrationError(src.report.error or "the migration did not complete")
    return 0


def _check_on_timeout(a: argparse.Namespace) -> None:
    if a.on_timeout == "postcopy" and a.postcopy == "off":
        raise MigrationError("--on-timeout postcopy needs --postcopy auto (the spill area is "
                             "made at the start)")


def _stop_before_commit(src: Any, scope: trio.CancelScope, why: str,
                        anyway: bool = False) -> bool:
    """Stop the migration unless its Commit went out (then it finishes; `anyway`: stop it
    still); whether it stopped. In the migration's own trio loop: no Commit can go out
    between the look and the cancel."""
    if not anyway and src.handoff is not None and src.handoff.commit_sent:
        return False
    src.cancelled_by = why
    scope.cancel()
    _hurry(src)
    return True


def _hurry(src: Any) -> None:
    """A stopped migration's frame under way gets a few seconds, not the rest of
    --io-timeout: a peer that takes no data would hold the stop (Channel.hurry)."""
    if src is not None and src.ch is not None:
        src.ch.hurry(defaults.STOP_GRACE_S)


def _steer_source(src: Any, scope: trio.CancelScope, go: trio.Event | None,
                  where: dict[str, Any], req: Any) -> dict[str, Any]:
    """A request of the control socket (steerproto), in the migration's own trio loop."""
    from .steerproto import UNCHANGED, Cancel, Go

    if isinstance(req, Go):
        if go is None or go.is_set():
            return {"ok": False, "error": "not held (started without --hold, or gone already)"}
        if req.to is not None:
            try:
                parse_hostport(req.to)
            except MigrationError as exc:
                return {"ok": False, "error": str(exc)}
            src.opts.to = where["to"] = req.to
        if req.mb_s != UNCHANGED:  # (its cap from the start, as --bandwidth would be)
            src.opts.bandwidth_mb_s = src.progress.cap_mb_s = req.mb_s
        src.report.started_at = time.time()
        go.set()
        return {"ok": True, "to": src.opts.to}
    if isinstance(req, Cancel):
        if not _stop_before_commit(src, scope, "cancelled ('migrator cancel', or its "
                                   "evacuation stopped)", anyway=not req.unless_committed):
            return {"ok": True, "cancelled": False, "why": "past its Commit: it finishes"}
        return {"ok": True, "cancelled": True}
    if req.postcopy:  # (first: refused, it changes nothing else either)
        cannot = src.switch_over_soon(True, "asked to go post-copy ('migrator set "
                                            "--postcopy')")
        if cannot:
            return {"ok": False, "error": f"cannot go post-copy: {cannot}"}
    if req.downtime_ms is not None:
        src.set_downtime(req.downtime_ms)
    if req.mb_s != UNCHANGED:
        src.set_bandwidth(req.mb_s)
    return {"ok": True, "bandwidth_mb_s": src.opts.bandwidth_mb_s,
            "downtime_ms": src.progress.downtime_target_ms, "postcopy": req.postcopy}


def cmd_sync(a: argparse.Namespace) -> int:
    from .report import LiveSyncLine, keep_status_file, print_sync_summary
    from .sync import Syncer, sync_options

    console = Console(stderr=True)
    key = read_key(a.key_file)
    a.files = _vm_files(a)
    opts = sync_options(a.mount, a.to, key, a.files, vm_name=a.vm, bandwidth_mb_s=a.bandwidth,
                        static_heat=a.static_heat, report_path=a.report,
                        io_timeout=a.io_timeout, compress=a.compress,
                        plaintext=_warn_plaintext(a), delta=not a.no_delta)
    from .options import SourceHooks

    syncer = Syncer(opts, a.lag, SourceHooks(notify=lambda text: console.print(
        f"migrator sync: {text}")))

    async def stop_on_signals() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if syncer.in_round and not syncer.stopping:
                    console.print("migrator sync: stopping once this round is acknowledged "
                                  "(Ctrl-C again to stop now)")
                syncer.stop()

    def now() -> dict[str, Any]:  # for 'migrator status' in another process
        s, lag = syncer.sync, syncer.lag_now
        return {"kind": "sync", "migration": s.sync, "status": s.status, "to": a.to,
                "mount": os.path.abspath(a.mount), "replica_epoch": s.epoch,
                "lag_s": None if lag is None else round(lag, 2), "lag_target_s": a.lag,
                "error": s.error}

    status_path = _own_status_file()

    def steered(req: Any) -> dict[str, Any]:  # (its control socket: migrator set, cancel)
        from .steerproto import UNCHANGED, Cancel, Go

        if isinstance(req, Cancel):
            syncer.stop()
            return {"ok": True, "cancelled": True}
        if isinstance(req, Go) or req.downtime_ms is not None or req.postcopy:
            return {"ok": False, "error": "a sync takes only a new --bandwidth (it never "
                    "switches over)"}
        if req.mb_s != UNCHANGED:
            syncer.set_bandwidth(req.mb_s)
        return {"ok": True, "bandwidth_mb_s": syncer.opts.bandwidth_mb_s}

    async def main() -> None:
        from .steering import serve_steering

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signals)
            await nursery.start(serve_steering, steering_socket(status_path), steered)
            nursery.start_soon(LiveSyncLine(syncer, console).run)
            nursery.start_soon(partial(keep_status_file, more=now), syncer.progress,
                               syncer.report, status_path, 0.5)
            try:
                await syncer.run()
            finally:
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except Exception:
        if not syncer.sync.error:
            raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(status_path)
        if a.json:
            print(json.dumps(asdict(syncer.sync), indent=1), flush=True)
        elif syncer.sync.files:
            print_sync_summary(syncer.sync, out_console())
        if a.report and not a.json:
            print(f"JSON report: {a.report}")
    if syncer.sync.status != "stopped":
        raise MigrationError(syncer.sync.error or "the sync did not run")
    return 0


# Evacuate's own flags; every other one goes to each migrate as it was given
EVACUATE_OWN = {"cmd", "mount", "to", "key_file", "vm", "parallel", "suspend", "dry_run",
                "report", "bandwidth", "help", "json"}


def _pass_through(parser: argparse.ArgumentParser, a: argparse.Namespace) -> list[str]:
    """The flags given to evacuate that each migrate takes as they are (not the defaults)."""
    out: list[str] = []
    for act in parser._actions:
        value = getattr(a, act.dest, None)
        if not act.option_strings or act.dest in EVACUATE_OWN or value in (None, act.default):
            continue
        flag = act.option_strings[-1]
        if isinstance(act, argparse._StoreTrueAction):
            out.append(flag)
        else:
            out += [f"{flag}={v}" for v in (value if isinstance(value, list) else [value])]
    return out


def cmd_evacuate(a: argparse.Namespace) -> int:
    from .evacuate import (
        EvacuateOptions,
        Evacuator,
        check_destinations,
        find_candidates,
        print_evacuation,
    )
    from .evacuation import order
    from .report import write_json
    from .stores import check_blkfs_mount

    mount = os.path.abspath(a.mount)
    check_blkfs_mount(mount)
    to = check_destinations(a.to)
    read_key(a.key_file)  # one line now, rather than once per VM
    _check_on_timeout(a)
    _warn_plaintext(a)
    suspend, by_vm = "", {}
    for spec in a.suspend or ():
        name, eq, adapter = spec.partition("=")
        if eq and ":" not in name:
            by_vm[name] = adapter
        else:
            suspend = spec
    os.makedirs(_status_dir(), mode=0o700, exist_ok=True)
    sub = build_parser()._subparsers._group_actions[0].choices["evacuate"]  # type: ignore[union-attr]
    opts = EvacuateOptions(mount, to, os.path.abspath(a.key_file), a.vm or [], a.parallel,
                           a.bandwidth, suspend, by_vm, _pass_through(sub, a),
                           a.report, _status_dir(), json_out=a.json)
    candidates, skipped = find_candidates(opts)
    say = sys.stderr if a.json else sys.stdout  # (--json: stdout is the report's alone)
    for line in skipped:
        print(f"migrator evacuate: left out {line}", file=say, flush=True)
    if not candidates:
        print(f"migrator evacuate: nothing to evacuate: no VM runs from {a.mount}", file=say)
        if a.json:
            print(json.dumps({"mount": mount, "destinations": to, "moved": 0, "stayed": 0,
                              "unsettled": 0, "skipped": skipped, "vms": []}, indent=1))
        return 0
    if a.dry_run:
        for i, c in enumerate(order(candidates), 1):
            print(f"migrator evacuate: {i}. {c.name} ({', '.join(c.files)}): "
                  f"{human_bytes(c.data_bytes)} of data, {human_bytes(c.hot_bytes)} hot")
        return 0
    ev = Evacuator(opts, candidates, Console(stderr=True))
    try:
        trio.run(ev.run)
    finally:
        ev.close()
        doc = ev.report(skipped)
        if a.report:
            write_json(a.report, doc)
        if a.json:
            print(json.dumps(doc, indent=1), flush=True)
        else:
            print_evacuation(doc, out_console())
        if a.report and not a.json:
            print(f"JSON report: {a.report}")
    if doc["moved"] < len(doc["vms"]):
        here = [r["vm"] for r in doc["vms"] if r["outcome"] == "stayed"]
        open_ = [r["vm"] for r in doc["vms"] if r["outcome"] == "unsettled"]
        raise MigrationError(
            f"{doc['moved']} of {len(doc['vms'])} VMs moved"
            + (f"; {', '.join(here)} still run{'s' if len(here) == 1 else ''} here" if here
               else "")
            + (f"; {', '.join(open_)} unsettled: 'migrator resolve --mount {a.mount} --vm "
               "NAME' settles each" if open_ else ""))
    return 0


def _records(mount: str) -> Any:
    """This host's VM records of a live blkfs mount (vmrecords.RecordDir)."""
    from blkfs import ctlproto as cp
    from blkfs.control import ControlClient

    from .stores import check_blkfs_mount
    from .vmrecords import RecordDir

    check_blkfs_mount(mount)
    with ControlClient.for_mount(mount, timeout=10) as c:
        info = c.call(cp.Info())
    return RecordDir(info.backing)


def _vm_files(a: argparse.Namespace) -> list[str]:
    """The FILEs as the mount names them (relative, absolute or through a symlink: the same
    file), or those of the VM named --vm; one line if neither says which."""
    from .ownership import Refusal, find_vm
    from .stores import check_blkfs_mount
    from .vmrecords import mount_relative

    check_blkfs_mount(os.path.abspath(a.mount))
    if a.files:
        rels = [mount_relative(a.mount, f) for f in a.files]
        for rel in dict.fromkeys(r for r in rels if rels.count(r) > 1):
            given = [f for f, r in zip(a.files, rels, strict=True) if r == rel]
            raise MigrationError(f"{rel} is named twice: as {' and '.join(given)} (one file "
                                 "by two paths: name it once)")
        return rels
    if not a.vm:
        raise MigrationError("name the VM's files (FILE...), or the VM (--vm NAME)")
    records = _records(a.mount)
    try:
        rec = find_vm(records.all(), [], a.vm)
    except Refusal as exc:
        raise MigrationError(str(exc)) from None
    finally:
        records.close()
    assert rec is not None
    return list(rec.files)


def _status_dir() -> str:
    from blkfs.runtime import runtime_dir

    return os.path.join(runtime_dir(), "migrations")


def _own_status_file() -> str:
    d = _status_dir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    return os.path.join(d, f"{os.getpid()}.json")


def steering_socket(status_file: str) -> str:
    """A migration's control socket, beside its own status file (runtime dir, by pid)."""
    return status_file[:-len(".json")] + ".sock"


def cmd_status(a: argparse.Namespace) -> int:
    from blkfs.runtime import process_gone

    from .report import RUNNING, status_line

    if a.status_file:
        paths = [a.status_file]
        if not os.path.exists(a.status_file):
            raise MigrationError(f"{a.status_file}: no such status file (is the path the one "
                                 "given to 'migrate --status-file'?)")
    else:
        d = _status_dir()
        paths = sorted(os.path.join(d, n) for n in (os.listdir(d) if os.path.isdir(d) else ())
                       if n.endswith(".json"))
    docs = []
    for path in paths:
        try:
            with open(path) as f:
                doc = json.load(f)
        except FileNotFoundError:
            continue  # it ended while we looked
        except (OSError, ValueError) as exc:
            if a.status_file:
                raise MigrationError(f"{path}: not a migrator status file ({exc})") from None
            print(f"migrator: skipping {path}: not a migrator status file ({exc}); remove it",
                  file=sys.stderr)
            continue
        pid = doc.get("pid")
        if doc.get("kind") == "incoming":
            if not isinstance(pid, int) or process_gone(pid):  # (its serve was killed)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            doc["running"] = True
            docs.append(doc)
            continue
        doc["running"] = isinstance(pid, int) and not process_gone(pid) and doc.get(
            "status") in RUNNING
        if not doc["running"] and doc.get("status") in RUNNING:  # (killed: it never ended)
            doc["status"], doc["died_in"] = "died", doc.get("phase")
        docs.append(doc)
    vms = None
    if a.mount:
        from .ownership import describe, summary

        mount = os.path.abspath(a.mount)
        records = _records(mount)
        try:
            vms = records.all()
        finally:
            records.close()
        docs = [d for d in docs if d.get("mount") == mount]
    if a.json:
        out: Any = docs if vms is None else {"mount": os.path.abspath(a.mount), "vms": [
            summary(r) for r in vms], "migrations": docs}
        print(json.dumps(out, indent=1))
        return 0
    if vms is not None:
        arriving = {d.get("migration") for d in docs if d.get("kind") == "incoming"}
        for rec in vms:
            print(describe(rec, rec.migration in arriving))
        if not vms:
            print(f"migrator: no VM known on {a.mount} yet (none migrated to or from it)")
    if not docs:
        if vms is None:
            print("migrator: no migration is running on this host (as this user)")
        return 0
    for doc in docs:
        gone = "" if doc.get("status") != "died" else (
            f" [died in {doc.get('died_in')}: its process {doc.get('pid')} is gone; the replica "
            "there keeps its last epoch (the VM never left); run the sync again, or migrate]"
            if doc.get("kind") == "sync" else f" [died in {doc.get('died_in')}: its process "
            f"{doc.get('pid')} is gone, it did not finish; 'migrator resolve --mount "
            f"{doc.get('mount')}' says where the VM runs]")
        print(status_line(doc) + gone)
    return 0


def _running_docs() -> list[dict[str, Any]]:
    """The status documents of this host's running migrations and syncs (their processes
    alive)."""
    from blkfs.runtime import process_gone

    from .report import RUNNING

    d = _status_dir()
    docs = []
    for n in sorted(os.listdir(d)) if os.path.isdir(d) else ():
        if not n.endswith(".json"):
            continue
        try:
            with open(os.path.join(d, n)) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        pid = doc.get("pid") if isinstance(doc, dict) else None
        if isinstance(pid, int) and not process_gone(pid) and doc.get("status") in RUNNING:
            docs.append(doc)
    return docs


def _one_running(ident: str | None, what: str) -> dict[str, Any]:
    docs = _running_docs()
    if ident:
        docs = [d for d in docs if ident in (str(d.get("pid")), d.get("vm"))
                or (len(ident) >= 8 and str(d.get("migration") or "").startswith(ident))]
    if len(docs) == 1:
        return docs[0]
    if not docs:
        raise MigrationError(f"no running migration {'matches ' + ident if ident else 'here'}"
                             f" to {what} ('migrator status' lists them)")
    listed = ", ".join(f"{str(d.get('migration'))[:8]} ({d.get('vm') or '?'}, pid "
                       f"{d.get('pid')})" for d in docs)
    raise MigrationError(f"{len(docs)} migrations run here: {listed}; name one")


def _steer(doc: dict[str, Any], request: bytes) -> dict[str, Any]:
    from .steering import steer

    sock = steering_socket(os.path.join(_status_dir(), f"{doc['pid']}.json"))
    try:
        answer = trio.run(steer, sock, request)
    except (OSError, ValueError, trio.TooSlowError) as exc:
        raise MigrationError(f"{_named(doc)} does not answer on {sock}: {exc}") from None
    if not answer.get("ok"):
        raise MigrationError(f"{_named(doc)}: {answer.get('error')}")
    return answer


def _named(doc: dict[str, Any]) -> str:
    mig = doc.get("migration")
    return (f"migration {str(mig)[:8] if mig else '(not started yet)'}"
            + (f" of {doc['vm']}" if doc.get("vm") else "") + f" (pid {doc.get('pid')})")


def cmd_cancel(a: argparse.Namespace) -> int:
    from .steerproto import cancel

    doc = _one_running(a.id, "cancel")
    if doc.get("kind") == "sync":
        os.kill(doc["pid"], signal.SIGTERM)
        print(f"migrator cancel: asked the sync {_named(doc)} to stop: its replica keeps its "
              "last whole epoch")
        return 0
    answer = _steer(doc, cancel(unless_committed=not a.force))
    if answer.get("cancelled"):
        print(f"migrator cancel: {_named(doc)} stopped"
              + ("" if a.force else ": before its Commit, its VM runs on here"))
        return 0
    print(f"migrator cancel: {_named(doc)} is past its Commit and finishes (its VM may already "
          "run at the destination); --force stops it anyway, leaving it unsettled")
    return 1


def cmd_set(a: argparse.Namespace) -> int:
    from .steerproto import UNCHANGED, set_

    if a.bandwidth is False and a.downtime is None and not a.postcopy:
        raise MigrationError("nothing to set: give --bandwidth, --downtime or --postcopy")
    doc = _one_running(a.id, "change")
    if doc.get("kind") == "sync" and (a.downtime is not None or a.postcopy):
        raise MigrationError(f"the sync {_named(doc)} takes only a new --bandwidth: it never "
                             "switches over")
    _steer(doc, set_(UNCHANGED if a.bandwidth is False else a.bandwidth, a.downtime,
                     a.postcopy))
    if a.bandwidth is not False:
        was = doc.get("bandwidth_cap_mb_s")
        print(f"migrator set: {_named(doc)}: bandwidth cap "
              f"{'none' if was is None else f'{was:g} MB/s'} -> "
              f"{'none' if a.bandwidth is None else f'{a.bandwidth:g} MB/s'}")
    if a.downtime is not None:
        was = doc.get("downtime_target_ms")
        print(f"migrator set: {_named(doc)}: downtime target "
              f"{'by --threshold-blocks' if was is None else f'{was:g} ms'} -> "
              f"{a.downtime:g} ms, from its next round on")
    if a.postcopy:
        print(f"migrator set: {_named(doc)}: switches over into post-copy at the end of "
              "its initial copy or of the round under way")
    return 0


def cmd_go(a: argparse.Namespace) -> int:
    from .steerproto import UNCHANGED, go

    doc = _one_running(a.id, "start")
    if doc.get("phase") != "held":
        raise MigrationError(f"{_named(doc)} is not held: it runs already")
    if a.to is not None:
        parse_hostport(a.to)
    answer = _steer(doc, go(a.to, UNCHANGED if a.bandwidth is False else a.bandwidth))
    print(f"migrator go: {_named(doc)} sets out to {answer.get('to')}")
    return 0


def cmd_resolve(a: argparse.Namespace) -> int:
    from .options import tcp_connect
    from .ownership import describe
    from .resolve import resolve_source

    mount = os.path.abspath(a.mount)
    records = _records(mount)
    try:
        known = records.all()
        if a.vm:
            known = [r for r in known if r.name == a.vm]
            if not known:
                raise MigrationError(f"no VM named {a.vm} on {a.mount}")
        decision = "resume" if a.resume_here else "retire" if a.retire_here else None
        open_ = [r for r in known if r.unsettled or (decision and r.split_brain)]
        if len(open_) > 1:
            raise MigrationError(f"{len(open_)} VMs on {a.mount} are unsettled ("
                                 f"{', '.join(r.name for r in open_)}): name one with --vm")
        if open_:
            rec = open_[0]
            key = read_key(a.key_file) if a.key_file else None
            to = a.to or rec.peer
            out = trio.run(partial(resolve_source, sealed=not _warn_plaintext(a)), rec,
                           lambda: parse_adapter(rec.suspend or defaults.SUSPEND, mount, rec.files),
                           records.put, (lambda: tcp_connect(to)) if key else None, key,
                           decision)
            print(f"migrator resolve: {out.text}", flush=True)
            return 0 if out.done else 1
        if decision is not None:
            raise MigrationError(f"nothing to {decision} on {a.mount}: no unsettled handoff "
                                 "and no split brain here")
        for ln in [describe(r) for r in known] or [
                f"nothing to settle on {a.mount}: no VM record"]:
            print(f"migrator resolve: {ln}")
        return 0
    finally:
        records.close()


async def _cancel_on_signals(scope: trio.CancelScope, src: Any = None,
                             console: Console | None = None) -> None:
    """Ctrl-C / SIGTERM stop the migration, except while post-copy pages are still going
    into the spill area: the VM runs on the destination and needs them, so the first signal
    only warns; a second one stops anyway."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        warned = False
        async for _ in signals:
            if src is not None and src.spilling and not warned and console is not None:
                warned = True
                console.print("[bold red]migrator: the VM runs on the destination and the "
                              "remaining memory pages are still going into the spill area; "
                              "stopping now loses them. Ctrl-C again to stop anyway.[/]")
                continue
            scope.cancel()
            _hurry(src)
            return


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(a)


def cmd_keygen(a: argparse.Namespace) -> int:
    from .transport import write_key

    write_key(a.file, force=a.force)
    print(f"migrator keygen: wrote a new key to {a.file} (mode 0600); copy it to the other "
          f"host, keeping its mode: scp -p {a.file} HOST:{os.path.abspath(a.file)}")
    return 0


COMMANDS = {"serve": cmd_serve, "migrate": cmd_migrate, "sync": cmd_sync,
            "evacuate": cmd_evacuate, "status": cmd_status, "cancel": cmd_cancel,
            "set": cmd_set,
            "go": cmd_go,
            "resolve": cmd_resolve, "demo": cmd_demo, "keygen": cmd_keygen}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("MIGRATOR_LOG", "WARNING").upper(),
                        format="%(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    try:
        return COMMANDS[a.cmd](a)
    except BaseException as exc:
        err = first_error(exc)
        if isinstance(err, (MigrationError, AdapterError, p.ProtocolError, ControlError)):
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 1
        if isinstance(err, (KeyboardInterrupt, trio.Cancelled)):
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
