"""The node lease through the engine, on every backend: a second daemon with the same store and
node name refuses to start naming the first; a holder paused (SIGSTOP) past its lease, resumed,
writes nothing under its stale epoch (rows counted per epoch); a lost lease stops serving (every
request fails, clients are disconnected, an alert says so), found by the keeper's renewal or by
a metadata write the store refused; with a shared store the gate also closes at the local
deadline and opens again with a renewal.  (With real daemons and NBD clients:
tests/e2e/test_lease_fencing.py.)"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support.stores import StoreBackend
from thinblock.engine import Engine, EngineOptions
from thinblock.errors import Conflict, VolumeGone
from thinblock.units import KiB, MiB

OPTIONS = EngineOptions(allow_tiny_chunklets=True, destage_delay=0.001, node_name="n1")


async def test_a_second_daemon_with_the_same_store_and_node_name_refuses(
    backend: StoreBackend, tmp_path: Path
) -> None:
    first = await Engine.open(tmp_path / "a", OPTIONS, metadata=backend.url)
    try:
        with pytest.raises(Conflict, match=rf"node 'n1' is already served by .*:{tmp_path / 'a'}"):
            await Engine.open(tmp_path / "b", OPTIONS, metadata=backend.url)
        await first.create_pool("p", raid=0, set_size=1) if first.pds else None
    finally:
        await first.close()
    # Given up on a clean stop: the other place takes it at once, with the next epoch.
    second = await Engine.open(tmp_path / "b", OPTIONS, metadata=backend.url)
    assert second.lease is not None and second.lease.lease.epoch == 2
    await second.close()


_HOLDER = """
import asyncio, sys
from pathlib import Path
from thinblock.engine import Engine, EngineOptions
from thinblock.units import KiB, MiB

async def main() -> None:
    data, url = Path(sys.argv[1]), sys.argv[2]
    options = EngineOptions(allow_tiny_chunklets=True, destage_delay=0.001, node_name="n1", lease_ttl=3.0)
    engine = await Engine.open(data, options, metadata=url)
    for i in range(2):
        await engine.add_pd(data / f"pd{i}.img", size=256 * MiB, chunklet_size=1 * MiB)
    await engine.create_pool("p", raid=0, set_size=2, region_size=16 * KiB, growth_increment=16 * MiB, step=4 * KiB)
    await engine.create_vv("v", pool="p", size=4096 * MiB)
    vol = engine.volume("v")
    print("epoch", engine.lease.lease.epoch, flush=True)
    region = 0
    while True:
        try:
            await vol.write(region * 16 * KiB, b"x" * 512)
            print("ok", region, flush=True)
        except Exception as exc:
            print("error", type(exc).__name__, exc, flush=True)
        region += 1
        await asyncio.sleep(0.01)

asyncio.run(main())
"""


def test_a_holder_paused_past_its_lease_writes_nothing_under_its_old_epoch(
    backend: StoreBackend, tmp_path: Path
) -> None:
    (tmp_path / "data").mkdir()
    out = (tmp_path / "holder.out").open("w+")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path / "data"), backend.url],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    store = backend.open()
    try:
        deadline = time.monotonic() + 60
        while "ok 20" not in Path(out.name).read_text() and time.monotonic() < deadline:
            assert holder.poll() is None, Path(out.name).read_text()
            time.sleep(0.05)
        assert "ok 20" in Path(out.name).read_text(), Path(out.name).read_text()[-2000:]
        first_line = Path(out.name).read_text().splitlines()[0]
        assert first_line.startswith("epoch "), first_line
        old = int(first_line.split()[1])
        os.kill(holder.pid, signal.SIGSTOP)
        time.sleep(0.2)
        lines_at_stop = len(Path(out.name).read_text().splitlines())
        time.sleep(5.8)  # twice its time to live (3 s: a loaded machine renews late)
        taken = store.acquire_lease("node:n1", "the-new-owner", 30)
        assert taken is not None and taken.epoch == old + 1
        rows_then = store.map_rows_by_epoch().get(old, 0)
        assert rows_then >= 20
        os.kill(holder.pid, signal.SIGCONT)
        time.sleep(2.0)  # it resumes writing (and renewing)
        text = Path(out.name).read_text()
        after = text.splitlines()[lines_at_stop:]
        assert store.map_rows_by_epoch().get(old, 0) == rows_then, "rows written under the stale epoch"
        # Every write after the pause failed: refused by the store's fence (LeaseLost) or by the
        # closed serving gate (VolumeGone); none succeeded.
        assert after and not any(line.startswith("ok") for line in after), text[-2000:]
        assert any(line.startswith(("error LeaseLost", "error VolumeGone")) for line in after), text[-2000:]
        assert store.read_lease("node:n1") == taken
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait()
        store.close()
        out.close()


async def _serving_engine(backend: StoreBackend, tmp_path: Path) -> Engine:
    engine = await Engine.open(tmp_path / "a", OPTIONS, metadata=backend.url)
    for i in range(2):
        await engine.add_pd(tmp_path / "a" / f"pd{i}.img", size=64 * MiB, chunklet_size=1 * MiB)
    await engine.create_pool(
        "p", raid=0, set_size=2, region_size=16 * KiB, growth_increment=4 * MiB, step=4 * KiB
    )
    await engine.create_vv("v", pool="p", size=64 * MiB)
    await engine.volume("v").write(0, b"a" * 4096)  # region 0 assigned: overwrites need no metadata
    return engine


def _take_over(backend: StoreBackend) -> None:
    """Another holder takes node:n1 with the next epoch (what a takeover does once it expired)."""
    backend.sql("UPDATE leases SET holder='the-new-owner', epoch=epoch+1 WHERE name='node:n1'")


async def test_a_lost_lease_stops_serving_every_volume_and_disconnects_clients(
    backend: StoreBackend, tmp_path: Path
) -> None:
    engine = await _serving_engine(backend, tmp_path)
    try:
        vol = engine.volume("v")
        disconnected: list[str] = []
        engine.sessions.open("NBD", "v", "127.0.0.1:4000", lambda: disconnected.append("nbd"))
        engine.sessions.open("iSCSI", "v", "127.0.0.1:4001", lambda: disconnected.append("iscsi"))
        _take_over(backend)
        assert engine.lease is not None
        await engine.lease.renew_once()
        assert engine.lease.lost
        # An overwrite of an assigned region touches no metadata: only the gate refuses it.
        for request in (
            vol.write(0, b"b" * 4096),
            vol.read(0, 4096),
            vol.read_extents(0, 4096),
            vol.flush(),
            vol.trim(0, 16 * KiB),
            vol.block_status(0, 4096),
        ):
            with pytest.raises(VolumeGone, match="no longer served by this daemon: lease node:n1 lost"):
                await request
        assert sorted(disconnected) == ["iscsi", "nbd"]
        assert any(a.kind == "lease-lost" for a in engine.list_alerts())
    finally:
        await engine.close()


async def test_a_metadata_write_refused_for_a_lost_lease_stops_serving_at_once(
    backend: StoreBackend, tmp_path: Path
) -> None:
    engine = await _serving_engine(backend, tmp_path)  # lease_ttl 15 s: the keeper's tick is 5 s away
    try:
        vol = engine.volume("v")
        _take_over(backend)
        with pytest.raises(Exception, match="lease lost"):
            await vol.write(1 << 20, b"c" * 4096)  # a fresh region: the store refuses its assignment
        for _ in range(100):
            if engine.gate.closed():
                break
            await asyncio.sleep(0.02)
        assert engine.lease is not None and engine.lease.lost
        with pytest.raises(VolumeGone):
            await vol.write(0, b"b" * 4096)
        assert backend.sql("SELECT COUNT(*) FROM vv_map WHERE vv_region = 64") == [(0,)]
    finally:
        await engine.close()


async def test_the_local_deadline_closes_the_gate_only_with_a_shared_store(
    backend: StoreBackend, tmp_path: Path
) -> None:
    engine = await _serving_engine(backend, tmp_path)
    try:
        vol = engine.volume("v")
        if backend.kind == "sqlite":
            # The data directory's lock keeps other daemons out: no deadline, only a lost lease.
            assert engine.gate.deadline == math.inf
            return
        assert engine.gate.deadline < time.monotonic() + OPTIONS.lease_ttl
        engine.gate.deadline = time.monotonic() - 1  # as after a pause past 0.8 of the lease
        with pytest.raises(VolumeGone, match="lease was not renewed in time"):
            await vol.read(0, 4096)
        assert engine.lease is not None
        await engine.lease.renew_once()  # nobody took it: renewed with the same epoch, open again
        assert not engine.lease.lost and await vol.read(0, 4096) == b"a" * 4096
        await vol.write(0, b"d" * 4096)
    finally:
        await engine.close()


async def test_a_load_longer_than_the_lease_does_not_start_with_the_gate_closed(
    postgresql_backend: StoreBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The gate's deadline is PostgreSQL's (with SQLite only a lost lease closes it).
    backend = postgresql_backend
    engine = await _serving_engine(backend, tmp_path)
    await engine.close()
    slow_load = Engine._load

    async def load(self: Engine) -> None:
        await slow_load(self)
        time.sleep(1.5)  # a store of millions of regions on a busy machine: the loop held

    monkeypatch.setattr(Engine, "_load", load)
    engine = await Engine.open(tmp_path / "a", replace(OPTIONS, lease_ttl=1.5), metadata=backend.url)
    try:
        assert not engine.gate.closed()
        assert await engine.volume("v").read(0, 4096) == b"a" * 4096
    finally:
        await engine.close()
