"""Downtime of a bare switchover, to see what the handoff itself costs.

No simulated VM and a resume hook that does nothing (`true`), so the downtime is suspend,
last swap, last set (nearly empty), the handoff and the Resumed round trip, without the 5-11
ms a real hook varies by. Compares code versions in one run, alternating:

    .venv/bin/python scripts/bench_handoff.py --runs 9 --tree /tmp/old-worktree --tree .

Each tree runs from its own directory with PYTHONPATH set to it (its blkfs daemons too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def one(tree: Path) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    py = [sys.executable]
    with tempfile.TemporaryDirectory(prefix="bench-handoff-") as d:
        w = Path(d)
        env["BLKFS_RUNTIME_DIR"] = str(w / "run")
        key = w / "key"
        key.write_text(os.urandom(32).hex())
        key.chmod(0o600)
        mounts = []
        vm = subprocess.Popen(["sleep", "600"])
        serve = None
        try:
            for side in ("src", "dst"):
                (w / f"{side}-b").mkdir()
                (w / side).mkdir()
                subprocess.run([*py, "-m", "blkfs.cli", "mount", str(w / f"{side}-b"),
                                str(w / side)], env=env, cwd=tree, check=True, capture_output=True)
                mounts.append(w / side)
            (w / "src" / "disk.raw").write_bytes(os.urandom(64 << 20))
            (w / "src" / "vm.mem").write_bytes(os.urandom(16 << 20))
            serve = subprocess.Popen([*py, "-m", "migrator.cli", "serve", "--mount",
                                      str(w / "dst"), "--listen", "127.0.0.1:0", "--key-file",
                                      str(key), "--once", "--resume-cmd", "true"], env=env,
                                     cwd=tree, stdout=subprocess.PIPE, text=True)
            assert serve.stdout is not None
            port = re.search(r":(\d+),", serve.stdout.readline())
            assert port, "serve did not start"
            report = w / "report.json"
            r = subprocess.run([*py, "-m", "migrator.cli", "migrate", "--mount", str(w / "src"),
                                "--to", f"127.0.0.1:{port.group(1)}", "--key-file", str(key),
                                "--suspend", f"pid:{vm.pid}", "--report", str(report),
                                "disk.raw", "vm.mem"], env=env, cwd=tree, capture_output=True,
                               text=True)
            if r.returncode != 0:
                raise SystemExit(f"migrate failed in {tree}: {r.stderr.strip()}")
            serve.wait(timeout=30)
            return json.loads(report.read_text())
        finally:
            vm.kill()
            vm.wait()
            if serve is not None and serve.poll() is None:
                serve.kill()
            for m in reversed(mounts):
                subprocess.run([*py, "-m", "blkfs.cli", "umount", str(m)], env=env,
                               cwd=tree, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", type=Path, help="a checkout (repeatable)")
    ap.add_argument("--runs", type=int, default=9)
    a = ap.parse_args()
    trees = [t.resolve() for t in (a.tree or [Path(".")])]
    got: dict[Path, list[dict[str, object]]] = {t: [] for t in trees}
    for i in range(a.runs):
        for t in trees:
            rep = one(t)
            got[t].append(rep)
            print(f"run {i + 1} {t}: downtime {rep['downtime_ms']} ms "
                  f"{rep['downtime_breakdown_ms']}", flush=True)
    for t, reps in got.items():
        dts = sorted(float(r["downtime_ms"]) for r in reps)  # type: ignore[arg-type]
        parts: dict[str, list[float]] = {}
        for r in reps:
            for k, v in r["downtime_breakdown_ms"].items():  # type: ignore[union-attr]
                parts.setdefault(k, []).append(v)
        print(f"{t}: median downtime {statistics.median(dts):.2f} ms over {len(dts)} runs "
              f"{dts}; median parts " + ", ".join(
                  f"{k} {statistics.median(v):.2f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
