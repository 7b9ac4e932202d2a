"""A member failure is never forgotten (issue 10 case 1; failures.py, pdheaders.py).

The store refusing to record a failure (its file system full) is simulated by making
``set_pd_health`` raise what SQLite raises then; everything else is real: files, SQLite, the
PD headers on disk."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from tests.engine_helpers import CHUNKLET, REGION, STEP, make_engine, pattern, reopen
from thinblock import failures
from thinblock.engine import Engine
from thinblock.errors import MediumError, MetadataCorrupt
from thinblock.metadata.sqlite import SQLiteStore
from thinblock.model import PDHealth


async def mirrored(tmp_path: Path) -> Engine:
    engine = await make_engine(tmp_path, pds=2)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=CHUNKLET)
    await engine.volume("v").write(0, pattern(1, CHUNKLET))
    await engine.flush_all()
    return engine


def store_full(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pd_id: int, health: str) -> None:
        raise MetadataCorrupt(f"{engine.store.path}: database or disk is full")

    monkeypatch.setattr(engine.store, "set_pd_health", refuse)


def store_health(data_dir: Path) -> dict[int, str]:
    store = SQLiteStore(data_dir, create=False)
    try:
        return {row.id: row.health for row in store.load_pds()}
    finally:
        store.close()


async def test_writes_are_refused_until_the_failure_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(failures, "RETRY_SECONDS", 0.05)
    engine = await mirrored(tmp_path)
    vol = engine.volume("v")
    store_full(engine, monkeypatch)
    await engine.fail_pd(1)
    # Not recorded: nothing more is acknowledged on the LD; reads are served (from PD 2).
    with pytest.raises(MediumError, match="not recorded yet"):
        await vol.write(0, pattern(2, REGION))
    assert bytes(await vol.read(REGION, REGION)) == pattern(1, CHUNKLET)[REGION : 2 * REGION]
    assert not [a for a in engine.list_alerts() if a.object == "pd:1"]
    # ... and the record is on the surviving PD's header already.
    header = engine.pds[2].read_header()
    assert header is not None and header.failed_pds == {1} and header.events == 1
    await asyncio.sleep(0.2)  # retries keep failing
    with pytest.raises(MediumError):
        await vol.write(0, pattern(2, REGION))
    # Space back: the next retry lands, writes are accepted, the alert is raised.
    monkeypatch.undo()
    monkeypatch.setattr(failures, "RETRY_SECONDS", 0.05)
    await asyncio.sleep(0.3)
    await vol.write(0, pattern(3, REGION))
    await engine.flush_all()
    assert bytes(await vol.read(0, REGION)) == pattern(3, REGION)
    assert [a.kind.value for a in engine.list_alerts() if a.object == "pd:1"] == ["pd-failed"]
    await engine.close()
    assert store_health(tmp_path)[1] == PDHealth.FAILED.value


async def test_a_failure_the_store_never_heard_of_is_found_in_the_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store says "normal" (its update was lost), the survivors' headers say "failed": at
    open the PD is failed, and an unclean start's resync does not copy it over the good mirror."""
    engine = await mirrored(tmp_path)
    store_full(engine, monkeypatch)
    await engine.fail_pd(1)
    # A write that reached the surviving mirror only (as one in flight at the failure does).
    packed = engine.vvs["v"].map.get(0)
    ld = engine.lds[packed >> 32]
    good = next(ch for ch in ld.rows[0] if ch.pd.id == 2)
    good.pd.pwrite(good.offset + (packed & 0xFFFFFFFF) * REGION, pattern(9, REGION))
    monkeypatch.undo()
    await engine.close()
    assert store_health(tmp_path)[1] == PDHealth.NORMAL.value  # the store never heard of it
    # An unclean stop: the next open resynchronises the mirrors.
    db = SQLiteStore(tmp_path)
    db.set_meta("clean", "0")
    db.close()
    engine = await Engine.open(tmp_path, engine.options)
    try:
        assert engine.pds[1].failed and "failure record" in str(engine.pds[1].failure_reason)
        assert bytes(await engine.volume("v").read(0, REGION)) == pattern(9, REGION)
        assert {a.object for a in engine.list_alerts() if a.kind.value == "pd-failed"} == {"pd:1"}
    finally:
        await engine.close()
    assert store_health(tmp_path)[1] == PDHealth.FAILED.value


async def test_headers_name_the_failed_pds_and_forget_removed_ones(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path, pds=3)
    await engine.fail_pd(3)
    for pd_id in (1, 2):
        header = engine.pds[pd_id].read_header()
        assert header is not None and header.failed_pds == {3} and header.events == 1
    await engine.remove_pd(3)
    for pd_id in (1, 2):
        header = engine.pds[pd_id].read_header()
        assert header is not None and header.failed_pds == set() and header.events == 2
    engine = await reopen(engine)
    try:
        assert not any(pd.failed for pd in engine.pds.values())
        # a new PD may get the removed one's id: it is not taken for the failed one
        await engine.add_pd(tmp_path / "new.img", size=4 * CHUNKLET, chunklet_size=CHUNKLET)
    finally:
        await engine.close()
    engine = await reopen(engine)
    try:
        assert not any(pd.failed for pd in engine.pds.values())
    finally:
        await engine.close()


# --- a full host file system (issue 10 case 5) ---------------------------------------------------


async def test_a_full_host_file_system_is_out_of_space_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from thinblock.errors import OutOfSpace
    from thinblock.physical import pd as pd_module

    engine = await mirrored(tmp_path)
    await engine.create_vv("w", pool="p", size=CHUNKLET)
    vol = engine.volume("w")
    await vol.write(0, pattern(2, REGION))  # one region assigned before the host fills up

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd_module, "fallocate_space", full)
    used = engine.get_pool("p").used
    with pytest.raises(OutOfSpace, match="host file system") as caught:
        await vol.write(REGION, pattern(3, REGION))  # needs a new region: refused at assignment
    assert caught.value.reason == "pd-host-full"
    assert engine.get_pool("p").used == used, "the refused region stayed assigned"
    assert not any(pd.failed for pd in engine.pds.values())
    await vol.write(0, pattern(4, REGION))  # an assigned region takes writes
    assert bytes(await vol.read(0, REGION)) == pattern(4, REGION)
    assert bytes(await engine.volume("v").read(0, CHUNKLET)) == pattern(1, CHUNKLET)
    await asyncio.sleep(0)  # the alert is raised on the loop
    assert {a.object for a in engine.list_alerts() if a.kind.value == "pd-host-full"}
    monkeypatch.undo()
    engine.pd_watch.clear_host_full()  # what the periodic PD check does: room is back
    assert not [a for a in engine.list_alerts() if a.kind.value == "pd-host-full"]
    await vol.write(REGION, pattern(3, REGION))
    await engine.flush_all()
    assert bytes(await vol.read(REGION, REGION)) == pattern(3, REGION)
    await engine.close()


def allocated_bytes(engine: Engine) -> int:
    return sum(os.stat(pd.path).st_blocks * 512 for pd in engine.pds.values())


@pytest.mark.parametrize("raid", [0, 1, 5])
@pytest.mark.parametrize("refusal", ["store full", "a member's file system full"])
async def test_a_refused_assignment_gives_its_host_blocks_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raid: int, refusal: str
) -> None:
    """A fresh region is given real blocks on every member (``Pool.provision``) before its
    assignment is committed.  Refused -- the store cannot commit it, or a later member's file
    system is full -- the region goes back to the free list: its blocks must go back to the
    host as well, or every refused write eats space on a file system that is already full."""
    from thinblock.errors import MetadataStoreFull, OutOfSpace
    from thinblock.physical import pd as pd_module

    engine = await make_engine(tmp_path, pds=3)
    await engine.create_pool(
        "p",
        raid=raid,
        set_size=3 if raid == 5 else 2,
        region_size=REGION,
        growth_increment=2 * CHUNKLET,
        step=STEP,
    )
    await engine.create_vv("v", pool="p", size=CHUNKLET)
    vol = engine.volume("v")
    await vol.write(0, pattern(1, REGION))
    await engine.flush_all()
    before = allocated_bytes(engine)
    await vol.write(REGION, pattern(2, REGION))
    if allocated_bytes(engine) == before:
        pytest.skip("this file system does not show preallocation in st_blocks")
    await engine.flush_all()
    before = allocated_bytes(engine)
    if refusal == "store full":

        def full(rows: object) -> None:
            raise MetadataStoreFull(f"{engine.store.path}: database or disk is full")

        monkeypatch.setattr(engine.store, "assign_many", full)
    else:
        calls = []
        real = pd_module.fallocate_space

        def full_after_one(fd: int, offset: int, length: int) -> None:
            calls.append(fd)
            if len(calls) > 1:  # the first member got its blocks, the next one's host is full
                raise OSError(errno.ENOSPC, "No space left on device")
            real(fd, offset, length)

        monkeypatch.setattr(pd_module, "fallocate_space", full_after_one)
    with pytest.raises((OutOfSpace, MetadataStoreFull)):
        await vol.write(2 * REGION, pattern(3, REGION))
    assert allocated_bytes(engine) == before, "the refused region kept host blocks"
    monkeypatch.undo()
    assert bytes(await vol.read(0, 3 * REGION)) == pattern(1, REGION) + pattern(2, REGION) + bytes(REGION)
    await vol.write(2 * REGION, pattern(3, REGION))  # the region is free and usable again
    assert bytes(await vol.read(2 * REGION, REGION)) == pattern(3, REGION)
    await engine.close()
