"""What the snapshot, revert and diff tests share: an engine with one RAID 1 volume ``v`` of
eight regions, a whole-volume read, and the soundness checks after each scenario (space map
against the store, free regions empty, the store check clean)."""

from __future__ import annotations

from pathlib import Path

from tests.engine_helpers import CHUNKLET, REGION, STEP, make_engine
from tests.engine_machine import (
    assert_free_regions_hold_nothing,
    assert_space_map_matches_the_store,
)
from thinblock.engine import Engine
from thinblock.metadata.check import check_store
from thinblock.model import CacheMode

SIZE = 8 * REGION


async def engine_with_volume(tmp_path: Path, mode: CacheMode = CacheMode.WRITETHROUGH) -> Engine:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=SIZE, cache_mode=mode)
    return engine


async def read_all(engine: Engine, name: str) -> bytes:
    return bytes(await engine.volume(name).read(0, SIZE))


def assert_sound(engine: Engine) -> None:
    assert_space_map_matches_the_store(engine)
    assert_free_regions_hold_nothing(engine)
    assert check_store(engine.store) == []
