"""Large write-back writes go around the cache (VirtualVolume._write_region): straight to the LD
through the I/O threads, as write-through writes do, when the region holds no dirty data, no
partner holds copies and the PDs are not opened for direct I/O; everything else is cached."""

from __future__ import annotations

from pathlib import Path

from tests.engine_helpers import make_engine, pattern, reopen
from thinblock.engine import Engine, EngineOptions
from thinblock.model import CacheMode
from thinblock.pool.pool import REGION_BITS, REGION_MASK
from thinblock.units import KiB, MiB

REGION = 64 * KiB
LARGE = 32 * KiB  # >= offload_min below
SMALL = 4 * KiB


def options(**extra: object) -> EngineOptions:
    # destage_delay: whatever is cached stays dirty for the test's duration.
    return EngineOptions(
        allow_tiny_chunklets=True,
        destage_delay=3600.0,
        offload_min_bytes=16 * KiB,
        pd_check_interval=0,
        **extra,
    )  # type: ignore[arg-type]


async def writeback_volume(tmp_path: Path, **extra: object) -> Engine:
    engine = await make_engine(
        tmp_path / "data", pds=2, pd_size=8 * MiB, chunklet=MiB, options=options(**extra)
    )
    await engine.create_pool("p", raid=1, set_size=2, region_size=REGION)
    await engine.create_vv("v", pool="p", size=4 * MiB, cache_mode=CacheMode.WRITEBACK)
    return engine


def ld_bytes(engine: Engine, offset: int, length: int) -> bytes:
    """What the LD holds under volume offset ``offset`` (no cache laid over it)."""
    vv = engine.vvs["v"]
    packed = vv.map.get(offset // REGION)
    ld = engine.lds[packed >> REGION_BITS]
    return bytes(ld.read((packed & REGION_MASK) * REGION + offset % REGION, length))


async def test_a_large_write_lands_on_the_ld_not_in_the_cache(tmp_path: Path) -> None:
    engine = await writeback_volume(tmp_path)
    try:
        volume = engine.volume("v")
        await volume.write(0, pattern(1, LARGE))
        assert engine.cache.dirty_bytes == 0
        assert ld_bytes(engine, 0, LARGE) == pattern(1, LARGE)
        # A small write is cached as before.
        await volume.write(REGION, pattern(2, SMALL))
        assert engine.cache.dirty_bytes == SMALL
        assert ld_bytes(engine, REGION, SMALL) != pattern(2, SMALL)
        assert bytes(await volume.read(REGION, SMALL)) == pattern(2, SMALL)
        # A large write into that region (dirty data there, which it must not overtake): cached.
        await volume.write(REGION, pattern(3, LARGE))
        assert engine.cache.dirty_bytes == SMALL + LARGE
        assert bytes(await volume.read(REGION, LARGE)) == pattern(3, LARGE)
        await volume.flush()  # everything durable, the bypassed write included
        assert engine.cache.dirty_bytes == 0
        engine = await reopen(engine, options())
        volume = engine.volume("v")
        assert bytes(await volume.read(0, LARGE)) == pattern(1, LARGE)
        assert bytes(await volume.read(REGION, LARGE)) == pattern(3, LARGE)
    finally:
        await engine.close()


async def test_with_direct_io_pds_large_writes_are_cached(tmp_path: Path) -> None:
    engine = await writeback_volume(tmp_path, pd_direct_io=True)
    try:
        await engine.volume("v").write(0, pattern(4, LARGE))
        assert engine.cache.dirty_bytes == LARGE  # the cache is what makes write-back fast there
        assert bytes(await engine.volume("v").read(0, LARGE)) == pattern(4, LARGE)
    finally:
        await engine.close()
