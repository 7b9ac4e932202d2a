"""Dirty bitmaps: where a volume differs from a snapshot of its tree (incremental backup).

A volume (or snapshot, or clone) B has one dirty bitmap per *other snapshot* A of its tree (same
``family_id``, same pool), named after A.  A region is dirty when B's map and A's point at
different places (``RegionMap.differing``) -- the rule ``vv diff A B`` uses: a region both map is
shared, and a shared region is never written in place (copy on write), so a clean region holds
the same bytes in both and a backup that has A's image copies only the dirty ones to get B's.
A region trimmed in one of them (mapped in one, the zero LD in the other) is dirty too.

Only snapshots are offered as the fixed point: a live volume or a clone changes, so "what changed
since" it has no stable meaning.  On a live B the answer is as of the moment it is given (a write
acknowledged later may be missing from it): back up from a snapshot export for a consistent image.

The NBD front end offers them as qemu's ``qemu:dirty-bitmap:NAME`` metadata contexts (bit 0,
NBD_STATE_DIRTY), which ``nbdinfo --map=qemu:dirty-bitmap:NAME`` and qemu's NBD client
(``x-dirty-bitmap``) read.  A bitmap is bound to the snapshot when asked for: renaming the
snapshot later changes nothing, and deleting it makes every later status ``VolumeGone`` (its
regions may be handed to other volumes, so its map no longer says anything).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..blockdev import DirtyRun
from ..errors import VolumeGone

if TYPE_CHECKING:
    from .vv import VirtualVolume

# At most this many runs per answer: the caller asks again from where it ends (a 4 GiB request
# over 1 MiB regions has at most 4,096 anyway).
MAX_RUNS = 65536


class VolumeTree(Protocol):
    """Who knows a volume's tree (volume/snapshots.py): the snapshots it may be compared with."""

    def bitmap_bases(self, vv: VirtualVolume) -> dict[str, VirtualVolume]: ...


class SnapshotBitmap:
    """``DirtyBitmap`` (blockdev.py): the regions where ``volume`` differs from snapshot ``base``."""

    __slots__ = ("_base", "_name", "_volume")

    def __init__(self, volume: VirtualVolume, base: VirtualVolume) -> None:
        assert base.read_only and base.pool is volume.pool and base.row.family == volume.row.family
        self._volume = volume
        self._base = base
        self._name = base.name

    @property
    def name(self) -> str:
        return self._name

    async def status(self, offset: int, length: int) -> list[DirtyRun]:
        volume, base = self._volume, self._base
        volume.check_serving()
        if base.deleted:
            raise VolumeGone(
                f"snapshot '{self._name}' was deleted: the dirty bitmap that compared with it is gone"
            )
        return dirty_runs(volume, base, offset, length)


def dirty_runs(volume: VirtualVolume, base: VirtualVolume, offset: int, length: int) -> list[DirtyRun]:
    """``(length, dirty)`` runs from ``offset``, together at most ``length`` bytes, whole regions
    but where the range cuts the first and the last (so every length is a multiple of the export's
    minimum block whenever the request is aligned to it)."""
    assert length > 0
    shift = volume.region_size.bit_length() - 1
    end = offset + length
    first, last = offset >> shift, ((end - 1) >> shift) + 1
    regions = volume.map.differing(base.map, first, last)
    # Region runs [start, stop) alternating clean and dirty, from ``first`` to ``last``.
    bounds: list[tuple[int, int, bool]] = []
    cursor = first
    if len(regions):
        breaks = np.flatnonzero(np.diff(regions) != 1) + 1
        starts = regions[np.r_[0, breaks]].tolist()
        stops = (regions[np.r_[breaks - 1, len(regions) - 1]] + 1).tolist()
        for start, stop in zip(starts, stops, strict=True):
            if start > cursor:
                bounds.append((cursor, start, False))
            bounds.append((start, stop, True))
            cursor = stop
    if cursor < last:
        bounds.append((cursor, last, False))
    return [
        (min(stop << shift, end) - max(start << shift, offset), dirty)
        for start, stop, dirty in bounds[:MAX_RUNS]
    ]
