"""Leases (node/lease.py) against the in-memory store with a clock the test drives: the epoch
only grows, a lease is taken over only once expired, and the keeper fences itself at
``renewal asked + ttl - margin`` whether or not a renewal answer ever comes."""

from __future__ import annotations

import pytest

from thinblock.node.lease import LeaseKeeper, LeaseLost, MemoryLeaseStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_acquire_renew_and_take_over_after_expiry() -> None:
    clock = Clock()
    store = MemoryLeaseStore(clock)
    a = store.acquire_lease("pair", "n1", 3.0)
    assert a is not None and a.epoch == 1
    assert store.acquire_lease("pair", "n2", 3.0) is None  # held
    clock.now += 2.0
    a2 = store.renew_lease(a, 3.0)
    assert a2 is not None and a2.epoch == 1 and a2.expires_at == clock.now + 3.0
    clock.now += 3.5
    b = store.acquire_lease("pair", "n2", 3.0)  # expired: taken over with a new epoch
    assert b is not None and (b.holder, b.epoch) == ("n2", 2)
    assert store.renew_lease(a2, 3.0) is None  # the old owner cannot renew its epoch
    store.release_lease(a2)  # a stale release changes nothing
    assert store.read_lease("pair") == b


def test_keeper_fences_at_ttl_minus_margin_without_a_renewal() -> None:
    clock = Clock()
    store = MemoryLeaseStore(clock)
    lost: list[str] = []
    keeper = LeaseKeeper(store, "pair", "n1", ttl_s=3.0, margin_s=1.0, clock=clock, on_lost=lost.append)
    assert keeper.fenced()  # nothing acquired yet
    assert keeper.acquire() is not None and keeper.epoch == 1
    keeper.check()
    clock.now += 1.9
    assert not keeper.fenced()
    clock.now += 0.2  # 2.1 s after the acquisition was asked: past ttl - margin
    assert keeper.fenced()
    with pytest.raises(LeaseLost):
        keeper.check()
    assert not keeper.renew_once() and lost  # too late to renew: the partner may take over now
    assert len(lost) == 1


def test_keeper_loses_a_lease_taken_over() -> None:
    clock = Clock()
    store = MemoryLeaseStore(clock)
    lost: list[str] = []
    keeper = LeaseKeeper(store, "pair", "n1", ttl_s=3.0, margin_s=1.0, clock=clock, on_lost=lost.append)
    keeper.acquire()
    clock.now += 1.0
    assert keeper.renew_once() and not keeper.fenced()
    clock.now += 1.9  # renewal asked 1.9 s ago: still inside the lease
    assert not keeper.fenced()
    # The store's view: the lease lapses (e.g. this process was stopped); n2 takes it.
    clock.now += 1.2
    assert store.acquire_lease("pair", "n2", 3.0) is not None
    assert keeper.fenced()
    assert not keeper.renew_once()
    assert lost and keeper.fenced()
