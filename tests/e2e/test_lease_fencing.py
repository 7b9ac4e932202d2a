"""The issue's lease drill with a real daemon on a throwaway PostgreSQL database: daemon A
serves node n1 to an NBD client; A is paused (SIGSTOP) past its lease while the client has
requests in flight; a second holder takes the lease with the next epoch and writes under it;
A is resumed (SIGCONT).  Then:

* zero map rows were written under A's epoch after the pause (rows counted per epoch);
* every request A got after the pause failed (EIO) or lost its connection: no stale success,
  not even an overwrite of an assigned region (which needs no metadata write);
* A says so: a ``lease-lost`` alert and a ``serving-stopped`` log line;
* the data directory, served again once the second holder let go, holds what A acknowledged
  before the pause, untouched by A's stale requests.

The second holder is the store itself (``acquire_lease`` from the test), not a second daemon: a
daemon on this machine cannot open A's PD files while A lives, paused or not (each PD file is
locked by the process that serves it), which is a fence of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from tests.drills.nbd_client import NBD_EIO, ConnectionLost, NBDClient, NBDError
from tests.support.daemon import LOOPBACK, SMALL_CONFIG, Daemon, start_daemon
from tests.support.postgres import PostgresCluster, fresh_database
from thinblock.metadata import open_store
from thinblock.metadata.store import MetadataStore
from thinblock.units import MiB

pytestmark = pytest.mark.e2e

LEASE_TTL = 3.0  # renewed every second; the gate closes 2.4 s after a renewal was sent
CONFIG = SMALL_CONFIG + f'\n[node]\nname = "n1"\nlease_ttl = {LEASE_TTL}\n'
REGION = MiB  # SMALL_CONFIG's pool: 1 MiB regions, 8 in its first LD
WRITTEN = 6  # regions A writes before the pause
T = TypeVar("T")


class _ClientLoop:
    """An event loop on a thread of its own for the NBD clients, so that the test's own thread
    starts, pauses and stops the daemons (the launcher ties each daemon to the thread that
    started it) while requests stay in flight."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def client_loop() -> Iterator[_ClientLoop]:
    loop = _ClientLoop()
    try:
        yield loop
    finally:
        loop.close()


def _block(tag: int) -> bytes:
    return bytes([tag]) * 4096


def _rows_by_epoch(url: str) -> dict[int | None, int]:
    with psycopg.connect(url) as conn:
        return {e: int(n) for e, n in conn.execute("SELECT epoch, COUNT(*) FROM vv_map GROUP BY epoch")}


def _lease(url: str) -> tuple[str, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT holder, epoch FROM leases WHERE name='node:n1'").fetchone()
    assert row is not None
    return str(row[0]), int(row[1])


async def _outcome(request: Coroutine[Any, Any, Any]) -> str:
    """ok, EIO, or lost (the connection ended); anything else fails the test."""
    try:
        await asyncio.wait_for(request, 30)
    except NBDError as exc:
        assert exc.errno == NBD_EIO, exc
        return "EIO"
    except (ConnectionLost, ConnectionError, asyncio.IncompleteReadError):
        return "lost"
    return "ok"


def test_a_paused_holder_resumed_after_a_takeover_writes_and_answers_nothing(
    tmp_path: Path, postgres_cluster: PostgresCluster, client_loop: _ClientLoop
) -> None:
    with fresh_database(postgres_cluster) as url:
        a = start_daemon(tmp_path / "a", config=CONFIG, args=("--metadata", url))
        new_owner = open_store(url)
        try:
            _pause_and_take_over(a, url, new_owner, client_loop)
        finally:
            if a.running:
                os.kill(a.pid, signal.SIGCONT)
            a.kill()
            new_owner.close()
        # The data directory again (A's place takes the lease back, epoch + 2): what A
        # acknowledged before the pause, and nothing of its stale requests.
        again = start_daemon(tmp_path / "a", config=CONFIG, args=("--metadata", url))
        try:
            check = client_loop.run(NBDClient.connect(LOOPBACK, again.nbd_port, "vol0"))
            for region in range(WRITTEN):
                assert client_loop.run(check.read(region * REGION, 4096)) == _block(0x10 + region), region
            assert client_loop.run(check.read(20 * REGION, 4096)) == bytes(4096)
            client_loop.run(check.close())
            assert again.stop() == 0
        finally:
            again.kill()


def _pause_and_take_over(a: Daemon, url: str, new_owner: MetadataStore, client_loop: _ClientLoop) -> None:
    client = client_loop.run(NBDClient.connect(LOOPBACK, a.nbd_port, "vol0"))
    for region in range(WRITTEN):
        client_loop.run(client.write(region * REGION, _block(0x10 + region)))
    client_loop.run(client.flush())
    _holder, epoch_a = _lease(url)
    assert _rows_by_epoch(url).get(epoch_a) == WRITTEN

    os.kill(a.pid, signal.SIGSTOP)
    try:
        rows_at_pause = _rows_by_epoch(url).get(epoch_a, 0)
        # Requests sent to the paused daemon: an overwrite of an assigned region (no
        # metadata needed), a write into a fresh region, a read, a flush.
        stale = [
            client_loop.submit(_outcome(client.write(0, _block(0xEE)))),
            client_loop.submit(_outcome(client.write(20 * REGION, _block(0xEF)))),
            client_loop.submit(_outcome(client.read(REGION, 4096))),
            client_loop.submit(_outcome(client.flush())),
        ]
        time.sleep(1.5 * LEASE_TTL)  # past A's lease in the store's clock
        taken = new_owner.acquire_lease("node:n1", "the-new-owner", 60.0)
        assert taken is not None and taken.epoch == epoch_a + 1
        new_owner.bind_lease(taken)
        vv = new_owner.load_vvs()[0]
        ld = new_owner.load_lds()[0]
        new_owner.assign_many([(vv.id, 1000, ld.id, ld.regions - 1)])  # the new owner writes
    finally:
        os.kill(a.pid, signal.SIGCONT)

    outcomes = [f.result(60) for f in stale]
    assert "ok" not in outcomes, outcomes
    after = client_loop.run(_outcome(client.write(REGION, _block(0xED))))
    assert after in ("EIO", "lost"), after
    deadline = time.monotonic() + 30
    while not a.events("serving-stopped") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert a.events("serving-stopped"), a.log_tail()
    assert "lease-lost" in [alert["kind"] for alert in a.alerts()]
    time.sleep(LEASE_TTL)  # A's keeper ticks again: it must not take the lease back
    assert new_owner.read_lease("node:n1") == taken

    rows = _rows_by_epoch(url)
    assert rows.get(epoch_a, 0) == rows_at_pause == WRITTEN, rows  # zero rows under the stale epoch
    assert rows.get(epoch_a + 1) == 1, rows
    client.abort()
    new_owner.unassign(vv.id, [1000])
    new_owner.release_lease(taken)
