"""The write-back cache with a partner's mirror (claim 3): a real engine whose cache mirrors
through ``node.mirror.OwnerMirror`` to a real partner core (``PartnerConnection`` holding a
``MirrorHolding``), joined by an in-memory pipe the test can hold up.  What is checked: the host
is acknowledged only once both copies hold a write; the partner is told the owning VV and
region; a trim, a zeroing in place and a write-through write of a region wait until the
partner dropped its copies; destaged regions are reported only once durable; the partner lost
means written through and committed; FLUSH satisfied by the two copies only when they cover
everything."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.engine_helpers import CHUNKLET, REGION, STEP, fail_writes_to_region, make_engine, pattern
from thinblock.engine import Engine, EngineOptions
from thinblock.errors import MediumError
from thinblock.model import CacheMode
from thinblock.node.mirror import OwnerMirror
from thinblock.node.mirror_protocol import NEED_DATA, MirrorHolding, PartnerConnection, ProtocolError
from thinblock.pool.pool import REGION_BITS, REGION_MASK
from thinblock.units import KiB, MiB


class Pipe:
    """Owner <-> partner in memory.  Delivery runs at the next loop turn, or is held while
    ``held`` is set (a slow or silent partner)."""

    def __init__(self, mirror: OwnerMirror, holding: MirrorHolding, *, takes_over: bool = True) -> None:
        self.mirror = mirror
        self.partner = PartnerConnection("n2", 1, 2, holding, takes_over=takes_over)
        self.to_partner = bytearray()
        self.held = False
        self.ended: str | None = None
        self.sends = 0
        mirror.attach(1, self.send)
        mirror.receive(self.partner.data_to_send())  # the partner's HELLO

    def send(self, data: bytes) -> None:
        self.sends += 1
        self.to_partner += data
        if not self.held:
            asyncio.get_running_loop().call_soon(self.deliver)

    def deliver(self) -> None:
        if self.held or not self.to_partner:
            return
        data, self.to_partner = bytes(self.to_partner), bytearray()
        self.partner.receive_data(data)
        while (event := self.partner.next_event()) is not NEED_DATA:
            assert not isinstance(event, ProtocolError), event
        reply = self.partner.data_to_send()
        if reply:
            self.ended = self.mirror.receive(reply) or self.ended

    def release_hold(self) -> None:
        self.held = False
        self.deliver()


async def mirrored_engine(
    tmp_path: Path,
    *,
    covers_flush: bool = False,
    takes_over: bool = True,
    options: EngineOptions | None = None,
) -> tuple[Engine, Pipe, MirrorHolding]:
    engine = await make_engine(tmp_path, options=options)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=4 * MiB, cache_mode=CacheMode.WRITEBACK)
    holding = MirrorHolding("n1")
    mirror = OwnerMirror("n1", 7, durable=engine.flush_all, covers_flush=covers_flush)
    engine.cache.mirror = mirror
    pipe = Pipe(mirror, holding, takes_over=takes_over)
    await asyncio.sleep(0)
    mirror.mark_in_sync()
    return engine, pipe, holding


def key_of(engine: Engine, region: int) -> int:
    return engine.vvs["v"].map.get(region)


def on_ld(engine: Engine, key: int, offset: int, length: int) -> bytes:
    ld = engine.lds[key >> REGION_BITS]
    return bytes(ld.read(((key & REGION_MASK) * REGION) + offset, length))


async def test_acknowledged_only_when_the_partner_holds_the_write(tmp_path: Path) -> None:
    engine, pipe, holding = await mirrored_engine(tmp_path)
    vol = engine.volume("v")
    data = pattern(1, 4096)
    pipe.held = True
    write = asyncio.create_task(vol.write(3 * REGION + 512, data))
    await asyncio.sleep(0.05)  # the destager (1 ms delay here) had every chance to run
    assert not write.done(), "acknowledged before the partner held the write"
    assert len(holding) == 0
    key = key_of(engine, 3)
    assert on_ld(engine, key, 512, 4096) == bytes(4096), "destaged before the partner acknowledged"
    pipe.release_hold()
    await asyncio.wait_for(write, 5)
    (held,) = holding.held_for(key)
    vv_id = engine.vvs["v"].row.id
    assert (held.vv, held.vv_region, held.offset, held.data) == (vv_id, 3, 512, data)
    assert bytes(await vol.read(3 * REGION + 512, 4096)) == data
    await engine.close()


async def test_writes_arriving_together_go_to_the_partner_in_one_send(tmp_path: Path) -> None:
    """One send per loop turn, not per write: a batch of NBD requests costs one loopback
    syscall on the link, and the partner answers it with one ACK per volume."""
    engine, pipe, holding = await mirrored_engine(tmp_path)
    vol = engine.volume("v")
    await vol.write(0, pattern(1, 4 * REGION))  # regions assigned: the writes below do not wait
    sends = pipe.sends
    writes = [asyncio.create_task(vol.write(i * 4096, pattern(i + 2, 4096))) for i in range(8)]
    await asyncio.wait_for(asyncio.gather(*writes), 5)
    assert pipe.sends == sends + 1, f"{pipe.sends - sends} sends for 8 writes"
    assert len(holding) >= 8
    for i in range(8):
        assert bytes(await vol.read(i * 4096, 4096)) == pattern(i + 2, 4096)
    await engine.close()


async def test_a_large_write_goes_around_the_cache_with_its_copy_at_the_partner(tmp_path: Path) -> None:
    """A write of offload_min or more into a region with no dirty data goes to the LD through the
    I/O threads while its copy goes to the partner (no inline destage on the loop later); it is
    acknowledged once both hold it, and the partner drops its copy once a report made it durable."""
    options = EngineOptions(allow_tiny_chunklets=True, destage_delay=3600.0, offload_min_bytes=8 * KiB)
    engine, pipe, holding = await mirrored_engine(tmp_path, options=options)
    vol = engine.volume("v")
    await vol.write(0, pattern(1, REGION))
    key = key_of(engine, 0)
    assert engine.cache.dirty_bytes == 0, "cached: not around the cache"
    assert on_ld(engine, key, 0, REGION) == pattern(1, REGION)
    assert [w.data for w in holding.held_for(key)] == [pattern(1, REGION)]
    # Acknowledged only once the partner holds the copy (the LD has it before).
    pipe.held = True
    write = asyncio.create_task(vol.write(0, pattern(2, REGION)))
    await asyncio.sleep(0.05)
    assert not write.done(), "acknowledged before the partner held the copy"
    assert on_ld(engine, key, 0, REGION) == pattern(2, REGION)
    pipe.release_hold()
    await asyncio.wait_for(write, 5)
    # Reported like a destaged region: dropped by the partner once durable.
    assert pipe.mirror.pending_destaged == 2
    assert await pipe.mirror.report_destaged() == 2
    await asyncio.sleep(0)
    assert holding.held_for(key) == [] and holding.held_bytes == 0
    # Dirty data in the region (a small write, cached): a large write must not overtake it.
    await vol.write(REGION, pattern(3, 4096))
    await vol.write(REGION, pattern(4, REGION))
    assert engine.cache.dirty_bytes == 4096 + REGION
    assert bytes(await vol.read(0, 2 * REGION)) == pattern(2, REGION) + pattern(4, REGION)
    await engine.close()


async def test_a_destage_during_a_write_around_the_cache_does_not_report_its_copy(tmp_path: Path) -> None:
    """While a write around the cache is on its way to the LD, a small write into the same region
    is cached and destaged: that destage must not report the region (its report could drop the
    large write's copy before the large write is on the LD, let alone durable); the large write's
    end reports it, covering both."""
    options = EngineOptions(allow_tiny_chunklets=True, destage_delay=3600.0, offload_min_bytes=8 * KiB)
    engine, pipe, _ = await mirrored_engine(tmp_path, options=options)
    vol = engine.volume("v")
    await vol.write(0, pattern(1, 4096))  # assigns region 0 (cached: small)
    await engine.cache.destage_all()
    assert await pipe.mirror.report_destaged() == 1
    key = key_of(engine, 0)
    landed = asyncio.Event()
    go_on = asyncio.Event()

    async def slow_ld_write() -> None:
        landed.set()
        await go_on.wait()

    large = asyncio.create_task(
        engine.cache.write_around(key, engine.vvs["v"].row.id, 0, 0, pattern(5, REGION), slow_ld_write)
    )
    await landed.wait()
    await vol.write(8192, pattern(6, 4096))  # cached into the region
    engine.cache.destage_region(key)
    assert pipe.mirror.pending_destaged == 0, "the destage reported a region with a write on its way"
    go_on.set()
    await asyncio.wait_for(large, 5)
    assert pipe.mirror.pending_destaged == 1
    await engine.close()


async def test_destaged_regions_are_dropped_by_the_partner_once_durable(tmp_path: Path) -> None:
    engine, pipe, holding = await mirrored_engine(tmp_path)
    vol = engine.volume("v")
    await vol.write(0, pattern(2, 2 * REGION))
    assert len(holding.regions()) == 2
    await engine.cache.destage_all()
    assert len(holding.regions()) == 2  # destaged, not yet durable: the partner keeps its copies
    assert pipe.mirror.pending_destaged == 2
    assert await pipe.mirror.report_destaged() == 2
    await asyncio.sleep(0)
    assert holding.regions() == set() and holding.held_bytes == 0
    await engine.close()


async def test_trim_returns_the_region_to_the_pool_only_after_the_partner_dropped_it(tmp_path: Path) -> None:
    engine, pipe, holding = await mirrored_engine(tmp_path)
    vol = engine.volume("v")
    await vol.write(REGION, pattern(3, REGION))
    key = key_of(engine, 1)
    pool = engine.pools["p"]
    pipe.held = True
    trim = asyncio.create_task(vol.trim(REGION, REGION))
    await asyncio.sleep(0.02)
    assert not trim.done()
    assert key not in pool.pending, "region back in the pool while the partner still holds its old data"
    assert holding.held_for(key)
    pipe.release_hold()
    await asyncio.wait_for(trim, 5)
    assert holding.held_for(key) == []
    assert key in pool.pending
    assert bytes(await vol.read(REGION, REGION)) == bytes(REGION)
    await engine.close()


async def test_zeroing_in_place_waits_for_the_partner(tmp_path: Path) -> None:
    engine, pipe, holding = await mirrored_engine(tmp_path)
    vol = engine.volume("v")
    await vol.write(0, pattern(4, REGION))
    key = key_of(engine, 0)
    pipe.held = True
    zero = asyncio.create_task(vol.write_zeroes(0, REGION, may_trim=False))
    await asyncio.sleep(0.02)
    assert not zero.done() and holding.held_for(key)
    pipe.release_hold()
    await asyncio.wait_for(zero, 5)
    assert holding.held_for(key) == [] and key_of(engine, 0) == key
    assert bytes(await vol.read(0, REGION)) == bytes(REGION)
    await engine.close()


async def test_write_through_after_a_mode_switch_waits_for_the_partner(tmp_path: Path) -> None:
    engine, pipe, holding = await mirrored_engine(tmp_path)
    vol = engine.volume("v")
    await vol.write(0, pattern(5, REGION))
    key = key_of(engine, 0)
    await engine.set_vv("v", cache_mode=CacheMode.WRITETHROUGH)
    pipe.held = True
    write = asyncio.create_task(vol.write(0, pattern(6, 4096)))
    await asyncio.sleep(0.02)
    assert not write.done(), "written through while the partner held copies a takeover would write over it"
    pipe.release_hold()
    await asyncio.wait_for(write, 5)
    assert holding.held_for(key) == []
    assert on_ld(engine, key, 0, 4096) == pattern(6, 4096)
    await engine.close()


async def test_partner_lost_while_a_write_waits_writes_it_through_and_commits(tmp_path: Path) -> None:
    engine, pipe, _ = await mirrored_engine(tmp_path)
    vol = engine.volume("v")
    await vol.write(0, b"x")  # the LD exists
    await engine.flush_all()
    pipe.held = True
    data = pattern(7, 8192)
    write = asyncio.create_task(vol.write(5 * REGION, data))
    await asyncio.sleep(0.01)
    assert not write.done()
    pipe.mirror.lose("partner silent")
    await asyncio.wait_for(write, 5)
    key = key_of(engine, 5)
    assert not engine.cache.has(key)
    assert on_ld(engine, key, 0, 8192) == data
    engine.store.forget_map_array()
    assert 5 in engine.store.map_array()[:, 1].tolist(), (
        "acknowledged write-through with its assignment uncommitted"
    )
    # Out of sync, later writes are written through as well.
    assert engine.cache.writes_through
    await vol.write(6 * REGION, data)
    assert not engine.cache.has(key_of(engine, 6))
    assert on_ld(engine, key_of(engine, 6), 0, 8192) == data
    await engine.close()


async def test_a_release_waiting_when_the_partner_is_lost_completes(tmp_path: Path) -> None:
    engine, pipe, _ = await mirrored_engine(tmp_path)
    vol = engine.volume("v")
    await vol.write(0, pattern(8, REGION))
    pipe.held = True
    trim = asyncio.create_task(vol.trim(0, REGION))
    await asyncio.sleep(0.01)
    assert not trim.done()
    pipe.mirror.lose("link cut")
    await asyncio.wait_for(trim, 5)
    assert engine.get_vv("v").regions_allocated == 0
    await engine.close()


@pytest.mark.parametrize("covers", [False, True])
async def test_flush_is_satisfied_by_the_two_copies_only_when_they_cover_it(
    tmp_path: Path, covers: bool
) -> None:
    engine, _, holding = await mirrored_engine(tmp_path, covers_flush=covers)
    engine.cache.destage_delay = 60.0  # keep the destager out of the way
    vol = engine.volume("v")
    await vol.write(0, pattern(9, 4096))
    await vol.write(REGION, pattern(9, 4096), fua=True)
    await vol.flush()
    if covers:
        assert engine.cache.dirty_bytes > 0 and len(holding) == 2  # two copies in memory: enough
    else:
        assert engine.cache.dirty_bytes == 0  # destaged and fsynced as without a partner
    # Something reached the LD outside the copies (a zeroing): the next FLUSH is a real one.
    await vol.write_zeroes(2 * REGION, 100)
    await vol.flush()
    assert engine.cache.dirty_bytes == 0
    await engine.close()


async def test_flush_is_not_covered_by_a_partner_that_would_not_replay_the_copies(tmp_path: Path) -> None:
    """A partner not configured to take over says so in its HELLO (no TAKES_OVER flag): its copy
    would never be written anywhere if this node died, so FLUSH destages and fsyncs."""
    engine, pipe, holding = await mirrored_engine(tmp_path, covers_flush=True, takes_over=False)
    engine.cache.destage_delay = 60.0
    assert pipe.mirror.peer is not None and not pipe.mirror.peer.takes_over
    vol = engine.volume("v")
    await vol.write(0, pattern(11, 4096))
    assert len(holding) == 1
    await vol.flush()
    assert engine.cache.dirty_bytes == 0
    await engine.close()


async def test_a_flush_after_a_degrade_destages_and_fsyncs(tmp_path: Path) -> None:
    """The mirror in sync and FLUSH covered; then the partner is lost while a write waits for its
    copy.  From the moment of the loss every FLUSH destages and fsyncs: the one sent right after
    ``lose`` (no loop turn between), the write that was waiting is written through, and its FUA is
    a real one."""
    engine, pipe, _ = await mirrored_engine(tmp_path, covers_flush=True)
    engine.cache.destage_delay = 60.0
    vol = engine.volume("v")
    await vol.write(0, pattern(12, 4096))
    await vol.flush()
    assert (
        engine.cache.flush_covered(engine.vvs["v"].row.id) and engine.cache.dirty_bytes == 4096
    )  # covered: still dirty
    pipe.held = True
    waiting = asyncio.create_task(vol.write(REGION, pattern(13, 4096), fua=True))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    pipe.mirror.lose("partner silent")
    assert not engine.cache.flush_covered(engine.vvs["v"].row.id)  # at once, before any loop turn
    flush = asyncio.create_task(vol.flush())
    await asyncio.wait_for(asyncio.gather(flush, waiting), 5)
    assert engine.cache.dirty_bytes == 0
    assert on_ld(engine, key_of(engine, 0), 0, 4096) == pattern(12, 4096)
    assert on_ld(engine, key_of(engine, 1), 0, 4096) == pattern(13, 4096)
    await engine.close()


async def test_a_failed_destage_makes_the_next_flush_a_real_one(tmp_path: Path) -> None:
    """A destage that failed must be answered EIO by the volume's next FLUSH: not covered by the
    copies, and not swallowed by the flush of the pair's destage report that ran before it."""
    engine, pipe, _ = await mirrored_engine(tmp_path, covers_flush=True)
    engine.cache.destage_delay = 60.0
    vol = engine.volume("v")
    vv_id = engine.vvs["v"].row.id
    await vol.write(0, pattern(14, 4096))
    assert engine.cache.flush_covered(vv_id)
    fail_writes_to_region(engine, "v", 0)
    await engine.cache.destage_all()
    assert not engine.cache.flush_covered(vv_id)
    await pipe.mirror.report_destaged()  # what the pair's report loop runs every interval
    with pytest.raises(MediumError, match="simulated write error"):
        await vol.flush()
    await engine.close()


async def test_without_a_mirror_nothing_changes(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=4 * MiB, cache_mode=CacheMode.WRITEBACK)
    assert engine.cache.mirror is None and not engine.cache.writes_through
    assert not engine.cache.flush_covered(engine.vvs["v"].row.id)
    vol = engine.volume("v")
    engine.cache.destage_delay = 60.0
    await vol.write(0, pattern(10, 4096))
    assert engine.cache.dirty_bytes == 4096  # acknowledged from the cache alone
    await vol.flush()
    assert engine.cache.dirty_bytes == 0
    await engine.close()
