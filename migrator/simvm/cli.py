"""``python -m migrator.simvm create|run|check``: the simulated VM as a command.

The demo, the benchmark and the tests run the VM in a process of its own (to SIGSTOP it, or on
a mount), so each failure is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from blkfs.cliutil import OneLineParser
from blkfs.settings import parse_size

from .check import check
from .format import SimVMError, read_header
from .writer import create, run

PROG = "simvm"


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _number(lo: float, hi: float | None, what: str, strict: bool = False) -> Any:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        ok = (v > lo if strict else v >= lo) and (hi is None or v <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=f"python -m migrator.{PROG}",
        description="A simulated VM that stamps every write, so that a migrated copy of its "
        "disk and memory files can be verified byte for byte.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser, metavar="COMMAND")

    def files(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("dir", metavar="DIR", help="directory of the VM files (e.g. a blkfs mount)")
        sp.add_argument("--disk-name", default="disk.raw", help="disk file (default disk.raw)")
        sp.add_argument("--mem-name", default="vm.mem", help="memory file (default vm.mem)")

    c = sub.add_parser("create", help="create a sparse disk and a memory file with a header")
    files(c)
    c.add_argument("--disk-size", type=_size, required=True, metavar="SIZE", help="e.g. 64M")
    c.add_argument("--mem-size", type=_size, required=True, metavar="SIZE", help="e.g. 32M")
    c.add_argument(
        "--unit", type=_size, default=4096, metavar="SIZE", help="stamping unit (default 4096)"
    )
    c.add_argument("--seed", type=int, default=1, help="seed of the hot set and writes")
    c.add_argument("--force", action="store_true", help="overwrite existing files")

    r = sub.add_parser("run", help="write at a rate until --seconds pass or SIGTERM")
    files(r)
    r.add_argument(
        "--rate",
        type=_number(0, None, "a rate >= 0"),
        required=True,
        metavar="MIB_S",
        help="MiB/s of writes, one unit each (0: as fast as possible)",
    )
    r.add_argument("--seconds", type=_number(0, None, "a positive number", strict=True))
    r.add_argument("--hot-fraction", type=_number(0, 1, "between 0 and 1"), default=0.1)
    r.add_argument("--hot-share", type=_number(0, 1, "between 0 and 1"), default=0.9)
    r.add_argument("--resume", action="store_true", help="continue a VM that ran before")
    r.add_argument("--mem-share", type=_number(0, 1, "between 0 and 1"), metavar="F",
                   help="fraction of writes that go to memory (default: by size)")

    k = sub.add_parser("check", help="verify every unit of both files (exit 1 if not ok)")
    files(k)
    k.add_argument("--json", action="store_true", help="print the full result as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; every failure is one line on stderr and a non-zero exit."""
    a = build_parser().parse_args(argv)
    try:
        if a.cmd == "create":
            h = create(
                a.dir,
                a.disk_name,
                a.mem_name,
                disk_size=a.disk_size,
                mem_size=a.mem_size,
                unit=a.unit,
                seed=a.seed,
                overwrite=a.force,
            )
            print(
                f"created {a.disk_name} ({h.disk_units} units) and {a.mem_name} "
                f"({h.mem_units} units after {1 + h.ledger_pages} header+ledger pages)"
            )
            return 0
        if a.cmd == "run":
            t0 = time.monotonic()
            n = run(
                a.dir,
                a.disk_name,
                a.mem_name,
                rate_mb_s=a.rate,
                seconds=a.seconds,
                hot_fraction=a.hot_fraction,
                hot_share=a.hot_share,
                resume=a.resume,
                mem_share=a.mem_share,
            )
            h = read_header(a.dir, a.mem_name)
            print(f"{n} writes in {time.monotonic() - t0:.2f} s (generation {h.generation})")
            return 0
        res = check(a.dir, a.disk_name, a.mem_name)
        if a.json:
            print(json.dumps(asdict(res)))
        if res.ok:
            if not a.json:
                print(
                    f"ok: {res.units_checked} units checked, {res.written_units} written, "
                    f"{res.total_writes} writes, generation {res.generation}, "
                    f"in flight {res.in_flight}"
                )
            return 0
        more = f" (and {res.error_count - 1} more)" if res.error_count > 1 else ""
        print(f"{PROG}: check failed: {res.errors[0]}{more}", file=sys.stderr)
        return 1
    except SimVMError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
