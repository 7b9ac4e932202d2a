"""The block-device contract run against the raw devices: PD ranges, RAID 0, RAID 1 (2- and
3-way), RAID 5 (sets of 3 to 5), degraded RAID 1 and RAID 5, and the zero LD."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from thinblock.logical import ZERO_LD, RaidLevel
from thinblock.units import KiB

from .contract import AsyncDevice, ReadOnlyContract, WritableContract, as_async
from .devices import CHUNKLET, close_all, ld_boundaries, make_ld, make_pds


class TestWholePD(WritableContract):
    @pytest.fixture
    def device(self, tmp_path: Path) -> Iterator[AsyncDevice]:
        (pd,) = make_pds(tmp_path, 1, chunklets=6)
        yield as_async(pd.as_device(), boundaries=[CHUNKLET, 3 * CHUNKLET])
        pd.close()


class TestPDRange(WritableContract):
    """A range that starts at a chunklet, not at 0: offsets are translated."""

    @pytest.fixture
    def device(self, tmp_path: Path) -> Iterator[AsyncDevice]:
        (pd,) = make_pds(tmp_path, 1, chunklets=8)
        yield as_async(pd.as_device(2 * CHUNKLET, 5 * CHUNKLET), boundaries=[CHUNKLET, 4 * CHUNKLET])
        pd.close()


class TestRaid0(WritableContract):
    @pytest.fixture(params=[1, 3], ids=lambda k: f"set{k}")
    def device(self, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AsyncDevice]:
        k = request.param
        pds = make_pds(tmp_path, k + 1)
        ld = make_ld(pds, RaidLevel.RAID0, k, rows=3)
        yield as_async(ld, boundaries=ld_boundaries(ld))
        close_all(pds)


class TestRaid1(WritableContract):
    @pytest.fixture(params=[2, 3], ids=lambda k: f"{k}way")
    def device(self, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AsyncDevice]:
        k = request.param
        pds = make_pds(tmp_path, k + 1)
        ld = make_ld(pds, RaidLevel.RAID1, k, rows=4)
        yield as_async(ld, boundaries=ld_boundaries(ld))
        close_all(pds)


class TestRaid5(WritableContract):
    @pytest.fixture(params=[3, 4, 5], ids=lambda k: f"set{k}")
    def device(self, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AsyncDevice]:
        k = request.param
        pds = make_pds(tmp_path, k + 1)
        ld = make_ld(pds, RaidLevel.RAID5, k, rows=2)
        yield as_async(ld, boundaries=ld_boundaries(ld))
        close_all(pds)


class TestRaid5BigStep(WritableContract):
    """Step = chunklet: one stripe unit per chunklet, parity rotating per row position."""

    @pytest.fixture
    def device(self, tmp_path: Path) -> Iterator[AsyncDevice]:
        pds = make_pds(tmp_path, 4, chunklet_size=16 * KiB)
        ld = make_ld(pds, RaidLevel.RAID5, 4, rows=3, step=16 * KiB)
        yield as_async(ld, boundaries=ld_boundaries(ld))
        close_all(pds)


class TestRaid1Degraded(WritableContract):
    """One mirror's PD failed before any I/O: the survivors serve everything."""

    @pytest.fixture(params=[2, 3], ids=lambda k: f"{k}way")
    def device(self, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AsyncDevice]:
        k = request.param
        pds = make_pds(tmp_path, k + 1)
        ld = make_ld(pds, RaidLevel.RAID1, k, rows=4)
        pds[1].fail("contract test: degraded")
        yield as_async(ld, boundaries=ld_boundaries(ld))
        close_all(pds)


class TestRaid5Degraded(WritableContract):
    """One PD failed: every row it is in runs degraded (it holds data of some stripes and
    parity of others), so reads reconstruct and writes go through reconstruct-write."""

    @pytest.fixture(params=[3, 5], ids=lambda k: f"set{k}")
    def device(self, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AsyncDevice]:
        k = request.param
        pds = make_pds(tmp_path, k + 1)
        ld = make_ld(pds, RaidLevel.RAID5, k, rows=2)
        pds[1].fail("contract test: degraded")
        yield as_async(ld, boundaries=ld_boundaries(ld))
        close_all(pds)


class TestZeroLD(ReadOnlyContract):
    @pytest.fixture
    def device(self) -> AsyncDevice:
        return as_async(ZERO_LD, boundaries=[1 << 20, 1 << 40])
