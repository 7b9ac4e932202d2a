"""A write-back write acknowledged and then lost by its destage (the LD answered MediumError, or
the host had no room) is reported by the next FLUSH *of that volume*, as fsync reports a lost
page to the file it belongs to: not swallowed by another volume's FLUSH, nor by a flush the node
runs for itself (a pair's destage report, a move, a takeover)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine_helpers import CHUNKLET, REGION, STEP, fail_writes_to_region, make_engine, pattern
from thinblock.engine import Engine
from thinblock.errors import MediumError
from thinblock.model import CacheMode
from thinblock.units import MiB


async def two_writeback_volumes(tmp_path: Path) -> Engine:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    for name in ("a", "b"):
        await engine.create_vv(name, pool="p", size=4 * MiB, cache_mode=CacheMode.WRITEBACK)
    engine.cache.destage_delay = 60.0  # destaged only when the test says so
    return engine


async def test_a_lost_destage_fails_the_flush_of_its_own_volume_not_another_ones(tmp_path: Path) -> None:
    engine = await two_writeback_volumes(tmp_path)
    a, b = engine.volume("a"), engine.volume("b")
    await a.write(0, pattern(1, 4096))
    await b.write(0, pattern(2, 4096))
    failed = fail_writes_to_region(engine, "a", 0)
    await b.flush()  # b's data is durable: its FLUSH succeeds (a's loss is not b's)
    assert failed() == 1, "the flush destaged a's region and its write failed"
    with pytest.raises(MediumError, match="simulated write error"):
        await a.flush()  # a's host learns that an acknowledged write was lost
    await a.flush()  # reported once, as fsync does
    assert bytes(await b.read(0, 4096)) == pattern(2, 4096)
    await engine.close()


async def test_a_flush_the_node_runs_for_itself_does_not_swallow_a_volume_s_lost_destage(
    tmp_path: Path,
) -> None:
    """A pair's owner flushes every report interval to tell its partner what was destaged
    (node/pair.py), a move and a takeover flush too: none of them is the host's FLUSH."""
    engine = await two_writeback_volumes(tmp_path)
    a = engine.volume("a")
    await a.write(0, pattern(3, 4096))
    fail_writes_to_region(engine, "a", 0)
    await engine.flush_all()  # the node's own flush: destages (the write fails), fsyncs
    with pytest.raises(MediumError, match="simulated write error"):
        await a.flush()
    await engine.close()
