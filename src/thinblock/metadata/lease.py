"""The node's lease: which process serves a node name, decided by the metadata store.

A daemon takes the lease ``node:NAME`` when it opens its store, binds its store to it (so every
later write transaction checks it, inside itself: ``MetadataStore.bind_lease``), renews it every
third of its time to live through the metadata writer, and gives it up on a clean stop.

* A second daemon with the same store and node name finds the lease held and refuses to start,
  naming the holder (what the data directory's flock does on one machine, across machines).
* The holder is the node name's *place*: the host and data directory.  A daemon restarted after
  ``kill -9`` on the same host and data directory is the same holder and takes the lease back
  at once with the same epoch; any other place must wait for it to expire and gets epoch + 1.
* A renewal that finds the lease gone (expired while the process was paused, taken by another)
  takes it back only if nobody else took it (same holder, same epoch); otherwise the lease is
  lost: an alert, and every metadata write of this process fails with ``LeaseLost``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import Conflict, ThinblockError
from .store import Lease, MetadataStore
from .writer import MetadataWriter

log = logging.getLogger("thinblock.metadata")

DEFAULT_TTL = 15.0


def default_node_name() -> str:
    return socket.gethostname() or "thinblock"


def holder_name(data_dir: Path) -> str:
    return f"{socket.gethostname()}:{data_dir.resolve()}"


def take_node_lease(store: MetadataStore, node: str, holder: str, ttl: float = DEFAULT_TTL) -> Lease:
    """Take and bind ``node:NAME``; Conflict naming the holder when another place has it."""
    name = f"node:{node}"
    lease = store.acquire_lease(name, holder, ttl)
    if lease is None:
        current = store.read_lease(name)
        who = "another daemon" if current is None else current.holder
        left = (
            ""
            if current is None
            else f"; its lease runs for {max(0.0, current.expires_at - time.time()):.0f} s more"
        )
        raise Conflict(
            f"node '{node}' is already served by {who} with this metadata store{left}:"
            " stop it, or give this daemon another node name"
        )
    store.bind_lease(lease)
    return lease


class LeaseKeeper:
    """Renews a bound lease on the loop, through the metadata writer (never blocking the loop)."""

    def __init__(
        self,
        writer: MetadataWriter,
        lease: Lease,
        ttl: float = DEFAULT_TTL,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.writer = writer
        self.lease = lease
        self.ttl = ttl
        self.lost = False
        self._on_lost = on_lost
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="thinblock-lease")

    async def renew_once(self) -> None:
        store = self.writer.store
        try:
            renewed = await self.writer.call(store.renew_lease, self.lease, self.ttl)
            if renewed is None:
                # Expired (a pause, a store that was away): ours again only if nobody took it.
                renewed = await self.writer.call(
                    store.acquire_lease, self.lease.name, self.lease.holder, self.ttl
                )
                if renewed is None or renewed.epoch != self.lease.epoch:
                    self._lose(renewed)
                    return
                log.warning("lease %s had expired; taken back with epoch %d", self.lease.name, renewed.epoch)
        except ThinblockError as exc:  # the store away or full: try again at the next tick
            log.warning("lease %s not renewed: %s", self.lease.name, exc)
            return
        self.lease = renewed

    def _lose(self, taken: Lease | None) -> None:
        if self.lost:
            return
        self.lost = True
        current = taken
        if current is None:
            try:
                current = self.writer.store.read_lease(self.lease.name)
            except ThinblockError:
                current = None
        who = "nobody" if current is None else f"{current.holder} (epoch {current.epoch})"
        message = (
            f"lease {self.lease.name} lost (held with epoch {self.lease.epoch}, now {who}):"
            " every metadata write of this daemon is refused"
        )
        log.error("%s", message)
        if self._on_lost is not None:
            self._on_lost(message)

    async def _run(self) -> None:
        while not self.lost:
            await asyncio.sleep(self.ttl / 3)
            await self.renew_once()

    async def stop(self, release: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if release and not self.lost:
            try:
                await self.writer.call(self.writer.store.release_lease, self.lease)
            except ThinblockError as exc:
                log.warning("lease %s not released: %s", self.lease.name, exc)
