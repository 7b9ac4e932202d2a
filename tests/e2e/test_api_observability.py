"""/metrics and the alert webhook of the real daemon, after real NBD I/O."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import SMALL_CONFIG, Daemon, running_daemon
from thinblock.units import MiB

from .client_tools import qemu_io

pytestmark = pytest.mark.e2e


class Receiver:
    """A webhook receiver on loopback that fails its first request (503), then accepts."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.requests = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests += 1
                if receiver.requests == 1:
                    self.send_response(503)
                else:
                    receiver.bodies.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/alerts"

    def wait_for(self, kind: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for body in self.bodies:
                if body["alert"]["kind"] == kind:
                    return body
            time.sleep(0.05)
        raise AssertionError(f"no {kind} alert reached the webhook: {self.bodies}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def daemon(tmp_path: Path, receiver: Receiver) -> Iterator[Daemon]:
    with running_daemon(
        tmp_path, config=SMALL_CONFIG + f'\n[webhook]\nurl = "{receiver.url}"\n', clean_stop=True
    ) as d:
        yield d


def _scrape(daemon: Daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with daemon.http() as client:
        r = client.get("/metrics")
    assert r.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_and_webhook(daemon: Daemon, receiver: Receiver) -> None:
    uri = daemon.uri("vol0")
    qemu_io(uri, "write -P 1 0 2M", "read -P 1 0 1M", "discard 0 1M")
    vv = daemon.cli_json("vv", "show", "vol0")
    pool = daemon.cli_json("pool", "show", "default")
    m = _scrape(daemon)

    def value(name: str, **labels: str) -> float:
        return m[(name, frozenset(labels.items()))]

    assert value("thinblock_vv_virtual_bytes", vv="vol0", pool="default") == vv["size"]
    assert value("thinblock_vv_allocated_bytes", vv="vol0", pool="default") == vv["allocated"] == MiB
    assert value("thinblock_vv_requests_total", vv="vol0", op="write") >= 1
    assert value("thinblock_vv_requests_total", vv="vol0", op="read") >= 1
    assert value("thinblock_vv_requests_total", vv="vol0", op="trim") >= 1
    assert value("thinblock_vv_bytes_total", vv="vol0", op="write") == 2 * MiB
    # Latencies measured at the NBD front end: every request counted, with a positive sum.
    writes = value("thinblock_vv_request_seconds_count", vv="vol0", op="write")
    assert writes >= 1 and value("thinblock_vv_request_seconds_sum", vv="vol0", op="write") > 0
    assert value("thinblock_vv_request_seconds_bucket", vv="vol0", op="write", le="+Inf") == writes
    assert value("thinblock_pool_capacity_bytes", pool="default") == pool["capacity"] > 0
    assert value("thinblock_pool_used_bytes", pool="default") == pool["used"]
    assert value("thinblock_pool_free_bytes", pool="default") == pool["free"]
    assert value("thinblock_pool_lds", pool="default") == pool["lds"] == 1
    assert value("thinblock_cache_dirty_bytes") == 0
    assert value("thinblock_alerts", kind="ld-created", state="new") == 1

    # A PD fails: the alert is in the store, in the metrics, and POSTed to the webhook (after a retry).
    pd = daemon.cli_json("pd", "fail", "4")
    assert pd["health"] == "failed"
    posted = receiver.wait_for("pd-failed")
    stored = next(a for a in daemon.cli_json("alerts") if a["kind"] == "pd-failed")
    assert posted["event"] == "alert" and posted["alert"] == stored
    assert stored["object"] == "pd:4" and stored["severity"] in ("warning", "critical")
    assert receiver.requests >= 2  # the first attempt got a 503 and was retried
    m = _scrape(daemon)
    pd_path = str(daemon.data_dir.resolve() / "pd3.img")
    assert value("thinblock_pd_health", pd="4", path=pd_path, health="failed") == 1
    assert value("thinblock_pd_health", pd="4", path=pd_path, health="normal") == 0
    assert value("thinblock_alerts", kind="pd-failed", state="new") == 1
    assert value("thinblock_webhook_alerts_total", outcome="delivered") >= 1
