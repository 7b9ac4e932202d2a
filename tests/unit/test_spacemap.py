"""The pool's space map (pool/spacemap.py): reference counts per LD region."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinblock.pool.spacemap import LDSpace, SpaceMap, pack


def test_a_region_is_free_held_pending_then_free() -> None:
    space = LDSpace(4)
    index = space.take()
    assert (index, space.refcount(index), space.free) == (0, 1, 3)
    space.ref(index, 2)
    assert space.refcount(index) == 3 and space.shared == 1
    assert space.unref(index) == 2
    assert space.unref(index) == 1
    assert space.unref(index) == 0  # the last reference: the caller zeroes it
    space.mark_pending(index)
    assert space.is_pending(index) and not space.is_free(index) and space.free == 3
    assert space.take() == 1, "a pending region is never handed out"
    space.free_pending(index)
    assert space.is_free(index) and space.free == 3
    assert space.take() == 0  # the hint went back to it


def test_wrong_transitions_are_refused() -> None:
    space = LDSpace(2)
    with pytest.raises(AssertionError):
        space.unref(0)  # a free region released
    with pytest.raises(AssertionError):
        space.ref(0)  # a free region shared
    index = space.take()
    space.ref(index)
    with pytest.raises(AssertionError):
        space.untake(index)  # given back while another mapping holds it
    with pytest.raises(AssertionError):
        space.free_pending(index)  # freed while held


def test_load_counts_every_mapping_of_a_region() -> None:
    spaces = SpaceMap()
    spaces.attach(7, 8)
    spaces.load(7, np.array([1, 3, 3, 3, 6], dtype=np.int64))
    counts = spaces.refcounts()[7].tolist()
    assert counts == [0, 1, 0, 3, 0, 0, 1, 0]
    assert (spaces.free, spaces.held) == (5, 3)
    assert spaces.lds[7].free_ranges() == [(0, 1), (2, 1), (4, 2), (7, 1)]
    assert spaces.lds[7].held_ranges() == [(1, 1), (3, 1), (6, 1)]
    assert spaces.unref(pack(7, 3)) == 2 and spaces.held == 3  # still held by two
    packed = spaces.take_from(7)
    assert packed == pack(7, 0)


def test_detach_only_an_empty_ld() -> None:
    spaces = SpaceMap()
    spaces.attach(1, 2)
    packed = spaces.take_from(1)
    with pytest.raises(AssertionError):
        spaces.detach(1)
    spaces.untake(packed)
    spaces.detach(1)
    assert spaces.free == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["take", "ref", "unref", "sync"]), st.integers(0, 15)), max_size=80)
)
def test_counts_follow_a_model(ops: list[tuple[str, int]]) -> None:
    """Against a dict model: a region is handed out only when nothing holds it and it is not
    waiting for its zeros to be durable; the totals always match the counts."""
    spaces = SpaceMap()
    spaces.attach(3, 16)
    model: dict[int, int] = {}  # index -> references
    pending: set[int] = set()
    for op, i in ops:
        if op == "take":
            if spaces.free == 0:
                continue
            index = spaces.take_from(3) & 0xFFFFFFFF
            assert index not in model and index not in pending
            model[index] = 1
        elif op == "ref" and model:
            index = sorted(model)[i % len(model)]
            spaces.ref(pack(3, index))
            model[index] += 1
        elif op == "unref" and model:
            index = sorted(model)[i % len(model)]
            left = spaces.unref(pack(3, index))
            model[index] -= 1
            assert left == model[index]
            if not left:
                del model[index]
                spaces.mark_pending(pack(3, index))
                pending.add(index)
        elif op == "sync":
            for index in pending:
                spaces.free_pending(pack(3, index))
            pending.clear()
        refs = spaces.refcounts()[3]
        assert {int(k): int(refs[k]) for k in np.flatnonzero(refs)} == model
        assert spaces.held == len(model)
        assert spaces.free == 16 - len(model) - len(pending)
