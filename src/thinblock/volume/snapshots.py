"""Snapshots and clones: volumes that share LD regions with the volume they were made from.

A **snapshot** is a read-only image of a volume at one moment (3PAR's virtual copy, an LVM thin
snapshot); a **clone** is a writable volume made from a snapshot.  Both are instant: the new
volume's map is a copy of its source's (``RegionMap.copy``, one C-level copy per 1,024 regions)
and every region it names gets one more reference in the pool's space map
(``Pool.share_many``); no data moves.  The first write to a shared region, by either side, copies
it (``cow.py``).

Taking a snapshot of volume V::

    1. V's writes, trims and zeroings are held (``VirtualVolume.quiesced``): new ones wait,
       those in progress finish -- so every write acknowledged before the snapshot is in it,
       and none after it
    2. V's write-back cache is settled (``WriteBackCache.settle_owner``): a shared region must
       hold no dirty data, whose key names one owner
    3. V's map is copied and its regions shared, in memory, with no await in between
    4. one store transaction adds the snapshot's row and a copy of V's map rows
       (``add_vv_sharing``); refused, step 3 is undone and nothing changed
    5. V's writes go on (into copies of the regions they touch, from now on)

The tree: each volume row names its parent (``parent_id``) and its tree (``family_id``, the id of
the volume the tree started from; only volumes of one tree may share regions -- the store check
holds the store to that).  Any volume, snapshot or clone may be deleted at any time: its
references go, shared regions stay with the others, and its children name no parent from then on
(no promote or flatten needed, unlike ZFS and RBD clones).

Management calls of this module and volume deletes take turns (``lock``): a clone never copies
the map of a snapshot being deleted.  A snapshot or a revert holds the volume's writes *before* it
takes the lock: a write of the volume may need the lock itself (the snapshot space limit's
invalidate-oldest policy deletes a snapshot, ``invalidate_oldest``), and a lock holder waiting for
that write to finish would wait for ever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import numpy as np

from ..alerts import AlertBus
from ..cache.writeback import WriteBackCache
from ..errors import AlreadyExists, InvalidArgument, NotFound, VolumeGone
from ..metadata.store import VVRow
from ..metadata.writer import MetadataWriter
from ..model import AlertKind, Severity
from ..pool.pool import REGION_BITS, REGION_MASK, Pool
from . import snapspace
from .vv import VirtualVolume

log = logging.getLogger("thinblock.volume")

VOLUME, SNAPSHOT, CLONE = "volume", "snapshot", "clone"


class Snapshots:
    def __init__(
        self,
        *,
        vvs: Callable[[], dict[str, VirtualVolume]],
        make_vv: Callable[[VVRow, Pool], VirtualVolume],
        cache: WriteBackCache,
        meta: MetadataWriter,
        alerts: AlertBus,
        delete_forced: Callable[[str], Awaitable[None]],
    ) -> None:
        self._volumes = vvs  # the engine's table (a rename replaces the dict: asked each time)
        self._make_vv = make_vv
        self._cache = cache
        self._meta = meta
        self._alerts = alerts
        # The engine's delete of a volume, forced (its clients disconnected), called with the lock
        # held: the snapshot space limit's invalidate-oldest policy.
        self._delete_forced = delete_forced
        self.lock = asyncio.Lock()

    def _get(self, name: str) -> VirtualVolume:
        vv = self._volumes().get(name)
        if vv is None or vv.deleted:
            raise NotFound(f"volume '{name}' not found")
        return vv

    def _check_free(self, name: str) -> None:
        if name in self._volumes():
            raise AlreadyExists(f"volume '{name}' already exists")

    async def snapshot(self, source_name: str, name: str) -> VirtualVolume:
        """A read-only snapshot ``name`` of volume ``source_name`` (see the module docstring)."""
        source = self._get(source_name)
        self._check_free(name)
        if source.read_only:
            raise InvalidArgument(
                f"'{source_name}' is a snapshot already: it does not change, so a snapshot of it"
                f" would hold the same; clone it for a writable copy (thinblock vv clone {source_name} NAME)"
            )
        async with source.quiesced(), self.lock:  # writes held first (module docstring)
            if self._get(source_name) is not source:
                raise NotFound(f"volume '{source_name}' not found")
            self._check_free(name)
            await self._cache.settle_owner(source.row.id)
            assert not self._cache.owns_dirty(source.row.id)
            snap = await self._share(source, name, SNAPSHOT)
        log.info(
            "vv snapshot",
            extra={"event": "vv-snapshot", "vv": source_name, "snapshot": name, "regions": snap.map.count},
        )
        return snap

    async def clone(self, source_name: str, name: str) -> VirtualVolume:
        """A writable clone ``name`` of snapshot ``source_name``."""
        async with self.lock:
            source = self._get(source_name)
            self._check_free(name)
            if not source.read_only:
                raise InvalidArgument(
                    f"'{source_name}' is not a snapshot: a clone is made from one, so that it starts from a"
                    f" fixed image; take one first (thinblock vv snapshot {source_name} SNAP), then clone it"
                )
            clone = await self._share(source, name, CLONE)
        log.info(
            "vv clone",
            extra={"event": "vv-clone", "snapshot": source_name, "clone": name, "regions": clone.map.count},
        )
        return clone

    async def _share(self, source: VirtualVolume, name: str, kind: str) -> VirtualVolume:
        """The new volume: source's map copied and shared in memory, then recorded in one
        transaction; a refusal undoes the sharing."""
        src = source.row
        row = VVRow(
            0,
            name,
            src.pool_id,
            src.size,
            None,
            None,
            None,
            None,
            src.cache_mode,
            time.time(),
            kind=kind,
            parent_id=src.id,
            family_id=src.family,
        )
        new_map = source.map.copy()
        packed = source.map.packed_array()
        snapshot_of = src.id if kind == SNAPSHOT else None  # a snapshot's references are its volume's
        source.pool.share_many(packed, snapshot_of)
        try:
            # The store is told how many rows each LD gets (one bincount here, instead of two
            # scans of the copied rows in its transaction; bench/README.md, the snapshot section).
            # off_loop: the copy of a million rows is a long transaction; on the loop it stalled
            # every volume's I/O (metadata/writer.py).
            row.id = await self._meta.call(
                self._meta.store.add_vv_sharing, row, src.id, _rows_per_ld(packed), off_loop=True
            )
        except BaseException:
            source.pool.unshare_many(packed, snapshot_of)
            raise
        vv = self._make_vv(row, source.pool)
        vv.map = new_map
        return vv

    async def revert(self, name: str, snapshot_name: str) -> VirtualVolume:
        """Volume ``name`` becomes the content of snapshot ``snapshot_name`` (of its tree),
        atomically: one store transaction replaces its map with a copy of the snapshot's, and
        memory follows with no await in between.  Other snapshots and clones are not touched
        (LVM thin's merge consumes the snapshot; this shares it).  The caller checked clients."""
        vv = self._get(name)
        async with vv.quiesced(), self.lock:  # writes held first (module docstring)
            if self._get(name) is not vv:
                raise NotFound(f"volume '{name}' not found")
            snap = self._get(snapshot_name)
            if vv.read_only:
                raise InvalidArgument(
                    f"'{name}' is a snapshot: it cannot change; revert the volume it was taken of"
                )
            if not snap.read_only:
                raise InvalidArgument(
                    f"'{snapshot_name}' is not a snapshot: a volume is reverted to a snapshot"
                )
            if snap.row.family != vv.row.family or snap.pool is not vv.pool:
                raise InvalidArgument(
                    f"'{snapshot_name}' is not a snapshot of '{name}' or of its tree: a volume is reverted"
                    " to one of its own snapshots (or of the volumes it shares a tree with)"
                )
            if snap.size > vv.size:
                raise InvalidArgument(
                    f"'{snapshot_name}' is larger than '{name}' ({snap.size} > {vv.size} bytes)"
                )
            # Its cached writes go to their regions first: the cache must not hold data of
            # regions that change hands below it.
            await self._cache.settle_owner(vv.row.id)
            new_map = snap.map.copy()
            packed = snap.map.packed_array()
            vv.pool.share_many(packed)
            try:
                await self._meta.call(self._meta.store.replace_map, vv.row.id, snap.row.id, off_loop=True)
            except BaseException:
                vv.pool.unshare_many(packed)
                raise
            old_map, vv.map = vv.map, new_map
            # The old references go (regions only it held are zeroed and freed), in batches.
            for i, (_region, old) in enumerate(old_map.items()):
                vv.pool.release(old)
                if i % 256 == 255:
                    await asyncio.sleep(0)
            vv.check_thresholds_after_release()
        log.info(
            "vv revert",
            extra={"event": "vv-revert", "vv": name, "snapshot": snapshot_name, "regions": vv.map.count},
        )
        return vv

    def diff(self, a_name: str, b_name: str) -> list[tuple[int, int]]:
        """The byte ranges (offset, length), whole regions merged into runs, where volumes ``a``
        and ``b`` of one tree may differ: what an incremental backup from ``a`` to ``b`` copies."""
        a, b = self._get(a_name), self._get(b_name)
        if a.row.family != b.row.family or a.pool is not b.pool:
            raise InvalidArgument(
                f"'{a_name}' and '{b_name}' do not share a snapshot tree: a diff is between a volume and"
                " its snapshots and clones"
            )
        regions = a.map.differing(b.map)
        size = a.region_size
        limit = max(a.size, b.size)
        runs: list[tuple[int, int]] = []
        if len(regions):
            breaks = np.flatnonzero(np.diff(regions) != 1) + 1
            for run in np.split(regions, breaks):
                start = int(run[0]) * size
                end = min((int(run[-1]) + 1) * size, limit)
                runs.append((start, end - start))
        return runs

    def bitmap_bases(self, vv: VirtualVolume) -> dict[str, VirtualVolume]:
        """The snapshots ``vv`` may be compared with (its dirty bitmaps, volume/bitmaps.py): every
        other snapshot of its tree, by name."""
        return {
            other.name: other
            for other in self._volumes().values()
            if other.read_only
            and other is not vv
            and not other.deleted
            and other.row.family == vv.row.family
            and other.pool is vv.pool
        }

    def forget(self, vv: VirtualVolume) -> None:
        """``vv`` was deleted: its children name no parent from now on (as the store has them),
        and its snapshots are nobody's snapshots (their regions no one's snapshot space), as the
        next open will load them."""
        for other in self._volumes().values():
            if other.row.parent_id == vv.row.id:
                other.row.parent_id = None
            if other.snapshot_of == vv.row.id:
                other.pool.snapshot_holder_gone(other.map.packed_array(), vv.row.id)
                other.snapshot_of = None
        vv.pool.forget_snapshot_owner(vv.row.id)

    async def invalidate_oldest(self, vv: VirtualVolume) -> str | None:
        """The snapshot space limit's invalidate-oldest policy (volume/snapspace.py): delete
        ``vv``'s oldest snapshot, unless the room is there by now (another write's invalidation,
        a snapshot deleted meanwhile: then "" and nothing deleted).  None: it has no snapshot."""
        async with self.lock:
            if vv.deleted:
                raise VolumeGone(f"volume '{vv.name}' was deleted")
            if not snapspace.needs_room(vv):
                return ""
            snaps = [o for o in self._volumes().values() if o.snapshot_of == vv.row.id and not o.deleted]
            if not snaps:
                return None
            oldest = min(snaps, key=lambda o: (o.row.created, o.row.id))
            limit = vv.snapshot_limit
            await self._delete_forced(oldest.name)
        message = (
            f"VV '{vv.name}' reached its snapshot space limit of {limit}: its oldest snapshot"
            f" '{oldest.name}' was deleted (policy invalidate-oldest) so that a write could go on"
        )
        self._alerts.event(AlertKind.VV_SNAPSHOT_INVALIDATED, vv.object_name, Severity.WARNING, message)
        log.warning(
            "snapshot invalidated",
            extra={"event": "vv-snapshot-invalidated", "vv": vv.name, "snapshot": oldest.name},
        )
        return oldest.name

    # --- listing ---
    def parent_of(self, vv: VirtualVolume) -> str | None:
        parent_id = vv.row.parent_id
        if parent_id is None:
            return None
        return next((o.name for o in self._volumes().values() if o.row.id == parent_id), None)

    def children_of(self, vv: VirtualVolume) -> tuple[str, ...]:
        return tuple(o.name for o in self._volumes().values() if o.row.parent_id == vv.row.id)

    @staticmethod
    def space_of(vv: VirtualVolume) -> tuple[int, int]:
        """(exclusive, shared) bytes: regions only this volume maps, and regions others map too."""
        packed = vv.map.packed_array()
        if not len(packed):
            return 0, 0
        ld_ids = packed >> REGION_BITS
        shared = 0
        for ld in np.unique(ld_ids):
            refs = vv.pool.space.lds[int(ld)].refs
            shared += int(np.count_nonzero(refs[packed[ld_ids == ld] & REGION_MASK] > 1))
        return (len(packed) - shared) * vv.region_size, shared * vv.region_size


def _rows_per_ld(packed: np.ndarray) -> dict[int, int]:
    """How many of the mapped LD regions ``packed`` (``RegionMap.packed_array``) each LD holds."""
    per_ld = np.bincount(packed >> REGION_BITS) if len(packed) else np.zeros(0, dtype=np.int64)
    return {int(ld): int(per_ld[ld]) for ld in np.flatnonzero(per_ld)}
