"""Pools: the patent's data allocation control structure (3PAR's CPG).

A pool hands out free LD regions to VVs.  When it has none it creates a new LD from
free chunklets (claim 7), sized by its growth increment, unless that would take its
usable capacity past the growth limit or no PDs have the chunklets (claim 6): then
the allocation fails with a ``SpaceShortage`` *value* and an alert.

LD region identity is one packed int, used everywhere above this layer::

    packed = ld_id << 32 | region_index          (region_index < 2**32)

Free-list rule (architecture brief): a region returns to the free list only after it
has been zeroed durably.  ``release`` punches the region at once (so it reads zeros
in this process), then parks it in ``pending``; it becomes free again only after the
PDs under it have been fsynced (``flush`` or, when the free list runs dry, right
before growing).  Fresh LDs are zeroed and fsynced before their regions are offered.

Concurrency: all methods run on the event loop thread; only blocking work (zeroing
new chunklets, fsync) is sent to a thread, and only one LD is created at a time per
pool: allocations that need it wait on the same future.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..alerts import AlertBus
from ..errors import HostOutOfSpace, MediumError, MetadataStoreFull
from ..logical.raid import Chunklet, LogicalDisk, RaidLevel, usable_per_row
from ..metadata.store import LDRow, PoolRow
from ..metadata.writer import MetadataWriter
from ..model import AlertKind, LDHealth, PoolState, Severity
from ..units import format_size
from .chunklets import ChunkletAllocator
from .spacemap import REGION_BITS, REGION_MASK, LDSpace, SpaceMap, pack

__all__ = ["REGION_BITS", "REGION_MASK", "LDSlots", "Pool", "SpaceShortage", "pack"]

log = logging.getLogger("thinblock.pool")


@dataclass(frozen=True, slots=True)
class SpaceShortage:
    """No region could be had: an expected result, not an error."""

    reason: AlertKind
    message: str


class LDSlots:
    """One LD of the pool: the LD, its regions' reference counts (``spacemap.LDSpace``), and
    whether it lost data (then none of its regions is handed out)."""

    __slots__ = ("ld", "lost", "space")

    def __init__(self, ld: LogicalDisk, space: LDSpace) -> None:
        self.ld = ld
        self.space = space
        self.lost = False  # the LD lost data (health FAILED): hand out none of its regions

    @property
    def regions(self) -> int:
        return self.space.regions

    @property
    def free(self) -> int:
        return self.space.free

    def free_ranges(self) -> list[tuple[int, int]]:
        """Runs of free regions as (first, count), for zeroing after an unclean shutdown."""
        return self.space.free_ranges()

    def assigned_ranges(self) -> list[tuple[int, int]]:
        """Runs of held regions as (first, count), for the resync after an unclean shutdown."""
        return self.space.held_ranges()


# A hook tests use to make LD creation deliberately slow (claim 8's queue test).
LDCreateHook = Callable[["Pool"], Awaitable[None]]


class Pool:
    def __init__(
        self,
        row: PoolRow,
        *,
        meta: MetadataWriter,
        alerts: AlertBus,
        chunklets: ChunkletAllocator,
        ld_registry: dict[int, LogicalDisk],
    ) -> None:
        self.row = row
        self._meta = meta
        self._alerts = alerts
        self._chunklets = chunklets
        self._ld_registry = ld_registry
        self.slots: dict[int, LDSlots] = {}  # ld_id -> the LD and its space, in creation order
        # Reference counts of every LD region (spacemap.py): a region shared by a volume and its
        # snapshots is zeroed and given back only when its last reference goes.
        self.space = SpaceMap()
        self.pending: list[int] = []  # packed regions zeroed, awaiting fsync before reuse
        self._growing: asyncio.Future[SpaceShortage | None] | None = None
        # id(batch) -> done: pending regions taken for an fsync (a flush's or sync_pending's)
        self._in_sync: dict[int, asyncio.Future[None]] = {}
        # Offloaded writes (physical/workers.py) still landing, per packed LD region, and the
        # regions given back meanwhile: ``release`` of such a region waits for its last write
        # (``write_landed``), so it is never zeroed, or handed to another VV, under a late write.
        # Event-loop thread only.
        self._writes_in_flight: dict[int, int] = {}
        self._release_when_landed: dict[int, int] = {}  # packed -> references to drop then
        self._landed_waiters: dict[int, list[asyncio.Future[None]]] = {}
        self.before_ld_create: LDCreateHook | None = None
        self.on_ld_created: Callable[[LogicalDisk, Pool], None] | None = None
        # Called with the ids of volumes whose snapshot space changed (the engine re-checks
        # their snapshot space warning and limit).
        self.on_snapshot_space: Callable[[list[int]], None] | None = None
        self.vv_count = 0

    # --- properties ---
    @property
    def id(self) -> int:
        return self.row.id

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def region_size(self) -> int:
        return self.row.region_size

    @property
    def used_regions(self) -> int:
        """Regions with at least one reference (a shared region counts once)."""
        return self.space.held

    @property
    def free_regions(self) -> int:
        return self.space.free

    def shared(self, packed: int) -> bool:
        """Whether another mapping holds LD region ``packed`` too (a write must copy it first)."""
        return bool(self.space.lds[packed >> REGION_BITS].refs[packed & REGION_MASK] > 1)

    def refcount(self, packed: int) -> int:
        """How many mappings (and reservations) hold LD region ``packed``."""
        return self.space.refcount(packed)

    @property
    def capacity(self) -> int:
        return sum(s.regions for s in self.slots.values()) * self.row.region_size

    @property
    def object_name(self) -> str:
        return f"pool:{self.row.name}"

    def state(self) -> PoolState:
        state = PoolState.HEALTHY
        if self.row.growth_warning is not None and self.capacity >= self.row.growth_warning:
            state = PoolState.WARNING
        healths = {s.ld.health for s in self.slots.values()}
        if LDHealth.DEGRADED in healths or LDHealth.REBUILDING in healths:
            state = max(state, PoolState.DEGRADED)
        out_of_space = self._alerts.is_open(
            AlertKind.POOL_GROWTH_LIMIT, self.object_name
        ) or self._alerts.is_open(AlertKind.POOL_OUT_OF_CHUNKLETS, self.object_name)
        if out_of_space and self.free_regions == 0:
            state = max(state, PoolState.OUT_OF_SPACE)
        if LDHealth.FAILED in healths:
            state = PoolState.FAILED
        return state

    # --- loading ---
    def attach_ld(self, ld: LogicalDisk, regions: int) -> LDSlots:
        slots = LDSlots(ld, self.space.attach(ld.id, regions))
        self.slots[ld.id] = slots
        return slots

    def load_references(self, ld_id: int, indexes: np.ndarray) -> None:
        """Loading the maps: one reference per map entry naming a region of LD ``ld_id`` (an index
        occurs once per volume that maps it)."""
        self.space.load(ld_id, indexes)

    def share(self, packed: int, count: int = 1) -> None:
        """``count`` more mappings of a held region (a snapshot or clone maps it too)."""
        self.space.ref(packed, count)

    def share_many(self, packed: np.ndarray, snapshot_of: int | None = None) -> None:
        """One more mapping of each region in ``packed`` (a map copied at once): a snapshot's of
        volume ``snapshot_of``, or (None) a clone's or a reverted volume's."""
        self.space.ref_many(packed, snapshot_of)
        self._snapshot_space_moved()

    def unshare_many(self, packed: np.ndarray, snapshot_of: int | None = None) -> None:
        """Undo ``share_many`` (the snapshot's store row was refused): each still held by others."""
        self.space.unref_many(packed, snapshot_of)
        self._snapshot_space_moved()

    # --- snapshot space (spacemap.py) ---
    def snapshot_space(self, vv_id: int) -> int:
        """Bytes only volume ``vv_id``'s snapshots hold: what deleting all of them would free."""
        return self.space.snapshot_regions(vv_id) * self.row.region_size

    def snapshot_holder_gone(self, packed: np.ndarray, vv_id: int) -> None:
        """Volume ``vv_id`` was deleted: its snapshots (their maps: ``packed``, one call each) are
        nobody's snapshots from now on, as after the next open."""
        self.space.drop_snapshot_holder(packed, vv_id)
        self._snapshot_space_moved()

    def forget_snapshot_owner(self, vv_id: int) -> None:
        self.space.forget_owner(vv_id)

    def _snapshot_space_moved(self) -> None:
        """Tell the volumes whose snapshot space changed (their warning and limit alerts)."""
        changed = self.space.changed
        if not changed:
            return
        owners = [vv_id for key in changed if (vv_id := self.space.key_owner(key)) is not None]
        changed.clear()
        if self.on_snapshot_space is not None and owners:
            self.on_snapshot_space(owners)

    # --- allocation ---
    def try_allocate(self) -> int | None:
        """A free region at once, or None (then ``allocate`` must be awaited)."""
        if self.free_regions == 0:
            return None
        for ld_id, slots in self.slots.items():
            if slots.space.free and not slots.lost:
                return self.space.take_from(ld_id)
        return None

    async def allocate(self) -> int | SpaceShortage:
        """A free region, creating an LD first if needed."""
        while True:
            packed = self.try_allocate()
            if packed is not None:
                return packed
            if self.pending:
                await self.sync_pending()
                continue
            if self._in_sync:
                # An fsync in progress (a flush, another allocation) is about to free released
                # regions: wait for it rather than grow the pool -- at the growth limit that
                # failed the write with ENOSPC although regions were about to be free.
                await asyncio.wait(list(self._in_sync.values()))
                continue
            shortage = await self.grow()
            if shortage is not None:
                packed = self.try_allocate()  # someone may have freed one meanwhile
                return shortage if packed is None else packed

    async def reserve(self, count: int) -> list[int] | SpaceShortage:
        """``count`` regions at once, or none: for a write that needs several new regions (the
        all-or-none rule, docs/architecture.md).  On a shortage every region taken so far is
        given back with ``unreserve`` and the shortage returned; an LD the pool grew on the way
        stays (its regions free)."""
        taken: list[int] = []
        try:
            while len(taken) < count:
                packed = self.try_allocate()
                if packed is None:
                    result = await self.allocate()
                    if isinstance(result, SpaceShortage):
                        self.unreserve(taken)
                        return result
                    packed = result
                taken.append(packed)
        except BaseException:
            self.unreserve(taken)
            raise
        return taken

    def unreserve(self, regions: list[int]) -> None:
        """Regions from ``reserve`` that were neither recorded nor written: free again at once.
        No zeroing or fsync is due -- they were free, hence durably zero, and nothing wrote them."""
        for packed in regions:
            self.space.untake(packed)
        regions.clear()

    def write_started(self, packed: int) -> None:
        """An offloaded write into ``packed`` is on its way; pair with ``write_landed``."""
        self._writes_in_flight[packed] = self._writes_in_flight.get(packed, 0) + 1

    def write_landed(self, packed: int) -> None:
        left = self._writes_in_flight[packed] - 1
        if left:
            self._writes_in_flight[packed] = left
            return
        del self._writes_in_flight[packed]
        for waiter in self._landed_waiters.pop(packed, ()):
            if not waiter.done():
                waiter.set_result(None)
        for _ in range(self._release_when_landed.pop(packed, 0)):
            try:
                self.release(packed)
            except Exception:  # a failed PD: the region is not reused (it stays counted as used)
                log.exception(
                    "pool '%s': releasing LD region %#x after its last write failed", self.name, packed
                )

    def writes_in_flight(self, packed: int) -> bool:
        """Whether offloaded writes into ``packed`` are still landing (``write_started``)."""
        return packed in self._writes_in_flight

    async def writes_landed(self, packed: int) -> None:
        """Return once no offloaded write into ``packed`` is in flight.  A zeroing in place waits
        for this: an offloaded write is one job per PD part, run in no set order, and zeros
        written between its parts would leave the region half old, half new (RAID 1: mirrors
        that differ)."""
        while packed in self._writes_in_flight:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._landed_waiters.setdefault(packed, []).append(waiter)
            await waiter

    def provision(self, packed: int) -> SpaceShortage | None:
        """Make a region just taken real on the host file systems under its LD (``fallocate`` of
        its byte ranges on every member), before the region is anyone's: a write into an assigned
        region then cannot meet ENOSPC, and a host file system that is full shows here, as a
        shortage, rather than as a failed write (issue 10 case 5).  The caller releases the
        region on a shortage."""
        slots = self.slots[packed >> REGION_BITS]
        size = self.row.region_size
        try:
            slots.ld.allocate((packed & REGION_MASK) * size, size)
        except HostOutOfSpace as exc:
            return SpaceShortage(AlertKind.PD_HOST_FULL, f"pool '{self.row.name}': {exc}")
        return None

    def unprovision(self, packed: int) -> None:
        """A region ``provision`` made real was not assigned after all (its commit refused, or
        another member's file system full): give its host blocks back before it goes back to the
        free list, so that refused writes do not eat a full file system's space bit by bit.
        Best effort (logged); the region is free and reads zeros either way."""
        slots = self.slots[packed >> REGION_BITS]
        size = self.row.region_size
        try:
            slots.ld.deallocate((packed & REGION_MASK) * size, size)
        except Exception:  # never let the clean-up hide the refusal being reported
            log.exception("pool '%s': giving back the host blocks of LD region %#x", self.name, packed)

    def release(self, packed: int, snapshot_of: int | None = None) -> bool:
        """One reference to a region goes (the caller unmapped it): a snapshot's of volume
        ``snapshot_of``, or (None) a volume's or a clone's.  When it was the last, the
        region is zeroed now and free after the next fsync; a region other volumes still map is
        left as it is.  With offloaded writes still landing in it, all that waits for the last
        of them.  Returns whether the region was zeroed now."""
        if packed in self._writes_in_flight:
            # Writes go only into regions no snapshot holds: this reference is the writer's.
            assert snapshot_of is None, "a snapshot's region with writes in flight"
            self._release_when_landed[packed] = self._release_when_landed.get(packed, 0) + 1
            return False
        if self.space.refcount(packed) > 1:
            self.space.unref(packed, snapshot_of)  # still mapped elsewhere: its data stays
            if self.space.changed:
                self._snapshot_space_moved()
            return False
        size = self.row.region_size
        # Zeroed while still held: a zeroing that fails (a failed PD) leaves it held, not reused.
        self.slots[packed >> REGION_BITS].ld.zero((packed & REGION_MASK) * size, size)
        left = self.space.unref(packed, snapshot_of)
        assert left == 0
        if self.space.changed:
            self._snapshot_space_moved()
        self.space.mark_pending(packed)
        self.pending.append(packed)
        return True

    def release_many(self, regions: Sequence[int], snapshot_of: int | None = None) -> int:
        """``release`` of each region of ``regions`` (distinct packed regions: a batch of a delete
        or a trim), with the zeroing of those whose last reference goes done in runs: adjacent
        regions of one LD are zeroed by one ``LogicalDisk.zero`` call, so one punch per member
        per run rather than per region (a delete of a big volume region by region took minutes).
        Every rule of ``release`` holds: a region writes still land in waits for the last of them;
        a region another mapping holds keeps its data; a region is zeroed while still held and
        pending (free after the next fsync) only once its zeroing returned.  A run whose zeroing
        fails (a failed PD) stays held, not reused; the other runs are released, then the first
        such error is raised.  Returns how many regions were zeroed."""
        last: dict[int, list[int]] = {}  # ld_id -> indexes whose last reference goes now
        for packed in regions:
            if packed in self._writes_in_flight or self.space.refcount(packed) > 1:
                self.release(packed, snapshot_of)  # deferred, or only one reference of several goes
                continue
            last.setdefault(packed >> REGION_BITS, []).append(packed & REGION_MASK)
        size = self.row.region_size
        zeroed = 0
        failure: BaseException | None = None
        for ld_id, indexes in last.items():
            indexes.sort()
            ld = self.slots[ld_id].ld
            for first, count in _adjacent_runs(indexes):
                try:
                    # Zeroed while still held: a zeroing that fails leaves the run held.
                    ld.zero(first * size, count * size)
                except Exception as exc:
                    failure = failure or exc
                    continue
                for index in range(first, first + count):
                    packed = pack(ld_id, index)
                    left = self.space.unref(packed, snapshot_of)
                    assert left == 0
                    self.space.mark_pending(packed)
                    self.pending.append(packed)
                zeroed += count
        if self.space.changed:
            self._snapshot_space_moved()
        if failure is not None:
            raise failure
        return zeroed

    def take_pending(self) -> list[int]:
        """Before an fsync: the regions it will make durably zero.  Hand the batch back with
        ``free_pending`` after the fsync, or ``return_pending`` when it failed; meanwhile an
        allocation that finds no free region waits for it instead of growing the pool."""
        batch, self.pending = self.pending, []
        if batch:
            self._in_sync[id(batch)] = asyncio.get_running_loop().create_future()
        return batch

    def return_pending(self, batch: list[int]) -> None:
        """The fsync failed: the regions are not known to be durably zero; they stay pending."""
        self.pending.extend(batch)
        self._sync_ended(batch)

    def _sync_ended(self, batch: list[int]) -> None:
        done = self._in_sync.pop(id(batch), None)
        if done is not None:
            done.set_result(None)

    def free_pending(self, batch: list[int]) -> None:
        """After the fsync of every PD under ``batch``: the regions are free again."""
        for packed in batch:
            self.space.free_pending(packed)
        self._sync_ended(batch)

    async def sync_pending(self) -> None:
        """Free the pending regions: fsync the LDs under them."""
        batch = self.take_pending()
        if not batch:
            return
        try:
            lds = {self.slots[p >> REGION_BITS].ld for p in batch if (p >> REGION_BITS) in self.slots}
            await asyncio.get_running_loop().run_in_executor(None, _flush_lds, lds)
        except BaseException:
            self.return_pending(batch)
            raise
        self.free_pending(batch)

    # --- growth (claims 6 and 7) ---
    async def grow(self) -> SpaceShortage | None:
        """Create one LD of the growth increment.  Concurrent callers share one creation."""
        if self._growing is not None:
            return await asyncio.shield(self._growing)
        fut: asyncio.Future[SpaceShortage | None] = asyncio.get_running_loop().create_future()
        self._growing = fut
        try:
            result = await self._create_ld()
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            self._growing = None

    async def _create_ld(self) -> SpaceShortage | None:
        row = self.row
        raid = RaidLevel(row.raid)
        capacity = self.capacity
        sizes = sorted(self._chunklets.chunklet_sizes(), reverse=True)
        if not sizes:
            return self._out_of_chunklets("no physical disks")
        obj = self.object_name
        for chunklet_size in sizes:
            per_row = usable_per_row(raid, row.set_size, chunklet_size)
            # At least one whole region per LD, however small the chunklets.
            rows_min = max(1, -(-row.region_size // per_row))
            rows_wanted = max(rows_min, -(-row.growth_increment // per_row))
            if row.growth_limit is not None:
                rows_allowed = (row.growth_limit - capacity) // per_row
                if rows_allowed < rows_min:
                    continue
                rows_wanted = min(rows_wanted, rows_allowed)
            picked: list[list[Chunklet]] = []
            for _ in range(rows_wanted):
                chunk_row = self._chunklets.pick(row.set_size, chunklet_size=chunklet_size)
                if chunk_row is None:
                    break
                picked.append(chunk_row)
            if len(picked) >= rows_min:
                return await self._build_ld(raid, picked, per_row)
            for chunk_row in picked:  # not enough for one region: give them back
                for c in chunk_row:
                    self._chunklets.release(c.pd.id, c.index)
        if (
            row.growth_limit is not None
            and capacity + min(usable_per_row(raid, row.set_size, s) for s in sizes) > row.growth_limit
        ):
            message = (
                f"pool '{row.name}' cannot grow: its growth limit is {format_size(row.growth_limit)}"
                f" and it already has {format_size(capacity)}"
            )
            self._alerts.condition(AlertKind.POOL_GROWTH_LIMIT, obj, Severity.CRITICAL, message)
            return SpaceShortage(AlertKind.POOL_GROWTH_LIMIT, message)
        return self._out_of_chunklets(f"fewer than {row.set_size} healthy PDs have a free chunklet")

    def _out_of_chunklets(self, why: str) -> SpaceShortage:
        message = f"pool '{self.row.name}' cannot grow: {why}"
        self._alerts.condition(AlertKind.POOL_OUT_OF_CHUNKLETS, self.object_name, Severity.CRITICAL, message)
        return SpaceShortage(AlertKind.POOL_OUT_OF_CHUNKLETS, message)

    async def _build_ld(
        self, raid: RaidLevel, rows: list[list[Chunklet]], per_row: int
    ) -> SpaceShortage | None:
        row = self.row
        try:
            if self.before_ld_create is not None:
                await self.before_ld_create(self)
            # Chunklets may hold a released LD's data: zero them durably before any region is
            # offered -- all but those known to read zeros durably already (ChunkletAllocator).
            unknown = [c for chunk_row in rows for c in chunk_row if not self._chunklets.take_zeroed(c)]
            if unknown:
                await asyncio.get_running_loop().run_in_executor(None, _zero_chunklets, unknown)
        except BaseException as exc:
            for chunk_row in rows:
                for c in chunk_row:
                    self._chunklets.release(c.pd.id, c.index)
            if isinstance(exc, MediumError):
                return self._out_of_chunklets(f"a PD failed while its chunklets were zeroed: {exc}")
            raise
        size = per_row * len(rows)
        regions = size // row.region_size
        ld_row = LDRow(
            id=0,
            pool_id=row.id,
            raid=int(raid),
            set_size=row.set_size,
            step=row.step,
            region_size=row.region_size,
            regions=regions,
            chunklets={
                (r, c): (ch.pd.id, ch.index)
                for r, chunk_row in enumerate(rows)
                for c, ch in enumerate(chunk_row)
            },
        )
        try:
            ld_id = await self._meta.call(self._meta.store.add_ld, ld_row)
        except BaseException as exc:
            # Not recorded: the chunklets are free again (zeroed, so known to read zeros).
            for chunk_row in rows:
                for c in chunk_row:
                    self._chunklets.release(c.pd.id, c.index)
            if isinstance(exc, MetadataStoreFull):  # a value, like every other shortage of space
                return SpaceShortage(AlertKind.METADATA_STORE_FULL, f"pool '{row.name}' cannot grow: {exc}")
            raise
        ld = LogicalDisk(ld_id, raid, row.set_size, row.step, rows)
        self._ld_registry[ld_id] = ld
        self.attach_ld(ld, regions)
        if self.on_ld_created is not None:
            self.on_ld_created(ld, self)
        obj = self.object_name
        self._alerts.event(
            AlertKind.LD_CREATED,
            f"ld:{ld_id}",
            Severity.INFO,
            f"pool '{row.name}' grew by LD {ld_id}: RAID {int(raid)}, {len(rows)} row(s), {format_size(regions * row.region_size)}",
        )
        self._alerts.clear(AlertKind.POOL_GROWTH_LIMIT, obj)
        self._alerts.clear(AlertKind.POOL_OUT_OF_CHUNKLETS, obj)
        self.check_growth_warning()
        log.info(
            "ld created",
            extra={"event": "ld-created", "pool": row.name, "ld": ld_id, "rows": len(rows), "size": size},
        )
        return None

    def check_growth_warning(self) -> None:
        warning = self.row.growth_warning
        obj = self.object_name
        if warning is not None and self.capacity >= warning:
            self._alerts.condition(
                AlertKind.POOL_GROWTH_WARNING,
                obj,
                Severity.WARNING,
                f"pool '{self.row.name}' has grown to {format_size(self.capacity)},"
                f" past its growth warning of {format_size(warning)}",
            )
        else:
            self._alerts.clear(AlertKind.POOL_GROWTH_WARNING, obj)

    def settings_changed(self) -> None:
        """Warning or limit moved: re-evaluate the conditions they govern."""
        self.check_growth_warning()
        limit = self.row.growth_limit
        if limit is None or limit > self.capacity:
            self._alerts.clear(AlertKind.POOL_GROWTH_LIMIT, self.object_name)

    # --- compaction ---
    def releasable_lds(self) -> list[int]:
        return [ld_id for ld_id, s in self.slots.items() if s.space.free == s.space.regions]

    def detach_ld(self, ld_id: int) -> LogicalDisk:
        slots = self.slots.pop(ld_id)
        self.space.detach(ld_id)
        return slots.ld


def _adjacent_runs(sorted_indexes: list[int]) -> Iterator[tuple[int, int]]:
    """Runs of consecutive region indexes as (first, count); the indexes are sorted, distinct."""
    if not sorted_indexes:
        return
    first = prev = sorted_indexes[0]
    for index in sorted_indexes[1:]:
        assert index > prev, f"region {index} twice in one release"
        if index != prev + 1:
            yield first, prev - first + 1
            first = index
        prev = index
    yield first, prev - first + 1


def _flush_lds(lds: set[LogicalDisk]) -> None:
    for ld in lds:
        ld.flush()


def _zero_chunklets(chunklets: list[Chunklet]) -> None:
    pds = {}
    for c in chunklets:
        c.pd.punch(c.pd.chunklet_offset(c.index), c.pd.chunklet_size)
        pds[c.pd.id] = c.pd
    for pd in pds.values():
        pd.fsync()
