"""The pool's space map: a reference count per LD region (dm-thin's data space map).

An LD region may be mapped by several volumes at once: a snapshot shares every region with
its volume until one side writes (copy on write, ``volume/cow.py``).  So the pool does not ask
"is this region taken?" but "how many mappings hold it?"::

    refs[index] >= 1   held: that many references (map entries, or the reservation of a
                       region taken for an assignment or a copy not yet committed)
    refs[index] == 0   free: durably zero, may be handed out
    refs[index] == -1  pending: its last reference went, it was zeroed, and it waits for the
                       fsync that makes the zeros durable before it is free again

A region is zeroed and given back (pending, then free) only when its *last* reference goes:
``unref`` says when that is, and the pool zeroes it then (``Pool.release``).  Every transition
asserts the state it leaves, so a reference released twice or a free region released is a
crash of the process, never a region handed to two owners.

What is stored: nothing of this.  The references are the region map rows (and the copy-on-write
reservations) of the metadata store; the counts are rebuilt from them at every open
(``load``), and ``metadata.check.check_space_map`` compares a live map with the store's rows.

One ``LDSpace`` per LD (regions of one LD), and the pool's ``SpaceMap`` over them.  Event-loop
thread only; no I/O here (the pool zeroes and fsyncs).
"""

from __future__ import annotations

import numpy as np

REGION_BITS = 32
REGION_MASK = (1 << REGION_BITS) - 1
PENDING = -1


def pack(ld_id: int, index: int) -> int:
    return (ld_id << REGION_BITS) | index


class LDSpace:
    """Reference counts of one LD's regions, and a search hint for the next free one."""

    __slots__ = ("_free", "free", "hint", "refs", "regions")

    def __init__(self, regions: int) -> None:
        self.regions = regions
        self.refs = np.zeros(regions, dtype=np.int32)
        # 1 where the region is free: bytearray.find (C speed) finds the next one; numpy would
        # scan the whole array for every allocation.
        self._free = bytearray(b"\x01") * regions
        self.free = regions
        self.hint = 0

    # --- queries ---
    def refcount(self, index: int) -> int:
        """References held (0 when free or pending)."""
        return max(int(self.refs[index]), 0)

    def is_free(self, index: int) -> bool:
        return int(self.refs[index]) == 0

    def is_pending(self, index: int) -> bool:
        return int(self.refs[index]) == PENDING

    @property
    def held(self) -> int:
        """Regions with at least one reference."""
        return int(np.count_nonzero(self.refs > 0))

    @property
    def shared(self) -> int:
        """Regions with more than one reference."""
        return int(np.count_nonzero(self.refs > 1))

    # --- transitions ---
    def take(self) -> int:
        """A free region, now held once (the caller's reservation)."""
        assert self.free > 0
        index = self._free.find(1, self.hint)
        if index < 0:
            index = self._free.find(1)
        assert index >= 0 and self.refs[index] == 0, "the free index disagrees with the counts"
        self._free[index] = 0
        self.refs[index] = 1
        self.free -= 1
        self.hint = index + 1
        return index

    def untake(self, index: int) -> None:
        """A region from ``take`` that nothing recorded or wrote: free again at once."""
        assert self.refs[index] == 1, f"region {index} given back with {self.refs[index]} references"
        self.refs[index] = 0
        self._free[index] = 1
        self.free += 1
        self.hint = min(self.hint, index)

    def ref(self, index: int, count: int = 1) -> None:
        """``count`` more references to a held region (a snapshot maps it too)."""
        assert self.refs[index] >= 1, f"region {index} shared but not held"
        self.refs[index] += count

    def unref(self, index: int) -> int:
        """One reference goes; returns how many are left.  At 0 the region is neither free nor
        held: the caller zeroes it and calls ``mark_pending``."""
        assert self.refs[index] >= 1, f"region {index} released with {self.refs[index]} references"
        self.refs[index] -= 1
        return int(self.refs[index])

    def mark_pending(self, index: int) -> None:
        assert self.refs[index] == 0 and not self._free[index]
        self.refs[index] = PENDING

    def free_pending(self, index: int) -> None:
        assert self.refs[index] == PENDING, f"region {index} freed but not pending"
        self.refs[index] = 0
        self._free[index] = 1
        self.free += 1
        self.hint = min(self.hint, index)

    def load(self, indexes: np.ndarray) -> None:
        """Loading the maps: one reference per occurrence of an index (a region mapped by three
        volumes occurs three times).  Only onto free regions: loading is done once."""
        if not len(indexes):
            return
        counts = np.bincount(indexes, minlength=self.regions).astype(np.int32)
        assert len(counts) == self.regions, "a map entry past the end of its LD"
        touched = counts > 0
        assert not (self.refs[touched] != 0).any(), "references loaded onto a held region"
        self.refs += counts
        n = int(np.count_nonzero(touched))
        free = np.frombuffer(self._free, dtype=np.uint8)
        free[touched] = 0
        self.free -= n

    # --- runs, for the unclean-start pass ---
    def free_ranges(self) -> list[tuple[int, int]]:
        """Runs of free regions as (first, count): zeroed after an unclean shutdown."""
        return _runs(self.refs == 0)

    def held_ranges(self) -> list[tuple[int, int]]:
        """Runs of held regions as (first, count): resynchronised after an unclean shutdown."""
        return _runs(self.refs > 0)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    if not mask.any():
        return []
    edges = np.diff(np.r_[0, mask.astype(np.int8), 0])
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def _by_ld(packed: np.ndarray) -> list[tuple[int, np.ndarray]]:
    ld_ids = packed >> REGION_BITS
    return [(int(ld), packed[ld_ids == ld] & REGION_MASK) for ld in np.unique(ld_ids)]


class SpaceMap:
    """The pool's LD spaces, by LD id, in creation order, with the pool-wide totals."""

    __slots__ = ("free", "held", "lds")

    def __init__(self) -> None:
        self.lds: dict[int, LDSpace] = {}
        self.free = 0  # free regions, every LD
        self.held = 0  # regions with at least one reference, every LD

    def attach(self, ld_id: int, regions: int) -> LDSpace:
        assert ld_id not in self.lds
        space = self.lds[ld_id] = LDSpace(regions)
        self.free += regions
        return space

    def detach(self, ld_id: int) -> LDSpace:
        space = self.lds[ld_id]
        assert space.free == space.regions, "only an entirely free LD can be detached"
        del self.lds[ld_id]
        self.free -= space.regions
        return space

    def _space(self, packed: int) -> tuple[LDSpace, int]:
        return self.lds[packed >> REGION_BITS], packed & REGION_MASK

    def refcount(self, packed: int) -> int:
        space, index = self._space(packed)
        return space.refcount(index)

    def take_from(self, ld_id: int) -> int:
        """A free region of LD ``ld_id`` (which has one), held once."""
        index = self.lds[ld_id].take()
        self.free -= 1
        self.held += 1
        return pack(ld_id, index)

    def untake(self, packed: int) -> None:
        space, index = self._space(packed)
        space.untake(index)
        self.free += 1
        self.held -= 1

    def ref(self, packed: int, count: int = 1) -> None:
        space, index = self._space(packed)
        space.ref(index, count)

    def ref_many(self, packed: np.ndarray) -> None:
        """One more reference to each held region of ``packed`` (an array; no duplicates)."""
        for ld_id, indexes in _by_ld(packed):
            refs = self.lds[ld_id].refs
            assert (refs[indexes] >= 1).all(), f"LD {ld_id}: a region shared but not held"
            refs[indexes] += 1

    def unref_many(self, packed: np.ndarray) -> None:
        """Undo ``ref_many``: every region keeps at least one reference."""
        for ld_id, indexes in _by_ld(packed):
            refs = self.lds[ld_id].refs
            assert (refs[indexes] >= 2).all(), f"LD {ld_id}: the last reference of a region dropped in bulk"
            refs[indexes] -= 1

    def unref(self, packed: int) -> int:
        space, index = self._space(packed)
        left = space.unref(index)
        if left == 0:
            self.held -= 1
        return left

    def mark_pending(self, packed: int) -> None:
        space, index = self._space(packed)
        space.mark_pending(index)

    def free_pending(self, packed: int) -> bool:
        """False when the LD is gone (detached meanwhile)."""
        space = self.lds.get(packed >> REGION_BITS)
        if space is None:
            return False
        space.free_pending(packed & REGION_MASK)
        self.free += 1
        return True

    def load(self, ld_id: int, indexes: np.ndarray) -> None:
        space = self.lds[ld_id]
        before_free = space.free
        space.load(indexes)
        taken = before_free - space.free
        self.free -= taken
        self.held += taken

    def refcounts(self) -> dict[int, np.ndarray]:
        """ld_id -> reference count per region (pending ones as 0), for the check."""
        return {ld_id: np.maximum(space.refs, 0) for ld_id, space in self.lds.items()}
