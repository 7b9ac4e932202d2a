"""Dirty bitmaps (volume/bitmaps.py): which snapshots a volume offers, the runs a status gives for
any range (cut where the range cuts, whole regions elsewhere, the same regions as ``vv diff``), and
a bitmap bound to its snapshot across renames and deletes."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from tests.engine_helpers import REGION
from tests.unit.snapshot_support import SIZE, engine_with_volume
from thinblock.blockdev import BitmapVolume
from thinblock.errors import NotFound, VolumeGone
from thinblock.volume import bitmaps
from thinblock.volume.regionmap import CHUNK_LEN, RegionMap


async def test_a_volume_offers_the_other_snapshots_of_its_tree(tmp_path: Path) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        await engine.create_vv("other", pool="p", size=SIZE)
        await engine.snapshot_vv("other", "other-snap")  # another tree
        await engine.snapshot_vv("v", "a")
        await engine.snapshot_vv("v", "b")
        await engine.clone_vv("a", "c")  # a clone: not a fixed point, never offered
        volume = engine.volume("v")
        assert isinstance(volume, BitmapVolume) and volume.capabilities.dirty_bitmaps
        assert volume.dirty_bitmaps() == ["a", "b"]
        assert engine.volume("a").dirty_bitmaps() == ["b"]  # not itself  # type: ignore[attr-defined]
        assert engine.volume("c").dirty_bitmaps() == ["a", "b"]  # type: ignore[attr-defined]
        for name in ("c", "other-snap", "nosuch", "v"):
            with pytest.raises(NotFound):
                volume.dirty_bitmap(name)
    finally:
        await engine.close()


async def test_status_names_the_regions_vv_diff_names_for_any_range(tmp_path: Path) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        v = engine.volume("v")
        await v.write(0, b"\x01" * SIZE)
        await engine.snapshot_vv("v", "s1")
        await v.write(REGION + 100, b"\x02" * 10)  # region 1
        await v.write(4 * REGION, b"\x03" * (2 * REGION))  # regions 4, 5
        await v.trim(7 * REGION, REGION)  # region 7
        await engine.snapshot_vv("v", "s2")
        bitmap = engine.volume("s2").dirty_bitmap("s1")  # type: ignore[attr-defined]
        assert bitmap.name == "s1"
        whole = await bitmap.status(0, SIZE)
        assert whole == [
            (REGION, False),
            (REGION, True),
            (2 * REGION, False),
            (2 * REGION, True),
            (REGION, False),
            (REGION, True),
        ]
        dirty, pos = [], 0
        for length, is_dirty in whole:
            if is_dirty:
                dirty.append((pos, length))
            pos += length
        assert dirty == engine.diff_vv("s1", "s2")
        # Any range: the runs start at the offset, cover at most the length, and are cut only
        # where the range cuts.
        rng = random.Random(5)
        for _ in range(200):
            offset = rng.randrange(SIZE)
            length = rng.randrange(1, SIZE - offset + 1)
            runs = await bitmap.status(offset, length)
            assert sum(n for n, _ in runs) == length and all(n > 0 for n, _ in runs)
            pos = offset
            for n, is_dirty in runs:
                assert all(((p // REGION) in {1, 4, 5, 7}) == is_dirty for p in (pos, pos + n - 1))
                pos += n
            assert all(a[1] != b[1] for a, b in itertools.pairwise(runs))  # neighbours differ
        # The live volume against s2: nothing changed since.
        assert await engine.volume("v").dirty_bitmap("s2").status(0, SIZE) == [(SIZE, False)]  # type: ignore[attr-defined]
    finally:
        await engine.close()


async def test_a_bitmap_stays_bound_to_its_snapshot(tmp_path: Path) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        v = engine.volume("v")
        await v.write(0, b"\x01" * REGION)
        await engine.snapshot_vv("v", "s1")
        await engine.snapshot_vv("v", "s2")
        bitmap = v.dirty_bitmap("s1")  # type: ignore[attr-defined]
        await v.write(0, b"\x02" * REGION)
        await engine.rename_vv("s1", "renamed")
        await engine.rename_vv("s2", "s1")  # another snapshot takes the name: the bitmap does not follow
        assert (await bitmap.status(0, REGION)) == [(REGION, True)]
        await engine.delete_vv("renamed")
        with pytest.raises(VolumeGone, match="deleted"):
            await bitmap.status(0, REGION)
        other = v.dirty_bitmap("s1")  # type: ignore[attr-defined]
        await engine.delete_vv("v", force=True)
        with pytest.raises(VolumeGone):  # the volume itself gone
            await other.status(0, REGION)
    finally:
        await engine.close()


def test_differing_in_a_range_skips_chunks_and_cuts_the_ends() -> None:
    a, b = RegionMap(), RegionMap()
    for region in (3, CHUNK_LEN - 1, CHUNK_LEN, 5 * CHUNK_LEN + 7):
        b.set(region, 1000 + region)
    a.set(3, 1003)  # the same: not differing
    assert b.differing(a).tolist() == [CHUNK_LEN - 1, CHUNK_LEN, 5 * CHUNK_LEN + 7]
    assert b.differing(a, CHUNK_LEN - 1, CHUNK_LEN).tolist() == [CHUNK_LEN - 1]
    assert b.differing(a, CHUNK_LEN, 5 * CHUNK_LEN + 7).tolist() == [CHUNK_LEN]
    assert a.differing(b, 4, 5 * CHUNK_LEN + 8).tolist() == [CHUNK_LEN - 1, CHUNK_LEN, 5 * CHUNK_LEN + 7]


async def test_runs_are_capped_and_the_caller_asks_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await engine_with_volume(tmp_path)
    try:
        v = engine.volume("v")
        await engine.snapshot_vv("v", "s1")
        for region in range(0, 8, 2):  # every other region dirty: 8 runs
            await v.write(region * REGION, b"\x05" * REGION)
        monkeypatch.setattr(bitmaps, "MAX_RUNS", 3)
        runs = await v.dirty_bitmap("s1").status(0, SIZE)  # type: ignore[attr-defined]
        # Fewer than asked ("the server MAY return less data than requested"), from the offset on.
        assert runs == [(REGION, True), (REGION, False), (REGION, True)]
        assert await v.dirty_bitmap("s1").status(3 * REGION, SIZE - 3 * REGION) == [  # type: ignore[attr-defined]
            (REGION, False),
            (REGION, True),
            (REGION, False),
        ]
    finally:
        await engine.close()
