"""Snapshots and clones on shared regions (volume/snapshots.py, volume/cow.py): content at the
moment taken, isolation, copy on write, claim 8 for copies, deletes in any order, reopen, and the
refusals."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from tests.engine_helpers import REGION, pattern, reopen
from tests.unit.snapshot_support import SIZE, assert_sound, engine_with_volume, read_all
from thinblock.errors import AlreadyExists, InvalidArgument, NotFound, ReadOnlyDevice
from thinblock.model import CacheMode
from thinblock.volume.vv import UNMAP_OFF_LOOP, VirtualVolume


@pytest.mark.parametrize("mode", [CacheMode.WRITETHROUGH, CacheMode.WRITEBACK])
async def test_a_snapshot_keeps_its_moment_and_clones_are_isolated(tmp_path: Path, mode: CacheMode) -> None:
    engine = await engine_with_volume(tmp_path, mode)
    try:
        v = engine.volume("v")
        await v.write(0, pattern(1, 3 * REGION))  # regions 0-2 (still dirty in write-back)
        before = await read_all(engine, "v")
        info = await engine.snapshot_vv("v", "s1")
        assert (info.kind, info.parent, info.shared, info.exclusive) == ("snapshot", "v", 3 * REGION, 0)
        assert engine.cache.dirty_by_owner.get(engine.vvs["v"].row.id, 0) == 0, "the snapshot settled v"
        # The volume goes on; the snapshot does not see it.
        await v.write(REGION + 100, b"\xaa" * 300)  # a shared region: copied first
        await v.write(5 * REGION, pattern(2, REGION))  # a new region
        assert await read_all(engine, "s1") == before
        after = bytearray(before)
        after[REGION + 100 : REGION + 400] = b"\xaa" * 300
        after[5 * REGION : 6 * REGION] = pattern(2, REGION)
        assert await read_all(engine, "v") == bytes(after)
        assert engine.vvs["v"].cow_copies == 1
        vinfo = engine.get_vv("v")
        assert (vinfo.exclusive, vinfo.shared, vinfo.children) == (2 * REGION, 2 * REGION, ("s1",))
        # Two clones of the snapshot: each writes, neither sees the other.
        await engine.clone_vv("s1", "c1")
        await engine.clone_vv("s1", "c2")
        await engine.volume("c1").write(0, b"\x01" * 512)
        await engine.volume("c2").write(0, b"\x02" * 512)
        await engine.volume("c2").trim(2 * REGION, REGION)
        c1 = bytearray(before)
        c1[:512] = b"\x01" * 512
        c2 = bytearray(before)
        c2[:512] = b"\x02" * 512
        c2[2 * REGION : 3 * REGION] = bytes(REGION)
        assert (await read_all(engine, "c1"), await read_all(engine, "c2")) == (bytes(c1), bytes(c2))
        assert await read_all(engine, "s1") == before
        assert engine.get_vv("c1").parent == "s1" and engine.get_vv("s1").children == ("c1", "c2")
        assert_sound(engine)
        # Deletes in any order: the parent first leaves its children whole.
        await engine.delete_vv("s1")
        assert engine.get_vv("c1").parent is None
        assert (await read_all(engine, "c1"), await read_all(engine, "c2")) == (bytes(c1), bytes(c2))
        assert_sound(engine)
        engine = await reopen(engine)
        assert await read_all(engine, "v") == bytes(after)
        assert (await read_all(engine, "c1"), await read_all(engine, "c2")) == (bytes(c1), bytes(c2))
        assert engine.get_vv("c2").kind == "clone"
        assert_sound(engine)
        for name in ("v", "c2", "c1"):
            await engine.delete_vv(name)
            assert_sound(engine)
        assert engine.get_pool("p").used == 0
    finally:
        await engine.close()


async def test_a_snapshot_is_read_only(tmp_path: Path) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        await engine.volume("v").write(0, pattern(3, REGION))
        await engine.snapshot_vv("v", "s")
        snap = engine.volume("s")
        assert isinstance(snap, VirtualVolume) and not snap.capabilities.can_write
        for attempt in (
            snap.write(0, b"x" * 512),
            snap.trim(0, REGION),
            snap.write_zeroes(0, REGION),
        ):
            with pytest.raises(ReadOnlyDevice, match="'s' is a snapshot: it is read-only"):
                await attempt
        assert await read_all(engine, "s") == pattern(3, REGION) + bytes(SIZE - REGION)
    finally:
        await engine.close()


async def test_bad_requests_change_nothing(tmp_path: Path) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        await engine.volume("v").write(0, pattern(4, REGION))
        await engine.snapshot_vv("v", "s")
        before = engine.list_vvs()
        with pytest.raises(NotFound, match="volume 'nope' not found"):
            await engine.snapshot_vv("nope", "x")
        with pytest.raises(InvalidArgument, match=r"'v' is not a snapshot: .* take one first"):
            await engine.clone_vv("v", "x")
        with pytest.raises(InvalidArgument, match="'s' is a snapshot already"):
            await engine.snapshot_vv("s", "x")
        with pytest.raises(AlreadyExists, match="volume 's' already exists"):
            await engine.snapshot_vv("v", "s")
        with pytest.raises(AlreadyExists, match="volume 'v' already exists"):
            await engine.clone_vv("s", "v")
        with pytest.raises(InvalidArgument):
            await engine.snapshot_vv("v", "bad name/")
        with pytest.raises(InvalidArgument, match="'s' is a snapshot: it keeps the size"):
            await engine.grow_vv("s", 2 * SIZE)
        assert engine.list_vvs() == before
        assert_sound(engine)
    finally:
        await engine.close()


async def test_writes_racing_into_a_region_being_copied_wait_for_the_copy(tmp_path: Path) -> None:
    """Claim 8 for copies on write: every write to one shared region at once, one copy."""
    engine = await engine_with_volume(tmp_path)
    try:
        v = engine.volume("v")
        await v.write(0, pattern(5, REGION))
        await engine.snapshot_vv("v", "s")
        pieces = [(i * 1024, bytes([i + 1]) * 1024) for i in range(8)]
        await asyncio.gather(*(v.write(off, data) for off, data in pieces))
        want = bytearray(pattern(5, REGION))
        for off, data in pieces:
            want[off : off + len(data)] = data
        assert bytes(await v.read(0, REGION)) == bytes(want)
        assert engine.vvs["v"].cow_copies == 1
        assert bytes(await engine.volume("s").read(0, REGION)) == pattern(5, REGION)
        assert_sound(engine)
    finally:
        await engine.close()


async def test_a_trim_racing_a_copy_leaves_no_region_behind(tmp_path: Path) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        v = engine.volume("v")
        await v.write(0, pattern(6, 2 * REGION))
        await engine.snapshot_vv("v", "s")
        write = asyncio.ensure_future(v.write(10, b"\x07" * 10))
        await asyncio.sleep(0)  # the copy has begun (reserved, copying)
        await v.trim(0, REGION)
        await write
        got = bytes(await v.read(0, REGION))
        assert got in (bytes(REGION), bytes(10) + b"\x07" * 10 + bytes(REGION - 20))
        assert bytes(await engine.volume("s").read(0, 2 * REGION)) == pattern(6, 2 * REGION)
        await engine.flush_all()
        assert_sound(engine)
    finally:
        await engine.close()


async def test_zeroing_a_shared_region_in_place_leaves_the_snapshot_alone(tmp_path: Path) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        v = engine.volume("v")
        await v.write(0, pattern(8, 2 * REGION))
        await engine.snapshot_vv("v", "s")
        await v.write_zeroes(0, REGION, may_trim=False)  # NO_HOLE: stays allocated, reads zeros
        await v.write_zeroes(REGION + 8, 16, may_trim=False)  # partial: zeros written
        assert bytes(await v.read(0, REGION)) == bytes(REGION)
        assert engine.vvs["v"].map.get(0) != engine.vvs["s"].map.get(0)
        want = bytearray(pattern(8, REGION))
        want[8:24] = bytes(16)
        assert bytes(await v.read(REGION, REGION)) == bytes(want)
        assert bytes(await engine.volume("s").read(0, 2 * REGION)) == pattern(8, 2 * REGION)
        assert_sound(engine)
    finally:
        await engine.close()


async def test_a_renamed_volume_keeps_its_tree(tmp_path: Path) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        await engine.volume("v").write(0, pattern(7, REGION))
        await engine.snapshot_vv("v", "s")
        await engine.rename_vv("v", "w")
        assert engine.get_vv("s").parent == "w" and engine.get_vv("w").children == ("s",)
        await engine.snapshot_vv("w", "s2")
        await engine.clone_vv("s2", "c")
        assert bytes(await engine.volume("c").read(0, REGION)) == pattern(7, REGION)
        assert_sound(engine)
    finally:
        await engine.close()


@pytest.mark.parametrize("operation", ["snapshot", "clone", "revert", "delete"])
async def test_other_volumes_are_served_while_a_long_map_copy_commits(
    tmp_path: Path, operation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: the store transaction of a snapshot, clone or revert (a million map rows copied
    take a second), or of a delete's batch of unassignments (vv.UNMAP_OFF_LOOP or more), runs off
    the event loop (metadata/writer.py, ``off_loop``), so another volume's reads and writes go on
    meanwhile.  The store call here is held until that I/O has
    been served: run on the loop, it would have held the loop, and the I/O, for all its length."""
    engine = await engine_with_volume(tmp_path)
    try:
        assert not engine.store.remote
        await engine.create_vv("other", pool="p", size=SIZE)
        other = engine.volume("other")
        await other.write(0, pattern(7, 2 * REGION))
        await engine.volume("v").write(0, pattern(8, REGION))
        if operation in ("clone", "revert"):
            await engine.snapshot_vv("v", "s0")
        if operation == "delete":
            await engine.create_vv("big", pool="p", size=UNMAP_OFF_LOOP * REGION)
            await engine.volume("big").write(0, pattern(9, UNMAP_OFF_LOOP * REGION))
        method = {
            "snapshot": "add_vv_sharing",
            "clone": "add_vv_sharing",
            "revert": "replace_map",
            "delete": "unassign",
        }[operation]
        real = getattr(engine.store, method)
        entered, served = threading.Event(), threading.Event()
        waited: list[bool] = []

        def held(*args: object) -> object:
            entered.set()
            # The other volume's I/O, served meanwhile, sets it; on the loop this times out.
            waited.append(served.wait(20))
            return real(*args)

        monkeypatch.setattr(engine.store, method, held)
        call = {
            "snapshot": lambda: engine.snapshot_vv("v", "s1"),
            "clone": lambda: engine.clone_vv("s0", "c1"),
            "revert": lambda: engine.revert_vv("v", "s0"),
            "delete": lambda: engine.delete_vv("big"),
        }[operation]
        task = asyncio.create_task(call())
        while not entered.is_set():
            await asyncio.sleep(0.001)
        assert bytes(await other.read(REGION, REGION)) == pattern(7, 2 * REGION)[REGION:]
        await other.write(0, b"\x5a" * 4096)  # a mapped region: no store write needed
        assert bytes(await other.read(0, 4096)) == b"\x5a" * 4096
        served.set()
        await task
        assert waited == [True], "the other volume's I/O waited for the store transaction"
        monkeypatch.undo()
        assert_sound(engine)
    finally:
        await engine.close()
