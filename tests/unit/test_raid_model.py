"""Random reads, writes and zeroes on every RAID level against a bytearray model, with PDs
failing (or starting to return errors) at random moments.

What the model expects (the rules of issue 2):
* RAID 1 and RAID 5 with one failed member per set: every operation succeeds and the
  contents equal the model, whether the PD was failed beforehand or fails during an I/O.
* RAID 0: an operation touching a stripe unit of a failed PD raises MediumError; others
  succeed.  A RAID 5 row with two failed members, or a RAID 1 row with all mirrors failed,
  raises MediumError for any operation touching it; other rows keep working.
* After a write raised MediumError its range is undefined; everything else must match.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.contract.devices import (
    CHUNKLET,
    STEP,
    close_all,
    expected_placement,
    make_ld,
    make_pds,
    row_pd_indexes,
)
from thinblock.errors import MediumError
from thinblock.logical import LogicalDisk, RaidLevel
from thinblock.model import LDHealth
from thinblock.physical.pd import PhysicalDisk

ROWS = 3
CONFIGS = [
    (RaidLevel.RAID0, 3),
    (RaidLevel.RAID1, 2),
    (RaidLevel.RAID1, 3),
    (RaidLevel.RAID5, 3),
    (RaidLevel.RAID5, 4),
    (RaidLevel.RAID5, 5),
]
MAX_FAILURES = {RaidLevel.RAID0: 1, RaidLevel.RAID1: 3, RaidLevel.RAID5: 2}


def reopen_pds(directory: Path, count: int) -> list[PhysicalDisk]:
    """Fresh, healthy, all-zero PDs on files made once per test (creating files costs fsyncs,
    which would dominate every example)."""
    paths = [directory / f"pd{i + 1}.img" for i in range(count)]
    if not paths[-1].exists():
        close_all(make_pds(directory, count, chunklets=ROWS))
    pds = [
        PhysicalDisk.open(i + 1, str(p), size=None, chunklet_size=CHUNKLET, create=False, allow_tiny=True)
        for i, p in enumerate(paths)
    ]
    for pd in pds:
        pd.punch(0, pd.size)
    return pds


@functools.cache
def data_pd_of_every_byte(raid: RaidLevel, k: int, npds: int, size: int) -> np.ndarray:
    return expected_placement(raid, k, npds, np.arange(size, dtype=np.int64))[0][0]


class Harness:
    def __init__(self, directory: Path, raid: RaidLevel, k: int) -> None:
        self.raid, self.k = raid, k
        self.npds = k + 2  # more PDs than the set: rows land on different PD sets
        self.pds = reopen_pds(directory, self.npds)
        self.ld: LogicalDisk = make_ld(self.pds, raid, k, ROWS)
        size = self.ld.size
        self.model = bytearray(size)
        self.known = np.ones(size, bool)  # False where a failed write left bytes undefined
        self.data_pd = data_pd_of_every_byte(raid, k, self.npds, size)  # used for RAID 0
        self.broken: set[int] = set()  # PD indexes failed or returning errors

    def lost(self, a: int, n: int, broken: set[int]) -> bool:
        """Does an operation on [a, a + n) have to raise MediumError with these PDs broken?"""
        if not broken:
            return False
        if self.raid is RaidLevel.RAID0:
            return bool(np.isin(self.data_pd[a : a + n], list(broken)).any())
        tolerated = self.k - 1 if self.raid is RaidLevel.RAID1 else 1
        rows = range(a // self.ld.row_usable, (a + n - 1) // self.ld.row_usable + 1)
        return any(len(row_pd_indexes(self.k, self.npds, r) & broken) > tolerated for r in rows)

    def actually_failed(self) -> set[int]:
        return {i for i, pd in enumerate(self.pds) if pd.failed}


def draw_range(data: st.DataObject, h: Harness) -> tuple[int, int]:
    size, ru = h.ld.size, h.ld.row_usable
    marks = [0, STEP, ru, 2 * ru, size - 1, (h.k - 1) * STEP, h.k * STEP]
    a = data.draw(
        st.one_of(
            st.integers(0, size - 1),
            st.builds(lambda m, d: min(max(m + d, 0), size - 1), st.sampled_from(marks), st.integers(-9, 9)),
        ),
        label="offset",
    )
    n = data.draw(
        st.one_of(st.integers(1, 64), st.integers(1, 4 * STEP * h.k), st.integers(1, size)), label="len"
    )
    return a, min(n, size - a)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@pytest.mark.parametrize(("raid", "k"), CONFIGS, ids=lambda v: str(int(v)))
@given(data=st.data())
def test_random_io_with_failures_matches_model(
    tmp_path: Path, raid: RaidLevel, k: int, data: st.DataObject
) -> None:
    h = Harness(tmp_path, raid, k)
    # try/finally: hypothesis ends an example early by raising (a draw past its data), and an
    # example that left its PDs open (and locked) would make the next one fail to open them.
    try:
        ld = h.ld
        nops = data.draw(st.integers(1, 25), label="ops")
        failures = data.draw(
            st.lists(
                st.tuples(st.integers(0, nops - 1), st.integers(0, h.npds - 1)),
                max_size=MAX_FAILURES[raid],
                unique_by=lambda f: f[1],
            ),
            label="failures",
        )
        # With a single failure, let it sometimes happen *during* an I/O (injected errors).
        inject = len(failures) == 1 and data.draw(st.booleans(), label="inject")
        for i in range(nops):
            for at, pd_index in failures:
                if at == i:
                    if inject:
                        h.pds[pd_index].inject_errors(True)
                    else:
                        h.pds[pd_index].fail("model test")
                    h.broken.add(pd_index)
            op = data.draw(st.sampled_from(["write", "write", "zero", "read", "read"]), label="op")
            a, n = draw_range(data, h)
            must_fail = h.lost(a, n, h.broken)
            if op == "read":
                if must_fail:
                    with pytest.raises(MediumError):
                        ld.read(a, n)
                else:
                    got = np.frombuffer(bytes(ld.read(a, n)), np.uint8)
                    want = np.frombuffer(bytes(h.model[a : a + n]), np.uint8)
                    known = h.known[a : a + n]
                    assert np.array_equal(got[known], want[known]), f"op {i}: read {n} at {a}"
                continue
            payload = os.urandom(n) if op == "write" else bytes(n)
            if must_fail:
                with pytest.raises(MediumError):
                    ld.write(a, payload) if op == "write" else ld.zero(a, n)
                h.known[a : a + n] = False
            else:
                ld.write(a, payload) if op == "write" else ld.zero(a, n)
                h.model[a : a + n] = payload
                h.known[a : a + n] = True

        # Everything still readable equals the model, row by row.
        for r in range(ROWS):
            lo, hi = r * ld.row_usable, (r + 1) * ld.row_usable
            if h.lost(lo, hi - lo, h.broken | h.actually_failed()):
                continue
            got = np.frombuffer(bytes(ld.read(lo, hi - lo)), np.uint8)
            known = h.known[lo:hi]
            assert np.array_equal(got[known], np.frombuffer(bytes(h.model[lo:hi]), np.uint8)[known]), (
                f"row {r}"
            )

        # Health, failed members and is_readable follow the PDs that really failed.
        failed = h.actually_failed()
        rows_hit = [len(row_pd_indexes(k, h.npds, r) & failed) for r in range(ROWS)]
        tolerated = {RaidLevel.RAID0: 0, RaidLevel.RAID1: k - 1, RaidLevel.RAID5: 1}[raid]
        if any(hit > tolerated for hit in rows_hit):
            assert ld.health is LDHealth.FAILED
        elif any(rows_hit):
            assert ld.health is LDHealth.DEGRADED
        else:
            assert ld.health is LDHealth.NORMAL
        assert len(ld.failed_members()) == sum(rows_hit)
        for _ in range(5):
            a, n = draw_range(data, h)
            assert ld.is_readable(a, n) == (not h.lost(a, n, failed)), (a, n)
    finally:
        close_all(h.pds)
