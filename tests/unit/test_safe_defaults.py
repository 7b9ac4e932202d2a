"""Safe defaults (issue 16): a volume in use is not deleted by accident, and a forced delete never
lets its clients read zeros; a refused write takes no space; contradictory settings are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine_helpers import CHUNKLET, REGION, STEP, make_engine, pattern
from thinblock.errors import Conflict, InvalidArgument, OutOfSpace, VolumeGone
from thinblock.model import AlertKind
from thinblock.units import KiB, Limit, MiB


async def test_delete_of_a_volume_in_use_is_refused_and_forcing_it_fails_the_clients_io(
    tmp_path: Path,
) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=1 * MiB)
    vol = engine.volume("v")
    data = pattern(3, 2 * REGION)
    await vol.write(0, data)
    disconnected: list[str] = []
    engine.sessions.open("NBD", "v", "127.0.0.1:40312", lambda: disconnected.append("a"))

    with pytest.raises(Conflict) as refused:
        await engine.delete_vv("v")
    assert str(refused.value) == (
        "volume 'v' is in use by 1 NBD client from 127.0.0.1:40312; disconnect it or use --force"
    )
    assert bytes(await vol.read(0, len(data))) == data  # nothing changed
    assert disconnected == []

    second = engine.sessions.open("NBD", "v", "unix", lambda: disconnected.append("b"))
    with pytest.raises(Conflict, match=r"2 NBD clients from 127.0.0.1:40312, unix; disconnect them"):
        await engine.delete_vv("v")
    engine.sessions.close(second)

    await engine.delete_vv("v", force=True)
    assert disconnected == ["a"]
    # A request that still reaches the volume fails: never the zeros its released regions read.
    for call in (
        vol.read(0, REGION),
        vol.read_extents(0, REGION),
        vol.write(0, data),
        vol.trim(0, REGION),
        vol.write_zeroes(0, REGION),
        vol.flush(),
        vol.block_status(0, REGION),
    ):
        with pytest.raises(VolumeGone, match="volume 'v' was deleted"):
            await call
    assert engine.get_pool("p").used == 0
    await engine.close()


async def test_a_write_refused_at_the_volume_limit_takes_no_region(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=4 * CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=1 * MiB, alloc_limit=Limit(bytes=4 * REGION))
    vol = engine.volume("v")
    await vol.write(0, pattern(1, 2 * REGION))
    # Four new regions where two are left: refused whole, the two left are still free.
    with pytest.raises(OutOfSpace, match="none was taken"):
        await vol.write(8 * REGION, pattern(2, 4 * REGION))
    assert engine.get_vv("v").regions_allocated == 2
    assert engine.get_pool("p").used == 2 * REGION
    assert AlertKind.VV_ALLOCATION_LIMIT.value in [a.kind.value for a in engine.list_alerts()]
    # What fits still goes in, exactly the headroom left; zeros inside a write need no region.
    await vol.write(8 * REGION, pattern(3, REGION) + bytes(REGION) + pattern(5, REGION))
    assert engine.get_vv("v").regions_allocated == 4
    assert bytes(await vol.read(9 * REGION, REGION)) == bytes(REGION)
    await engine.close()


async def test_a_write_refused_at_the_pool_growth_limit_takes_no_region(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    # RAID 0 over 2 PDs: an LD of one row is 2 chunklets = 8 regions; the limit allows two LDs.
    await engine.create_pool(
        "p",
        raid=0,
        set_size=2,
        region_size=REGION,
        growth_increment=2 * CHUNKLET,
        growth_limit=4 * CHUNKLET,
        step=STEP,
    )
    await engine.create_vv("v", pool="p", size=1 * MiB)
    vol = engine.volume("v")
    await vol.write(0, pattern(1, 10 * REGION))
    assert engine.get_pool("p").used == 10 * REGION
    with pytest.raises(OutOfSpace, match="none was taken"):
        await vol.write(20 * REGION, pattern(2, 8 * REGION))  # 8 new regions, 6 left
    pool = engine.get_pool("p")
    assert (pool.used, pool.capacity) == (10 * REGION, 16 * REGION)
    assert engine.get_vv("v").regions_allocated == 10
    await vol.write(20 * REGION, pattern(3, 6 * REGION))  # the 6 left are all there
    assert engine.get_pool("p").used == 16 * REGION
    await engine.close()


async def test_contradictory_pool_settings_are_refused_with_one_line(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    cases = [
        ({"growth_warning": 2 * MiB, "growth_limit": 1 * MiB}, "growth warning 2 MiB is above the growth limit 1 MiB"),
        ({"growth_increment": 2 * MiB, "growth_limit": 1 * MiB}, "growth limit 1 MiB is below the growth increment 2 MiB"),
    ]  # fmt: skip
    for settings, message in cases:
        with pytest.raises(InvalidArgument) as refused:
            await engine.create_pool("p", raid=0, region_size=REGION, step=STEP, **settings)  # type: ignore[arg-type]
        assert message in str(refused.value) and "\n" not in str(refused.value)
    assert engine.list_pools() == []

    await engine.create_pool("p", raid=0, region_size=REGION, growth_increment=2 * CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=1 * MiB)
    await engine.volume("v").write(0, pattern(1, 10 * REGION))  # two LDs: 256 KiB
    with pytest.raises(
        InvalidArgument, match="growth limit 128 KiB is below the pool's current size 256 KiB"
    ):
        await engine.set_pool("p", growth_limit=128 * KiB)
    with pytest.raises(InvalidArgument, match="growth warning 512 KiB is above the growth limit 384 KiB"):
        await engine.set_pool("p", growth_warning=512 * KiB, growth_limit=384 * KiB)
    assert engine.get_pool("p").growth_limit is None  # nothing changed
    await engine.set_pool("p", growth_limit=384 * KiB)
    await engine.close()


async def test_contradictory_volume_limits_are_refused_but_overcommit_is_not(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool(
        "p", raid=1, region_size=REGION, growth_increment=CHUNKLET, growth_limit=CHUNKLET, step=STEP
    )
    with pytest.raises(
        InvalidArgument, match=r"allocation warning 50% \(512 KiB\) is above the allocation limit 64 KiB"
    ):
        await engine.create_vv(
            "v", pool="p", size=1 * MiB, alloc_warning=Limit(percent=50), alloc_limit=Limit(bytes=64 * KiB)
        )
    with pytest.raises(InvalidArgument, match="allocation limit 1 KiB is smaller than one region"):
        await engine.create_vv("v", pool="p", size=1 * MiB, alloc_limit=Limit(bytes=KiB))
    assert engine.list_vvs() == []
    # Far larger than the pool could ever grow to: thin provisioning, allowed.
    await engine.create_vv("v", pool="p", size=1024 * MiB, alloc_warning=Limit(percent=50))
    with pytest.raises(InvalidArgument, match="above the allocation limit"):
        await engine.set_vv("v", alloc_limit=Limit(bytes=MiB))
    assert engine.get_vv("v").alloc_limit is None
    await engine.close()
