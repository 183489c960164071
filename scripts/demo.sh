#!/usr/bin/env bash
# The main job (set-up first): a live migration of a running simulated VM between
# two blkfs mounts on this machine, verified, on local defaults in a temp dir.
# Extra arguments go to `migrator demo`, e.g. scripts/demo.sh --disk-size 1G --write-rate 40
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec .venv/bin/migrator demo "$@"
