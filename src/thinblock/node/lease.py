"""Leases: the one arbiter of who owns a pair's volumes (next.md: "two processes alone cannot
tell a dead partner from a cut link; the store can").

The metadata store holds a lease per pair with an epoch that only grows (issue 11 builds it:
``acquire_lease``, ``renew_lease``, ``release_lease``, ``read_lease``, ``bind_lease``).  This
module names that interface as a Protocol, so that the node role is written and tested
against it before the PostgreSQL backend exists, and holds an in-memory implementation
(``MemoryLeaseStore``) whose clock the tests drive.

``LeaseKeeper`` keeps one lease: renews it every ``ttl / 3`` and computes the fencing
deadline.  The fencing rule (issue 12, point 5): a node that may have lost its lease stops
writing to PDs and to the metadata *before* a partner's takeover can begin, so it stops at
``expires_at - margin`` measured on its own clock from the moment it *asked* for the renewal
(a renewal's answer may arrive late; the store's clock decides expiry, and ours may run slow
by up to ``margin``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

log = logging.getLogger("thinblock.node.lease")


@dataclass(frozen=True, slots=True)
class Lease:
    name: str
    holder: str
    epoch: int
    expires_at: float  # the store's clock, seconds


class LeaseLost(Exception):
    """A write was attempted under a lease that is no longer held (a fenced node)."""


class LeaseStore(Protocol):
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Take the lease when it is free or expired (or already ``holder``'s): epoch + 1."""
        ...

    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease | None:
        """Extend a lease still held with the same epoch; None when it was lost."""
        ...

    def release_lease(self, lease: Lease) -> None: ...

    def read_lease(self, name: str) -> Lease | None: ...


class MemoryLeaseStore:
    """``LeaseStore`` in memory, with a clock the caller may replace (tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._leases: dict[str, Lease] = {}

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        now = self.clock()
        current = self._leases.get(name)
        if current is not None and current.holder != holder and current.expires_at > now:
            return None
        epoch = (current.epoch if current is not None else 0) + 1
        lease = Lease(name, holder, epoch, now + ttl_s)
        self._leases[name] = lease
        return lease

    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease | None:
        now = self.clock()
        current = self._leases.get(lease.name)
        if (
            current is None
            or (current.holder, current.epoch) != (lease.holder, lease.epoch)
            or current.expires_at <= now
        ):
            return None
        renewed = replace(current, expires_at=now + ttl_s)
        self._leases[lease.name] = renewed
        return renewed

    def release_lease(self, lease: Lease) -> None:
        current = self._leases.get(lease.name)
        if current is not None and (current.holder, current.epoch) == (lease.holder, lease.epoch):
            self._leases[lease.name] = replace(current, expires_at=self.clock())

    def read_lease(self, name: str) -> Lease | None:
        return self._leases.get(name)


class LeaseKeeper:
    """Holds one lease while the node runs.  ``fenced()`` is true from ``renewal asked + ttl -
    margin`` unless a renewal came back first; ``on_lost`` is called once when that happens or
    a renewal is refused."""

    def __init__(
        self,
        store: LeaseStore,
        name: str,
        holder: str,
        *,
        ttl_s: float = 3.0,
        margin_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_lost: Callable[[str], None] = lambda reason: None,
    ) -> None:
        assert 0 < margin_s < ttl_s
        self.store = store
        self.name = name
        self.holder = holder
        self.ttl_s = ttl_s
        self.margin_s = margin_s
        self.clock = clock
        self.on_lost = on_lost
        self.lease: Lease | None = None
        self._fence_at = 0.0  # our clock
        self._lost = False
        self._task: asyncio.Task[None] | None = None

    @property
    def epoch(self) -> int:
        return 0 if self.lease is None else self.lease.epoch

    def acquire(self) -> Lease | None:
        asked = self.clock()
        lease = self.store.acquire_lease(self.name, self.holder, self.ttl_s)
        if lease is not None:
            self.lease = lease
            self._fence_at = asked + self.ttl_s - self.margin_s
            self._lost = False
        return lease

    def fenced(self) -> bool:
        """No PD or metadata write may start: the lease may be someone else's by now."""
        return self.lease is None or self._lost or self.clock() >= self._fence_at

    def check(self) -> None:
        """Raise ``LeaseLost`` when fenced (every destage batch and metadata write calls this)."""
        if self.fenced():
            raise LeaseLost(f"lease {self.name!r} epoch {self.epoch} is no longer held by {self.holder!r}")

    def renew_once(self) -> bool:
        if self.lease is None or self._lost:
            return False
        asked = self.clock()
        if asked >= self._fence_at:
            self._lose(f"not renewed before the fencing deadline (epoch {self.lease.epoch})")
            return False
        renewed = self.store.renew_lease(self.lease, self.ttl_s)
        if renewed is None:
            self._lose(f"renewal refused (epoch {self.lease.epoch}): taken over")
            return False
        self.lease = renewed
        self._fence_at = asked + self.ttl_s - self.margin_s
        return True

    def _lose(self, reason: str) -> None:
        if not self._lost:
            self._lost = True
            log.error("lease lost: %s", reason, extra={"event": "lease-lost", "lease": self.name})
            self.on_lost(reason)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"lease-{self.name}")

    async def stop(self, *, release: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if release and self.lease is not None and not self._lost:
            self.store.release_lease(self.lease)

    async def _run(self) -> None:
        while self.renew_once():
            await asyncio.sleep(self.ttl_s / 3)
