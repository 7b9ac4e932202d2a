"""Takeover's replay (node/takeover.py) on a real engine: valid copies are written per volume in
sequence order through the volume's write path (a region never assigned is assigned), copies
the owner marked obsolete are never written, and the epoch marks grow across restarts.  Failback
(``TakenOver.hand_back``, ``fail_back``): its steps in order, its refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.engine_helpers import CHUNKLET, REGION, STEP, make_engine, pattern, reopen
from thinblock.engine import Engine
from thinblock.model import CacheMode
from thinblock.node.mirror_protocol import HeldWrite, MirrorHolding
from thinblock.node.takeover import (
    MIRROR_VALID_KEY,
    EpochMarks,
    FailbackRefused,
    TakenOver,
    fail_back,
    replay,
)
from thinblock.units import MiB


async def owner(tmp_path: Path) -> Engine:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=4 * MiB, cache_mode=CacheMode.WRITEBACK)
    return engine


def holding_of(epoch: int, vv: int, writes: list[tuple[int, int, bytes]]) -> MirrorHolding:
    holding = MirrorHolding("n1")
    holding.epoch = epoch
    for seq, (region, offset, data) in enumerate(writes, start=1):
        holding.add(HeldWrite(vv, seq, 1 << 40 | region, region, offset, data))  # keys: not looked at
    return holding


async def test_valid_copies_are_replayed_in_sequence_order(tmp_path: Path) -> None:
    engine = await owner(tmp_path)
    vol = engine.volume("v")
    await vol.write(0, pattern(1, REGION))  # on the LDs before the owner died
    vv_id = engine.vvs["v"].row.id
    marks = EpochMarks(engine.store)
    epoch = marks.next_epoch()
    marks.mark_valid(epoch)
    holding = holding_of(
        epoch,
        vv_id,
        [(0, 100, b"A" * 50), (0, 120, b"B" * 10), (7, 0, pattern(2, 4096))],  # region 7: never assigned
    )
    result = await replay(engine, holding)
    assert (result.replayed, result.discarded) == (3, 0)
    expected = bytearray(pattern(1, REGION))
    expected[100:150] = b"A" * 50
    expected[120:130] = b"B" * 10  # the later write wins
    assert bytes(await vol.read(0, REGION)) == bytes(expected)
    assert bytes(await vol.read(7 * REGION, 4096)) == pattern(2, 4096)
    assert len(holding) == 0 and engine.store.get_meta(MIRROR_VALID_KEY) == "0"
    assert engine.cache.dirty_bytes == 0  # flushed
    engine = await reopen(engine)
    assert bytes(await engine.volume("v").read(7 * REGION, 4096)) == pattern(2, 4096)
    await engine.close()


async def test_copies_marked_obsolete_are_never_written(tmp_path: Path) -> None:
    engine = await owner(tmp_path)
    vol = engine.volume("v")
    marks = EpochMarks(engine.store)
    epoch = marks.next_epoch()
    marks.mark_valid(epoch)
    marks.mark_obsolete()  # the partner was lost; the owner then wrote through
    await vol.write(0, pattern(3, 4096))
    holding = holding_of(epoch, engine.vvs["v"].row.id, [(0, 0, pattern(4, 4096))])
    result = await replay(engine, holding)
    assert (result.replayed, result.discarded) == (0, 1) and "obsolete" in result.reason
    assert bytes(await vol.read(0, 4096)) == pattern(3, 4096)
    assert len(holding) == 0
    await engine.close()


async def test_epochs_grow_across_restarts(tmp_path: Path) -> None:
    engine = await owner(tmp_path)
    marks = EpochMarks(engine.store)
    assert [marks.next_epoch(), marks.next_epoch()] == [1, 2]
    marks.mark_valid(2)
    engine = await reopen(engine)
    marks = EpochMarks(engine.store)
    assert marks.was_valid_at_death() == 2
    assert marks.next_epoch() == 3
    await engine.close()


async def test_a_takeover_with_nothing_held_clears_the_mark_all_the_same(tmp_path: Path) -> None:
    """The owner died mirrored (its store's mark names the session) but had destaged everything: the
    partner holds nothing.  The takeover consumes the mark anyway: the taken-over volumes are
    written through from then on, and the old owner, started again later (rejoined, then its
    lease back), must not refuse to start for copies that no longer exist."""
    engine = await owner(tmp_path)
    marks = EpochMarks(engine.store)
    marks.mark_valid(marks.next_epoch())
    result = await replay(engine, holding_of(1, engine.vvs["v"].row.id, []))
    assert (result.replayed, result.reason) == (0, "nothing held")
    assert marks.was_valid_at_death() == 0
    await engine.close()


# --- failback (TakenOver.hand_back, fail_back) -------------------------------------------------------
class _Recorder:
    """The parts of a taken-over volume set a failback drives, recording the order of the steps."""

    def __init__(self, steps: list[str], mirror: str) -> None:
        self.steps = steps
        self.mirror_now = mirror

    # the NBD server
    async def stop(self) -> None:
        self.steps.append("server.stop")

    # the engine
    def export_names(self) -> list[str]:
        return ["wb"]

    async def flush_all(self) -> None:
        self.steps.append(f"flush (mirror {self.mirror_now})")

    async def close(self) -> None:
        self.steps.append("engine.close")


class _Mirror:
    def __init__(self, steps: list[str], state: str) -> None:
        self.steps, self.state = steps, state

    def status(self) -> Any:
        return SimpleNamespace(mirror=self.state)

    async def stop(self) -> None:
        self.steps.append("mirror.stop")
        self.state = "degraded"

    def clear_degraded_alert(self) -> None:
        self.steps.append("alert cleared")


class _Pair:
    def __init__(self) -> None:
        self.handed: list[str] = []

    def handed_back(self, owner: str) -> None:
        self.handed.append(owner)


def taken(steps: list[str], state: str) -> TakenOver:
    parts = _Recorder(steps, state)
    return TakenOver("n1", engine=parts, server=parts, mirror=_Mirror(steps, state))


async def test_failback_drains_flushes_on_the_mirror_then_stops_it_and_closes() -> None:
    steps: list[str] = []
    pair = _Pair()
    served = [taken(steps, "in-sync")]
    assert await fail_back(served, pair) == ["wb"]
    # Flushed while still mirrored (a failed flush leaves the owner's copies valid), the mirror's
    # mark made obsolete only then, the lease released last (engine.close).
    assert steps == ["server.stop", "flush (mirror in-sync)", "mirror.stop", "alert cleared", "engine.close"]
    assert served == [] and pair.handed == ["n1"]


@pytest.mark.parametrize("state", ["degraded", "syncing"])
async def test_failback_is_refused_unless_the_owner_is_in_sync(state: str) -> None:
    steps: list[str] = []
    pair = _Pair()
    served = [taken(steps, state)]
    with pytest.raises(FailbackRefused, match="not in sync"):
        await fail_back(served, pair)
    assert steps == [] and len(served) == 1 and pair.handed == []
    with pytest.raises(FailbackRefused, match="no volumes taken over"):
        await fail_back([], pair)


async def test_a_second_failback_while_one_runs_is_refused() -> None:
    steps: list[str] = []
    one = taken(steps, "in-sync")
    first = asyncio.ensure_future(one.hand_back())
    await asyncio.sleep(0)  # the first is under way (stopping the server)
    with pytest.raises(FailbackRefused, match="already"):
        await one.hand_back()
    await first
    assert steps.count("engine.close") == 1
