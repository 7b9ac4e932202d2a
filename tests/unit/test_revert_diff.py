"""vv revert (the volume becomes a snapshot's content, atomically; other snapshots and clones
unchanged; refused with clients connected unless forced) and vv diff (the regions where two
volumes of one tree may differ: what an incremental backup copies)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine_helpers import REGION, pattern, reopen
from tests.unit.snapshot_support import SIZE, assert_sound, engine_with_volume, read_all
from thinblock.errors import Conflict, InvalidArgument, NotFound
from thinblock.model import CacheMode


@pytest.mark.parametrize("mode", [CacheMode.WRITETHROUGH, CacheMode.WRITEBACK])
async def test_revert_gives_the_snapshot_back_and_leaves_the_others(tmp_path: Path, mode: CacheMode) -> None:
    engine = await engine_with_volume(tmp_path, mode)
    try:
        v = engine.volume("v")
        await v.write(0, pattern(1, 3 * REGION))
        await engine.snapshot_vv("v", "monday")
        monday = await read_all(engine, "v")
        await v.write(REGION, pattern(2, 3 * REGION))  # regions 1-3 change, region 3 is new
        await engine.snapshot_vv("v", "tuesday")
        tuesday = await read_all(engine, "v")
        await engine.clone_vv("monday", "test")
        await engine.volume("test").write(0, b"\x09" * 512)
        test = await read_all(engine, "test")
        await v.write(6 * REGION, pattern(3, REGION))  # after tuesday (dirty in write-back)

        info = await engine.revert_vv("v", "monday")
        assert await read_all(engine, "v") == monday
        assert info.allocated == 3 * REGION and info.shared == 3 * REGION
        # Siblings untouched: a later snapshot, a clone of the same one.
        assert (await read_all(engine, "tuesday"), await read_all(engine, "test")) == (tuesday, test)
        assert_sound(engine)
        # The volume goes on from there, copying on write; monday is still monday.
        await v.write(100, b"\x07" * 100)
        assert await read_all(engine, "monday") == monday
        want = bytearray(monday)
        want[100:200] = b"\x07" * 100
        assert await read_all(engine, "v") == bytes(want)
        # Forward again to the later snapshot: nothing is consumed by a revert.
        await engine.revert_vv("v", "tuesday")
        assert await read_all(engine, "v") == tuesday
        engine = await reopen(engine)
        assert await read_all(engine, "v") == tuesday
        assert await read_all(engine, "monday") == monday
        assert_sound(engine)
    finally:
        await engine.close()


async def test_revert_refusals_change_nothing(tmp_path: Path) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        await engine.volume("v").write(0, pattern(4, REGION))
        await engine.snapshot_vv("v", "s")
        await engine.create_vv("other", pool="p", size=SIZE)
        await engine.snapshot_vv("other", "other-s")
        await engine.volume("v").write(0, pattern(5, REGION))
        before = await read_all(engine, "v")
        with pytest.raises(NotFound, match="volume 'nope' not found"):
            await engine.revert_vv("v", "nope")
        with pytest.raises(InvalidArgument, match="'other-s' is not a snapshot of 'v' or of its tree"):
            await engine.revert_vv("v", "other-s")
        with pytest.raises(InvalidArgument, match="'other' is not a snapshot"):
            await engine.revert_vv("v", "other")
        with pytest.raises(InvalidArgument, match="'s' is a snapshot: it cannot change"):
            await engine.revert_vv("s", "s")
        session = engine.sessions.open("NBD", "v", "127.0.0.1:5555", disconnect=lambda: None)
        with pytest.raises(Conflict, match=r"in use by 1 NBD client from 127\.0\.0\.1:5555: reverting it"):
            await engine.revert_vv("v", "s")
        assert await read_all(engine, "v") == before
        await engine.revert_vv("v", "s", force=True)  # forced: the client stays, the data is the snapshot's
        engine.sessions.close(session)
        assert await read_all(engine, "v") == pattern(4, REGION) + bytes(SIZE - REGION)
        assert_sound(engine)
    finally:
        await engine.close()


async def test_diff_names_exactly_the_regions_that_changed(tmp_path: Path) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        v = engine.volume("v")
        await v.write(0, pattern(6, 4 * REGION))
        await engine.snapshot_vv("v", "full")
        assert engine.diff_vv("full", "v") == []
        await v.write(REGION + 10, b"\x01" * 10)  # region 1
        await v.write(2 * REGION, b"\x02" * 10)  # region 2: one run with 1
        await v.write(6 * REGION, b"\x03" * 10)  # region 6: new
        await v.trim(3 * REGION, REGION)  # region 3: unmapped
        assert engine.diff_vv("full", "v") == [(REGION, 3 * REGION), (6 * REGION, REGION)]
        await engine.snapshot_vv("v", "incr")
        assert (
            engine.diff_vv("full", "incr")
            == engine.diff_vv("incr", "full")
            == [
                (REGION, 3 * REGION),
                (6 * REGION, REGION),
            ]
        )
        assert engine.diff_vv("incr", "v") == []
        # An incremental backup: the full image, then only the ranges the diff names, equals incr.
        image = bytearray(await read_all(engine, "full"))
        incr = await read_all(engine, "incr")
        for offset, length in engine.diff_vv("full", "incr"):
            image[offset : offset + length] = incr[offset : offset + length]
        assert bytes(image) == incr
        await engine.create_vv("w", pool="p", size=SIZE)
        with pytest.raises(InvalidArgument, match="do not share a snapshot tree"):
            engine.diff_vv("v", "w")
        with pytest.raises(NotFound):
            engine.diff_vv("v", "nope")
    finally:
        await engine.close()
