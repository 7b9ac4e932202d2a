"""Allocation and I/O over time, kept in the daemon, and the forecast drawn from it.

``History`` samples the engine every few seconds (default 5 s) into a ring buffer of a few hours
(default 3 h: 2,160 samples): per pool the bytes used and the capacity, per volume the bytes
allocated and the I/O counters.  No external database: it starts empty with the daemon.

The forecast (per pool and per volume): the allocation rate over the last hour (over what the
buffer holds when that is less; none before two samples a minimum interval apart), and from it the
estimated seconds until the warning and the limit are reached -- for a pool its growth warning
and growth limit (compared with the bytes used, which the capacity follows in increments), for a
volume its allocation warning and limit.  A rate of zero or less forecasts nothing (``None``);
a threshold already reached forecasts 0.

Alert: when a pool's time to its growth limit falls below the horizon (default 24 h), a
``pool-limit-forecast`` condition is raised (once the rate was measured over 15 minutes at
least, so that a first burst is not extrapolated), once per crossing like the other alerts, and
cleared when the forecast goes back above it (or the limit is reached: then
``pool-growth-limit`` speaks).

Event-loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .model import AlertKind, Severity
from .units import format_duration, format_size

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("thinblock.history")

DEFAULT_INTERVAL = 5.0  # seconds between samples
DEFAULT_KEEP = 3 * 3600.0  # seconds of history
DEFAULT_HORIZON = 24 * 3600.0  # pool-limit-forecast below this
# The alert waits for a rate measured over at least this long: a burst in the first minute
# extrapolated over a day would cry wolf (the rate itself is shown from the second sample on).
DEFAULT_ALERT_WINDOW = 15 * 60.0
RATE_WINDOW = 3600.0  # the allocation rate is taken over the last hour
MIN_RATE_SPAN = 1.0  # seconds between the two samples a rate needs at least


@dataclass(frozen=True, slots=True)
class PoolSample:
    used: int
    capacity: int


@dataclass(frozen=True, slots=True)
class VolumeSample:
    allocated: int
    read_bytes: int
    write_bytes: int
    reads: int
    writes: int


@dataclass(frozen=True, slots=True)
class Sample:
    time: float
    pools: dict[str, PoolSample]
    volumes: dict[str, VolumeSample]


@dataclass(frozen=True, slots=True)
class Forecast:
    """Bytes per second over ``window`` seconds; seconds until the warning and the limit."""

    rate: float | None
    window: float
    to_warning: float | None
    to_limit: float | None


NO_FORECAST = Forecast(None, 0.0, None, None)


def _eta(current: int, threshold: int | None, rate: float | None) -> float | None:
    if threshold is None:
        return None
    if current >= threshold:
        return 0.0
    if rate is None or rate <= 0:
        return None
    return (threshold - current) / rate


class History:
    def __init__(
        self,
        engine: Engine,
        *,
        interval: float = DEFAULT_INTERVAL,
        keep: float = DEFAULT_KEEP,
        horizon: float = DEFAULT_HORIZON,
        alert_window: float = DEFAULT_ALERT_WINDOW,
    ) -> None:
        self.engine = engine
        self.interval = interval
        self.keep = keep
        self.horizon = horizon
        self.alert_window = alert_window
        self.samples: deque[Sample] = deque(maxlen=max(2, int(keep / interval) + 1))
        self._task: asyncio.Task[None] | None = None

    # --- sampling ---------------------------------------------------------------------------
    def sample(self, now: float | None = None) -> Sample:
        """Take one sample now (the sampler task calls this; tests call it with their own clock)."""
        engine = self.engine
        now = time.time() if now is None else now
        pools = {p.name: PoolSample(p.used, p.capacity) for p in engine.list_pools()}
        volumes = {}
        for vv in engine.list_vvs():
            stats = engine.vv_stats(vv.name)
            volumes[vv.name] = VolumeSample(
                vv.allocated, stats.read_bytes, stats.write_bytes, stats.reads, stats.writes
            )
        sample = Sample(now, pools, volumes)
        self.samples.append(sample)
        self._check_pool_forecasts()
        return sample

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="thinblock-history")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # a listing that failed must not end the history
                log.exception("history sample failed", extra={"event": "history-failed"})
            await asyncio.sleep(self.interval)

    # --- reading ----------------------------------------------------------------------------
    def since(self, seconds: float) -> list[Sample]:
        if not self.samples:
            return []
        start = self.samples[-1].time - seconds
        return [s for s in self.samples if s.time >= start]

    def _rate(self, pick: Callable[[Sample], int | None]) -> tuple[float | None, float]:
        """(bytes per second, seconds measured over): from the oldest sample of the last hour in
        which the object existed to the newest; (None, 0) with too little history."""
        if len(self.samples) < 2:
            return None, 0.0
        last = self.samples[-1]
        now = pick(last)
        if now is None:
            return None, 0.0
        for first in self.samples:
            if first.time < last.time - RATE_WINDOW:
                continue
            then = pick(first)
            if then is None:
                continue
            span = last.time - first.time
            if span < MIN_RATE_SPAN:
                return None, 0.0
            return (now - then) / span, span
        return None, 0.0

    def pool_forecast(self, name: str, used: int, warning: int | None, limit: int | None) -> Forecast:
        rate, span = self._rate(lambda s: s.pools[name].used if name in s.pools else None)
        return Forecast(rate, span, _eta(used, warning, rate), _eta(used, limit, rate))

    def volume_forecast(self, name: str, allocated: int, warning: int | None, limit: int | None) -> Forecast:
        rate, span = self._rate(lambda s: s.volumes[name].allocated if name in s.volumes else None)
        return Forecast(rate, span, _eta(allocated, warning, rate), _eta(allocated, limit, rate))

    def pool_forecasts(self) -> Iterator[tuple[str, Forecast]]:
        for p in self.engine.list_pools():
            yield p.name, self.pool_forecast(p.name, p.used, p.growth_warning, p.growth_limit)

    # --- the alert --------------------------------------------------------------------------
    def _check_pool_forecasts(self) -> None:
        alerts = self.engine.alerts
        for pool in self.engine.list_pools():
            obj = f"pool:{pool.name}"
            forecast = self.pool_forecast(pool.name, pool.used, pool.growth_warning, pool.growth_limit)
            soon = (
                forecast.to_limit is not None
                and 0 < forecast.to_limit < self.horizon
                and forecast.window >= min(self.alert_window, RATE_WINDOW)
            )
            if soon and forecast.rate is not None and pool.growth_limit is not None:
                alerts.condition(
                    AlertKind.POOL_LIMIT_FORECAST,
                    obj,
                    Severity.WARNING,
                    f"pool '{pool.name}' will reach its growth limit of {format_size(pool.growth_limit)} in "
                    f"about {format_duration(forecast.to_limit or 0)} at the allocation rate of the last "
                    f"{format_duration(forecast.window)} ({format_size(int(forecast.rate))}/s)",
                )
            else:
                alerts.clear(AlertKind.POOL_LIMIT_FORECAST, obj)

    # --- for the API ------------------------------------------------------------------------
    def series(self, seconds: float) -> dict[str, Any]:
        """Column-wise, for charts: times, and per pool and per volume one list per quantity."""
        samples = self.since(seconds)
        times = [round(s.time, 3) for s in samples]
        pool_names = sorted({n for s in samples for n in s.pools})
        vv_names = sorted({n for s in samples for n in s.volumes})
        pools = {
            n: {
                "used": [s.pools[n].used if n in s.pools else None for s in samples],
                "capacity": [s.pools[n].capacity if n in s.pools else None for s in samples],
            }
            for n in pool_names
        }
        volumes = {
            n: {
                field: [getattr(s.volumes[n], field) if n in s.volumes else None for s in samples]
                for field in ("allocated", "read_bytes", "write_bytes", "reads", "writes")
            }
            for n in vv_names
        }
        return {"interval": self.interval, "times": times, "pools": pools, "volumes": volumes}


__all__ = ["Forecast", "History"]
