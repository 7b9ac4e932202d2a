"""Resync after an unclean stop (LogicalDisk.resync): a write that reached some members of
a set and not others is made consistent, so that a later member failure does not change
what reads return.

The proof, as for rebuilds: after the resync, fail any one member; every byte must read
back as it read before the failure."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.contract.devices import close_all, make_ld, make_pds
from thinblock.logical import LogicalDisk, RaidLevel

REDUNDANT = [(RaidLevel.RAID1, 2), (RaidLevel.RAID1, 3), (RaidLevel.RAID5, 3), (RaidLevel.RAID5, 4)]


def tear(ld: LogicalDisk, rng: random.Random, count: int) -> None:
    """Writes that reached one member only: random bytes straight onto a member's chunklet
    (a RAID 1 mirror, or a RAID 5 data or parity unit) behind the LD's back."""
    for _ in range(count):
        row = ld.rows[rng.randrange(len(ld.rows))]
        member = row[rng.randrange(len(row))]
        size = member.pd.chunklet_size
        at = rng.randrange(size - 1)
        n = min(size - at, rng.choice([1, 512, 4096, 9000]))
        member.pd.pwrite(member.offset + at, rng.randbytes(n))


@pytest.mark.parametrize(("raid", "k"), REDUNDANT, ids=lambda v: str(int(v)))
def test_after_a_resync_any_member_may_fail(tmp_path: Path, raid: RaidLevel, k: int) -> None:
    rng = random.Random(int(raid) * 10 + k)
    for victim_col in range(k):
        directory = tmp_path / str(victim_col)
        directory.mkdir()
        pds = make_pds(directory, k + 1, chunklets=2)
        ld = make_ld(pds, raid, k, 2)
        ld.write(0, rng.randbytes(ld.size))
        tear(ld, rng, 40)
        assert ld.resync(0, ld.size) > 0
        assert ld.resync(0, ld.size) == 0  # consistent now: nothing more to rewrite
        before = bytes(ld.read(0, ld.size))
        ld.rows[0][victim_col].pd.fail("drill")
        assert bytes(ld.read(0, ld.size)) == before, f"member {victim_col} failed: reads changed"
        close_all(pds)


def test_resync_of_a_part_touches_only_that_part(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 2, chunklets=1)
    ld = make_ld(pds, RaidLevel.RAID1, 2, 1)
    ld.write(0, bytes(range(256)) * (ld.size // 256))
    second = ld.rows[0][1]
    second.pd.pwrite(second.offset + 100, b"torn")
    second.pd.pwrite(second.offset + ld.size - 100, b"torn")
    assert ld.resync(0, 4096) > 0
    assert bytes(second.pd.as_device(second.offset, ld.size).read(ld.size - 100, 4)) == b"torn"
    close_all(pds)


def test_degraded_rows_are_left_alone(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 3, chunklets=1)
    ld = make_ld(pds, RaidLevel.RAID5, 3, 1)
    ld.write(0, random.Random(1).randbytes(ld.size))
    before = bytes(ld.read(0, ld.size))
    ld.rows[0][1].pd.fail("drill")
    assert ld.resync(0, ld.size) == 0  # nothing consistent to compare against
    assert bytes(ld.read(0, ld.size)) == before
    close_all(pds)


def test_raid0_has_nothing_to_resync(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 2, chunklets=1)
    ld = make_ld(pds, RaidLevel.RAID0, 2, 1)
    ld.write(0, b"x" * 4096)
    assert ld.resync(0, ld.size) == 0
    close_all(pds)
