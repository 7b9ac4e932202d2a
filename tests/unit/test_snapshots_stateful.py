"""A hypothesis state machine over snapshots and clones: write / trim / zero / snapshot / clone /
delete / reopen / kill against an in-memory model of every volume's bytes, for RAID 0, 1 and 5
and both cache modes.  After every step every volume, snapshot and clone reads exactly its
model, the space map's reference counts equal the store's mappings (``check_space_map``), no
free region holds data, and the store check passes (sharing only within one tree, at one
offset)."""

from __future__ import annotations

import asyncio
import random

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

from tests.engine_helpers import CHUNKLET, STEP
from tests.engine_machine import (
    PD_SIZE,
    SET_SIZE,
    EngineMachineBase,
    assert_free_regions_hold_nothing,
    assert_space_map_matches_the_store,
)
from thinblock.engine import Engine, EngineOptions
from thinblock.errors import OutOfSpace, ReadOnlyDevice
from thinblock.metadata.check import check_store
from thinblock.model import CacheMode
from thinblock.units import KiB, Limit

REGION = 8 * KiB
REGIONS = 6
MAX_VOLUMES = 6


class SnapshotMachine(EngineMachineBase):
    raid: int = 1
    cache_mode: CacheMode = CacheMode.WRITETHROUGH
    tmp_prefix = "thinblock-snapshots-"

    def __init__(self) -> None:
        super().__init__()
        self.models: dict[str, bytearray] = {}
        self.snapshots: set[str] = set()
        self.family: dict[str, str] = {"v": "v"}  # the volume each tree started from
        self.snapshot_of: dict[str, str] = {}  # snapshot -> the volume it was taken of
        self.capped: set[str] = set()  # volumes with a snapshot space limit
        self.names = (f"n{i}" for i in range(10_000))

    @initialize(
        destage_delay=st.sampled_from([0.0005, 60.0]), offload_min=st.sampled_from([2 * KiB, 1 << 30])
    )
    def setup(self, destage_delay: float, offload_min: int) -> None:
        self.options = EngineOptions(
            allow_tiny_chunklets=True, destage_delay=destage_delay, offload_min_bytes=offload_min
        )
        self.engine = self.run(Engine.open(self.tmp, self.options))
        set_size = SET_SIZE[self.raid]
        for i in range(set_size + 1):
            self.run(self.eng.add_pd(self.tmp / f"pd{i}.img", size=PD_SIZE, chunklet_size=CHUNKLET))
        self.run(
            self.eng.create_pool(
                "p",
                raid=self.raid,
                set_size=set_size,
                region_size=REGION,
                growth_increment=CHUNKLET,
                step=STEP,
            )
        )
        self.run(self.eng.create_vv("v", pool="p", size=REGIONS * REGION, cache_mode=self.cache_mode))
        self.models["v"] = bytearray(REGIONS * REGION)

    def writable(self) -> list[str]:
        return sorted(n for n in self.models if n not in self.snapshots)

    def draw_range(self, data: st.DataObject) -> tuple[int, int]:
        size = REGIONS * REGION
        offset = data.draw(st.one_of(st.integers(0, size - 1), st.sampled_from(range(0, size, REGION))))
        length = data.draw(st.integers(1, min(size - offset, 2 * REGION + 100)))
        return offset, length

    # --- rules ---
    @precondition(lambda self: self.writable())
    @rule(data=st.data(), seed=st.integers(0, 2**32), zeros=st.booleans())
    def write(self, data: st.DataObject, seed: int, zeros: bool) -> None:
        name = data.draw(st.sampled_from(self.writable()))
        offset, length = self.draw_range(data)
        payload = bytes(length) if zeros else random.Random(seed).randbytes(length)
        try:
            self.run(self.eng.volume(name).write(offset, payload))
        except OutOfSpace as exc:
            # The snapshot space limit, policy fail: all or none, the volume unchanged.
            assert exc.reason == "vv-snapshot-space-limit" and name in self.capped, exc
        else:
            self.models[name][offset : offset + length] = payload
        self.invalidated(name)

    def invalidated(self, name: str) -> None:
        """Snapshots the limit's invalidate-oldest policy deleted while ``name`` wrote: only
        ``name``'s, and its oldest (names are made in order: n0, n1, ...)."""
        gone = sorted((s for s in self.snapshots if s not in self.eng.vvs), key=lambda s: int(s[1:]))
        if not gone:
            return
        assert name in self.capped and all(self.snapshot_of[s] == name for s in gone), gone
        left = [s for s in self.snapshots if self.snapshot_of[s] == name and s not in gone]
        assert all(int(s[1:]) > int(g[1:]) for s in left for g in gone), (gone, left)
        for s in gone:
            del self.models[s]
            self.snapshots.discard(s)

    @precondition(lambda self: self.writable())
    @rule(
        data=st.data(),
        limit=st.integers(1, 3),
        policy=st.sampled_from(["fail", "invalidate-oldest"]),
        seed=st.integers(0, 2**32),
    )
    def cap_snapshot_space(self, data: st.DataObject, limit: int, policy: str, seed: int) -> None:
        """A snapshot space limit of a few regions on a volume, a snapshot of it (room allowing),
        and a write over the whole volume: past the limit it fails whole (fail) or deletes the
        volume's oldest snapshots as it goes (invalidate-oldest); the model follows, and the
        counters stay exact (invariant)."""
        name = data.draw(st.sampled_from(self.writable()))
        self.run(
            self.eng.set_vv(name, snapshot_limit=Limit(bytes=limit * REGION), snapshot_limit_policy=policy)
        )
        self.capped.add(name)
        if len(self.models) < MAX_VOLUMES:
            snap = next(self.names)
            self.run(self.eng.snapshot_vv(name, snap))
            self.models[snap] = bytearray(self.models[name])
            self.snapshots.add(snap)
            self.family[snap] = self.family[name]
            self.snapshot_of[snap] = name
        payload = random.Random(seed).randbytes(REGIONS * REGION)
        try:
            self.run(self.eng.volume(name).write(0, payload))
        except OutOfSpace as exc:
            assert exc.reason == "vv-snapshot-space-limit" and policy == "fail", exc
        else:
            self.models[name][:] = payload
        self.invalidated(name)

    def uncapped(self) -> list[str]:
        return [n for n in self.writable() if n not in self.capped]

    @precondition(lambda self: self.uncapped())
    @rule(data=st.data(), seed=st.integers(0, 2**32))
    def racing_writes(self, data: st.DataObject, seed: int) -> None:
        """Several writes into one volume at once (copies on write waited for, claim 8).  Not into
        a volume with a snapshot space limit: racing writes refused by it may each be refused
        half-way (all or none holds for one write at a time)."""
        name = data.draw(st.sampled_from(self.uncapped()))
        rng = random.Random(seed)
        writes = []
        for _ in range(3):
            offset, length = self.draw_range(data)
            writes.append((offset, rng.randbytes(length)))
        vol = self.eng.volume(name)

        async def go() -> None:
            await asyncio.gather(*(vol.write(o, p) for o, p in writes))

        self.run(go())
        # Overlapping writes racing have no defined order; only non-overlapping bytes are checked.
        model = self.models[name]
        touched: dict[int, int] = {}
        for i, (offset, payload) in enumerate(writes):
            for b in range(offset, offset + len(payload)):
                touched[b] = i if b not in touched else -1
        got = bytes(self.run(vol.read(0, REGIONS * REGION)))
        for offset, payload in writes:
            model[offset : offset + len(payload)] = payload
        for b, who in touched.items():
            if who == -1:
                model[b] = got[b]  # one of the racing writes; which one is not defined

    @precondition(lambda self: self.writable())
    @rule(data=st.data(), unmap=st.booleans())
    def zero(self, data: st.DataObject, unmap: bool) -> None:
        name = data.draw(st.sampled_from(self.writable()))
        offset, length = self.draw_range(data)
        vol = self.eng.volume(name)
        try:
            if unmap and data.draw(st.booleans()):
                self.run(vol.trim(offset, length))
            else:
                self.run(vol.write_zeroes(offset, length, may_trim=unmap))
        except OutOfSpace as exc:
            # A partial region's zeroing copies it first, and the limit may refuse that (a trim
            # never copies): a failed zeroing changed nothing outside its range, and put only
            # zeros in it.
            assert exc.reason == "vv-snapshot-space-limit" and name in self.capped, exc
            got = bytes(self.run(vol.read(0, REGIONS * REGION)))
            model = self.models[name]
            assert got[:offset] == model[:offset] and got[offset + length :] == model[offset + length :]
            assert all(
                g == m or g == 0
                for g, m in zip(got[offset : offset + length], model[offset : offset + length], strict=True)
            )
            model[:] = got
        else:
            self.models[name][offset : offset + length] = bytes(length)
        self.invalidated(name)

    @precondition(lambda self: self.writable() and len(self.models) < MAX_VOLUMES)
    @rule(data=st.data())
    def snapshot(self, data: st.DataObject) -> None:
        source = data.draw(st.sampled_from(self.writable()))
        name = next(self.names)
        self.run(self.eng.snapshot_vv(source, name))
        self.models[name] = bytearray(self.models[source])
        self.snapshots.add(name)
        self.family[name] = self.family[source]
        self.snapshot_of[name] = source

    @precondition(lambda self: self.snapshots and len(self.models) < MAX_VOLUMES)
    @rule(data=st.data())
    def clone(self, data: st.DataObject) -> None:
        source = data.draw(st.sampled_from(sorted(self.snapshots)))
        name = next(self.names)
        self.run(self.eng.clone_vv(source, name))
        self.models[name] = bytearray(self.models[source])
        self.family[name] = self.family[source]

    def revert_pairs(self) -> list[tuple[str, str]]:
        return [
            (v, s)
            for v in self.writable()
            for s in sorted(self.snapshots)
            if self.family[v] == self.family[s]
        ]

    @precondition(lambda self: self.revert_pairs())
    @rule(data=st.data())
    def revert(self, data: st.DataObject) -> None:
        """The volume becomes the snapshot; every other volume, snapshot and clone stays."""
        name, snapshot = data.draw(st.sampled_from(self.revert_pairs()))
        self.run(self.eng.revert_vv(name, snapshot))
        self.models[name] = bytearray(self.models[snapshot])

    @precondition(lambda self: self.snapshots)
    @rule(data=st.data())
    def write_to_a_snapshot_is_refused(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snapshots)))
        with pytest.raises(ReadOnlyDevice):
            self.run(self.eng.volume(name).write(0, b"x"))

    @precondition(lambda self: len(self.models) > 1)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.models)))
        self.run(self.eng.delete_vv(name))
        del self.models[name]
        self.snapshots.discard(name)
        self.capped.discard(name)
        for snap, volume in list(self.snapshot_of.items()):
            if volume == name:
                self.snapshot_of[snap] = ""  # nobody's snapshots now: no policy deletes them

    @rule()
    def reopen(self) -> None:
        self.run(self.eng.close())
        self.open_engine()

    @rule()
    def kill(self) -> None:
        """kill -9 after a flush (everything acknowledged is durable): the unclean start zeroes
        free regions and resynchronises RAID sets over the shared maps."""
        self.run(self.eng.flush_all())
        self.crash()
        self.open_engine()

    # --- invariants ---
    @invariant()
    def every_volume_reads_its_model(self) -> None:
        if self.engine is None:
            return
        for name, model in self.models.items():
            got = bytes(self.run(self.eng.volume(name).read(0, len(model))))
            if got != model:
                first = next(i for i in range(len(got)) if got[i] != model[i])
                raise AssertionError(f"volume {name} differs from its model from byte {first}")

    @invariant()
    def references_and_store_agree(self) -> None:
        if self.engine is None:
            return
        assert_space_map_matches_the_store(self.eng)
        assert_free_regions_hold_nothing(self.eng)
        assert check_store(self.eng.store) == []


SETTINGS = settings(
    max_examples=6,
    stateful_step_count=30,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
CONFIGS = [(raid, mode) for raid in (0, 1, 5) for mode in (CacheMode.WRITETHROUGH, CacheMode.WRITEBACK)]
IDS = [f"raid{raid}-{mode.value}" for raid, mode in CONFIGS]


@pytest.mark.parametrize(("raid", "cache_mode"), CONFIGS, ids=IDS)
def test_snapshots_match_a_model_of_every_volume(raid: int, cache_mode: CacheMode) -> None:
    machine = type(
        f"SnapshotMachineRaid{raid}{cache_mode.value.title()}",
        (SnapshotMachine,),
        {"raid": raid, "cache_mode": cache_mode},
    )
    run_state_machine_as_test(machine, settings=SETTINGS)


@pytest.mark.long
@pytest.mark.timeout(3600)
@pytest.mark.parametrize(("raid", "cache_mode"), CONFIGS, ids=IDS)
def test_snapshots_match_a_model_long(raid: int, cache_mode: CacheMode) -> None:
    machine = type(
        f"SnapshotMachineLongRaid{raid}{cache_mode.value.title()}",
        (SnapshotMachine,),
        {"raid": raid, "cache_mode": cache_mode},
    )
    run_state_machine_as_test(machine, settings=settings(SETTINGS, max_examples=100, stateful_step_count=60))
