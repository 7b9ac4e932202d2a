"""``/metrics``: the engine's state in the Prometheus text format, read at scrape time.

``EngineCollector`` is a custom collector: nothing is copied into prometheus-client objects
as things happen; each scrape asks the engine for its listings (on the loop thread, where
the engine must be called) and turns them into metric families.

Latency histograms: the engine keeps I/O counters per volume (``Engine.vv_stats``) but no
latencies.  ``LatencyRecorder`` measures them at the NBD front end instead: the daemon hands
the NBD server an ``InstrumentedProvider`` whose volumes time every request from the call
into the engine to its completion (network time excluded).  Observing is a bisect and two
additions on the loop thread, no lock, no allocation.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from ..model import AlertKind, AlertState, LDHealth, PDHealth, PoolState

if TYPE_CHECKING:
    from ..blockdev import (
        Buffer,
        Capabilities,
        DirtyBitmap,
        DirtyRun,
        Extent,
        ReadPiece,
        SpanPiece,
        Volume,
        VolumeProvider,
    )
    from ..engine import Engine
    from ..history import Forecast, History
    from .app import NodeInfo

# From 50 µs (a cached read) to 10 s (a write waiting for a new LD on a slow disk).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
OPERATIONS = ("read", "write", "write_zeroes", "trim", "flush", "block_status", "cache")


class EngineCollector:
    """Reads engine state at scrape time (registered with ``auto_describe=False``)."""

    def __init__(self, engine: Engine, node: NodeInfo) -> None:
        self.engine = engine
        self.node = node

    def collect(self) -> Iterator[Metric]:
        yield from self._node()
        yield from self._volumes()
        yield from self._pools()
        yield from self._pds()
        yield from self._lds()
        yield from self._alerts()

    def _node(self) -> Iterable[Metric]:
        info = InfoMetricFamily("thinblock_build", "thinblock version and node name")
        info.add_metric([], {"version": self.node.version, "node": self.node.name})
        yield info
        up = GaugeMetricFamily("thinblock_uptime_seconds", "seconds since the daemon started")
        up.add_metric([], self.node.uptime)
        yield up
        dirty = GaugeMetricFamily("thinblock_cache_dirty_bytes", "write-back cache bytes not yet destaged")
        dirty.add_metric([], self.engine.cache_dirty_bytes())
        yield dirty
        progress = self.engine.rebuild_status()
        running = GaugeMetricFamily("thinblock_rebuild_running", "1 while a rebuild runs")
        running.add_metric([], 1 if progress.running else 0)
        yield running
        # One quantity per metric, named as GET /rebuild names them (bytes_total, bytes_done).
        total = GaugeMetricFamily(
            "thinblock_rebuild_bytes_total", "bytes the current (or last) rebuild copies"
        )
        total.add_metric([], progress.bytes_total)
        yield total
        done = GaugeMetricFamily("thinblock_rebuild_done_bytes", "bytes of it copied so far")
        done.add_metric([], progress.bytes_done)
        yield done

    def _volumes(self) -> Iterable[Metric]:
        labels = ["vv", "pool"]
        virtual = GaugeMetricFamily("thinblock_vv_virtual_bytes", "virtual size of the volume", labels=labels)
        allocated = GaugeMetricFamily(
            "thinblock_vv_allocated_bytes", "bytes of LD regions assigned to the volume", labels=labels
        )
        regions = GaugeMetricFamily(
            "thinblock_vv_regions_allocated", "LD regions assigned to the volume", labels=labels
        )
        warning = GaugeMetricFamily(
            "thinblock_vv_alloc_warning_bytes", "allocation warning (when set)", labels=labels
        )
        limit = GaugeMetricFamily(
            "thinblock_vv_alloc_limit_bytes", "allocation limit (when set)", labels=labels
        )
        dirty = GaugeMetricFamily(
            "thinblock_vv_dirty_bytes", "write-back cache bytes of the volume not yet destaged", labels=labels
        )
        snapshot_space = GaugeMetricFamily(
            "thinblock_vv_snapshot_space_bytes",
            "bytes of regions only the volume's snapshots hold (what deleting them all would free)",
            labels=labels,
        )
        snapshot_warning = GaugeMetricFamily(
            "thinblock_vv_snapshot_warning_bytes", "snapshot space warning (when set)", labels=labels
        )
        snapshot_limit = GaugeMetricFamily(
            "thinblock_vv_snapshot_limit_bytes", "snapshot space limit (when set)", labels=labels
        )
        requests = CounterMetricFamily(
            "thinblock_vv_requests", "I/O requests since the daemon started", labels=["vv", "op"]
        )
        data = CounterMetricFamily(
            "thinblock_vv_bytes", "bytes read and written since the daemon started", labels=["vv", "op"]
        )
        errors = CounterMetricFamily("thinblock_vv_errors", "I/O requests that failed", labels=["vv"])
        for vv in self.engine.list_vvs():
            key = [vv.name, vv.pool]
            virtual.add_metric(key, vv.size)
            allocated.add_metric(key, vv.allocated)
            regions.add_metric(key, vv.regions_allocated)
            dirty.add_metric(key, vv.dirty_bytes)
            if vv.alloc_warning is not None:
                warning.add_metric(key, vv.alloc_warning)
            if vv.alloc_limit is not None:
                limit.add_metric(key, vv.alloc_limit)
            snapshot_space.add_metric(key, vv.snapshot_space)
            if vv.snapshot_warning is not None:
                snapshot_warning.add_metric(key, vv.snapshot_warning)
            if vv.snapshot_limit is not None:
                snapshot_limit.add_metric(key, vv.snapshot_limit)
            stats = self.engine.vv_stats(vv.name)
            for op, count in (
                ("read", stats.reads),
                ("write", stats.writes),
                ("trim", stats.trims),
                ("write_zeroes", stats.zeroes),
                ("flush", stats.flushes),
            ):
                requests.add_metric([vv.name, op], count)
            data.add_metric([vv.name, "read"], stats.read_bytes)
            data.add_metric([vv.name, "write"], stats.write_bytes)
            errors.add_metric([vv.name], stats.errors)
        yield from (
            virtual, allocated, regions, warning, limit, dirty, snapshot_space, snapshot_warning,
            snapshot_limit, requests, data, errors,
        )  # fmt: skip

    def _pools(self) -> Iterable[Metric]:
        labels = ["pool"]
        families = {
            "capacity": GaugeMetricFamily(
                "thinblock_pool_capacity_bytes", "usable bytes of the pool's LDs", labels=labels
            ),
            "used": GaugeMetricFamily(
                "thinblock_pool_used_bytes", "bytes of assigned regions", labels=labels
            ),
            "free": GaugeMetricFamily("thinblock_pool_free_bytes", "capacity minus used", labels=labels),
            "lds": GaugeMetricFamily("thinblock_pool_lds", "LDs in the pool", labels=labels),
            "volumes": GaugeMetricFamily("thinblock_pool_volumes", "volumes in the pool", labels=labels),
            "growth_warning": GaugeMetricFamily(
                "thinblock_pool_growth_warning_bytes", "growth warning (when set)", labels=labels
            ),
            "growth_limit": GaugeMetricFamily(
                "thinblock_pool_growth_limit_bytes", "growth limit (when set)", labels=labels
            ),
        }
        state = GaugeMetricFamily(
            "thinblock_pool_state",
            "1 for the pool's current state, 0 for the others",
            labels=["pool", "state"],
        )
        for pool in self.engine.list_pools():
            for attr, family in families.items():
                value = getattr(pool, attr)
                if value is not None:
                    family.add_metric([pool.name], value)
            for s in PoolState:
                state.add_metric([pool.name, str(s)], 1 if pool.state == s else 0)
        yield from families.values()
        yield state

    def _pds(self) -> Iterable[Metric]:
        size = GaugeMetricFamily("thinblock_pd_size_bytes", "size of the PD", labels=["pd", "path"])
        chunklets = GaugeMetricFamily(
            "thinblock_pd_chunklets", "chunklets of the PD", labels=["pd", "path", "state"]
        )
        health = GaugeMetricFamily(
            "thinblock_pd_health",
            "1 for the PD's current health, 0 for the others",
            labels=["pd", "path", "health"],
        )
        for pd in self.engine.list_pds():
            key = [str(pd.id), pd.path]
            size.add_metric(key, pd.size)
            chunklets.add_metric([*key, "used"], pd.chunklets_used)
            chunklets.add_metric([*key, "free"], pd.chunklets_free)
            for h in PDHealth:
                health.add_metric([*key, str(h)], 1 if pd.health == h else 0)
        yield from (size, chunklets, health)

    def _lds(self) -> Iterable[Metric]:
        regions = GaugeMetricFamily(
            "thinblock_ld_regions", "LD regions by state", labels=["ld", "pool", "state"]
        )
        health = GaugeMetricFamily(
            "thinblock_ld_health",
            "1 for the LD's current health, 0 for the others",
            labels=["ld", "pool", "health"],
        )
        for ld in self.engine.list_lds():
            key = [str(ld.id), ld.pool]
            regions.add_metric([*key, "used"], ld.regions_used)
            regions.add_metric([*key, "free"], ld.regions - ld.regions_used)
            for h in LDHealth:
                health.add_metric([*key, str(h)], 1 if ld.health == h else 0)
        yield from (regions, health)

    def _alerts(self) -> Iterable[Metric]:
        counts = {(kind.value, state.value): 0 for kind in AlertKind for state in AlertState}
        for alert in self.engine.list_alerts(include_cleared=True):
            key = (str(alert.kind), str(alert.state))
            counts[key] = counts.get(key, 0) + 1
        family = GaugeMetricFamily("thinblock_alerts", "alerts by kind and state", labels=["kind", "state"])
        for (kind, state), n in sorted(counts.items()):
            family.add_metric([kind, state], n)
        yield family


# --- the forecast drawn from the daemon's history ------------------------------------------------


class ForecastCollector:
    """Allocation rate over the last hour and the estimated seconds to the warning and the limit,
    per pool and per volume (``thinblock.history``); a series is absent when there is nothing to
    forecast (no rate yet, not growing, no such threshold)."""

    def __init__(self, history: History) -> None:
        self.history = history

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        h = self.history
        engine = h.engine
        families = {}
        for scope, label in (("pool", ["pool"]), ("vv", ["vv", "pool"])):
            families[scope] = (
                GaugeMetricFamily(
                    f"thinblock_{scope}_alloc_rate_bytes_per_second",
                    f"{scope} allocation rate over the last hour (bytes per second)",
                    labels=label,
                ),
                GaugeMetricFamily(
                    f"thinblock_{scope}_seconds_to_warning",
                    f"estimated seconds until the {scope}'s warning is reached at that rate",
                    labels=label,
                ),
                GaugeMetricFamily(
                    f"thinblock_{scope}_seconds_to_limit",
                    f"estimated seconds until the {scope}'s limit is reached at that rate",
                    labels=label,
                ),
            )
        for p in engine.list_pools():
            f = h.pool_forecast(p.name, p.used, p.growth_warning, p.growth_limit)
            _add_forecast(families["pool"], [p.name], f)
        for v in engine.list_vvs():
            f = h.volume_forecast(v.name, v.allocated, v.alloc_warning, v.alloc_limit)
            _add_forecast(families["vv"], [v.name, v.pool], f)
        for trio in families.values():
            yield from trio


def _add_forecast(trio: tuple[GaugeMetricFamily, ...], key: list[str], forecast: Forecast) -> None:
    rate, to_warning, to_limit = trio
    if forecast.rate is not None:
        rate.add_metric(key, forecast.rate)
    if forecast.to_warning is not None:
        to_warning.add_metric(key, forecast.to_warning)
    if forecast.to_limit is not None:
        to_limit.add_metric(key, forecast.to_limit)


# --- latencies measured at the NBD front end -----------------------------------------------------


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0


class NBDCollector:
    """The NBD server's connections: open, accepted, refused by reason, closed for idling."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        from thinblock.netlimits import REFUSAL_REASONS

        stats = self._stats()
        open_ = GaugeMetricFamily("thinblock_nbd_connections", "NBD connections open")
        open_.add_metric([], stats["connections"])
        yield open_
        accepted = CounterMetricFamily("thinblock_nbd_connections_accepted", "NBD connections accepted")
        accepted.add_metric([], stats["connections_total"])
        yield accepted
        refused = CounterMetricFamily(
            "thinblock_nbd_connections_refused",
            "NBD connections refused: listener-limit, client-limit (per address), stopping",
            labels=["reason"],
        )
        for reason in REFUSAL_REASONS:
            refused.add_metric([reason], stats["refused"].get(reason, 0))
        yield refused
        idle = CounterMetricFamily("thinblock_nbd_idle_closed", "NBD connections closed by the idle timeout")
        idle.add_metric([], stats["idle_closed"])
        yield idle
        in_flight = GaugeMetricFamily(
            "thinblock_nbd_bytes_in_flight", "NBD request payload bytes in flight, all connections"
        )
        in_flight.add_metric([], stats["bytes_in_flight"])
        yield in_flight


class ISCSICollector:
    """The iSCSI target's sessions per volume and its connection counters."""

    def __init__(
        self, sessions: Callable[[], list[dict[str, Any]]], counters: Callable[[], dict[str, int]]
    ) -> None:
        self._sessions = sessions
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "thinblock_iscsi_sessions", "Logged-in iSCSI sessions by volume", labels=["vv"]
        )
        per_vv: dict[str, int] = {}
        for session in self._sessions():
            vv = session.get("vv") or ""
            per_vv[vv] = per_vv.get(vv, 0) + 1
        for vv, n in sorted(per_vv.items()):
            gauge.add_metric([vv], n)
        yield gauge
        counters = self._counters()
        total = CounterMetricFamily("thinblock_iscsi_connections", "iSCSI connections accepted since start")
        total.add_metric([], counters.get("connections_total", 0))
        yield total
        failed = CounterMetricFamily(
            "thinblock_iscsi_logins_failed", "iSCSI connections closed before their login finished"
        )
        failed.add_metric([], counters.get("logins_failed", 0))
        yield failed
        from thinblock.netlimits import REFUSAL_REASONS

        refused = CounterMetricFamily(
            "thinblock_iscsi_connections_refused",
            "iSCSI connections refused: listener-limit, client-limit (per address), stopping",
            labels=["reason"],
        )
        for reason in REFUSAL_REASONS:
            refused.add_metric([reason], counters.get(f"refused_{reason}", 0))
        yield refused


class LatencyRecorder:
    """Per volume and operation request latencies, exported as ``thinblock_vv_request_seconds``.

    ``live_volumes`` names the volumes that still exist: histograms of deleted ones are dropped
    at the next scrape."""

    def __init__(self, live_volumes: Callable[[], Iterable[str]]) -> None:
        self._live_volumes = live_volumes
        self._histograms: dict[tuple[str, str], _Histogram] = {}

    def observe(self, volume: str, op: str, seconds: float) -> None:
        histogram = self._histograms.get((volume, op))
        if histogram is None:
            histogram = self._histograms[(volume, op)] = _Histogram()
        histogram.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram.total += seconds

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(
            "thinblock_vv_request_seconds",
            "NBD request latency inside the server (engine call to completion), by volume and operation",
            labels=["vv", "op"],
        )
        live = set(self._live_volumes())
        for (volume, op), histogram in sorted(self._histograms.items()):
            if volume not in live:
                del self._histograms[(volume, op)]
                continue
            buckets: list[tuple[str, float]] = []
            cumulative = 0
            for bound, count in zip(LATENCY_BUCKETS, histogram.counts, strict=False):
                cumulative += count
                buckets.append((repr(bound), cumulative))
            cumulative += histogram.counts[-1]
            buckets.append(("+Inf", cumulative))
            family.add_metric([volume, op], buckets, histogram.total)
        yield family


class InstrumentedVolume:
    """A ``Volume`` that times every request into a LatencyRecorder, else passes through.

    Fast paths stay fast: each method is one coroutine awaiting the engine's, so a request
    that never suspends inside the engine never suspends here either (``start_eager``)."""

    __slots__ = ("_inner", "_recorder")

    def __init__(self, inner: Volume, recorder: LatencyRecorder) -> None:
        self._inner = inner
        self._recorder = recorder

    @property
    def _name(self) -> str:  # looked up at each request: a volume renamed while connected
        return self._inner.name

    @property
    def name(self) -> str:
        return self._inner.name

    @property
    def description(self) -> str:
        return self._inner.description

    @property
    def size(self) -> int:
        return self._inner.size

    @property
    def capabilities(self) -> Capabilities:
        return self._inner.capabilities

    def __getattr__(self, attr: str) -> Any:
        # Attributes beyond the Volume protocol (cache_mode, region_size...) go straight through;
        # every I/O method the NBD server calls is defined here and timed
        # (tests/e2e/test_nbd_latency.py sends every command and checks).
        return getattr(self._inner, attr)

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        t0 = time.perf_counter()
        try:
            return await self._inner.read(offset, length)
        finally:
            self._recorder.observe(self._name, "read", time.perf_counter() - t0)

    async def read_extents(self, offset: int, length: int) -> list[ReadPiece]:
        """The NBD server's read path (holes as holes): timed as a read (it used to pass through
        ``__getattr__`` untimed, so no NBD read was ever counted)."""
        t0 = time.perf_counter()
        try:
            return await self._inner.read_extents(offset, length)
        finally:
            self._recorder.observe(self._name, "read", time.perf_counter() - t0)

    async def read_spans(self, offset: int, length: int) -> list[SpanPiece]:
        """The NBD server's zero-copy read path (capabilities.file_spans): timed as a read."""
        inner: Any = self._inner  # read_spans is beyond the Volume protocol (capabilities.file_spans)
        t0 = time.perf_counter()
        try:
            pieces: list[SpanPiece] = await inner.read_spans(offset, length)
            return pieces
        finally:
            self._recorder.observe(self._name, "read", time.perf_counter() - t0)

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            await self._inner.write(offset, data, fua)
        finally:
            self._recorder.observe(self._name, "write", time.perf_counter() - t0)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False, fua: bool = False
    ) -> None:
        t0 = time.perf_counter()
        try:
            await self._inner.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)
        finally:
            self._recorder.observe(self._name, "write_zeroes", time.perf_counter() - t0)

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            await self._inner.trim(offset, length, fua)
        finally:
            self._recorder.observe(self._name, "trim", time.perf_counter() - t0)

    async def flush(self) -> None:
        t0 = time.perf_counter()
        try:
            await self._inner.flush()
        finally:
            self._recorder.observe(self._name, "flush", time.perf_counter() - t0)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        t0 = time.perf_counter()
        try:
            return await self._inner.block_status(offset, length)
        finally:
            self._recorder.observe(self._name, "block_status", time.perf_counter() - t0)

    async def cache(self, offset: int, length: int) -> None:
        t0 = time.perf_counter()
        try:
            await self._inner.cache(offset, length)
        finally:
            self._recorder.observe(self._name, "cache", time.perf_counter() - t0)

    def dirty_bitmap(self, name: str) -> DirtyBitmap:
        """A dirty bitmap (capabilities.dirty_bitmaps) whose status is timed as a block status."""
        inner: Any = self._inner  # beyond the Volume protocol (blockdev.BitmapVolume)
        return _TimedBitmap(inner.dirty_bitmap(name), self)


class _TimedBitmap:
    __slots__ = ("_inner", "_volume")

    def __init__(self, inner: DirtyBitmap, volume: InstrumentedVolume) -> None:
        self._inner = inner
        self._volume = volume

    @property
    def name(self) -> str:
        return self._inner.name

    async def status(self, offset: int, length: int) -> list[DirtyRun]:
        t0 = time.perf_counter()
        try:
            return await self._inner.status(offset, length)
        finally:
            self._volume._recorder.observe(self._volume._name, "block_status", time.perf_counter() - t0)


class InstrumentedProvider:
    """The VolumeProvider the daemon gives the NBD server: the engine's volumes, timed."""

    def __init__(self, inner: VolumeProvider, recorder: LatencyRecorder) -> None:
        self._inner = inner
        self._recorder = recorder

    def export_names(self) -> list[str]:
        return self._inner.export_names()

    def open_volume(self, name: str) -> Volume:
        return InstrumentedVolume(self._inner.open_volume(name), self._recorder)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)


# --- registry ------------------------------------------------------------------------------------


def build_registry(engine: Engine, node: NodeInfo, extra: Iterable[Any] = ()) -> CollectorRegistry:
    """A registry of its own per app (tests build many): engine state, extra collectors
    (webhook delivery, NBD latencies), and the process's CPU and memory."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, node))
    for collector in extra:
        registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(registry), CONTENT_TYPE_LATEST
