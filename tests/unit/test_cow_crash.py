"""Crash points inside copy on write (volume/cow.py), with a real kill -9: after the reservation is
committed, after the copy is written, after the map switch.  At the next open every read returns
the old or the new data, never a mix; the snapshot keeps its data; no region is leaked (the
reservation is freed and zeroed, the space map equals the store's mappings); the store checks
clean."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.engine_helpers import CHUNKLET, REGION, STEP, make_engine, pattern
from tests.engine_machine import (
    assert_free_regions_hold_nothing,
    assert_space_map_matches_the_store,
)
from thinblock.engine import Engine, EngineOptions
from thinblock.metadata.check import check_store
from thinblock.metadata.sqlite import SQLiteStore

OPTIONS = EngineOptions(allow_tiny_chunklets=True, destage_delay=0.001)

CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from thinblock.engine import Engine, EngineOptions
    from thinblock.volume import cow

    data_dir, point = sys.argv[1], sys.argv[2]

    def crash(name: str) -> None:
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)

    async def main() -> None:
        engine = await Engine.open(data_dir, EngineOptions(allow_tiny_chunklets=True, destage_delay=0.001))
        cow.crash_point = crash
        await engine.volume("v").write(100, b"\\xee" * 300)
        print("not killed", flush=True)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("point", ["reserved", "copied", "switched"])
async def test_kill_9_inside_a_copy_on_write(tmp_path: Path, point: str) -> None:
    engine = await make_engine(tmp_path)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=4 * REGION)
    old = pattern(9, 2 * REGION)
    await engine.volume("v").write(0, old)
    await engine.snapshot_vv("v", "s")
    await engine.close()

    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), point], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stdout, child.stderr)

    store = SQLiteStore(tmp_path, create=False)
    try:  # what the crash left: the reservation until the switch, none after it
        left = store.load_reservations()
    finally:
        store.close()
    assert len(left) == (0 if point == "switched" else 1), left

    engine = await Engine.open(tmp_path, OPTIONS)
    try:
        assert engine.store.load_reservations() == [], "a reservation survived the open"
        new = bytearray(old)
        new[100:400] = b"\xee" * 300
        got = bytes(await engine.volume("v").read(0, 2 * REGION))
        assert got in (old, bytes(new)), "a mix of old and new data"
        if point != "switched":
            assert got == old  # the write never began
        assert bytes(await engine.volume("s").read(0, 2 * REGION)) == old
        assert_space_map_matches_the_store(engine)
        assert_free_regions_hold_nothing(engine)  # the reserved region was zeroed and is free
        assert check_store(engine.store) == []
        used = {p for vv in engine.vvs.values() for _, p in vv.map.items()}
        assert engine.get_pool("p").used == len(used) * REGION, "a region leaked"
        # The volume still copies on write and writes after the restart.
        await engine.volume("v").write(100, b"\xee" * 300)
        assert bytes(await engine.volume("v").read(0, 2 * REGION)) == bytes(new)
        assert bytes(await engine.volume("s").read(0, 2 * REGION)) == old
        assert_space_map_matches_the_store(engine)
    finally:
        await engine.close()
    assert Engine.check(tmp_path).ok
