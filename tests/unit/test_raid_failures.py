"""PDs failing in the middle of an LD request: the LD routes around them (RAID 1, RAID 5) or
reports MediumError (RAID 0, too many failures), and flush reports lost data once."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.contract.devices import STEP, close_all, make_ld, make_pds
from thinblock.errors import MediumError
from thinblock.logical import LogicalDisk, RaidLevel
from thinblock.model import LDHealth
from thinblock.physical.pd import PhysicalDisk


def fail_on(pd: PhysicalDisk, method: str) -> None:
    """Make the PD fail the first time ``method`` is called (as a device error would)."""

    def broken(*args: object) -> None:
        pd.fail(f"test: {method} failed")
        raise MediumError(f"PD {pd.id}: {method} failed")

    setattr(pd, method, broken)


def column_pd(ld: LogicalDisk, row: int, ld_offset_in_row: int) -> PhysicalDisk:
    """The PD holding the RAID 5 data unit at a row offset (first row, set of ld.set_size)."""
    k, step = ld.set_size, ld.step
    s, d = divmod(ld_offset_in_row // step, k - 1)
    parity = k - 1 - s % k
    return ld.rows[row][(parity + 1 + d) % k].pd


def parity_pd(ld: LogicalDisk, row: int, stripe: int) -> PhysicalDisk:
    return ld.rows[row][ld.set_size - 1 - stripe % ld.set_size].pd


@pytest.fixture
def raid1(tmp_path: Path) -> tuple[LogicalDisk, list[PhysicalDisk], bytes]:
    pds = make_pds(tmp_path, 3, chunklets=2)
    ld = make_ld(pds, RaidLevel.RAID1, 3, rows=2)
    data = os.urandom(ld.size)
    ld.write(0, data)
    return ld, pds, data


@pytest.fixture
def raid5(tmp_path: Path) -> tuple[LogicalDisk, list[PhysicalDisk], bytearray]:
    pds = make_pds(tmp_path, 4, chunklets=2)
    ld = make_ld(pds, RaidLevel.RAID5, 4, rows=2)
    data = bytearray(os.urandom(ld.size))
    ld.write(0, data)
    return ld, pds, data


# --- RAID 1 -------------------------------------------------------------------------------
def test_raid1_read_moves_to_the_next_mirror_when_one_fails(
    raid1: tuple[LogicalDisk, list[PhysicalDisk], bytes],
) -> None:
    ld, pds, data = raid1
    heard = []
    first = ld.rows[0][0].pd
    first.add_failure_listener(lambda pd, reason: heard.append(pd.id))
    first.inject_errors(True)
    assert ld.read(100, 5000) == data[100:5100]
    assert first.failed and heard == [first.id]
    assert ld.read(0, ld.size) == data
    assert ld.health is LDHealth.DEGRADED
    close_all(pds)


def test_raid1_write_survives_a_mirror_failing_during_it(
    raid1: tuple[LogicalDisk, list[PhysicalDisk], bytes],
) -> None:
    ld, pds, data = raid1
    fail_on(ld.rows[1][1].pd, "pwrite")
    new = os.urandom(10000)
    ld.write(ld.row_usable + 50, new)
    expected = data[: ld.row_usable + 50] + new + data[ld.row_usable + 10050 :]
    assert ld.read(0, ld.size) == expected
    close_all(pds)


def test_raid1_with_every_mirror_failed_loses_only_that_row(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 4, chunklets=3)
    ld = make_ld(pds, RaidLevel.RAID1, 2, rows=3)  # rows on PDs (0,1), (1,2), (2,3)
    data = os.urandom(ld.size)
    ld.write(0, data)
    pds[1].inject_errors(True)
    pds[2].fail("gone")
    ru = ld.row_usable
    with pytest.raises(MediumError, match="row 1: 2 of 2 members failed"):
        ld.read(ru + 10, 10)
    with pytest.raises(MediumError):
        ld.write(ru, b"x")
    with pytest.raises(MediumError):
        ld.zero(ru, 4096)
    assert ld.read(0, ru) == data[:ru], "row 0 still has PD 0"
    assert ld.read(2 * ru, ru) == data[2 * ru :], "row 2 still has PD 3"
    assert ld.health is LDHealth.FAILED
    assert not ld.is_readable(ru - 1, 2) and ld.is_readable(0, ru) and ld.is_readable(2 * ru, ru)
    close_all(pds)


# --- RAID 5 -------------------------------------------------------------------------------
def test_raid5_small_read_reconstructs_when_its_pd_fails_during_the_read(
    raid5: tuple[LogicalDisk, list[PhysicalDisk], bytearray],
) -> None:
    ld, pds, data = raid5
    victim = column_pd(ld, 0, 5 * STEP)
    victim.inject_errors(True)
    assert ld.read(5 * STEP + 7, 100) == data[5 * STEP + 7 : 5 * STEP + 107]
    assert victim.failed
    assert ld.read(0, ld.size) == data
    close_all(pds)


def test_raid5_large_read_reconstructs_when_a_pd_fails_during_the_read(
    raid5: tuple[LogicalDisk, list[PhysicalDisk], bytearray],
) -> None:
    ld, pds, data = raid5
    pds[2].inject_errors(True)
    assert ld.read(3, ld.size - 3) == data[3:]
    assert pds[2].failed and ld.health is LDHealth.DEGRADED
    close_all(pds)


@pytest.mark.parametrize("victim", ["data-read", "parity-read", "data-write", "parity-write"])
def test_raid5_small_write_survives_a_member_failing_at_any_moment(
    raid5: tuple[LogicalDisk, list[PhysicalDisk], bytearray], victim: str
) -> None:
    ld, pds, data = raid5
    offset = 4 * STEP + 100  # stripe 1, second data unit
    pd = column_pd(ld, 0, offset) if victim.startswith("data") else parity_pd(ld, 0, 1)
    fail_on(pd, "pread_into" if victim.endswith("read") else "pwrite")
    new = os.urandom(1000)
    ld.write(offset, new)
    data[offset : offset + 1000] = new
    assert pd.failed
    assert ld.read(0, ld.size) == data
    close_all(pds)


def test_raid5_write_across_units_survives_its_second_column_failing(
    raid5: tuple[LogicalDisk, list[PhysicalDisk], bytearray],
) -> None:
    ld, pds, data = raid5
    offset = 3 * STEP + STEP // 2  # stripe 1: half of unit 0, unit 1, half of unit 2
    pd = column_pd(ld, 0, offset + STEP)
    fail_on(pd, "pwrite")  # parity and the first piece are written by then
    new = os.urandom(2 * STEP)
    ld.write(offset, new)
    data[offset : offset + 2 * STEP] = new
    assert ld.read(0, ld.size) == data
    close_all(pds)


def test_raid5_full_stripe_write_survives_a_column_failing(
    raid5: tuple[LogicalDisk, list[PhysicalDisk], bytearray],
) -> None:
    ld, pds, data = raid5
    fail_on(ld.rows[0][1].pd, "pwritev")
    new = os.urandom(6 * STEP)  # stripes 2 and 3 of row 0
    ld.write(6 * STEP, new)
    data[6 * STEP : 12 * STEP] = new
    assert ld.read(0, ld.size) == data
    close_all(pds)


def test_raid5_second_failure_during_a_degraded_write_is_reported(
    raid5: tuple[LogicalDisk, list[PhysicalDisk], bytearray],
) -> None:
    ld, pds, _data = raid5
    ld.rows[0][0].pd.fail("first")
    fail_on(ld.rows[0][1].pd, "pwrite")
    with pytest.raises(MediumError, match="row 0: 2 of 4 members failed"):
        ld.write(0, os.urandom(10 * STEP))
    with pytest.raises(MediumError):
        ld.read(0, 10)
    assert ld.health is LDHealth.FAILED
    close_all(pds)


def test_raid5_double_failure_loses_only_that_row(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 5, chunklets=3)
    ld = make_ld(pds, RaidLevel.RAID5, 3, rows=3)  # rows on PDs (0,1,2), (1,2,3), (2,3,4)
    data = os.urandom(ld.size)
    ld.write(0, data)
    pds[0].fail("one")
    pds[1].fail("two")
    ru = ld.row_usable
    for offset in (0, STEP, 5 * STEP + 3, ru - 1):  # units on dead and on live PDs alike
        with pytest.raises(MediumError, match="row 0"):
            ld.read(offset, 1)
    with pytest.raises(MediumError):
        ld.write(10, b"x")
    with pytest.raises(MediumError):
        ld.zero(0, ru)
    assert ld.read(ru, 2 * ru) == data[ru:], "row 1 is degraded (PD 1), row 2 healthy"
    new = os.urandom(ru)
    ld.write(ru + 5, new[: ru - 5])
    assert ld.read(ru + 5, ru - 5) == new[: ru - 5]
    assert ld.failed_members() == [(0, 0), (0, 1), (1, 0)]
    close_all(pds)


# --- flush --------------------------------------------------------------------------------
def test_flush_reports_lost_data_once(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 3, chunklets=1)
    ld = make_ld(pds, RaidLevel.RAID0, 3, rows=1)
    ld.write(0, b"x" * 100)
    ld.flush()
    pds[1].fail("gone")
    with pytest.raises(MediumError, match="data lost in row"):
        ld.flush()
    ld.flush()  # reported once, as fsync does
    close_all(pds)


def test_flush_tolerates_a_redundant_member_failing_its_fsync(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 3, chunklets=1)
    ld = make_ld(pds, RaidLevel.RAID1, 3, rows=1)
    ld.write(0, b"x" * 100)
    pds[2].inject_errors(True)
    ld.flush()
    assert pds[2].failed and ld.health is LDHealth.DEGRADED
    assert ld.read(0, 100) == b"x" * 100
    close_all(pds)


def test_an_ld_built_on_a_dead_pd_does_not_report_old_losses(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 2, chunklets=1)
    pds[0].fail("died before the engine started")
    ld = make_ld(pds, RaidLevel.RAID0, 2, rows=1)
    assert ld.health is LDHealth.FAILED
    ld.flush()
    close_all(pds)


# --- threads ------------------------------------------------------------------------------
def test_raid5_writes_from_two_threads_to_one_stripe_keep_parity(tmp_path: Path) -> None:
    """The engine zeroes from worker threads while the loop writes: two read-modify-writes of
    the same stripe (different bytes) must not interleave, or the parity goes stale."""
    pds = make_pds(tmp_path, 3, chunklets=1)
    ld = make_ld(pds, RaidLevel.RAID5, 3, rows=1)
    half = STEP  # thread A owns unit 0 of every stripe, thread B unit 1
    model = bytearray(ld.size)

    def worker(unit: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(1500):
            stripe = int(rng.integers(0, 3))  # few stripes: the threads collide often
            a = stripe * 2 * half + unit * half + int(rng.integers(0, half - 100))
            data = rng.bytes(100)
            if rng.random() < 0.2:
                ld.zero(a, 100)
                data = bytes(100)
            else:
                ld.write(a, data)
            model[a : a + 100] = data

    threads = [threading.Thread(target=worker, args=(u, u + 1)) for u in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    raw = np.stack([np.fromfile(pd.path, np.uint8) for pd in pds])
    assert not np.bitwise_xor.reduce(raw, axis=0).any(), "parity must match the data"
    assert ld.read(0, ld.size) == model
    close_all(pds)
