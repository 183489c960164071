#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine: system packages (when missing),
# a virtual environment in .venv, and the project installed editable with its
# test extras.  Sourced or run by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# fuse3: fusermount3 and /dev/fuse support; libfuse3-dev + pkg-config + gcc +
# python3-dev: to build pyfuse3; fio: benchmarks and the fio tests;
# python3-venv: the venv; iproute2: network-namespace tests; qemu-system-x86 +
# busybox-static: the QEMU guest of the end-to-end tests and of `migrator demo --vm qemu`
# (scripts/build_guest.sh adds the kernel, downloaded and unpacked, never installed).
PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv fio iproute2
          qemu-system-x86 busybox-static)

# shellcheck source=lib.sh
source scripts/lib.sh
ensure_packages setup "${PACKAGES[@]}"

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $($PY --version 2>&1)"
  "$PY" -m venv .venv
fi
stamp=.venv/.blkfs-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "setup: installing the project and its test dependencies into .venv"
  log=$(mktemp)
  if ! { .venv/bin/python -m pip install -q --upgrade pip &&
         .venv/bin/python -m pip install -q -e '.[test]'; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: pip install failed (see above)" >&2
    exit 1
  fi
  rm -f "$log"
  echo "$want" >"$stamp"
fi
