"""A new LD zeroes (punches) and fsyncs its chunklets before offering a region -- except
chunklets known to read zeros durably: those of a PD file the engine created itself and
has not used since.  Everything else (a released LD's chunklets, a PD file or device that
already existed) goes through the zeroing, and reads zeros afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine_helpers import CHUNKLET, REGION, STEP, make_engine, pattern, reopen
from thinblock.engine import Engine
from thinblock.physical.header import HEADER_AREA
from thinblock.physical.pd import PhysicalDisk
from thinblock.units import MiB


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """PD ids, one per PhysicalDisk.fsync call."""
    calls: list[int] = []
    real = PhysicalDisk.fsync

    def counting(self: PhysicalDisk) -> None:
        calls.append(self.id)
        real(self)

    monkeypatch.setattr(PhysicalDisk, "fsync", counting)
    return calls


async def make_pool(engine: Engine) -> None:
    await engine.create_pool(
        "p", raid=1, set_size=2, region_size=REGION, growth_increment=CHUNKLET, step=STEP
    )


async def test_chunklets_of_a_pd_the_engine_created_need_no_fsync(tmp_path: Path, fsyncs: list[int]) -> None:
    engine = await make_engine(tmp_path, pds=2, pd_size=MiB)
    await make_pool(engine)
    await engine.create_vv("v", pool="p", size=MiB)
    fsyncs.clear()
    await engine.volume("v").write(0, pattern(1, REGION))  # grows the pool: one new LD
    assert len(engine.lds) == 1
    assert fsyncs == []
    await engine.close()


async def test_released_chunklets_are_zeroed_and_fsynced_before_reuse(
    tmp_path: Path, fsyncs: list[int]
) -> None:
    engine = await make_engine(tmp_path, pds=2, pd_size=MiB)
    await make_pool(engine)
    await engine.create_vv("v", pool="p", size=4 * CHUNKLET)
    vol = engine.volume("v")
    await vol.write(0, pattern(1, CHUNKLET))  # fills the first LD with data
    await vol.trim(0, CHUNKLET)
    await engine.flush_all()
    assert await engine.compact_pool("p") == 1
    assert not engine.lds
    fsyncs.clear()
    # The next LD takes the released chunklets (the first free ones) back: punched and fsynced.
    await vol.write(CHUNKLET, pattern(2, REGION))
    assert sorted(set(fsyncs)) == sorted(engine.pds)
    assert bytes(await vol.read(CHUNKLET + REGION, CHUNKLET - REGION)) == bytes(CHUNKLET - REGION)
    for ld in engine.lds.values():
        for row in ld.rows:
            for ch in row:
                data = bytes(ch.pd.as_device(ch.offset, ch.pd.chunklet_size).read(REGION, CHUNKLET - REGION))
                assert not any(data), "a reused chunklet still holds the released LD's data"
    await engine.close()


async def test_chunklets_of_an_existing_pd_file_are_zeroed(tmp_path: Path, fsyncs: list[int]) -> None:
    # A PD file taken back after `pd remove` (a host file with data is refused outright:
    # physical/admission.py): its header is this data directory's, its chunklets hold old data.
    engine = await make_engine(tmp_path, pds=0)
    paths = [tmp_path / f"old{i}.img" for i in range(2)]
    for path in paths:
        pd = await engine.add_pd(path, MiB, chunklet_size=CHUNKLET)
        await engine.remove_pd(pd.id)
        with path.open("r+b") as f:
            f.seek(HEADER_AREA)
            f.write(b"\xee" * MiB)
    for path in paths:
        await engine.add_pd(path, chunklet_size=CHUNKLET)
    await make_pool(engine)
    await engine.create_vv("v", pool="p", size=MiB)
    fsyncs.clear()
    await engine.volume("v").write(0, pattern(1, 512))
    assert fsyncs, "chunklets of a file that held data were not zeroed durably"
    assert bytes(await engine.volume("v").read(512, CHUNKLET - 512)) == bytes(CHUNKLET - 512)
    await engine.close()


async def test_after_a_reopen_free_chunklets_are_not_trusted(tmp_path: Path, fsyncs: list[int]) -> None:
    engine = await make_engine(tmp_path, pds=2, pd_size=MiB)
    await make_pool(engine)
    await engine.create_vv("v", pool="p", size=MiB)
    engine = await reopen(engine)
    fsyncs.clear()
    await engine.volume("v").write(0, pattern(1, REGION))
    assert fsyncs  # nothing recorded says these chunklets were never used: zeroed
    await engine.close()
