"""Snapshot space, watched and capped (volume/snapspace.py): what it counts (the regions only a
volume's snapshots hold: what deleting them all frees), its warning and limit alerts (once per
crossing, cleared when back under), and the limit's two policies: ``fail`` (ENOSPC, nothing
changed) and ``invalidate-oldest`` (the oldest snapshot deleted and named, the write goes on)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.engine_helpers import REGION, pattern, reopen
from tests.unit.snapshot_support import SIZE, assert_sound, engine_with_volume, read_all
from thinblock.engine import Engine
from thinblock.errors import InvalidArgument, OutOfSpace
from thinblock.model import AlertKind, AlertState
from thinblock.units import Limit


def space(engine: Engine, name: str = "v") -> int:
    return engine.get_vv(name).snapshot_space // REGION


def open_alerts(engine: Engine, kind: AlertKind) -> list[str]:
    return [a.message for a in engine.list_alerts() if a.kind == kind and a.state != AlertState.CLEARED]


async def test_snapshot_space_is_what_deleting_the_snapshots_frees(tmp_path: Path) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        v = engine.volume("v")
        await v.write(0, pattern(1, 4 * REGION))  # regions 0..3
        await engine.snapshot_vv("v", "s1")
        assert space(engine) == 0  # a snapshot costs nothing until the volume writes
        await v.write(0, b"\x01" * 512)  # region 0 copied: its old region is s1's alone
        assert space(engine) == 1
        await engine.snapshot_vv("v", "s2")
        await v.write(0, b"\x02" * 512)  # again: the region s2 holds is s2's alone
        await v.write(REGION, b"\x03" * 512)  # region 1, held by s1 and s2: theirs
        assert space(engine) == 3
        await v.trim(2 * REGION, REGION)  # region 2 let go of: the snapshots' alone
        assert space(engine) == 4
        # A clone of s2 maps its regions too: those are no longer the snapshots' alone.
        await engine.clone_vv("s2", "c")
        assert space(engine) == 1  # only s1's first copy of region 0 (s2 and c share the rest)
        assert space(engine, "c") == 0 and engine.get_vv("s1").snapshot_space == 0
        await engine.delete_vv("c")
        assert space(engine) == 4
        assert_sound(engine)
        engine = await reopen(engine)  # counted again from the rows: the same
        assert space(engine) == 4
        assert_sound(engine)
        # The definition: deleting every snapshot frees exactly that.
        used = engine.get_pool("p").used
        await engine.delete_vv("s1")
        await engine.delete_vv("s2")
        assert engine.get_pool("p").used == used - 4 * REGION
        assert space(engine) == 0
        assert_sound(engine)
    finally:
        await engine.close()


async def test_a_snapshot_of_a_deleted_volume_is_nobodys_snapshot_space(tmp_path: Path) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        v = engine.volume("v")
        await v.write(0, pattern(2, 2 * REGION))
        await engine.snapshot_vv("v", "s")
        await v.write(0, b"\x01" * 512)
        assert space(engine) == 1
        await engine.delete_vv("v")
        assert_sound(engine)
        await engine.create_vv("w", pool="p", size=SIZE)  # may get v's id back (SQLite): nothing of s's
        assert space(engine, "w") == 0
        assert_sound(engine)
    finally:
        await engine.close()


async def test_the_warning_and_the_limit_are_raised_once_and_cleared_when_back_under(
    tmp_path: Path,
) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        await engine.set_vv("v", snapshot_warning=Limit(bytes=2 * REGION), snapshot_limit=Limit(percent=50))
        assert engine.get_vv("v").snapshot_limit == SIZE // 2  # 4 regions
        v = engine.volume("v")
        await v.write(0, pattern(3, SIZE))
        await engine.snapshot_vv("v", "s")
        await v.write(0, b"\x01" * 512)
        assert open_alerts(engine, AlertKind.VV_SNAPSHOT_SPACE_WARNING) == []
        await v.write(REGION, b"\x01" * 512)
        [warning] = open_alerts(engine, AlertKind.VV_SNAPSHOT_SPACE_WARNING)
        assert (
            "VV 'v' has 32 KiB held only by its snapshots, at or past its snapshot space warning of 32 KiB"
            in warning
        )
        await v.write(2 * REGION, b"\x01" * 512)
        await v.write(2 * REGION + 512, b"\x01" * 512)  # the same region: no copy, no change
        assert len(open_alerts(engine, AlertKind.VV_SNAPSHOT_SPACE_WARNING)) == 1  # once per crossing
        assert open_alerts(engine, AlertKind.VV_SNAPSHOT_SPACE_LIMIT) == []
        await v.write(3 * REGION, b"\x01" * 512)  # 4 regions: the next one would pass 50%
        [limit] = open_alerts(engine, AlertKind.VV_SNAPSHOT_SPACE_LIMIT)
        assert (
            "reached its snapshot space limit of 50%" in limit and "the next copy on write will fail" in limit
        )
        await engine.delete_vv("s")  # back under both
        assert open_alerts(engine, AlertKind.VV_SNAPSHOT_SPACE_WARNING) == []
        assert open_alerts(engine, AlertKind.VV_SNAPSHOT_SPACE_LIMIT) == []
        assert_sound(engine)
    finally:
        await engine.close()


async def test_at_the_limit_the_fail_policy_refuses_the_write_and_keeps_the_snapshots(tmp_path: Path) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        await engine.set_vv("v", snapshot_limit=Limit(bytes=2 * REGION))
        v = engine.volume("v")
        await v.write(0, pattern(4, 4 * REGION))
        await engine.snapshot_vv("v", "s")
        snap_image = await read_all(engine, "s")
        await v.write(0, b"\x01" * 512)
        await v.write(REGION, b"\x01" * 512)
        before = await read_all(engine, "v")
        with pytest.raises(OutOfSpace, match="reached its snapshot space limit of 32 KiB") as refused:
            await v.write(2 * REGION, b"\x02" * 512)
        assert refused.value.reason == "vv-snapshot-space-limit"
        assert "delete a snapshot or raise the limit" in str(refused.value)
        assert await read_all(engine, "v") == before and await read_all(engine, "s") == snap_image
        assert space(engine) == 2
        # Writes that need no snapshot space go on: into regions it copied, into new regions.
        await v.write(0, b"\x03" * 512)
        await v.write(6 * REGION, b"\x04" * 512)
        # Raised, the same write succeeds.
        await engine.set_vv("v", snapshot_limit=Limit(bytes=3 * REGION))
        await v.write(2 * REGION, b"\x02" * 512)
        assert space(engine) == 3 and await read_all(engine, "s") == snap_image
        assert_sound(engine)
    finally:
        await engine.close()


async def test_the_fail_policy_refuses_a_write_of_several_regions_whole(tmp_path: Path) -> None:
    """All or none, as the allocation limit: a write whose copies on write would pass the limit
    changes none of its regions (refused half-way, it would have changed the first ones)."""
    engine = await engine_with_volume(tmp_path)
    try:
        await engine.set_vv("v", snapshot_limit=Limit(bytes=2 * REGION))
        v = engine.volume("v")
        await v.write(0, pattern(7, 4 * REGION))
        await engine.snapshot_vv("v", "s")
        before = await read_all(engine, "v")
        with pytest.raises(OutOfSpace, match="the write needs 3 copies on write; none was made"):
            await v.write(REGION // 2, b"\x09" * (2 * REGION + 512))  # regions 0, 1 and 2
        assert await read_all(engine, "v") == before and space(engine) == 0
        await v.write(REGION // 2, b"\x09" * REGION)  # two copies: room for them
        assert space(engine) == 2
        assert_sound(engine)
    finally:
        await engine.close()


async def test_at_the_limit_invalidate_oldest_deletes_the_oldest_snapshot_and_names_it(
    tmp_path: Path,
) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        await engine.set_vv(
            "v", snapshot_limit=Limit(bytes=2 * REGION), snapshot_limit_policy="invalidate-oldest"
        )
        v = engine.volume("v")
        await v.write(0, pattern(5, 4 * REGION))
        await engine.snapshot_vv("v", "monday")
        await v.write(0, b"\x01" * 512)
        await v.write(REGION, b"\x01" * 512)  # monday holds 2 regions alone: at the limit
        await engine.snapshot_vv("v", "tuesday")
        tuesday = await read_all(engine, "tuesday")
        await v.write(2 * REGION, b"\x02" * 512)  # would be a third: monday goes
        assert "monday" not in {i.name for i in engine.list_vvs()}
        [event] = [a for a in engine.list_alerts() if a.kind == AlertKind.VV_SNAPSHOT_INVALIDATED]
        assert event.object == "vv:v" and "its oldest snapshot 'monday' was deleted" in event.message
        assert await read_all(engine, "tuesday") == tuesday
        assert bytes(await v.read(2 * REGION, 512)) == b"\x02" * 512
        assert space(engine) == 1  # tuesday's copy of region 2
        assert_sound(engine)
        # A write whose region no snapshot holds any more after the invalidation goes in place.
        await engine.set_vv("v", snapshot_limit=Limit(bytes=REGION))
        await v.write(3 * REGION, b"\x05" * 512)  # tuesday (the only one) goes; no copy needed
        assert [i.name for i in engine.list_vvs()] == ["v"] and space(engine) == 0
        assert_sound(engine)
    finally:
        await engine.close()


async def test_a_snapshot_taken_while_a_write_invalidates_does_not_deadlock(tmp_path: Path) -> None:
    """The policy takes the snapshot lock from inside a write; a snapshot of the same volume holds
    its writes: it takes them first and the lock second, so neither waits for the other."""
    engine = await engine_with_volume(tmp_path)
    try:
        await engine.set_vv(
            "v", snapshot_limit=Limit(bytes=REGION), snapshot_limit_policy="invalidate-oldest"
        )
        v = engine.volume("v")
        await v.write(0, pattern(6, 4 * REGION))
        await engine.snapshot_vv("v", "a")
        await v.write(0, b"\x01" * 512)  # a holds one region alone: at the limit
        writes = [v.write(r * REGION, bytes([r]) * 512) for r in (1, 2, 3)]
        await asyncio.wait_for(asyncio.gather(*writes, engine.snapshot_vv("v", "b")), timeout=30)
        assert "a" not in {i.name for i in engine.list_vvs()}
        assert space(engine) <= 1
        assert_sound(engine)
    finally:
        await engine.close()


async def test_bad_settings_are_refused_and_change_nothing(tmp_path: Path) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        await engine.snapshot_vv("v", "s")
        before = engine.get_vv("v")
        with pytest.raises(
            InvalidArgument, match="snapshot space warning 8 KiB is above the snapshot space limit"
        ):
            await engine.set_vv("v", snapshot_warning=Limit(bytes=8192), snapshot_limit=Limit(bytes=4096))
        with pytest.raises(InvalidArgument, match="snapshot limit policy must be fail or invalidate-oldest"):
            await engine.set_vv("v", snapshot_limit_policy="drop-all")
        with pytest.raises(InvalidArgument, match="'s' is a snapshot: snapshot space is a volume's"):
            await engine.set_vv("s", snapshot_limit=Limit(percent=10))
        assert engine.get_vv("v") == before
        await engine.create_vv(
            "w",
            pool="p",
            size=SIZE,
            snapshot_limit=Limit(percent=25),
            snapshot_limit_policy="invalidate-oldest",
        )
        w = engine.get_vv("w")
        assert (w.snapshot_limit, w.snapshot_limit_spec, w.snapshot_limit_policy) == (
            SIZE // 4,
            "25%",
            "invalidate-oldest",
        )
        engine = await reopen(engine)
        assert engine.get_vv("w").snapshot_limit_policy == "invalidate-oldest"
    finally:
        await engine.close()
