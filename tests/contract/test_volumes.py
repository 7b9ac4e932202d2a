"""The block-device contract run against engine virtual volumes: write-through and
write-back VVs over RAID 0, 1 and 5 pools, with each way a VV can zero a range
(write-zeroes that may trim, write-zeroes with NO_HOLE, trim), and a VV whose size is
not a multiple of its region size (the last region is partial).

Boundaries given to the suite are VV region boundaries; with tiny chunklets every few
regions also land on a different LD, so writes across them hop LDs as well."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.engine_helpers import CHUNKLET, REGION, STEP, make_engine
from thinblock.blockdev import Volume
from thinblock.engine import Engine, EngineOptions
from thinblock.model import CacheMode
from thinblock.units import KiB, MiB

from .contract import AsyncDevice, VolumeAsyncDevice, WritableContract

VV_SIZE = 2 * MiB


class NoHoleZeroDevice(VolumeAsyncDevice):
    """Zeroing through NBD's WRITE_ZEROES with NO_HOLE: the allocation is kept."""

    async def zero(self, offset: int, length: int) -> None:
        await self.volume.write_zeroes(offset, length, may_trim=False)


class TrimZeroDevice(VolumeAsyncDevice):
    """Zeroing through TRIM: a thin volume's trimmed range must read zeros afterwards."""

    async def zero(self, offset: int, length: int) -> None:
        await self.volume.trim(offset, length)


@dataclass(frozen=True)
class VolumeCase:
    raid: int
    set_size: int
    cache_mode: CacheMode
    zero_with: type[VolumeAsyncDevice] = VolumeAsyncDevice
    size: int = VV_SIZE
    max_dirty: int = 256 * MiB
    # Write-through writes of this size or more go to the I/O threads; 0: no I/O threads
    # (every write inline on the loop).  512 sends every write-through write there.
    offload_min: int = 512

    @property
    def id(self) -> str:
        zero = {VolumeAsyncDevice: "zeroes", NoHoleZeroDevice: "nohole", TrimZeroDevice: "trim"}[
            self.zero_with
        ]
        extra = "-odd-size" if self.size % REGION else ""
        extra += "-backpressure" if self.max_dirty < MiB else ""
        extra += "-inline" if not self.offload_min else ""
        return f"raid{self.raid}-{self.cache_mode.value}-{zero}{extra}"


WT, WB = CacheMode.WRITETHROUGH, CacheMode.WRITEBACK
CASES = [
    VolumeCase(1, 2, WT),
    VolumeCase(1, 2, WT, offload_min=0),
    VolumeCase(5, 3, WT),
    VolumeCase(0, 2, WT, TrimZeroDevice),
    VolumeCase(1, 2, WT, NoHoleZeroDevice, size=VV_SIZE - 512),
    VolumeCase(1, 2, WB),
    VolumeCase(5, 3, WB, NoHoleZeroDevice),
    VolumeCase(0, 2, WB, TrimZeroDevice, size=VV_SIZE - 7 * 512),
    VolumeCase(5, 3, WB, max_dirty=24 * KiB),
]


def region_boundaries(size: int) -> list[int]:
    """A few region boundaries: near the start, a run in the middle, and the last one."""
    last = (size - 1) // REGION * REGION
    marks = {REGION, 2 * REGION, size // 2 // REGION * REGION, size // 2 // REGION * REGION + REGION, last}
    return sorted(m for m in marks if 0 < m < size)


class TestVirtualVolume(WritableContract):
    @pytest.fixture(params=CASES, ids=lambda c: c.id)
    async def device(self, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[AsyncDevice]:
        case: VolumeCase = request.param
        options = EngineOptions(
            allow_tiny_chunklets=True,
            destage_delay=0.001,
            max_dirty_bytes=case.max_dirty,
            io_threads=4 if case.offload_min else 0,
            offload_min_bytes=case.offload_min or 1,
        )
        engine = await make_engine(tmp_path, pds=4, pd_size=8 * MiB, options=options)
        await engine.create_pool(
            "p",
            raid=case.raid,
            set_size=case.set_size,
            region_size=REGION,
            growth_increment=CHUNKLET,
            step=STEP,
        )
        await engine.create_vv("v", pool="p", size=case.size, cache_mode=case.cache_mode)
        volume: Volume = engine.volume("v")
        device = case.zero_with(volume, region_boundaries(case.size))
        yield device
        # Whatever the suite did must leave a store that passes its check and a clean close.
        await engine.close()
        report = Engine.check(tmp_path)
        assert report.ok, report.problems
