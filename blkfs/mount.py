"""The mount lifecycle of the blkfs daemon.

Order matters for invariant 5: the saved tracking state is read and removed
before the filesystem is mounted, and written again only after a clean end
(unmounted by ``fusermount3 -u`` / ``blkfs umount``, or SIGTERM/SIGINT) once
the kernel can no longer send writes, and only if no write may have gone
unmarked (``Registry.trust_lost``).  A crash leaves no state, so the next mount
reports every block dirty.

The whole lifecycle is one ``AsyncExitStack`` (the s3ql model): the nursery
first, then each resource with its cleanup pushed right after it is taken, so
teardown runs in reverse order whatever stops the daemon; ``pyfuse3.close``
unmounts only after a clean end (after a crash the mount point stays dead,
ENOTCONN, until ``fusermount3 -u``, rather than be unmounted by a daemon in an
unknown state).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
from contextlib import AsyncExitStack

import pyfuse3
import trio

from . import control
from .bdi import apply_budget
from .bitmap import check_block_size
from .fs import BlkFS
from .registry import Registry
from .runtime import DaemonInfo, default_socket, ensure_runtime_dir
from .settings import MountOptions as MountOptions
from .settings import QuietError as QuietError
from .tracker import load_state, save_state

log = logging.getLogger(__name__)

LOG_FILE = "blkfs.log"
LOCK_FILE = "lock"


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
    try:
        setup_logging(opts, foreground)
        # Consume the saved state before mounting: from here on a crash means all-dirty.
        saved = load_state(opts.meta_dir, opts.block_size) if opts.tracking else None
        registry = Registry(opts.backing, shift=check_block_size(opts.block_size),
                            half_life=opts.half_life, static_heat=opts.static_heat,
                            tracking=opts.tracking, saved=saved)
        trio.run(_main, opts, registry, ready)
    except QuietError:
        raise
    except BaseException:
        log.exception("the daemon stopped by an error")
        raise
    finally:
        os.close(lock_fd)
    return 0


async def _main(opts: MountOptions, registry: Registry, ready: _Ready) -> None:
    clean = False  # pyfuse3.main() returned: unmounted, or SIGTERM
    serving = False  # the kernel may have sent requests
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        fs = BlkFS(registry, xattr=opts.xattr, spill_dir=opts.spill, writeback=opts.writeback)
        stack.callback(fs.close_all)
        fs.lazy.nursery = nursery
        stack.callback(fs.lazy.close)
        mnt = os.path.realpath(opts.mountpoint)
        info = DaemonInfo(pid=os.getpid(), mountpoint=mnt, backing=registry.backing,
                          control=opts.control or default_socket(mnt),
                          block_size=opts.block_size, tracking=opts.tracking,
                          writeback=opts.writeback)
        ensure_runtime_dir()
        fuse_opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
        fuse_opts |= {"fsname=blkfs:" + registry.backing, "subtype=blkfs"}
        if opts.allow_other:
            fuse_opts.add("allow_other")
        os.umask(0)  # create() gets the caller's mode with its umask already applied
        try:
            pyfuse3.init(fs, mnt, fuse_opts)
        except RuntimeError as exc:
            if registry.saved.records:  # nothing was written: put the consumed state back
                save_state(opts.meta_dir, opts.block_size, list(registry.saved.records.values()))
            raise QuietError(f"cannot mount {mnt}: {exc}") from None
        if opts.writeback:
            info.dirty_limit = _dirty_budget(mnt, opts.dirty_limit)
        # On the way out (reverse order): unmount, then save the state, only when clean.
        stack.callback(lambda: _save(opts, registry, fs) if clean else _unclean(serving))
        stack.callback(lambda: pyfuse3.close(unmount=clean or not serving))
        controller = control.Controller(registry, fs.lazy, info, faults=lambda: fs.faults,
                                        invalidate=fs._invalidate)
        await nursery.start(control.serve, controller, info.control)
        stack.callback(info.remove)
        nursery.start_soon(_stop_on_signals)
        nursery.start_soon(registry.settle_heat_forever)
        info.write()
        serving = True
        ready.send("ok")
        log.info("serving %s on %s (block size %d, tracking %s)", registry.backing, mnt,
                 registry.block_size, "on" if registry.tracking else "off")
        await pyfuse3.main()
        clean = True
        nursery.cancel_scope.cancel()


def _dirty_budget(mnt: str, limit: int) -> int:
    """Give the writeback mount its dirty budget; 0 (and a warning) when the kernel's default
    leash stays (not root, or no such knobs): the mount works, writes are throttled sooner."""
    try:
        budget = apply_budget(mnt, limit)
    except OSError as exc:
        log.warning("writeback: the kernel's per-mount dirty limit stays at its default "
                    "(about 1%% of the dirty threshold), writes are throttled early: %s", exc)
        return 0
    if not budget.how.startswith("max_"):
        log.warning("writeback: %s", budget.how)
        return 0
    log.info("writeback cache on: bdi %s may hold %d bytes dirty (%s, strict_limit 0)",
             budget.bdi, budget.limit, budget.how)
    return budget.limit


def _unclean(serving: bool) -> None:
    if serving:
        log.error("daemon stopped by an error: tracking state will not be saved (the next "
                  "mount reports every block dirty); unmount with fusermount3 -u")


def _save(opts: MountOptions, registry: Registry, fs: BlkFS) -> None:
    if not opts.tracking:
        return
    if registry.trust_lost:
        log.error("a write may have reached a backing file unmarked (see the errors above): "
                  "tracking state not saved, the next mount reports every block dirty")
        return
    records = registry.records(fs.live_fds())
    path = save_state(opts.meta_dir, opts.block_size, records)
    log.info("unmounted cleanly; tracking state of %d files saved to %s", len(records), path)
