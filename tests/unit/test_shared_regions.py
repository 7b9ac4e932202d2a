"""Shared LD regions in the pool and the engine's load: a region several volumes map is held once
per mapping, kept (not zeroed) while any holds it, and zeroed when the last one lets go."""

from __future__ import annotations

from pathlib import Path

from tests.engine_helpers import CHUNKLET, REGION, STEP, make_engine, pattern, reopen
from tests.engine_machine import (
    assert_free_regions_hold_nothing,
    assert_space_map_matches_the_store,
)
from thinblock.metadata.check import check_space_map
from thinblock.pool.pool import REGION_BITS, REGION_MASK
from thinblock.volume.vv import VirtualVolume


async def test_a_shared_region_is_zeroed_only_when_its_last_reference_goes(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    try:
        await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
        await engine.create_vv("v", pool="p", size=4 * REGION)
        vv = engine.vvs["v"]
        assert isinstance(vv, VirtualVolume)
        await vv.write(0, pattern(1, REGION))
        packed = vv.map.get(0)
        pool = vv.pool
        pool.share(packed)  # as a snapshot mapping it would
        assert pool.refcount(packed) == 2
        assert not pool.release(packed), "released while another mapping holds it"
        slots = pool.slots[packed >> REGION_BITS]
        index = packed & REGION_MASK
        assert bytes(slots.ld.read(index * REGION, REGION)) == pattern(1, REGION), "zeroed under a mapping"
        assert pool.refcount(packed) == 1 and not slots.space.is_pending(index)
        # The check sees the reference the store does not hold: one region, one number each.
        refcounts = {ld: refs for ld, refs in pool.space.refcounts().items()}
        assert check_space_map(engine.store, refcounts) == []
        pool.share(packed)
        problems = check_space_map(engine.store, pool.space.refcounts())
        assert problems == [
            f"LD {packed >> REGION_BITS} region {index} has 2 reference(s) in the space map but"
            " 1 mapping(s) and reservation(s) in the store"
        ]
        pool.release(packed)
        await vv.trim(0, REGION)  # the last reference: zeroed, pending, then free
        assert slots.space.is_pending(index)
        assert bytes(slots.ld.read(index * REGION, REGION)) == bytes(REGION)
        await engine.flush_all()
        assert slots.space.is_free(index)
        assert_free_regions_hold_nothing(engine)
    finally:
        await engine.close()


async def test_shared_rows_load_as_references_and_survive_a_delete(tmp_path: Path) -> None:
    """A volume's map shared with a second volume of its tree (written to the store as a snapshot
    is) loads as two references per region; deleting one volume keeps the other's data."""
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=4 * REGION)
    await engine.volume("v").write(0, pattern(2, 3 * REGION))
    await engine.flush_all()
    v_row = engine.vvs["v"].row
    twin = type(v_row)(
        0, "twin", v_row.pool_id, v_row.size, None, None, None, None, v_row.cache_mode, 0.0,
        kind="snapshot", parent_id=v_row.id, family_id=v_row.id,
    )  # fmt: skip
    engine.store.add_vv_sharing(twin, v_row.id)
    engine = await reopen(engine)
    try:
        pool = engine.pools["p"]
        packed = engine.vvs["v"].map.get(1)
        assert engine.vvs["twin"].map.get(1) == packed
        assert pool.refcount(packed) == 2
        assert pool.used_regions == 3  # a shared region is used once
        assert_space_map_matches_the_store(engine)
        await engine.delete_vv("v")
        assert pool.refcount(packed) == 1
        assert bytes(await engine.volume("twin").read(0, 3 * REGION)) == pattern(2, 3 * REGION)
        assert_space_map_matches_the_store(engine)
        assert_free_regions_hold_nothing(engine)
        await engine.delete_vv("twin")
        assert pool.used_regions == 0
        assert_free_regions_hold_nothing(engine)
    finally:
        await engine.close()
