"""The forecast end to end: the daemon samples its history, a real client writes, and the CLI's
status, pool list and pool show, the API and the metrics say how soon the pool's limit comes."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.support.daemon import FAST_FORECAST_CONFIG, start_daemon

from .client_tools import qemu_io

pytestmark = pytest.mark.e2e


def test_forecast_reaches_status_pool_list_metrics_and_alerts(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, config=FAST_FORECAST_CONFIG)
    try:
        daemon.cli_json("pool", "set", "default", "--growth-limit", "48MiB")
        qemu_io(daemon.uri("vol0"), "write -P 0x11 0 4M")
        deadline = time.monotonic() + 30
        while True:
            [pool] = daemon.cli_json("pool", "list")
            if (pool["forecast"]["rate"] or 0) > 0:
                break
            assert time.monotonic() < deadline, pool
            time.sleep(0.2)
        assert 0 < pool["forecast"]["to_limit"] < 3600
        table = daemon.cli("pool", "list").out
        assert "FULL IN" in table
        assert re.search(r"default .* 48 MiB +(\d+m )?\d+s ", table), table
        assert "growth limit in" in daemon.cli("pool", "show", "default").out
        assert "pool default reaches its growth limit in" in daemon.cli("status").out
        assert "forecast" in daemon.cli("vv", "show", "vol0").out
        with daemon.http() as http:
            metrics = http.get("/metrics").text
        assert re.search(r'^thinblock_pool_seconds_to_limit\{pool="default"\} \d', metrics, re.M)
        kinds = [(a["kind"], a["object"]) for a in daemon.cli_json("alerts")]
        assert ("pool-limit-forecast", "pool:default") in kinds
        history = daemon.api_get("/history?seconds=60")
        assert len(history["times"]) >= 2 and "vol0" in history["volumes"]
    finally:
        assert daemon.stop() == 0, daemon.log_text()
