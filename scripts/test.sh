#!/usr/bin/env bash
# Run the whole test suite (set-up first), then every test that mounts blkfs a second time on
# writeback mounts (BLKFS_WRITEBACK=1: blkfs mount --writeback by default).
# With arguments, one pass with them, e.g.
#   scripts/test.sh -m "not slow"                    # the quick subset for development
#   BLKFS_WRITEBACK=1 scripts/test.sh -m "mount and not onepass"   # the writeback pass alone
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
# Only the tests need these: GlusterFS, for the spill area shared by two hosts (test_gluster.py).
# shellcheck source=lib.sh
source scripts/lib.sh
ensure_packages test glusterfs-server glusterfs-client
.venv/bin/ruff check .
if [ "$#" -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest
echo "== the mount tests again, on writeback mounts (BLKFS_WRITEBACK=1; not the onepass ones) =="
BLKFS_WRITEBACK=1 exec .venv/bin/python -m pytest -m "mount and not onepass"
