"""The PD header (physical/header.py) and the engine's identity checks at open (pdheaders.py)."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from tests.engine_helpers import CHUNKLET, make_engine, reopen
from thinblock.errors import MetadataCorrupt
from thinblock.model import PDHealth
from thinblock.physical.header import (
    HEADER_AREA,
    SLOT_SIZE,
    HeaderError,
    PDHeader,
    check_header,
    new_data_dir_id,
    read_header,
    write_header,
)
from thinblock.units import MiB

DIR_ID = new_data_dir_id()


def header(**changes: object) -> PDHeader:
    fields: dict[str, object] = {"pd_id": 3, "data_dir_id": DIR_ID, "size": 64 * MiB, "chunklet_size": MiB}
    fields.update(changes)
    return PDHeader(**fields)  # type: ignore[arg-type]


@pytest.fixture
def fd(tmp_path: Path) -> object:
    path = tmp_path / "pd.img"
    with path.open("wb") as f:
        f.truncate(HEADER_AREA + MiB)
    fd = os.open(path, os.O_RDWR)
    yield fd
    os.close(fd)


def test_a_blank_pd_has_no_header(fd: int) -> None:
    assert read_header(fd) is None


def test_other_data_is_no_header(fd: int) -> None:
    os.pwrite(fd, b"\xeb\x63\x90" + b"some boot sector" * 200, 0)
    assert read_header(fd) is None


def test_a_header_reads_back_as_written(fd: int) -> None:
    h = header(store_generation=7, events=2, failed_pds=frozenset({1, 9}))
    write_header(fd, h)
    assert read_header(fd) == h
    newer = h.with_record(store_generation=8, events=3, failed_pds=frozenset({1, 9, 4}))
    write_header(fd, newer)
    assert read_header(fd) == newer


def test_writes_alternate_slots_and_a_torn_one_leaves_the_previous(fd: int) -> None:
    first = header(events=1)
    second = header(events=2)
    write_header(fd, first)
    write_header(fd, second)
    slots = [os.pread(fd, SLOT_SIZE, 0), os.pread(fd, SLOT_SIZE, SLOT_SIZE)]
    assert all(s.startswith(b"THINBLKP") for s in slots), "the two writes went to the same slot"
    # Tear the newest write (a crash in the middle of it): the previous header is read.
    newest_offset = 0 if read_header_slot_events(slots[0]) == 2 else SLOT_SIZE
    os.pwrite(fd, b"\0" * 100, newest_offset + 60)
    assert read_header(fd) == first
    # The next write goes over the torn slot, not over the good one.
    third = header(events=3)
    write_header(fd, third)
    assert read_header(fd) == third
    os.pwrite(fd, b"\0" * 100, newest_offset + 60)
    assert read_header(fd) == first


def read_header_slot_events(slot: bytes) -> int:
    return int(struct.unpack_from("<Q", slot, 8 + 4 + 4 + 8 + 8 + 16 + 8 + 8 + 8 + 8)[0])


def test_both_slots_damaged_is_an_error_not_a_blank(fd: int) -> None:
    write_header(fd, header())
    write_header(fd, header(events=1))
    for offset in (0, SLOT_SIZE):
        os.pwrite(fd, b"\xff" * 8, offset + 40)
    with pytest.raises(HeaderError, match="checksum"):
        read_header(fd)


def test_a_newer_format_is_refused(fd: int) -> None:
    write_header(fd, header())
    for offset in (0, SLOT_SIZE):
        os.pwrite(fd, struct.pack("<I", 99), offset + 8)
    with pytest.raises(HeaderError, match="version 99"):
        read_header(fd)


def test_check_header_names_each_mismatch() -> None:
    want = {"pd_id": 3, "data_dir_id": DIR_ID, "size": 64 * MiB, "chunklet_size": MiB}
    assert check_header(header(), **want) is None  # type: ignore[arg-type]
    assert "no thinblock header" in str(check_header(None, **want))  # type: ignore[arg-type]
    other = new_data_dir_id()
    assert "another data directory" in str(check_header(header(data_dir_id=other), **want))  # type: ignore[arg-type]
    assert "says it is PD 4" in str(check_header(header(pd_id=4), **want))  # type: ignore[arg-type]
    assert "bytes in chunklets" in str(check_header(header(size=32 * MiB), **want))  # type: ignore[arg-type]


# --- the engine ------------------------------------------------------------------------------


async def test_pd_add_writes_the_header_and_chunklets_start_after_it(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path, pds=2, pd_size=MiB)
    try:
        for pd in engine.pds.values():
            h = pd.read_header()
            assert h is not None
            assert (h.pd_id, h.data_dir_id, h.size, h.chunklet_size) == (
                pd.id,
                engine.headers.data_dir_id,
                MiB,
                CHUNKLET,
            )
            assert pd.chunklet_offset(0) == HEADER_AREA
            assert os.stat(pd.path).st_size == HEADER_AREA + MiB
    finally:
        await engine.close()


async def test_a_pd_file_put_in_another_ones_place_is_failed_at_open(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path, pds=3, pd_size=MiB)
    paths = {pd.id: pd.path for pd in engine.pds.values()}
    await engine.close()
    # PD 1 swapped with PD 2's file; PD 3 replaced by a blank file of the right size.
    shutil.copyfile(paths[2], paths[1])
    os.truncate(paths[3], 0)
    os.truncate(paths[3], HEADER_AREA + MiB)
    engine = await reopen(engine)
    try:
        health = {pd.id: pd.health for pd in engine.list_pds()}
        assert health == {1: PDHealth.FAILED, 2: PDHealth.NORMAL, 3: PDHealth.FAILED}
        reasons = {pd.id: pd.failure_reason for pd in engine.pds.values()}
        assert "says it is PD 2" in str(reasons[1])
        assert "no thinblock header" in str(reasons[3])
        alerts = {(a.kind.value, a.object) for a in engine.list_alerts()}
        assert {("pd-failed", "pd:1"), ("pd-failed", "pd:3")} <= alerts
    finally:
        await engine.close()


async def test_a_pd_of_another_data_directory_is_failed_at_open(tmp_path: Path) -> None:
    a = await make_engine(tmp_path / "a", pds=1, pd_size=MiB)
    b = await make_engine(tmp_path / "b", pds=1, pd_size=MiB)
    a_path, b_path = a.pds[1].path, b.pds[1].path
    await a.close()
    await b.close()
    shutil.copyfile(b_path, a_path)
    a = await reopen(a)
    try:
        assert a.pds[1].failed
        assert "another data directory" in str(a.pds[1].failure_reason)
    finally:
        await a.close()


async def test_a_store_with_pds_and_no_data_directory_id_is_refused(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path, pds=1, pd_size=MiB)
    engine.store._db.execute("DELETE FROM meta WHERE key='data_dir_id'")
    await engine.close()
    with pytest.raises(MetadataCorrupt, match="no data directory id"):
        await reopen(engine)


async def test_the_pd_check_fails_a_pd_cut_short_or_replaced(tmp_path: Path) -> None:
    engine = await make_engine(tmp_path, pds=3, pd_size=MiB)
    try:
        assert engine.pd_watch.check_identity() == 0
        os.truncate(engine.pds[1].path, HEADER_AREA + MiB // 2)
        replacement = tmp_path / "new.img"
        replacement.write_bytes(bytes(HEADER_AREA + MiB))
        os.rename(replacement, engine.pds[2].path)
        assert engine.pd_watch.check_identity() == 2
        assert "shorter than" in str(engine.pds[1].failure_reason)
        assert "another file" in str(engine.pds[2].failure_reason)
        assert not engine.pds[3].failed
        # A header overwritten in place (the same file, its header now another PD's) is found too.
        engine.pds[3].write_header(engine.headers.header_for(engine.pds[1]))
        assert engine.pd_watch.check_identity() == 1
        assert "says it is PD 1" in str(engine.pds[3].failure_reason)
    finally:
        await engine.close()


# --- the store generation (issue 10 case 6) ----------------------------------------------------


async def test_a_store_older_than_the_pd_headers_is_refused(tmp_path: Path) -> None:
    from tests.engine_helpers import STEP, pattern
    from thinblock.engine import Engine
    from thinblock.pdheaders import StoreBehindData

    engine = await make_engine(tmp_path, pds=2, pd_size=MiB)
    await engine.create_pool("p", raid=1, region_size=16 * 1024, growth_increment=CHUNKLET, step=STEP)
    engine = await reopen(engine)  # a clean close checkpoints the WAL into thinblock.db
    await engine.close()
    shutil.copyfile(tmp_path / "thinblock.db", tmp_path / "old.db")
    engine = await reopen(engine)
    before = engine.headers.generation
    await engine.create_vv("v", pool="p", size=MiB)
    await engine.volume("v").write(0, pattern(1, 4096))
    await engine.flush_all()
    assert engine.headers.generation == before + 1
    assert all(pd.read_header().store_generation == before + 1 for pd in engine.pds.values())  # type: ignore[union-attr]
    await engine.flush_all()  # nothing changed since: no bump, no header write
    assert engine.headers.generation == before + 1
    await engine.close()
    # The store as it was before the volume: an old copy put back.
    shutil.copyfile(tmp_path / "old.db", tmp_path / "thinblock.db")
    report = Engine.check(tmp_path)
    assert not report.ok and any("older than the data" in p for p in report.problems), report
    with pytest.raises(StoreBehindData, match=r"older than the data: its generation is \d+, PD 1"):
        await Engine.open(tmp_path)


async def test_a_full_store_bumps_the_generation_with_its_reserve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's file system full (issue 10 case 2): the bump's commit failed, the flush went
    on without it, and until a later bump landed a store that lost its WAL as well went
    unnoticed.  The reserve (metadata/reserve.py) gives the bump its room: the flush bumps, the
    headers carry the new generation, and the reserve is made again once there is room.
    The file system is simulated: the store refuses commits while the reserve file exists."""
    from tests.engine_helpers import STEP, pattern
    from thinblock.errors import MetadataStoreFull

    engine = await make_engine(tmp_path, pds=2, pd_size=MiB)
    await engine.create_pool("p", raid=1, region_size=16 * 1024, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=MiB)
    await engine.volume("v").write(0, pattern(1, 4096))
    await engine.flush_all()
    reserve = engine.store_reserve
    assert reserve is not None and reserve.in_place
    before = engine.headers.generation
    await engine.volume("v").write(16 * 1024, pattern(2, 4096))  # a new region: the store changed
    real = engine.store.set_meta

    def full_while_reserved(key: str, value: str) -> None:
        if reserve.path.exists():
            raise MetadataStoreFull(f"{engine.store.url}: database or disk is full")
        real(key, value)

    monkeypatch.setattr(engine.store, "set_meta", full_while_reserved)
    await engine.flush_all()
    assert engine.headers.generation == before + 1, "the bump was skipped with the store full"
    assert all(pd.read_header().store_generation == before + 1 for pd in engine.pds.values())  # type: ignore[union-attr]
    assert engine.store.get_meta("generation") == str(before + 1)
    assert reserve.releases == 1
    assert reserve.in_place, "the reserve was not made again once there was room"
    await engine.close()
