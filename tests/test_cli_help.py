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


@pytest.mark.parametrize("argv", [
    ["migrate", "--mount", "/m", "--to", "h:1", "--key-file", "k", "--bandwidth", "1e-9"],
    ["sync", "--mount", "/m", "--to", "h:1", "--key-file", "k", "--bandwidth", "0.001"],
    ["set", "--bandwidth", "1e-9"],
])
def test_a_cap_too_low_to_move_a_handshake_is_refused(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """(issue 26) 1e-9 MB/s ended as "the peer did not complete the handshake"."""
    with pytest.raises(SystemExit) as e:
        migrator_cli.build_parser().parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "too low: at least 0.01 MB/s" in err, err
    assert len(err.splitlines()) == 1
