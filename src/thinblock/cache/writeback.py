"""The write-back cache (claim 2): acknowledge a write once the cache holds it.

Dirty data is kept per LD region, as the ordered list of writes that hit it::

    key = packed LD region  ->  RegionDirty(ld, base, [(offset_in_region, bytes), ...])

A read of a region with dirty data reads the LD, then lays the cached writes over it
in order.  Sequential writes are merged into one entry as they arrive.  The
destager writes a region's entries to its LD in one go (no await in between, so a
read never sees half a region destaged), yielding to the loop between regions.

Every LD write happens on the event loop thread: RAID 5 read-modify-write of one
stripe must never race another, and this way no lock is needed.

Copies (claim 3, designed for, not built yet): a write is acknowledged only when every
copy the mode requires holds it.  The local cache is one copy; each ``CacheMirror``
(a partner node, later) is another.  ``write`` awaits every mirror before it returns.
Neither the VV nor the pool knows about mirrors.

Back-pressure: past ``max_dirty`` bytes, writers wait for the destager instead of
memory growing without bound.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from ..blockdev import Buffer
from ..errors import MediumError
from ..logical.raid import LogicalDisk

log = logging.getLogger("thinblock.cache")


class CacheMirror(Protocol):
    """Another copy of the dirty data (a partner node's cache)."""

    async def replicate(self, key: int, offset: int, data: bytes) -> None: ...

    def forget(self, key: int) -> None:
        """The region was destaged or discarded: drop its copy."""
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
        self.mirrors: list[CacheMirror] = []
        self._regions: dict[int, RegionDirty] = {}
        self.dirty_by_owner: dict[int, int] = {}
        self._destaged = asyncio.Event()  # set whenever dirty data shrank
        self._wake = asyncio.Event()  # set when dirty data appeared
        self._pressure = asyncio.Event()  # set when a writer waits for room
        self._task: asyncio.Task[None] | None = None
        self.errors: list[str] = []  # destage failures, reported by the next flush

    # --- life cycle ---
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._destager(), name="thinblock-destage")

    async def stop(self) -> None:
        await self.destage_all()
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

    async def write(
        self, key: int, ld: LogicalDisk, base: int, offset: int, data: Buffer, owner: int = 0
    ) -> None:
        """Cache a write of ``data`` at ``offset`` within the LD region ``key`` (LD offset ``base``),
        on behalf of VV ``owner``.  Call ``wait_for_room`` first and look ``key`` up after it: then
        this never waits before the data is in the cache."""
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
        self._wake.set()
        if self.mirrors:
            copy = bytes(data)
            await asyncio.gather(*(m.replicate(key, offset, copy) for m in self.mirrors))

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

    def discard(self, key: int) -> None:
        """The region goes back to the zero LD: its dirty data must never reach the disk."""
        region = self._regions.pop(key, None)
        if region is not None:
            self._forget(region)
            for m in self.mirrors:
                m.forget(key)
            self._destaged.set()

    def destage_region(self, key: int) -> None:
        """Write one region's dirty data to its LD now (FUA, flush, destager)."""
        region = self._regions.pop(key, None)
        if region is None:
            return
        ld, base = region.ld, region.base
        try:
            for offset, data in region.entries:
                ld.write(base + offset, data)
        except MediumError as exc:
            # The LD lost the data: remember it for the next flush, which must report EIO.
            self.errors.append(f"LD {ld.id}: {exc}")
            log.error("destage failed ld=%d offset=%d error=%s", ld.id, base, exc)
        finally:
            self._forget(region)
            for m in self.mirrors:
                m.forget(key)
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

    def take_errors(self) -> list[str]:
        errors, self.errors = self.errors, []
        return errors

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
            except Exception:  # never let the destager die silently
                log.exception("destager failed")
