"""`migrator evacuate`: every VM of a mount away, a few at once (the I/O of evacuation.py).

Each VM goes by a `migrator migrate` process of its own, in a session of its own: a VM whose
migration fails (or whose migrate process dies) fails alone, and the terminal's Ctrl-C
reaches only this process, which decides which of them to stop. Their status files (the
runtime directory's, as `migrator status` reads them) give the live view; their control
sockets (steering.py) take the shares of the bandwidth budget as migrations start and end;
their JSON reports make the per-VM records of this one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from blkfs import ctlproto as cp
from blkfs.cliutil import human_bytes
from blkfs.control import ControlClient

from . import steerproto as sp
from .errors import MigrationError
from .evacuation import PAST_COMMIT, Candidate, Evacuation, Outcome, hands_over
from .ownership import HANDING_OFF, OWNER, RETIRED
from .steering import steer
from .transport import parse_hostport
from .vmrecords import RecordDir, read_json

TICK = 0.25  # s between looks at the running migrations
PROBE_TIMEOUT = 2.0  # s: a destination that does not take a connection in this is down


@dataclass
class EvacuateOptions:
    mount: str
    to: list[str]
    key_file: str
    names: list[str] = field(default_factory=list)  # only these VMs (default: every one)
    parallel: int = 2
    bandwidth_mb_s: float | None = None  # the whole budget, shared
    suspend: str = ""  # the adapter of a VM without one of its own ("": migrate's default)
    suspend_by_vm: dict[str, str] = field(default_factory=dict)
    migrate_args: list[str] = field(default_factory=list)  # passed to every migrate
    report_path: str | None = None
    status_dir: str = ""  # the runtime directory's migrations/ (cli._status_dir)
    json_out: bool = False  # --json: stdout is the report's; the lines go to stderr


# -- which VMs --------------------------------------------------------------------------


def find_candidates(opts: EvacuateOptions) -> tuple[list[Candidate], list[str]]:
    """The VMs this host runs from the mount: those its records say it owns, and each
    top-level directory of files no record names (a VM by the default naming: its files'
    directory). Also one line per thing left out, and why."""
    with ControlClient.for_mount(opts.mount, timeout=10) as c:
        status = c.call(cp.Status())
    hot = {f.file: (f.dynamic or 0) * (f.block_size or 0) for f in status.files}
    records = RecordDir(status.backing)
    try:
        known = records.all()
    finally:
        records.close()
    found: dict[str, Candidate] = {}
    skipped: list[str] = []
    recorded = {f for r in known for f in r.files}
    for rec in known:
        if rec.role == HANDING_OFF:
            skipped.append(f"{rec.name}: its last handoff is unsettled ('migrator resolve "
                           f"--mount {opts.mount}' settles it)")
        elif rec.role == OWNER:
            found[rec.name] = _candidate(opts, rec.name, rec.files, hot, rec.suspend, True)
    for entry in sorted(os.scandir(opts.mount), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            files = sorted(f"{entry.name}/{f.name}" for f in os.scandir(entry.path)
                           if f.is_file(follow_symlinks=False))
            loose = [f for f in files if f not in recorded]
            if loose and entry.name not in found and entry.name not in {r.name for r in known}:
                found[entry.name] = _candidate(opts, entry.name, loose, hot, "", False)
        elif entry.is_file(follow_symlinks=False) and entry.name not in recorded:
            skipped.append(f"{entry.name}: not part of a VM this host knows (migrate it once "
                           "with --vm NAME, or keep each VM's files in a directory of its own)")
    unknown = set(opts.suspend_by_vm) - set(found)
    if unknown:
        raise MigrationError(f"--suspend names {', '.join(sorted(unknown))}, not a VM that "
                             f"runs from {opts.mount}")
    if opts.names:
        missing = [n for n in opts.names if n not in found]
        if missing:
            raise MigrationError(f"no VM named {', '.join(missing)} runs from {opts.mount} "
                                 f"(it has: {', '.join(sorted(found)) or 'none'})")
        found = {n: c for n, c in found.items() if n in opts.names}
        skipped = [s for s in skipped if s.split(":", 1)[0] in opts.names]
    return list(found.values()), skipped


def _candidate(opts: EvacuateOptions, name: str, files: list[str], hot: dict[str, int],
               recorded_suspend: str, known: bool) -> Candidate:
    data = 0
    for f in files:
        with contextlib.suppress(OSError):
            data += os.stat(os.path.join(opts.mount, f)).st_blocks * 512
    suspend = opts.suspend_by_vm.get(name) or recorded_suspend or opts.suspend
    return Candidate(name, tuple(files), data, sum(hot.get(f, 0) for f in files), suspend,
                     known)


# -- running them -----------------------------------------------------------------------


@dataclass
class Running:
    """One migrate process and what we last saw of it."""

    name: str
    to: str
    proc: trio.Process
    report: str
    log: str
    attempt: int
    status: dict[str, Any] = field(default_factory=dict)
    share: float | None = None  # the cap it has (as far as we know)
    told: float | str | None = "unset"  # the last cap it acknowledged
    signalled: bool = False
    started: float = 0.0  # s since the evacuation began
    phases: dict[str, float] = field(default_factory=dict)  # when each was first seen


@dataclass
class Spare:
    """A migrate process started --hold for the VM that goes next: its start (a process and
    its imports, 0.5-1 s of a busy core) is over before a place is free, and its go is a line
    on its control socket (scripts/bench_evacuate.py)."""

    name: str
    attempt: int
    proc: trio.Process
    report: str
    log: str


class Evacuator:
    def __init__(self, opts: EvacuateOptions, candidates: list[Candidate],
                 console: Console) -> None:
        self.opts = opts
        self.evac = Evacuation(candidates, opts.to, opts.parallel)
        self.console = console
        self.running: dict[str, Running] = {}
        self.reports: dict[str, list[dict[str, Any]]] = {n: [] for n in self.evac.vms}
        self.work = tempfile.mkdtemp(prefix="migrator-evacuate-")
        self.t0 = time.monotonic()
        self.wake = trio.Event()
        self.interrupted = 0
        self.said: dict[str, str] = {}  # the last phase said, per VM
        self.spares: dict[str, Spare] = {}  # by VM: the next ones, ready (--hold)

    # A migrate process, its arguments and its end

    def _socket(self, pid: int) -> str:
        return os.path.join(self.opts.status_dir, f"{pid}.sock")

    def _argv(self, c: Candidate, to: str, report: str, share: float | None) -> list[str]:
        # Its files (named once, where no record knows them yet) first: a bare --postcopy in
        # the flags would take a FILE after it for its value.
        argv = [sys.executable, "-m", "migrator.cli", "migrate",
                *(() if c.known else c.files), "--mount", self.opts.mount, "--to", to,
                "--key-file", self.opts.key_file, "--vm", c.name, "--report", report,
                *self.opts.migrate_args]
        if c.suspend:
            argv += ["--suspend", c.suspend]
        if share is not None:
            argv += ["--bandwidth", f"{share:g}"]
        return argv

    async def _spawn(self, c: Candidate, to: str, n: int, share: float | None,
                     hold: bool = False) -> tuple[trio.Process, str, str]:
        report = os.path.join(self.work, f"{c.name}.{n}.json")
        log = os.path.join(self.work, f"{c.name}.{n}.log")
        with open(log, "wb") as out:
            proc = await trio.lowlevel.open_process(
                [*self._argv(c, to, report, share), *(["--hold"] if hold else [])],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        return proc, report, log

    async def _start(self, nursery: trio.Nursery, c: Candidate, to: str) -> None:
        n = len(self.evac.vms[c.name].attempts)
        phases = {r.name: r.status.get("phase", "") for r in self.running.values()}
        phases[c.name] = "connecting"
        share = self._shares(phases).get(c.name)
        proc, report, log = (await self._take_spare(c.name, n, to, share)
                             or await self._spawn(c, to, n, share))
        r = Running(c.name, to, proc, report, log, n, share=share, told=share,
                    started=time.monotonic() - self.t0)
        self.running[c.name] = r
        self._say(r, "started" + (f", at most {share:g} MB/s" if share else ""))
        nursery.start_soon(self._wait, r)
        if self.evac.stopping:  # (Ctrl-C while it started: the stop did not see it)
            await self._stop(r, anyway=self.interrupted > 1)

    async def _prepare_spares(self) -> None:
        """Start the next VMs' processes, held, as many as may run at once, once the running
        ones are under way (not while they start: they would share its CPU), one a tick."""
        for name in [n for n in self.spares if n not in self.evac.queue]:
            await self._drop_spare(name)  # (its VM was settled or stopped meanwhile)
        if any(r.status.get("phase", "connecting") in ("connecting", "held")
               for r in self.running.values()):
            return
        for c, to, n in self.evac.upcoming(self.opts.parallel):
            if c.name not in self.spares:
                proc, report, log = await self._spawn(c, to, n, None, hold=True)
                self.spares[c.name] = Spare(c.name, n, proc, report, log)
                return

    async def _take_spare(self, name: str, n: int, to: str, share: float | None
                          ) -> tuple[trio.Process, str, str] | None:
        """The held process of VM `name`, sent on its way (to `to`, at `share`), if there
        is one that answers; else None (and it is gone)."""
        spare = self.spares.get(name)
        if spare is None:
            return None
        if spare.attempt == n:
            with trio.move_on_after(5):  # (still importing: its socket comes soon)
                while spare.proc.poll() is None:
                    try:
                        answer = await steer(self._socket(spare.proc.pid), sp.go(to, share),
                                             timeout=2.0)
                    except (OSError, ValueError, trio.TooSlowError):
                        await trio.sleep(0.05)
                        continue
                    if answer.get("ok"):
                        del self.spares[name]
                        return spare.proc, spare.report, spare.log
                    break
        await self._drop_spare(name)
        return None

    async def _drop_spare(self, name: str) -> None:
        """No use for the held process: it ends (it sent nothing) and leaves no trace."""
        spare = self.spares.pop(name, None)
        if spare is None:
            return
        with contextlib.suppress(ProcessLookupError):
            spare.proc.terminate()  # (held: SIGTERM ends it, nothing sent)
        with trio.move_on_after(5):
            await spare.proc.wait()
        if spare.proc.poll() is None:
            spare.proc.kill()
            await spare.proc.wait()
        for path in (spare.report, spare.log):
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def _wait(self, r: Running) -> None:
        await r.proc.wait()
        outcome, error, doc = await trio.to_thread.run_sync(self._outcome, r)
        down = outcome is Outcome.STAYED and not await _reachable(r.to)
        self.reports[r.name].append({"to": r.to, "outcome": outcome.value, "error": error,
                                     "destination_down": down, "exit_status": r.proc.returncode,
                                     "started_s": round(r.started, 2),
                                     "ended_s": round(time.monotonic() - self.t0, 2),
                                     "phases_s": r.phases, "report": doc})
        del self.running[r.name]
        self.evac.finished(r.name, outcome, error, dest_down=down)
        again = self.evac.vms[r.name].outcome is None
        self._say(r, {Outcome.MOVED: "moved, verified",
                      Outcome.STAYED: "failed, runs here" + (
                          "; trying another destination" if again else ""),
                      Outcome.UNSETTLED: "cut after its Commit: unsettled"}[outcome]
                  + (f": {error}" if error else "") + (f" ({r.to} is down)" if down else ""))
        self.wake.set()

    def _outcome(self, r: Running) -> tuple[Outcome, str, dict[str, Any] | None]:
        """What became of the VM, by its report and, above all, by this host's record of it
        (the truth a dead migrate process cannot misstate)."""
        doc = read_json(r.report)
        error = (doc or {}).get("error") or _last_error(r.log)
        if r.signalled:  # (a process stopped while it started ends in KeyboardInterrupt)
            error = "stopped with the evacuation" + (
                f" ({error})" if doc and error and error != "interrupted" else "")
        if r.proc.returncode == 0 and doc and doc.get("status") == "completed":
            return Outcome.MOVED, "", doc
        role = _role(self.opts.mount, r.name)
        if role == RETIRED:
            return Outcome.MOVED, error, doc
        if role == HANDING_OFF:
            return Outcome.UNSETTLED, error, doc
        return Outcome.STAYED, error or f"migrate exited with status {r.proc.returncode}", doc

    # Bandwidth shares and the live view

    def _shares(self, phases: dict[str, str]) -> dict[str, float | None]:
        from .evacuation import shares

        return shares(self.opts.bandwidth_mb_s, phases)

    async def _tick(self) -> None:
        for r in list(self.running.values()):
            doc = read_json(os.path.join(self.opts.status_dir, f"{r.proc.pid}.json"))
            if doc:
                r.status = doc
                phase = doc.get("phase", "")
                if phase and phase != self.said.get(r.name):
                    self.said[r.name] = phase
                    r.phases.setdefault(phase, round(time.monotonic() - self.t0, 2))
                    self._say(r, phase)
                if hands_over(doc, doc.get("mbps") or r.share):
                    self.evac.release(r.name)  # (the next one starts at once)
        await self._prepare_spares()
        if self.opts.bandwidth_mb_s is None:
            return
        want = self._shares({r.name: r.status.get("phase", "") for r in self.running.values()})
        for r in list(self.running.values()):
            if want[r.name] != r.told:
                sock = self._socket(r.proc.pid)
                try:
                    answer = await steer(sock, sp.set_bandwidth(want[r.name]), timeout=1.0)
                except (OSError, ValueError, trio.TooSlowError):
                    continue  # not listening yet, or ending: the next tick tries again
                if answer.get("ok"):
                    r.share = r.told = want[r.name]

    def _say(self, r: Running, text: str) -> None:
        if not self.console.is_terminal:
            print(f"migrator evacuate: {r.name} -> {r.to}: {text}", flush=True,
                  file=sys.stderr if self.opts.json_out else sys.stdout)
        else:
            self.console.print(f"{r.name} -> {r.to}: {text}")

    def view(self) -> Table:
        t = Table(title="evacuating " + self.opts.mount, title_justify="left")
        for col in ("VM", "to", "phase", "round", "sent", "of", "MB/s cap", "exp. downtime"):
            t.add_column(col)
        for name, vm in self.evac.vms.items():
            r = self.running.get(name)
            if r is not None:
                s = r.status
                edt = s.get("expected_downtime_ms")
                t.add_row(name, r.to, s.get("phase", "starting"), str(s.get("round", 0)),
                          human_bytes(s.get("bytes_sent") or 0),
                          human_bytes(s.get("data_bytes") or 0),
                          "-" if r.share is None else f"{r.share:g}",
                          "-" if edt is None else f"{edt:.1f} ms")
            else:
                state = vm.outcome.value if vm.outcome else "waiting"
                t.add_row(name, vm.attempts[-1].to if vm.attempts else "-", state, "", "", "",
                          "", "")
        return t

    # The whole of it

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals)
            live = Live(self.view(), console=self.console, refresh_per_second=4,
                        transient=True) if self.console.is_terminal else None
            with live or contextlib.nullcontext():
                while not self.evac.done or self.running:
                    while (nxt := self.evac.next_start()) is not None:
                        await self._start(nursery, *nxt)
                    if self.evac.done and not self.running:
                        break
                    with trio.move_on_after(TICK):
                        await self.wake.wait()
                    self.wake = trio.Event()
                    await self._tick()
                    while (nxt := self.evac.next_start()) is not None:  # (a place freed)
                        await self._start(nursery, *nxt)
                    if live is not None:
                        live.update(self.view())
            for name in list(self.spares):
                await self._drop_spare(name)
            nursery.cancel_scope.cancel()

    async def _stop(self, r: Running, anyway: bool) -> None:
        """Stop one migration if it is before its Commit (`anyway`: past it too). Its own
        process decides, through its control socket (steerproto.Cancel); one that does not
        answer yet has barely started, and SIGINT stops it as it would a migrate."""
        try:
            answer = await steer(self._socket(r.proc.pid),
                                 sp.cancel(unless_committed=not anyway), timeout=2.0)
            r.signalled = bool(answer.get("cancelled"))
        except (OSError, ValueError, trio.TooSlowError):
            if r.status.get("phase") in PAST_COMMIT and not anyway:
                return  # (it said so before it stopped answering)
            with contextlib.suppress(ProcessLookupError):
                os.kill(r.proc.pid, signal.SIGINT)
            r.signalled = True

    async def _signals(self) -> None:
        """Ctrl-C / SIGTERM: no new migration starts, those before their Commit stop (their
        VMs run on here), those past it finish; a second one stops them all."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self.interrupted += 1
                self.evac.stop()
                for r in list(self.running.values()):
                    await self._stop(r, anyway=self.interrupted > 1)
                past = [r.name for r in self.running.values() if not r.signalled]
                print("migrator evacuate: stopping: no new migration starts"
                      + (f"; {', '.join(past)} past their Commit finish (Ctrl-C again to "
                         "stop them too)" if past else ""), file=sys.stderr, flush=True)
                self.wake.set()
                for name in list(self.spares):
                    await self._drop_spare(name)

    def close(self) -> None:
        for spare in self.spares.values():  # (run() ended early)
            if spare.proc.poll() is None:
                spare.proc.kill()
        shutil.rmtree(self.work, ignore_errors=True)

    # The end: the summary and the report

    def records(self) -> list[dict[str, Any]]:
        out = []
        for name, vm in self.evac.vms.items():
            last = (self.reports[name] or [{}])[-1].get("report") or {}
            out.append({"vm": name, "files": list(vm.candidate.files),
                        "data_bytes": vm.candidate.data_bytes,
                        "outcome": vm.outcome.value if vm.outcome else None,
                        "to": vm.attempts[-1].to if vm.attempts and vm.outcome is not
                        Outcome.STAYED else None,
                        "why_here": vm.why_here or None,
                        "downtime_ms": last.get("downtime_ms"),
                        "total_s": last.get("total_s"), "bytes_sent": last.get("bytes_sent"),
                        "verified": last.get("verified"),
                        "attempts": self.reports[name]})
        return out

    def report(self, skipped: list[str]) -> dict[str, Any]:
        recs = self.records()
        return {"mount": self.opts.mount, "destinations": self.opts.to,
                "parallel": self.opts.parallel, "bandwidth_mb_s": self.opts.bandwidth_mb_s,
                "total_s": round(time.monotonic() - self.t0, 2),
                "bytes_sent": sum(r["bytes_sent"] or 0 for r in recs),
                "moved": sum(r["outcome"] == "moved" for r in recs),
                "stayed": sum(r["outcome"] == "stayed" for r in recs),
                "unsettled": sum(r["outcome"] == "unsettled" for r in recs),
                "interrupted": self.interrupted > 0, "skipped": skipped, "vms": recs}


def print_evacuation(doc: dict[str, Any], console: Console) -> None:
    t = Table(title=f"evacuation of {doc['mount']}: {doc['moved']} of {len(doc['vms'])} moved "
              f"in {doc['total_s']:.1f} s, {human_bytes(doc['bytes_sent'])} sent",
              title_justify="left")
    for col in ("VM", "outcome", "to", "downtime", "time", "sent", "verified", "note"):
        t.add_column(col, overflow="fold")
    for r in doc["vms"]:
        dt = r["downtime_ms"]
        t.add_row(r["vm"], {"moved": "moved", "stayed": "runs here",
                            "unsettled": "UNSETTLED"}.get(r["outcome"], "-"),
                  r["to"] or "-", "-" if dt is None else f"{dt:.1f} ms",
                  "-" if r["total_s"] is None else f"{r['total_s']:.1f} s",
                  "-" if r["bytes_sent"] is None else human_bytes(r["bytes_sent"]),
                  {True: "yes", False: "NO", None: "-"}[r["verified"]],
                  r["why_here"] or ("; ".join(a["error"] for a in r["attempts"] if a["error"])
                                    if r["outcome"] == "unsettled" else ""))
    console.print(t)
    for s in doc["skipped"]:
        console.print(f"left out: {s}")


# -- helpers ----------------------------------------------------------------------------


def check_destinations(to: str) -> list[str]:
    out = [t.strip() for t in to.split(",") if t.strip()]
    if not out:
        raise MigrationError("--to names no destination: give HOST:PORT[,HOST:PORT...]")
    for t in out:
        parse_hostport(t)  # one line if it is not an address
    if len(set(out)) != len(out):
        raise MigrationError(f"--to names a destination twice: {to}")
    return out


async def _reachable(to: str) -> bool:
    host, port = parse_hostport(to)
    try:
        with trio.fail_after(PROBE_TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError):
        return False
    await stream.aclose()
    return True


def _last_error(log: str) -> str:
    """The one line a migrate process ended with ("migrator: error: ...")."""
    try:
        with open(log, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    for ln in reversed(lines):
        if ln.startswith("migrator: error: "):
            return ln[len("migrator: error: "):]
    return lines[-1] if lines else ""


def _role(mount: str, name: str) -> str | None:
    try:
        with ControlClient.for_mount(mount, timeout=10) as c:
            backing = c.call(cp.Info()).backing
    except Exception:
        return None
    records = RecordDir(backing)
    try:
        for rec in records.all():
            if rec.name == name:
                return str(rec.role)
    finally:
        records.close()
    return None
