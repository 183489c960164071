"""Argument parsing shared by the `blkfs` and `migrator` commands."""

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
count = _number(int, lambda v: v >= 0, "a whole number >= 0")
