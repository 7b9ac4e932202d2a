"""Builders for test PDs and LDs: sparse files in a temp dir, tiny chunklets, small steps."""

from __future__ import annotations

from pathlib import Path

from thinblock.logical.raid import Chunklet, LogicalDisk, RaidLevel
from thinblock.physical.pd import PhysicalDisk
from thinblock.units import KiB

CHUNKLET = 64 * KiB
STEP = 4 * KiB


def make_pds(
    directory: Path, count: int, *, chunklets: int = 8, chunklet_size: int = CHUNKLET, first_id: int = 1
) -> list[PhysicalDisk]:
    """``count`` sparse-file PDs of ``chunklets`` chunklets each."""
    return [
        PhysicalDisk.open(
            first_id + i,
            str(directory / f"pd{first_id + i}.img"),
            size=chunklets * chunklet_size,
            chunklet_size=chunklet_size,
            create=True,
            allow_tiny=True,
        )
        for i in range(count)
    ]


def make_ld(
    pds: list[PhysicalDisk],
    raid: RaidLevel,
    set_size: int,
    rows: int,
    *,
    step: int = STEP,
    ld_id: int = 1,
    first_chunklet: int = 0,
) -> LogicalDisk:
    """An LD whose row ``r`` takes chunklet ``first_chunklet + r`` of PDs ``r, r+1, ...``
    (round the list): rows rotate over the PDs, so one PD holds different columns of
    different rows, as a real allocator spreads them."""
    layout = [
        [Chunklet(pds[(r + j) % len(pds)], first_chunklet + r) for j in range(set_size)] for r in range(rows)
    ]
    return LogicalDisk(ld_id, raid, set_size, step, layout)


def ld_boundaries(ld: LogicalDisk) -> list[int]:
    """Offsets where a RAID layout changes hands: rows, stripes, units (for the contract suite)."""
    k, step = ld.set_size, ld.step
    stripe = {RaidLevel.RAID0: k * step, RaidLevel.RAID1: step, RaidLevel.RAID5: (k - 1) * step}[ld.raid]
    marks = {step, stripe, 2 * stripe + step, ld.row_usable, ld.row_usable + stripe}
    marks.update(r * ld.row_usable for r in range(1, len(ld.rows)))
    return sorted(m for m in marks if 0 < m < ld.size)


def close_all(pds: list[PhysicalDisk]) -> None:
    for pd in pds:
        pd.close()
