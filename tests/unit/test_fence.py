"""The write fence of a node under a lease (fence.py): a deadline per grant, closed for good when
the lease is lost; every PD write, every destage and every metadata transaction checks it, and a
fenced write changes nothing and fails nothing (the PD stays healthy, the dirty data stays)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from thinblock.engine import Engine, EngineOptions
from thinblock.errors import Fenced
from thinblock.fence import WriteFence
from thinblock.metadata.lease import LeaseKeeper, take_node_lease
from thinblock.metadata.sqlite import SQLiteStore
from thinblock.metadata.writer import MetadataWriter
from thinblock.model import CacheMode
from thinblock.physical.pd import PhysicalDisk
from thinblock.units import KiB, MiB


def test_a_fence_opens_per_grant_and_closes_for_good() -> None:
    fence = WriteFence("the lease node:n1")
    assert fence.fenced, "closed until the first grant"
    with pytest.raises(Fenced, match="not known to be held"):
        fence.check()
    fence.open_until(time.monotonic() + 60)
    fence.check()
    fence.open_until(time.monotonic() + 1)  # an older grant answered late: the deadline stays
    assert fence.until > time.monotonic() + 30
    fence.open_until(time.monotonic() - 1)
    fence.check()
    fence.close("lease node:n1 (epoch 1) lost")
    with pytest.raises(Fenced, match="epoch 1"):
        fence.check()
    fence.open_until(time.monotonic() + 60)  # a renewal in flight when it was lost
    assert fence.fenced


def test_a_fenced_pd_refuses_every_write_and_stays_healthy(tmp_path: Path) -> None:
    pd = PhysicalDisk.open(1, str(tmp_path / "pd.img"), size=4 * MiB, chunklet_size=1 * MiB, create=True)
    try:
        pd.pwrite(0, b"a" * 4096)
        fence = WriteFence("test")
        pd.fence = fence
        attempts = [
            lambda: pd.pwrite(0, b"b" * 4096),
            lambda: pd.pwritev(0, [memoryview(b"b" * 4096)]),
            lambda: pd.punch(0, 4096),
            lambda: pd.allocate(1 * MiB, 4096),
        ]
        for attempt in attempts:
            with pytest.raises(Fenced):
                attempt()
        assert bytes(pd.as_device().read(0, 4096)) == b"a" * 4096
        assert not pd.failed
        fence.open_until(time.monotonic() + 60)
        pd.pwrite(0, b"c" * 4096)
        assert bytes(pd.as_device().read(0, 4096)) == b"c" * 4096
    finally:
        pd.close()


async def test_the_metadata_writer_refuses_fenced_calls_but_the_leases_own(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    writer = MetadataWriter(store, asyncio.get_running_loop())
    writer.fence = WriteFence("test")
    with pytest.raises(Fenced):
        await writer.call(store.set_meta, "k", "v")
    with pytest.raises(Fenced):
        await writer.assign(1, 0, 1, 0)
    assert store.get_meta("k") is None
    await writer.call(store.set_meta, "k", "lease", unfenced=True)
    assert store.get_meta("k") == "lease"
    await writer.close()
    store.close()


async def test_a_lost_lease_closes_the_fence(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    lease = take_node_lease(store, "n1", "here", ttl=0.6)
    writer = MetadataWriter(store, asyncio.get_running_loop())
    fence = WriteFence("the lease node:n1")
    keeper = LeaseKeeper(writer, lease, ttl=0.6, fence=fence, margin=0.2)
    keeper.granted(time.monotonic())
    fence.check()
    await asyncio.sleep(0.7)  # expired (a pause); another place takes it
    assert fence.fenced, "stopped writing before the expiry (margin)"
    other = store.acquire_lease("node:n1", "there", 10)
    assert other is not None and other.epoch == lease.epoch + 1
    await keeper.renew_once()
    assert keeper.lost and fence.lost is not None
    with pytest.raises(Fenced, match="lost"):
        fence.check()
    await keeper.stop(release=False)
    await writer.close()
    store.close()


async def test_a_fenced_engine_keeps_its_dirty_data_and_writes_nothing(tmp_path: Path) -> None:
    options = EngineOptions(
        allow_tiny_chunklets=True, destage_delay=60, node_name="n1", lease_ttl=3.0, fence_margin=1.0
    )
    engine = await Engine.open(tmp_path, options)
    try:
        for i in range(2):
            await engine.add_pd(tmp_path / f"pd{i}.img", size=4 * MiB, chunklet_size=64 * KiB)
        await engine.create_pool("p", raid=1, set_size=2, region_size=16 * KiB, step=4 * KiB)
        await engine.create_vv("v", pool="p", size=1 * MiB, cache_mode=CacheMode.WRITEBACK)
        volume = engine.volume("v")
        await volume.write(0, b"x" * 8192)
        assert engine.cache.dirty_bytes == 8192
        pd_bytes = {p: p.read_bytes() for p in sorted(tmp_path.glob("pd*.img"))}
        assert engine.lease is not None and engine.fence is not None
        await engine.lease.stop(release=False)  # no renewal from here: the deadline passes
        engine.fence.until = time.monotonic()
        with pytest.raises(Fenced):
            await engine.flush_all()
        with pytest.raises(Fenced):
            await engine.create_vv("w", pool="p", size=1 * MiB)
        assert engine.cache.dirty_bytes == 8192, "a fenced destage keeps the region dirty"
        assert {p: p.read_bytes() for p in pd_bytes} == pd_bytes
        assert not any(pd.failed for pd in engine.pds.values())
        engine.fence.open_until(time.monotonic() + 60)  # renewed after all: nothing was lost
        await engine.flush_all()
        assert engine.cache.dirty_bytes == 0
        assert bytes(await volume.read(0, 8192)) == b"x" * 8192
    finally:
        await engine.close()
