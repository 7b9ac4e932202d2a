"""A VV's region map: VV region -> packed LD region, or the zero LD.

Sparse in two levels so that a 64 TiB VV (64 Mi regions of 1 MiB) costs nothing
until written::

    vv_region r  ->  chunks[r >> 10]  ->  array('q')[r & 1023]  ->  packed LD region, or -1
                     (dict: only chunks      (8 KiB per 1,024 regions,
                      holding an entry)       allocated on first assignment)

-1 means "points at the zero LD" (claim 1's initial pointer).  Lookup is two C-level
indexing operations; one million assigned regions take about 8 MiB.  The keys of the chunks
are also kept sorted, so that finding the next mapped region past a run of unwritten space
(block status over a 1 PiB volume) costs a bisection, not a walk over every chunk.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator

import numpy as np

CHUNK_SHIFT = 10
CHUNK_LEN = 1 << CHUNK_SHIFT
CHUNK_MASK = CHUNK_LEN - 1
ZERO_LD = -1
_EMPTY_CHUNK = array("q", [ZERO_LD]) * CHUNK_LEN


class RegionMap:
    __slots__ = ("_keys", "chunks", "count")

    def __init__(self) -> None:
        self.chunks: dict[int, array[int]] = {}
        self._keys: list[int] = []  # sorted keys of ``chunks``
        self.count = 0

    def get(self, region: int) -> int:
        chunk = self.chunks.get(region >> CHUNK_SHIFT)
        return ZERO_LD if chunk is None else chunk[region & CHUNK_MASK]

    def set(self, region: int, packed: int) -> None:
        assert packed >= 0
        key = region >> CHUNK_SHIFT
        chunk = self.chunks.get(key)
        if chunk is None:
            chunk = self.chunks[key] = array("q", _EMPTY_CHUNK)
            bisect.insort(self._keys, key)
        assert chunk[region & CHUNK_MASK] == ZERO_LD, f"region {region} mapped twice"
        chunk[region & CHUNK_MASK] = packed
        self.count += 1

    def switch(self, region: int, old: int, new: int) -> None:
        """Copy on write: the region now points at ``new`` instead of ``old`` (its own copy of a
        region it shared).  The count does not change."""
        assert new >= 0 and new != old
        chunk = self.chunks[region >> CHUNK_SHIFT]
        assert chunk[region & CHUNK_MASK] == old, f"region {region} switched from a region it did not map"
        chunk[region & CHUNK_MASK] = new

    def copy(self) -> RegionMap:
        """Another map with the same entries (a snapshot's or a clone's): one C-level copy per
        chunk of 1,024 entries, nothing per region."""
        other = RegionMap()
        other.chunks = {key: array("q", chunk) for key, chunk in self.chunks.items()}
        other._keys = list(self._keys)
        other.count = self.count
        return other

    def packed_array(self) -> np.ndarray:
        """Every mapped LD region, as one int64 array (in region order)."""
        if not self.chunks:
            return np.zeros(0, dtype=np.int64)
        values = np.concatenate([np.frombuffer(self.chunks[key], np.int64) for key in self._keys])
        return values[values != ZERO_LD]

    def differing(self, other: RegionMap, first: int = 0, end: int | None = None) -> np.ndarray:
        """The regions (sorted) in [first, end) where this map and ``other`` point at different
        places.  For volumes of one tree that is exactly where their contents may differ: a
        region both map is shared, and a shared region is never written in place (copy on
        write).  Chunk by chunk with numpy; chunks neither map holds are not looked at."""
        stop = 1 << 62 if end is None else end
        lo_key, hi_key = first >> CHUNK_SHIFT, -(-stop >> CHUNK_SHIFT)
        keys: set[int] = set()
        for sorted_keys in (self._keys, other._keys):
            lo = bisect.bisect_left(sorted_keys, lo_key)
            keys.update(sorted_keys[lo : bisect.bisect_left(sorted_keys, hi_key)])
        out: list[np.ndarray] = []
        empty = np.full(CHUNK_LEN, ZERO_LD, dtype=np.int64)
        for key in sorted(keys):
            mine_chunk = self.chunks.get(key)
            theirs = other.chunks.get(key)
            a = empty if mine_chunk is None else np.frombuffer(mine_chunk, np.int64)
            b = empty if theirs is None else np.frombuffer(theirs, np.int64)
            hits = np.flatnonzero(a != b) + (key << CHUNK_SHIFT)
            if key == lo_key or (key + 1) << CHUNK_SHIFT > stop:  # a chunk the range cuts
                hits = hits[(hits >= first) & (hits < stop)]
            if len(hits):
                out.append(hits)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def load(self, regions: np.ndarray, packed: np.ndarray) -> None:
        """Loading: set many entries at once (regions not yet mapped, no duplicates)."""
        keys = regions >> CHUNK_SHIFT
        order = np.argsort(keys, kind="stable")
        keys, regions, packed = keys[order], regions[order], packed[order]
        bounds = np.flatnonzero(np.diff(keys)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(keys)], strict=True):
            key = int(keys[lo])
            chunk = self.chunks.get(key)
            values = (
                np.full(CHUNK_LEN, ZERO_LD, dtype=np.int64)
                if chunk is None
                else np.frombuffer(chunk, np.int64).copy()
            )
            values[regions[lo:hi] & CHUNK_MASK] = packed[lo:hi]
            new = array("q")
            new.frombytes(values.tobytes())
            self.chunks[key] = new
        self._keys = sorted(self.chunks)
        self.count += len(regions)

    def clear(self, region: int) -> int:
        """Point the region back at the zero LD; returns what it pointed at."""
        key = region >> CHUNK_SHIFT
        chunk = self.chunks[key]
        packed = chunk[region & CHUNK_MASK]
        assert packed != ZERO_LD
        chunk[region & CHUNK_MASK] = ZERO_LD
        self.count -= 1
        if chunk == _EMPTY_CHUNK:
            del self.chunks[key]
            del self._keys[bisect.bisect_left(self._keys, key)]
        return packed

    def mapped_in(self, first: int, end: int) -> Iterator[tuple[int, int]]:
        """(region, packed) for every mapped region in [first, end), in order, skipping empty chunks."""
        keys = self._keys
        # A snapshot of the keys in range: callers may change the map between items.
        lo_key = bisect.bisect_left(keys, first >> CHUNK_SHIFT)
        hi_key = bisect.bisect_left(keys, -(-end >> CHUNK_SHIFT))
        for key in keys[lo_key:hi_key]:
            chunk = self.chunks.get(key)
            if chunk is None:
                continue  # emptied (and dropped) since the snapshot
            base = key << CHUNK_SHIFT
            lo = max(first - base, 0)
            hi = min(end - base, CHUNK_LEN)
            if chunk[lo:hi] == _EMPTY_CHUNK[lo:hi]:
                continue  # nothing mapped in this part: skipped at C speed, not entry by entry
            for i in range(lo, hi):
                packed = chunk[i]
                if packed != ZERO_LD:
                    yield base + i, packed

    def next_mapped(self, first: int, end: int) -> int:
        """The first mapped region in [first, end), or ``end``."""
        for region, _ in self.mapped_in(first, end):
            return region
        return end

    def next_unmapped(self, first: int, end: int) -> int:
        """The first region in [first, end) that points at the zero LD, or ``end``."""
        r = first
        while r < end:
            chunk = self.chunks.get(r >> CHUNK_SHIFT)
            if chunk is None:
                return r
            i = r & CHUNK_MASK
            stop = min(CHUNK_LEN, i + (end - r))
            try:
                j = chunk.index(ZERO_LD, i, stop)
            except ValueError:
                r += stop - i
                continue
            return r - i + j
        return end

    def items(self) -> Iterator[tuple[int, int]]:
        return self.mapped_in(0, 1 << 62)
