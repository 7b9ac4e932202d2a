"""A hypothesis state machine drives one engine VV against a plain bytearray model.

Random sequences of write / read / trim / write-zeroes (with and without may_trim) /
flush / FUA / concurrent writes / clean close-and-reopen / flush, simulated kill -9 and reopen /
fail a PD / rebuild / add a PD / compaction / cache-mode switch / grow / a second,
short-lived VV that dirties LD regions and gives them back -- on RAID 0, 1 and 5 pools
with tiny chunklets (64 KiB) and regions (4 to 16 KiB), starting in write-through or
write-back mode.

Invariants after every step:

* the VV reads exactly like the model (a full read; random partial reads are a rule);
* the set of allocated VV regions (block status), the VV's count, the pool's used count
  and the LDs' used counts all equal the model's allocation, which follows vv.py:

  - a write assigns every region it touches with non-zero bytes; an all-zero piece of a
    write into an unassigned region assigns nothing (zero detect); an assigned region
    stays assigned whatever is written into it;
  - trim, and write-zeroes that may trim, unassign the regions they cover *whole*; the
    partial regions at their ends stay as they were (assigned ones are written with zeros);
  - write-zeroes with NO_HOLE (may_trim=False) assigns every region it touches.

PD failures (RAID 1 and 5) keep at most one failed member per RAID set: a PD may fail
only while every LD is healthy, and only while enough healthy PDs remain for a rebuild
to find spares; ``rebuild`` must then bring every LD back to normal.

The engine is async; the machine owns a private event loop and runs each step with
``run_until_complete``.  Each test case gets its own temporary data directory.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.engine_helpers import CHUNKLET, STEP, make_engine
from tests.engine_machine import (
    MAX_PDS,
    MAX_REGIONS,
    PD_SIZE,
    SET_SIZE,
    EngineMachineBase,
    as_buffer,
    assert_free_regions_hold_nothing,
    assert_mirrors_agree,
    assert_space_map_matches_the_store,
    make_data,
)
from thinblock.blockdev import ExtentFlags
from thinblock.engine import Engine, EngineOptions
from thinblock.errors import MediumError
from thinblock.model import AlertKind, CacheMode, LDHealth
from thinblock.units import KiB, MiB
from thinblock.volume.vv import VirtualVolume


class EngineMachine(EngineMachineBase):
    raid: int = 1
    initial_cache_mode: CacheMode = CacheMode.WRITETHROUGH

    def __init__(self) -> None:
        super().__init__()
        self.model = bytearray()
        self.allocated: set[int] = set()
        self.region = 0
        self.pd_count = 0
        self.noise_seq = 0

    # --- plumbing ---------------------------------------------------------------------
    @property
    def vol(self) -> VirtualVolume:
        vol = self.eng.volume("v")
        assert isinstance(vol, VirtualVolume)
        return vol

    @property
    def size(self) -> int:
        return len(self.model)

    def regions_touched(self, offset: int, length: int) -> range:
        return range(offset // self.region, (offset + length - 1) // self.region + 1)

    def whole_regions(self, offset: int, length: int) -> range:
        """Regions lying entirely inside [offset, offset + length)."""
        return range(-(-offset // self.region), (offset + length) // self.region)

    def draw_range(self, data: st.DataObject, max_regions: int = 3) -> tuple[int, int]:
        size, region = self.size, self.region
        boundaries = list(range(0, size, region))
        offset = data.draw(
            st.one_of(
                st.integers(0, size - 1),
                st.sampled_from(boundaries),
                st.builds(
                    lambda b, d: min(max(b + d, 0), size - 1),
                    st.sampled_from(boundaries),
                    st.integers(-600, 600),
                ),
            ),
            label="offset",
        )
        room = size - offset
        length = data.draw(
            st.one_of(
                st.integers(1, min(room, max_regions * region)),
                st.sampled_from([n for n in (1, 512, region, 2 * region, room) if n <= room]),
            ),
            label="length",
        )
        return offset, length

    def allocated_regions(self) -> set[int]:
        """The VV's allocated regions, from block status."""
        extents = self.run(self.vol.block_status(0, self.size))
        allocated: set[int] = set()
        pos = 0
        for ext in extents:
            if not ext.flags & ExtentFlags.HOLE:
                allocated.update(self.regions_touched(pos, ext.length))
            pos += ext.length
        assert pos == self.size
        return allocated

    # --- set-up and tear-down ---------------------------------------------------------
    @initialize(
        region=st.sampled_from([4 * KiB, 8 * KiB, 16 * KiB]),
        regions=st.integers(4, 24),
        tail_cut=st.sampled_from([0, 0, 512, 3 * 512]),
        destage_delay=st.sampled_from([0.0005, 60.0]),
        max_dirty=st.sampled_from([12 * KiB, 4 * MiB]),
        offload_min=st.sampled_from([512, 2 * KiB, 1 << 30]),
    )
    def setup(
        self, region: int, regions: int, tail_cut: int, destage_delay: float, max_dirty: int, offload_min: int
    ) -> None:
        self.region = region
        self.options = EngineOptions(
            allow_tiny_chunklets=True,
            destage_delay=destage_delay,
            max_dirty_bytes=max_dirty,
            offload_min_bytes=offload_min,  # 512 and 2 KiB: write-through writes go to the I/O threads
        )
        self.open_engine()
        set_size = SET_SIZE[self.raid]
        self.pd_count = set_size + (2 if self.raid else 0)
        for i in range(self.pd_count):
            self.run(self.eng.add_pd(self.tmp / f"pd{i}.img", size=PD_SIZE, chunklet_size=CHUNKLET))
        self.run(
            self.eng.create_pool(
                "p",
                raid=self.raid,
                set_size=set_size,
                region_size=region,
                growth_increment=CHUNKLET,
                step=STEP,
            )
        )
        size = regions * region - min(tail_cut, region - 512)
        self.run(self.eng.create_vv("v", pool="p", size=size, cache_mode=self.initial_cache_mode))
        self.model = bytearray(size)

    # --- host I/O ---------------------------------------------------------------------
    @rule(
        data=st.data(),
        kind=st.sampled_from(["random", "random", "zeros", "sparse", "zero-head"]),
        seed=st.integers(0, 2**32),
        how=st.sampled_from(["bytes", "bytearray", "memoryview"]),
        fua=st.booleans(),
    )
    def write(self, data: st.DataObject, kind: str, seed: int, how: str, fua: bool) -> None:
        offset, length = self.draw_range(data)
        payload = make_data(kind, seed, length)
        self.run(self.vol.write(offset, as_buffer(payload, how), fua=fua))
        self.wrote(offset, payload)

    def wrote(self, offset: int, payload: bytes) -> None:
        """The model after a write: zero detect assigns only regions it puts non-zero bytes in
        (however the write was split into requests)."""
        self.model[offset : offset + len(payload)] = payload
        for r in self.regions_touched(offset, len(payload)):
            lo, hi = max(offset, r * self.region), min(offset + len(payload), (r + 1) * self.region)
            if any(payload[lo - offset : hi - offset]):
                self.allocated.add(r)

    @rule(data=st.data(), seed=st.integers(0, 2**32))
    def concurrent_writes(self, data: st.DataObject, seed: int) -> None:
        """Several writes in flight at once to disjoint ranges, some sharing a fresh region
        (claim 8: they wait for its one assignment)."""
        offset, length = self.draw_range(data, max_regions=4)
        cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, length - 1)), max_size=6), label="cuts")))
        bounds = [0, *[c for c in cuts if 0 < c < length], length]
        payload = make_data("random", seed, length)
        pieces = [(offset + a, payload[a:b]) for a, b in itertools.pairwise(bounds)]
        random.Random(seed).shuffle(pieces)

        async def go() -> None:
            await asyncio.gather(*(self.vol.write(o, p) for o, p in pieces))

        self.run(go())
        self.wrote(offset, payload)

    @rule(data=st.data(), seed=st.integers(0, 2**32), trim_first=st.booleans(), prefill=st.booleans())
    def write_racing_trim(self, data: st.DataObject, seed: int, trim_first: bool, prefill: bool) -> None:
        """A write and a trim of whole regions around it, in flight together.  Either may
        land first, region by region (no atomicity across regions), but the write must
        never end up in an LD region the trim gave back (the free-region invariant).

        ``prefill`` first rewrites an allocated region elsewhere with its own contents:
        in write-back mode that fills the cache, so the racing write waits for room
        (back-pressure) while the trim runs."""
        first = data.draw(st.integers(0, (self.size - 1) // self.region), label="first region")
        count = data.draw(st.integers(1, 3), label="regions")
        lo, hi = first * self.region, min((first + count) * self.region, self.size)
        # Drawn whatever the state: which regions are allocated can depend on how an earlier
        # race came out, and hypothesis needs the same draws when it replays a case.
        pick = data.draw(st.integers(0, MAX_REGIONS), label="prefill pick")
        others = sorted(r for r in self.allocated if not first <= r < first + count)
        if prefill and others:
            r = others[pick % len(others)]
            a, b = r * self.region, min((r + 1) * self.region, self.size)
            self.run(self.vol.write(a, bytes(self.model[a:b])))
        w_off = data.draw(st.integers(lo, hi - 1), label="write offset")
        w_len = data.draw(st.integers(1, hi - w_off), label="write length")
        payload = make_data("random", seed, w_len)
        trimmed = self.model[:]
        trimmed[lo:hi] = bytes(hi - lo)
        written = trimmed[:]
        written[w_off : w_off + w_len] = payload

        async def go() -> None:
            write = self.vol.write(w_off, payload)
            trim = self.vol.trim(lo, hi - lo)
            await asyncio.gather(*((trim, write) if trim_first else (write, trim)))

        self.run(go())
        got = bytes(self.run(self.vol.read(lo, hi - lo)))
        status = self.allocated_regions()
        for r in self.regions_touched(lo, hi - lo):
            a, b = max(lo, r * self.region), min(hi, (r + 1) * self.region)
            whole = a == r * self.region and b == (r + 1) * self.region
            was = r in self.allocated
            wrote = any(written[a:b])  # the write's piece in r is non-zero (it lies inside [lo, hi))
            outcomes = [
                (trimmed[a:b], (was or wrote) and not whole),  # the write, then the trim
                (written[a:b], (was and not whole) or wrote),  # the trim, then the write
            ]
            piece = got[a - lo : b - lo]
            for content, allocated in outcomes:
                if piece == content and (r in status) == allocated:
                    self.model[a:b] = content
                    if allocated:
                        self.allocated.add(r)
                    else:
                        self.allocated.discard(r)
                    break
            else:
                raise AssertionError(
                    f"region {r} (allocated: {r in status}) holds neither outcome of a write racing a trim"
                )

    @rule(data=st.data())
    def read_partial(self, data: st.DataObject) -> None:
        """A plain read, the same read as extents (holes where the zero LD is: what the NBD
        server sends as hole chunks), and block status from the same offset."""
        offset, length = self.draw_range(data, max_regions=4)
        want = bytes(self.model[offset : offset + length])
        got = bytes(self.run(self.vol.read(offset, length)))
        assert got == want, f"read of {length} at {offset}"
        pos = offset
        for ext_offset, ext_length, piece in self.run(self.vol.read_extents(offset, length)):
            assert ext_offset == pos and ext_length > 0
            regions = self.regions_touched(ext_offset, ext_length)
            if piece is None:
                assert not self.allocated.intersection(regions), (
                    f"hole at {ext_offset} over allocated regions"
                )
                piece = bytes(ext_length)
            else:
                assert self.allocated.issuperset(regions), f"data extent at {ext_offset} over a hole"
            assert bytes(piece) == want[pos - offset : pos - offset + ext_length], f"extent at {ext_offset}"
            pos += ext_length
        assert pos == offset + length
        pos = offset
        for ext in self.run(self.vol.block_status(offset, length)):
            assert ext.length > 0 and pos + ext.length <= offset + length
            allocated = [r in self.allocated for r in self.regions_touched(pos, ext.length)]
            assert all(allocated) if not ext.flags & ExtentFlags.HOLE else not any(allocated), (pos, ext)
            pos += ext.length
        assert pos == offset + length  # a short range: one reply covers it all

    @rule(data=st.data(), fua=st.booleans())
    def trim(self, data: st.DataObject, fua: bool) -> None:
        offset, length = self.draw_range(data, max_regions=5)
        self.run(self.vol.trim(offset, length, fua=fua))
        self.zeroed(offset, length, may_trim=True)

    @rule(data=st.data(), may_trim=st.booleans(), fua=st.booleans())
    def write_zeroes(self, data: st.DataObject, may_trim: bool, fua: bool) -> None:
        offset, length = self.draw_range(data, max_regions=5)
        self.run(self.vol.write_zeroes(offset, length, may_trim=may_trim, fua=fua))
        self.zeroed(offset, length, may_trim=may_trim)

    def zeroed(self, offset: int, length: int, *, may_trim: bool) -> None:
        self.model[offset : offset + length] = bytes(length)
        if may_trim:
            self.allocated.difference_update(self.whole_regions(offset, length))
        else:
            self.allocated.update(self.regions_touched(offset, length))

    @rule()
    def flush(self) -> None:
        self.run(self.vol.flush())
        assert self.eng.cache_dirty_bytes() == 0

    @rule(seconds=st.sampled_from([0.0, 0.003]))
    def idle(self, seconds: float) -> None:
        """Let background work (the destager) run between host requests."""
        self.run(asyncio.sleep(seconds))

    # --- management -------------------------------------------------------------------
    @rule()
    def reopen(self) -> None:
        self.run(self.eng.close())
        self.engine = None
        report = Engine.check(self.tmp)
        assert report.ok, report.problems
        self.open_engine()

    @rule()
    def crash_and_reopen(self) -> None:
        """A flush, then the process dies: everything acknowledged is there after the restart
        (which scrubs the free regions).  Without the flush nothing is promised: map updates
        may be committed in batches, so an acknowledged write-through write can be lost
        (tests/unit/test_engine_crash.py checks what may and may not survive then)."""
        self.run(self.eng.flush_all())
        self.crash()
        report = Engine.check(self.tmp)
        assert report.ok, report.problems
        self.open_engine()

    @rule(mode=st.sampled_from(list(CacheMode)))
    def set_cache_mode(self, mode: CacheMode) -> None:
        self.run(self.eng.set_vv("v", cache_mode=mode))
        assert self.vol.cache_mode == mode

    @precondition(lambda self: self.size + self.region <= MAX_REGIONS * self.region)
    @rule(regions=st.integers(1, 4))
    def grow(self, regions: int) -> None:
        new_size = min(self.size + regions * self.region, MAX_REGIONS * self.region)
        self.run(self.eng.grow_vv("v", new_size))
        self.model.extend(bytes(new_size - self.size))

    @rule(data=st.data(), seed=st.integers(0, 2**32), how=st.sampled_from(["delete", "trim"]))
    def noise_volume(self, data: st.DataObject, seed: int, how: str) -> None:
        """Another VV fills some LD regions with data and gives them back (deleted or
        trimmed): when the VV under test gets those regions they must read zeros."""
        self.noise_seq += 1
        name = f"noise{self.noise_seq}"
        regions = data.draw(st.integers(1, 6), label="noise regions")
        self.run(self.eng.create_vv(name, pool="p", size=regions * self.region))
        noise = self.eng.volume(name)
        self.run(noise.write(0, make_data("random", seed, regions * self.region)))
        if data.draw(st.booleans(), label="noise flush"):
            self.run(self.eng.flush_all())
        if how == "trim":
            self.run(noise.trim(0, regions * self.region))
            assert self.eng.get_vv(name).regions_allocated == 0
            assert bytes(self.run(noise.read(0, regions * self.region))) == bytes(regions * self.region)
        self.run(self.eng.delete_vv(name))

    @rule()
    def compact(self) -> None:
        self.run(self.eng.compact_pool("p"))
        for ld in self.eng.list_lds("p"):
            assert ld.regions_used > 0, f"LD {ld.id} was entirely free but not released"

    @precondition(lambda self: self.raid in (1, 5))
    @rule(data=st.data())
    def fail_pd(self, data: st.DataObject) -> None:
        eng = self.eng
        healthy = [pd.id for pd in eng.list_pds() if pd.health.value == "normal"]
        degraded = [ld.id for ld in eng.list_lds() if ld.health != LDHealth.NORMAL]
        # One failed member per RAID set at most, and enough PDs left to rebuild onto.
        if degraded or len(healthy) < SET_SIZE[self.raid] + 2:
            return
        victim = data.draw(st.sampled_from(healthy), label="failed PD")
        self.run(eng.fail_pd(victim))
        for ld in eng.list_lds():
            if victim in {c.pd_id for c in ld.chunklets}:
                assert ld.health == LDHealth.DEGRADED, (ld.id, ld.health)

    @rule()
    def rebuild(self) -> None:
        self.run(self.eng.rebuild())
        self.assert_rebuilt()

    def assert_rebuilt(self) -> None:
        eng = self.eng
        failed = {pd.id for pd in eng.list_pds() if pd.health.value != "normal"}
        for ld in eng.list_lds():
            assert ld.health == LDHealth.NORMAL, f"LD {ld.id} is {ld.health} after a rebuild"
            assert not failed & {c.pd_id for c in ld.chunklets}
        assert not eng.rebuild_status().running
        # Chunklet accounting: exactly the chunklets of the LDs are in use.
        in_lds = sum(len(ld.chunklets) for ld in eng.list_lds())
        assert sum(pd.chunklets_used for pd in eng.list_pds()) == in_lds

    @rule(data=st.data(), seed=st.integers(0, 2**32))
    def rebuild_under_load(self, data: st.DataObject, seed: int) -> None:
        """A rebuild runs in bounded steps on the loop: host writes, trims, flushes and
        compactions run between its steps.  The writes must reach the rebuilt members, and the
        rebuild must still bring every LD back to normal, with the chunklet accounting right."""
        plan = []
        for i in range(data.draw(st.integers(1, 6), label="ops during the rebuild")):
            kind = data.draw(st.sampled_from(["write", "write", "trim", "flush", "compact"]), label="op")
            offset, length = self.draw_range(data, max_regions=5)
            pause = data.draw(st.integers(0, 3), label="pause")
            plan.append((kind, offset, length, make_data("random", seed + i, length), pause))

        async def load() -> None:
            for kind, offset, length, payload, pause in plan:
                for _ in range(pause):
                    await asyncio.sleep(0)
                if kind == "write":
                    await self.vol.write(offset, payload)
                elif kind == "trim":
                    await self.vol.trim(offset, length)
                elif kind == "flush":
                    await self.vol.flush()
                else:
                    await self.eng.compact_pool("p")

        async def go() -> None:
            await asyncio.gather(self.eng.rebuild(), load())

        self.run(go())
        for kind, offset, length, payload, _ in plan:
            if kind == "write":
                self.wrote(offset, payload)
            elif kind == "trim":
                self.zeroed(offset, length, may_trim=True)
        self.run(self.eng.rebuild())  # what the first pass could not reach (an LD made meanwhile)
        self.assert_rebuilt()

    @precondition(lambda self: self.pd_count < MAX_PDS)
    @rule()
    def add_pd(self) -> None:
        self.run(self.eng.add_pd(self.tmp / f"pd{self.pd_count}.img", size=PD_SIZE, chunklet_size=CHUNKLET))
        self.pd_count += 1

    # --- invariants -------------------------------------------------------------------
    @invariant()
    def contents_equal_the_model(self) -> None:
        if self.engine is None or not self.model:
            return
        got = bytes(self.run(self.vol.read(0, self.size)))
        if got != self.model:
            first = next(i for i in range(self.size) if got[i] != self.model[i])
            raise AssertionError(
                f"VV differs from the model from byte {first} (region {first // self.region}):"
                f" got {got[first : first + 8].hex()}, want {self.model[first : first + 8].hex()}"
            )

    @invariant()
    def allocation_equals_the_model(self) -> None:
        if self.engine is None or not self.model:
            return
        allocated = self.allocated_regions()
        assert allocated == self.allocated, (
            f"allocated regions {sorted(allocated)}, model {sorted(self.allocated)}"
        )
        info = self.eng.get_vv("v")
        assert info.regions_allocated == len(self.allocated)
        assert self.eng.get_pool("p").used == len(self.allocated) * self.region
        assert sum(ld.regions_used for ld in self.eng.list_lds("p")) == len(self.allocated)

    @invariant()
    def free_regions_read_zeros(self) -> None:
        """Isolation: an LD region that no VV holds (free, or released and awaiting its
        fsync) reads zeros on the LD and has no data waiting in the write-back cache."""
        if self.engine is not None:
            assert_free_regions_hold_nothing(self.eng)

    @invariant()
    def references_equal_the_store(self) -> None:
        """The space map's reference counts equal the mappings the store holds."""
        if self.engine is not None:
            assert_space_map_matches_the_store(self.eng)

    @invariant()
    def mirrors_agree(self) -> None:
        if self.engine is not None:
            assert_mirrors_agree(self.eng)


CI_SETTINGS = settings(
    max_examples=15,
    stateful_step_count=50,
    deadline=None,
    # no "explain" phase: it traces every line, which makes a failing run take minutes
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
LONG_SETTINGS = settings(CI_SETTINGS, max_examples=200, stateful_step_count=100)


def machine_for(raid: int, cache_mode: CacheMode) -> type[EngineMachine]:
    return type(
        f"EngineMachineRaid{raid}{cache_mode.value.title()}",
        (EngineMachine,),
        {"raid": raid, "initial_cache_mode": cache_mode},
    )


CONFIGS = [(raid, mode) for raid in (0, 1, 5) for mode in (CacheMode.WRITETHROUGH, CacheMode.WRITEBACK)]
IDS = [f"raid{raid}-{mode.value}" for raid, mode in CONFIGS]


@pytest.mark.parametrize(("raid", "cache_mode"), CONFIGS, ids=IDS)
def test_engine_matches_a_bytearray_model(raid: int, cache_mode: CacheMode) -> None:
    run_state_machine_as_test(machine_for(raid, cache_mode), settings=CI_SETTINGS)


@pytest.mark.long
@pytest.mark.timeout(3600)
@pytest.mark.parametrize(("raid", "cache_mode"), CONFIGS, ids=IDS)
def test_engine_matches_a_bytearray_model_long(raid: int, cache_mode: CacheMode) -> None:
    run_state_machine_as_test(machine_for(raid, cache_mode), settings=LONG_SETTINGS)


# --- the races behind the free-region invariant, pinned down deterministically -----------------


async def test_write_waiting_for_cache_room_never_lands_in_a_region_trimmed_meanwhile(tmp_path: Path) -> None:
    """A write-back write waits for room (back-pressure); meanwhile a trim gives its region's
    LD region back.  The write must land in a fresh assignment (trim, then write), never in
    the freed LD region, which another VV could get next."""
    region = 16 * KiB
    options = EngineOptions(allow_tiny_chunklets=True, destage_delay=60.0, max_dirty_bytes=2 * region)
    engine = await make_engine(tmp_path, options=options)
    await engine.create_pool("p", raid=1, region_size=region, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=MiB, cache_mode=CacheMode.WRITEBACK)
    vol = engine.volume("v")
    await vol.write(2 * region, b"mapped")
    await vol.flush()
    await vol.write(0, make_data("random", 1, 2 * region))  # the cache is full
    writer = asyncio.create_task(vol.write(2 * region + 100, b"late"))
    await asyncio.sleep(0)
    assert not writer.done(), "the write should be waiting for room in the cache"
    await vol.trim(2 * region, region)
    await vol.flush()
    await writer
    await vol.flush()
    assert bytes(await vol.read(2 * region, 104)) == bytes(100) + b"late"
    assert engine.get_vv("v").regions_allocated == 3
    assert_free_regions_hold_nothing(engine)
    await engine.close()


async def test_write_waiting_for_an_assignment_never_lands_in_a_region_trimmed_meanwhile(
    tmp_path: Path,
) -> None:
    """Claim 8's queue: writer B waits for writer A's assignment of the same region.  A trim
    that runs after the assignment but before B resumes frees the LD region; B must then
    assign the region again rather than write into the freed LD region."""
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=16 * KiB, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=MiB)
    vol = engine.volume("v")
    assert isinstance(vol, VirtualVolume)
    gate = asyncio.Event()

    async def slow_ld_creation(_pool: object) -> None:
        await gate.wait()

    engine.pools["p"].before_ld_create = slow_ld_creation
    trims: list[asyncio.Future[None]] = []
    check_after_assign = vol._check_after_assign

    def trim_right_after_the_assignment() -> None:
        check_after_assign()
        if not trims:  # scheduled now: runs before the waiting writer B resumes
            trims.append(asyncio.ensure_future(vol.trim(0, 16 * KiB)))

    vol._check_after_assign = trim_right_after_the_assignment  # type: ignore[method-assign]
    writer_a = asyncio.create_task(vol.write(0, b"A" * 100))
    writer_b = asyncio.create_task(vol.write(200, b"B" * 100))
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(writer_a, writer_b)
    await asyncio.gather(*trims)
    assert trims
    # The trim waits for its own commit (the store first), so it may end after both writes
    # (A, B, trim: the region reads zeros and is free) or between them (A, trim, then B assigns
    # the region afresh).  Never B's data in a freed LD region, never half of each.
    data = bytes(await vol.read(0, 300))
    allocated = engine.get_vv("v").regions_allocated
    assert (data, allocated) in ((bytes(300), 0), (bytes(200) + b"B" * 100, 1)), (data[190:210], allocated)
    await vol.flush()
    assert_free_regions_hold_nothing(engine)
    await engine.close()


async def test_compaction_during_a_rebuild_waits_for_it(tmp_path: Path) -> None:
    """A degraded LD whose regions are all free is released by a compaction that starts
    while a rebuild is working through it.  The rebuild must not go on with the released LD
    (it released the LD's chunklets a second time, failed, and left its spare chunklet
    counted as used and the rebuild shown as running)."""
    region = 16 * KiB
    per_ld = CHUNKLET // region
    data = make_data("random", 1, 3 * per_ld * region)
    for pauses in range(8):  # the compaction starts at each point of the rebuild in turn
        engine = await make_engine(tmp_path / str(pauses), pds=4)
        await engine.create_pool("p", raid=1, region_size=region, growth_increment=CHUNKLET, step=STEP)
        await engine.create_vv("v", pool="p", size=MiB)
        vol = engine.volume("v")
        await vol.write(0, data)
        middle = engine.list_lds()[1]
        await vol.trim(per_ld * region, per_ld * region)  # the middle LD is entirely free now
        await engine.fail_pd(middle.chunklets[0].pd_id)
        assert engine.get_ld(middle.id).health == LDHealth.DEGRADED
        rebuild = asyncio.create_task(engine.rebuild())
        for _ in range(pauses):
            await asyncio.sleep(0)
        assert await engine.compact_pool("p") == 1
        await rebuild
        assert not engine.rebuild_status().running
        assert middle.id not in {ld.id for ld in engine.list_lds()}
        assert all(ld.health == LDHealth.NORMAL for ld in engine.list_lds())
        in_lds = sum(len(ld.chunklets) for ld in engine.list_lds())
        assert sum(pd.chunklets_used for pd in engine.list_pds()) == in_lds
        expected = data[: per_ld * region] + bytes(per_ld * region) + data[2 * per_ld * region :]
        assert bytes(await vol.read(0, len(data))) == expected
        await engine.close()
        assert Engine.check(tmp_path / str(pauses)).ok


async def test_every_flush_that_may_cover_a_lost_write_fails(tmp_path: Path) -> None:
    """Write-back data whose destage fails (its RAID 1 set lost both mirrors) must be
    reported by the flush round that found the loss -- and by every other flush asked for
    before that round ended, whether it shares that round or runs the next one: each may
    cover the lost write, so none may report success."""
    options = EngineOptions(allow_tiny_chunklets=True, destage_delay=60.0)
    engine = await make_engine(tmp_path, pds=4, options=options)
    await engine.create_pool("p", raid=1, region_size=16 * KiB, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=MiB, cache_mode=CacheMode.WRITEBACK)
    vol = engine.volume("v")
    await vol.write(0, b"doomed")
    assert engine.cache_dirty_bytes() == 6
    for ref in engine.list_lds()[0].chunklets:
        await engine.fail_pd(ref.pd_id)
    # The first flush runs a round; the second asks during it (the next round); the third
    # asks during it as well, so the second flush's round covers it.
    flushes = [asyncio.ensure_future(vol.flush()) for _ in range(3)]
    results = await asyncio.gather(*flushes, return_exceptions=True)
    assert all(isinstance(r, MediumError) for r in results), results
    # Once reported, a flush asked for afterwards covers nothing that was lost.
    await vol.write(MiB // 2, b"fine")  # a new LD on the two healthy PDs
    await vol.flush()
    assert bytes(await vol.read(MiB // 2, 4)) == b"fine"
    await engine.close()


async def test_allocations_at_a_full_pool_wait_for_trimmed_regions_instead_of_failing(tmp_path: Path) -> None:
    """The pool is at its growth limit and full; two regions were trimmed (zeroed, awaiting
    their fsync).  Two writes that each need a region at the same time must both get one:
    the second waits for the first one's fsync rather than trying to grow (ENOSPC); and so
    must writes that need a region while a flush is fsyncing the trimmed regions."""
    region = 16 * KiB
    engine = await make_engine(tmp_path, pds=2)
    await engine.create_pool(
        "p", raid=1, region_size=region, growth_increment=CHUNKLET, step=STEP, growth_limit=CHUNKLET
    )
    await engine.create_vv("v", pool="p", size=MiB)
    vol = engine.volume("v")
    await vol.write(0, make_data("random", 1, CHUNKLET))  # every region of the one LD allowed
    await vol.trim(0, 2 * region)
    await asyncio.gather(vol.write(10 * region, b"a"), vol.write(20 * region, b"b"))
    assert bytes(await vol.read(10 * region, 1)) + bytes(await vol.read(20 * region, 1)) == b"ab"
    assert engine.get_vv("v").regions_allocated == CHUNKLET // region
    # The same while a flush is making the trimmed regions free: the write waits for it.
    await vol.trim(2 * region, 2 * region)  # two regions still holding the first write
    await asyncio.gather(vol.flush(), vol.write(30 * region, b"c"), vol.write(31 * region, b"d"))
    assert bytes(await vol.read(30 * region, 1)) + bytes(await vol.read(31 * region, 1)) == b"cd"
    assert AlertKind.POOL_GROWTH_LIMIT.value not in [a.kind.value for a in engine.list_alerts(True)]
    await engine.close()


class GatedIO:
    """Stands in for the engine's I/O threads: keeps every job until the test runs it, so the
    order in which the parts of one offloaded write land is the test's choice."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], asyncio.Future[Any]]] = []

    def submit(self, fn: Any, *args: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.jobs.append((fn, args, fut))
        return fut

    def run(self, index: int) -> None:
        fn, args, fut = self.jobs[index]
        fut.set_result(fn(*args))


@pytest.mark.parametrize("raid", [0, 1])
@pytest.mark.parametrize("how", ["trim of the partial tail region", "write-zeroes NO_HOLE"])
async def test_zeroing_racing_an_offloaded_write_is_never_a_mix(tmp_path: Path, raid: int, how: str) -> None:
    """An offloaded write-through write is one job per PD part (RAID 0: per column; RAID 1: per
    mirror), run by I/O threads in no set order.  A zeroing of the same region that ran while
    some parts had landed and others not -- the trim of a volume's partial last region, a
    write-zeroes that keeps the region -- left the region half written, half zeros (RAID 0:
    "region N holds neither outcome", seen once in the raid0-writethrough state machine; RAID
    1: mirrors that differ).  The zeroing must wait for the write to land: the region then
    holds the write's data or zeros, whole, and the mirrors agree."""
    region = 16 * KiB
    options = EngineOptions(allow_tiny_chunklets=True, destage_delay=0.001, offload_min_bytes=512)
    engine = await make_engine(tmp_path, pds=2, options=options)
    await engine.create_pool("p", raid=raid, region_size=region, growth_increment=CHUNKLET, step=STEP)
    size = 4 * region - (3 * 512 if how.startswith("trim") else 0)
    await engine.create_vv("v", pool="p", size=size)
    vol = engine.volume("v")
    assert isinstance(vol, VirtualVolume)
    lo = 3 * region
    await vol.write(lo, make_data("random", 1, size - lo))  # the region is assigned
    gated = GatedIO()
    vol._io = gated  # type: ignore[assignment]
    payload = make_data("random", 2, size - lo)
    writer = asyncio.create_task(vol.write(lo, payload))
    await asyncio.sleep(0)
    assert len(gated.jobs) == 2, "the write should be two jobs, one per PD part"
    gated.run(0)  # one part lands before the zeroing starts
    if how.startswith("trim"):
        zeroing = asyncio.create_task(vol.trim(lo, size - lo))
    else:
        zeroing = asyncio.create_task(vol.write_zeroes(lo, size - lo, may_trim=False))
    for _ in range(5):
        await asyncio.sleep(0)
    gated.run(1)  # the other lands after it
    await asyncio.gather(writer, zeroing)
    got = bytes(await vol.read(lo, size - lo))
    assert got in (payload, bytes(size - lo)), (
        f"the region holds neither the write nor zeros: {sum(a != b for a, b in zip(got, payload, strict=True))} "
        f"bytes differ from the write, {sum(1 for b in got if b)} are not zero"
    )
    assert_mirrors_agree(engine)
    await vol.flush()
    assert_free_regions_hold_nothing(engine)
    await engine.close()
