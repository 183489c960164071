#!/usr/bin/env bash
# Run the whole test suite (set-up first) on parallel workers (pytest-xdist).  The tests marked
# `cache` run twice, on a plain and on a writeback mount; `serial` ones (the timed fault cells, the
# QEMU guest) run one after another on one worker; docs/testing.md says why.
# With arguments, the same run with them added, e.g.
#   scripts/test.sh -m quick                 # the edit-loop tier, under 90 s
#   scripts/test.sh -n 0 tests/test_qemu.py  # one file, no workers
# TEST_WORKERS=N sets the number of workers (default 4: the suite mostly waits on processes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
# Only the tests need these: GlusterFS, for the spill area shared by two hosts (test_gluster.py).
# shellcheck source=lib.sh
source scripts/lib.sh
ensure_packages test glusterfs-server glusterfs-client
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-4}" --dist loadgroup "$@"
