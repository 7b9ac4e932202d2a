"""The node role (node/pair.py) with two engines in one process, joined by real TCP links on
loopback: the mirror comes in sync, holds the owner's writes at the partner, drops them once
destaged and durable; a silent partner degrades the owner to write-through within the bound
(alert raised), and mirroring resumes only once the partner is back and in sync (alert cleared)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.engine_helpers import CHUNKLET, REGION, STEP, make_engine, pattern
from tests.support.ports import free_port
from thinblock.engine import Engine
from thinblock.model import AlertKind, AlertState, CacheMode
from thinblock.node.pair import NodePair, PairConfig
from thinblock.units import MiB

BOUND = 0.4


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def node(tmp_path: Path, name: str) -> Engine:
    engine = await make_engine(tmp_path / name)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=4 * MiB, cache_mode=CacheMode.WRITEBACK)
    return engine


def open_alerts(engine: Engine) -> list[str]:
    return [
        a.object
        for a in engine.list_alerts()
        if a.kind == AlertKind.MIRROR_DEGRADED and a.state != AlertState.CLEARED
    ]


@contextlib.asynccontextmanager
async def pair_of(
    tmp_path: Path, *, start_n2: bool = True
) -> AsyncIterator[tuple[Engine, NodePair, Engine, NodePair]]:
    e1, e2 = await node(tmp_path, "n1"), await node(tmp_path, "n2")
    p1_port, p2_port = free_port(), free_port()
    p1 = NodePair(
        PairConfig(
            "n1", "127.0.0.1", p2_port, listen_port=p1_port, partner_timeout=BOUND, report_interval=0.05
        ),
        cache=e1.cache,
        flush=e1.flush_all,
        alerts=e1.alerts,
    )
    p2 = NodePair(
        PairConfig(
            "n2", "127.0.0.1", p1_port, listen_port=p2_port, partner_timeout=BOUND, report_interval=0.05
        ),
        cache=e2.cache,
        flush=e2.flush_all,
        alerts=e2.alerts,
    )
    await p1.start()
    if start_n2:
        await p2.start()
    try:
        yield e1, p1, e2, p2
    finally:
        await p1.stop()
        await p2.stop()
        await e1.close()
        await e2.close()


async def test_writes_are_held_by_the_partner_until_destaged_and_durable(tmp_path: Path) -> None:
    async with pair_of(tmp_path) as (e1, p1, _e2, p2):
        await wait_for(lambda: p1.mirror.in_sync and p2.mirror.in_sync)
        assert open_alerts(e1) == [] and p1.status().mirror == "in-sync"
        e1.cache.destage_delay = 60.0  # hold the data dirty: the partner's copy stays
        vol = e1.volume("v")
        data = pattern(1, 3 * 4096)
        await vol.write(REGION + 100, data)
        holding = p2.holding
        assert holding is not None and holding.owner == "n1"
        (held,) = holding.in_replay_order()
        assert (held.vv, held.vv_region, held.offset, held.data) == (e1.vvs["v"].row.id, 1, 100, data)
        assert p2.status().held_bytes == len(data)
        await e1.cache.destage_all()
        await wait_for(lambda: holding.held_bytes == 0)  # reported once the engine's flush ran
        assert bytes(await vol.read(REGION + 100, len(data))) == data


async def test_a_silent_partner_degrades_the_owner_within_the_bound_then_resyncs(tmp_path: Path) -> None:
    async with pair_of(tmp_path) as (e1, p1, _e2, p2):
        await wait_for(lambda: p1.mirror.in_sync)
        vol = e1.volume("v")
        await vol.write(0, pattern(2, 4096))
        # The partner stops reading (as a SIGSTOPped process would): PINGs and writes go unanswered.
        for session in list(p2._sessions):
            transport = session.link._transport
            assert transport is not None
            transport.pause_reading()
        started = time.monotonic()
        write = asyncio.create_task(vol.write(REGION, pattern(3, 4096)))
        await asyncio.wait_for(write, 10)  # acknowledged: written through once the partner was lost
        degraded_after = time.monotonic() - started
        assert not p1.mirror.in_sync
        assert open_alerts(e1) == ["node:n1"]
        assert degraded_after < 10 * BOUND  # bounded; the precise figure is the drill's, not a unit test's
        assert not e1.cache.has(e1.vvs["v"].map.get(1)), "acknowledged from one copy in memory"
        await wait_for(lambda: e1.cache.dirty_bytes == 0)  # what two copies held is destaged now
        # Writes go on, written through.
        await vol.write(2 * REGION, pattern(4, 4096))
        assert e1.cache.dirty_bytes == 0
        # The partner's old link was dropped; the owner reconnects, resyncs and mirrors again.
        await wait_for(lambda: p1.mirror.in_sync)
        assert open_alerts(e1) == []
        e1.cache.destage_delay = 60.0
        await vol.write(3 * REGION, pattern(5, 4096))
        assert p2.holding is not None
        assert [w.vv_region for w in p2.holding.in_replay_order()] == [3]  # the resync dropped the rest
        assert p1.status().sessions_lost >= 1
        for region, seed in ((0, 2), (1, 3), (2, 4), (3, 5)):
            assert bytes(await vol.read(region * REGION, 4096)) == pattern(seed, 4096)


async def test_no_partner_means_write_through_and_an_alert(tmp_path: Path) -> None:
    async with pair_of(tmp_path, start_n2=False) as (e1, p1, _e2, _p2):
        vol = e1.volume("v")
        await wait_for(lambda: open_alerts(e1) == ["node:n1"])
        e1.cache.destage_delay = 60.0
        await vol.write(0, pattern(6, 4096))
        assert e1.cache.dirty_bytes == 0 and p1.status().mirror == "degraded"


@pytest.mark.parametrize("mode", [CacheMode.WRITETHROUGH])
async def test_write_through_volumes_are_not_mirrored(tmp_path: Path, mode: CacheMode) -> None:
    async with pair_of(tmp_path) as (e1, p1, _e2, p2):
        await wait_for(lambda: p1.mirror.in_sync)
        await e1.set_vv("v", cache_mode=mode)
        await e1.volume("v").write(0, pattern(7, 4096))
        assert p2.holding is None or len(p2.holding) == 0


async def test_a_rejoined_node_holds_its_own_volumes_mirrored_by_the_takeover_until_frozen(
    tmp_path: Path,
) -> None:
    """n2 took n1 over (its engine: e1 here) and mirrors n1's volumes back to n1, rejoined as
    partner only: held under n1's own name (``own_holding``), not as a partner's copies to take
    over; ``freeze_own`` (n1's lease is free again) ends and refuses those links, and hands over
    what is held.  A node that serves its own volumes refuses such a link."""
    e1 = await node(tmp_path, "n1")
    rejoined_port = free_port()
    rejoined = NodePair(
        PairConfig("n1", "127.0.0.1", free_port(), listen_port=rejoined_port, partner_timeout=BOUND),
        cache=None,
        flush=None,
        alerts=e1.alerts,
    )
    takeover = NodePair(
        PairConfig(
            "n1", "127.0.0.1", rejoined_port, partner_timeout=BOUND, report_interval=0.05, to_old_owner=True
        ),
        cache=e1.cache,
        flush=e1.flush_all,
        alerts=e1.alerts,
    )
    await rejoined.start()
    await takeover.start(listen_for_partner=False)
    try:
        await wait_for(lambda: takeover.mirror.in_sync)
        e1.cache.destage_delay = 60.0
        data = pattern(8, 4096)
        await e1.volume("v").write(REGION, data)
        assert rejoined.holding is None, "held as a partner's copies: it would try to take itself over"
        own = rejoined.own_holding
        assert own is not None and [w.data for w in own.in_replay_order()] == [data]
        assert rejoined.status().own_held_writes == 1
        frozen = rejoined.freeze_own()
        assert frozen is own and rejoined.own_holding is None
        await wait_for(lambda: not takeover.mirror.in_sync)  # its link ended, and refused from now
        await asyncio.sleep(3 * BOUND)
        assert not takeover.mirror.in_sync and len(frozen) == 1
    finally:
        await takeover.stop()
        await rejoined.stop()
    # A node serving its own volumes (not partner only) holds no copies of them.
    serving = NodePair(
        PairConfig("n1", "127.0.0.1", free_port(), listen_port=rejoined_port, partner_timeout=BOUND),
        cache=e1.cache,
        flush=e1.flush_all,
        alerts=e1.alerts,
    )
    takeover = NodePair(
        PairConfig("n1", "127.0.0.1", rejoined_port, partner_timeout=BOUND, to_old_owner=True),
        cache=e1.cache,
        flush=e1.flush_all,
        alerts=e1.alerts,
    )
    await serving.start()
    await takeover.start(listen_for_partner=False)
    try:
        await asyncio.sleep(4 * BOUND)
        assert not takeover.mirror.in_sync and serving.own_holding is None
    finally:
        await takeover.stop()
        await serving.stop()
        await e1.close()
