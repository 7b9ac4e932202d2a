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
* With a ``WriteFence`` (a node of a pair, fence.py), each grant opens the fence until the
  time the request was *sent* plus the time to live minus ``margin``: the node stops writing
  its PDs and its store before the lease can expire in the store, so before the partner can
  take it (epoch + 1) and begin its takeover.  A lost lease closes the fence for good.
* A metadata write refused with ``LeaseLost`` makes the keeper renew at once (the lease may only
  have expired, and be taken back with the same epoch) rather than wait for its next tick.

Serving stops with the lease (``ServingGate``, asked by every volume request).  The store fences
metadata writes, but an overwrite of an assigned region or a read touches no metadata: without a
gate, a daemon resumed after a pause would go on answering them while another daemon serves the
same volumes.  So:

* Lease lost: every request of every volume of this node fails (EIO) from then on, and the
  front ends' sessions (NBD, iSCSI: the engine's session registry) are disconnected.
* With a shared store (``MetadataStore.remote``), the gate also closes at a *local* deadline: the
  time the last successful renewal was sent, plus 0.8 of the time to live.  The store computes
  the expiry from a later moment (when it ran the renewal) with the whole time to live, so the
  gate closes before anyone else can take the lease, whatever the pause: a daemon resumed after
  SIGSTOP finds its deadline passed before it answers a single request, and answers EIO until a
  renewal (same epoch) opens the gate again, or the lease is found lost.  The margin (0.2 of the
  time to live) covers the two clocks' rates.  With the embedded store the data directory's lock
  already keeps every other daemon out, so only a lost lease closes the gate: a store on a full
  file system (which cannot renew) keeps serving reads and overwrites.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import Conflict, ThinblockError
from ..fence import WriteFence
from .store import Lease, MetadataStore
from .writer import MetadataWriter

log = logging.getLogger("thinblock.metadata")

DEFAULT_TTL = 15.0
DEFAULT_FENCE_MARGIN = 1.0  # seconds before the lease's expiry a fenced node stops writing
#: the part of the time to live the gate trusts a renewal for (metadata/lease.py docstring)
LOCAL_SHARE = 0.8


class ServingGate:
    """Whether this node may answer requests for its volumes now.  Loop thread; ``closed()`` is
    one monotonic clock read, cheap enough for every request."""

    __slots__ = ("deadline", "lost")

    def __init__(self) -> None:
        self.deadline = math.inf  # time.monotonic() from which the lease may be gone (inf: no deadline)
        self.lost: str | None = None  # why serving stopped for good

    def closed(self) -> bool:
        return self.lost is not None or time.monotonic() >= self.deadline

    def why(self) -> str:
        if self.lost is not None:
            return f"is no longer served by this daemon: {self.lost}"
        return "is not served for now: this daemon's lease was not renewed in time (metadata store away?)"

    def renewed(self, sent: float, ttl: float) -> None:
        """A renewal (or the acquisition) sent at monotonic ``sent`` succeeded."""
        self.deadline = sent + LOCAL_SHARE * ttl


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
        fence: WriteFence | None = None,
        margin: float = DEFAULT_FENCE_MARGIN,
        gate: ServingGate | None = None,
    ) -> None:
        assert fence is None or 0 < margin < ttl * 2 / 3, "the fence must open between renewals"
        self.writer = writer
        self.lease = lease
        self.ttl = ttl
        self.lost = False
        self._on_lost = on_lost
        self.fence = fence
        self.margin = margin
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.gate = gate if gate is not None else ServingGate()
        # The local deadline only with a shared store (see the module's docstring).
        self._deadlines = writer.store.remote
        self._task: asyncio.Task[None] | None = None
        self._renewing: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.fence is not None and self.writer.store.remote:
            # Fenced: renewed from a thread of its own, so that an event loop held up by a long
            # step (a PD created, a busy machine) does not let the fence close on a lease that
            # is still ours.  The store's methods are thread-safe (a connection pool).
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run_thread, name="thinblock-lease", daemon=True)
            self._thread.start()
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="thinblock-lease")

    def _run_thread(self) -> None:
        store = self.writer.store
        interval = min(self.ttl, self.ttl - self.margin) / 3
        while not self._stop.wait(interval):
            try:
                sent = time.monotonic()
                renewed = store.renew_lease(self.lease, self.ttl)
                if renewed is None:
                    sent = time.monotonic()
                    renewed = store.acquire_lease(self.lease.name, self.lease.holder, self.ttl)
                    if renewed is None or renewed.epoch != self.lease.epoch:
                        assert self.fence is not None and self._loop is not None
                        self.fence.close(f"lease {self.lease.name} (epoch {self.lease.epoch}) lost")
                        self.gate.lost = f"lease {self.lease.name} (epoch {self.lease.epoch}) lost"
                        current = renewed if renewed is not None else self._holder_now()
                        self._loop.call_soon_threadsafe(self._lose, current)
                        return
            except ThinblockError as exc:
                log.warning("lease %s not renewed: %s", self.lease.name, exc)
                continue
            self.lease = renewed
            self.granted(sent)

    def check_soon(self) -> None:
        """A metadata write was refused with LeaseLost: renew now (one attempt at a time)."""
        if self.lost or (self._renewing is not None and not self._renewing.done()):
            return
        self._renewing = asyncio.get_running_loop().create_task(
            self.renew_once(), name="thinblock-lease-check"
        )

    async def renew_once(self) -> None:
        store = self.writer.store
        try:
            sent = time.monotonic()
            renewed = await self.writer.call(store.renew_lease, self.lease, self.ttl, unfenced=True)
            if renewed is None:
                # Expired (a pause, a store that was away): ours again only if nobody took it.
                sent = time.monotonic()
                renewed = await self.writer.call(
                    store.acquire_lease, self.lease.name, self.lease.holder, self.ttl, unfenced=True
                )
                if renewed is None or renewed.epoch != self.lease.epoch:
                    if not self.lost:
                        self._close_now()  # before the question below: no request waits for it
                        self._tell(
                            renewed if renewed is not None else await asyncio.to_thread(self._holder_now)
                        )
                    return
                log.warning("lease %s had expired; taken back with epoch %d", self.lease.name, renewed.epoch)
        except ThinblockError as exc:  # the store away or full: try again at the next tick
            log.warning("lease %s not renewed: %s", self.lease.name, exc)
            return
        if self.lost:
            return
        self.lease = renewed
        self.granted(sent)

    def granted(self, sent: float) -> None:
        """The lease was granted by a request sent at ``sent`` (monotonic): open the fence (a
        node of a pair) and, with a shared store, the serving gate.  Any thread."""
        if self.lost:
            return
        if self.fence is not None:
            self.fence.open_until(sent + self.ttl - self.margin)
        if self._deadlines:
            was_closed = self.gate.closed()
            self.gate.renewed(sent, self.ttl)
            if was_closed:
                log.warning(
                    "lease %s renewed (epoch %d): serving again",
                    self.lease.name,
                    self.lease.epoch,
                    extra={"event": "lease-renewed-late"},
                )

    def _lose(self, current: Lease | None) -> None:
        """On the loop, from the keeper's thread, which found the lease lost and asked the store
        who holds it now (``current``) itself: the loop never waits for that question (with
        PostgreSQL a round trip, while the loop serves every connection)."""
        if self.lost:
            return
        self._close_now()
        self._tell(current)

    def _close_now(self) -> None:
        self.gate.lost = f"lease {self.lease.name} (epoch {self.lease.epoch}) lost"  # first of all
        self.lost = True
        if self.fence is not None:
            self.fence.close(f"lease {self.lease.name} (epoch {self.lease.epoch}) lost")

    def _holder_now(self) -> Lease | None:
        """The lease row as the store has it now (any thread but the loop's); None if unknown."""
        try:
            return self.writer.store.read_lease(self.lease.name)
        except ThinblockError:
            return None

    def _tell(self, current: Lease | None) -> None:
        who = "nobody" if current is None else f"{current.holder} (epoch {current.epoch})"
        message = (
            f"lease {self.lease.name} lost (held with epoch {self.lease.epoch}, now {who}):"
            " every metadata write of this daemon is refused and its volumes are no longer served"
        )
        self.gate.lost = f"lease {self.lease.name} lost (held with epoch {self.lease.epoch}, now {who})"
        log.error("%s", message, extra={"event": "lease-lost"})
        if self._on_lost is not None:
            self._on_lost(message)

    async def _run(self) -> None:
        while not self.lost:
            await asyncio.sleep(self.ttl / 3)
            await self.renew_once()

    async def stop(self, release: bool = True) -> None:
        if self._thread is not None:
            self._stop.set()
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        for task in (self._task, self._renewing):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._task = self._renewing = None
        if release and not self.lost:
            if self.fence is not None:
                self.fence.close(f"lease {self.lease.name} released")
            try:
                await self.writer.call(self.writer.store.release_lease, self.lease, unfenced=True)
            except ThinblockError as exc:
                log.warning("lease %s not released: %s", self.lease.name, exc)
