"""Alerts POSTed as JSON to a webhook, retried with backoff, never blocking I/O.

The engine calls ``WebhookPoster.submit`` (through ``Engine.subscribe``) on the loop thread
while it is raising an alert, possibly in the middle of a host's write: ``submit`` only
puts the alert in a bounded queue and returns.  One background task delivers the queue in
order.  A delivery that fails with a network error, a timeout, 408, 429 or a 5xx is retried
with exponential backoff (with jitter, capped); after ``max_attempts`` the alert is dropped
and logged (it stays in the metadata store and the API either way).  A full queue drops its
oldest alert rather than grow or make the engine wait.

The body::

    {"event": "alert", "node": "host1", "alert": {"id": 7, "time": 1700000000.0,
     "severity": "warning", "kind": "vv-allocation-warning", "object": "vv:vol0",
     "message": "...", "state": "new"}}
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import httpx
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import __version__
from ..model import Alert

log = logging.getLogger("thinblock.webhook")

_RETRYABLE_STATUS = {408, 425, 429}


class WebhookPoster:
    def __init__(
        self,
        url: str,
        *,
        node: str | None = None,
        timeout: float = 5.0,
        max_attempts: int = 8,
        queue_size: int = 1000,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self.node = node or socket.gethostname()
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=queue_size)
        self._client = httpx.AsyncClient(
            timeout=timeout,
            transport=transport,
            headers={"user-agent": f"thinblock/{__version__}", "content-type": "application/json"},
        )
        self._task: asyncio.Task[None] | None = None
        self._sending = False
        self.delivered = 0
        self.failed = 0  # dropped after max_attempts or a permanent error
        self.dropped = 0  # dropped because the queue was full
        self.retries = 0

    # --- producer side (loop thread, never waits) ---------------------------------------------
    def submit(self, alert: Alert) -> None:
        """Queue ``alert`` for delivery; returns at once."""
        if self._queue.full():
            oldest = self._queue.get_nowait()
            self._queue.task_done()
            self.dropped += 1
            log.warning(
                "webhook queue full: dropped the oldest alert",
                extra={"event": "webhook-dropped", "alert_id": oldest.id, "object": oldest.object},
            )
        self._queue.put_nowait(alert)

    @property
    def pending(self) -> int:
        return self._queue.qsize() + (1 if self._sending else 0)

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="thinblock-webhook")

    async def stop(self, drain_timeout: float = 2.0) -> None:
        """Give queued alerts ``drain_timeout`` seconds to go out, then stop."""
        if self._task is not None:
            if drain_timeout > 0 and self.pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queue.join(), drain_timeout)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.pending:
            log.warning(
                "webhook stopped with alerts undelivered",
                extra={"event": "webhook-undelivered", "count": self.pending},
            )
        await self._client.aclose()

    async def wait_idle(self) -> None:
        """Until everything queued so far has been delivered or given up (tests)."""
        await self._queue.join()

    # --- delivery --------------------------------------------------------------------------------
    def payload(self, alert: Alert) -> dict[str, Any]:
        body = asdict(alert)
        body["severity"] = str(alert.severity)
        body["kind"] = str(alert.kind)
        body["state"] = str(alert.state)
        return {"event": "alert", "node": self.node, "alert": body}

    async def _run(self) -> None:
        while True:
            alert = await self._queue.get()
            self._sending = True
            try:
                await self._deliver(alert)
            except Exception:  # never let one bad alert stop delivery of the others
                log.exception(
                    "webhook delivery crashed", extra={"event": "webhook-error", "alert_id": alert.id}
                )
            finally:
                self._sending = False
                self._queue.task_done()

    async def _deliver(self, alert: Alert) -> None:
        body = self.payload(alert)
        delay = self.backoff_initial
        for attempt in range(1, self.max_attempts + 1):
            reason: str
            try:
                response = await self._client.post(self.url, json=body)
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if response.is_success:
                    self.delivered += 1
                    log.debug(
                        "alert delivered to the webhook",
                        extra={"event": "webhook-delivered", "alert_id": alert.id, "attempt": attempt},
                    )
                    return
                reason = f"HTTP {response.status_code}"
                if response.status_code < 500 and response.status_code not in _RETRYABLE_STATUS:
                    self.failed += 1
                    log.error(
                        "webhook refused the alert; not retrying",
                        extra={"event": "webhook-refused", "alert_id": alert.id, "reason": reason},
                    )
                    return
            if attempt == self.max_attempts:
                break
            self.retries += 1
            wait = min(delay, self.backoff_max) * random.uniform(0.5, 1.0)
            log.warning(
                "webhook delivery failed; retrying",
                extra={
                    "event": "webhook-retry",
                    "alert_id": alert.id,
                    "attempt": attempt,
                    "reason": reason,
                    "retry_in": round(wait, 3),
                },
            )
            await asyncio.sleep(wait)
            delay *= 2
        self.failed += 1
        log.error(
            "webhook delivery gave up",
            extra={"event": "webhook-gave-up", "alert_id": alert.id, "attempts": self.max_attempts},
        )

    # --- metrics (a prometheus collector) --------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        outcomes = CounterMetricFamily(
            "thinblock_webhook_alerts", "alerts by webhook delivery outcome", labels=["outcome"]
        )
        outcomes.add_metric(["delivered"], self.delivered)
        outcomes.add_metric(["failed"], self.failed)
        outcomes.add_metric(["dropped"], self.dropped)
        yield outcomes
        retries = CounterMetricFamily("thinblock_webhook_retries", "webhook delivery attempts retried")
        retries.add_metric([], self.retries)
        yield retries
        pending = GaugeMetricFamily("thinblock_webhook_pending", "alerts waiting for webhook delivery")
        pending.add_metric([], self.pending)
        yield pending
