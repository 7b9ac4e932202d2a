"""The owner's mirror: the write-back cache's ``CacheMirror``, over one link session at a time.

``OwnerMirror`` turns the cache's calls into the sans-IO core's messages
(``mirror_protocol.OwnerConnection``) and the partner's acknowledgements into completed
futures.  It does no I/O itself: a transport (``link.py``, or a test's in-memory pipe) gives
it a ``send`` callable with ``attach`` and feeds it what arrives with ``receive``.  The role
(``pair.py``) decides when the partner is lost (``lose``) and when a new session is in sync
(``mark_in_sync``).

State, as the cache sees it::

    detached --attach--> syncing --mark_in_sync--> in sync --lose--> detached
                            \\______________lose______________________/

Only ``in sync`` acknowledges write-back writes on the two copies; otherwise the cache writes
through.  ``lose`` turns ``in_sync`` off *before* failing the futures of writes still
waiting, so that those writes are written through and their volume's assignment commit
rule applies (the ``CacheMirror`` contract).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from ..blockdev import Buffer
from ..cache.writeback import MirrorLost
from .mirror_protocol import (
    NEED_DATA,
    Acked,
    ConnectionClosed,
    Hello,
    OwnerConnection,
    Pong,
    ProtocolError,
    RemoteError,
)

log = logging.getLogger("thinblock.node.mirror")

# Queued MIRROR bytes past which a write's copy is sent at once rather than at the end of the
# loop turn (large writes: the partner may start receiving while more arrive).
FLUSH_NOW_BYTES = 256 * 1024


class _Waiting(NamedTuple):
    """A write (or a release) waiting for the partner's acknowledgement of its sequence."""

    seq: int
    future: asyncio.Future[None]
    nbytes: int  # a write's length (0: a release)
    sent_at: float
    release: bool


class OwnerMirror:
    """See the module docstring.  ``durable`` makes every write destaged so far durable (the
    engine's flush: PDs fsynced, region assignments committed); only after it does the partner
    hear that a region was destaged (issue 12: "after a region is destaged and its assignment
    committed, the owner tells the partner")."""

    def __init__(
        self,
        node: str,
        incarnation: int,
        *,
        durable: Callable[[], Awaitable[None]],
        covers_flush: bool = False,
        to_itself: bool = False,  # OwnerConnection.to_itself: a takeover mirroring to the old owner
    ) -> None:
        self.node = node
        self._to_itself = to_itself
        self.incarnation = incarnation
        self.epoch = 0
        self._durable = durable
        self._covers_flush = covers_flush
        self._conn: OwnerConnection | None = None
        self._send: Callable[[bytes], None] | None = None
        self._session = 0
        self._in_sync = False
        # vv -> the writes (they fail when the partner is lost) and releases (done when it is
        # lost) waiting for an ACK, in sequence order: a cumulative ACK completes them from the front
        self._waiting: dict[int, deque[_Waiting]] = {}
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._ping_at: dict[int, float] = {}
        self._next_token = 0
        self._flush_scheduled = False  # a _flush_out is queued for the end of this loop turn
        # (session, vv, key, seq): destaged, to be reported once durable
        self._destaged: list[tuple[int, int, int, int]] = []
        self.peer: Hello | None = None
        # metrics
        self.mirrored_bytes = 0
        self.in_flight_bytes = 0
        self.last_latency = 0.0
        self.lost_count = 0

    # --- CacheMirror ------------------------------------------------------------------------
    @property
    def in_sync(self) -> bool:
        return self._in_sync

    @property
    def covers_flush(self) -> bool:
        """FLUSH and FUA may be answered on the two copies: allowed by the configuration, in sync
        (``lose`` turns it off before anything else), and the partner of this session said in its
        HELLO that it replays what it holds when this node dies (``HELLO_TAKES_OVER``): a copy
        nobody would replay is no copy for a FLUSH."""
        peer = self.peer
        return self._covers_flush and self._in_sync and peer is not None and peer.takes_over

    def replicate(self, vv: int, key: int, vv_region: int, offset: int, data: Buffer) -> Awaitable[None]:
        conn = self._conn
        if conn is None or not self._in_sync:
            raise AssertionError("replicate while the mirror is not in sync (the cache checks in_sync)")
        seq = conn.mirror(vv, key, vv_region, offset, data)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        n = len(data)
        self._wait(vv, _Waiting(seq, fut, n, time.monotonic(), False))
        self.in_flight_bytes += n
        self._flush_soon()
        return fut

    def _wait(self, vv: int, entry: _Waiting) -> None:
        waiting = self._waiting.get(vv)
        if waiting is None:
            waiting = self._waiting[vv] = deque()
        waiting.append(entry)

    def destaged(self, vv: int, key: int) -> None:
        conn = self._conn
        if conn is None:
            return
        held = conn.last_mirrored(key)
        if held is not None and held[0] == vv:
            self._destaged.append((self._session, vv, key, held[1]))

    def may_hold(self, key: int) -> bool:
        # Out of sync, the partner's copies are obsolete as a whole: the role makes sure they are
        # never written (a RESYNC drops them; a takeover refuses a mirror marked out of sync).
        conn = self._conn
        return self._in_sync and conn is not None and not conn.region_settled(key)

    def release(self, vv: int, key: int) -> Awaitable[None] | None:
        conn = self._conn
        if conn is None or not self._in_sync:
            return None
        seq = conn.release(vv, key)
        if seq is None:
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wait(vv, _Waiting(seq, fut, 0, time.monotonic(), True))
        self._flush_out()
        return fut

    # --- the role's side --------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._conn is not None

    @property
    def pending_destaged(self) -> int:
        return len(self._destaged)

    def attach(self, epoch: int, send: Callable[[bytes], None]) -> None:
        """A new session over a fresh link: HELLO, RESYNC.  Not in sync until ``mark_in_sync``."""
        assert self._conn is None, "attach while a session is running"
        self.epoch = epoch
        self._session += 1
        self.peer = None  # this session's partner says who it is (and whether it takes over) anew
        self._conn = OwnerConnection(self.node, epoch, self.incarnation, to_itself=self._to_itself)
        self._conn.resync()
        self._send = send
        self._flush_out()

    def mark_in_sync(self) -> None:
        """The partner holds everything the cache needs it to (the role checked with a ping after
        destaging and flushing): write-back writes may be acknowledged on two copies again."""
        assert self._conn is not None
        self._in_sync = True

    def receive(self, data: bytes) -> str | None:
        """Bytes from the partner (``b""``: the link closed).  Returns why the session is over,
        or None while it goes on."""
        conn = self._conn
        if conn is None:
            return "no session"
        conn.receive_data(data)
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, Acked):
                # Cumulative: every write and release of the volume up to event.seq is held or done.
                waiting = self._waiting.get(event.vv)
                if waiting:
                    now = time.monotonic()
                    while waiting and waiting[0].seq <= event.seq:
                        done = waiting.popleft()
                        self.in_flight_bytes -= done.nbytes
                        self.last_latency = now - done.sent_at
                        if not done.future.done():
                            done.future.set_result(None)
            elif isinstance(event, Pong):
                self._ping_at.pop(event.token, None)
                ping = self._pings.pop(event.token, None)
                if ping is not None and not ping.done():
                    ping.set_result(None)
            elif isinstance(event, Hello):
                self.peer = event
            elif isinstance(event, RemoteError):
                self._flush_out()
                return f"the partner reported: {event.text}"
            elif isinstance(event, ProtocolError):
                self._flush_out()
                return f"protocol error: {event.reason}"
            elif isinstance(event, ConnectionClosed):
                return "the partner closed the link"
        self._flush_out()
        return None

    def ping(self) -> asyncio.Future[None]:
        """A future that completes when the partner processed everything sent before it."""
        if self._conn is None:
            raise MirrorLost("no session")
        self._next_token += 1
        token = self._next_token
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[token] = fut
        self._ping_at[token] = time.monotonic()
        self._conn.ping(token)
        self._flush_out()
        return fut

    def oldest_wait(self, now: float) -> float:
        """Seconds the oldest unanswered write or PING has waited (0 when none)."""
        oldest = min(self._ping_at.values(), default=now)
        for waiting in self._waiting.values():
            if waiting and waiting[0].sent_at < oldest:
                oldest = waiting[0].sent_at
        return now - oldest

    async def report_destaged(self) -> int:
        """Make what was destaged durable, then tell the partner it may drop those copies.
        Returns how many regions were reported."""
        if not self._destaged:
            return 0
        batch, self._destaged = self._destaged, []
        try:
            await self._durable()
        except BaseException:
            self._destaged = batch + self._destaged  # not durable: the partner keeps its copies
            raise
        conn = self._conn
        reported = 0
        for session, vv, key, seq in batch:
            if conn is not None and session == self._session and not conn.closed:
                conn.destaged(vv, key, seq)
                reported += 1
        self._flush_out()
        return reported

    def lose(self, reason: str) -> None:
        """The partner is gone (silent past the bound, the link broke, or it refused us).  Writes
        waiting for it are written through by the cache; nothing more is sent on this session."""
        was_in_sync = self._in_sync
        self._in_sync = False  # first: the cache writes through from here on (CacheMirror contract)
        self._conn = None
        self._send = None
        self._destaged.clear()
        waiting, self._waiting = self._waiting, {}
        self.in_flight_bytes = 0
        for entries in waiting.values():
            for entry in entries:
                fut = entry.future
                if fut.done():
                    continue
                if entry.release:
                    # A release is done when the partner is lost: its copies are obsolete as a whole
                    # from now on (may_hold), and the role never lets them be written (RESYNC, or a
                    # takeover's check).
                    fut.set_result(None)
                else:
                    fut.set_exception(MirrorLost(reason))
                    fut.exception()  # retrieved: a waiter may have been cancelled
        self._ping_at.clear()
        pings, self._pings = self._pings, {}
        for fut in pings.values():
            if not fut.done():
                fut.set_exception(MirrorLost(reason))
                fut.exception()
        if was_in_sync:
            self.lost_count += 1
            log.warning("mirror session lost: %s", reason, extra={"event": "mirror-lost", "reason": reason})

    def _flush_soon(self) -> None:
        """Send what is queued at the end of this loop turn: the writes that arrived together (one
        NBD read of 16 requests) go to the partner in one send, come back acknowledged in one
        read, and their replies leave in one send.  One send per write (measured: issue 12's
        profile) cost a loopback syscall each way per write and paced the partner's ACKs one by
        one, and so the NBD replies.  A large backlog goes at once (no point holding it)."""
        conn = self._conn
        if conn is not None and conn.pending_bytes >= FLUSH_NOW_BYTES:
            self._flush_out()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        conn, send = self._conn, self._send
        if conn is not None and send is not None:
            data = conn.data_to_send()
            if data:
                send(data)
