"""The VV region map (volume/regionmap.py) against a plain dict: lookups, and the searches block
status relies on (next mapped / next unmapped region), over a map as sparse as a 1 PiB volume's."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from thinblock.volume.regionmap import CHUNK_LEN, ZERO_LD, RegionMap

PIB_REGIONS = 1 << 30  # 1 PiB of 1 MiB regions

regions = st.one_of(st.integers(0, 3 * CHUNK_LEN), st.integers(0, PIB_REGIONS - 1))
ops = st.lists(st.tuples(st.booleans(), regions), max_size=60)
ranges = st.lists(st.tuples(regions, regions), min_size=1, max_size=10)


@settings(max_examples=150, deadline=None)
@given(ops, ranges, st.booleans())
def test_matches_a_dict(steps: list[tuple[bool, int]], queries: list[tuple[int, int]], bulk: bool) -> None:
    rmap, model = RegionMap(), {}
    if bulk and any(add for add, _ in steps):  # as the engine loads a (non-empty) map at start
        first = sorted({r for add, r in steps if add})
        rmap.load(np.array(first, dtype=np.int64), np.arange(1, len(first) + 1, dtype=np.int64))
        model = {r: i for i, r in enumerate(first, start=1)}
    packed = 1000
    for add, region in steps:
        if add and region not in model:
            packed += 1
            rmap.set(region, packed)
            model[region] = packed
        elif not add and region in model:
            assert rmap.clear(region) == model.pop(region)
    assert rmap.count == len(model)
    for a, b in queries:
        first, end = min(a, b), max(a, b) + 1
        assert list(rmap.mapped_in(first, end)) == sorted(
            (r, p) for r, p in model.items() if first <= r < end
        )
        mapped = [r for r in model if first <= r < end]
        assert rmap.next_mapped(first, end) == (min(mapped) if mapped else end)
        unmapped = next((r for r in range(first, min(end, first + 3 * CHUNK_LEN)) if r not in model), None)
        if unmapped is not None:
            assert rmap.next_unmapped(first, end) == unmapped
        assert rmap.get(first) == model.get(first, ZERO_LD)


def test_a_map_emptied_while_it_is_walked_is_walked_safely() -> None:
    rmap = RegionMap()
    for r in (5, CHUNK_LEN + 5, 7 * CHUNK_LEN):
        rmap.set(r, r + 1)
    seen = []
    for region, _packed in rmap.mapped_in(0, 8 * CHUNK_LEN):
        seen.append(region)
        if region == 5:
            rmap.clear(CHUNK_LEN + 5)  # its chunk is dropped before the walk gets there
    assert seen == [5, 7 * CHUNK_LEN]


def test_a_copy_is_independent_and_a_switch_keeps_the_count() -> None:
    """A snapshot's map starts as a copy; copy on write switches one entry of one map only."""
    rmap = RegionMap()
    for r in (3, CHUNK_LEN + 1, 5 * CHUNK_LEN):
        rmap.set(r, 100 + r)
    snap = rmap.copy()
    assert list(snap.items()) == list(rmap.items()) and snap.count == 3
    rmap.switch(3, 103, 999)
    assert (rmap.get(3), snap.get(3), rmap.count) == (999, 103, 3)
    rmap.clear(CHUNK_LEN + 1)  # its chunk goes from one map, not the other
    assert snap.get(CHUNK_LEN + 1) == 100 + CHUNK_LEN + 1
    assert snap.next_mapped(4, 6 * CHUNK_LEN) == CHUNK_LEN + 1
    assert rmap.next_mapped(4, 6 * CHUNK_LEN) == 5 * CHUNK_LEN
    try:
        rmap.switch(3, 103, 5)  # not what it maps any more
    except AssertionError:
        pass
    else:
        raise AssertionError("a switch from a region the map does not hold was taken")
