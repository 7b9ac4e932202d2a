"""Copy on write: a write into an LD region that other volumes also map (a snapshot shares every
region with its volume until one side writes) first gives the writer a region of its own.

The steps, for VV region ``r`` mapped to the shared LD region ``old``::

    1. take a free region ``new`` from the pool (held once: ours)        memory only
    2. record (vv, r) -> new as *reserved* in the store                  committed
    3. copy the whole of ``old`` into ``new`` on the LDs, fsync them     data
    4. switch the map row (vv, r) from old to new, drop the reservation  one transaction
    5. switch the map in memory, drop our reference to ``old``           memory only

and then the write goes into ``new`` like any write into an assigned region.  A shared region
never holds dirty write-back data (a snapshot settles its volume's cache before it shares), so
the copy reads the LD alone.

Crash rules (kill -9 or power cut at any point; tests/unit/test_cow_crash.py):

* before 4 commits: the store maps (vv, r) to ``old`` (whose data no one changed) and names
  ``new`` reserved; at the next open the reservation is dropped and ``new`` zeroed before
  anything is served (``recover_reservations``): the old data, no region leaked.
* after 4 commits: the map names ``new``, whose copy was made durable before the switch (step
  3's fsync), so a power cut cannot leave the map pointing at a half-copied region: the old
  data (the write itself had not been acknowledged), ``old`` still held by the others.

Claim 8 holds: while a region is copied, it is in the VV's ``_allocating`` table, as a region
being assigned is, and writes racing into it wait there; then they find it unshared.  A trim of
the region waits for the copy too (``VirtualVolume.unmap_regions``).  A switch whose row moved
meanwhile changes nothing in the map, and ``new`` goes back to the pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from ..errors import MediumError, OutOfSpace
from ..metadata.store import MetadataStore
from ..pool.pool import REGION_BITS, REGION_MASK, Pool, SpaceShortage

if TYPE_CHECKING:
    from .vv import VirtualVolume

log = logging.getLogger("thinblock.volume")

#: Test hook: called with "reserved", "copied" and "switched" at the crash points above (the
#: crash tests kill the process there).  None in production.
crash_point: Callable[[str], None] | None = None


def _crash_point(name: str) -> None:
    if crash_point is not None:
        crash_point(name)


async def copy_on_write(vv: VirtualVolume, region: int, old: int) -> None:
    """Give VV region ``region`` (mapped to the shared LD region ``old``) a copy of its own, or
    wait for the copy (or assignment) of it in progress.  Raises OutOfSpace when no region can
    be had (nothing changed), MediumError when the copy could not be made (nothing changed)."""
    pending = vv._allocating.get(region)
    if pending is not None:
        try:
            await asyncio.shield(pending)
        except Exception:
            pass  # the writer that started it got the error; this one looks again
        return
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    vv._allocating[region] = fut
    try:
        new = await _copy(vv, region, old)
    except BaseException as exc:
        fut.set_exception(exc)
        fut.exception()  # retrieved: waiters look again
        raise
    else:
        fut.set_result(new)
    finally:
        del vv._allocating[region]


async def _copy(vv: VirtualVolume, region: int, old: int) -> int:
    pool: Pool = vv.pool
    meta = vv._meta
    new = pool.try_allocate()
    if new is None:
        result = await pool.allocate()
        if isinstance(result, SpaceShortage):
            raise OutOfSpace(
                f"VV '{vv.name}': a write into a region shared with a snapshot needs a region of its"
                f" own: {result.message}",
                result.reason.value,
            )
        new = result
    try:
        shortage = pool.provision(new)
    except BaseException:
        pool.unreserve([new])
        raise
    if shortage is not None:
        pool.unreserve([new])
        raise OutOfSpace(f"VV '{vv.name}': {shortage.message}", shortage.reason.value)
    reservation = (vv.row.id, region, new >> REGION_BITS, new & REGION_MASK)
    try:
        await meta.call(meta.store.reserve_region, reservation)
    except BaseException:
        pool.unreserve([new])  # not recorded, nothing written: free at once
        raise
    _crash_point("reserved")
    switched = False
    try:
        size = vv.region_size
        source = vv._lds[old >> REGION_BITS]
        target = vv._lds[new >> REGION_BITS]
        data = source.read((old & REGION_MASK) * size, size)
        target.write((new & REGION_MASK) * size, data)
        # Durable before the map names it: a power cut after the switch must not find a map row
        # pointing at a copy still in the page cache.
        await asyncio.get_running_loop().run_in_executor(None, target.flush)
        _crash_point("copied")
        switched = await meta.call(
            meta.store.switch_region,
            vv.row.id,
            region,
            (old >> REGION_BITS, old & REGION_MASK),
            (new >> REGION_BITS, new & REGION_MASK),
        )
    except BaseException:
        await _abandon(vv, new, reservation)
        raise
    if not switched:
        # Trimmed while we copied (the trim's store commit came first): the row is gone, and the
        # copy goes back to the pool.
        log.info(
            "copy on write abandoned: unmapped meanwhile",
            extra={"event": "cow-abandoned", "vv": vv.name, "region": region},
        )
        pool.release(new)
        return new
    # Memory follows the store's commits, and the store still mapped ``old``.
    vv.map.switch(region, old, new)
    pool.release(old)  # one holder fewer; the others keep its data (the last one zeroes it)
    _crash_point("switched")
    vv.cow_copies += 1
    return new


async def _abandon(vv: VirtualVolume, new: int, reservation: tuple[int, int, int, int]) -> None:
    """A copy that failed before its switch: the region goes back (zeroed), and its reservation;
    a store that refuses leaves the reservation for the next open, which frees it then."""
    try:
        vv.pool.release(new)
    except MediumError:
        log.exception("copy on write: zeroing the abandoned region %#x failed", new)
    try:
        await vv._meta.call(vv._meta.store.drop_reservations, [reservation])
    except Exception:
        log.exception("copy on write: the reservation of %#x stays until the next open", new)


def recover_reservations(store: MetadataStore, pools: Iterable[Pool]) -> int:
    """At open, before serving: regions reserved by copies on write that never switched (a crash)
    are zeroed -- they may hold a partial copy -- and their reservations dropped.  They are free
    in the space map already (no map row holds them).  Returns how many."""
    reservations = store.load_reservations()
    where = {ld_id: (pool, slots.ld) for pool in pools for ld_id, slots in pool.slots.items()}
    for _vv_id, _vv_region, ld_id, index in reservations:
        if ld_id not in where:
            continue
        pool, ld = where[ld_id]
        assert pool.space.lds[ld_id].is_free(index), "a reserved region is held"
        size = pool.region_size
        try:
            ld.zero(index * size, size)
            ld.flush()
        except MediumError as exc:  # a failed LD: its free regions are not handed out anyway
            log.error("zeroing reserved region %d of LD %d failed: %s", index, ld_id, exc)
    if reservations:
        store.drop_reservations(reservations)
        log.warning(
            "%d copy-on-write reservation(s) left by a crash freed",
            len(reservations),
            extra={"event": "cow-reservations-freed", "count": len(reservations)},
        )
    return len(reservations)
