"""Argument parsing and number formatting shared by the `blkfs` and `migrator` commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments get one line: what is wrong and where to look, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def _number(convert: Callable[[str], float], ok: Callable[[float], bool],
            what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = convert(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return v

    return parse


positive = _number(float, lambda v: v > 0, "a positive number")
non_negative = _number(float, lambda v: v >= 0, "a number >= 0")
whole_number = _number(int, lambda v: v >= 0, "a whole number >= 0")


def human_bytes(n: float) -> str:
    """A byte count for people: 512 B, 1.5 MiB, 3.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def size_text(n: int) -> str:
    """A size as the options take it: 64K, 1M, 16G (exact), else plain bytes."""
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)

