"""The mount lifecycle of the blkfs daemon.

Order matters for invariant 5: the saved tracking state is read and removed
before the filesystem is mounted, and written again only after a clean end
(unmounted by ``fusermount3 -u`` / ``blkfs umount``, or SIGTERM/SIGINT) once
the kernel can no longer send writes.  A crash leaves no state, so the next
mount reports every block dirty.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
from dataclasses import dataclass

import pyfuse3
import trio

from . import control
from .bitmap import check_block_size
from .fs import META_NAME, BlkFS
from .runtime import DaemonInfo, default_socket, ensure_runtime_dir, mount_fstype
from .tracker import SavedState, load_state, save_state

log = logging.getLogger(__name__)

LOG_FILE = "blkfs.log"
LOCK_FILE = "lock"


class QuietError(Exception):
    """A user error: printed as one line, no traceback."""

    def __init__(self, msg: str, exitcode: int = 1) -> None:
        super().__init__(msg)
        self.exitcode = exitcode


@dataclass
class MountOptions:
    backing: str
    mountpoint: str
    block_size: int
    half_life: float
    static_heat: float
    tracking: bool = True
    xattr: bool = False
    allow_other: bool = False
    control: str | None = None
    debug: bool = False
    spill: str | None = None  # a spill area to show read-only as MOUNTPOINT/.spill

    @property
    def meta_dir(self) -> str:
        return os.path.join(self.backing, META_NAME.decode())


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
            if fstype == "fuse.blkfs"
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


def _take_lock(meta: str) -> int:
    fd = os.open(os.path.join(meta, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise QuietError(
            f"{os.path.dirname(meta)} is already served by another blkfs daemon "
            f"(pid {other}): unmount that one first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def setup_logging(opts: MountOptions, foreground: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if opts.debug else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    h: logging.Handler
    h = (
        logging.StreamHandler()
        if foreground
        else logging.FileHandler(os.path.join(opts.meta_dir, LOG_FILE))
    )
    h.setFormatter(fmt)
    root.addHandler(h)


class _Ready:
    """The pipe on which a background daemon tells its parent it is ready, or why not."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def send(self, line: str) -> None:
        if self.fd is not None:
            try:
                os.write(self.fd, line.encode() + b"\n")
            finally:
                os.close(self.fd)
                self.fd = None


async def _serve(fs: BlkFS, info: DaemonInfo, ready: _Ready) -> None:
    async with trio.open_nursery() as nursery:
        fs.nursery = nursery
        await nursery.start(control.serve, control.Controller(fs, info), info.control)
        nursery.start_soon(_stop_on_signals)
        nursery.start_soon(fs.settle_heat_forever)
        info.write()
        ready.send("ok")
        log.info(
            "serving %s on %s (block size %d, tracking %s)",
            fs.backing,
            info.mountpoint,
            1 << fs.shift,
            "on" if fs.tracking else "off",
        )
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("signal %d: unmounting", sig)
            pyfuse3.terminate()


def run_daemon(opts: MountOptions, ready_fd: int | None, foreground: bool) -> int:
    """Mount and serve until unmounted. Returns the exit code."""
    ready = _Ready(ready_fd)
    try:
        return _run(opts, ready, foreground)
    except QuietError as exc:
        ready.send(f"error: {exc}")
        raise
    except BaseException as exc:
        ready.send(f"error: the daemon failed to start: {exc!r}")
        raise


def _run(opts: MountOptions, ready: _Ready, foreground: bool) -> int:
    os.makedirs(opts.meta_dir, mode=0o700, exist_ok=True)
    lock_fd = _take_lock(opts.meta_dir)
    setup_logging(opts, foreground)
    shift = check_block_size(opts.block_size)
    # Consume the saved state before mounting: from here on a crash means all-dirty.
    saved = load_state(opts.meta_dir, opts.block_size)
    if not opts.tracking:
        saved = SavedState.empty()
    fs = BlkFS(
        opts.backing,
        shift=shift,
        half_life=opts.half_life,
        static_heat=opts.static_heat,
        tracking=opts.tracking,
        xattr=opts.xattr,
        saved=saved,
        spill_dir=opts.spill,
    )
    mnt = os.path.realpath(opts.mountpoint)
    info = DaemonInfo(
        pid=os.getpid(),
        mountpoint=mnt,
        backing=fs.backing,
        control=opts.control or default_socket(mnt),
        block_size=opts.block_size,
        tracking=opts.tracking,
    )
    ensure_runtime_dir()
    fuse_opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    fuse_opts |= {"fsname=blkfs:" + fs.backing, "subtype=blkfs"}
    if opts.allow_other:
        fuse_opts.add("allow_other")
    os.umask(0)  # create() gets the caller's mode with its umask already applied
    try:
        pyfuse3.init(fs, mnt, fuse_opts)
    except RuntimeError as exc:
        if saved.records:  # nothing was written: put the consumed state back
            save_state(opts.meta_dir, opts.block_size, list(saved.records.values()))
        os.close(lock_fd)
        raise QuietError(f"cannot mount {mnt}: {exc}") from None
    clean = False
    try:
        trio.run(_serve, fs, info, ready)
        clean = True
    except BaseException:
        log.exception(
            "daemon stopped by an error: tracking state will not be saved "
            "(the next mount reports every block dirty)"
        )
        raise
    finally:
        pyfuse3.close(unmount=True)
        if fs.postcopy is not None:
            fs.postcopy.close()
        fs.close_all()
        info.remove()
        if clean and opts.tracking:
            records = fs.save_records() + list(fs.saved.records.values())
            path = save_state(opts.meta_dir, opts.block_size, records)
            log.info(
                "unmounted cleanly; tracking state of %d files saved to %s", len(records), path
            )
        os.close(lock_fd)
    return 0
