"""The metadata writer (metadata/writer.py): group commit, order, errors, on the loop and on its
own thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from thinblock.errors import MetadataStoreFull
from thinblock.metadata.sqlite import SQLiteStore
from thinblock.metadata.store import LDRow, PoolRow, VVRow
from thinblock.metadata.writer import MetadataWriter

MiB = 1 << 20


def _store(tmp_path: Path) -> tuple[SQLiteStore, int, int]:
    store = SQLiteStore(tmp_path)
    pd = store.add_pd("/dev/a", 64 * MiB, 16 * MiB)
    pool = store.add_pool(PoolRow(0, "p", 0, 1, 4096, MiB, 16 * MiB, None, None))
    ld = store.add_ld(LDRow(0, pool, 0, 1, 4096, MiB, 16, {(0, 0): (pd, 0)}))
    vv = store.add_vv(VVRow(0, "v", pool, 16 * MiB, None, None, None, None, "writethrough", 0.0))
    return store, ld, vv


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "thread"])
async def test_assignments_of_one_turn_are_one_group_and_calls_keep_their_order(
    tmp_path: Path, threaded: bool
) -> None:
    store, ld, vv = _store(tmp_path)
    writer = MetadataWriter(store, asyncio.get_running_loop(), threaded=threaded)
    futures = [writer.assign(vv, r, ld, r) for r in range(8)]
    unassigned = writer.call(store.unassign, vv, [0, 1])  # queued after the assignments
    assert not any(f.done() for f in futures), "nothing is committed inside the caller's turn"
    await asyncio.gather(*futures)
    assert await unassigned == 2
    assert writer.groups == 1
    assert sorted(store.map_array()[:, 1].tolist()) == list(range(2, 8))
    await writer.close()
    store.close()


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "thread"])
async def test_a_refused_group_fails_each_of_its_futures_and_recovery_is_reported(
    tmp_path: Path, threaded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, ld, vv = _store(tmp_path)
    events: list[str] = []
    writer = MetadataWriter(
        store,
        asyncio.get_running_loop(),
        threaded=threaded,
        on_trouble=lambda exc: events.append(f"trouble {type(exc).__name__}"),
        on_recovered=lambda: events.append("recovered"),
    )
    real = store.assign_many

    def full(rows: list[tuple[int, int, int, int]]) -> None:
        raise MetadataStoreFull("metadata store is full (test)")

    monkeypatch.setattr(store, "assign_many", full)
    futures = [writer.assign(vv, r, ld, r) for r in range(3)]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, MetadataStoreFull) for r in results)
    assert store.map_array().size == 0
    assert events == ["trouble MetadataStoreFull"]
    monkeypatch.setattr(store, "assign_many", real)
    await writer.assign(vv, 0, ld, 0)
    assert events == ["trouble MetadataStoreFull", "recovered"]
    await writer.close()
    store.close()


async def test_an_off_loop_call_on_a_local_store_runs_on_the_thread_in_its_queue_order(
    tmp_path: Path,
) -> None:
    """A long call (``off_loop``: a snapshot's map copy) runs on the writer's thread even on
    SQLite, the loop free meanwhile; what was queued before it runs before it, what after, after."""
    store, ld, vv = _store(tmp_path)
    writer = MetadataWriter(store, asyncio.get_running_loop())  # SQLite: inline by default
    order: list[str] = []
    release = threading.Event()

    def long_call() -> str:
        order.append("long")
        release.wait(30)  # held until the loop has run meanwhile (never, were it run on the loop)
        return threading.current_thread().name

    before = writer.assign(vv, 0, ld, 0)
    long = writer.call(long_call, off_loop=True)
    after = writer.call(lambda: order.append("after"))
    while not order:  # until the long call has started: the loop turns meanwhile
        await asyncio.sleep(0.001)
    assert not long.done() and order == ["long"], "the loop runs while the long call holds the queue"
    release.set()
    await before
    assert (await long).startswith("thinblock-metadata")
    await after
    assert order == ["long", "after"]
    assert store.map_array()[:, 1].tolist() == [0]
    # Groups without a long call run inline again.
    thread_names: list[str] = []
    await writer.call(lambda: thread_names.append(threading.current_thread().name))
    assert thread_names == [threading.main_thread().name]
    await writer.close()
    store.close()
