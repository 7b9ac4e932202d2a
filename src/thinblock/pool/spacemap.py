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

**Snapshot space.**  A volume's snapshot space is the set of LD regions that its snapshots hold
and nothing else does -- no volume, no clone, no snapshot of another volume: exactly what deleting
all its snapshots would free.  It grows when the volume's copy on write (or a trim, or a clone
letting go of a region) leaves a region to its snapshots alone, and shrinks when snapshots go.
It is kept as a counter per volume (``snapshot_space``), never found by a scan: besides its
reference count, each region an LD's snapshots hold records how many of its references are
snapshots' (``snaps``) and the sum and the sum of squares of their owners' keys (``owner_sum``,
``owner_sq``; a key is a small number per volume that has snapshots, ``owner_key``).  Its
snapshots all belong to one volume exactly when ``snaps * owner_sq == owner_sum ** 2`` (the keys'
variance is zero), and the region is that volume's snapshot space when, in addition, every
reference is a snapshot's (``snaps == refs``).  Every change of a region's references compares its
owner before and after and moves the region between counters: O(1) per reference, vectorised for
a whole map, and nothing for LDs no snapshot ever held (their arrays are not even made).
"""

from __future__ import annotations

import numpy as np

REGION_BITS = 32
REGION_MASK = (1 << REGION_BITS) - 1
PENDING = -1


def pack(ld_id: int, index: int) -> int:
    return (ld_id << REGION_BITS) | index


class LDSpace:
    """Reference counts of one LD's regions, and a search hint for the next free one; for LDs
    snapshots hold regions of, which of the references are snapshots' and whose (see above)."""

    __slots__ = ("_free", "free", "hint", "owner_sq", "owner_sum", "refs", "regions", "snaps")

    def __init__(self, regions: int) -> None:
        self.regions = regions
        self.refs = np.zeros(regions, dtype=np.int32)
        # 1 where the region is free: bytearray.find (C speed) finds the next one; numpy would
        # scan the whole array for every allocation.
        self._free = bytearray(b"\x01") * regions
        self.free = regions
        self.hint = 0
        # Made when a snapshot first holds a region of this LD (``snapshot_arrays``).
        self.snaps: np.ndarray | None = None
        self.owner_sum: np.ndarray | None = None
        self.owner_sq: np.ndarray | None = None

    def snapshot_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.snaps is None or self.owner_sum is None or self.owner_sq is None:
            self.snaps = np.zeros(self.regions, dtype=np.int32)
            self.owner_sum = np.zeros(self.regions, dtype=np.int64)
            self.owner_sq = np.zeros(self.regions, dtype=np.int64)
        return self.snaps, self.owner_sum, self.owner_sq

    def owners(self, indexes: np.ndarray | slice) -> np.ndarray:
        """The key of the volume whose snapshot space each region is, or 0 (none)."""
        if self.snaps is None or self.owner_sum is None or self.owner_sq is None:
            return np.zeros(len(self.refs[indexes]), dtype=np.int64)
        n = self.snaps[indexes].astype(np.int64)
        s = self.owner_sum[indexes]
        one_owner = (n > 0) & (n == self.refs[indexes]) & (n * self.owner_sq[indexes] == s * s)
        return np.where(one_owner, s // np.maximum(n, 1), 0)

    def owner(self, index: int) -> int:
        if self.snaps is None or self.owner_sum is None or self.owner_sq is None:
            return 0
        n = int(self.snaps[index])
        if n == 0 or n != int(self.refs[index]):
            return 0
        s = int(self.owner_sum[index])
        return s // n if n * int(self.owner_sq[index]) == s * s else 0

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

    __slots__ = ("_keys", "_last_key", "changed", "free", "held", "lds", "snapshot_space")

    def __init__(self) -> None:
        self.lds: dict[int, LDSpace] = {}
        self.free = 0  # free regions, every LD
        self.held = 0  # regions with at least one reference, every LD
        # Snapshot space (module docstring): volume id -> its key, and key -> regions only that
        # volume's snapshots hold.  Keys are never reused (a forgotten volume's id may be).
        self._keys: dict[int, int] = {}
        self._last_key = 0
        self.snapshot_space: dict[int, int] = {}
        self.changed: set[int] = set()  # keys whose snapshot space changed since the pool looked

    # --- snapshot space ---
    def owner_key(self, vv_id: int) -> int:
        """The key of volume ``vv_id``'s snapshots (made on first use)."""
        key = self._keys.get(vv_id)
        if key is None:
            self._last_key += 1
            key = self._keys[vv_id] = self._last_key
            self.snapshot_space[key] = 0
        return key

    def forget_owner(self, vv_id: int) -> None:
        """Volume ``vv_id`` is gone (its snapshots were handed to no one, ``drop_snapshot_holder``)."""
        key = self._keys.pop(vv_id, None)
        if key is not None:
            assert self.snapshot_space.get(key, 0) == 0, "a deleted volume's snapshots still own space"
            self.snapshot_space.pop(key, None)

    def snapshot_regions(self, vv_id: int) -> int:
        """Regions only volume ``vv_id``'s snapshots hold (its snapshot space, in regions)."""
        key = self._keys.get(vv_id)
        return 0 if key is None else self.snapshot_space[key]

    def key_owner(self, key: int) -> int | None:
        return next((vv_id for vv_id, k in self._keys.items() if k == key), None)

    def _moved(self, before: int, after: int) -> None:
        if before != after:
            if before:
                self.snapshot_space[before] -= 1
                self.changed.add(before)
            if after:
                self.snapshot_space[after] += 1
                self.changed.add(after)

    def _moved_many(self, before: np.ndarray, after: np.ndarray) -> None:
        moved = before != after
        if not moved.any():
            return
        for keys, sign in ((before[moved], -1), (after[moved], 1)):
            values, counts = np.unique(keys[keys > 0], return_counts=True)
            for key, count in zip(values.tolist(), counts.tolist(), strict=True):
                self.snapshot_space[key] += sign * count
                self.changed.add(key)

    def would_own_after_unref(self, packed: int, vv_id: int) -> bool:
        """Whether, once one non-snapshot reference of ``packed`` goes (a copy on write or a trim
        by a volume), the region is volume ``vv_id``'s snapshot space: all references left are
        its snapshots'."""
        key = self._keys.get(vv_id)
        if key is None:
            return False
        space, index = self._space(packed)
        if space.snaps is None or space.owner_sum is None or space.owner_sq is None:
            return False
        n = int(space.snaps[index])
        return (
            n > 0
            and n == int(space.refs[index]) - 1
            and int(space.owner_sum[index]) == n * key
            and (int(space.owner_sq[index]) == n * key * key)
        )

    def _snapshot_holders(self, packed: np.ndarray, key: int, sign: int) -> None:
        """``sign`` (+1, -1) snapshot references of owner ``key`` to each region of ``packed``,
        without touching the reference counts (the caller does)."""
        for ld_id, indexes in _by_ld(packed):
            snaps, owner_sum, owner_sq = self.lds[ld_id].snapshot_arrays()
            snaps[indexes] += sign
            owner_sum[indexes] += sign * key
            owner_sq[indexes] += sign * key * key

    def drop_snapshot_holder(self, packed: np.ndarray, vv_id: int) -> None:
        """The snapshot holding ``packed`` is nobody's any more (its volume was deleted): its
        references count as a volume's from now on, as they will after the next open, where a
        snapshot without a parent is loaded so."""
        key = self._keys.get(vv_id)
        if key is None or not len(packed):
            return
        for ld_id, indexes in _by_ld(packed):
            space = self.lds[ld_id]
            before = space.owners(indexes)
            snaps, owner_sum, owner_sq = space.snapshot_arrays()
            snaps[indexes] -= 1
            owner_sum[indexes] -= key
            owner_sq[indexes] -= key * key
            self._moved_many(before, space.owners(indexes))

    def load_snapshot_holders(self, packed: np.ndarray, vv_id: int) -> None:
        """Loading: the references of a snapshot of volume ``vv_id`` (already counted in ``refs``
        by ``load``) are a snapshot's; ``recount_snapshot_space`` once every map is loaded."""
        if len(packed):
            self._snapshot_holders(packed, self.owner_key(vv_id), 1)

    def recount_snapshot_space(self) -> None:
        """Every volume's snapshot space from the arrays (at open, after loading)."""
        for key in self.snapshot_space:
            self.snapshot_space[key] = 0
        for space in self.lds.values():
            if space.snaps is None:
                continue
            owners = space.owners(slice(None))
            values, counts = np.unique(owners[owners > 0], return_counts=True)
            for key, count in zip(values.tolist(), counts.tolist(), strict=True):
                self.snapshot_space[key] += count
        self.changed.update(self.snapshot_space)

    def recount_for_check(self) -> dict[int, int]:
        """Volume id -> snapshot space in regions, recomputed from the arrays (the state machines
        compare it with the counters and with the store)."""
        counts: dict[int, int] = dict.fromkeys(self._keys.values(), 0)
        for space in self.lds.values():
            owners = space.owners(slice(None))
            for key in owners[owners > 0].tolist():
                counts[key] = counts.get(key, 0) + 1
        return {vv_id: counts.get(key, 0) for vv_id, key in self._keys.items()}

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
        """``count`` more references of volumes or clones to a held region."""
        space, index = self._space(packed)
        before = space.owner(index)
        space.ref(index, count)
        self._moved(before, space.owner(index))

    def ref_many(self, packed: np.ndarray, snapshot_of: int | None = None) -> None:
        """One more reference to each held region of ``packed`` (an array; no duplicates): a
        snapshot's of volume ``snapshot_of``, or (None) a volume's or a clone's."""
        key = None if snapshot_of is None else self.owner_key(snapshot_of)
        for ld_id, indexes in _by_ld(packed):
            space = self.lds[ld_id]
            refs = space.refs
            assert (refs[indexes] >= 1).all(), f"LD {ld_id}: a region shared but not held"
            before = space.owners(indexes)
            refs[indexes] += 1
            if key is not None:
                self._snapshot_holders(indexes | (ld_id << REGION_BITS), key, 1)
            self._moved_many(before, space.owners(indexes))

    def unref_many(self, packed: np.ndarray, snapshot_of: int | None = None) -> None:
        """Undo ``ref_many``: every region keeps at least one reference."""
        key = None if snapshot_of is None else self._keys[snapshot_of]
        for ld_id, indexes in _by_ld(packed):
            space = self.lds[ld_id]
            refs = space.refs
            assert (refs[indexes] >= 2).all(), f"LD {ld_id}: the last reference of a region dropped in bulk"
            before = space.owners(indexes)
            refs[indexes] -= 1
            if key is not None:
                self._snapshot_holders(indexes | (ld_id << REGION_BITS), key, -1)
            self._moved_many(before, space.owners(indexes))

    def unref(self, packed: int, snapshot_of: int | None = None) -> int:
        """One reference goes: a snapshot's of volume ``snapshot_of``, or (None) a volume's."""
        space, index = self._space(packed)
        if space.snaps is None:
            assert snapshot_of is None, "a snapshot's reference to a region no snapshot holds"
            left = space.unref(index)
        else:
            before = space.owner(index)
            left = space.unref(index)
            if snapshot_of is not None:
                key = self._keys[snapshot_of]
                space.snaps[index] -= 1
                space.owner_sum[index] -= key  # type: ignore[index]
                space.owner_sq[index] -= key * key  # type: ignore[index]
            self._moved(before, space.owner(index))
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
