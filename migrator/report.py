"""Migration metrics: the JSON report, the summary and the live progress line.

Field names follow QEMU's ``query-migrate`` where one fits (total time,
downtime, expected downtime, setup time, mbps, dirty-sync count), in
snake_case with their unit as a suffix.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class RoundReport:
    round: int
    dirty_blocks: int
    bytes: int
    seconds: float


@dataclass
class MigrationReport:
    status: str = "setup"  # setup | active | completed | failed
    error: str | None = None
    files: list[dict[str, Any]] = field(default_factory=list)
    block_size: int = 0
    total_s: float = 0.0
    setup_ms: float = 0.0
    downtime_ms: float | None = None
    downtime_breakdown_ms: dict[str, float] = field(default_factory=dict)
    expected_downtime_ms: float | None = None
    bytes_sent: int = 0  # on the wire, frames and headers included
    data_bytes: int = 0  # size of the migrated files
    blocks_sent: int = 0
    bytes_by_file: dict[str, int] = field(default_factory=dict)  # block data over the link
    spill_bytes: int = 0  # post-copy pages written into the spill area
    static_blocks: int = 0
    dynamic_blocks: int = 0
    initial_copy_s: float = 0.0
    rounds: list[RoundReport] = field(default_factory=list)
    dirty_sync_count: int = 0
    last_set_blocks: int = 0
    switchover_reason: str = ""
    mbps: float = 0.0
    verified: bool = False
    verify_s: float = 0.0
    source_vm: str = ""
    device_state_bytes: int = 0  # the hypervisor's own state (QEMU), sent in the downtime
    started_at: float = field(default_factory=time.time)
    # post-copy (None/0 in a pure pre-copy migration)
    postcopy_files: list[str] = field(default_factory=list)
    postcopy_reason: str = ""  # --postcopy=auto: why pre-copy of memory was given up
    postcopy_pages: int = 0  # memory pages left absent at switchover
    postcopy_s: float | None = None  # Commit -> the destination has every page
    resume_ms: float | None = None  # suspend -> running on the destination
    spill_flushed_s: float | None = None  # Commit -> every page durable in the spill area
    pages_spilled: int = 0
    pages_via_spill: int = 0
    pages_via_demand_fetch: int = 0
    pages_drained: int = 0  # installed by the background drain before anything read them
    pages_faulted_in: int = 0  # installed because a read (the guest) waited for them
    demand_faults: int = 0
    demand_fault_p50_ms: float | None = None
    demand_fault_p99_ms: float | None = None
    slot_reuses: int = 0
    generation_mismatches: int = 0
    hash_mismatches: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        ratio = self.bytes_sent / self.data_bytes if self.data_bytes else None
        d["bytes_sent_ratio"] = None if ratio is None else round(ratio, 4)
        return d

    def write(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def print_summary(r: MigrationReport, console: Console) -> None:
    ok = r.status == "completed" and r.verified
    head = "[bold green]migration completed[/]" if ok else f"[bold red]migration {r.status}[/]"
    console.print(head + (f": {r.error}" if r.error else ""))
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    dt = "-" if r.downtime_ms is None else f"{r.downtime_ms:.1f} ms"
    edt = "-" if r.expected_downtime_ms is None else f"{r.expected_downtime_ms:.1f} ms"
    rows = [
        ("files", ", ".join(f"{f['name']} ({human_bytes(f['size'])})" for f in r.files)),
        ("total time", f"{r.total_s:.2f} s (initial copy {r.initial_copy_s:.2f} s)"),
        ("downtime", f"{dt} (expected {edt}; "
                     + ", ".join(f"{k} {v:.1f}" for k, v in r.downtime_breakdown_ms.items())
                     + ")"),
        ("data / sent", f"{human_bytes(r.data_bytes)} / {human_bytes(r.bytes_sent)}"
                        + (f" ({r.bytes_sent / r.data_bytes:.3f}x)" if r.data_bytes else "")),
        ("initial copy", f"{r.static_blocks} static blocks, then {r.dynamic_blocks} dynamic"),
        ("rounds", f"{len(r.rounds)}: " + ", ".join(str(x.dirty_blocks) for x in r.rounds)
                   + f" dirty blocks; last set {r.last_set_blocks}"),
        ("switchover", r.switchover_reason or "-"),
        ("bandwidth", f"{r.mbps:.0f} MB/s"),
        ("verified", f"{'yes' if r.verified else 'NO'} ({r.verify_s:.2f} s, after resume)"),
    ]
    if r.postcopy_files:
        rows.append(("post-copy", f"{r.postcopy_pages} pages of {', '.join(r.postcopy_files)} "
                     f"in {r.postcopy_s if r.postcopy_s is not None else '-'} s: "
                     f"{r.pages_via_spill} from the spill area, {r.pages_via_demand_fetch} "
                     f"fetched; {r.demand_faults} faults, p50 {r.demand_fault_p50_ms} ms, p99 "
                     f"{r.demand_fault_p99_ms} ms; {r.slot_reuses} slot reuses; "
                     f"{r.generation_mismatches + r.hash_mismatches} slot reads refused"))
    if r.source_vm:
        rows.append(("source VM", r.source_vm))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
