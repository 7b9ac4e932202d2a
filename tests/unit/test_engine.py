"""The engine through its public API: zero LD, assignment, queueing, limits, alerts, reclaim."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import tracemalloc
from pathlib import Path

import pytest

from tests.engine_helpers import CHUNKLET, REGION, STEP, make_engine, pattern, reopen
from thinblock.engine import Engine, EngineOptions
from thinblock.errors import AlreadyExists, Conflict, InvalidArgument, MetadataCorrupt, NotFound, OutOfSpace
from thinblock.metadata import mapcheck
from thinblock.model import AlertKind, AlertState, CacheMode
from thinblock.units import KiB, Limit, MiB, TiB


def kinds(engine: Engine, include_cleared: bool = True) -> list[str]:
    return [a.kind.value for a in engine.list_alerts(include_cleared)]


async def test_new_volume_reads_zeros_without_any_storage(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=10 * MiB)
    vol = engine.volume("v")
    assert bytes(await vol.read(0, 10 * MiB)) == bytes(10 * MiB)
    assert bytes(await vol.read(REGION - 5, 10)) == bytes(10)
    # claim 10: reading the zero LD created nothing and assigned nothing
    assert engine.list_lds() == []
    assert engine.get_vv("v").regions_allocated == 0
    assert await vol.block_status(0, 10 * MiB) == [
        type((await vol.block_status(0, 1))[0])(10 * MiB, (await vol.block_status(0, 1))[0].flags)
    ]
    await engine.close()


async def test_first_write_assigns_and_creates_an_ld(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=10 * MiB)
    vol = engine.volume("v")
    data = pattern(1, 3 * REGION)
    await vol.write(REGION // 2, data)  # spans 4 regions
    assert engine.get_vv("v").regions_allocated == 4
    assert len(engine.list_lds()) == 1
    assert engine.list_lds()[0].regions_used == 4
    assert bytes(await vol.read(REGION // 2, len(data))) == data
    assert bytes(await vol.read(0, REGION // 2)) == bytes(REGION // 2)
    assert AlertKind.LD_CREATED.value in kinds(engine)
    # block status: allocated where written, holes elsewhere
    extents = await vol.block_status(0, 10 * MiB)
    assert [(e.length, int(e.flags)) for e in extents] == [(4 * REGION, 0), (10 * MiB - 4 * REGION, 3)]
    await engine.close()


async def test_zero_detect_assigns_nothing(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=0, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=1 * MiB)
    vol = engine.volume("v")
    await vol.write(0, bytes(3 * REGION))
    await vol.write(REGION, memoryview(bytearray(100)))
    assert engine.get_vv("v").regions_allocated == 0
    assert engine.list_lds() == []
    await engine.close()


async def test_concurrent_writes_to_a_region_being_assigned_wait_for_one_assignment(tmp_path: Path) -> None:
    """Claim 8: a deliberately slow LD creation; many writers to one region assign it once."""
    engine = await make_engine(tmp_path)
    await engine.create_pool(
        "p", raid=5, set_size=3, region_size=REGION, growth_increment=2 * CHUNKLET, step=STEP
    )
    await engine.create_vv("v", pool="p", size=4 * MiB)
    pool = engine.pools["p"]
    creations = 0
    gate = asyncio.Event()

    async def slow_create(_pool: object) -> None:
        nonlocal creations
        creations += 1
        await gate.wait()

    pool.before_ld_create = slow_create
    vol = engine.volume("v")
    blocks = REGION // 512
    writers = [asyncio.create_task(vol.write(i * 512, pattern(i, 512))) for i in range(blocks)]
    # a write to another region, whose own allocation also needs the new LD
    other = asyncio.create_task(vol.write(5 * REGION, pattern(99, 512)))
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in writers), "writers must wait while the LD is being created"
    assert creations == 1
    gate.set()
    await asyncio.gather(*writers, other)
    assert creations == 1
    info = engine.get_vv("v")
    assert info.regions_allocated == 2
    assert engine.list_lds()[0].regions_used == 2
    expected = b"".join(pattern(i, 512) for i in range(blocks))
    assert bytes(await vol.read(0, REGION)) == expected
    assert bytes(await vol.read(5 * REGION, 512)) == pattern(99, 512)
    engine2 = await reopen(engine)
    assert bytes(await engine2.volume("v").read(0, REGION)) == expected
    await engine2.close()


async def test_vv_allocation_warning_and_limit(tmp_path: Path) -> None:
    """Claims 5 and 9: warning once per crossing; a write past the limit refused; mapped regions still writable."""
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=4 * CHUNKLET, step=STEP)
    await engine.create_vv(
        "v", pool="p", size=1 * MiB, alloc_warning=Limit(bytes=2 * REGION), alloc_limit=Limit(percent=6.25)
    )  # limit: 64 KiB = 4 regions
    vol = engine.volume("v")
    await vol.write(0, pattern(1, REGION))
    assert AlertKind.VV_ALLOCATION_WARNING.value not in kinds(engine)
    await vol.write(REGION, pattern(2, REGION))
    assert kinds(engine).count(AlertKind.VV_ALLOCATION_WARNING.value) == 1
    await vol.write(2 * REGION, pattern(3, REGION))
    assert kinds(engine).count(AlertKind.VV_ALLOCATION_WARNING.value) == 1  # once per crossing
    assert AlertKind.VV_ALLOCATION_LIMIT.value not in kinds(engine)
    await vol.write(3 * REGION, pattern(4, REGION))  # reaches the limit
    assert kinds(engine).count(AlertKind.VV_ALLOCATION_LIMIT.value) == 1
    with pytest.raises(OutOfSpace) as err:
        await vol.write(4 * REGION, pattern(5, 10))
    assert err.value.reason == AlertKind.VV_ALLOCATION_LIMIT.value
    with pytest.raises(OutOfSpace):
        await vol.write(9 * REGION, pattern(5, 10))
    assert kinds(engine).count(AlertKind.VV_ALLOCATION_LIMIT.value) == 1
    # regions already assigned still take writes
    await vol.write(REGION + 7, pattern(6, 100))
    assert bytes(await vol.read(REGION + 7, 100)) == pattern(6, 100)
    assert engine.get_vv("v").regions_allocated == 4
    # trim below the warning: both conditions clear; crossing again raises again
    await vol.trim(0, 3 * REGION)
    assert engine.get_vv("v").regions_allocated == 1
    open_kinds = kinds(engine, include_cleared=False)
    assert AlertKind.VV_ALLOCATION_WARNING.value not in open_kinds
    assert AlertKind.VV_ALLOCATION_LIMIT.value not in open_kinds
    await vol.write(0, pattern(7, 2 * REGION))
    assert kinds(engine).count(AlertKind.VV_ALLOCATION_WARNING.value) == 2
    # raising the limit lets the refused write through
    await engine.set_vv("v", alloc_limit=Limit(bytes=1 * MiB))
    await vol.write(9 * REGION, pattern(5, 10))
    assert bytes(await vol.read(9 * REGION, 10)) == pattern(5, 10)
    await engine.close()


async def test_pool_growth_warning_limit_and_out_of_chunklets(tmp_path: Path) -> None:
    """Claims 6 and 7: the pool grows by itself, warns once, refuses past its limit."""
    engine = await make_engine(tmp_path, pds=2, pd_size=2 * CHUNKLET)
    await engine.create_pool(
        "p",
        raid=0,
        set_size=2,
        region_size=REGION,
        growth_increment=2 * CHUNKLET,
        step=STEP,
        growth_warning=3 * CHUNKLET,
        growth_limit=4 * CHUNKLET,
    )
    await engine.create_vv("v", pool="p", size=8 * MiB)
    vol = engine.volume("v")
    per_ld = 2 * CHUNKLET // REGION  # regions per LD
    await vol.write(0, pattern(1, per_ld * REGION))
    assert len(engine.list_lds()) == 1
    assert AlertKind.POOL_GROWTH_WARNING.value not in kinds(engine)
    await vol.write(per_ld * REGION, pattern(2, REGION))  # second LD: capacity 4 chunklets >= warning
    assert len(engine.list_lds()) == 2
    assert kinds(engine).count(AlertKind.POOL_GROWTH_WARNING.value) == 1
    await vol.write((per_ld + 1) * REGION, pattern(3, (per_ld - 1) * REGION))  # fills the pool
    with pytest.raises(OutOfSpace) as err:
        await vol.write(2 * per_ld * REGION, pattern(4, 10))
    assert err.value.reason == AlertKind.POOL_GROWTH_LIMIT.value
    with pytest.raises(OutOfSpace):
        await vol.write(2 * per_ld * REGION + REGION, pattern(4, 10))
    assert kinds(engine).count(AlertKind.POOL_GROWTH_LIMIT.value) == 1
    assert kinds(engine).count(AlertKind.POOL_GROWTH_WARNING.value) == 1
    assert str(engine.get_pool("p").state) == "out-of-space"
    # raising the limit: now the PDs have no chunklets left
    await engine.set_pool("p", growth_limit=None)
    with pytest.raises(OutOfSpace) as err:
        await vol.write(2 * per_ld * REGION, pattern(4, 10))
    assert err.value.reason == AlertKind.POOL_OUT_OF_CHUNKLETS.value
    assert kinds(engine).count(AlertKind.POOL_OUT_OF_CHUNKLETS.value) == 1
    # adding PDs lets the same write succeed; earlier data intact
    await engine.add_pd(tmp_path / "x0.img", size=4 * CHUNKLET, chunklet_size=CHUNKLET)
    await engine.add_pd(tmp_path / "x1.img", size=4 * CHUNKLET, chunklet_size=CHUNKLET)
    await vol.write(2 * per_ld * REGION, pattern(4, 10))
    assert bytes(await vol.read(0, per_ld * REGION)) == pattern(1, per_ld * REGION)
    assert bytes(await vol.read(2 * per_ld * REGION, 10)) == pattern(4, 10)
    await engine.close()


async def test_trim_returns_regions_zeroed_and_isolation_between_volumes(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("a", pool="p", size=1 * MiB)
    a = engine.volume("a")
    await a.write(0, pattern(1, 4 * REGION))
    # partial trim writes zeros, whole-region trim unassigns
    await a.trim(REGION // 2, 2 * REGION)
    assert engine.get_vv("a").regions_allocated == 3
    got = bytes(await a.read(0, 4 * REGION))
    assert (
        got
        == pattern(1, 4 * REGION)[: REGION // 2]
        + bytes(2 * REGION)
        + pattern(1, 4 * REGION)[5 * REGION // 2 :]
    )
    # write-zeroes with NO_HOLE keeps the allocation
    await a.write_zeroes(2 * REGION, REGION, may_trim=False)
    assert engine.get_vv("a").regions_allocated == 3
    assert bytes(await a.read(2 * REGION, REGION)) == bytes(REGION)
    # delete: every region back to the pool; a new VV that gets them reads zeros
    await engine.delete_vv("a")
    await engine.flush_all()  # trimmed regions become reusable after the fsync
    await engine.create_vv("b", pool="p", size=1 * MiB)
    b = engine.volume("b")
    for r in range(CHUNKLET // REGION):
        await b.write(r * REGION, b"\x01")
    assert len(engine.list_lds()) == 1, "b reuses a's LD regions"
    for r in range(CHUNKLET // REGION):
        assert bytes(await b.read(r * REGION, REGION)) == b"\x01" + bytes(REGION - 1)
    with pytest.raises(NotFound):
        engine.volume("a")
    await engine.close()


async def test_reopen_keeps_data_maps_and_alerts(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool(
        "p", raid=5, set_size=3, region_size=REGION, growth_increment=CHUNKLET, step=STEP
    )
    await engine.create_vv("v", pool="p", size=2 * MiB, alloc_warning=Limit(bytes=REGION))
    vol = engine.volume("v")
    await vol.write(3 * REGION + 100, pattern(3, 5000))
    alerts_before = [(a.id, a.kind) for a in engine.list_alerts(True)]
    engine = await reopen(engine)
    vol = engine.volume("v")
    assert bytes(await vol.read(3 * REGION + 100, 5000)) == pattern(3, 5000)
    assert engine.get_vv("v").regions_allocated == 1
    assert engine.get_vv("v").alloc_warning == REGION
    assert [(a.id, a.kind) for a in engine.list_alerts(True)] == alerts_before
    # an open condition is not raised again after a restart
    await vol.write(0, b"x")
    assert kinds(engine).count(AlertKind.VV_ALLOCATION_WARNING.value) == 1
    await engine.close()


async def test_store_check_refuses_a_damaged_store(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=1 * MiB)
    await engine.volume("v").write(0, pattern(1, 3 * REGION))
    await engine.close()
    db = sqlite3.connect(tmp_path / "thinblock.db")
    with db:
        (before,) = db.execute("SELECT map_check FROM vvs").fetchone()
        (taken,) = db.execute(f"SELECT {mapcheck.term_sql()} FROM vv_map WHERE vv_region = 1").fetchone()
        after = before - taken
        db.execute("DELETE FROM vv_map WHERE vv_region = 1")
    db.close()
    report = Engine.check(tmp_path)
    assert not report.ok
    assert any("records 3 assigned regions but its map holds 2" in p for p in report.problems)
    with pytest.raises(MetadataCorrupt, match="map holds 2"):
        await Engine.open(tmp_path)
    # a region assigned twice
    db = sqlite3.connect(tmp_path / "thinblock.db")
    with db:
        db.execute("UPDATE vvs SET regions = 2")
        db.execute("UPDATE lds SET regions_used = 2")
    db.close()
    assert Engine.check(tmp_path).problems == [
        f"VV 'v' has map check {before} but its map rows add up to {after} (a map row's region or LD"
        " address changed behind the store's back: a flipped bit?)"
    ]
    # ... and the map check too: the store holds two rows, consistently
    db = sqlite3.connect(tmp_path / "thinblock.db")
    with db:
        db.execute(f"UPDATE vvs SET map_check = {after}")
    db.close()
    assert Engine.check(tmp_path).ok


async def test_truncated_store_refuses_to_open(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.close()
    db_path = tmp_path / "thinblock.db"
    data = db_path.read_bytes()
    db_path.write_bytes(data[: len(data) // 3])
    with pytest.raises(MetadataCorrupt):
        await Engine.open(tmp_path)
    assert not Engine.check(tmp_path).ok


async def test_huge_volume_is_created_fast_and_costs_no_memory(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=MiB, growth_increment=CHUNKLET * 4, step=STEP)
    tracemalloc.start()
    t0 = time.perf_counter()
    await engine.create_vv("huge", pool="p", size=64 * TiB)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"64 TiB VV created in {elapsed * 1000:.1f} ms, peak {peak} bytes")
    assert peak < 1 * MiB  # the map is sparse: no array of 64 Mi regions
    vol = engine.volume("huge")
    await vol.write(64 * TiB - 4096, pattern(1, 4096))
    assert bytes(await vol.read(64 * TiB - 4096, 4096)) == pattern(1, 4096)
    ext = await vol.block_status(0, 64 * TiB)
    assert ext[0].length == 64 * TiB - MiB and int(ext[0].flags) == 3
    await engine.close()


async def test_bad_input_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path, pds=2)
    with pytest.raises(InvalidArgument, match="needs 3 PDs"):
        await engine.create_pool("p", raid=5, set_size=3)
    with pytest.raises(InvalidArgument):
        await engine.create_pool("bad name!", raid=1)
    with pytest.raises(InvalidArgument):
        await engine.create_pool("p", raid=2)
    with pytest.raises(InvalidArgument):
        await engine.create_pool("p", raid=1, region_size=3000)
    assert engine.list_pools() == []
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    with pytest.raises(AlreadyExists):
        await engine.create_pool("p", raid=1)
    for size in (0, -1, 1000):
        with pytest.raises(InvalidArgument):
            await engine.create_vv("v", pool="p", size=size)
    with pytest.raises(NotFound, match="pool 'gold' not found"):
        await engine.create_vv("v", pool="gold", size=MiB)
    assert engine.list_vvs() == []
    await engine.create_vv("v", pool="p", size=MiB)
    with pytest.raises(AlreadyExists):
        await engine.create_vv("v", pool="p", size=MiB)
    with pytest.raises(InvalidArgument):
        await engine.grow_vv("v", MiB // 2)
    with pytest.raises(Conflict):
        await engine.delete_pool("p")
    with pytest.raises(NotFound):
        engine.get_pd(99)
    with pytest.raises(AlreadyExists):
        await engine.add_pd(tmp_path / "pd0.img", size=MiB, chunklet_size=CHUNKLET)
    await engine.volume("v").write(0, b"data")
    with pytest.raises(Conflict):
        await engine.remove_pd(engine.list_lds()[0].chunklets[0].pd_id)
    assert engine.get_vv("v").size == MiB
    await engine.close()


async def test_grow_volume_and_percentage_limits_follow(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=10 * REGION, alloc_limit=Limit(percent=50))
    assert engine.get_vv("v").alloc_limit == 5 * REGION
    await engine.grow_vv("v", 20 * REGION)
    assert engine.get_vv("v").alloc_limit == 10 * REGION
    assert engine.get_vv("v").alloc_limit_spec == "50%"
    await engine.volume("v").write(19 * REGION, b"end")
    assert bytes(await engine.volume("v").read(19 * REGION, 3)) == b"end"
    await engine.close()


async def test_compaction_releases_free_lds(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=2 * MiB)
    vol = engine.volume("v")
    per_ld = CHUNKLET // REGION
    await vol.write(0, pattern(1, 2 * per_ld * REGION))
    assert len(engine.list_lds()) == 2
    used_chunklets = sum(p.chunklets_used for p in engine.list_pds())
    await vol.trim(per_ld * REGION, per_ld * REGION)
    assert await engine.compact_pool("p") == 1
    assert len(engine.list_lds()) == 1
    assert sum(p.chunklets_used for p in engine.list_pds()) == used_chunklets - 2
    assert engine.get_pool("p").capacity == CHUNKLET
    assert bytes(await vol.read(0, per_ld * REGION)) == pattern(1, per_ld * REGION)
    assert AlertKind.LD_RELEASED.value in kinds(engine)
    engine = await reopen(engine)
    assert len(engine.list_lds()) == 1
    await engine.close()


async def test_writeback_cache_acknowledges_reads_back_and_destages_on_flush(tmp_path: Path) -> None:
    opts = EngineOptions(allow_tiny_chunklets=True, destage_delay=10.0, max_dirty_bytes=64 * KiB)
    engine = await make_engine(tmp_path, options=opts)
    await engine.create_pool(
        "p", raid=5, set_size=3, region_size=REGION, growth_increment=CHUNKLET, step=STEP
    )
    await engine.create_vv("v", pool="p", size=1 * MiB, cache_mode=CacheMode.WRITEBACK)
    vol = engine.volume("v")
    await vol.write(100, pattern(1, 3000))
    assert engine.get_vv("v").dirty_bytes == 3000
    assert bytes(await vol.read(0, 4000)) == bytes(100) + pattern(1, 3000) + bytes(900)
    # the LD itself does not hold it yet
    ld = engine.lds[engine.list_lds()[0].id]
    assert bytes(ld.read(100, 3000)) != pattern(1, 3000)
    await vol.flush()
    assert engine.cache_dirty_bytes() == 0
    assert bytes(ld.read(100, 3000)) == pattern(1, 3000)
    # back-pressure: writing far more than max_dirty completes (writers wait for the destager)
    data = pattern(2, 256 * KiB)
    await asyncio.gather(*(vol.write(i * 4096, data[i * 4096 : (i + 1) * 4096]) for i in range(64)))
    assert engine.cache_dirty_bytes() <= 64 * KiB
    assert bytes(await vol.read(0, 256 * KiB)) == data
    engine = await reopen(engine, opts)
    assert bytes(await engine.volume("v").read(0, 256 * KiB)) == data
    await engine.close()


async def test_fail_pd_degrades_raid1_and_rebuild_restores(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path, pds=3)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=1 * MiB)
    vol = engine.volume("v")
    await vol.write(0, pattern(1, CHUNKLET))
    ld = engine.list_lds()[0]
    victim = ld.chunklets[0].pd_id
    await engine.fail_pd(victim)
    assert engine.get_ld(ld.id).health.value == "degraded"
    assert AlertKind.LD_DEGRADED.value in kinds(engine)
    assert AlertKind.PD_FAILED.value in kinds(engine)
    assert bytes(await vol.read(0, CHUNKLET)) == pattern(1, CHUNKLET)
    await vol.write(REGION, pattern(2, 100))
    seen = []
    result = await engine.rebuild(seen.append)
    assert result.lds_done == 1 and not result.running
    assert seen[-1].bytes_done == seen[-1].bytes_total > 0
    assert engine.get_ld(ld.id).health.value == "normal"
    assert AlertKind.REBUILD_DONE.value in kinds(engine)
    assert victim not in {c.pd_id for c in engine.get_ld(ld.id).chunklets}
    open_kinds = kinds(engine, include_cleared=False)
    assert AlertKind.LD_DEGRADED.value not in open_kinds
    # fail another member: still no data lost
    await engine.fail_pd(engine.get_ld(ld.id).chunklets[0].pd_id)
    expected = bytearray(pattern(1, CHUNKLET))
    expected[REGION : REGION + 100] = pattern(2, 100)
    assert bytes(await vol.read(0, CHUNKLET)) == bytes(expected)
    engine = await reopen(engine)
    assert bytes(await engine.volume("v").read(0, CHUNKLET)) == bytes(expected)
    await engine.close()


async def test_alerts_are_listed_acknowledged_and_delivered(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    received = []
    unsubscribe = engine.subscribe(received.append)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=MiB)
    await engine.volume("v").write(0, b"x")
    assert [a.kind for a in received] == [AlertKind.LD_CREATED]
    alert = engine.ack_alert(received[0].id)
    assert alert.state == AlertState.ACKNOWLEDGED
    with pytest.raises(NotFound):
        engine.ack_alert(12345)
    unsubscribe()
    await engine.volume("v").write(CHUNKLET * 3, b"y")
    assert len(received) == 1
    await engine.close()


@pytest.mark.parametrize("mode", [CacheMode.WRITETHROUGH, CacheMode.WRITEBACK])
async def test_a_fresh_region_is_committed_before_data_goes_into_it(tmp_path: Path, mode: CacheMode) -> None:
    """Memory never runs ahead of the store: a fresh region's assignment is committed before any
    data is written into it, in either cache mode, and the write is acknowledged after both.
    Until the commit's turn comes, the region is neither mapped nor written."""
    from thinblock.aio import start_eager

    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=MiB, cache_mode=mode)
    vol = engine.volume("v")
    await vol.write(0, b"first")  # creates the LD

    def committed_rows() -> int:
        db = sqlite3.connect(tmp_path / "thinblock.db")  # another connection sees only commits
        try:
            return int(db.execute("SELECT COUNT(*) FROM vv_map").fetchone()[0])
        finally:
            db.close()

    assert committed_rows() == 1
    done, task = start_eager(vol.write(REGION, b"x"))
    assert not done, "a fresh write waits for its assignment's commit"
    assert committed_rows() == 1
    assert engine.get_vv("v").allocated == REGION, "mapped before the store holds the assignment"
    await task
    assert committed_rows() == 2
    assert bytes(await vol.read(REGION, 1)) == b"x"
    await engine.close()


async def test_cache_prefetch_is_not_counted_as_host_reads(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=MiB)
    vol = engine.volume("v")
    await vol.write(REGION, pattern(1, 2 * REGION))
    await vol.cache(0, MiB)
    stats = engine.vv_stats("v")
    assert (stats.reads, stats.read_bytes) == (0, 0)
    assert bytes(await vol.read(REGION, 2 * REGION)) == pattern(1, 2 * REGION)
    assert engine.vv_stats("v").reads == 1
    await engine.close()
