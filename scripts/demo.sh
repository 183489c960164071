#!/usr/bin/env bash
# The main job (set-up first): a blkfs demo on local defaults in a temp dir.
# Extra arguments go to the demo, e.g. scripts/demo.sh --seconds 20 --write-rate 50
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec .venv/bin/python scripts/blkfs_demo.py "$@"
