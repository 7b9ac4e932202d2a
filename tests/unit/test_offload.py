"""Large write-through writes handed to the I/O threads (physical/workers.py).

The threads are gated here: a job waits for the test to open the gate, so a write is
held "in flight" while the test trims its region, fails a mirror, starts a rebuild or
closes the engine -- the races the offload must survive without a byte landing in a
region another VV may get, or mirrors left different."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.engine_helpers import CHUNKLET, REGION, STEP, make_engine, pattern, reopen
from tests.engine_machine import assert_free_regions_hold_nothing, assert_mirrors_agree
from thinblock.engine import Engine, EngineOptions
from thinblock.errors import MediumError
from thinblock.model import LDHealth
from thinblock.pool.pool import REGION_BITS, REGION_MASK
from thinblock.units import KiB, MiB
from thinblock.volume.vv import VirtualVolume

OPTIONS = EngineOptions(allow_tiny_chunklets=True, destage_delay=0.001, offload_min_bytes=8 * KiB)


class Gate:
    """Wraps ``engine.io.submit``: counts jobs; each job waits until the gate is open."""

    def __init__(self, engine: Engine) -> None:
        assert engine.io is not None
        self._submit: Callable[..., asyncio.Future[Any]] = engine.io.submit
        self.opened = threading.Event()
        self.opened.set()
        self.jobs = 0
        engine.io.submit = self  # type: ignore[method-assign]

    def __call__(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        self.jobs += 1

        def held() -> Any:
            assert self.opened.wait(30), "the test never opened the gate"
            return fn(*args)

        return self._submit(held)

    def close(self) -> None:
        self.opened.clear()

    def open(self) -> None:
        self.opened.set()


async def engine_with_pool(tmp_path: Path, raid: int, pds: int = 4) -> tuple[Engine, VirtualVolume]:
    engine = await make_engine(tmp_path, pds=pds, pd_size=2 * MiB, options=OPTIONS)
    await engine.create_pool(
        "p", raid=raid, set_size=2, region_size=REGION, growth_increment=CHUNKLET, step=STEP
    )
    await engine.create_vv("a", pool="p", size=256 * KiB)
    return engine, engine.vvs["a"]


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def held_write(vv: VirtualVolume, offset: int, data: bytes) -> asyncio.Task[None]:
    return asyncio.ensure_future(vv.write(offset, data))


@pytest.mark.parametrize("raid", [0, 1])
async def test_large_writes_go_to_the_threads_small_ones_stay_inline(tmp_path: Path, raid: int) -> None:
    engine, vv = await engine_with_pool(tmp_path, raid)
    gate = Gate(engine)
    await vv.write(0, pattern(1, REGION))  # assigns region 0; the write itself is offloaded
    jobs = gate.jobs
    assert jobs == 2  # RAID 1: one per mirror; RAID 0: one per column (16 KiB over 4 KiB units)
    await vv.write(REGION, pattern(2, 4 * KiB))  # below offload_min: inline
    assert gate.jobs == jobs
    await vv.write(REGION + 4 * KiB, pattern(3, 8 * KiB))
    assert gate.jobs > jobs
    assert bytes(await vv.read(0, REGION)) == pattern(1, REGION)
    assert bytes(await vv.read(REGION, 12 * KiB)) == pattern(2, 4 * KiB) + pattern(3, 8 * KiB)
    assert_mirrors_agree(engine)
    await engine.close()
    engine = await reopen(engine, OPTIONS)
    assert bytes(await engine.volume("a").read(0, REGION)) == pattern(1, REGION)
    await engine.close()


@pytest.mark.parametrize("how", ["trim", "delete"])
async def test_a_region_goes_back_to_the_pool_only_after_its_offloaded_write_lands(
    tmp_path: Path, how: str
) -> None:
    engine, vv = await engine_with_pool(tmp_path, raid=0)
    await vv.write(0, pattern(1, REGION))
    packed = vv.map.get(0)
    slots = vv.pool.slots[packed >> REGION_BITS]
    index = packed & REGION_MASK
    gate = Gate(engine)
    gate.close()
    write = held_write(vv, 0, pattern(2, REGION))
    await turns()
    assert not write.done()
    if how == "trim":
        await vv.trim(0, REGION)
        assert bytes(await vv.read(0, REGION)) == bytes(REGION)
    else:
        await engine.delete_vv("a")
    # Unmapped, but not free: a late write is still on its way into it.
    assert slots.space.refcount(index) == 1
    # Another VV gets other regions meanwhile, never this one (4 KiB writes: inline, past the gate).
    await engine.create_vv("b", pool="p", size=128 * KiB)
    b = engine.vvs["b"]
    for r in range(6):
        await b.write(r * REGION, pattern(10 + r, 4 * KiB))
        assert b.map.get(r) != packed
    await engine.flush_all()  # frees what is pending: still not this region
    assert slots.space.refcount(index) == 1
    assert not write.done()
    gate.open()
    await write
    # Landed, then released: zeroed, and free after the next fsync.
    assert slots.space.is_pending(index)
    assert bytes(slots.ld.read(index * REGION, REGION)) == bytes(REGION)
    await engine.flush_all()
    assert slots.space.is_free(index)
    assert_free_regions_hold_nothing(engine)
    await engine.close()


async def test_a_rebuild_waits_for_offloaded_mirror_writes(tmp_path: Path) -> None:
    engine, vv = await engine_with_pool(tmp_path, raid=1, pds=3)
    await vv.write(0, pattern(1, REGION))
    ld = engine.lds[vv.map.get(0) >> REGION_BITS]
    victim = ld.rows[0][1].pd
    gate = Gate(engine)
    gate.close()
    write = held_write(vv, 0, pattern(2, REGION))
    await turns()
    assert ld.offloaded == 1
    await engine.fail_pd(victim.id)
    rebuild = asyncio.ensure_future(engine.rebuild())
    await turns(20)
    # It must not copy the row while the survivor's copy may still change.
    assert not rebuild.done()
    assert not ld._rebuilds
    gate.open()
    await write  # the failed mirror's job failed, the survivor's landed: the write stands
    await rebuild
    assert ld.health == LDHealth.NORMAL
    assert victim not in [ch.pd for ch in ld.rows[0]]
    assert_mirrors_agree(engine)
    assert bytes(await vv.read(0, REGION)) == pattern(2, REGION)
    await engine.close()


async def test_raid1_write_stands_when_one_mirror_fails_under_it(tmp_path: Path) -> None:
    engine, vv = await engine_with_pool(tmp_path, raid=1)
    await vv.write(0, pattern(1, REGION))
    ld = engine.lds[vv.map.get(0) >> REGION_BITS]
    failing = ld.rows[0][0].pd
    failing.inject_errors(True)
    await vv.write(0, pattern(2, REGION))
    assert failing.failed
    assert bytes(await vv.read(0, REGION)) == pattern(2, REGION)
    await engine.close()


async def test_raid0_write_fails_when_its_pd_fails(tmp_path: Path) -> None:
    engine, vv = await engine_with_pool(tmp_path, raid=0)
    await vv.write(0, pattern(1, REGION))
    ld = engine.lds[vv.map.get(0) >> REGION_BITS]
    ld.rows[0][1].pd.inject_errors(True)
    with pytest.raises(MediumError):
        await vv.write(0, pattern(2, REGION))
    await engine.close()


async def test_close_waits_for_writes_still_with_the_threads(tmp_path: Path) -> None:
    engine, vv = await engine_with_pool(tmp_path, raid=1)
    await vv.write(0, pattern(1, REGION))
    gate = Gate(engine)
    gate.close()
    write = held_write(vv, 0, pattern(2, REGION))
    await turns()
    closing = asyncio.ensure_future(engine.close())
    await turns(20)
    assert not closing.done()
    gate.open()
    await write
    await closing
    engine = await reopen(engine, OPTIONS)
    assert bytes(await engine.volume("a").read(0, REGION)) == pattern(2, REGION)
    await engine.close()


async def test_no_io_threads_means_every_write_inline(tmp_path: Path) -> None:
    options = EngineOptions(allow_tiny_chunklets=True, io_threads=0, offload_min_bytes=512)
    engine = await make_engine(tmp_path, pds=2, pd_size=2 * MiB, options=options)
    await engine.create_pool(
        "p", raid=1, set_size=2, region_size=REGION, growth_increment=CHUNKLET, step=STEP
    )
    await engine.create_vv("a", pool="p", size=64 * KiB)
    assert engine.io is None
    await engine.volume("a").write(0, pattern(1, REGION))
    assert bytes(await engine.volume("a").read(0, REGION)) == pattern(1, REGION)
    assert_mirrors_agree(engine)
    await engine.close()
