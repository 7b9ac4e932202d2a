"""Releasing many LD regions at once (``Pool.release_many``, a delete's or a trim's batch):
adjacent regions whose last reference goes are zeroed in one run -- one ``LogicalDisk.zero``
call, one punch per member -- and every rule of a single release still holds: released regions
read zeros, are pending until the next fsync, regions another mapping holds keep their data,
and a run is never merged across a region another volume holds."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.engine_helpers import REGION, STEP, make_engine, pattern
from tests.engine_machine import assert_free_regions_hold_nothing, assert_space_map_matches_the_store
from thinblock.engine import Engine
from thinblock.errors import MediumError
from thinblock.logical.raid import LogicalDisk
from thinblock.physical.pd import PhysicalDisk
from thinblock.pool.pool import REGION_BITS, REGION_MASK, Pool
from thinblock.units import MiB
from thinblock.volume.vv import VirtualVolume

REGIONS = 48


class Calls:
    def __init__(self) -> None:
        self.zero: list[tuple[int, int, int]] = []  # (ld id, offset, length)
        self.punch = 0


@contextmanager
def counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    """Count every LD zeroing and PD punch (behaviour, not timing)."""
    calls = Calls()
    real_zero, real_punch = LogicalDisk.zero, PhysicalDisk.punch

    def zero(self: LogicalDisk, offset: int, length: int) -> None:
        calls.zero.append((self.id, offset, length))
        real_zero(self, offset, length)

    def punch(self: PhysicalDisk, offset: int, length: int) -> None:
        calls.punch += 1
        real_punch(self, offset, length)

    with monkeypatch.context() as m:
        m.setattr(LogicalDisk, "zero", zero)
        m.setattr(PhysicalDisk, "punch", punch)
        yield calls


async def engine_with_pool(tmp_path: Path, raid: int) -> Engine:
    engine = await make_engine(tmp_path, pd_size=8 * MiB, chunklet=1 * MiB)
    # One LD holds every region of these tests: runs are not cut at LD ends.
    await engine.create_pool("p", raid=raid, region_size=REGION, growth_increment=2 * MiB, step=STEP)
    return engine


def vv_of(engine: Engine, name: str) -> VirtualVolume:
    vv = engine.vvs[name]
    assert isinstance(vv, VirtualVolume)
    return vv


def runs_of(packed: list[int]) -> int:
    """How many runs of adjacent regions of one LD ``packed`` makes."""
    ordered = sorted(packed)
    return 1 + sum(1 for a, b in itertools.pairwise(ordered) if b != a + 1 or a >> 32 != b >> 32)


def reads_zeros(pool: Pool, packed: int) -> bool:
    ld = pool.slots[packed >> REGION_BITS].ld
    return not any(ld.read((packed & REGION_MASK) * REGION, REGION))


@pytest.mark.parametrize("raid", [1, 5])
async def test_a_delete_zeroes_adjacent_regions_in_runs_pending_until_the_flush(
    tmp_path: Path, raid: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await engine_with_pool(tmp_path, raid)
    try:
        await engine.create_vv("v", pool="p", size=REGIONS * REGION)
        await engine.volume("v").write(0, pattern(1, REGIONS * REGION))
        await engine.flush_all()
        vv = vv_of(engine, "v")
        pool = vv.pool
        held = [packed for _, packed in vv.map.items()]
        assert len(held) == REGIONS and runs_of(held) == 1, "the test wants adjacent regions of one LD"
        with counting(monkeypatch) as calls:
            await engine.delete_vv("v")
        # One zeroing for the run (was one per region: 48), a few punches per member and row.
        assert len(calls.zero) == 1, calls.zero
        assert calls.zero[0][2] == REGIONS * REGION
        members = 2 if raid == 1 else 4
        ld = pool.slots[held[0] >> REGION_BITS].ld
        rows = REGIONS * REGION // ld.row_usable + 1  # 1 MiB chunklets: a row holds 64 regions or more
        assert calls.punch <= members * rows < REGIONS
        for packed in held:
            space = pool.slots[packed >> REGION_BITS].space
            assert space.is_pending(packed & REGION_MASK), "free before the fsync made its zeros durable"
            assert reads_zeros(pool, packed)
        assert sorted(pool.pending) == sorted(held)
        taken = pool.try_allocate()
        assert taken is not None and taken not in held  # pending regions are not handed out
        pool.unreserve([taken])
        await engine.flush_all()
        for packed in held:
            assert pool.slots[packed >> REGION_BITS].space.is_free(packed & REGION_MASK)
        assert_free_regions_hold_nothing(engine)
    finally:
        await engine.close()


async def test_a_trim_zeroes_only_the_trimmed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = await engine_with_pool(tmp_path, 1)
    try:
        await engine.create_vv("v", pool="p", size=16 * REGION)
        data = pattern(2, 16 * REGION)
        await engine.volume("v").write(0, data)
        with counting(monkeypatch) as calls:
            await engine.volume("v").trim(4 * REGION, 8 * REGION)
        assert len(calls.zero) == 1 and calls.zero[0][2] == 8 * REGION
        read = bytes(await engine.volume("v").read(0, 16 * REGION))
        assert read == data[: 4 * REGION] + bytes(8 * REGION) + data[12 * REGION :]
        await engine.flush_all()
        assert_free_regions_hold_nothing(engine)
    finally:
        await engine.close()


async def test_runs_never_cross_a_region_another_volume_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two volumes written in turn hold every other region: a delete of one makes one run per
    region, and the other's data survives (no leak between volumes, no zeros under it)."""
    engine = await engine_with_pool(tmp_path, 1)
    try:
        for name in ("a", "b"):
            await engine.create_vv(name, pool="p", size=8 * REGION)
        for region in range(8):
            for seed, name in enumerate(("a", "b")):
                await engine.volume(name).write(region * REGION, pattern(10 + seed, REGION))
        a_held = [packed for _, packed in vv_of(engine, "a").map.items()]
        assert runs_of(a_held) == 8, "the test wants a's regions interleaved with b's"
        with counting(monkeypatch) as calls:
            await engine.delete_vv("a")
        assert sorted(offset for _, offset, _ in calls.zero) == sorted(
            (packed & REGION_MASK) * REGION for packed in a_held
        )
        assert all(length == REGION for _, _, length in calls.zero)
        assert bytes(await engine.volume("b").read(0, 8 * REGION)) == pattern(11, REGION) * 8
        await engine.flush_all()
        assert_free_regions_hold_nothing(engine)
    finally:
        await engine.close()


async def test_regions_a_snapshot_shares_keep_their_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delete a volume whose snapshot shares half its regions: only the regions the volume
    alone held (its copies on write) are zeroed; the snapshot reads what it did."""
    engine = await engine_with_pool(tmp_path, 1)
    try:
        await engine.create_vv("v", pool="p", size=8 * REGION)
        before = pattern(3, 8 * REGION)
        await engine.volume("v").write(0, before)
        await engine.snapshot_vv("v", "s")
        await engine.volume("v").write(0, pattern(4, 4 * REGION))  # copies on write: v's own
        vv = vv_of(engine, "v")
        pool = vv.pool
        own = [packed for region, packed in vv.map.items() if region < 4]
        shared = [packed for region, packed in vv.map.items() if region >= 4]
        assert all(pool.refcount(p) == 1 for p in own) and all(pool.refcount(p) == 2 for p in shared)
        with counting(monkeypatch) as calls:
            await engine.delete_vv("v")
        zeroed = {(offset // REGION, length // REGION) for _, offset, length in calls.zero}
        assert sum(count for _, count in zeroed) == len(own)
        assert all(reads_zeros(pool, p) for p in own)
        assert all(pool.refcount(p) == 1 for p in shared)
        assert bytes(await engine.volume("s").read(0, 8 * REGION)) == before
        assert_space_map_matches_the_store(engine)
        await engine.flush_all()
        assert_free_regions_hold_nothing(engine)
    finally:
        await engine.close()


async def test_a_run_whose_zeroing_fails_stays_held_the_others_are_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = await engine_with_pool(tmp_path, 1)
    try:
        await engine.create_vv("a", pool="p", size=4 * REGION)
        await engine.create_vv("b", pool="p", size=4 * REGION)
        for region in range(4):
            await engine.volume("a").write(region * REGION, pattern(5, REGION))
            await engine.volume("b").write(region * REGION, pattern(6, REGION))
        held = sorted(packed for _, packed in vv_of(engine, "a").map.items())
        pool = vv_of(engine, "a").pool
        bad = held[1]
        real_zero = LogicalDisk.zero

        def zero(self: LogicalDisk, offset: int, length: int) -> None:
            if offset == (bad & REGION_MASK) * REGION:
                raise MediumError("simulated: a member failed")
            real_zero(self, offset, length)

        monkeypatch.setattr(LogicalDisk, "zero", zero)
        with pytest.raises(MediumError, match="simulated"):
            # Directly (a's map still names them; the engine is thrown away after the test).
            pool.release_many(held)
        assert pool.refcount(bad) == 1, "a region that was not zeroed was given back"
        for packed in held:
            if packed != bad:
                assert pool.slots[packed >> REGION_BITS].space.is_pending(packed & REGION_MASK)
                assert reads_zeros(pool, packed)
    finally:
        monkeypatch.undo()
        await engine.close()
