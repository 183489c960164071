"""What both commands say about themselves (issue 26's small ones): --version, and a
description in every subcommand's --help."""

from __future__ import annotations

import argparse

import pytest

from blkfs import cli as blkfs_cli
from migrator import cli as migrator_cli


@pytest.mark.parametrize("mod", [blkfs_cli, migrator_cli])
def test_version(mod: object, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        mod.build_parser().parse_args(["--version"])  # type: ignore[attr-defined]
    assert e.value.code == 0
    name, version = capsys.readouterr().out.split()
    assert name == mod.PROG and version.count(".") == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize("mod", [blkfs_cli, migrator_cli])
def test_every_command_says_what_it_does(mod: object) -> None:
    ap = mod.build_parser()  # type: ignore[attr-defined]
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    bare = [name for name, p in sub.choices.items() if not p.description]
    assert not bare, f"no description in --help: {bare}"
