"""PD repair (diskrepair.py) as the engine drives it: a PD opened anew by a restore is readied as
every PD the engine opens is (the node's write fence above all), and a replacement is refused,
before anything is copied, by the same rule an LD's rebuild applies to each member."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from thinblock.engine import Engine, EngineOptions
from thinblock.errors import Fenced, InvalidArgument
from thinblock.model import PDHealth
from thinblock.units import KiB, MiB


async def _raid1_engine(tmp_path: Path, options: EngineOptions, pds: int = 2) -> Engine:
    engine = await Engine.open(tmp_path, options)
    for i in range(pds):
        await engine.add_pd(tmp_path / f"pd{i}.img", size=4 * MiB, chunklet_size=64 * KiB)
    await engine.create_pool("p", raid=1, set_size=2, region_size=16 * KiB, step=4 * KiB)
    await engine.create_vv("v", pool="p", size=1 * MiB)
    return engine


async def test_a_restored_pd_is_under_the_nodes_write_fence(tmp_path: Path) -> None:
    options = EngineOptions(allow_tiny_chunklets=True, node_name="n1", lease_ttl=3.0, fence_margin=1.0)
    engine = await _raid1_engine(tmp_path, options)
    try:
        volume = engine.volume("v")
        await volume.write(0, b"a" * 8192)
        victim = engine.pds[1]
        await engine.fail_pd(victim.id)
        await volume.write(0, b"b" * 8192)  # missed by the failed PD: the restore copies it back
        info = await engine.restore_pd(victim.id)
        assert info.health == PDHealth.NORMAL
        restored = engine.pds[victim.id]
        assert restored is not victim, "opened anew"
        assert engine.fence is not None and restored.fence is engine.fence
        assert engine.lease is not None
        await engine.lease.stop(release=False)
        engine.fence.until = time.monotonic()  # the lease's deadline passed: no PD may be written
        with pytest.raises(Fenced):
            restored.pwrite(0, b"c" * 4096)
        engine.fence.open_until(time.monotonic() + 60)
        assert bytes(await volume.read(0, 8192)) == b"b" * 8192
    finally:
        await engine.close()


async def test_a_replacement_holding_a_member_of_the_same_set_is_refused_before_any_copy(
    tmp_path: Path,
) -> None:
    engine = await _raid1_engine(tmp_path, EngineOptions(allow_tiny_chunklets=True, pd_check_interval=0))
    try:
        volume = engine.volume("v")
        await volume.write(0, b"a" * 8192)
        ld = next(iter(engine.lds.values()))
        failed, partner = (ch.pd for ch in ld.rows[0])
        await engine.fail_pd(failed.id)
        info = await engine.add_pd(tmp_path / "pd2.img", size=4 * MiB, chunklet_size=64 * KiB)
        spare = engine.pds[info.id]
        used_before = engine.chunklets.used_count(spare.id)
        with pytest.raises(InvalidArgument, match="already holds a member of the same RAID set"):
            await engine.replace_pd(failed.id, partner.id)
        assert engine.chunklets.used_count(spare.id) == used_before
        assert engine.pds[failed.id] is failed and failed.failed, "nothing changed"
        await engine.replace_pd(failed.id, spare.id)
        assert failed.id not in engine.pds
        assert bytes(await volume.read(0, 8192)) == b"a" * 8192
    finally:
        await engine.close()
