"""The protocol's version and its numbers: the frame layout and every limit a peer is held to.

In a module of their own because the codec, the state table and the connection all check
against them, and a reader looking for "how big may X be" finds them in one place."""

from __future__ import annotations

import struct

PROTOCOL_VERSION = 11  # 2: the handoff (Manifest.migration, Commit.epoch, Query/Answer);
# 3: Reattach, Zero; 4: Packed; 5: sealed frames (Hello.sealed), Held (Manifest.delta);
# 6: replica sessions (Manifest.replica, migrator sync), Lineage (Manifest.lineage);
# 7: VM identity (Manifest.vm, vm_name, generation; Abort.owner_generation)
# 8: one word, one meaning: Commit/Reattach/Answer.epoch -> .generation (the ownership
#    generation); PostcopyDone's figures are the protocol's own (unknown ones dropped);
#    Abort.code (what a receiver acts on: still-running, sync-stopped), never its text
# 9: Pages (the rounds send dirty pages, not whole blocks)
# 10: FileEntry.allocated (the destination's space check counts a thin image's data),
#     ZeroDigests, HeldZero (a thin image's holes are verified, and said held, as runs)
# 11: Commit.attrs (each file's mode, owner, times and user xattrs at the suspend point)
MAX_PAYLOAD = 8 * 2**20 + 64  # one Blocks frame of MAX_BLOCKS_DATA plus its header, with room
HEADER = struct.Struct(">BI")  # frame type, payload length
TAG_SIZE = 16  # AES-GCM's tag, after each sealed payload
MAX_FRAME = HEADER.size + MAX_PAYLOAD + TAG_SIZE  # the most unparsed input a peer can make us hold
MAX_BLOCKS_DATA = 8 * 2**20
MAX_DIGESTS_PER_FRAME = 65536
MAX_PAGE_RANGES = 2048  # ranges in one Pages frame (8 MiB of 4 KiB pages)
MAX_ITEMS_PER_FRAME = 65536  # extents in Absent, refs in SpillRefs, slots in SlotFree
MAX_SLOTS = 1 << 24
MAX_PATH = 4096
MAX_DEVICE_STATE = 256 * 2**20  # a hypervisor's device state (QEMU: ~0.4-1 MiB) in all
MAX_FILES = 1024
MAX_FILE_SIZE = 2**50
MAX_NAME_BYTES = 4096
MAX_COMPONENT_BYTES = 255  # NAME_MAX on Linux: longer names cannot be created anyway
MAX_REASON = 1000
NONCE_SIZE = 32
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 4096, 2**20
BIG_DATA = 1 << 18  # Blocks frames from this size on are received into their own buffer

U32, U64, MAX_COUNT = 2**32 - 1, 2**64 - 1, 2**63 - 1  # the ranges of integer fields
