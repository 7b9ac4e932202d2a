"""Builders for test PDs and LDs: sparse files in a temp dir, tiny chunklets, small steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from thinblock.logical.raid import Chunklet, LogicalDisk, RaidLevel, usable_per_row
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


def expected_placement(
    raid: RaidLevel, k: int, npds: int, offsets: npt.NDArray[np.int64], step: int = STEP
) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """For LD offsets of an LD built by ``make_ld`` (row r = chunklet r of PDs r, r+1, ...),
    the (PD index, PD offset) of every copy of each byte, straight from the layout rules
    written out independently of the implementation:

    * RAID 0: unit u of a row is on column u % k, at chunklet offset (u // k) * step;
    * RAID 1: every column, at the row offset;
    * RAID 5: stripe s has parity on column (k - 1) - s % k and data unit d on column
      (parity + 1 + d) % k, at chunklet offset s * step.
    """
    chunklet = CHUNKLET
    ru = usable_per_row(raid, k, chunklet)
    row, ro = offsets // ru, offsets % ru
    if raid is RaidLevel.RAID1:
        return [((row + c) % npds, row * chunklet + ro) for c in range(k)]
    if raid is RaidLevel.RAID0:
        unit = ro // step
        col, coff = unit % k, (unit // k) * step + ro % step
    else:
        data_per_stripe = (k - 1) * step
        stripe = ro // data_per_stripe
        d = (ro % data_per_stripe) // step
        parity_col = (k - 1) - stripe % k
        col, coff = (parity_col + 1 + d) % k, stripe * step + ro % step
    return [((row + col) % npds, row * chunklet + coff)]


def row_pd_indexes(k: int, npds: int, row: int) -> set[int]:
    """PD indexes (into the list given to ``make_ld``) of row ``row``'s members."""
    return {(row + j) % npds for j in range(k)}
