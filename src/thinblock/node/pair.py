"""The node role in a pair (claims 3 and 12): one node's side of the mirror, both directions.

    node n1 (owner of its write-back volumes)           node n2 (its partner)
    WriteBackCache.mirror = OwnerMirror  --- link --->  mirror listener: PartnerConnection
                                                         + MirrorHolding (n1's copies)
    mirror listener  <--- link ---  OwnerMirror of n2 (when n2 owns write-back volumes)

Each node listens for its partner's link (``listen``) and connects to the partner's
(``partner``).  What the role does on the owner's side:

* **Bring the mirror in sync.**  Connect, HELLO and RESYNC (the partner drops what it held of
  an earlier session), wait until the partner processed them (a PING), flush (everything
  written through while out of sync becomes durable, and nothing dirty remains that the
  partner lacks), then ``mark_in_sync``: write-back writes are acknowledged on two copies
  from here on, and the ``mirror-degraded`` alert clears.
* **Watch the partner.**  Every ``partner_timeout / 4`` a PING; when a PING or a mirrored
  write has waited longer than ``partner_timeout`` (default 1 s), or the link breaks, or the
  partner refuses us, the partner is lost.
* **Degrade** (3PAR's two-node rule): ``OwnerMirror.lose`` stops acknowledging on two
  copies (write-back volumes write through from that moment, writes that were waiting are
  written through), the ``mirror-degraded`` alert is raised, and the cache is flushed (the
  writes acknowledged on two copies now have one: they go to the LDs, durably).  Then
  reconnect, with a bounded back-off.
* **Report destages.**  Every ``report_interval`` the regions destaged meanwhile are made
  durable (the engine's flush) and reported (DESTAGED): the partner drops those copies.

On the partner's side the role accepts the link, holds the owner's copies in a
``MirrorHolding`` that outlives connections (a takeover replays it) and answers.

Takeover (node/takeover.py): when the owner whose copies this node holds goes silent (its
link closed, or open and quiet past ``partner_timeout``), ``take_over`` is tried every
``takeover_poll`` until it succeeds or the owner is heard again; after it succeeded the owner's
mirror links are refused (``refuse_owner``).

FLUSH and FUA of a write-back volume are answered on the two copies (no destage, no fsync)
while the mirror is in sync and the partner said in its HELLO that it takes over
(``HELLO_TAKES_OVER``), unless ``flush_on_two_copies`` is off.  ``lose`` turns it off with
``in_sync``, before anything else, so a FLUSH that comes after a degrade destages and fsyncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..alerts import AlertBus
from ..cache.writeback import MirrorLost, WriteBackCache
from ..model import AlertKind, Severity
from .link import Link, connect, listen
from .mirror import OwnerMirror
from .mirror_protocol import (
    DEFAULT_MAX_HELD,
    NEED_DATA,
    Hello,
    MirrorHolding,
    PartnerConnection,
    ProtocolError,
    RemoteError,
    Resynced,
)
from .takeover import EpochMarks

log = logging.getLogger("thinblock.node.pair")

DEFAULT_PARTNER_TIMEOUT = 1.0
DEFAULT_REPORT_INTERVAL = 0.25
MAX_RECONNECT_DELAY = 1.0


@dataclass(frozen=True, slots=True)
class PairConfig:
    node: str
    partner_host: str
    partner_port: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    partner_timeout: float = DEFAULT_PARTNER_TIMEOUT
    report_interval: float = DEFAULT_REPORT_INTERVAL
    max_held: int = DEFAULT_MAX_HELD
    takeover_poll: float = 0.2  # seconds between attempts to take over a silent owner
    # FLUSH and FUA answered on the two copies while in sync, if the partner takes over
    # (OwnerMirror.covers_flush; config node.flush_on_two_copies)
    flush_on_two_copies: bool = True
    # The owner's side of a takeover: ``node`` is the old owner's name and the partner is the
    # old owner itself, rejoined (OwnerConnection.to_itself)
    to_old_owner: bool = False


@dataclass(frozen=True, slots=True)
class PairStatus:
    node: str
    partner: str  # host:port of the partner's mirror listener
    partner_node: str | None  # its name, once it said HELLO
    listen: str
    epoch: int
    mirror: str  # "in-sync", "syncing", "degraded"
    in_flight_bytes: int
    last_latency_s: float
    sessions_lost: int
    holding_for: str | None  # the owner whose copies this node holds
    held_bytes: int
    held_writes: int
    taken_over: bool  # this node took its partner's volumes over
    flush_covered: bool  # FLUSH and FUA of write-back volumes are answered on the two copies now
    # Rejoined: copies of this node's own volumes, sent by the partner that serves them (a takeover)
    own_held_bytes: int = 0
    own_held_writes: int = 0
    # The mirror of the volumes this node took over (to the rejoined old owner): in-sync,
    # syncing, degraded; None when it took nothing over (the daemon fills it in)
    taken_over_mirror: str | None = None


class NodePair:
    """See the module docstring.  ``flush`` is the engine's ``flush_all``."""

    def __init__(
        self,
        config: PairConfig,
        *,
        cache: WriteBackCache | None,
        flush: Callable[[], Awaitable[None]] | None,
        alerts: AlertBus,
        epoch: int = 0,
        marks: EpochMarks | None = None,
        take_over: Callable[[MirrorHolding | None], Awaitable[bool]] | None = None,
        writeback_volumes: Callable[[], int] = lambda: 0,
    ) -> None:
        self._writeback_volumes = writeback_volumes
        self.config = config
        self.epoch = epoch
        self._marks = marks
        self._take_over = take_over
        self._takeover_task: asyncio.Task[None] | None = None
        self.taken_over = False
        self.incarnation = int.from_bytes(os.urandom(8), "big") or 1
        # None: a partner only (an old owner rejoined while its partner serves its volumes,
        # ``start_owner`` once it owns volumes again)
        self._cache = cache
        self._engine_flush = flush
        self._alerts = alerts
        self.mirror = OwnerMirror(
            config.node,
            self.incarnation,
            durable=self._flush,
            covers_flush=config.flush_on_two_copies,
            to_itself=config.to_old_owner,
        )
        self.holding: MirrorHolding | None = None
        # Rejoined while the partner serves this node's volumes (its takeover): the partner
        # mirrors them here under this node's name; replayed when this node serves them again
        # (``freeze_own``, then node/takeover.replay).
        self.own_holding: MirrorHolding | None = None
        self._sessions: set[_PartnerSession] = set()
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._link: Link | None = None
        self._session_over: asyncio.Future[str] | None = None
        self._degrade_flush: asyncio.Task[None] | None = None
        self._stopping = False
        self.listen_port = config.listen_port
        # Owners this node took over: their mirror links are refused from then on (a fenced
        # old owner must not have writes acknowledged on copies nobody will replay).
        self.refused_owners: set[str] = set()

    @property
    def object_name(self) -> str:
        return f"node:{self.config.node}"

    # --- life cycle -------------------------------------------------------------------------
    async def _flush(self) -> None:
        assert self._engine_flush is not None, "the owner's side runs only with an engine"
        await self._engine_flush()

    @property
    def partner_only(self) -> bool:
        """This node owns no volumes (yet): it holds its partner's copies and may take it over."""
        return self._cache is None

    async def start(self, *, listen_for_partner: bool = True) -> None:
        """``listen_for_partner`` False: the owner's side only (the mirror of volumes taken over,
        sent to the rejoined old owner under its own name: the daemon's takeover)."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        self._tasks = []
        if not listen_for_partner:
            assert self._cache is not None and self._take_over is None
            self._start_owner_side()
            return
        self._server = await listen(cfg.listen_host, cfg.listen_port, self._accept)
        self.listen_port = self._server.sockets[0].getsockname()[1]
        if self._cache is not None:
            self._start_owner_side()
        if self._take_over is not None:
            self._tasks.append(loop.create_task(self._silence_watch(), name="pair-owner-silence"))
        log.info(
            "node pair: mirror listener up",
            extra={
                "event": "pair-listen",
                "node": cfg.node,
                "listen": f"{cfg.listen_host}:{self.listen_port}",
            },
        )

    def _start_owner_side(self) -> None:
        assert self._cache is not None
        self._cache.mirror = self.mirror  # out of sync until the partner is: writes go through
        loop = asyncio.get_running_loop()
        self._tasks += [
            loop.create_task(self._owner_loop(), name="pair-owner-link"),
            loop.create_task(self._report_loop(), name="pair-report-destaged"),
        ]

    def start_owner(
        self,
        *,
        cache: WriteBackCache,
        flush: Callable[[], Awaitable[None]],
        alerts: AlertBus,
        marks: EpochMarks | None,
        writeback_volumes: Callable[[], int],
    ) -> None:
        """A partner-only node (rejoined) owns volumes again (its lease came back): mirror them."""
        assert self._cache is None and self._server is not None, "start_owner on a running owner"
        self._cache, self._engine_flush, self._marks, self._alerts = cache, flush, marks, alerts
        self._writeback_volumes = writeback_volumes
        self._start_owner_side()

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._takeover_task is not None:
            self._takeover_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._takeover_task
        self._lose("node stopping")
        if self._link is not None:
            self._link.close()
        if self._degrade_flush is not None:
            with contextlib.suppress(Exception):
                await self._degrade_flush
        for session in list(self._sessions):
            session.link.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # --- the owner's side -------------------------------------------------------------------
    async def _owner_loop(self) -> None:
        cfg = self.config
        delay = 0.05
        while not self._stopping:
            over: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._session_over = over

            def on_data(data: bytes, over: asyncio.Future[str] = over) -> None:
                reason = self.mirror.receive(data)
                if reason is not None and not over.done():
                    over.set_result(reason)

            def on_close(reason: str, over: asyncio.Future[str] = over) -> None:
                if not over.done():
                    over.set_result(reason)

            def on_open(link: Link) -> None:
                # Every session its own epoch, growing across restarts (the partner refuses an
                # older one); attached before the partner's HELLO can be delivered.
                self.epoch = self._marks.next_epoch() if self._marks is not None else self.epoch + 1
                self.mirror.attach(self.epoch, link.write)

            try:
                link = await asyncio.wait_for(
                    connect(cfg.partner_host, cfg.partner_port, on_data, on_close, on_open),
                    cfg.partner_timeout,
                )
            except (OSError, TimeoutError) as exc:
                self._lose("connect failed")  # attached already if the timeout hit late
                self._degraded(
                    f"partner {cfg.partner_host}:{cfg.partner_port} unreachable: {exc or 'timeout'}"
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RECONNECT_DELAY)
                continue
            self._link = link
            watchdog = asyncio.get_running_loop().create_task(self._watch(over), name="pair-watchdog")
            try:
                reason = await self._run_session(over)
            finally:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
                self._lose(reason if not self._stopping else "node stopping")
                link.close()
                self._link = None
            if self._stopping:
                return
            self._degraded(reason)
            delay = 0.05
            await asyncio.sleep(delay)

    async def _run_session(self, over: asyncio.Future[str]) -> str:
        """Bring the mirror in sync, then wait until the session ends; returns why it ended."""
        try:
            await self._until(self.mirror.ping(), over)  # HELLO and RESYNC processed
            if self._degrade_flush is not None:
                await self._until(asyncio.shield(self._degrade_flush), over)
            # Everything written through while out of sync becomes durable, and the cache holds
            # nothing dirty the partner lacks: from here, two copies of every new write.
            await self._until(asyncio.ensure_future(self._flush()), over)
            await self._until(self.mirror.ping(), over)
        except _SessionOver as exc:
            return str(exc)
        except MirrorLost as exc:
            return str(exc)
        except Exception as exc:  # a flush that failed: stay out of sync
            log.error("mirror could not be brought in sync: %s", exc)
            return f"sync failed: {exc}"
        if self._marks is not None:
            # The partner's copies become the ones a takeover replays: marked before the first
            # write is acknowledged on them.
            self._marks.mark_valid(self.epoch)
        self.mirror.mark_in_sync()
        self._alerts.clear(AlertKind.MIRROR_DEGRADED, self.object_name)
        peer = self.mirror.peer.node if self.mirror.peer is not None else "?"
        log.info(
            "mirror in sync: write-back writes are acknowledged on two copies",
            extra={"event": "mirror-in-sync", "node": self.config.node, "partner": peer, "epoch": self.epoch},
        )
        return await over

    def _lose(self, reason: str) -> None:
        """Out of sync.  The store's mark goes first: once the cache writes anything through, the
        partner's copies are older than the LDs and a takeover must not replay them."""
        if self._marks is not None and self.mirror.in_sync:
            try:
                self._marks.mark_obsolete()
            except Exception:
                log.exception(
                    "could not mark the partner's copies obsolete", extra={"event": "mirror-mark-failed"}
                )
        self.mirror.lose(reason)

    async def _until(self, step: Awaitable[None], over: asyncio.Future[str]) -> None:
        """Await ``step``, unless the session ends first (``_SessionOver``)."""
        task = asyncio.ensure_future(step)
        either: set[asyncio.Future[Any]] = {task, over}
        done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, MirrorLost):
            await task
        raise _SessionOver(over.result())

    async def _watch(self, over: asyncio.Future[str]) -> None:
        """The partner is lost when a PING or a mirrored write waited past the bound."""
        bound = self.config.partner_timeout
        while not over.done():
            now = time.monotonic()
            waited = self.mirror.oldest_wait(now)
            if waited > bound:
                over.set_result(f"partner silent for {waited:.2f} s (bound {bound} s)")
                return
            with contextlib.suppress(MirrorLost):
                self.mirror.ping()
            await asyncio.sleep(bound / 4)

    def _degraded(self, reason: str) -> None:
        """Out of sync: write-back volumes write through; what was acknowledged on two copies and
        is still dirty goes to the LDs now.  The alert stays until the mirror is in sync again."""
        self._alerts.condition(
            AlertKind.MIRROR_DEGRADED,
            self.object_name,
            Severity.CRITICAL,
            f"node {self.config.node}: the write-back cache is not mirrored ({reason}); "
            "write-back volumes are written through until the partner is back in sync",
        )
        if (
            self._cache is not None
            and self._cache.dirty_bytes
            and (self._degrade_flush is None or self._degrade_flush.done())
        ):
            self._degrade_flush = asyncio.get_running_loop().create_task(self._flush_after_loss())

    async def _flush_after_loss(self) -> None:
        try:
            await self._flush()
        except Exception as exc:
            log.error("flush after the partner was lost failed: %s", exc)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.report_interval)
            if self.mirror.pending_destaged and self.mirror.in_sync:
                try:
                    await self.mirror.report_destaged()
                except Exception as exc:  # not durable: the partner keeps its copies; next round
                    log.warning("destaged regions not reported: %s", exc)

    # --- the partner's side -----------------------------------------------------------------
    def _accept(self) -> Link:
        session = _PartnerSession(self)
        self._sessions.add(session)
        return session.link

    def _holding_for(self, hello: Hello) -> MirrorHolding:
        if self._accept_owner(hello) is not None:
            return MirrorHolding(hello.node)  # refused by _accept_owner next: nothing is kept
        if hello.node == self.config.node:
            # This node's own volumes, served by the partner's takeover while this node rejoined
            if self.own_holding is None:
                self.own_holding = MirrorHolding(hello.node, max_bytes=self.config.max_held)
            return self.own_holding
        holding = self.holding
        if holding is None or (holding.owner != hello.node and len(holding) == 0):
            holding = self.holding = MirrorHolding(hello.node, max_bytes=self.config.max_held)
        return holding

    def _owner_session_ended(self, session: _PartnerSession) -> None:
        """The owner's link closed: it may be dead.  Try to take over until it is back."""
        if session.owner == self.config.node:
            return  # the mirror of this node's own volumes: its lease says when they are its again
        if self._take_over is None or self.taken_over or self._stopping:
            return
        if self._takeover_task is None or self._takeover_task.done():
            self._takeover_task = asyncio.get_running_loop().create_task(
                self._takeover_loop(), name="pair-takeover"
            )

    def _owner_connected(self) -> bool:
        """The owner whose copies this node holds is connected and was heard within the bound
        (it PINGs every partner_timeout / 4): a stopped or cut-off owner is not."""
        holding = self.holding
        if holding is None:
            return False
        heard_since = time.monotonic() - self.config.partner_timeout
        return any(s.conn is holding.session and s.last_heard >= heard_since for s in self._sessions)

    async def _silence_watch(self) -> None:
        """An owner whose link stays open but says nothing (SIGSTOP, a cut link that has not
        reset) may have lost its lease: try to take it over (``take_over`` refuses while the
        owner's lease or lock holds)."""
        while not self._stopping:
            await asyncio.sleep(self.config.takeover_poll)
            holding = self.holding
            if (
                holding is not None
                and holding.owner not in ("-", "")
                and not self.taken_over
                and not self._owner_connected()
                and (self._takeover_task is None or self._takeover_task.done())
            ):
                self._takeover_task = asyncio.get_running_loop().create_task(
                    self._takeover_loop(), name="pair-takeover"
                )

    def refuse_owner(self, owner: str) -> None:
        """Taken over: end the old owner's mirror links and refuse new ones (fencing)."""
        self.refused_owners.add(owner)
        for session in list(self._sessions):
            if session.owner == owner:
                session.link.abort()
                self._sessions.discard(session)

    def handed_back(self, owner: str) -> None:
        """Failback: the volumes taken over from ``owner`` are its again.  Its mirror links are
        welcome again, and it may be taken over again once it mirrors to this node; not before
        (its lease, released by the takeover's engine, is free until it takes it, and this node
        must not take it back meanwhile: the holding of its old copies, replayed, is dropped)."""
        self.refused_owners.discard(owner)
        self.taken_over = False
        if self.holding is not None and self.holding.owner == owner:
            assert len(self.holding) == 0, "a taken-over owner's copies were replayed"
            self.holding = None

    def _accept_owner(self, hello: Hello) -> str | None:
        if hello.node in self.refused_owners:
            if hello.node == self.config.node:
                return f"node {self.config.node} serves its own volumes again: the partner's takeover is over"
            return f"node {self.config.node} took over node {hello.node}'s volumes: it is fenced"
        if hello.node == self.config.node and not self.partner_only:
            # Only a rejoined node replays copies of its own volumes (when its lease is free
            # again); a node serving them, or fenced, would hold copies nobody replays.
            return (
                f"node {self.config.node} is not rejoined as partner: it holds no copies of its own volumes"
            )
        return None

    def freeze_own(self) -> MirrorHolding | None:
        """This node's lease is free again: it serves its own volumes from here.  The partner's
        takeover may no longer have a write acknowledged on a copy here (its links under this
        node's name are ended and refused, as ``refuse_owner`` does for a taken-over owner), so
        what is held now is every write it acknowledged on two copies: the copies to replay."""
        self.refuse_owner(self.config.node)
        held, self.own_holding = self.own_holding, None
        return held

    async def _takeover_loop(self) -> None:
        assert self._take_over is not None
        owner = self.holding.owner if self.holding is not None else "?"
        log.warning(
            "node %s is silent: taking it over once its lease (or lock) is free",
            owner,
            extra={"event": "takeover-trying", "owner": owner},
        )
        while not self._stopping and not self.taken_over:
            if self._owner_connected():
                log.info(
                    "node %s is heard again: not taking it over",
                    owner,
                    extra={"event": "takeover-abandoned", "owner": owner},
                )
                return  # the owner is alive: it reconnected and resynced
            try:
                if await self._take_over(self.holding):
                    self.taken_over = True
                    return
            except Exception:
                log.exception("takeover failed", extra={"event": "takeover-failed"})
            await asyncio.sleep(self.config.takeover_poll)

    def _session_started(self, current: _PartnerSession, hello: Hello) -> None:
        for session in list(self._sessions):
            if session is not current and session.owner == hello.node:
                session.link.abort()  # a half-open older link of the same owner
                self._sessions.discard(session)
        log.info(
            "holding the mirror of node %s",
            hello.node,
            extra={"event": "mirror-partner-session", "owner": hello.node, "epoch": hello.epoch},
        )

    def clear_degraded_alert(self) -> None:
        """The volumes this pair mirrored are no longer served here (handed back)."""
        self._alerts.clear(AlertKind.MIRROR_DEGRADED, self.object_name)

    # --- status -----------------------------------------------------------------------------
    def status(self) -> PairStatus:
        mirror = self.mirror
        if self._cache is None:
            state = "partner-only"  # rejoined: owns no volumes, holds the partner's copies
        else:
            state = "in-sync" if mirror.in_sync else ("syncing" if mirror.attached else "degraded")
        holding = self.holding
        cfg = self.config
        return PairStatus(
            node=cfg.node,
            partner=f"{cfg.partner_host}:{cfg.partner_port}",
            partner_node=mirror.peer.node if mirror.peer is not None else None,
            listen=f"{cfg.listen_host}:{self.listen_port}",
            epoch=self.epoch,
            mirror=state,
            in_flight_bytes=mirror.in_flight_bytes,
            last_latency_s=mirror.last_latency,
            sessions_lost=mirror.lost_count,
            holding_for=holding.owner if holding is not None else None,
            held_bytes=holding.held_bytes if holding is not None else 0,
            held_writes=len(holding) if holding is not None else 0,
            taken_over=self.taken_over,
            flush_covered=mirror.covers_flush,
            own_held_bytes=self.own_holding.held_bytes if self.own_holding is not None else 0,
            own_held_writes=len(self.own_holding) if self.own_holding is not None else 0,
        )

    # --- metrics (a prometheus collector, as the daemon's webhook poster is) -----------------
    def collect(self) -> Iterator[Metric]:
        st = self.status()
        labels = ["node"]
        in_sync = GaugeMetricFamily(
            "thinblock_mirror_in_sync", "1 while write-back writes are mirrored to the partner", labels=labels
        )
        in_sync.add_metric([st.node], 1.0 if st.mirror == "in-sync" else 0.0)
        yield in_sync
        degraded = GaugeMetricFamily(
            "thinblock_mirror_degraded_volumes",
            "write-back volumes written through because the mirror is not in sync",
            labels=labels,
        )
        degraded.add_metric([st.node], 0.0 if st.mirror == "in-sync" else float(self._writeback_volumes()))
        yield degraded
        in_flight = GaugeMetricFamily(
            "thinblock_mirror_in_flight_bytes",
            "bytes sent to the partner and not yet acknowledged",
            labels=labels,
        )
        in_flight.add_metric([st.node], float(st.in_flight_bytes))
        yield in_flight
        latency = GaugeMetricFamily(
            "thinblock_mirror_latency_seconds",
            "the last mirrored write's round trip to the partner",
            labels=labels,
        )
        latency.add_metric([st.node], st.last_latency_s)
        yield latency
        lost = CounterMetricFamily(
            "thinblock_mirror_sessions_lost", "mirror sessions lost (degrades)", labels=labels
        )
        lost.add_metric([st.node], float(st.sessions_lost))
        yield lost
        held = GaugeMetricFamily(
            "thinblock_mirror_held_bytes", "bytes of the partner's writes this node holds", labels=labels
        )
        held.add_metric([st.node], float(st.held_bytes))
        yield held


class PairMetrics:
    """The mirror metrics of every ``NodePair`` of the daemon (its own, and the mirror of the
    volumes it took over, labelled with the old owner's name), one family per metric name."""

    def __init__(self, pairs: Callable[[], list[NodePair]]) -> None:
        self._pairs = pairs

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for pair in self._pairs():
            for family in pair.collect():
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
        yield from families.values()


class _SessionOver(Exception):
    pass


class _PartnerSession:
    """One accepted link: the partner's core, fed by the transport."""

    def __init__(self, pair: NodePair) -> None:
        self.pair = pair
        self.owner: str | None = None
        self.conn = PartnerConnection(
            pair.config.node,
            pair.epoch,
            pair.incarnation,
            MirrorHolding("-"),  # replaced at HELLO by choose_holding
            choose_holding=pair._holding_for,
            accept_owner=pair._accept_owner,
            # The owner may answer FLUSH on our copy only if we replay it when it dies.
            takes_over=pair._take_over is not None,
        )
        self.last_heard = time.monotonic()
        self.link = Link(self._on_data, self._on_close, self._on_open)

    def _on_open(self, link: Link) -> None:
        link.write(self.conn.data_to_send())  # our HELLO

    def _on_data(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        conn = self.conn
        conn.receive_data(data)
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, Hello):
                self.owner = event.node
                self.pair._session_started(self, event)
            elif isinstance(event, Resynced):
                log.debug("owner %s resynced at epoch %d", self.owner, event.epoch)
            elif isinstance(event, ProtocolError):
                log.warning(
                    "mirror link from %s refused: %s",
                    self.link.peer,
                    event.reason,
                    extra={"event": "mirror-protocol-error"},
                )
            elif isinstance(event, RemoteError):
                log.warning("owner %s ended the mirror link: %s", self.owner, event.text)
        out = conn.data_to_send()
        if out:
            self.link.write(out)
        if conn.closed:
            self.link.close()
            self.pair._sessions.discard(self)
            if self.owner is not None:
                self.pair._owner_session_ended(self)

    def _on_close(self, reason: str) -> None:
        self.pair._sessions.discard(self)
        if self.owner is not None:
            self.pair._owner_session_ended(self)
