"""Store calls a flush makes run off the event loop: with a remote store each one is a round
trip, and the loop serves every connection.  A store whose generation bump (pdheaders.py) takes
long must not stop the loop from answering meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from tests.engine_helpers import REGION, STEP, make_engine
from thinblock.pdheaders import GENERATION_KEY
from thinblock.units import MiB


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
        loop = asyncio.get_running_loop()
        flush = asyncio.ensure_future(engine.flush_all())
        # The loop keeps turning while the bump waits: 20 ticks of 10 ms.
        began = time.monotonic()
        ticks = 0
        while not bump_threads and time.monotonic() - began < 10:
            await asyncio.sleep(0.01)
        for _ in range(20):
            await asyncio.sleep(0.01)
            ticks += 1
        assert bump_threads, "the flush did not bump the generation"
        assert threading.main_thread().name not in bump_threads, bump_threads
        assert not flush.done()  # still waiting for the store, without holding the loop
        release.set()
        await flush
        assert ticks == 20 and loop.is_running()
        assert store.get_meta(GENERATION_KEY) == str(engine.headers.generation)
    finally:
        await engine.close()
