"""Downtime of `migrator demo` (and `--postcopy`), median of N runs, for one or two trees.

Compares code versions in one run, alternating, so the machine's noise hits both alike:

    .venv/bin/python scripts/bench_demo.py --runs 5 --tree /tmp/old-worktree --tree .

Each tree runs with PYTHONPATH set to it (the blkfs daemons it mounts too). Prints the
median downtime and its breakdown per tree and mode, and writes reports/bench_demo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_demo(tree: Path, postcopy: bool) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as d:
        report = Path(d) / "report.json"
        cmd = [sys.executable, "-m", "migrator.cli", "demo", "--report", str(report)]
        if postcopy:
            cmd.append("--postcopy")
        env = dict(os.environ, PYTHONPATH=str(tree))
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if r.returncode != 0 or not report.exists():
            tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
            raise SystemExit(f"demo failed in {tree}: {' | '.join(tail)}")
        return json.loads(report.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", type=Path, help="a checkout (repeatable)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mode", choices=("both", "precopy", "postcopy"), default="both")
    ap.add_argument("--json", default="reports/bench_demo.json")
    a = ap.parse_args()
    trees = [t.resolve() for t in (a.tree or [Path(".")])]
    modes = {"both": [False, True], "precopy": [False], "postcopy": [True]}[a.mode]
    results: dict[str, list[dict[str, object]]] = {}
    for i in range(a.runs):
        for postcopy in modes:
            for tree in trees:
                rep = run_demo(tree, postcopy)
                key = f"{tree} {'postcopy' if postcopy else 'precopy'}"
                results.setdefault(key, []).append(rep)
                print(f"run {i + 1}: {key}: downtime {rep['downtime_ms']} ms "
                      f"{rep['downtime_breakdown_ms']}", flush=True)
    summary = {}
    for key, reps in results.items():
        dts = [float(r["downtime_ms"]) for r in reps]  # type: ignore[arg-type]
        parts: dict[str, list[float]] = {}
        for r in reps:
            for k, v in r["downtime_breakdown_ms"].items():  # type: ignore[union-attr]
                parts.setdefault(k, []).append(v)
        summary[key] = {"median_downtime_ms": statistics.median(dts), "runs": dts,
                        "median_breakdown_ms": {k: statistics.median(v)
                                                for k, v in parts.items()}}
        print(f"{key}: median downtime {statistics.median(dts):.1f} ms over {len(dts)} runs "
              f"{sorted(dts)}; median parts " + ", ".join(
                  f"{k} {statistics.median(v):.1f}" for k, v in parts.items()))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
