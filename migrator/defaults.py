"""The migrator's defaults, each defined once (pure: no I/O).

The flags of the CLI, their --help, and the engine's dataclasses (MigrateOptions, ServeOptions,
Policy, the transport) all read them from here, so that changing one cannot leave a stale copy
behind in a help text or on the other side of the link.
"""

from __future__ import annotations

import os
import tempfile

# The link
IO_TIMEOUT = 60.0  # s of no progress: the network is cut or the peer is stuck

# When to switch over (plan.Policy)
DOWNTIME_MS = 50.0  # the expected downtime the last dirty set may cost
POSTCOPY_DOWNTIME_MS = 20.0  # the same once memory goes post-copy: only the disks' last set
MAX_ROUNDS = 30
ON_STALL = "switchover"  # or "abort": when the rounds stop converging

# The source VM
SUSPEND = "freeze"  # the --suspend adapter: blkfs freeze of the VM's files

# Post-copy (docs/spill.md)
POSTCOPY = "off"  # off | on | auto
SPILL_SLOTS = 1024  # slots in the spill area, one block each (freed slots are reused)
SPILL_DIR = os.path.join(tempfile.gettempdir(), f"migrator-spill-{os.getuid()}")

# migrator sync: a service that shares the link with the VMs' own traffic for hours
SYNC_BANDWIDTH_MB_S = 100.0
SYNC_LAG_S = 10.0  # the replica is never more than this behind; an epoch every half of it
