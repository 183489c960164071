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
STOP_GRACE_S = 3.0  # a stopped migration's frame under way may take this long, then the link goes
MIN_BANDWIDTH_MB_S = 0.01  # the lowest cap (10 kB/s): below it not even the handshake goes out

# When to switch over (plan.Policy)
DOWNTIME_MS = 50.0  # the expected downtime the last dirty set may cost
POSTCOPY_DOWNTIME_MS = 20.0  # the same once memory goes post-copy: only the disks' last set
MAX_ROUNDS = 30  # rounds before the rounds count as not converging (converge: go on)
ON_STALL = "converge"  # or "switchover", "abort": when the rounds stop converging
CONVERGE_TIMEOUT_S = 300.0  # converge: rounds that long without meeting the target stop
ON_TIMEOUT = "suspend"  # --timeout's action, as virsh's: or "abort", "postcopy"
PROGRESS_TIMEOUT_S = 150.0  # no less data left for this long: stop (KubeVirt's progressTimeout)
# Auto-converge (QEMU's cpu-throttle-initial/-increment/-tailslow and max): the VM's share of
# time taken away, in steps, while it dirties more than half of what a round moves
THROTTLE_INITIAL, THROTTLE_STEP, THROTTLE_MAX = 20, 10, 99

# The source VM
SUSPEND = "freeze"  # the --suspend adapter: blkfs freeze of the VM's files

# Post-copy (docs/spill.md)
POSTCOPY = "off"  # off | on | auto
WARM_SET_MS = 2.0  # the downtime post-copy may spend on the hottest absent memory (plan.warm_set)
SPILL_SLOTS = 1024  # slots in the spill area, one block each (freed slots are reused)
SPILL_DIR = os.path.join(tempfile.gettempdir(), f"migrator-spill-{os.getuid()}")

# migrator sync: a service that shares the link with the VMs' own traffic for hours
SYNC_BANDWIDTH_MB_S = 100.0
SYNC_LAG_S = 10.0  # the replica is never more than this behind; an epoch every half of it
