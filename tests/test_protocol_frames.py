"""Every frame frozen: one example of each frame type and its exact bytes on the wire.

Two migrators talk only if they speak the same PROTOCOL_VERSION (Hello says it, and a
mismatch is refused by name), so an encoding must never change under the same version.  These
examples catch it: a changed encoding fails test_encoding_is_frozen or
test_decoding_is_frozen, and a new frame type fails test_every_frame_type_has_an_example until
it has one.  When they fail because the wire changed on purpose, bump PROTOCOL_VERSION in
migrator/protocol/limits.py (its history line saying what changed), then freeze the new bytes
here: Hello's example carries the version, so it changes with every bump.
"""

from __future__ import annotations

import pytest

from migrator.protocol import (
    Abort,
    AbortCode,
    Absent,
    Answer,
    Auth,
    Blocks,
    Commit,
    DeviceState,
    Digests,
    Done,
    Event,
    Fetch,
    FileAttrs,
    FileEntry,
    FrameType,
    Held,
    HeldZero,
    Hello,
    Lineage,
    Manifest,
    Packed,
    Pages,
    Postcopy,
    PostcopyDone,
    PostcopyFigures,
    Query,
    Ready,
    Reattach,
    Resize,
    Resumed,
    RoundAck,
    RoundDone,
    SlotFree,
    SpillFlushed,
    SpillRefs,
    Switchover,
    Verified,
    VerifyDone,
    Zero,
    ZeroDigests,
    decode,
    encode,
)

# frame type -> (an example, its frame in hex: the 5-byte header, then the payload; a JSON
# payload is shown above it as text)
FROZEN: dict[FrameType, tuple[Event, str]] = {
    FrameType.HELLO: (
        Hello(11, "source", bytes(range(32)), True),
        # {"version":11,"role":"source","nonce":"000102030405060708090a0b0c0d0e0f10111213141516171
        # 8191a1b1c1d1e1f","sealed":true}
        "0100000077"
        "7b2276657273696f6e223a31312c22726f6c65223a22736f75726365222c226e6f6e6365223a2230"
        "30303130323033303430353036303730383039306130623063306430653066313031313132313331"
        "3431353136313731383139316131623163316431653166222c227365616c6564223a747275657d"),
    FrameType.AUTH: (
        Auth(bytes(range(32, 64))),
        # {"mac":"202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"}
        "020000004a"
        "7b226d6163223a223230323132323233323432353236323732383239326132623263326432653266"
        "3330333133323333333433353336333733383339336133623363336433653366227d"),
    FrameType.MANIFEST: (
        Manifest(65536, (FileEntry(0, "disk.raw", 1 << 20, 65536),
                         FileEntry(1, "vm/vm.mem", 4096, 4096)),
            migration="m-1", delta=True, lineage="s@3", lineage_files=(0,), vm="vm-1",
            vm_name="web", generation=2),
        # {"block_size":65536,"files":[{"file_id":0,"name":"disk.raw","size":1048576,"allocated":6
        # 5536},{"file_id":1,"name":"vm/vm.mem","size":4096,"allocated":4096}],"migration":"m-1","
        # delta":true,"replica":false,"lineage":"s@3","lineage_files":[0],"vm":"vm-1","vm_name":"w
        # eb","generation":2}
        "030000011b"
        "7b22626c6f636b5f73697a65223a36353533362c2266696c6573223a5b7b2266696c655f6964223a"
        "302c226e616d65223a226469736b2e726177222c2273697a65223a313034383537362c22616c6c6f"
        "6361746564223a36353533367d2c7b2266696c655f6964223a312c226e616d65223a22766d2f766d"
        "2e6d656d222c2273697a65223a343039362c22616c6c6f6361746564223a343039367d5d2c226d69"
        "67726174696f6e223a226d2d31222c2264656c7461223a747275652c227265706c696361223a6661"
        "6c73652c226c696e65616765223a22734033222c226c696e656167655f66696c6573223a5b305d2c"
        "22766d223a22766d2d31222c22766d5f6e616d65223a22776562222c2267656e65726174696f6e22"
        "3a327d"),
    FrameType.READY: (
        Ready(),
        # {}
        "0400000002"
        "7b7d"),
    FrameType.BLOCKS: (
        Blocks(1, 2, b"data"),
        "0500000010"
        "00000001000000000000000264617461"),
    FrameType.RESIZE: (
        Resize(0, 8192),
        # {"file_id":0,"size":8192}
        "0600000019"
        "7b2266696c655f6964223a302c2273697a65223a383139327d"),
    FrameType.ROUND_DONE: (
        RoundDone(3, 10, 40960),
        # {"round":3,"blocks":10,"bytes":40960}
        "0700000025"
        "7b22726f756e64223a332c22626c6f636b73223a31302c226279746573223a34303936307d"),
    FrameType.ROUND_ACK: (
        RoundAck(3),
        # {"round":3}
        "080000000b"
        "7b22726f756e64223a337d"),
    FrameType.SWITCHOVER: (
        Switchover(),
        # {}
        "0900000002"
        "7b7d"),
    FrameType.COMMIT: (
        Commit(3, (FileAttrs(0, 0o644, 1000, 1000, 1700000000000000000, 1700000001000000000,
                             (("user.a", b"\x01"),)),)),
        # {"generation":3,"attrs":[{"file_id":0,"mode":420,"uid":1000,"gid":1000,"atime_ns":
        # 1700000000000000000,"mtime_ns":1700000001000000000,"xattrs":[["user.a","01"]]}]}
        "0a000000a2"
        "7b2267656e65726174696f6e223a332c226174747273223a5b7b2266696c655f6964223a302c226d"
        "6f6465223a3432302c22756964223a313030302c22676964223a313030302c226174696d655f6e73"
        "223a313730303030303030303030303030303030302c226d74696d655f6e73223a31373030303030"
        "3030313030303030303030302c22786174747273223a5b5b22757365722e61222c223031225d5d7d"
        "5d7d"),
    FrameType.RESUMED: (
        Resumed(12.5),
        # {"ms":12.5}
        "0b0000000b"
        "7b226d73223a31322e357d"),
    FrameType.DIGESTS: (
        Digests(0, 4, (1, 2**64 - 1)),
        "0c00000020"
        "000000000000000000000004000000020000000000000001ffffffffffffffff"),
    FrameType.VERIFY_DONE: (
        VerifyDone(),
        # {}
        "0d00000002"
        "7b7d"),
    FrameType.VERIFIED: (
        Verified(False, 1, "disk.raw block 7"),
        # {"ok":false,"mismatches":1,"detail":"disk.raw block 7"}
        "0e00000037"
        "7b226f6b223a66616c73652c226d69736d617463686573223a312c2264657461696c223a22646973"
        "6b2e72617720626c6f636b2037227d"),
    FrameType.ABORT: (
        Abort("busy", -1, AbortCode.STILL_RUNNING),
        # {"reason":"busy","owner_generation":-1,"code":"still-running"}
        "0f0000003e"
        "7b22726561736f6e223a2262757379222c226f776e65725f67656e65726174696f6e223a2d312c22"
        "636f6465223a227374696c6c2d72756e6e696e67227d"),
    FrameType.DONE: (
        Done(),
        # {}
        "1000000002"
        "7b7d"),
    FrameType.POSTCOPY: (
        Postcopy("m-1", "/spill/m-1", 64),
        # {"migration":"m-1","spill":"/spill/m-1","slots":64}
        "1100000033"
        "7b226d6967726174696f6e223a226d2d31222c227370696c6c223a222f7370696c6c2f6d2d31222c"
        "22736c6f7473223a36347d"),
    FrameType.ABSENT: (
        Absent(1, ((0, 2), (5, 1))),
        # {"file_id":1,"extents":[[0,2],[5,1]]}
        "1200000025"
        "7b2266696c655f6964223a312c22657874656e7473223a5b5b302c325d2c5b352c315d5d7d"),
    FrameType.SPILL_REFS: (
        SpillRefs(((1, 0, 5, 1), (1, 1, 6, 2))),
        "1300000030"
        "00000001000000000000000000000005000000000000000100000001000000000000000100000006"
        "0000000000000002"),
    FrameType.SPILL_FLUSHED: (
        SpillFlushed(2),
        # {"pages":2}
        "140000000b"
        "7b227061676573223a327d"),
    FrameType.FETCH: (
        Fetch(1, 3, 2),
        # {"file_id":1,"first_block":3,"count":2}
        "1500000027"
        "7b2266696c655f6964223a312c2266697273745f626c6f636b223a332c22636f756e74223a327d"),
    FrameType.SLOT_FREE: (
        SlotFree(((5, 1),)),
        # {"slots":[[5,1]]}
        "1600000011"
        "7b22736c6f7473223a5b5b352c315d5d7d"),
    FrameType.POSTCOPY_DONE: (
        PostcopyDone(PostcopyFigures(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0.5, 2.25, 1.5)),
        # {"stats":{"demand_faults":1,"pages_via_spill":2,"pages_via_drain":3,"pages_via_demand_fe
        # tch":4,"generation_mismatches":5,"hash_mismatches":6,"mac_mismatches":7,"refs_received":
        # 8,"remaining":9,"missing_count":10,"demand_fault_p50_ms":0.5,"demand_fault_p99_ms":2.25,
        # "postcopy_s":1.5}}
        "170000011a"
        "7b227374617473223a7b2264656d616e645f6661756c7473223a312c2270616765735f7669615f73"
        "70696c6c223a322c2270616765735f7669615f647261696e223a332c2270616765735f7669615f64"
        "656d616e645f6665746368223a342c2267656e65726174696f6e5f6d69736d617463686573223a35"
        "2c22686173685f6d69736d617463686573223a362c226d61635f6d69736d617463686573223a372c"
        "22726566735f7265636569766564223a382c2272656d61696e696e67223a392c226d697373696e67"
        "5f636f756e74223a31302c2264656d616e645f6661756c745f7035305f6d73223a302e352c226465"
        "6d616e645f6661756c745f7039395f6d73223a322e32352c22706f7374636f70795f73223a312e35"
        "7d7d"),
    FrameType.DEVICE_STATE: (
        DeviceState(b"QEVM"),
        "1800000004"
        "5145564d"),
    FrameType.QUERY: (
        Query("m-1"),
        # {"migration":"m-1"}
        "1900000013"
        "7b226d6967726174696f6e223a226d2d31227d"),
    FrameType.ANSWER: (
        Answer("m-1", "owner", 3, "runs here"),
        # {"migration":"m-1","status":"owner","generation":3,"detail":"runs here"}
        "1a00000048"
        "7b226d6967726174696f6e223a226d2d31222c22737461747573223a226f776e6572222c2267656e"
        "65726174696f6e223a332c2264657461696c223a2272756e732068657265227d"),
    FrameType.REATTACH: (
        Reattach("m-1", 3, True),
        # {"migration":"m-1","generation":3,"postcopy":true}
        "1b00000032"
        "7b226d6967726174696f6e223a226d2d31222c2267656e65726174696f6e223a332c22706f737463"
        "6f7079223a747275657d"),
    FrameType.ZERO: (
        Zero(0, 8, 16),
        # {"file_id":0,"first_block":8,"count":16}
        "1c00000028"
        "7b2266696c655f6964223a302c2266697273745f626c6f636b223a382c22636f756e74223a31367d"),
    FrameType.ZERO_DIGESTS: (
        ZeroDigests(0, 8, 1 << 30),
        # {"file_id":0,"first_block":8,"count":1073741824}
        "2100000030"
        "7b2266696c655f6964223a302c2266697273745f626c6f636b223a382c22636f756e74223a3130"
        "37333734313832347d"),
    FrameType.HELD_ZERO: (
        HeldZero(1, 0, 4096),
        # {"file_id":1,"first_block":0,"count":4096}
        "220000002a"
        "7b2266696c655f6964223a312c2266697273745f626c6f636b223a302c22636f756e74223a3430"
        "39367d"),
    FrameType.PACKED: (
        Packed(0, 1, 1, 65536, b"zz"),
        "1d00000013"
        "00000000000000000000000101000100007a7a"),
    FrameType.PAGES: (
        Pages(0, ((4096, 2), (8192, 1)), b"abc"),
        # file_id 0, codec 0, 2 ranges: (4096, 2), (8192, 1); then the data
        "2000000024"
        "000000000000000002000000000000100000000002000000000000200000000001616263"),
    FrameType.HELD: (
        Held(0, 0, (7,)),
        "1e00000018"
        "000000000000000000000000000000010000000000000007"),
    FrameType.LINEAGE: (
        Lineage((0,), "disk.raw written here"),
        # {"accepted":[0],"detail":"disk.raw written here"}
        "1f00000031"
        "7b226163636570746564223a5b305d2c2264657461696c223a226469736b2e726177207772697474"
        "656e2068657265227d"),

}


def test_every_frame_type_has_an_example() -> None:
    assert set(FROZEN) == set(FrameType), sorted(set(FrameType) - set(FROZEN))


@pytest.mark.parametrize("frame_type", list(FROZEN), ids=lambda t: t.name)
def test_encoding_is_frozen(frame_type: FrameType) -> None:
    event, frozen = FROZEN[frame_type]
    frame = encode(event)
    assert frame[0] == frame_type, "the example is not of this frame type"
    assert frame.hex() == frozen, "the encoding changed: bump PROTOCOL_VERSION (see the docstring)"


@pytest.mark.parametrize("frame_type", list(FROZEN), ids=lambda t: t.name)
def test_decoding_is_frozen(frame_type: FrameType) -> None:
    event, frozen = FROZEN[frame_type]
    assert decode(bytes.fromhex(frozen)) == event
