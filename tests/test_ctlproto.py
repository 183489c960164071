"""The control socket's protocol (pure) and its ops over a Registry, without a mount."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from blkfs import ctlproto as cp
from blkfs.control import Controller
from blkfs.lazy import LazyMode
from blkfs.registry import Registry
from blkfs.runtime import DaemonInfo
from blkfs.spill import pack_refs

# -- codec ----------------------------------------------------------------------------------


def feed_bytewise(data: bytes) -> list[cp.Request | cp.ControlError]:
    r = cp.RequestReader()
    out: list[cp.Request | cp.ControlError] = []
    for i in range(len(data)):
        r.feed(data[i:i + 1])
        out.extend(r)
    return out


def test_every_request_round_trips_byte_by_byte() -> None:
    reqs = [cp.Info(), cp.Status(static_heat=2.5), cp.Dirty("disk.raw", swap=True),
            cp.Clear("d", ((0, 3), (9, 1))), cp.Freeze(("a", "b")), cp.Thaw(),
            cp.LazyRefs(pack_refs([(0, 1, 2, 3), (1, 2, 3, 4)])),
            cp.LazyInstall(1, 7, b"\0\n\xff" * 100), cp.LazyWait(timeout=0.5),
            cp.LazyBegin("m", 65536, None, (cp.LazyFileSpec(0, "vm.mem", ((0, 4),)),))]
    assert feed_bytewise(b"".join(cp.encode_request(r) for r in reqs)) == reqs


@pytest.mark.parametrize(("line", "words"), [
    (b"not json", "not valid JSON"),
    (b'["op"]', '"op" string'),
    (b'{"op": "frobnicate"}', "unknown op 'frobnicate'"),
    (b'{"op": "dirty"}', "dirty: file is required"),
    (b'{"op": "dirty", "file": 3}', "dirty: file must be a string"),
    (b'{"op": "dirty", "file": "f", "bogus": 1}', "unknown field 'bogus'"),
    (b'{"op": "clear", "file": "f", "extents": [[0]]}', "extents must be a list of [int, int]"),
    (b'{"op": "clear", "file": "f", "extents": [[-1, 2]]}', "extents"),
    (b'{"op": "clear", "file": "f", "extents": [[true, 1]]}', "extents"),
    (b'{"op": "lazy_wait", "timeout": 60}', "timeout must be 0..5"),
    (b'{"op": "info", "data_len": 3}\nabc', "takes no data"),
    (b'{"op": "lazy_refs", "data": "x"}', "data travels as the payload"),
])
def test_bad_requests_get_a_message_naming_what_is_wrong(line: bytes, words: str) -> None:
    [got] = feed_bytewise(line if line.endswith(b"abc") else line + b"\n")
    assert isinstance(got, cp.ControlError) and words in str(got), got


def test_a_huge_line_is_refused_and_ends_the_connection() -> None:
    r = cp.RequestReader()
    r.feed(b"x" * (cp.MAX_REQUEST + 1))
    [got] = list(r)
    assert isinstance(got, cp.ControlError) and "too large" in str(got) and r.closed


def test_a_payload_is_awaited_whole() -> None:
    data = cp.encode_request(cp.LazyInstall(0, 0, b"p" * 1000))
    r = cp.RequestReader()
    r.feed(data[:-10])
    assert list(r) == [] and r.wants() == 10
    r.feed(data[-10:])
    assert list(r) == [cp.LazyInstall(0, 0, b"p" * 1000)]


def test_replies_are_typed_and_errors_raise() -> None:
    req = cp.Dirty("disk.raw")
    reply = cp.DirtyReply("disk.raw", 3, 4096, 8192, cp.pack_extents([0, 5], [2, 1]))
    line, data = cp.take_reply(bytearray(cp.encode_reply(reply)))
    back = cp.decode_reply(line, req, data)
    assert back == reply and back.extents == [(0, 2), (5, 1)] and back.blocks == 3
    with pytest.raises(cp.ControlError, match="no such file"):
        cp.decode_reply(cp.encode_reply(cp.ControlError("no such file 'x'")), req)
    bad = json.dumps({"ok": True, "result": {"file": "f"}}).encode()
    with pytest.raises(cp.ControlError, match="reply to dirty: epoch is required"):
        cp.decode_reply(bad, req)


def test_postcopy_stats_travel_unchanged() -> None:
    stats = cp.PostcopyStats(demand_faults=3, pages_via_spill=2, pages_via_drain=5,
                             demand_fault_p99_ms=1.5)
    back = cp.decode_reply(cp.encode_reply(cp.LazyReportReply(stats, ((0, 1, 2),))),
                           cp.LazyReport())
    assert back == cp.LazyReportReply(stats, ((0, 1, 2),))
    assert back.stats.pages_from_spill == 7


# -- ops over a registry, no mount -------------------------------------------------------------


def controller(tmp_path: Path) -> Controller:
    (tmp_path / "b").mkdir()
    reg = Registry(str(tmp_path / "b"), shift=12, half_life=60.0, static_heat=1.0)

    async def invalidate(key: object) -> None:
        pass

    info = DaemonInfo(os.getpid(), "/mnt/test", reg.backing, "/nowhere.sock", 4096, True)
    return Controller(reg, LazyMode(12, invalidate), info)


async def test_ops_without_a_mount(tmp_path: Path) -> None:
    c = controller(tmp_path)
    (tmp_path / "b" / "disk.raw").write_bytes(b"\0" * 5 * 4096)
    first = await c.dispatch(cp.Dirty("disk.raw", swap=True))
    assert first.extents == [(0, 5)]  # never seen before: all dirty (invariant 5)
    assert (await c.dispatch(cp.Dirty("disk.raw"))).extents == []
    tr = c.registry.trackers[next(iter(c.registry.trackers))]
    tr.on_write(4096, 10)
    assert (await c.dispatch(cp.Dirty("disk.raw"))).extents == [(1, 1)]
    assert (await c.dispatch(cp.Clear("disk.raw", ((1, 1),)))).epoch == 1
    assert (await c.dispatch(cp.Dirty("disk.raw"))).extents == []
    assert (await c.dispatch(cp.Freeze())).count == 1 and c.registry.frozen_all
    assert (await c.dispatch(cp.Thaw(("disk.raw",)))).count == 1
    status = await c.dispatch(cp.Status())
    assert [f.file for f in status.files] == ["disk.raw"] and status.files[0].writes == 1
    for bad, words in ((cp.Dirty("../etc/passwd"), "without '..'"),
                       (cp.Dirty("nope"), "no such file"), (cp.Dirty(".blkfs/lock"), "no such"),
                       (cp.LazyWait(), "no post-copy is running"),
                       (cp.Spill(), "has no spill area")):
        err = await c.dispatch(bad)
        assert isinstance(err, cp.ControlError) and words in str(err), (bad, err)


async def test_lazy_begin_refuses_another_block_size(tmp_path: Path) -> None:
    c = controller(tmp_path)
    (tmp_path / "b" / "vm.mem").write_bytes(b"\0" * 4 * 4096)
    req = cp.LazyBegin("m1", 65536, None, (cp.LazyFileSpec(0, "vm.mem", ((0, 4),)),))
    err = await c.dispatch(req)
    assert isinstance(err, cp.ControlError) and "--block-size 65536" in str(err)
    ok = await c.dispatch(cp.LazyBegin("m1", 4096, None, req.files))
    assert ok == cp.Remaining(4)
    news = await c.dispatch(cp.LazyWait(timeout=0))
    assert news.remaining == 4 and not news.done
    installed = await c.dispatch(cp.LazyInstall(0, 0, b"\1" * 4 * 4096))
    assert installed == cp.Installed(4, 0)
    report = await c.dispatch(cp.LazyReport(digests=True))
    assert report.stats.pages_via_demand_fetch == 4 and len(report.digests) == 4
    c.lazy.close()


async def test_two_post_copies_at_once_each_over_its_own_files(tmp_path: Path) -> None:
    """Two VMs arriving by post-copy into one mount: each op names its post-copy and touches
    only it; one over a file that is still arriving is refused; the claims' close orphans only
    the post-copy over its own files."""
    from blkfs.control import Connection

    c = controller(tmp_path)
    for vm in ("vm1", "vm2"):
        (tmp_path / "b" / vm).mkdir()
        (tmp_path / "b" / vm / "vm.mem").write_bytes(b"\0" * 4 * 4096)
    one, two = Connection(1), Connection(2)
    assert await c.dispatch(cp.Claim("m1", "serve", ("vm1/vm.mem",)), one) == cp.Claimed("m1")
    assert await c.dispatch(cp.Claim("m2", "serve", ("vm2/vm.mem",)), two) == cp.Claimed("m2")
    for mid, vm in (("p1", "vm1"), ("p2", "vm2")):
        got = await c.dispatch(cp.LazyBegin(mid, 4096, None, (
            cp.LazyFileSpec(0, f"{vm}/vm.mem", ((0, 4),)),)))
        assert got == cp.Remaining(4), got
    again = await c.dispatch(cp.LazyBegin("p3", 4096, None, (
        cp.LazyFileSpec(0, "vm1/vm.mem", ((0, 1),)),)))
    assert isinstance(again, cp.ControlError) and "still arriving by post-copy p1" in str(again)
    unnamed = await c.dispatch(cp.LazyWait(timeout=0))
    assert isinstance(unnamed, cp.ControlError) and "2 post-copies" in str(unnamed)
    assert await c.dispatch(cp.LazyInstall(0, 0, b"\2" * 4 * 4096, "p2")) == cp.Installed(4, 0)
    assert (await c.dispatch(cp.LazyWait(0, "p2"))).done
    assert (await c.dispatch(cp.LazyWait(0, "p1"))).remaining == 4  # untouched
    assert (await c.dispatch(cp.Info())).postcopy_absent == 4
    c.closed(one)  # vm1's migrator went away: its post-copy alone goes on from the spill
    assert c.lazy.running["p1"].paused and c.lazy.running["p2"].paused is None
    assert (await c.dispatch(cp.LazyGiveUp())).count == 4  # every one still running
    c.lazy.close()
    assert not c.lazy.running


async def test_one_migration_at_a_time_per_vm(tmp_path: Path) -> None:
    """A claim holds its files as long as its connection: another VM's files go at once, a
    claim of any of the same files is refused, naming the file and who holds it, until the
    first goes away; a claim of no files holds the whole mount."""
    from blkfs.control import Connection

    c = controller(tmp_path)
    first, second, third, fourth = (Connection(i) for i in range(1, 5))
    vm1, vm2 = ("vm1/disk.raw", "vm1/vm.mem"), ("vm2/disk.raw", "vm2/vm.mem")
    assert await c.dispatch(cp.Claim("m1", "serve pid 1", vm1), first) == cp.Claimed("m1")
    assert await c.dispatch(cp.Claim("m1", "serve pid 1", vm1), first) == cp.Claimed("m1")
    assert await c.dispatch(cp.Claim("m2", "sync pid 2", vm2), second) == cp.Claimed("m2")
    err = await c.dispatch(cp.Claim("m3", "migrate pid 3", ("./vm1/vm.mem", "x")), third)
    assert isinstance(err, cp.ControlError), err
    assert str(err).startswith("vm1/vm.mem on ") and "taken by migration m1 (serve pid 1)" in (
        str(err)) and "one migration at a time per VM" in str(err)
    err = await c.dispatch(cp.Claim("m4", "old serve"), fourth)  # (the whole mount)
    assert isinstance(err, cp.ControlError) and "this one would take the whole mount" in str(err)
    assert "taken by migration m1" in str(err)
    c.closed(first)  # its migrator went away (or finished)
    assert await c.dispatch(cp.Claim("m3", "migrate pid 3", vm1), third) == cp.Claimed("m3")
    c.closed(second)
    c.closed(third)
    assert await c.dispatch(cp.Claim("m4", "old serve"), fourth) == cp.Claimed("m4")
    err = await c.dispatch(cp.Claim("m5", "migrate pid 5", vm2), first)
    assert isinstance(err, cp.ControlError) and "that one holds the whole mount" in str(err)


def test_heat_runs_round_trip_and_refuse_garbage() -> None:
    raw = cp.pack_heat_runs([0, 1 << 40], [3, 1], [0.25, 7.5])
    runs = cp.unpack_heat_runs(raw)
    assert runs["first"].tolist() == [0, 1 << 40]
    assert runs["count"].tolist() == [3, 1]
    assert runs["heat"].tolist() == [0.25, 7.5]
    assert cp.unpack_heat_runs(b"").size == 0
    with pytest.raises(cp.ControlError, match="whole number"):
        cp.unpack_heat_runs(b"AAAA")


def test_heat_runs_travel_as_the_reply_payload() -> None:
    raw = cp.pack_heat_runs([5], [2], [1.5])
    reply = cp.HeatReply("d", 4096, 8, 60.0, 1.0, 6, 2, ((5, 2),), raw)
    wire = cp.encode_reply(reply)
    assert wire.endswith(b"\n" + raw) and b'"runs"' not in wire  # not in the JSON line
    buf = bytearray(wire + cp.encode_reply(cp.ControlError("next")))
    assert cp.take_reply(bytearray(wire[:-1])) is None  # the payload is awaited whole
    line, data = cp.take_reply(buf)
    back = cp.decode_reply(line, cp.Heat("d"), data)
    assert back == reply and back.heat_runs()["count"].tolist() == [2]
    line2, data2 = cp.take_reply(buf)
    assert not buf and data2 == b""
    with pytest.raises(cp.ControlError, match="next"):
        cp.decode_reply(line2, cp.Heat("d"), data2)
    with pytest.raises(cp.ControlError, match="not data_len bytes"):
        cp.decode_reply(line, cp.Heat("d"), data[:-1])
    with pytest.raises(cp.ControlError, match="should not"):
        cp.decode_reply(cp.encode_reply(cp.Count(1)).rstrip(b"\n"), cp.Freeze(), b"x")


def test_lazy_begin_with_a_spill_area_needs_its_key() -> None:
    files = (cp.LazyFileSpec(0, "vm.mem", ((0, 4),)),)
    cp.LazyBegin("m", 65536, "/spill", files, "ab" * 32).check()
    for bad in (None, "ab" * 31, "zz" * 32):
        with pytest.raises(cp.ControlError, match="spill_key"):
            cp.LazyBegin("m", 65536, "/spill", files, bad).check()


async def test_written_beside_the_mount_is_refused_only_for_absent_blocks(tmp_path: Path) -> None:
    """Post-copy's warm set is written beside the mount while lazy mode turns on: into present
    blocks that is a write like any other; into an absent block it would race the block's
    install, and is refused."""
    c = controller(tmp_path)
    (tmp_path / "b" / "vm.mem").write_bytes(b"\0" * 8 * 4096)
    await c.dispatch(cp.Dirty("vm.mem", swap=True))
    begun = await c.dispatch(cp.LazyBegin("m1", 4096, None,
                                          (cp.LazyFileSpec(0, "vm.mem", ((2, 3),)),)))
    assert begun == cp.Remaining(3)
    assert await c.dispatch(cp.Written("vm.mem", ((0, 8192), (5 * 4096, 100)))) == cp.Count(2)
    assert (await c.dispatch(cp.Dirty("vm.mem"))).extents == [(0, 2), (5, 1)]
    for ranges in (((2 * 4096, 1),), ((0, 3 * 4096),), ((4 * 4096 + 4095, 2),)):
        err = await c.dispatch(cp.Written("vm.mem", ranges))
        assert isinstance(err, cp.ControlError) and "still absent" in str(err), ranges
    c.lazy.close()


async def test_pipelined_calls_get_their_replies_in_order_and_a_refusal_spoils_none(
        tmp_path: Path) -> None:
    """call_many: the swaps of a VM's files in one round trip (the downtime's last swap). A
    refused request among them is raised after every reply was read, so the connection
    stays in step for the next call."""
    from blkfs.control import AsyncControlClient, serve

    c = controller(tmp_path)
    for name in ("disk.raw", "vm.mem"):
        (tmp_path / "b" / name).write_bytes(b"\0" * 3 * 4096)
    sock = str(tmp_path / "ctl.sock")
    async with trio.open_nursery() as n:
        await n.start(serve, c, sock)
        client = await AsyncControlClient.connect(sock)
        swaps = [cp.Dirty("disk.raw", swap=True), cp.Dirty("vm.mem", swap=True)]
        first = await client.call_many(swaps)
        assert [(r.file, r.epoch, r.extents) for r in first] == [
            ("disk.raw", 0, [(0, 3)]), ("vm.mem", 0, [(0, 3)])]
        with pytest.raises(cp.ControlError, match="no such file"):
            await client.call_many([swaps[0], cp.Dirty("nope", swap=True), swaps[1]])
        after = await client.call_many(swaps)  # both were swapped, and in step
        assert [(r.file, r.epoch) for r in after] == [("disk.raw", 2), ("vm.mem", 2)]
        assert (await client.call(cp.Info())).pid == os.getpid()
        client.close()
        n.cancel_scope.cancel()
