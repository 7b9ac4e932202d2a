"""Rebuild of a failed member onto a spare chunklet, in steps, with I/O in between.

The proof that a rebuild is right: once it is done, fail *another* member of the set;
everything must still read back as written, including what was written during the
rebuild (below and above the watermark)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.contract.devices import CHUNKLET, close_all, make_ld, make_pds
from thinblock.errors import Conflict, InvalidArgument, MediumError
from thinblock.logical import Chunklet, LogicalDisk, RaidLevel
from thinblock.model import LDHealth
from thinblock.physical.pd import PhysicalDisk
from thinblock.units import KiB

REDUNDANT = [(RaidLevel.RAID1, 2), (RaidLevel.RAID1, 3), (RaidLevel.RAID5, 3), (RaidLevel.RAID5, 4)]


def setup_ld(
    tmp_path: Path, raid: RaidLevel, k: int, rows: int = 2
) -> tuple[LogicalDisk, list[PhysicalDisk]]:
    """An LD on PDs 0..k (rows rotate over them), plus one spare PD (the last) with room for
    a replacement chunklet per row."""
    pds = make_pds(tmp_path, k + 1, chunklets=rows)
    spare = make_pds(tmp_path, 1, chunklets=rows, first_id=100)[0]
    return make_ld(pds, raid, k, rows), [*pds, spare]


def churn(ld: LogicalDisk, model: bytearray, rng: random.Random, count: int) -> None:
    """Random writes and zeroes anywhere (below, across and above any rebuild watermark)."""
    for _ in range(count):
        a = rng.randrange(ld.size)
        n = min(ld.size - a, rng.choice([1, 100, 4096, 10000, 70000]))
        if rng.random() < 0.75:
            data = rng.randbytes(n)
            ld.write(a, data)
            model[a : a + n] = data
        else:
            ld.zero(a, n)
            model[a : a + n] = bytes(n)


@pytest.mark.parametrize(("raid", "k"), REDUNDANT, ids=lambda v: str(int(v)))
def test_rebuild_in_steps_with_io_between_then_lose_another_member(
    tmp_path: Path, raid: RaidLevel, k: int
) -> None:
    ld, pds = setup_ld(tmp_path, raid, k)
    spare = pds[-1]
    rng = random.Random(k * 10 + int(raid))
    model = bytearray(rng.randbytes(ld.size))
    ld.write(0, model)

    victim = ld.rows[1][1].pd
    victim.fail("drill")
    assert ld.health is LDHealth.DEGRADED
    members = ld.failed_members()
    assert (1, 1) in members
    jobs = [ld.start_rebuild(r, c, Chunklet(spare, r)) for r, c in members]
    assert ld.health is LDHealth.REBUILDING
    assert ld.rebuild_jobs == jobs

    steps = 0
    while not all(job.done for job in jobs):
        for job in jobs:
            done_before = job.bytes_done
            copied = job.step(max_bytes=8 * KiB)
            assert job.bytes_done == done_before + copied
            assert 0 < job.bytes_done <= job.bytes_total == CHUNKLET or job.done
        churn(ld, model, rng, 3)
        assert ld.read(0, ld.size) == model, f"after step {steps}"
        steps += 1
    assert steps >= CHUNKLET // (8 * KiB)
    assert all(job.step() == 0 for job in jobs)

    # The replacements took the failed members' places; the LD is whole again.
    for job in jobs:
        assert ld.rows[job.row][job.column] == Chunklet(spare, job.row)
    assert ld.failed_members() == []
    assert ld.health is LDHealth.NORMAL
    assert ld.rebuild_jobs == []
    ld.flush()

    # Now lose another member of every row: the rebuilt copy must carry the data.
    other = next(ch.pd for ch in ld.rows[1] if ch.pd is not spare and ch.pd is not victim)
    other.fail("second drill")
    assert ld.read(0, ld.size) == model
    churn(ld, model, rng, 10)
    assert ld.read(0, ld.size) == model
    close_all(pds)


def test_rebuild_copies_writes_made_above_the_watermark_later(tmp_path: Path) -> None:
    ld, pds = setup_ld(tmp_path, RaidLevel.RAID1, 2, rows=1)
    spare = pds[-1]
    ld.write(0, os.urandom(ld.size))
    ld.rows[0][0].pd.fail("drill")
    job = ld.start_rebuild(0, 0, Chunklet(spare, 0))
    job.step(16 * KiB)
    ld.write(40 * KiB, b"above" * 100)  # not copied by the write: the rebuild gets there later
    ld.write(1 * KiB, b"below" * 100)  # copied by the write itself
    while not job.done:
        job.step(16 * KiB)
    buf = bytearray(500)
    spare.pread_into(40 * KiB, memoryview(buf))
    assert buf == b"above" * 100
    spare.pread_into(1 * KiB, memoryview(buf))
    assert buf == b"below" * 100
    close_all(pds)


def test_reads_never_use_the_replacement_before_it_is_done(tmp_path: Path) -> None:
    ld, pds = setup_ld(tmp_path, RaidLevel.RAID1, 2, rows=1)
    spare = pds[-1]
    data = os.urandom(ld.size)
    ld.write(0, data)
    ld.rows[0][1].pd.fail("drill")
    job = ld.start_rebuild(0, 1, Chunklet(spare, 0))
    job.step(32 * KiB)
    spare.pwrite(0, b"\xee" * ld.size)  # scribble on the replacement behind the LD's back
    assert ld.read(0, ld.size) == data
    close_all(pds)


def test_rebuild_of_several_rows_of_one_pd(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 5, chunklets=4)
    ld = make_ld(pds, RaidLevel.RAID5, 3, rows=4)  # PD 2 is in rows 0, 1 and 2
    spares = make_pds(tmp_path, 2, chunklets=4, first_id=50)
    data = os.urandom(ld.size)
    ld.write(0, data)
    pds[2].fail("drill")
    members = ld.failed_members()
    assert [m[0] for m in members] == [0, 1, 2]
    jobs = []
    for i, (r, c) in enumerate(members):
        # A replacement must be on a PD not already in its row.
        spare = spares[i % 2]
        jobs.append(ld.start_rebuild(r, c, Chunklet(spare, r)))
    while not all(job.done for job in jobs):
        for job in jobs:
            job.step(64 * KiB)
    assert ld.health is LDHealth.NORMAL
    pds[1].fail("second")  # in rows 0 and 1 (and 3, which never lost anything)
    assert ld.read(0, ld.size) == data
    close_all([*pds, *spares])


def test_replacement_failing_ends_the_rebuild_but_not_the_io(tmp_path: Path) -> None:
    ld, pds = setup_ld(tmp_path, RaidLevel.RAID5, 3, rows=1)
    spare = pds[-1]
    data = bytearray(os.urandom(ld.size))
    ld.write(0, data)
    ld.rows[0][2].pd.fail("drill")
    job = ld.start_rebuild(0, 2, Chunklet(spare, 0))
    job.step(16 * KiB)
    spare.inject_errors(True)
    ld.write(100, b"still works")  # below the watermark: tries the replacement, which fails
    data[100:111] = b"still works"
    assert job.error is not None and "injected" in job.error
    with pytest.raises(MediumError, match="rebuild of LD 1 row 0 column 2 failed"):
        job.step()
    assert ld.health is LDHealth.DEGRADED
    assert ld.rebuild_jobs == []
    assert ld.read(0, ld.size) == data
    # A new rebuild onto another spare finishes the job.
    other_spare = make_pds(tmp_path, 1, chunklets=1, first_id=200)[0]
    job2 = ld.start_rebuild(0, 2, Chunklet(other_spare, 0))
    while not job2.done:
        job2.step()
    assert ld.health is LDHealth.NORMAL
    assert ld.read(0, ld.size) == data
    close_all([*pds, other_spare])


def test_second_failure_during_raid5_rebuild_ends_it(tmp_path: Path) -> None:
    ld, pds = setup_ld(tmp_path, RaidLevel.RAID5, 3, rows=1)
    ld.write(0, os.urandom(ld.size))
    ld.rows[0][0].pd.fail("first")
    job = ld.start_rebuild(0, 0, Chunklet(pds[-1], 0))
    job.step(16 * KiB)
    ld.rows[0][1].pd.fail("second")
    with pytest.raises(MediumError):
        job.step()
    assert job.error is not None and not job.done
    assert ld.health is LDHealth.FAILED
    close_all(pds)


def test_cancel(tmp_path: Path) -> None:
    ld, pds = setup_ld(tmp_path, RaidLevel.RAID1, 2, rows=1)
    ld.rows[0][0].pd.fail("drill")
    job = ld.start_rebuild(0, 0, Chunklet(pds[-1], 0))
    job.step(16 * KiB)
    job.cancel()
    assert ld.health is LDHealth.DEGRADED and ld.rebuild_jobs == []
    with pytest.raises(MediumError, match="cancelled"):
        job.step()
    # The member can be rebuilt again.
    ld.start_rebuild(0, 0, Chunklet(pds[-1], 0))
    close_all(pds)


def test_start_rebuild_refuses_what_cannot_work(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 6, chunklets=3)
    odd = PhysicalDisk.open(
        77, str(tmp_path / "odd"), size=512 * KiB, chunklet_size=128 * KiB, create=True, allow_tiny=True
    )
    raid0 = make_ld(pds[:2], RaidLevel.RAID0, 2, rows=1, ld_id=1)
    raid5 = make_ld(pds[:4], RaidLevel.RAID5, 3, rows=2, ld_id=2, first_chunklet=1)  # rows (0,1,2), (1,2,3)
    spare = pds[5]
    pds[0].fail("x")
    with pytest.raises(Conflict, match="RAID 0"):
        raid0.start_rebuild(0, 0, Chunklet(spare, 0))
    with pytest.raises(InvalidArgument, match="no member"):
        raid5.start_rebuild(2, 0, Chunklet(spare, 0))
    with pytest.raises(InvalidArgument, match="no member"):
        raid5.start_rebuild(0, 3, Chunklet(spare, 0))
    with pytest.raises(Conflict, match="has not failed"):
        raid5.start_rebuild(0, 1, Chunklet(spare, 0))
    with pytest.raises(InvalidArgument, match="already holds a member"):
        raid5.start_rebuild(0, 0, Chunklet(pds[1], 0))
    with pytest.raises(InvalidArgument, match="chunklets of 131072 bytes"):
        raid5.start_rebuild(0, 0, Chunklet(odd, 0))
    with pytest.raises(InvalidArgument, match="no chunklet 9"):
        raid5.start_rebuild(0, 0, Chunklet(spare, 9))
    with pytest.raises(InvalidArgument, match="already belongs"):
        raid5.start_rebuild(0, 0, Chunklet(pds[3], 2))  # PD 3 is not in row 0, but that chunklet is row 1's
    pds[4].fail("dead spare")
    with pytest.raises(InvalidArgument, match="has failed"):
        raid5.start_rebuild(0, 0, Chunklet(pds[4], 0))
    raid5.start_rebuild(0, 0, Chunklet(spare, 0))
    with pytest.raises(Conflict, match="already being rebuilt"):
        raid5.start_rebuild(0, 0, Chunklet(spare, 2))
    pds[2].fail("y")  # row 0 now has two failed members
    with pytest.raises(Conflict, match="lost its data"):
        raid5.start_rebuild(0, 2, Chunklet(pds[3], 0))
    close_all([*pds, odd])


def test_rebuildable_members_skip_lost_rows_and_running_jobs(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 6, chunklets=3)
    ld = make_ld(pds[:5], RaidLevel.RAID5, 3, rows=3)  # rows on PDs (0,1,2), (1,2,3), (2,3,4)
    raid0 = make_ld(pds[:2], RaidLevel.RAID0, 2, rows=1, ld_id=2, first_chunklet=2)
    assert ld.rebuildable_members() == []
    pds[0].fail("one")
    pds[1].fail("two")  # row 0 lost; row 1 degraded (PD 1 is its column 0)
    assert ld.health is LDHealth.FAILED
    assert ld.rebuildable_members() == [(1, 0)]
    ld.start_rebuild(1, 0, Chunklet(pds[5], 1))
    assert ld.rebuildable_members() == []
    assert raid0.rebuildable_members() == []
    close_all(pds)


def test_a_raid0_member_is_reinstated_as_it_is_and_only_by_its_own_chunklet(tmp_path: Path) -> None:
    """``reinstate_member``: RAID 0 only, the same chunklet of the same PD reopened; the data is
    what it was, and the LD is whole again."""
    pds = make_pds(tmp_path, 2, chunklets=2)
    ld = make_ld(pds, RaidLevel.RAID0, 2, 2)
    data = random.Random(7).randbytes(ld.size)
    ld.write(0, data)
    victim = ld.rows[0][1].pd
    victim.fail("drill")
    assert ld.health == LDHealth.FAILED
    with pytest.raises(MediumError):
        ld.read(0, ld.size)
    with pytest.raises(Conflict, match="has not failed"):
        ld.reinstate_member(0, 0, ld.rows[0][0])
    victim.close()  # as Engine.restore_pd does: the PD is opened anew
    reopened = PhysicalDisk.open(
        victim.id,
        victim.path,
        size=victim.size,
        chunklet_size=victim.chunklet_size,
        create=False,
        allow_tiny=True,
    )
    wrong = Chunklet(reopened, 1 - ld.rows[0][1].index)
    with pytest.raises(InvalidArgument, match="is not its member"):
        ld.reinstate_member(0, 1, wrong)
    for row, chunklets in enumerate(ld.rows):
        for col, chunklet in enumerate(chunklets):
            if chunklet.pd is victim:
                ld.reinstate_member(row, col, Chunklet(reopened, chunklet.index))
    assert ld.health == LDHealth.NORMAL
    assert ld.read(0, ld.size) == data
    close_all([pd for pd in pds if pd is not victim] + [reopened])


def test_a_redundant_member_is_never_reinstated(tmp_path: Path) -> None:
    ld, pds = setup_ld(tmp_path, RaidLevel.RAID1, 2)
    member = ld.rows[0][0]
    member.pd.fail("drill")
    with pytest.raises(Conflict, match="rebuilt, not reinstated"):
        ld.reinstate_member(0, 0, member)
    close_all(pds)
