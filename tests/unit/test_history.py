"""The daemon's history (a ring buffer of samples) and the forecast drawn from it: allocation rate
over the last hour, time to warning and limit, per pool and volume; the pool-limit-forecast alert
once per crossing; the same figures in the API, the metrics, and the CLI's tables."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.engine_helpers import CHUNKLET, REGION, STEP, make_engine, pattern
from thinblock.api.app import NodeInfo, create_app
from thinblock.history import History
from thinblock.model import AlertKind
from thinblock.units import Limit, MiB


def forecast_alerts(history: History) -> list[str]:
    return [
        a.state.value for a in history.engine.list_alerts(True) if a.kind == AlertKind.POOL_LIMIT_FORECAST
    ]


async def test_forecast_rates_times_and_the_alert_once_per_crossing(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    limit = 8 * CHUNKLET  # 32 regions
    await engine.create_pool(
        "p", raid=1, region_size=REGION, growth_increment=CHUNKLET, growth_limit=limit, step=STEP
    )
    await engine.create_vv(
        "v",
        pool="p",
        size=1 * MiB,
        alloc_warning=Limit(bytes=8 * REGION),
        alloc_limit=Limit(bytes=16 * REGION),
    )
    history = History(engine, interval=10, keep=7200, horizon=600, alert_window=10)
    vol = engine.volume("v")

    history.sample(now=1000.0)
    f = history.pool_forecast("p", 0, None, limit)
    assert (f.rate, f.to_limit) == (None, None)  # one sample: no rate yet

    await vol.write(0, pattern(1, 4 * REGION))
    history.sample(now=1010.0)
    pool = history.pool_forecast("p", 4 * REGION, None, limit)
    assert pool.rate == 4 * REGION / 10 and pool.window == 10
    assert pool.to_limit == pytest.approx((limit - 4 * REGION) / pool.rate)  # 70 s
    vv = history.volume_forecast("v", 4 * REGION, 8 * REGION, 16 * REGION)
    assert (vv.to_warning, vv.to_limit) == (pytest.approx(10.0), pytest.approx(30.0))
    assert forecast_alerts(history) == ["new"]  # 70 s < the 600 s horizon
    [alert] = [a for a in engine.list_alerts() if a.kind == AlertKind.POOL_LIMIT_FORECAST]
    assert (
        alert.object == "pool:p" and "will reach its growth limit of 512 KiB in about 1m 10s" in alert.message
    )

    await vol.write(4 * REGION, pattern(2, 2 * REGION))
    history.sample(now=1020.0)
    assert forecast_alerts(history) == ["new"]  # still below the horizon: no second alert

    # An hour and more without growth: the rate over the last hour is 0, the alert clears.
    history.sample(now=5000.0)
    history.sample(now=5010.0)
    assert history.pool_forecast("p", 6 * REGION, None, limit).rate == 0
    assert forecast_alerts(history) == ["cleared"]
    # Growing again: a new crossing, a new alert.
    await vol.write(8 * REGION, pattern(3, 6 * REGION))
    history.sample(now=5020.0)
    assert forecast_alerts(history) == ["cleared", "new"]
    # A volume that appeared after the first sample of the window is forecast from its own first.
    await engine.create_vv("late", pool="p", size=1 * MiB)
    history.sample(now=5030.0)
    await engine.volume("late").write(0, pattern(4, 2 * REGION))
    history.sample(now=5040.0)
    assert history.volume_forecast("late", 2 * REGION, None, None).rate == 2 * REGION / 10
    await engine.close()


async def test_the_ring_buffer_keeps_what_it_is_told_and_gives_columns(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=0, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=1 * MiB)
    history = History(engine, interval=1, keep=10)
    for t in range(30):
        history.sample(now=float(t))
    assert len(history.samples) == 11 and history.samples[0].time == 19.0
    await engine.volume("v").write(0, pattern(1, REGION))
    history.sample(now=30.0)
    series = history.series(5)
    assert series["times"] == [25.0, 26.0, 27.0, 28.0, 29.0, 30.0]
    assert series["volumes"]["v"]["allocated"] == [0, 0, 0, 0, 0, REGION]
    assert series["volumes"]["v"]["write_bytes"][-1] == REGION
    assert series["pools"]["p"]["used"][-1] == REGION
    await engine.close()


async def test_forecast_in_the_api_the_metrics_and_the_cli(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool(
        "p", raid=1, region_size=REGION, growth_increment=CHUNKLET, growth_limit=8 * CHUNKLET, step=STEP
    )
    await engine.create_vv("v", pool="p", size=1 * MiB, alloc_limit=Limit(bytes=16 * REGION))
    history = History(engine, interval=10, keep=3600)
    app = create_app(engine, NodeInfo(name="n"), history=history)
    history.sample(now=1000.0)
    await engine.volume("v").write(0, pattern(1, 4 * REGION))
    history.sample(now=1010.0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        pool = (await c.get("/api/v1/pools/p")).json()
        assert pool["forecast"]["rate"] == 4 * REGION / 10
        assert pool["forecast"]["to_limit"] == pytest.approx(70.0)
        vv = (await c.get("/api/v1/volumes/v")).json()
        assert vv["forecast"]["to_limit"] == pytest.approx(30.0) and vv["forecast"]["to_warning"] is None
        status = (await c.get("/api/v1/status")).json()
        assert status["forecasts"]["p"] == pool["forecast"]
        h = (await c.get("/api/v1/history", params={"seconds": 3600})).json()
        assert h["times"] == [1000.0, 1010.0] and h["volumes"]["v"]["allocated"] == [0, 4 * REGION]
        text = (await c.get("/metrics")).text
        values = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if "seconds_to" in s.name or "alloc_rate" in s.name
        }
        assert values[("thinblock_pool_seconds_to_limit", (("pool", "p"),))] == pytest.approx(70.0)
        assert values[("thinblock_vv_seconds_to_limit", (("pool", "p"), ("vv", "v")))] == pytest.approx(30.0)
        assert values[("thinblock_pool_alloc_rate_bytes_per_second", (("pool", "p"),))] == 4 * REGION / 10
    await engine.close()


async def test_the_alert_waits_for_a_rate_measured_long_enough(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool(
        "p", raid=1, region_size=REGION, growth_increment=CHUNKLET, growth_limit=8 * CHUNKLET, step=STEP
    )
    await engine.create_vv("v", pool="p", size=1 * MiB)
    history = History(engine, interval=10, horizon=86400)  # the default: 15 minutes of measure
    history.sample(now=0.0)
    await engine.volume("v").write(0, pattern(1, 4 * REGION))
    history.sample(now=10.0)
    assert history.pool_forecast("p", 4 * REGION, None, 8 * CHUNKLET).to_limit is not None
    assert forecast_alerts(history) == []  # a first burst is not extrapolated into an alert
    history.sample(now=900.0)
    assert forecast_alerts(history) == ["new"]
    await engine.close()
