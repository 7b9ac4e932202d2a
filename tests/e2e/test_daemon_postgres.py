"""The daemon on PostgreSQL when the database misbehaves: unreachable at start (one line naming
the URL without its password, exit 1), lost while serving (writes needing a new region fail
with EIO, reads and overwrites go on, an alert, and the daemon reconnects by itself), restarted
under load (``pg_ctl -m immediate``: the asynchronous commits it lost re-applied, nothing
acknowledged and flushed is lost, no region assigned twice).

Each test that stops the server starts a cluster of its own (tests/support/postgres.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.drills.nbd_client import NBD_EIO, NBDClient, NBDError
from tests.support.daemon import LOOPBACK, SMALL_CONFIG, THINBLOCK_MODULE, Daemon, start_daemon
from tests.support.postgres import LOSES_ASYNC_COMMITS, PostgresCluster, fresh_database, throwaway_cluster
from thinblock.units import MiB

pytestmark = pytest.mark.e2e

REGION = MiB  # SMALL_CONFIG's first-start pool: RAID 1, 1 MiB regions
# The load test's pool: four sparse 1 GiB PDs (RAID 1: 2,048 regions), a 1 GiB volume, writers
# paced to at most 400 fresh regions a second and kept below CAPACITY_REGIONS.
LOAD_CONFIG = SMALL_CONFIG.replace('pd_size = "64MiB"', 'pd_size = "1GiB"')
CAPACITY_REGIONS = 1000


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture
def losing_cluster() -> Iterator[PostgresCluster]:
    """A cluster whose immediate stop loses the asynchronous commits its WAL writer (frozen by
    the test) did not write."""
    with throwaway_cluster(LOSES_ASYNC_COMMITS) as cluster:
        yield cluster


def test_an_unreachable_database_at_start_is_one_line_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql://thinblock:s3cret@/nothing?host={tmp_path}&port=5"
    daemon = Daemon(tmp_path, config=SMALL_CONFIG, args=("--metadata", url), log_format="json")
    try:
        status, records = daemon.start_expecting_failure()
    finally:
        daemon.kill()
    assert status == 1
    failed = [r for r in records if r.get("event") == "startup-failed"]
    assert len(failed) == 1, records
    message = failed[0]["msg"]
    assert "postgresql://thinblock:***@/nothing" in message and "\n" not in message, message
    assert "s3cret" not in daemon.log_text()


def _block(tag: int, region: int) -> bytes:
    return bytes([tag]) * 4096 + region.to_bytes(8, "little") * 512


async def _write(client: NBDClient, region: int, tag: int) -> bool:
    """True when acknowledged; False on EIO (anything else fails the test)."""
    try:
        await client.write(region * REGION, _block(tag, region))
    except NBDError as exc:
        assert exc.errno == NBD_EIO, exc
        return False
    return True


def _check(daemon: Daemon, url: str) -> dict[str, object]:
    argv = [*THINBLOCK_MODULE, "check", "--json", "--data", str(daemon.data_dir), "--metadata", url]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    return dict(json.loads(result.stdout))


def _wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_database_lost_while_serving_then_back(tmp_path: Path, own_cluster: PostgresCluster) -> None:
    with fresh_database(own_cluster) as url:
        daemon = start_daemon(tmp_path, config=SMALL_CONFIG, args=("--metadata", url))
        try:
            asyncio.run(_lost_and_back(daemon, own_cluster))
            daemon.kill()
            again = start_daemon(tmp_path, config=SMALL_CONFIG, args=("--metadata", url))
            try:
                asyncio.run(_verify(again, {0: 1, 1: 1, 3: 3}, absent=[2]))
                assert again.stop() == 0
            finally:
                again.kill()
            report = _check(again, url)
            assert report["ok"], report
        finally:
            daemon.kill()


async def _lost_and_back(daemon: Daemon, cluster: PostgresCluster) -> None:
    async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, "vol0") as client:
        assert await _write(client, 0, 1) and await _write(client, 1, 1)
        await client.flush()
        cluster.stop("fast")
        try:
            assert not await _write(client, 2, 2), (
                "a write needing a new region was acknowledged without a store"
            )
            # Reads and overwrites of assigned regions go on.
            assert await client.read(0, 4104) == _block(1, 0)[:4104]
            assert await _write(client, 1, 1)
            kinds = [a["kind"] for a in daemon.alerts() if a["state"] != "cleared"]
            assert "metadata-unavailable" in kinds, kinds
        finally:
            cluster.start()
        # Back: the daemon reconnects by itself.
        for _ in range(50):
            if await _write(client, 3, 3):
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("fresh writes still fail after the database came back")
        await client.flush()
        assert "metadata-unavailable" not in [a["kind"] for a in daemon.alerts() if a["state"] != "cleared"]
        assert "metadata-reconnected" in [a["kind"] for a in daemon.alerts()]
        assert "reachable again" in daemon.log_text() or "accepts writes again" in daemon.log_text()


async def _verify(daemon: Daemon, image: dict[int, int], absent: list[int]) -> None:
    async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, "vol0") as client:
        for region, tag in image.items():
            assert await client.read(region * REGION, 4104) == _block(tag, region)[:4104], region
        for region in absent:
            assert await client.read(region * REGION, 4104) == bytes(4104), region


def test_database_restarted_under_load_loses_nothing_flushed(
    tmp_path: Path, losing_cluster: PostgresCluster
) -> None:
    """``pg_ctl -m immediate`` under a load of fresh writes, the WAL writer frozen just before:
    the server loses the assignments committed asynchronously since its last synchronous commit
    (a lease renewal may fall in between: how many it loses varies, so the daemon's count of
    rows restored is not asserted here; tests/contract/test_postgres_async_commit.py shows the
    loss for certain), the daemon re-applies them before anything else, and the flush after
    covers them.  Without the re-application, regions acknowledged before the flush read zeros
    after the restart."""
    with fresh_database(losing_cluster) as url:
        daemon = start_daemon(tmp_path, config=LOAD_CONFIG, args=("--metadata", url))
        try:
            image = asyncio.run(_load_across_a_restart(daemon, losing_cluster))
            daemon.kill()
            again = start_daemon(tmp_path, config=LOAD_CONFIG, args=("--metadata", url))
            try:
                asyncio.run(_verify(again, image, absent=[]))
                assert again.stop() == 0
            finally:
                again.kill()
            report = _check(again, url)
            assert report["ok"], report  # the check refuses a region assigned twice
            import psycopg

            with psycopg.connect(url) as conn:
                twice = conn.execute(
                    "SELECT ld_id, ld_region FROM vv_map GROUP BY ld_id, ld_region HAVING COUNT(*) > 1"
                ).fetchall()
            assert twice == []
        finally:
            daemon.kill()


async def _load_across_a_restart(daemon: Daemon, cluster: PostgresCluster) -> dict[int, int]:
    """Four writers on fresh regions while the server restarts; returns what was acknowledged
    before the final flush."""
    image: dict[int, int] = {}
    clients = [await NBDClient.connect(LOOPBACK, daemon.nbd_port, "vol0") for _ in range(4)]
    stop = asyncio.Event()
    failed = 0

    async def writer(client: NBDClient, first: int) -> None:
        nonlocal failed
        region = first
        while not stop.is_set():
            if region >= CAPACITY_REGIONS:  # the pool's PDs hold no more; wait for the end
                await asyncio.sleep(0.05)
                continue
            if await _write(client, region, 5):
                image[region] = 5
            else:
                failed += 1
            region += 4
            await asyncio.sleep(0.01)

    try:
        tasks = [asyncio.create_task(writer(c, i)) for i, c in enumerate(clients)]
        await asyncio.sleep(0.7)
        # From here the server writes the WAL of an asynchronous commit only with a synchronous
        # one (a lease renewal): the immediate stop loses whatever came after the last of those.
        await asyncio.to_thread(cluster.freeze_wal_writer)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(cluster.crash, start=False)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.start)
        at_restart = len(image)
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*tasks)
        await clients[0].flush()
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()
    # Writes waiting for the store while it was away either failed (EIO, never acknowledged) or
    # went through once it was back; writing went on after the restart.
    assert len(image) > at_restart > 0, (len(image), at_restart, failed)
    return image
