"""Alerts: stored, logged, listed, acknowledged, and delivered to subscribers.

Two kinds of alert:

* *conditions* (a VV past its allocation warning, a pool at its growth limit, a
  degraded LD...) are edge-triggered, as dm-thin's low-water event is: raised once
  when the condition starts, not once per write; while that alert is open (new or
  acknowledged) the same condition raises nothing more.  When the condition ends the
  alert is marked ``cleared`` and the next crossing raises a new one.
* *events* (an LD created, a rebuild done) are raised every time they happen.

Storing never waits (issue 11: with PostgreSQL every store call is a network round trip, and
the event loop serves every connection).  The bus numbers its alerts itself (one past the
largest id loaded), then queues the row on the metadata writer (``writer.MetadataWriter``): it
is committed in order with the writer's other transactions, at the end of the loop turn
(SQLite) or on the writer's thread (PostgreSQL); a state change queued after it never
overtakes it.  The alert is logged and delivered to subscribers at once.  A row the store
refuses (full, unreachable, lease lost) is logged (``alert-not-stored``) and the alert is kept
in memory until the daemon stops.  Without a writer (offline tools, or after the engine's writer
closed) the store is called directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import LeaseLost, MetadataStoreFull, MetadataUnavailable, NotFound
from .metadata.store import MetadataStore
from .model import Alert, AlertKind, AlertState, Severity

if TYPE_CHECKING:
    import asyncio

    from .metadata.writer import MetadataWriter

log = logging.getLogger("thinblock.alerts")

CONDITION_KINDS = frozenset(
    {
        AlertKind.VV_ALLOCATION_WARNING,
        AlertKind.VV_ALLOCATION_LIMIT,
        AlertKind.VV_SNAPSHOT_SPACE_WARNING,
        AlertKind.VV_SNAPSHOT_SPACE_LIMIT,
        AlertKind.POOL_GROWTH_WARNING,
        AlertKind.POOL_GROWTH_LIMIT,
        AlertKind.POOL_OUT_OF_CHUNKLETS,
        AlertKind.POOL_LIMIT_FORECAST,
        AlertKind.PD_FAILED,
        AlertKind.PD_HOST_FULL,
        AlertKind.MIRROR_DEGRADED,
        AlertKind.LD_DEGRADED,
        AlertKind.LD_FAILED,
        AlertKind.METADATA_STORE_FULL,
        AlertKind.METADATA_UNAVAILABLE,
        AlertKind.LEASE_LOST,
    }
)

# The store cannot take the alert (it is what the alert is about, often): kept in memory only.
_STORE_TROUBLE = (MetadataStoreFull, MetadataUnavailable, LeaseLost)

_LOG_LEVEL = {
    Severity.INFO: logging.INFO,
    Severity.WARNING: logging.WARNING,
    Severity.CRITICAL: logging.ERROR,
}


class AlertBus:
    def __init__(self, store: MetadataStore, writer: MetadataWriter | None = None) -> None:
        self._store = store
        self.writer = writer
        self._alerts: dict[int, Alert] = {}
        self._open_conditions: dict[tuple[AlertKind, str], int] = {}
        self._subscribers: list[Callable[[Alert], None]] = []
        for row in store.load_alerts():
            alert = Alert(
                row.id,
                row.time,
                Severity(row.severity),
                AlertKind(row.kind),
                row.object,
                row.message,
                AlertState(row.state),
            )
            self._alerts[alert.id] = alert
            if alert.kind in CONDITION_KINDS and alert.state != AlertState.CLEARED:
                self._open_conditions[(alert.kind, alert.object)] = alert.id
        self._next_id = max(self._alerts, default=0) + 1

    # --- raising ---
    def event(self, kind: AlertKind, obj: str, severity: Severity, message: str) -> Alert:
        """Raise an alert every time this happens."""
        return self._new(kind, obj, severity, message)

    def condition(self, kind: AlertKind, obj: str, severity: Severity, message: str) -> Alert | None:
        """Raise once per crossing: nothing while an alert for (kind, obj) is open."""
        assert kind in CONDITION_KINDS, kind
        if (kind, obj) in self._open_conditions:
            return None
        alert = self._new(kind, obj, severity, message)
        self._open_conditions[(kind, obj)] = alert.id
        return alert

    def clear(self, kind: AlertKind, obj: str) -> None:
        """The condition ended: its alert is cleared, the next crossing raises anew."""
        alert_id = self._open_conditions.pop((kind, obj), None)
        if alert_id is not None:
            self._set_state(alert_id, AlertState.CLEARED)

    def clear_object(self, obj: str) -> None:
        """The object is gone (VV, pool or LD deleted, PD removed): clear all its conditions."""
        for kind, o in list(self._open_conditions):
            if o == obj:
                self.clear(kind, o)

    def is_open(self, kind: AlertKind, obj: str) -> bool:
        return (kind, obj) in self._open_conditions

    # --- reading and acknowledging ---
    def list(self, include_cleared: bool = False) -> list[Alert]:
        return [a for a in self._alerts.values() if include_cleared or a.state != AlertState.CLEARED]

    def get(self, alert_id: int) -> Alert:
        try:
            return self._alerts[alert_id]
        except KeyError:
            raise NotFound(f"alert {alert_id} not found") from None

    def ack(self, alert_id: int) -> Alert:
        alert = self.get(alert_id)
        if alert.state == AlertState.NEW:
            return self._set_state(alert_id, AlertState.ACKNOWLEDGED)
        return alert

    def subscribe(self, callback: Callable[[Alert], None]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    # --- internals ---
    def _new(self, kind: AlertKind, obj: str, severity: Severity, message: str) -> Alert:
        now = time.time()
        alert_id = self._next_id
        self._next_id += 1
        self._store_call(
            f"alert {alert_id} not stored",
            {"event": "alert-not-stored", "kind": kind.value, "id": alert_id},
            self._store.add_alert,
            now,
            severity.value,
            kind.value,
            obj,
            message,
            AlertState.NEW.value,
            alert_id,
        )
        alert = Alert(alert_id, now, severity, kind, obj, message, AlertState.NEW)
        self._alerts[alert_id] = alert
        log.log(
            _LOG_LEVEL[severity],
            message,
            extra={
                "event": "alert",
                "id": alert_id,
                "kind": kind.value,
                "severity": severity.value,
                "object": obj,
            },
        )
        for callback in list(self._subscribers):
            try:
                callback(alert)
            except Exception:  # a subscriber must never break the engine
                log.exception("alert subscriber failed")
        return alert

    def _set_state(self, alert_id: int, state: AlertState) -> Alert:
        old = self._alerts[alert_id]
        self._store_call(
            f"alert {alert_id}: state {state.value} not stored",
            {"event": "alert-state-not-stored", "id": alert_id},
            self._store.set_alert_state,
            alert_id,
            state.value,
        )
        new = Alert(old.id, old.time, old.severity, old.kind, old.object, old.message, state)
        self._alerts[alert_id] = new
        return new

    def _store_call(self, failed: str, fields: dict[str, Any], fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` on the writer (never waiting for it), or call it now without one.
        A store in trouble loses the row, not the alert: logged, kept in memory."""
        writer = self.writer
        if writer is None or writer.closed:
            try:
                fn(*args)
            except _STORE_TROUBLE as exc:
                log.error("%s (%s); kept in memory", failed, exc, extra=fields)
            return

        def done(future: asyncio.Future[Any]) -> None:
            if future.cancelled():
                return
            exc = future.exception()
            if exc is not None:
                log.error("%s (%s); kept in memory", failed, exc, extra=fields)

        writer.call(fn, *args).add_done_callback(done)
