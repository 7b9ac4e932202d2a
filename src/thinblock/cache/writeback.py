"""The write-back cache (claim 2): acknowledge a write once the cache holds it.

Dirty data is kept per LD region, as the ordered list of writes that hit it::

    key = packed LD region  ->  RegionDirty(ld, base, [(offset_in_region, bytes), ...])

A read of a region with dirty data reads the LD, then lays the cached writes over it
in order.  Sequential writes are merged into one entry as they arrive.  The
destager writes a region's entries to its LD in one go (no await in between, so a
read never sees half a region destaged), yielding to the loop between regions.

Every LD write happens on the event loop thread: RAID 5 read-modify-write of one
stripe must never race another, and this way no lock is needed.

Copies (claim 3): a write is acknowledged only when every copy the mode requires holds it.
The local cache is one copy; the ``CacheMirror`` (the partner node, ``node/pair.py``) is the
other.  ``write`` inserts locally, sends the copy, and returns (the host's acknowledgement)
only when the partner confirmed it holds it; the destager is woken after that, so that what
it destages and reports as destaged was acknowledged by both.  The mirror is told, in the
order the cache's own state changes and with no await in between:

* every write (``replicate``), with the owning VV and the VV region;
* every region destaged (``destaged``): the partner drops its copies once that is durable;
* every region that leaves the cache without a destage or is about to be written outside it
  (``discard``, ``settle``): the caller awaits the partner's release before the LD region
  is given back to the pool, zeroed in place or written through.  Otherwise a copy the
  partner still held could be written at a takeover into a region that by then belongs to
  another volume (review point 8).

When the partner is away (``mirror.in_sync`` False) a write-back write is written through
instead: on the LD before it is acknowledged (``writes_through``: the VV then also waits for
its region assignment to be committed, as for a write-through volume).  A write whose copy
the partner never confirmed (``MirrorLost``) is written through the same way.

Back-pressure: past ``max_dirty`` bytes, writers wait for the destager instead of
memory growing without bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..blockdev import Buffer
from ..errors import Fenced, MediumError, OutOfSpace
from ..fence import WriteFence
from ..logical.raid import LogicalDisk

log = logging.getLogger("thinblock.cache")


class MirrorLost(Exception):
    """The partner did not confirm that it holds a write (it is away, or the link broke)."""


class CacheMirror(Protocol):
    """The partner node's copy of the dirty data.  ``in_sync`` must turn False before any
    pending ``replicate`` fails with ``MirrorLost``."""

    @property
    def in_sync(self) -> bool:
        """Write-back writes may be acknowledged on the two copies."""
        ...

    @property
    def covers_flush(self) -> bool:
        """The two copies satisfy FLUSH and FUA: a partner that can take over holds them."""
        ...

    def replicate(self, vv: int, key: int, vv_region: int, offset: int, data: Buffer) -> Awaitable[None]:
        """Send a copy of a write now (``data`` is valid only during the call).  The awaitable
        completes when the partner holds it, or raises ``MirrorLost``."""
        ...

    def destaged(self, vv: int, key: int) -> None:
        """Region ``key``'s writes sent so far are on its LD: the partner may drop them once
        that is durable."""
        ...

    def may_hold(self, key: int) -> bool:
        """Whether the partner may still hold copies of region ``key``."""
        ...

    def release(self, vv: int, key: int) -> Awaitable[None] | None:
        """Region ``key`` leaves ``vv``'s cache without a destage, or is about to be written
        outside it: completes once the partner holds nothing of it (None: it holds nothing)."""
        ...


class RegionDirty:
    __slots__ = ("base", "entries", "ld", "owner")

    def __init__(self, ld: LogicalDisk, base: int, owner: int) -> None:
        self.ld = ld
        self.base = base  # LD offset of the region
        self.owner = owner  # the VV id, for per-volume dirty accounting
        self.entries: list[tuple[int, bytearray]] = []


class WriteBackCache:
    def __init__(self, *, max_dirty: int, destage_delay: float = 0.05) -> None:
        self.max_dirty = max_dirty
        self.destage_delay = destage_delay
        self.dirty_bytes = 0
        self.mirror: CacheMirror | None = None
        self._regions: dict[int, RegionDirty] = {}
        self.dirty_by_owner: dict[int, int] = {}
        self._destaged = asyncio.Event()  # set whenever dirty data shrank
        self._wake = asyncio.Event()  # set when dirty data appeared
        self._pressure = asyncio.Event()  # set when a writer waits for room
        self._task: asyncio.Task[None] | None = None
        self._around: set[int] = set()  # regions with a write_around in flight
        # Destage failures by owning VV, each reported by that volume's next FLUSH (take_errors),
        # as fsync reports a lost page to its own file: a flush the node runs for itself (a
        # pair's destage report, a move, a takeover) or another volume's FLUSH must not take it.
        self.errors: dict[int, list[str]] = {}
        # A node of a pair destages only while it holds its lease (fence.py): a fenced destage
        # keeps the region dirty (the partner holds its copies and replays them at a takeover).
        self.fence: WriteFence | None = None

    # --- life cycle ---
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._destager(), name="thinblock-destage")

    async def stop(self) -> None:
        try:
            await self.destage_all()
        except Fenced as exc:
            log.error("dirty data not destaged at stop: %s", exc)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # --- the data path ---
    def has(self, key: int) -> bool:
        return key in self._regions

    def has_room(self, n: int) -> bool:
        """Whether a write of ``n`` bytes can be cached now, without waiting for the destager."""
        return self.dirty_bytes + n <= self.max_dirty or self.dirty_bytes == 0

    async def wait_for_room(self, n: int) -> None:
        """Back-pressure: wait until a write of ``n`` bytes fits.  Whatever the caller looked up
        before waiting (which LD region a VV region maps to) may have changed meanwhile: a trim
        may have given that LD region back to the pool.  So callers wait first, look up after."""
        while not self.has_room(n):
            self._destaged.clear()
            self._wake.set()
            self._pressure.set()
            await self._destaged.wait()

    @property
    def writes_through(self) -> bool:
        """Write-back writes are written through now: a mirror is attached and out of sync."""
        mirror = self.mirror
        return mirror is not None and not mirror.in_sync

    def flush_covered(self, owner: int) -> bool:
        """FLUSH and FUA of write-back VV ``owner`` are satisfied by the two copies: the mirror is
        in sync now (every write acknowledged so far is held by the partner, which replays it if
        this node dies) and none of the VV's destages failed since its last flush (that one must
        answer EIO).  Read with no await before the answer: a degrade (``in_sync`` off) is seen by
        the next FLUSH."""
        mirror = self.mirror
        return mirror is not None and mirror.in_sync and mirror.covers_flush and owner not in self.errors

    def settled(self, key: int) -> bool:
        """Region ``key`` may be written outside the cache: nothing of it is dirty here, and the
        partner holds no copy a takeover would write over it."""
        if key in self._regions:
            return False
        mirror = self.mirror
        return mirror is None or not mirror.may_hold(key)

    async def settle(self, key: int, vv: int) -> None:
        """Make ``settled(key)`` true: destage the region, then have the partner drop its copies."""
        self.destage_region(key)
        if self.mirror is not None:
            release = self.mirror.release(vv, key)
            if release is not None:
                await release

    async def settle_owner(self, owner: int) -> None:
        """Make every region of VV ``owner`` settled: destaged, and no copy left at the partner.
        A snapshot calls it (with the volume's writes held) before the volume's regions become
        shared: dirty data is keyed by LD region with one owner, and a shared region must have
        none (its writes go to a copy of their own first, volume/cow.py)."""
        while True:
            keys = [key for key, region in self._regions.items() if region.owner == owner]
            if not keys:
                return
            for key in keys:
                await self.settle(key, owner)

    def owns_dirty(self, owner: int) -> bool:
        """Whether any dirty data of VV ``owner`` is held."""
        return any(region.owner == owner for region in self._regions.values())

    async def write(
        self,
        key: int,
        ld: LogicalDisk,
        base: int,
        offset: int,
        data: Buffer,
        owner: int = 0,
        vv_region: int = 0,
    ) -> None:
        """Cache a write of ``data`` at ``offset`` within the LD region ``key`` (LD offset ``base``),
        on behalf of VV ``owner`` (its region ``vv_region``).  Call ``wait_for_room`` first and
        look ``key`` up after it: then this never waits before the data is in the cache.
        Returns once every copy the mode requires holds it (see the module docstring)."""
        n = len(data)
        await self.wait_for_room(n)
        region = self._regions.get(key)
        if region is None:
            region = self._regions[key] = RegionDirty(ld, base, owner)
        entries = region.entries
        if entries and entries[-1][0] + len(entries[-1][1]) == offset:
            entries[-1][1].extend(data)  # sequential: merge
        else:
            entries.append((offset, bytearray(data)))
        self.dirty_bytes += n
        self.dirty_by_owner[region.owner] = self.dirty_by_owner.get(region.owner, 0) + n
        mirror = self.mirror
        if mirror is not None:
            if not mirror.in_sync:
                self.destage_region(key)  # the partner is away: write through (3PAR's two-node rule)
                return
            copy = mirror.replicate(owner, key, vv_region, offset, data)
            try:
                await copy
            except MirrorLost:
                # Never confirmed by the partner: acknowledged once on the LD instead (the region
                # may have been destaged or discarded meanwhile: then there is nothing to do).
                self.destage_region(key)
                return
        self._wake.set()

    def may_write_around(self, key: int) -> bool:
        """Whether a write into region ``key`` may go around the cache (``write_around``): a
        partner in sync holds its copy, no dirty data of the region is here (it must not overtake
        it), and no other write around the cache is in flight there (whose destage report could
        otherwise cover this one's copy before it landed)."""
        mirror = self.mirror
        return mirror is not None and mirror.in_sync and key not in self._regions and key not in self._around

    async def write_around(
        self,
        key: int,
        owner: int,
        vv_region: int,
        offset: int,
        data: Buffer,
        write_to_ld: Callable[[], Awaitable[None]],
    ) -> None:
        """A large write of a mirrored volume around the cache: its copy goes to the partner
        while ``write_to_ld`` writes it to the LD (through the I/O threads); it is acknowledged
        once both are done.  Then it is as a destaged region's write: on the LD, not yet durable,
        and the partner drops its copy only once the next report made it durable (``destaged``
        is called after the LD write landed, so that report's fsync covers it).  A copy the
        partner never confirmed (``MirrorLost``) leaves the write written through, as ``write``
        does.  Call only when ``may_write_around(key)``, with no await in between."""
        mirror = self.mirror
        assert mirror is not None and self.may_write_around(key)
        copy = mirror.replicate(owner, key, vv_region, offset, data)
        self._around.add(key)
        try:
            await write_to_ld()
        except BaseException:
            # Not written: its copy (if confirmed) is of a write never acknowledged (undefined
            # content); the partner drops it with the region's next report.
            if isinstance(copy, asyncio.Future):
                copy.add_done_callback(_retrieve)
            raise
        finally:
            self._around.discard(key)
            mirror.destaged(owner, key)
        try:
            await copy
        except MirrorLost:
            return  # on the LD already: written through (the volume sees ``writes_through``)

    def overlay(self, key: int, offset: int, buf: memoryview) -> None:
        """Lay the cached writes of region ``key`` over ``buf``, which holds the region's bytes
        from ``offset`` as read from the LD."""
        region = self._regions.get(key)
        if region is None:
            return
        end = offset + len(buf)
        for start, data in region.entries:
            stop = start + len(data)
            if stop <= offset or start >= end:
                continue
            lo = max(start, offset)
            hi = min(stop, end)
            buf[lo - offset : hi - offset] = memoryview(data)[lo - start : hi - start]

    def discard(self, key: int, vv: int) -> Awaitable[None] | None:
        """Region ``key`` of VV ``vv`` goes back to the zero LD or is zeroed in place: its dirty
        data must never reach the disk.  Returns what to await before the LD region is given
        back to the pool or written outside the cache (the partner's release), or None."""
        region = self._regions.pop(key, None)
        if region is not None:
            self._forget(region)
            self._destaged.set()
        if self.mirror is None:
            return None
        return self.mirror.release(vv, key)

    def destage_region(self, key: int) -> None:
        """Write one region's dirty data to its LD now (FUA, flush, destager).  ``Fenced``
        when this node may not write (the region stays dirty, nothing is reported destaged)."""
        if key not in self._regions:
            return
        if self.fence is not None:
            self.fence.check()  # every destage checks the node's lease (fence.py)
        region = self._regions.pop(key)
        ld, base = region.ld, region.base
        try:
            for offset, data in region.entries:
                ld.write(base + offset, data)
        except Fenced:
            # The deadline passed during this region (a write may have landed before it: it is
            # written again, the same bytes, when the fence opens).
            self._regions[key] = region
            raise
        except (MediumError, OutOfSpace) as exc:
            # The LD lost the data (or the host had no room for it: issue 10 case 5): remember it
            # for the volume's next flush, which must report EIO.
            self.errors.setdefault(region.owner, []).append(f"LD {ld.id}: {exc}")
            log.error(
                "destage failed: %s", exc, extra={"event": "destage-failed", "ld": ld.id, "offset": base}
            )
        finally:
            self._forget(region)
            if self.mirror is not None and key not in self._around:
                # (with a write around the cache in flight here, its end reports the region: a
                # report now could cover that write's copy before it landed)
                self.mirror.destaged(region.owner, key)
            self._destaged.set()

    def _forget(self, region: RegionDirty) -> None:
        n = sum(len(d) for _, d in region.entries)
        self.dirty_bytes -= n
        left = self.dirty_by_owner.get(region.owner, 0) - n
        if left:
            self.dirty_by_owner[region.owner] = left
        else:
            self.dirty_by_owner.pop(region.owner, None)

    async def destage_all(self) -> None:
        """Destage everything dirty now, in bounded steps (one region at a time)."""
        while self._regions:
            key = next(iter(self._regions))
            self.destage_region(key)
            await asyncio.sleep(0)

    def take_errors(self, owner: int) -> list[str]:
        """The destage failures of VV ``owner`` not yet reported, now reported (by its FLUSH)."""
        return self.errors.pop(owner, [])

    async def _destager(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Let a burst settle, so rewrites and sequential writes merge, unless memory is short.
            if self.dirty_bytes < self.max_dirty // 2 and not self._pressure.is_set():
                try:
                    await asyncio.wait_for(self._pressure.wait(), self.destage_delay)
                except TimeoutError:
                    pass
            self._pressure.clear()
            try:
                await self.destage_all()
            except Fenced as exc:
                # Not allowed to write now: retry later, unless the lease is lost for good (the
                # partner replays its copies of this data).
                log.warning("destage held: %s", exc)
                if self.fence is not None and self.fence.lost is not None:
                    return
                await asyncio.sleep(0.5)
                self._wake.set()
            except Exception:  # never let the destager die silently
                log.exception("destager failed")


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a future's exception retrieved: nobody awaits it any more."""
    if not future.cancelled():
        future.exception()
