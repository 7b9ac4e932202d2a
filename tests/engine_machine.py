"""What the engine's state machines and the tests built on them share: the small geometry they
use, the data they write, the invariants checked after every step (free regions hold nothing,
the space map equals the store's, RAID 1 mirrors agree) and ``EngineMachineBase`` (its own
loop and data directory, a kill -9 as far as one process can play it, a checking tear-down).
Used by tests/unit/test_engine_stateful.py, test_snapshots_stateful.py and the snapshot and
copy-on-write tests."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis.stateful import RuleBasedStateMachine

from thinblock.engine import Engine, EngineOptions
from thinblock.metadata.check import check_snapshot_space, check_space_map
from thinblock.units import MiB

SET_SIZE = {0: 2, 1: 2, 5: 3}
MAX_PDS = 8
PD_SIZE = 4 * MiB
MAX_REGIONS = 40  # the VV never grows past this many regions
# Hundreds of engines are created per run, each fsyncing its PDs and store: on a RAM file
# system those fsyncs cost nothing.  The machine checks logic, not the disk's durability.
FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def make_data(kind: str, seed: int, length: int) -> bytes:
    rng = random.Random(seed)
    if kind == "zeros":
        return bytes(length)
    if kind == "sparse":  # mostly zeros: some pieces of a multi-region write are all zero
        buf = bytearray(length)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(length)] = rng.randint(1, 255)
        return bytes(buf)
    if kind == "zero-head":  # zeros up to a point, then data
        cut = rng.randrange(length + 1)
        return bytes(cut) + rng.randbytes(length - cut)
    return rng.randbytes(length)


def as_buffer(data: bytes, how: str) -> bytes | bytearray | memoryview:
    if how == "bytearray":
        return bytearray(data)
    if how == "memoryview":  # a slice of a larger buffer, as the NBD server hands them in
        return memoryview(b"\xee" * 3 + data + b"\xee")[3 : 3 + len(data)]
    return data


def assert_free_regions_hold_nothing(eng: Engine) -> None:
    """Every LD region no VV maps reads zeros and has no dirty write-back data; every region
    the pool counts as held is held as many times as VV regions map it."""
    mapped: dict[int, int] = {}
    for vv in eng.vvs.values():
        for _, packed in vv.map.items():
            mapped[packed] = mapped.get(packed, 0) + 1
    held = set(mapped)
    for key in eng.cache._regions:
        assert key in held, f"dirty cache data for LD {key >> 32} region {key & 0xFFFFFFFF}, which no VV maps"
    for pool in eng.pools.values():
        size = pool.region_size
        for ld_id, slots in pool.slots.items():
            for index in range(slots.regions):
                packed = ld_id << 32 | index
                refs = slots.space.refcount(index)
                if refs:
                    assert refs == mapped.get(packed), (
                        f"LD {ld_id} region {index} has {refs} reference(s), {mapped.get(packed, 0)} mapping(s)"
                    )
                    continue
                assert packed not in held, f"LD {ld_id} region {index} is free but mapped"
                data = bytes(slots.ld.read(index * size, size))
                assert not any(data), f"free LD {ld_id} region {index} holds data"


def assert_space_map_matches_the_store(eng: Engine) -> None:
    refcounts = {ld: refs for pool in eng.pools.values() for ld, refs in pool.space.refcounts().items()}
    assert check_space_map(eng.store, refcounts) == []
    # Snapshot space: the counters kept on the way equal a recount of the pool's arrays and a
    # count from the store's rows (volume/snapspace.py).
    counters = {
        vv.row.id: vv.pool.space.snapshot_regions(vv.row.id) for vv in eng.vvs.values() if not vv.read_only
    }
    for pool in eng.pools.values():
        recount = pool.space.recount_for_check()
        assert {k: v for k, v in recount.items() if k in counters} == {
            k: v for k, v in counters.items() if k in recount
        }
    assert check_snapshot_space(eng.store, counters) == []


def assert_mirrors_agree(eng: Engine) -> None:
    """Every RAID 1 row whose members are all healthy holds the same bytes on each of them:
    no write (inline, or its mirror copies made in parallel by the I/O threads) and no
    rebuild (which must not copy a range an offloaded write is still changing) left them
    different."""
    for ld in eng.lds.values():
        if ld.raid != 1:
            continue
        for row in ld.rows:
            if any(ch.pd.failed for ch in row):
                continue
            copies = {
                bytes(ch.pd.as_device(ch.offset, ch.pd.chunklet_size).read(0, ch.pd.chunklet_size))
                for ch in row
            }
            assert len(copies) == 1, f"LD {ld.id}: the mirrors of a row differ"


class EngineMachineBase(RuleBasedStateMachine):
    """What every engine state machine needs: its own event loop and data directory (on
    /dev/shm when there is one), ``run``, ``eng``, a kill -9 as far as one process can play it
    (``crash``), and a tear-down that closes the engine and checks what it left."""

    tmp_prefix = "thinblock-stateful-"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix=self.tmp_prefix, dir=FAST_TMP))
        self.engine: Engine | None = None
        self.options = EngineOptions(allow_tiny_chunklets=True)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @property
    def eng(self) -> Engine:
        assert self.engine is not None
        return self.engine

    def open_engine(self) -> None:
        self.engine = self.run(Engine.open(self.tmp, self.options))

    def crash(self) -> None:
        """kill -9 as far as this process can play it: no destage, no flush, no clean mark;
        what was written to the files (page cache) stays, as it does when a process dies."""
        eng = self.eng
        task = eng.cache._task
        if task is not None:
            task.cancel()
            self.run(asyncio.gather(task, return_exceptions=True))
        if eng.lease is not None:
            # Its task stopped, not left pending: a pending task destroyed by the garbage
            # collector logs from inside whatever runs then (once, inside hypothesis's ast.parse,
            # CPython 3.11 raised "AST constructor recursion depth mismatch").  Not released: a
            # killed process releases nothing.
            self.run(eng.lease.stop(release=False))
        eng._close_files()
        self.engine = None

    def teardown(self) -> None:
        try:
            if self.engine is not None:
                self.run(self.engine.close())
                self.engine = None
                report = Engine.check(self.tmp)
                assert report.ok, report.problems
        finally:
            if self.engine is not None:
                self.engine._close_files()
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
