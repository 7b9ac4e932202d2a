"""Alert webhook: ordered delivery, retries with backoff, a bounded queue that never blocks."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from thinblock.api.webhook import WebhookPoster
from thinblock.model import Alert, AlertKind, AlertState, Severity


def _alert(n: int) -> Alert:
    return Alert(
        id=n,
        time=1_700_000_000.0 + n,
        severity=Severity.WARNING,
        kind=AlertKind.VV_ALLOCATION_WARNING,
        object=f"vv:v{n}",
        message=f"volume v{n} passed its allocation warning",
        state=AlertState.NEW,
    )


def _poster(handler: object, **kwargs: object) -> WebhookPoster:
    options: dict[str, object] = {"backoff_initial": 0.001, "backoff_max": 0.002, "max_attempts": 4}
    options.update(kwargs)
    return WebhookPoster(
        "http://127.0.0.1:9/hook",
        node="node-a",
        transport=httpx.MockTransport(handler),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


async def test_delivers_in_order_with_the_documented_body() -> None:
    received: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and request.url.path == "/hook"
        assert request.headers["content-type"] == "application/json"
        received.append(json.loads(request.content))
        return httpx.Response(204)

    poster = _poster(handler)
    poster.start()
    for n in (1, 2, 3):
        poster.submit(_alert(n))
    await asyncio.wait_for(poster.wait_idle(), 5)
    await poster.stop()
    assert [r["alert"]["id"] for r in received] == [1, 2, 3]  # type: ignore[index]
    assert received[0] == {
        "event": "alert",
        "node": "node-a",
        "alert": {
            "id": 1,
            "time": 1_700_000_001.0,
            "severity": "warning",
            "kind": "vv-allocation-warning",
            "object": "vv:v1",
            "message": "volume v1 passed its allocation warning",
            "state": "new",
        },
    }
    assert (poster.delivered, poster.failed, poster.dropped, poster.retries) == (3, 0, 0, 0)


@pytest.mark.parametrize("failure", ["503", "429", "connect", "timeout"])
async def test_transient_failures_are_retried(failure: str) -> None:
    attempts = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            if failure == "connect":
                raise httpx.ConnectError("refused", request=request)
            if failure == "timeout":
                raise httpx.ReadTimeout("slow", request=request)
            return httpx.Response(int(failure))
        return httpx.Response(200)

    poster = _poster(handler)
    poster.start()
    poster.submit(_alert(1))
    await asyncio.wait_for(poster.wait_idle(), 5)
    await poster.stop()
    assert attempts == 3
    assert (poster.delivered, poster.retries, poster.failed) == (1, 2, 0)


async def test_gives_up_after_max_attempts_and_goes_on() -> None:
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        alert_id = json.loads(request.content)["alert"]["id"]
        seen.append(alert_id)
        return httpx.Response(500 if alert_id == 1 else 200)

    poster = _poster(handler, max_attempts=3)
    poster.start()
    poster.submit(_alert(1))
    poster.submit(_alert(2))
    await asyncio.wait_for(poster.wait_idle(), 5)
    await poster.stop()
    assert seen == [1, 1, 1, 2]
    assert (poster.delivered, poster.failed) == (1, 1)


async def test_a_refusal_is_not_retried() -> None:
    attempts = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        return httpx.Response(400)

    poster = _poster(handler)
    poster.start()
    poster.submit(_alert(1))
    await asyncio.wait_for(poster.wait_idle(), 5)
    await poster.stop()
    assert attempts == 1 and poster.failed == 1 and poster.retries == 0


async def test_submit_never_waits_and_a_full_queue_drops_the_oldest() -> None:
    release = asyncio.Event()
    delivered: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await release.wait()  # the webhook hangs
        delivered.append(json.loads(request.content)["alert"]["id"])
        return httpx.Response(200)

    poster = _poster(handler, queue_size=2)
    poster.start()
    # submit is a plain function: the engine calls it mid-write, and it must return at once
    # even with the receiver stuck and the queue full.
    for n in range(1, 6):
        poster.submit(_alert(n))
    assert poster.dropped == 3 and poster.pending == 2
    release.set()
    await asyncio.wait_for(poster.wait_idle(), 5)
    await poster.stop()
    assert delivered == [4, 5]


async def test_stop_gives_pending_alerts_a_bounded_time() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(3600)
        return httpx.Response(200)

    poster = _poster(handler)
    poster.start()
    poster.submit(_alert(1))
    await asyncio.sleep(0)
    await asyncio.wait_for(poster.stop(drain_timeout=0.05), 5)  # returns although the receiver hangs
    assert poster.delivered == 0


async def test_collect_reports_outcomes() -> None:
    poster = _poster(lambda request: httpx.Response(200))
    poster.start()
    poster.submit(_alert(1))
    await asyncio.wait_for(poster.wait_idle(), 5)
    samples = {(s.name, tuple(s.labels.values())): s.value for m in poster.collect() for s in m.samples}
    await poster.stop()
    assert samples[("thinblock_webhook_alerts_total", ("delivered",))] == 1
    assert samples[("thinblock_webhook_alerts_total", ("dropped",))] == 0
    assert samples[("thinblock_webhook_pending", ())] == 0
