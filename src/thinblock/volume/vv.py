"""Virtual volumes: what a host sees (claims 1, 5, 8, 9, 10).

A request is split by region; each region either points at the zero LD or at one
LD region of the VV's pool (see ``regionmap``)::

    host offset ... |<------ region 0 ------>|<------ region 1 ------>|<-- region 2 ...
    map             |  zero LD (reads zeros)  |  LD 7 region 12        |  zero LD
    read            |  zeros, no disk I/O     |  cache, then LD 7      |  zeros
    write           |  allocate, then write   |  write (cache or LD)   |  allocate ...

Write path, per region (claim 1): mapped -> write there; zero LD and all-zero data ->
nothing (zero detect); zero LD otherwise -> check the allocation limit (claim 5), take
a region from the pool (which may create an LD, claim 7), record the assignment in the
store *before* writing data into it, write, then check the warning (claim 9).  While a
region is being assigned, later writes to the same region wait for that assignment
(claim 8) instead of assigning twice; other regions are not held up.

Caller contract (the front end validated it): 0 <= offset, offset + length <= size,
length > 0.  Methods run on the event loop thread; the fast paths never suspend.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import numpy as np

from ..alerts import AlertBus
from ..blockdev import Buffer, Capabilities, Extent, ExtentFlags, ReadPiece, SpanPiece
from ..cache.writeback import WriteBackCache
from ..errors import MediumError, NotFound, OutOfSpace, ReadOnlyDevice, VolumeGone
from ..logical.raid import LogicalDisk
from ..metadata.lease import ServingGate
from ..metadata.store import VVRow
from ..metadata.writer import MetadataWriter
from ..model import AlertKind, CacheMode, Severity, SnapshotLimitPolicy
from ..physical.workers import IOWorkers
from ..pool.pool import REGION_BITS, REGION_MASK, Pool, SpaceShortage
from ..units import Limit, format_size
from . import snapspace
from .bitmaps import SnapshotBitmap, VolumeTree
from .cow import copy_on_write
from .regionmap import ZERO_LD, RegionMap

log = logging.getLogger("thinblock.volume")

_ZEROS = bytes(4 * 1024 * 1024)
_ZERO_VIEW = memoryview(_ZEROS)  # read-only: safe to hand out slices of it
HOLE_ZERO = ExtentFlags.HOLE | ExtentFlags.ZERO
# Trims and deletes unmap at most this many regions before yielding to the loop.
UNMAP_BATCH = 256
UNMAP_OFF_LOOP = 64  # unassignments in one store call that run off the loop (metadata/writer.py)


def _is_zero(data: Buffer) -> bool:
    """Zero detect, on every write into the zero LD: rejects real data on its first bytes,
    and scans the rest with numpy (about 50 us per MiB; a bytes comparison took 2.6 ms)."""
    view = data if isinstance(data, memoryview) and data.format == "B" else memoryview(data).cast("B")
    n = len(view)
    head = min(n, 16)
    if view[:head].tobytes() != _ZEROS[:head]:
        return False
    return not np.frombuffer(view, np.uint64 if n % 8 == 0 else np.uint8).any()


class VirtualVolume:
    def __init__(
        self,
        row: VVRow,
        pool: Pool,
        *,
        meta: MetadataWriter,
        alerts: AlertBus,
        lds: dict[int, LogicalDisk],
        cache: WriteBackCache,
        flush_node: Callable[[], Awaitable[None]],
        io: IOWorkers | None = None,
        offload_min: int = 128 * 1024,
        writeback_bypass_min: int | None = None,
        serving: ServingGate | None = None,
    ) -> None:
        self.row = row
        self.pool = pool
        self._meta = meta
        self._alerts = alerts
        self._lds = lds
        self._wb = cache
        self._flush_node = flush_node
        self.map = RegionMap()
        region_size = pool.region_size
        assert region_size & (region_size - 1) == 0
        self.region_size = region_size
        self._shift = region_size.bit_length() - 1
        self._mask = region_size - 1
        self._allocating: dict[int, asyncio.Future[int]] = {}
        # Regions reserved for multi-region writes in progress and not yet assigned: they
        # count against the allocation limit like assigned ones (the all-or-none rule).
        self._reserved = 0
        # Write-through writes of offload_min bytes or more go to the I/O threads.  The pool
        # counts them per LD region (write_started / write_landed): a region a trim or delete
        # gives back meanwhile is released only when the last write into it has landed.
        self._io = io
        self._offload_min = offload_min if io is not None else 1 << 62
        # Write-back writes of this many bytes or more (within one region) go around the cache
        # (``_write_region``); None: never.
        self._bypass_min = (
            writeback_bypass_min if writeback_bypass_min is not None and io is not None else 1 << 62
        )
        self._writeback = row.cache_mode == CacheMode.WRITEBACK.value
        # A snapshot is read-only (a stable image for backups); a clone is a volume like any other.
        self.read_only = row.kind == "snapshot"
        self.capabilities = Capabilities(file_spans=True, can_write=not self.read_only, dirty_bitmaps=True)
        # The snapshots this volume may be compared with (dirty bitmaps): set by the engine.
        self.tree: VolumeTree | None = None
        # The volume whose snapshot this is (its references count as that volume's snapshot
        # space: volume/snapspace.py); None for volumes, clones, and snapshots whose volume was
        # deleted (they are nobody's snapshots from then on).
        self.snapshot_of: int | None = row.parent_id if self.read_only else None
        # Copies on write under way that will add to this volume's snapshot space (counted
        # against its limit before they land), and the limit's invalidate-oldest policy
        # (the engine's: it deletes a snapshot; returns its name, None when there is none).
        self.cow_to_snapshots = 0
        self.invalidate_oldest: Callable[[VirtualVolume], Awaitable[str | None]] | None = None
        # Writes, trims and zeroings in progress, and the gate a snapshot closes while it settles
        # the volume and copies its map (``quiesced``).
        self._active = 0
        self._gate: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        # Closed when this node may no longer serve its volumes (its lease lost, or not renewed
        # in time): every request then fails like one on a deleted volume (metadata/lease.py).
        self._serving = serving if serving is not None else ServingGate()
        self.cow_copies = 0  # regions copied on write (statistics)
        # statistics (plain ints: cheap on the hot path)
        self.reads = self.writes = self.read_bytes = self.write_bytes = 0
        self.trims = self.zeroes = self.flushes = self.errors = 0
        self.deleted = False
        # Something reached the LDs outside the two cache copies since the last node flush (a
        # write-through write, a zeroing, a trim): the next FLUSH cannot be covered by the copies.
        self._unflushed_direct = False
        # FLUSHes (and FUA writes) asked so far, and the last lost destage reported: (the count
        # when it was taken, what was lost).  Every one asked up to then fails, not only the one
        # that took it: each may cover the lost write (as Engine.flush_all does for fsyncs).
        self._flushes_asked = 0
        self._destage_failure: tuple[int, str] | None = None

    # --- identity ---
    @property
    def name(self) -> str:
        return self.row.name

    @property
    def description(self) -> str:
        return (
            f"thinblock VV '{self.row.name}' in pool '{self.pool.name}' "
            f"({format_size(self.row.size)} virtual, {format_size(self.allocated)} allocated)"
        )

    @property
    def size(self) -> int:
        return self.row.size

    @property
    def object_name(self) -> str:
        return f"vv:{self.row.name}"

    @property
    def allocated(self) -> int:
        return self.map.count * self.region_size

    @property
    def cache_mode(self) -> CacheMode:
        return CacheMode.WRITEBACK if self._writeback else CacheMode.WRITETHROUGH

    def set_cache_mode(self, mode: CacheMode) -> None:
        self._writeback = mode == CacheMode.WRITEBACK
        self.row.cache_mode = mode.value

    @property
    def alloc_warning(self) -> Limit | None:
        return self.row.limit("alloc_warning")

    @property
    def alloc_limit(self) -> Limit | None:
        return self.row.limit("alloc_limit")

    @property
    def snapshot_warning(self) -> Limit | None:
        return self.row.limit("snap_warning")

    @property
    def snapshot_limit(self) -> Limit | None:
        return self.row.limit("snap_limit")

    @property
    def snapshot_limit_policy(self) -> SnapshotLimitPolicy:
        return SnapshotLimitPolicy(self.row.snap_limit_policy)

    @property
    def snapshot_space(self) -> int:
        """Bytes only this volume's snapshots hold (volume/snapspace.py)."""
        return self.pool.snapshot_space(self.row.id)

    def _gone(self) -> VolumeGone:
        # Deleted under a connected client (vv delete --force): its regions went back to the
        # pool, so a read would return zeros where data was and a write would be lost.  Or the
        # serving gate closed: another daemon may own the volume now, so no answer from here is safe.
        if self.deleted:
            return VolumeGone(f"volume '{self.row.name}' was deleted")
        return VolumeGone(f"volume '{self.row.name}' {self._serving.why()}")

    def check_serving(self) -> None:
        """Raises VolumeGone when the volume was deleted or this node may not serve it."""
        if self.deleted or self._serving.closed():
            raise self._gone()

    # --- dirty bitmaps (volume/bitmaps.py) ---
    def dirty_bitmaps(self) -> list[str]:
        """One per other snapshot of this volume's tree, named after it (BitmapVolume)."""
        return sorted(self.tree.bitmap_bases(self)) if self.tree is not None else []

    def dirty_bitmap(self, name: str) -> SnapshotBitmap:
        """The regions where this volume differs from snapshot ``name`` of its tree."""
        base = self.tree.bitmap_bases(self).get(name) if self.tree is not None else None
        if base is None:
            raise NotFound(
                f"volume '{self.name}' has no dirty bitmap '{name}' (no snapshot of its tree by that name)"
            )
        return SnapshotBitmap(self, base)

    # --- reads (claim 10) ---
    # One region walk (``_pieces``) and one way to read an assigned piece (``_read_piece``,
    # ``_read_piece_into``) serve every read: ``read_extents`` (the NBD server's), ``read`` (the
    # API's export, iSCSI, tests) and ``cache``.  A read inside one region -- the common case --
    # skips the walk: one map lookup, one pread at most.
    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """The range region by region: (volume offset, length, packed LD region or ZERO_LD)."""
        shift, mask, size, get = self._shift, self._mask, self.region_size, self.map.get
        pos, end = offset, offset + length
        while pos < end:
            n = min(size - (pos & mask), end - pos)
            yield pos, n, get(pos >> shift)
            pos += n

    def _read_piece(self, pos: int, n: int, packed: int) -> bytes | bytearray | memoryview:
        """``n`` bytes from volume offset ``pos`` inside the assigned region ``packed``, with the
        write-back cache's dirty writes laid over them."""
        ld = self._lds[packed >> REGION_BITS]
        ld_offset = ((packed & REGION_MASK) << self._shift) + (pos & self._mask)
        if not self._wb.has(packed):
            return ld.read(ld_offset, n)
        buf = bytearray(n)
        view = memoryview(buf)
        ld.read_into(ld_offset, view)
        self._wb.overlay(packed, pos & self._mask, view)
        return buf

    def _read_piece_into(self, pos: int, packed: int, view: memoryview) -> None:
        mask = self._mask
        ld = self._lds[packed >> REGION_BITS]
        ld.read_into(((packed & REGION_MASK) << self._shift) + (pos & mask), view)
        self._wb.overlay(packed, pos & mask, view)

    def _read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` (already zeroed) from ``offset``."""
        for pos, n, packed in self._pieces(offset, len(view)):
            if packed != ZERO_LD:
                self._read_piece_into(pos, packed, view[pos - offset : pos - offset + n])

    def _count_read(self, length: int) -> None:
        if self.deleted or self._serving.closed():
            raise self._gone()
        self.reads += 1
        self.read_bytes += length

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        self._count_read(length)
        shift = self._shift
        if (offset + length - 1) >> shift == offset >> shift:
            packed = self.map.get(offset >> shift)
            if packed == ZERO_LD:
                return _ZERO_VIEW[:length] if length <= len(_ZEROS) else bytes(length)
            return self._read_piece(offset, length, packed)
        buf = bytearray(length)
        self._read_into(offset, memoryview(buf))
        return buf

    async def read_extents(self, offset: int, length: int) -> list[ReadPiece]:
        """The read as (offset, length, data) runs; data None where the zero LD is (a hole):
        the NBD server sends those as OFFSET_HOLE chunks, no zeros on the wire."""
        self._count_read(length)
        shift = self._shift
        if (offset + length - 1) >> shift == offset >> shift:
            packed = self.map.get(offset >> shift)
            return [(offset, length, None if packed == ZERO_LD else self._read_piece(offset, length, packed))]
        out: list[ReadPiece] = []
        for pos, n, packed in self._pieces(offset, length):
            if packed != ZERO_LD:
                out.append((pos, n, self._read_piece(pos, n, packed)))
            elif out and out[-1][2] is None:
                out[-1] = (out[-1][0], out[-1][1] + n, None)
            else:
                out.append((pos, n, None))
        return out

    async def read_spans(self, offset: int, length: int) -> list[SpanPiece]:
        """``read_extents`` for a front end that can ``sendfile``: a read inside one assigned
        region with no write-back data over it is answered with the FileSpans of the PD bytes
        the LD would read (``LogicalDisk.file_spans``), so they go from the page cache to the
        socket without a copy through Python; every other read as ``read_extents``."""
        shift = self._shift
        if (offset + length - 1) >> shift == offset >> shift:
            packed = self.map.get(offset >> shift)
            if packed != ZERO_LD and not self._wb.has(packed):
                ld = self._lds[packed >> REGION_BITS]
                spans = ld.file_spans(((packed & REGION_MASK) << shift) + (offset & self._mask), length)
                if spans is not None:
                    self._count_read(length)
                    out: list[SpanPiece] = []
                    pos = offset
                    for span in spans:
                        out.append((pos, span.length, span))
                        pos += span.length
                    return out
        return list(await self.read_extents(offset, length))

    # --- writes (claims 1, 2, 4, 8) ---
    def _read_only_error(self) -> ReadOnlyDevice:
        return ReadOnlyDevice(f"volume '{self.row.name}' is a snapshot: it is read-only (clone it to write)")

    async def _enter_update(self) -> None:
        """Before a write, trim or zeroing: refused on a snapshot; waits while a snapshot of
        this volume is being taken; counted until ``_leave_update``."""
        if self.deleted or self._serving.closed():
            raise self._gone()
        if self.read_only:
            raise self._read_only_error()
        while self._gate is not None:
            await self._gate.wait()
            if self.deleted or self._serving.closed():
                raise self._gone()
        self._active += 1

    def _leave_update(self) -> None:
        self._active -= 1
        if not self._active and self._drained is not None:
            self._drained.set()

    @asynccontextmanager
    async def quiesced(self) -> AsyncIterator[None]:
        """No write, trim or zeroing of this volume runs inside: new ones wait, those in progress
        are waited for.  A snapshot settles the cache and copies the map in here."""
        while self._gate is not None:  # one at a time
            await self._gate.wait()
        gate = self._gate = asyncio.Event()
        try:
            while self._active:
                self._drained = asyncio.Event()
                await self._drained.wait()
            self._drained = None
            yield
        finally:
            self._drained = None
            self._gate = None
            gate.set()

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self._enter_update()
        try:
            await self._write(offset, data, fua)
        finally:
            self._leave_update()

    async def _write(self, offset: int, data: Buffer, fua: bool) -> None:
        length = len(data)
        self.writes += 1
        self.write_bytes += length
        shift, mask = self._shift, self._mask
        region = offset >> shift
        if (offset + length - 1) >> shift == region:
            packed = self.map.get(region)
            if (
                packed != ZERO_LD
                and (self._wb.has_room(length) if self._writeback else self._wb.settled(packed))
                and not self.pool.shared(packed)
            ):
                await self._write_region(packed, region, offset & mask, data)  # the fast path: no wait
            else:
                await self._write_piece(region, offset & mask, data)
        else:
            view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
            snapspace.check_whole_write(self, offset, length)  # the fail policy: all or none
            reserved = await self._reserve_new_regions(offset, view)
            try:
                pos = 0
                while pos < length:
                    voff = offset + pos
                    n = min(self.region_size - (voff & mask), length - pos)
                    await self._write_piece(voff >> shift, voff & mask, view[pos : pos + n], reserved)
                    pos += n
            finally:
                if reserved:  # regions another writer assigned meanwhile: not needed after all
                    self._reserved -= len(reserved)
                    self.pool.unreserve(reserved)
        if not self._writeback or self._wb.writes_through:
            self._unflushed_direct = True
        if fua:
            await self._flush_if_needed()
        if self._serving.closed():
            # Paused while the write was under way (its assignment committed, its data in
            # flight) and the lease gone since: not acknowledged (a failed write's content is
            # undefined), never a success answered by a node that may no longer own the volume.
            raise self._gone()

    async def _reserve_new_regions(self, offset: int, view: memoryview) -> list[int]:
        """The all-or-none rule: a write that needs several new regions takes them all from the
        pool before any is assigned, or fails with OutOfSpace having taken none -- a refused
        write consumes none of the headroom it was refused for (the VV's allocation limit, the
        pool's growth limit).  Returns the reserved regions (empty when fewer than two are new:
        one region is all-or-none by itself); ``_assign`` takes from them."""
        shift, mask, size = self._shift, self._mask, self.region_size
        needed = 0
        pos, end = 0, len(view)
        while pos < end:
            voff = offset + pos
            n = min(size - (voff & mask), end - pos)
            region = voff >> shift
            if (
                self.map.get(region) == ZERO_LD
                and region not in self._allocating
                and not _is_zero(view[pos : pos + n])
            ):
                needed += 1
            pos += n
        if needed < 2:
            return []
        self._check_limit(needed)
        self._reserved += needed  # claimed before the wait: concurrent writers see it
        try:
            result = await self.pool.reserve(needed)
        except BaseException:
            self._reserved -= needed
            raise
        if isinstance(result, SpaceShortage):
            self._reserved -= needed
            raise OutOfSpace(
                f"VV '{self.row.name}': {result.message} (the write needs {needed} new regions of "
                f"{format_size(size)}; none was taken)",
                result.reason.value,
            )
        return result

    def _check_limit(self, new_regions: int) -> None:
        """OutOfSpace (and the limit alert) when ``new_regions`` more would pass the allocation limit."""
        limit = self.alloc_limit
        if limit is None:
            return
        limit_regions = limit.resolve(self.row.size) >> self._shift
        if self.map.count + len(self._allocating) + self._reserved + new_regions > limit_regions:
            message = (
                f"VV '{self.row.name}' reached its allocation limit of {limit}"
                f" ({format_size(self.allocated)} allocated): write refused"
            )
            if new_regions > 1:
                message += f" (it needs {new_regions} new regions; none was taken)"
            self._alerts.condition(
                AlertKind.VV_ALLOCATION_LIMIT, self.object_name, Severity.CRITICAL, message
            )
            raise OutOfSpace(message, AlertKind.VV_ALLOCATION_LIMIT.value)

    async def _write_piece(
        self, region: int, offset: int, data: Buffer, reserved: list[int] | None = None
    ) -> None:
        """Write ``data`` at ``offset`` inside VV ``region``, assigning the region first when it
        points at the zero LD (zero detect: an all-zero piece assigns nothing).

        Whatever is awaited here -- an assignment in progress (claim 8), room in the write-back
        cache -- lets other requests run, and a trim or a delete may give the region's LD region
        back to the pool meanwhile.  So the map is looked up again after every wait, and the
        data goes to the LD region found with no wait in between: it never lands in an LD
        region that is free (another VV's, once reused)."""
        n = len(data)
        while True:
            if self.deleted or self._serving.closed():  # after a wait: deleted, or the node lost its volumes
                raise self._gone()
            packed = self.map.get(region)
            if packed == ZERO_LD:
                if _is_zero(data):
                    return  # zero detect: the zero LD already reads these zeros
                await self._assign(region, reserved)
            elif self.pool.shared(packed):
                adds = snapspace.adds_space(self, region, packed)
                if adds and snapspace.needs_room(self):
                    # Before the copy is registered: the policy may delete a snapshot, which
                    # takes turns with deletes of this volume (they wait for its copies).
                    await snapspace.make_room(self)  # OutOfSpace, or a snapshot fewer
                    continue
                self.cow_to_snapshots += adds
                try:
                    await copy_on_write(self, region, packed)  # a region of its own first
                finally:
                    self.cow_to_snapshots -= adds
            elif self._writeback and not self._wb.has_room(n):
                await self._wb.wait_for_room(n)
            elif not self._writeback and not self._wb.settled(packed):
                # Left over from a switch to write-through: dirty data here, or copies at the
                # partner that a takeover would write over this write.
                await self._wb.settle(packed, self.row.id)
            else:
                await self._write_region(packed, region, offset, data)
                return

    async def _write_region(self, packed: int, region: int, offset: int, data: Buffer) -> None:
        # Only into a region no other volume maps: the write-back cache keys dirty data by LD
        # region with one owner, and a snapshot must never see its volume's later writes.
        assert not self.pool.shared(packed), "a write into a shared region"
        ld = self._lds[packed >> REGION_BITS]
        base = (packed & REGION_MASK) << self._shift
        if self._writeback:
            if len(data) >= self._bypass_min and self._wb.mirror is None and self._wb.settled(packed):
                # A large write around the cache, straight to the LD through the I/O threads as a
                # write-through write: caching it would cost a copy now and an inline destage on
                # the loop later, to save a page-cache write that costs the same (measured in
                # bench/README.md).  Here with no partner and no dirty data in the region (which
                # must not overtake it).  Durable at the next flush, as every write-back write.
                self._unflushed_direct = True
                await self._write_to_ld(packed, ld, base + offset, data)
                return
            if len(data) >= self._bypass_min and self._wb.may_write_around(packed):
                # The same with a partner in sync: its copy is sent while the I/O threads write
                # the LD, instead of an inline destage of the cached copy on the loop later.
                await self._wb.write_around(
                    packed,
                    self.row.id,
                    region,
                    offset,
                    data,
                    lambda: self._write_to_ld(packed, ld, base + offset, data),
                )
                return
            await self._wb.write(packed, ld, base, offset, data, self.row.id, region)
        else:
            assert self._wb.settled(packed), "a write-through write into a region with cached copies"
            await self._write_to_ld(packed, ld, base + offset, data)

    async def _write_to_ld(self, packed: int, ld: LogicalDisk, ld_offset: int, data: Buffer) -> None:
        """Write through to the LD: large writes, and writes that wait for the RAID 5 journal (a
        degraded set), on the I/O threads -- the event loop does not wait for the disk
        meanwhile; other small ones inline."""
        if len(data) >= self._offload_min or (
            self._io is not None and ld.write_is_journaled(ld_offset, len(data))
        ):
            assert self._io is not None
            view = data if type(data) is memoryview else memoryview(data).cast("B")
            done = ld.submit_write(ld_offset, view, self._io.submit)
            if done is not None:
                pool = self.pool
                pool.write_started(packed)
                done.add_done_callback(lambda _: pool.write_landed(packed))
                # shield: a cancelled request does not stop threads already writing; the
                # region stays counted until they are done (the callback above).
                ld.check_write(await asyncio.shield(done))
                return
        ld.write(ld_offset, data)

    async def _assign(self, region: int, reserved: list[int] | None = None) -> int:
        """Give ``region`` an LD region (claim 1), or wait for the assignment in progress (claim 8).
        With ``reserved`` regions (``_reserve_new_regions``), one of them; they were counted
        against the limit already.

        Rule: a region's assignment is committed to the store before any data is written into
        it (``_record``).  So a write-through write is acknowledged only once the assignment of
        every region it wrote is committed (write-through promises the data survives the server's
        own crash), a flush covers assignments as well as data, and memory never runs ahead of
        the store: a commit that fails leaves no trace but the error."""
        pending = self._allocating.get(region)
        if pending is not None:
            return await asyncio.shield(pending)
        mine: int | None = None
        if reserved:
            mine = reserved.pop()
            self._reserved -= 1
        else:
            self._check_limit(1)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._allocating[region] = fut
        try:
            packed = mine if mine is not None else self.pool.try_allocate()
            if packed is None:
                result = await self.pool.allocate()
                if isinstance(result, SpaceShortage):
                    raise OutOfSpace(f"VV '{self.row.name}': {result.message}", result.reason.value)
                packed = result
            await self._record(region, packed)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved; waiters re-raise it
            raise
        else:
            fut.set_result(packed)
            return packed
        finally:
            del self._allocating[region]

    async def _record(self, region: int, packed: int) -> None:
        """Commit the assignment, then map it.  The map and the pool follow the store's answer in
        the commit's own callback, so a request cancelled meanwhile changes nothing: committed,
        the region is mapped; refused, it goes back to the pool (nothing was written into it)."""
        if self.deleted or self._serving.closed():
            self.pool.unreserve([packed])
            raise self._gone()
        # Real blocks on the host file systems first (issue 10 case 5): a full one is ENOSPC here,
        # before the region is anyone's, not a failed write into it later.
        # Whatever refuses the region from here on gives its host blocks back (``unprovision``):
        # a full file system must not lose space to writes it refused.
        try:
            shortage = self.pool.provision(packed)
        except BaseException:
            self.pool.unprovision(packed)
            self.pool.unreserve([packed])
            raise
        if shortage is not None:
            self.pool.unprovision(packed)  # members provisioned before the full one
            self.pool.unreserve([packed])
            raise OutOfSpace(f"VV '{self.row.name}': {shortage.message}", shortage.reason.value)
        committed = self._meta.assign(self.row.id, region, packed >> REGION_BITS, packed & REGION_MASK)

        def landed(done: asyncio.Future[None]) -> None:
            if done.cancelled() or done.exception() is not None:
                self.pool.unprovision(packed)  # nothing was written into it
                self.pool.unreserve([packed])
            else:
                self.map.set(region, packed)

        committed.add_done_callback(landed)
        await asyncio.shield(committed)
        self._check_after_assign()

    def _check_after_assign(self) -> None:
        """Claim 9: after an assignment, compare the allocation with the warning and the limit."""
        allocated = self.allocated
        warning = self.alloc_warning
        if warning is not None and allocated >= warning.resolve(self.row.size):
            self._alerts.condition(
                AlertKind.VV_ALLOCATION_WARNING,
                self.object_name,
                Severity.WARNING,
                f"VV '{self.row.name}' has {format_size(allocated)} allocated, at or past its allocation warning of {warning}",
            )
        limit = self.alloc_limit
        if limit is not None and allocated + self.region_size > limit.resolve(self.row.size):
            self._alerts.condition(
                AlertKind.VV_ALLOCATION_LIMIT,
                self.object_name,
                Severity.CRITICAL,
                f"VV '{self.row.name}' reached its allocation limit of {limit}: new regions will be refused",
            )

    def check_thresholds_after_release(self) -> None:
        """Allocation fell (trim, a limit raised): conditions that ended are cleared."""
        allocated = self.allocated
        warning = self.alloc_warning
        if warning is None or allocated < warning.resolve(self.row.size):
            self._alerts.clear(AlertKind.VV_ALLOCATION_WARNING, self.object_name)
        limit = self.alloc_limit
        if limit is None or allocated + self.region_size <= limit.resolve(self.row.size):
            self._alerts.clear(AlertKind.VV_ALLOCATION_LIMIT, self.object_name)

    # --- zeroing and trimming (space reclaim) ---
    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self._enter_update()
        try:
            self.trims += 1
            await self._zero_range(offset, length, unmap=True)
            if fua:
                await self._flush_if_needed()
        finally:
            self._leave_update()

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        # Zeroing here is always fast (unmap, punch, or a small write), so FAST_ZERO never fails.
        await self._enter_update()
        try:
            self.zeroes += 1
            await self._zero_range(offset, length, unmap=may_trim)
            if fua:
                await self._flush_if_needed()
        finally:
            self._leave_update()

    async def _zero_range(self, offset: int, length: int, *, unmap: bool) -> None:
        """Whole regions go back to the zero LD (``unmap``) or are zeroed in place; partial
        regions are written with zeros.  Unmapped regions already read zeros; with NO_HOLE
        (``unmap`` False) they are assigned, so the range stays allocated as asked."""
        self._unflushed_direct = True
        shift, mask, size = self._shift, self._mask, self.region_size
        end = offset + length
        first_whole = (offset + mask) >> shift
        end_whole = end >> shift
        # Partial head and tail regions.
        if first_whole > end_whole:  # all within one region
            await self._zero_partial(offset, length, allocate=not unmap)
            return
        head = (first_whole << shift) - offset
        if head:
            await self._zero_partial(offset, head, allocate=not unmap)
        tail = end - (end_whole << shift)
        if tail:
            await self._zero_partial(end_whole << shift, tail, allocate=not unmap)
        if unmap:
            await self.unmap_regions(first_whole, end_whole)
            return
        # NO_HOLE: keep (or make) every whole region allocated, reading zeros.
        for region in range(first_whole, end_whole):
            while True:
                packed = self.map.get(region)
                if packed == ZERO_LD:
                    await self._assign(region)  # fresh regions are zeroed already
                    break
                if self.pool.shared(packed):
                    # Zeroed in place, a snapshot would read the zeros: this volume lets go of the
                    # shared region instead and takes a fresh one (which reads zeros).
                    await self.unmap_regions(region, region + 1)
                    continue
                if self.pool.writes_in_flight(packed):
                    await self.pool.writes_landed(packed)  # see _zero_partial; then look up again
                    continue
                release = self._wb.discard(packed, self.row.id)
                if release is None:
                    self._lds[packed >> REGION_BITS].zero((packed & REGION_MASK) << shift, size)
                    break
                # The partner still holds copies of this region: zeroed before they are dropped,
                # a takeover would write them back over the zeros.  Then look up again.
                await release
            if (region & 255) == 255:
                await asyncio.sleep(0)

    async def _zero_partial(self, offset: int, length: int, *, allocate: bool) -> None:
        region = offset >> self._shift
        while True:
            packed = self.map.get(region)  # again after every wait: a trim may have freed it
            if packed == ZERO_LD:
                if allocate:
                    await self._assign(region)  # a fresh region reads zeros already
                return
            if self.pool.writes_in_flight(packed):
                # An offloaded write into this region is still landing, one job per PD part in
                # no set order: zeros put down now could land between its parts, and the region
                # would hold neither the write nor zeros (RAID 1: mirrors that differ).  The
                # zeroing comes after the write, whole.
                await self.pool.writes_landed(packed)
            elif self._writeback or self.pool.shared(packed):  # shared: copied on write first
                await self._write_piece(
                    region,
                    offset & self._mask,
                    _ZEROS[:length] if length <= len(_ZEROS) else bytes(length),
                )
                return
            elif not self._wb.settled(packed):
                await self._wb.settle(packed, self.row.id)
            else:
                self._lds[packed >> REGION_BITS].zero(
                    ((packed & REGION_MASK) << self._shift) + (offset & self._mask), length
                )
                return

    async def settle_assignments(self) -> None:
        """Until no assignment of this VV is in flight (a delete waits so before unmapping: an
        assignment committed after it would leave a map row behind the deleted VV)."""
        while self._allocating:
            await asyncio.wait([asyncio.shield(f) for f in list(self._allocating.values())])

    async def unmap_regions(self, first: int, end: int) -> int:
        """Return every mapped region in [first, end) to the zero LD; their LD regions go back to
        the pool zeroed.  Bounded steps: yields to the loop between batches.  Returns how many."""
        total = 0
        while True:
            batch = []
            for region, packed in self.map.mapped_in(first, end):
                batch.append((region, packed))
                if len(batch) >= UNMAP_BATCH:
                    break
            if not batch:
                break
            copying = [self._allocating[r] for r, _ in batch if r in self._allocating]
            if copying:
                # A copy on write of one of them is in flight: its switch and this unmapping must
                # not cross (the map would name the copy the store no longer holds).  Wait, look again.
                await asyncio.wait([asyncio.shield(f) for f in copying])
                continue
            # The store first: once the rows are gone the regions may be zeroed and reused.  Were
            # memory first, a refused commit (the store full) would leave rows pointing at regions
            # another VV may be given.  Concurrent trims of one region: only the map entries still
            # pointing where they did when the batch was taken are cleared and released.
            # A full batch (a delete or a big trim) is a long transaction: off the loop
            # (metadata/writer.py); a few regions are cheaper inline than a thread hop.
            await self._meta.call(
                self._meta.store.unassign,
                self.row.id,
                [r for r, _ in batch],
                off_loop=len(batch) >= UNMAP_OFF_LOOP,
            )
            first = batch[-1][0] + 1
            batch = [(region, packed) for region, packed in batch if self.map.get(region) == packed]
            releases = []
            for region, packed in batch:
                release = self._wb.discard(packed, self.row.id)
                if release is not None:
                    releases.append(release)
                self.map.clear(region)
            if releases:
                # Ordering rule (review point 8): an LD region goes back to the pool only after the
                # partner dropped every copy it held of it; reused first, a takeover could write
                # this volume's old data into another volume's region.
                await asyncio.gather(*releases)
            # Zeroes the LD regions now (once writes still landing in them are done), adjacent
            # ones in one run (one punch per member); free for reuse after the next fsync.
            self.pool.release_many([packed for _region, packed in batch], self.snapshot_of)
            total += len(batch)
            await asyncio.sleep(0)
        if total:
            self.check_thresholds_after_release()
        return total

    # --- the rest of the block interface ---
    async def flush(self) -> None:
        if self.deleted or self._serving.closed():
            raise self._gone()
        self.flushes += 1
        await self._flush_if_needed()

    async def _flush_if_needed(self) -> None:
        """FLUSH and FUA: make every acknowledged write durable, or nothing when the partner's copy
        already makes it so (the write-back volume of a pair in sync, claim 3).  A write of this
        volume acknowledged from the cache and lost by its destage makes it fail with EIO."""
        self._flushes_asked += 1
        asked = self._flushes_asked
        owner = self.row.id
        if not (self._writeback and self._wb.flush_covered(owner) and not self._unflushed_direct):
            self._unflushed_direct = False  # writes from here on set it again; the flush covers the rest
            await self._flush_node()
        lost = self._wb.take_errors(owner)
        if lost:
            self._destage_failure = (self._flushes_asked, "; ".join(lost))
        failure = self._destage_failure
        if failure is not None and asked <= failure[0]:
            raise MediumError("an acknowledged write was lost by its destage: " + failure[1])

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Runs of allocated (0) and zero-LD (HOLE|ZERO) space from ``offset``; at most
        ``length`` bytes and at most 1,024 extents."""
        if self.deleted or self._serving.closed():
            raise self._gone()
        shift = self._shift
        end = offset + length
        first = offset >> shift
        last = (end - 1 >> shift) + 1
        extents: list[Extent] = []
        region = first
        while region < last and len(extents) < 1024:
            if self.map.get(region) == ZERO_LD:
                stop = self.map.next_mapped(region, last)
                flags = HOLE_ZERO
            else:
                stop = self.map.next_unmapped(region, last)
                flags = ExtentFlags.ALLOCATED
            lo = max(region << shift, offset)
            hi = min(stop << shift, end)
            extents.append(Extent(hi - lo, flags))
            region = stop
        return extents

    async def cache(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: bring assigned regions into the page cache (reads and drops them)."""
        if self.deleted or self._serving.closed():
            raise self._gone()
        pos, end, step = offset, offset + length, 4 * 1024 * 1024
        scratch = memoryview(bytearray(min(step, length)))
        while pos < end:
            n = min(step, end - pos)
            self._read_into(pos, scratch[:n])  # not through read(): a prefetch is no host read
            pos += n
            await asyncio.sleep(0)
