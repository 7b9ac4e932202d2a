"""Store calls made while serving run off the event loop: with a remote store each one is a round
trip, and the loop serves every connection.  A store whose generation bump (pdheaders.py) takes
long must not stop the loop from answering meanwhile; on PostgreSQL, alerts (raised, acknowledged)
and the question who took a lost lease reach the store from the metadata writer's thread or a
worker thread, never the loop's, and an alert whose row takes seconds does not hold the loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.engine_helpers import REGION, STEP, make_engine, pattern
from tests.support.postgres import PostgresCluster, fresh_database
from thinblock.engine import Engine, EngineOptions
from thinblock.metadata.store import MetadataStore
from thinblock.pdheaders import GENERATION_KEY
from thinblock.units import KiB, MiB


async def test_the_generation_bump_of_a_flush_does_not_stall_the_loop(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path)
    try:
        await engine.create_pool("p", raid=0, set_size=2, region_size=REGION, growth_increment=MiB, step=STEP)
        await engine.create_vv("v", pool="p", size=16 * MiB)
        await engine.volume("v").write(0, b"x" * 4096)  # the store changed: the flush bumps
        store = engine.store
        slow_set_meta = store.set_meta
        release = threading.Event()
        bump_threads: list[str] = []

        def set_meta(key: str, value: str) -> None:
            if key == GENERATION_KEY:  # a slow round trip to the store
                bump_threads.append(threading.current_thread().name)
                release.wait(10)
            slow_set_meta(key, value)

        store.set_meta = set_meta  # type: ignore[method-assign]
        flush = asyncio.ensure_future(engine.flush_all())
        # The loop keeps turning while the bump waits (a bump on the loop would block it here
        # until the release, and be recorded on the main thread).
        began = time.monotonic()
        while not bump_threads and time.monotonic() - began < 10:
            await asyncio.sleep(0.01)
        assert bump_threads, "the flush did not bump the generation"
        assert threading.main_thread().name not in bump_threads, bump_threads
        await asyncio.sleep(0.2)
        assert not flush.done()  # still waiting for the store, without holding the loop
        release.set()
        await flush
        assert store.get_meta(GENERATION_KEY) == str(engine.headers.generation)
    finally:
        await engine.close()


OPTIONS = EngineOptions(allow_tiny_chunklets=True, destage_delay=0.001, node_name="n1")
WATCHED = ("add_alert", "set_alert_state", "read_lease")


class ThreadWatch:
    """Wraps the store's methods named in WATCHED: records each call's thread."""

    def __init__(self, store: MetadataStore, loop_thread: threading.Thread) -> None:
        self.loop_thread = loop_thread
        self.calls: dict[str, int] = dict.fromkeys(WATCHED, 0)
        self.on_loop: list[str] = []
        self.before: dict[str, Callable[[], None]] = {}
        for name in WATCHED:
            setattr(store, name, self._wrap(name, getattr(store, name)))

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def watched(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if threading.current_thread() is self.loop_thread:
                self.on_loop.append(name)  # asserted by the test: raising here would be swallowed
            if name in self.before:
                self.before[name]()
            return method(*args, **kwargs)

        return watched


async def _mirrored_on_postgres(tmp_path: Path, url: str) -> Engine:
    engine = await Engine.open(tmp_path / "a", OPTIONS, metadata=url)
    for i in range(2):
        await engine.add_pd(tmp_path / "a" / f"pd{i}.img", size=64 * MiB, chunklet_size=1 * MiB)
    await engine.create_pool("p", raid=1, region_size=16 * KiB, growth_increment=1 * MiB, step=4 * KiB)
    await engine.create_vv("v", pool="p", size=1 * MiB)
    await engine.volume("v").write(0, pattern(1, 64 * KiB))
    return engine


async def test_alerts_pd_failures_and_a_lost_lease_reach_the_store_off_the_loop(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    with fresh_database(postgres_cluster) as url:
        engine = await _mirrored_on_postgres(tmp_path, url)
        try:
            watch = ThreadWatch(engine.store, threading.current_thread())
            await engine.fail_pd(1)  # pd-failed and ld-degraded raised
            pd_alert = next(a for a in engine.list_alerts() if a.kind == "pd-failed")
            engine.ack_alert(pd_alert.id)  # set_alert_state
            await engine.meta.drain()
            assert engine.store.load_pds()[0].health == "failed"
            stored = {a.id: a for a in engine.store.load_alerts()}
            assert stored[pd_alert.id].state == "acknowledged"
            assert {"pd-failed", "ld-degraded"} <= {a.kind for a in stored.values()}
            # Another holder takes the lease: the keeper finds it lost and asks who has it.
            import psycopg

            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("UPDATE leases SET holder='the-new-owner', epoch=epoch+1 WHERE name='node:n1'")
            assert engine.lease is not None
            await engine.lease.renew_once()
            assert engine.lease.lost and "the-new-owner" in (engine.gate.lost or "")
            await engine.meta.drain()
            assert all(watch.calls[name] > 0 for name in WATCHED), watch.calls
            assert watch.on_loop == [], f"store calls made on the event loop: {watch.on_loop}"
        finally:
            await engine.close()


async def test_an_alert_whose_row_takes_seconds_does_not_hold_the_loop(
    postgres_cluster: PostgresCluster, tmp_path: Path
) -> None:
    with fresh_database(postgres_cluster) as url:
        engine = await _mirrored_on_postgres(tmp_path, url)
        release = threading.Event()
        try:
            watch = ThreadWatch(engine.store, threading.current_thread())
            watch.before["add_alert"] = lambda: release.wait(10)  # a slow round trip
            vol = engine.volume("v")
            await engine.fail_pd(1)  # returns with its alerts raised, their rows not stored yet
            assert {"pd-failed", "ld-degraded"} <= {a.kind for a in engine.list_alerts()}
            began = time.monotonic()
            while watch.calls["add_alert"] == 0 and time.monotonic() - began < 10:
                await asyncio.sleep(0.01)
            assert watch.calls["add_alert"] == 1
            # The loop serves meanwhile: a write and a read of the degraded volume.
            await vol.write(0, pattern(2, 16 * KiB))
            assert bytes(await vol.read(0, 16 * KiB)) == pattern(2, 16 * KiB)
            assert not [a for a in engine.store.load_alerts() if a.kind == "pd-failed"]
            release.set()
            await engine.meta.drain()
            assert {"pd-failed", "ld-degraded"} <= {a.kind for a in engine.store.load_alerts()}
            assert watch.on_loop == [], f"store calls made on the event loop: {watch.on_loop}"
        finally:
            release.set()
            await engine.close()
