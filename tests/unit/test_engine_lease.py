"""The node lease through the engine, on every backend: a second daemon with the same store and
node name refuses to start naming the first; a holder paused (SIGSTOP) past its lease, resumed,
writes nothing under its stale epoch (rows counted per epoch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.stores import StoreBackend
from thinblock.engine import Engine, EngineOptions
from thinblock.errors import Conflict

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
    options = EngineOptions(allow_tiny_chunklets=True, destage_delay=0.001, node_name="n1", lease_ttl=1.0)
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
        first_line = Path(out.name).read_text().splitlines()[0]
        assert first_line.startswith("epoch "), first_line
        old = int(first_line.split()[1])
        os.kill(holder.pid, signal.SIGSTOP)
        time.sleep(2.0)  # twice its time to live
        taken = store.acquire_lease("node:n1", "the-new-owner", 30)
        assert taken is not None and taken.epoch == old + 1
        rows_then = store.map_rows_by_epoch().get(old, 0)
        assert rows_then >= 20
        os.kill(holder.pid, signal.SIGCONT)
        time.sleep(1.5)  # it resumes writing (and renewing)
        text = Path(out.name).read_text()
        after = text.split("\n")[-50:]
        assert store.map_rows_by_epoch().get(old, 0) == rows_then, "rows written under the stale epoch"
        assert any(line.startswith("error LeaseLost") for line in after), text[-2000:]
        assert store.read_lease("node:n1") == taken
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait()
        store.close()
        out.close()
