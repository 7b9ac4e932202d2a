"""RAID layout: policy checks, where every byte lands on the PDs, parity on disk, and how
many syscalls a request costs (the hot path: one pread for a small read, one preadv per
chunklet for a large one)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.contract.devices import CHUNKLET, STEP, close_all, expected_placement, make_ld, make_pds
from thinblock.errors import InvalidArgument
from thinblock.logical import Chunklet, LogicalDisk, RaidLevel, usable_per_row, validate_policy
from thinblock.model import LDHealth
from thinblock.physical.pd import PhysicalDisk
from thinblock.units import KiB, MiB

CONFIGS = [
    (RaidLevel.RAID0, 1),
    (RaidLevel.RAID0, 3),
    (RaidLevel.RAID1, 2),
    (RaidLevel.RAID1, 3),
    (RaidLevel.RAID5, 3),
    (RaidLevel.RAID5, 4),
    (RaidLevel.RAID5, 9),
]


def config_id(cfg: tuple[RaidLevel, int]) -> str:
    return f"raid{int(cfg[0])}-set{cfg[1]}"


# --- policy -------------------------------------------------------------------------------
def test_usable_per_row() -> None:
    assert usable_per_row(RaidLevel.RAID0, 4, MiB) == 4 * MiB
    assert usable_per_row(RaidLevel.RAID1, 2, MiB) == MiB
    assert usable_per_row(RaidLevel.RAID1, 3, MiB) == MiB
    assert usable_per_row(RaidLevel.RAID5, 3, MiB) == 2 * MiB
    assert usable_per_row(5, 9, MiB) == 8 * MiB


@pytest.mark.parametrize(
    ("raid", "set_size", "step", "message"),
    [
        (2, 3, 4096, "RAID level must be 0, 1 or 5"),
        (6, 4, 4096, "RAID level must be 0, 1 or 5"),
        (0, 0, 4096, "RAID 0 set size"),
        (0, 33, 4096, "RAID 0 set size"),
        (1, 1, 4096, "2 or 3"),
        (1, 4, 4096, "2 or 3"),
        (5, 2, 4096, "3 to 9"),
        (5, 10, 4096, "3 to 9"),
        (5, 4, 3000, "power of two"),
        (5, 4, 256, "power of two from 512"),
        (5, 4, 2 * MiB, "power of two from 512"),
        (0, 2, 0, "power of two"),
    ],
)
def test_bad_policies_are_refused(raid: int, set_size: int, step: int, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_policy(raid, set_size, step)


def test_good_policies_pass() -> None:
    for raid, k in [(0, 1), (0, 32), (1, 2), (1, 3), (5, 3), (5, 9)]:
        validate_policy(raid, k, 128 * KiB)
    with pytest.raises(InvalidArgument, match="larger than the chunklet"):
        validate_policy(5, 3, 128 * KiB, chunklet_size=64 * KiB)


def test_ld_construction_checks_its_chunklets(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 4)
    other = PhysicalDisk.open(
        9, str(tmp_path / "other"), size=MiB, chunklet_size=128 * KiB, create=True, allow_tiny=True
    )
    a, b, c, d = pds
    cases: list[tuple[list[list[Chunklet]], str]] = [
        ([], "at least one row"),
        ([[Chunklet(a, 0), Chunklet(b, 0)]], "row 0 has 2 chunklets"),
        ([[Chunklet(a, 0), Chunklet(a, 1), Chunklet(b, 0)]], "uses a PD twice"),
        ([[Chunklet(a, 0), Chunklet(b, 0), Chunklet(c, 0)], [Chunklet(a, 0), Chunklet(b, 1), Chunklet(d, 1)]],
         "used twice"),
        ([[Chunklet(a, 0), Chunklet(b, 0), Chunklet(other, 0)]], "chunklets of 131072 bytes"),
        ([[Chunklet(a, 0), Chunklet(b, 0), Chunklet(c, 99)]], "no chunklet 99"),
    ]  # fmt: skip
    for rows, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            LogicalDisk(1, RaidLevel.RAID5, 3, STEP, rows)
    with pytest.raises(InvalidArgument, match="larger than the chunklet"):
        LogicalDisk(1, RaidLevel.RAID5, 3, 128 * KiB, [[Chunklet(a, 0), Chunklet(b, 0), Chunklet(c, 0)]])
    ld = LogicalDisk(3, 5, 3, STEP, [[Chunklet(a, 0), Chunklet(b, 0), Chunklet(c, 0)]])
    assert (ld.id, ld.raid, ld.set_size, ld.step, ld.chunklet_size) == (3, RaidLevel.RAID5, 3, STEP, CHUNKLET)
    assert ld.size == 2 * CHUNKLET and ld.health is LDHealth.NORMAL
    assert ld.pds == [a, b, c] and ld.failed_members() == []
    close_all([*pds, other])


# --- where bytes land ---------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_every_byte_lands_where_the_layout_says(tmp_path: Path, cfg: tuple[RaidLevel, int]) -> None:
    raid, k = cfg
    npds, rows = k + 1, 3
    pds = make_pds(tmp_path, npds, chunklets=rows)
    ld = make_ld(pds, raid, k, rows)
    data = np.frombuffer(os.urandom(ld.size), np.uint8)
    # Write in uneven pieces so that every write path is used.
    pos, rng = 0, np.random.default_rng(5)
    while pos < ld.size:
        n = min(ld.size - pos, int(rng.choice([1, 100, 4096, 5000, 3 * STEP, 70000])))
        ld.write(pos, data[pos : pos + n].tobytes())
        pos += n
    raw = np.stack([np.fromfile(pd.path, np.uint8) for pd in pds])
    offsets = np.arange(ld.size, dtype=np.int64)
    for pd_index, pd_offset in expected_placement(raid, k, npds, offsets):
        assert np.array_equal(raw[pd_index, pd_offset], data)
    if raid is RaidLevel.RAID5:
        # Parity: in every row, the XOR of all columns (data and parity) is zero.
        for r in range(rows):
            cols = raw[[(r + c) % npds for c in range(k)], r * CHUNKLET : (r + 1) * CHUNKLET]
            assert not np.bitwise_xor.reduce(cols, axis=0).any(), f"row {r} parity"
    assert bytes(ld.read(0, ld.size)) == data.tobytes()
    close_all(pds)


def test_raid5_parity_rotates_left_symmetric(tmp_path: Path) -> None:
    """The diagram in raid.py: stripe 0 parity on the last column, then one to the left."""
    pds = make_pds(tmp_path, 4, chunklets=1)
    ld = make_ld(pds, RaidLevel.RAID5, 4, rows=1)
    for unit in range(12):  # D0..D11: unit u filled with byte u + 1
        ld.write(unit * STEP, bytes([unit + 1]) * STEP)
    first_bytes = [[pd_bytes(pd, s * STEP) for pd in pds] for s in range(4)]
    assert first_bytes == [
        [1, 2, 3, 1 ^ 2 ^ 3],
        [5, 6, 4 ^ 5 ^ 6, 4],
        [9, 7 ^ 8 ^ 9, 7, 8],
        [10 ^ 11 ^ 12, 10, 11, 12],
    ]
    close_all(pds)


def pd_bytes(pd: PhysicalDisk, offset: int) -> int:
    buf = bytearray(1)
    pd.pread_into(offset, memoryview(buf))
    return buf[0]


# --- syscalls per request -----------------------------------------------------------------
def count_io(pds: list[PhysicalDisk]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for pd in pds:
        for name in ("pread_into", "preadv", "pwrite", "pwritev", "punch"):
            original = getattr(pd, name)

            def wrapper(*args: Any, _name: str = name, _orig: Callable[..., Any] = original) -> Any:
                counts[_name] += 1
                return _orig(*args)

            setattr(pd, name, wrapper)
    return counts


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_small_read_is_one_pread(tmp_path: Path, cfg: tuple[RaidLevel, int]) -> None:
    raid, k = cfg
    pds = make_pds(tmp_path, k + 1, chunklets=2)
    ld = make_ld(pds, raid, k, rows=2)
    counts = count_io(pds)
    buf = memoryview(bytearray(4096))
    for offset in (0, 3 * STEP, ld.row_usable + STEP, ld.size - 4096):
        counts.clear()
        ld.read_into(offset, buf)
        assert counts == Counter(pread_into=1), offset
    close_all(pds)


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_large_read_is_one_preadv_per_chunklet(tmp_path: Path, cfg: tuple[RaidLevel, int]) -> None:
    raid, k = cfg
    pds = make_pds(tmp_path, k + 1, chunklets=2)
    ld = make_ld(pds, raid, k, rows=2)
    counts = count_io(pds)
    ld.read_into(0, memoryview(bytearray(ld.row_usable)))  # all of row 0
    data_chunklets = 1 if raid is RaidLevel.RAID1 else k
    assert counts["pread_into"] + counts["preadv"] == data_chunklets
    counts.clear()
    ld.read_into(STEP // 2, memoryview(bytearray(ld.size - STEP)))  # both rows, unaligned ends
    assert counts["pread_into"] + counts["preadv"] == 2 * data_chunklets
    close_all(pds)


def test_raid5_small_write_is_read_modify_write(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 5, chunklets=1)
    ld = make_ld(pds, RaidLevel.RAID5, 5, rows=1)
    counts = count_io(pds)
    ld.write(STEP + 100, b"x" * 1000)
    # old data + old parity read, new data + new parity written: nothing else touched.
    assert counts == Counter(pread_into=2, pwrite=2)
    close_all(pds)


def test_raid5_full_stripe_write_reads_nothing(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 5, chunklets=1)
    ld = make_ld(pds, RaidLevel.RAID5, 5, rows=1)
    counts = count_io(pds)
    stripe = 4 * STEP
    ld.write(stripe, os.urandom(3 * stripe))  # three whole stripes
    assert counts == Counter(pwritev=5), "one vectored write per column, no reads"
    close_all(pds)


def test_raid1_write_goes_to_every_mirror(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 3, chunklets=1)
    ld = make_ld(pds, RaidLevel.RAID1, 3, rows=1)
    counts = count_io(pds)
    ld.write(5, b"mirror me")
    assert counts == Counter(pwrite=3)
    for pd in pds:
        buf = bytearray(9)
        pd.pread_into(5, memoryview(buf))
        assert buf == b"mirror me"
    close_all(pds)


def test_zero_punches_whole_stripes_and_writes_partial_ones(tmp_path: Path) -> None:
    pds = make_pds(tmp_path, 4, chunklets=1)
    ld = make_ld(pds, RaidLevel.RAID5, 4, rows=1)
    ld.write(0, os.urandom(ld.size))
    stripe = 3 * STEP
    counts = count_io(pds)
    ld.zero(stripe - 10, 5 * stripe + 20)  # 10 bytes, five whole stripes, 10 bytes
    assert counts["punch"] == 4, "one punch per column over the whole stripes"
    assert counts["pwrite"] == 4, "each partial piece: data + parity"
    assert ld.read(stripe - 10, 5 * stripe + 20) == bytes(5 * stripe + 20)
    raw = np.stack([np.fromfile(pd.path, np.uint8) for pd in pds])
    assert not np.bitwise_xor.reduce(raw, axis=0).any(), "parity stays consistent"
    close_all(pds)


def test_large_requests_with_many_units(tmp_path: Path) -> None:
    """A request of more units than IOV_MAX per column still reads and writes right."""
    pds = make_pds(tmp_path, 3, chunklets=1, chunklet_size=8 * MiB)
    ld = LogicalDisk(1, RaidLevel.RAID5, 3, 512, [[Chunklet(pd, 0) for pd in pds]])
    data = os.urandom(6 * MiB + 777)
    ld.write(300, data)
    assert ld.read(300, len(data)) == data
    close_all(pds)


@pytest.mark.parametrize(("raid", "k"), [(0, 3), (1, 2), (5, 3)])
def test_allocate_covers_every_member_byte_a_write_of_the_range_touches(
    tmp_path: Path, raid: int, k: int
) -> None:
    """LogicalDisk.allocate (issue 10 case 5): every chunklet byte a write of the range lands on
    (data and RAID 5 parity) is allocated beforehand, so the write itself needs no new space."""
    from thinblock.physical import pd as pd_module

    pds = make_pds(tmp_path, k, chunklets=1, chunklet_size=MiB)
    ld = LogicalDisk(1, raid, k, 64 * KiB, [[Chunklet(pd, 0) for pd in pds]])
    allocated: dict[int, set[int]] = {pd.id: set() for pd in pds}
    written: dict[int, set[int]] = {pd.id: set() for pd in pds}
    real = pd_module.fallocate_space
    by_fd = {pd.fd: pd.id for pd in pds}

    def record(fd: int, offset: int, length: int) -> None:
        allocated[by_fd[fd]].update(range(offset // 4096, (offset + length) // 4096))
        real(fd, offset, length)

    pd_module.fallocate_space = record  # type: ignore[assignment]
    try:
        ld.allocate(96 * KiB, 200 * KiB)
    finally:
        pd_module.fallocate_space = real  # type: ignore[assignment]
    for pd in pds:
        original = pd.pwrite

        def spy(offset: int, data: object, pd_id: int = pd.id, write=original) -> None:  # type: ignore[no-untyped-def]
            written[pd_id].update(range(offset // 4096, (offset + len(data)) // 4096))  # type: ignore[arg-type]
            write(offset, data)

        pd.pwrite = spy  # type: ignore[method-assign]
        pd.pwritev = (
            lambda offset, bufs, spy=spy: [  # type: ignore[method-assign]
                spy(offset + sum(len(b) for b in bufs[:i]), b) for i, b in enumerate(bufs)
            ]
        )
    ld.write(96 * KiB, bytes(range(256)) * (200 * KiB // 256))
    for pd in pds:
        assert written[pd.id] <= allocated[pd.id], f"PD {pd.id}: written outside what was allocated"
        assert written[pd.id], f"PD {pd.id} took no part in the write"
