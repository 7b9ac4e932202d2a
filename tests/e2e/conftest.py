"""Fixtures of the e2e suite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from thinblock.engine import Engine, EngineOptions
from thinblock.nbd.server import NBDServer

from .snapshot_fixtures import REGION, SIZE, MiB


@pytest.fixture
async def snapshots_served(tmp_path: Path) -> AsyncIterator[tuple[Engine, NBDServer]]:
    """The engine and NBD server the snapshot and backup tests share: a RAID 1 pool of 64 KiB
    regions over two PDs, a 16 MiB volume ``v``, served over NBD on a free port with the engine's
    session registry (as the daemon wires it); the store is checked after the test."""
    engine = await Engine.open(tmp_path / "engine", EngineOptions(allow_tiny_chunklets=True))
    try:
        for i in range(2):
            await engine.add_pd(tmp_path / "engine" / f"pd{i}.img", size=128 * MiB, chunklet_size=MiB)
        await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=16 * MiB, step=4096)
        await engine.create_vv("v", pool="p", size=SIZE)
        server = NBDServer(engine, sessions=engine.sessions)
        await server.start("127.0.0.1", 0)
        try:
            yield engine, server
        finally:
            await server.stop()
    finally:
        await engine.close()
    report = Engine.check(tmp_path / "engine")
    assert report.ok, report.problems
