#!/usr/bin/env bash
# Run the whole test suite (set-up first). Extra arguments go to pytest, e.g.
#   scripts/test.sh -m "not slow"     # the quick subset for development
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
