"""`blkfs`: mount, unmount and query the block-tracking filesystem."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from . import package_version
from .cliutil import OneLineParser, human_bytes, non_negative, positive, size_text
from .runtime import FSTYPE, DaemonInfo, mount_fstype, process_gone
from .settings import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DIRTY_LIMIT,
    DEFAULT_HALF_LIFE,
    DEFAULT_STATIC_HEAT,
    MountOptions,
    QuietError,
    check_block_size,
    parse_size,
)

if TYPE_CHECKING:
    from .client import ControlClient

# The commands that talk to a daemon import its client and the wire format (ctlproto, numpy)
# when they run, `mount` the daemon itself only in the daemon's own process: `blkfs mount`
# costs a process start and argparse, not 0.5 s of imports (a test suite mounts hundreds).

PROG = "blkfs"
# Where the migrator keeps what this host knows of each VM on the mount (migrator.stores
# RecordDir: BACKING/.blkfs/vms/<id>/record.json): status shows it, so a replica or an
# incomplete copy is never taken for a VM's whole files, nor a retired one for the VM.
VM_RECORDS = os.path.join(".blkfs", "vms")
START_TIMEOUT = 30.0


def _client(mountpoint: str, timeout: float = 60.0) -> ControlClient:
    from .client import ControlClient

    return ControlClient.for_mount(mountpoint, timeout)


def _block_size(text: str) -> int:
    try:
        size = parse_size(text)
        check_block_size(size)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad block size {text!r}: use a power of two from 4K to 1M, e.g. 64K"
        ) from None
    return size


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size < 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r} is too small: give at least 1M, e.g. 512M")
    return size


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description=(
            "A FUSE filesystem in front of a directory of VM disk images and memory files. "
            "It passes everything through and records which blocks were written (dirty bitmaps, "
            "swapped per epoch) and how often (heat)."
        ),
    )
    p.add_argument("--version", action="version", version=f"{PROG} {package_version()}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser, metavar="COMMAND")

    m = sub.add_parser(
        "mount",
        help="mount BACKING on MOUNTPOINT (returns once ready)",
        description="Mount BACKING on MOUNTPOINT. Returns once the mount is ready, "
        "with the daemon in the background (log: BACKING/.blkfs/blkfs.log), "
        "or stays in the foreground with --fg.",
    )
    m.add_argument("backing", metavar="BACKING", help="directory holding the VM files")
    m.add_argument("mountpoint", metavar="MOUNTPOINT", help="empty directory to mount on")
    m.add_argument(
        "--block-size",
        type=_block_size,
        default=DEFAULT_BLOCK_SIZE,
        metavar="SIZE",
        help="tracking block size, a power of two from 4K to 1M "
        f"(default {size_text(DEFAULT_BLOCK_SIZE)})",
    )
    m.add_argument("--fg", action="store_true", help="stay in the foreground, log to stderr")
    m.add_argument("--nonempty", action="store_true",
                   help="mount over a mount point that holds files (they are hidden, not "
                   "lost, until the unmount)")
    m.add_argument(
        "--control",
        metavar="PATH",
        help="control socket path (default: in /run/blkfs or $XDG_RUNTIME_DIR)",
    )
    m.add_argument(
        "--heat-half-life",
        type=positive,
        default=DEFAULT_HALF_LIFE,
        metavar="SECONDS",
        help=f"heat halves every SECONDS (default {DEFAULT_HALF_LIFE:g})",
    )
    m.add_argument(
        "--static-heat",
        type=non_negative,
        default=DEFAULT_STATIC_HEAT,
        metavar="H",
        help=f"blocks with heat <= H are static (default {DEFAULT_STATIC_HEAT:g})",
    )
    m.add_argument(
        "--no-tracking",
        action="store_true",
        help="plain passthrough, nothing recorded (for comparison)",
    )
    m.add_argument(
        "--xattr",
        action="store_true",
        help="pass extended attributes through (costs a GETXATTR before every write)",
    )
    m.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users (e.g. a qemu user) use the mount; modes are enforced",
    )
    m.add_argument(
        "--spill",
        metavar="DIR",
        help="show the spill area in DIR read-only as MOUNTPOINT/.spill (see: blkfs spill)",
    )
    m.add_argument(
        "--writeback",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the kernel's writeback cache: writes land in the page cache and reach blkfs "
        "coalesced at writeback (several times the IOPS); tracking sees them at the next "
        "flush, which blkfs and the migrator do before every swap; freeze is refused "
        "(default: off)",
    )
    m.add_argument(
        "--dirty-limit",
        type=_size,
        default=DEFAULT_DIRTY_LIMIT,
        metavar="SIZE",
        help="with --writeback: how much the page cache may hold unwritten for this mount "
        f"(default {DEFAULT_DIRTY_LIMIT >> 20}M; more absorbs longer bursts, and a host crash "
        "loses up to that much, as with any page-cache write)",
    )
    m.add_argument("--debug", action="store_true", help="log every request")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    u = sub.add_parser("umount", help="unmount cleanly and save tracking state",
                       description="Unmounts a blkfs mount cleanly: the daemon saves its dirty "
                       "bitmaps and heat (the next mount goes on from them) and exits. Refused "
                       "while an incoming post-copy still waits for blocks, unless --force.")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.add_argument("--force", action="store_true",
                   help="unmount even while an incoming post-copy waits for blocks (they are "
                   "given up: the files stay incomplete)")
    u.add_argument(
        "--timeout",
        type=positive,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the daemon to save its state (default 60)",
    )

    s = sub.add_parser("status", help="per file: size, blocks, dirty, static/dynamic, hottest",
                       description="Shows the daemon and, per tracked file: size, blocks, the "
                       "epoch, dirty blocks, static and dynamic blocks by heat, the hottest "
                       "blocks, writes; and the VMs this mount's records know.")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.add_argument("--static-heat", type=non_negative, metavar="H", help="threshold for this query")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    d = sub.add_parser(
        "dirty",
        help="dirty extents of FILE in the current epoch",
        description="Dirty extents of FILE. With --swap: end the epoch and print "
        "the set it collected. Before a swap the file is fsynced through the mount "
        "so writes still in the page cache (mmap) reach blkfs first.",
    )
    d.add_argument("mountpoint", metavar="MOUNTPOINT")
    d.add_argument("file", metavar="FILE", help="path relative to the mount (or under it)")
    d.add_argument("--swap", action="store_true", help="end the epoch and return its set")
    d.add_argument("--pages", action="store_true",
                   help="extents of pages (the unit of tracking: 4K under blocks up to 64K, a "
                   "16th of larger blocks) instead of blocks")
    d.add_argument("--no-flush", action="store_true",
                   help="do not flush FILE's page cache before --swap")
    d.add_argument("--json", action="store_true", help="machine-readable output")

    h = sub.add_parser("heat", help="heat per block of FILE and its static/dynamic split",
                       description="Shows the heat of FILE's written blocks (writes, halving "
                       "every half-life) and which are static (heat at most --static-heat) "
                       "or dynamic.")
    h.add_argument("mountpoint", metavar="MOUNTPOINT")
    h.add_argument("file", metavar="FILE")
    h.add_argument("--static-heat", type=non_negative, metavar="H", help="threshold for this query")
    h.add_argument("--json", action="store_true", help="machine-readable output")

    f = sub.add_parser(
        "freeze",
        help="hold writes to FILEs (all files if none) until thaw",
        description="Hold writes to the FILEs (every file if none is given) until "
        "'blkfs thaw'. Reads go on. Returns once no write is in flight.",
    )
    f.add_argument("mountpoint", metavar="MOUNTPOINT")
    f.add_argument("files", metavar="FILE", nargs="*")
    t = sub.add_parser("thaw", help="release writes held by freeze",
                       description="Lets the writes that 'blkfs freeze' holds go on (of these "
                       "FILEs, or of every file).")
    t.add_argument("mountpoint", metavar="MOUNTPOINT")
    t.add_argument("files", metavar="FILE", nargs="*")

    sp = sub.add_parser(
        "spill",
        help="the spill area: slots in use, free, generations; post-copy progress",
        description="Show the spill area of a mount (the one given with --spill, or the one "
        "an incoming post-copy migration uses): how many slots hold a page, how many the "
        "destination freed (content kept), the highest generation, and post-copy counters.",
    )
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("--slots", action="store_true", help="list every used slot's header")
    sp.add_argument("--give-up", action="store_true",
                    help="an incoming post-copy's blocks that are still absent will never "
                    "come (the source died before spilling them): make them errors (EIO) "
                    "instead of waits (every running post-copy's, or --migration's)")
    sp.add_argument("--migration", metavar="ID",
                    help="with --give-up: only this post-copy (its id: blkfs spill --json)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    return p


# -- mount / umount ------------------------------------------------------------------------


def _mount_options(a: argparse.Namespace) -> MountOptions:
    return MountOptions(
        backing=os.path.abspath(a.backing),
        mountpoint=os.path.abspath(a.mountpoint),
        block_size=a.block_size,
        half_life=a.heat_half_life,
        static_heat=a.static_heat,
        tracking=not a.no_tracking,
        xattr=a.xattr,
        allow_other=a.allow_other,
        control=os.path.abspath(a.control) if a.control else None,
        debug=a.debug,
        spill=os.path.abspath(a.spill) if a.spill else None,
        writeback=a.writeback,
        dirty_limit=a.dirty_limit,
        nonempty=a.nonempty,
    )


def _inside(child: str, parent: str) -> bool:
    return child == parent or os.path.commonpath([child, parent]) == parent


def check_mount_args(opts: MountOptions) -> None:
    """Refuse, with advice, anything that would fail or misbehave after mounting."""
    check_block_size(opts.block_size)
    if not os.path.exists(opts.backing):
        raise QuietError(
            f"backing directory {opts.backing} does not exist: create it or "
            "give the directory that holds the VM files"
        )
    if not os.path.isdir(opts.backing):
        raise QuietError(
            f"{opts.backing} is not a directory: give the directory that holds the VM files"
        )
    fstype = mount_fstype(opts.mountpoint)
    if fstype is not None:
        hint = (
            f"blkfs umount {opts.mountpoint}"
            if fstype == FSTYPE
            else f"umount {opts.mountpoint}"
        )
        raise QuietError(
            f"{opts.mountpoint} is busy: a {fstype} filesystem is already mounted "
            f"there; unmount it first ({hint}) or choose another directory"
        )
    if not os.path.isdir(opts.mountpoint):
        raise QuietError(
            f"mount point {opts.mountpoint} does not exist or is not a directory: "
            f"create it first (mkdir -p {opts.mountpoint})"
        )
    held = [] if opts.nonempty else sorted(os.listdir(opts.mountpoint))
    if held:  # (mounted over, they would vanish from sight without a word)
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise QuietError(
            f"mount point {opts.mountpoint} is not empty ({shown}): the mount would hide "
            "them; choose an empty directory, or --nonempty to mount over them anyway"
        )
    b, m = os.path.realpath(opts.backing), os.path.realpath(opts.mountpoint)
    if _inside(m, b) or _inside(b, m):
        raise QuietError(
            "the mount point and the backing directory must not contain each other: "
            "choose a mount point outside the backing directory"
        )
    if shutil.which("fusermount3") is None:
        raise QuietError(
            "fusermount3 is missing: install the fuse3 package (apt-get install fuse3)"
        )
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise QuietError(
            "/dev/fuse is not usable here: load the fuse module (modprobe fuse) or "
            "run where FUSE is allowed"
        )


def cmd_mount(a: argparse.Namespace) -> int:
    opts = _mount_options(a)
    check_mount_args(opts)
    if a.fg or a.ready_fd is not None:
        from .mount import run_daemon

        return run_daemon(opts, a.ready_fd, foreground=a.fg)
    r, w = os.pipe()
    args = [
        sys.executable,
        "-m",
        "blkfs.cli",
        "mount",
        opts.backing,
        opts.mountpoint,
        "--block-size",
        str(opts.block_size),
        "--heat-half-life",
        str(opts.half_life),
        "--static-heat",
        str(opts.static_heat),
        "--ready-fd",
        str(w),
    ]
    args += [
        flag
        for flag, on in (
            ("--no-tracking", not opts.tracking),
            ("--xattr", opts.xattr),
            ("--nonempty", opts.nonempty),
            ("--allow-other", opts.allow_other),
            ("--debug", opts.debug),
        )
        if on
    ]
    if opts.control:
        args += ["--control", opts.control]
    if opts.spill:
        args += ["--spill", opts.spill]
    args += ["--writeback" if opts.writeback else "--no-writeback",
             "--dirty-limit", str(opts.dirty_limit)]
    proc = subprocess.Popen(
        args,
        pass_fds=(w,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd="/",
    )
    os.close(w)
    answer = _read_ready(r, proc)
    if answer != "ok":
        if answer.startswith("error: "):
            raise QuietError(answer.removeprefix("error: "))
        raise QuietError(
            f"the blkfs daemon did not start ({answer or 'it exited'}); "
            f"see {os.path.join(opts.meta_dir, 'blkfs.log')}"
        )
    print(
        f"blkfs: mounted {opts.backing} on {opts.mountpoint} (block size "
        f"{opts.block_size // 1024}K, tracking {'on' if opts.tracking else 'off'}"
        f"{', writeback cache' if opts.writeback else ''}, pid {proc.pid}); "
        f"unmount with: blkfs umount {opts.mountpoint}"
    )
    return 0


def _read_ready(fd: int, proc: subprocess.Popen[bytes]) -> str:
    import select

    data = b""
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.terminate()
                return "timed out"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(fd)
    return data.decode(errors="replace").strip()


def _check_postcopy_before_umount(a: argparse.Namespace) -> None:
    """Unmounting a mount whose incoming post-copy still waits for pages would leave its
    files incomplete and its readers hanging: refuse, or with --force say what is lost."""
    from . import ctlproto as cp

    with _client(a.mountpoint, timeout=10) as c:
        st = c.call(cp.Info())
        waiting = st.postcopy_absent - st.postcopy_missing
        if waiting <= 0:
            return
        if not a.force:
            why = f" ({st.postcopy_paused})" if st.postcopy_paused else ""
            raise QuietError(
                f"{a.mountpoint} still waits for {waiting} post-copy blocks{why}: unmounting "
                f"now leaves those files incomplete; see 'blkfs spill {a.mountpoint}', or "
                f"'blkfs umount --force {a.mountpoint}' to give them up")
        n = c.call(cp.LazyGiveUp()).count
    print(f"blkfs: gave up {n} blocks that never arrived: the files of that migration are "
          f"incomplete (reads of those blocks failed with EIO)", file=sys.stderr)


def cmd_umount(a: argparse.Namespace) -> int:
    mnt = os.path.abspath(a.mountpoint)
    fstype = mount_fstype(mnt)
    if fstype is None:
        raise QuietError(f"{a.mountpoint} is not mounted: nothing to unmount")
    if fstype != FSTYPE:
        raise QuietError(f"{a.mountpoint} is a {fstype} mount, not blkfs: use umount")
    info = DaemonInfo.find(mnt)
    alive = info is not None and not process_gone(info.pid)  # before: it exits fast after
    if alive:
        _check_postcopy_before_umount(a)
    r = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        if "busy" in msg.lower():
            raise QuietError(
                f"{a.mountpoint} is busy: close the files open on it "
                f"(fuser -vm {a.mountpoint}) and retry"
            )
        raise QuietError(f"cannot unmount {a.mountpoint}: {msg}")
    if info is None or not alive:
        print(
            f"blkfs: unmounted {a.mountpoint} (its daemon had died: tracking state was not "
            "saved, the next mount reports every block dirty)"
        )
        return 0
    deadline = time.monotonic() + a.timeout
    while not process_gone(info.pid):
        if time.monotonic() > deadline:
            raise QuietError(
                f"unmounted {a.mountpoint}, but daemon pid {info.pid} is still "
                f"saving after {a.timeout:g}s: see {info.backing}/.blkfs/blkfs.log"
            )
        time.sleep(0.02)
    if info.tracking and not os.path.exists(os.path.join(info.backing, ".blkfs", "state.json")):
        raise QuietError(f"unmounted {a.mountpoint}, but the daemon did not save its tracking "
                         f"state (see {info.backing}/.blkfs/blkfs.log): the next mount reports "
                         "every block dirty")
    print(f"blkfs: unmounted {a.mountpoint}; tracking state saved")
    return 0


# -- queries -------------------------------------------------------------------------------


def _rel(mountpoint: str, file: str) -> str:
    """Accept FILE relative to the mount, or an absolute path under it."""
    if os.path.isabs(file):
        mnt = os.path.abspath(mountpoint)
        full = os.path.abspath(file)
        if os.path.commonpath([full, mnt]) != mnt:
            raise QuietError(f"{file} is not under {mountpoint}: give a path inside the mount")
        return os.path.relpath(full, mnt)
    return file


def _fmt_extents(exts: tuple[tuple[int, int], ...], limit: int = 12) -> str:
    parts = [f"{b}" if c == 1 else f"{b}-{b + c - 1}" for b, c in exts[:limit]]
    if len(exts) > limit:
        parts.append(f"... ({len(exts) - limit} more extents)")
    return ", ".join(parts) or "none"


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=1)
    sys.stdout.write("\n")


def arriving(rec: dict[str, Any]) -> dict[str, Any] | None:
    """The status of the incoming migration of a VM whose role here is incoming, as its
    `migrator serve` keeps it (<runtime dir>/migrations/incoming-ID.json); None if no live
    serve takes it."""
    from .runtime import process_gone, runtime_dir

    mig = rec.get("migration")
    if rec.get("role") != "incoming" or not isinstance(mig, str) or "/" in mig:
        return None
    try:
        with open(os.path.join(runtime_dir(), "migrations", f"incoming-{mig}.json")) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    pid = doc.get("pid") if isinstance(doc, dict) else None
    return doc if isinstance(pid, int) and not process_gone(pid) else None


def _arriving_tail(peer: str, incoming: dict[str, Any] | None) -> str:
    if not incoming:
        return (f"from {peer}; NOT RUNNABLE: no serve on this host takes it now (its serve is "
                "gone; it will not finish)")
    got = human_bytes(incoming.get("bytes_received") or 0)
    size = human_bytes(incoming.get("data_bytes") or 0)
    return (f"arriving from {peer} (serve pid {incoming.get('pid')}: {incoming.get('phase')}, "
            f"{got} received of {size}); not runnable yet")


def vm_line(rec: dict[str, Any], now: float, incoming: dict[str, Any] | None = None) -> str:
    """What this host knows of one VM of the mount, in one line (the record is migrator's;
    `migrator status --mount` says the same); `incoming`: its arriving() status."""
    name, role, gen = rec.get("name", "?"), rec.get("role", "?"), rec.get("generation", "?")
    peer = rec.get("peer") or "?"
    head = f"VM {name}: {role} at generation {gen}"
    sb = rec.get("split_brain")
    if isinstance(sb, dict):
        return (f"{head}: SPLIT BRAIN: {sb.get('peer')} claims it at generation "
                f"{sb.get('generation')}; a person decides ('migrator resolve')")
    inc = rec.get("dest_record", rec.get("incoming"))  # (the older name)
    inc = inc if isinstance(inc, dict) else {}
    if role == "replica":
        r = inc.get("replica") if isinstance(inc.get("replica"), dict) else {}
        at = r.get("synced_at")
        got = r.get("sync_round", r.get("epoch"))
        held = ("no whole epoch yet" if got is None else
                f"every write up to its epoch {got}"
                + (f" (synced {max(0.0, now - at):.0f} s ago)"
                   if isinstance(at, (int, float)) else ""))
        how = "stopped" if inc.get("stopped_at") else "syncing"
        return (f"VM {name}: REPLICA, NOT RUNNABLE: kept by sync from {peer} ({how}), holds "
                f"{held}; 'migrator migrate' to this host starts from it")
    tail = {"owner": "the VM is this host's" + (
                f" (verification: {inc.get('status')})" if inc.get("status") == "running"
                else ""),
            "handing-off": f"handed to {peer}, unsettled ('migrator resolve' settles it)",
            "retired": f"it runs at {peer}; this copy is history, not runnable",
            "incoming": _arriving_tail(peer, incoming),
            "incomplete": f"from {peer}; NOT RUNNABLE (the migration did not finish)"}
    return f"{head}: {tail.get(str(role), '?')}"


def _vm_records(backing: str) -> list[dict[str, Any]]:
    root = os.path.join(backing, VM_RECORDS)
    out = []
    for vm in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        try:
            with open(os.path.join(root, vm, "record.json")) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue  # (torn or gone: the migrator counts it as unknown too)
        if isinstance(rec, dict):
            out.append(rec)
    return out


def cmd_status(a: argparse.Namespace) -> int:
    from . import ctlproto as cp

    with _client(a.mountpoint) as c:
        st = c.call(cp.Status(static_heat=a.static_heat))
    vms = _vm_records(st.backing)
    if a.json:
        _print_json({**cp.to_dict(st), "vms": vms})
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    frozen = " (all frozen)" if st.frozen_all else ""
    wb = ""
    if st.writeback:
        wb = (f", writeback cache (dirty limit {human_bytes(st.dirty_limit)})" if st.dirty_limit
              else ", writeback cache (the kernel's default dirty limit)")
    con.print(
        f"[bold]{a.mountpoint}[/] ← {st.backing}  block size {size_text(st.block_size)}, "
        f"tracking {'on' if st.tracking else 'off'}{wb}, heat half-life "
        f"{st.half_life:g}s, static ≤ {st.static_heat:g}{frozen}"
    )
    if st.postcopy_absent:
        what = ("ended" if st.postcopy_absent <= st.postcopy_missing else
                f"PAUSED ({st.postcopy_paused})" if st.postcopy_paused else "running")
        con.print(f"post-copy {what}: {st.postcopy_absent} blocks absent, "
                  f"{st.postcopy_missing} of them given up (see: blkfs spill {a.mountpoint})")
    for rec in vms:
        line = vm_line(rec, time.time(), arriving(rec))
        con.print(f"[bold yellow]{line}[/]" if rec.get("role") not in ("owner",) else line,
                  highlight=False, soft_wrap=True)  # (a line to grep, whole when piped)
    if st.trust_lost:
        con.print("[bold red]a write may have gone unmarked (see the daemon log): the tracking "
                  "state will not be saved at unmount[/]")
    t = Table()
    for col, just in (
        ("file", "left"),
        ("size", "right"),
        ("blocks", "right"),
        ("epoch", "right"),
        ("dirty", "right"),
        ("static", "right"),
        ("dynamic", "right"),
        ("hottest blocks (heat)", "left"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for f in st.files:
        if f.blocks is None:
            t.add_row(f.file, human_bytes(f.size), "-", "-", "-", "-", "-", "")
            continue
        hot = ", ".join(f"{b} ({h:g})" for b, h in f.hottest[:3])
        name = f.file + (" [frozen]" if f.frozen else "")
        t.add_row(name, human_bytes(f.size), str(f.blocks), str(f.epoch), str(f.dirty),
                  str(f.static), str(f.dynamic), hot)
    con.print(t)
    return 0


def _flush(mountpoint: str, rel: str) -> None:
    """Writes still in the page cache (mmap) reach the daemon before the swap."""
    from .client import flush_file

    path = os.path.join(mountpoint, rel)
    try:
        flush_file(path)
    except FileNotFoundError:
        return  # the daemon reports the missing file in its own words
    except OSError as exc:
        raise QuietError(f"cannot flush {path}: {exc.strerror}") from None


def cmd_dirty(a: argparse.Namespace) -> int:
    from . import ctlproto as cp

    rel = _rel(a.mountpoint, a.file)
    with _client(a.mountpoint) as c:
        if a.swap and not a.no_flush:
            _flush(a.mountpoint, rel)
        d = c.call(cp.Dirty(rel, swap=a.swap, pages=a.pages))
    if a.json:
        _print_json({k: v for k, v in d.to_json().items()
                     if k != "size" and (k != "page_size" or a.pages)})
        return 0
    n = d.blocks
    what = "ended" if a.swap else "current"
    unit = "pages" if a.pages else "blocks"
    print(
        f"{d.file}: {what} epoch {d.epoch}: {n} dirty {unit} of {size_text(d.unit)} "
        f"({human_bytes(n * d.unit)}): {_fmt_extents(d.extents)}"
    )
    return 0


def cmd_heat(a: argparse.Namespace) -> int:
    import numpy as np

    from . import ctlproto as cp

    rel = _rel(a.mountpoint, a.file)
    with _client(a.mountpoint) as c:
        h = c.call(cp.Heat(rel, static_heat=a.static_heat))
    runs = h.heat_runs()
    if a.json:
        _print_json({**{k: v for k, v in cp.to_dict(h).items() if k != "runs"},
                     "heat": [[int(r["first"]), int(r["count"]), float(r["heat"])]
                              for r in runs]})
        return 0
    print(
        f"{h.file}: {h.blocks} blocks of {size_text(h.block_size)}, half-life "
        f"{h.half_life:g}s: {h.static} static (heat ≤ {h.static_heat:g}), "
        f"{h.dynamic} dynamic"
    )
    listed = sum(c for _, c in h.dynamic_extents)
    more = f" (the first {listed} of {h.dynamic} blocks)" if listed < h.dynamic else ""
    print(f"  dynamic: {_fmt_extents(h.dynamic_extents)}{more}")
    hottest = runs[np.argsort(-runs["heat"], kind="stable")[:10]]
    if hottest.size:
        print("  hottest runs: " + ", ".join(
            f"{b}{'' if c == 1 else f'-{b + c - 1}'}: {v:g}"
            for b, c, v in zip(hottest["first"].tolist(), hottest["count"].tolist(),
                               hottest["heat"].tolist(), strict=True)))
    return 0


def cmd_freeze(a: argparse.Namespace) -> int:
    from . import ctlproto as cp

    files = tuple(_rel(a.mountpoint, f) for f in a.files)
    with _client(a.mountpoint) as c:
        r = c.call(cp.Freeze(files))
    what = ", ".join(files) if files else "all files"
    print(
        f"blkfs: froze {what} ({r.count} tracked); writes wait until: blkfs thaw {a.mountpoint}"
    )
    return 0


def cmd_thaw(a: argparse.Namespace) -> int:
    from . import ctlproto as cp

    files = tuple(_rel(a.mountpoint, f) for f in a.files)
    with _client(a.mountpoint) as c:
        c.call(cp.Thaw(files))
    print(f"blkfs: thawed {', '.join(files) if files else 'all files'}")
    return 0


def cmd_spill(a: argparse.Namespace) -> int:
    from . import ctlproto as cp

    with _client(a.mountpoint) as c:
        if a.give_up:
            n = c.call(cp.LazyGiveUp(a.migration)).count
            print(f"blkfs: gave up {n} absent blocks: reads of them fail with EIO; the files "
                  "of that migration are incomplete")
            return 0
        r = c.call(cp.Spill(slots=a.slots))
    if a.json:
        _print_json(cp.to_dict(r))
        return 0
    if not r.exists and r.postcopy is not None and r.postcopy.remaining == 0 and not (
            r.postcopy.missing_count):
        print(f"spill area {r.path}: gone (its post-copy completed, and the source removed "
              "it)")
    elif not r.exists:
        print(f"{r.path}: {r.error}")
    else:
        print(f"spill area {r.path} (migration {r.migration}): {r.slots} slots of "
              f"{size_text(r.block_size)}: {r.in_use} in use, {r.free} free (installed, "
              f"content kept), {r.unused} never used; highest generation {r.max_generation}")
    pc = r.postcopy
    if pc is not None and pc.missing_count and pc.remaining <= pc.missing_count:
        print(f"post-copy ENDED without {pc.missing_count} blocks: they are missing, and their "
              "reads fail with EIO")
    elif r.postcopy_paused:
        print(f"post-copy PAUSED: {r.postcopy_paused}; the absent blocks are installed as they "
              "reach the spill area, and their readers wait (give up: blkfs spill "
              f"{a.mountpoint} --give-up)")
    if pc is not None:
        print(f"post-copy: {pc.remaining} blocks absent, {pc.pages_via_spill} + "
              f"{pc.pages_via_drain} installed from slots, {pc.pages_via_demand_fetch} "
              f"fetched; {pc.demand_faults} faults (p99 {pc.demand_fault_p99_ms} ms); "
              f"slot reads refused: {pc.generation_mismatches} stale, {pc.hash_mismatches} "
              f"torn, {pc.mac_mismatches} forged; {pc.missing_count} missing")
    for slot, file_id, block, gen, flags in r.slot_headers:
        state = "free" if flags & 2 else "in use" if flags & 1 else "writing"
        print(f"  slot {slot}: file {file_id} block {block} generation {gen} {state}")
    return 0


COMMANDS = {
    "mount": cmd_mount,
    "umount": cmd_umount,
    "status": cmd_status,
    "dirty": cmd_dirty,
    "heat": cmd_heat,
    "freeze": cmd_freeze,
    "thaw": cmd_thaw,
    "spill": cmd_spill,
}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return COMMANDS[a.cmd](a)
    except Exception as exc:
        wire = sys.modules.get("blkfs.ctlproto")  # (a ControlError comes after its import)
        if not isinstance(exc, QuietError) and not (wire and isinstance(exc, wire.ControlError)):
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exitcode", 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
