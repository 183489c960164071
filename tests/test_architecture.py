"""The import rules of docs/architecture.md, checked on the source (ast, nothing imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("blkfs", "migrator")
# Pure: no FUSE, no trio, no sockets, no processes - testable in microseconds.  A pure package
# (PURE_PACKAGES) is pure in every module of it.
PURE_PACKAGES = {"migrator.protocol"}
PURE = {"blkfs.bitmap", "blkfs.heat", "blkfs.settings", "blkfs.absent", "blkfs.spill",
        "blkfs.ctlproto",
        "blkfs.tracker", "blkfs.cliutil", "migrator.plan", "migrator.protocol",
        "migrator.ownership", "migrator.digestlog", "migrator.zeros", "migrator.delta",
        "migrator.lineage", "migrator.quiet", "migrator.defaults", "migrator.errors",
        "migrator.simvm.format", "migrator.blockdigests", "migrator.space",
        "migrator.evacuation", "migrator.steerproto", "migrator.deadlines"}
IO_MODULES = {"pyfuse3", "trio", "socket", "subprocess", "select", "signal"}
FUSE_ONLY = {"blkfs.fs", "blkfs.mount"}  # the only ones that may import pyfuse3


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports, absolute, at any depth of the file."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                mod = ".".join([*stem, node.module] if node.module else stem)
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from . import x`
    return found


MODULES = modules()
PURE |= {name for name in MODULES for pkg in PURE_PACKAGES if name.startswith(pkg + ".")}
GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def project_deps(name: str) -> set[str]:
    return {m for m in GRAPH[name] if m in MODULES and m != name}


@pytest.mark.parametrize("name", sorted(PURE))
def test_pure_modules_do_no_io(name: str) -> None:
    bad = {m for m in GRAPH[name] if m.split(".")[0] in IO_MODULES}
    assert not bad, f"{name} is pure but imports {sorted(bad)}"
    impure = {m for m in project_deps(name) if m not in PURE}
    assert not impure, f"{name} is pure but imports {sorted(impure)}"


def test_only_the_fuse_layer_imports_pyfuse3() -> None:
    users = {n for n, deps in GRAPH.items() if any(m.split(".")[0] == "pyfuse3" for m in deps)}
    assert users <= FUSE_ONLY, sorted(users - FUSE_ONLY)


def test_the_control_socket_does_not_know_the_fuse_class() -> None:
    assert "blkfs.fs" not in project_deps("blkfs.control")


def test_the_simulated_vm_imports_nothing_of_the_engine() -> None:
    """A test tool: it may share pure helpers (sizes, one-line errors), nothing that runs."""
    for name in MODULES:
        if name.startswith("migrator.simvm"):
            outside = {m for m in project_deps(name) if not m.startswith("migrator.simvm")
                       and m != "migrator" and m not in PURE}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_blkfs_never_imports_the_migrator() -> None:
    for name in MODULES:
        if name.startswith("blkfs"):
            assert not {m for m in project_deps(name) if m.startswith("migrator")}, name


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in sorted(project_deps(name)):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep):], dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[name] = 2

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])


def test_the_wire_protocol_imports_nothing_of_blkfs() -> None:
    """The wire is the migrator's own: a change in blkfs (a figure for `blkfs status`, the
    spill's ref layout) must not change what goes between two hosts."""
    inside = [name for name in MODULES if name == "migrator.protocol"
              or name.startswith("migrator.protocol.")]
    assert len(inside) > 1, inside  # the package and its modules
    for name in inside:
        assert not {m for m in GRAPH[name] if m.split(".")[0] == "blkfs"}, name


ENGINE = {"migrator.source", "migrator.sending", "migrator.handoff", "migrator.dest",
          "migrator.serving", "migrator.received", "migrator.postcopy", "migrator.sync",
          "migrator.options", "migrator.verifying", "migrator.reconnect", "migrator.rounds",
          "migrator.throttle"}
FACES = {"migrator.report", "migrator.cli", "migrator.demo", "migrator.resolve"}
MAX_LINES = 700  # a file longer than this holds two things (the CLI's parser excepted)


def test_the_engine_never_prints() -> None:
    """Words for people go back as a `notify` callback or a SessionOutcome; report.py and
    the CLIs show them (docs/architecture.md)."""
    for name in sorted(ENGINE):
        tree = ast.parse(MODULES[name].read_text())
        prints = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert not prints, f"{name} prints (lines {prints})"
        assert not {m for m in GRAPH[name] if m.split(".")[0] == "rich"}, f"{name} imports rich"


def test_the_engine_modules_exist() -> None:
    """(so a rename does not make the rules above check nothing)"""
    assert set(MODULES) >= ENGINE | FACES, sorted((ENGINE | FACES) - set(MODULES))


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("migrator")))
def test_no_file_of_the_migrator_holds_two_things(name: str) -> None:
    if name == "migrator.cli":
        return
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} is {lines} lines: split it by job"


# Where migrator code may use the blocking blkfs.control.ControlClient: the CLI faces, which
# run outside trio or before it. The engine runs in trio's loop, where a stalled daemon would
# stop every task and timeout: it uses AsyncControlClient (tests/test_stalled_daemon.py).
BLOCKING_CLIENT_ALLOWED = {
    "migrator.cli": None,  # the whole module: `migrator status` and the other commands
    "migrator.report": None,
    # The VM adapters are blocking by contract: the engine runs them in worker threads
    # (SourceHooks.run_sync), `migrator resolve` from its CLI.
    "migrator.vm": {"FreezeAdapter"},
    # migrator serve's start-up line, called sync by cli.py (until it awaits an async twin).
    "migrator.serving": {"unfinished_here"},
    # evacuate finds the VMs before trio runs, and asks a record in a worker thread.
    "migrator.evacuate": {"<module>", "find_candidates", "_role"},
}


def blocking_client_uses(path: Path) -> list[tuple[str, int]]:
    """(top-level def or class, line) of each mention of ControlClient in a file."""
    tree = ast.parse(path.read_text())
    out = []
    for top in tree.body:
        where = getattr(top, "name", "<module>")
        for node in ast.walk(top):
            names: list[str] = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name.rsplit(".", 1)[-1] for a in node.names]
            if "ControlClient" in names:
                out.append((where, node.lineno))
    return out


def test_the_engine_never_uses_the_blocking_control_client() -> None:
    bad = []
    for name, path in MODULES.items():
        if not name.startswith("migrator."):
            continue
        allowed = BLOCKING_CLIENT_ALLOWED.get(name, set())
        for where, line in blocking_client_uses(path):
            if allowed is not None and where not in allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({where})")
    assert not bad, ("the blocking ControlClient in trio code (use AsyncControlClient): "
                     + ", ".join(bad))


def test_the_blocking_client_check_sees_a_use(tmp_path: Path) -> None:
    """The check above finds the ways a use is written (it is no proof if it finds none)."""
    f = tmp_path / "m.py"
    f.write_text("from blkfs.control import ControlClient as C\nimport blkfs.control\n\n"
                 "def f():\n    return blkfs.control.ControlClient('p')\n")
    assert blocking_client_uses(f) == [("<module>", 1), ("f", 5)]
