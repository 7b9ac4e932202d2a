"""The RAID 5 journal (logical/journal.py) and its replay (LogicalDisk.replay), without a daemon.

A crash is simulated deterministically: the PDs' in-place writes are counted and the N-th one
raises ``Crash`` (a BaseException, as nothing in the LD may catch a kill); what was written
before it stays in the files (the page cache survives a kill -9).  Then the PDs, the LD and the
journal are opened again from their files, the failed member failed again, the journal replayed,
and every byte of the LD read: bytes outside the interrupted write read as before it (the
missing member's too, rebuilt from parity), bytes inside read old or new.

Without the journal the same crash points lose bytes the write never touched (the write hole of
issue 10 case 3): ``test_without_the_journal_the_hole_loses_data`` shows the test can fail.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.contract.devices import CHUNKLET, STEP, close_all, make_ld, make_pds
from tests.engine_helpers import CHUNKLET as E_CHUNKLET
from tests.engine_helpers import REGION as E_REGION
from tests.engine_helpers import STEP as E_STEP
from tests.engine_helpers import make_engine, pattern
from thinblock.engine import Engine, EngineOptions
from thinblock.errors import MediumError, OutOfSpace
from thinblock.logical import journal as journal_mod
from thinblock.logical.journal import DATA_START, StripeJournal
from thinblock.logical.raid import LogicalDisk, RaidLevel, replay_journal
from thinblock.physical.pd import PhysicalDisk
from thinblock.units import MiB

K = 3
STRIPE_DATA = (K - 1) * STEP
SMALL = DATA_START + journal_mod._REC.size + journal_mod.MAX_PAYLOAD  # the smallest journal


class Crash(BaseException):
    """The process died here."""


def count_writes(pds: list[PhysicalDisk], crash_at: int) -> list[int]:
    """Make the ``crash_at``-th in-place write (0-based, any PD) raise Crash before it happens."""
    counter = [0]
    for pd in pds:
        for name in ("pwrite", "pwritev", "punch"):
            real = getattr(pd, name)

            def wrapped(*args: object, _real: Callable[..., None] = real) -> None:
                if counter[0] == crash_at:
                    raise Crash
                counter[0] += 1
                _real(*args)

            setattr(pd, name, wrapped)
    return counter


def reopen(pds: list[PhysicalDisk], *, keep_failures: bool = True) -> list[PhysicalDisk]:
    """The PDs as a restarted process opens them (same files, new descriptors); failed PDs stay
    failed unless ``keep_failures`` is False (as if the failure had never been recorded)."""
    paths = [(pd.id, pd.path, pd.size, pd.chunklet_size, pd.failed) for pd in pds]
    close_all(pds)
    out = []
    for pd_id, path, size, chunklet, failed in paths:
        pd = PhysicalDisk.open(pd_id, path, size=size, chunklet_size=chunklet, create=False, allow_tiny=True)
        if failed and keep_failures:
            pd.fail("failed before the restart")
        out.append(pd)
    return out


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Callable[[int], tuple[list[PhysicalDisk], LogicalDisk, bytes]]]:
    """``setup(victim_col)``: a RAID 5 LD of one row over 3 PDs, filled with random data and
    fsynced, then the member in column ``victim_col`` failed."""
    opened: list[list[PhysicalDisk]] = []

    def make(victim_col: int) -> tuple[list[PhysicalDisk], LogicalDisk, bytes]:
        directory = tmp_path / f"pds{len(opened)}"
        directory.mkdir()
        pds = make_pds(directory, K, chunklets=1)
        opened.append(pds)
        ld = make_ld(pds, RaidLevel.RAID5, K, 1)
        fill = random.Random(victim_col).randbytes(ld.size)
        ld.write(0, fill)
        ld.flush()
        ld.rows[0][victim_col].pd.fail("drill")
        return pds, ld, fill

    yield make
    for pds in opened:
        close_all(pds)


# Writes of each shape: inside one data unit, across two units, a whole stripe, stripes and a bit.
WRITES = [
    (STRIPE_DATA * 5 + 512, 1024),
    (STRIPE_DATA * 6 + STEP - 512, 1024),
    (STRIPE_DATA * 7, STRIPE_DATA),
    (STRIPE_DATA * 8 + 1024, STRIPE_DATA * 2),
]


def crash_and_restart(
    tmp_path: Path,
    pds: list[PhysicalDisk],
    ld: LogicalDisk,
    offset: int,
    data: bytes,
    crash_at: int,
    with_journal: bool,
) -> tuple[list[PhysicalDisk], LogicalDisk, bool]:
    """Write ``data`` at ``offset`` and crash at in-place write ``crash_at``; then restart (and
    replay the journal).  Returns the new PDs, the new LD and whether the crash came."""
    journal = StripeJournal(tmp_path / "raid5.journal", capacity=4 * 1024 * 1024) if with_journal else None
    ld.journal = journal
    count_writes(pds, crash_at)
    crashed = False
    try:
        ld.write(offset, data)
    except Crash:
        crashed = True
    if journal is not None:
        journal.close()
    pds[:] = reopen(pds)
    new_ld = make_ld(pds, RaidLevel.RAID5, K, 1)
    if with_journal:
        new_journal = StripeJournal(tmp_path / "raid5.journal")
        new_ld.journal = new_journal
        replay_journal(new_journal, {new_ld.id: new_ld})
        assert new_journal.pending() == []  # replayed, then dropped
        new_journal.close()
    return pds, new_ld, crashed


def lost_bytes(ld: LogicalDisk, fill: bytes, offset: int, data: bytes) -> list[int]:
    """Offsets whose content is neither what the fill wrote nor (inside the write) the new data."""
    got = bytes(ld.read(0, ld.size))
    bad = []
    for pos in range(0, ld.size, 512):
        piece = got[pos : pos + 512]
        if piece == fill[pos : pos + 512]:
            continue
        if offset <= pos < offset + len(data) and piece == data[pos - offset : pos - offset + 512]:
            continue
        bad.append(pos)
    return bad


@pytest.mark.parametrize("victim_col", range(K))
@pytest.mark.parametrize(("offset", "length"), WRITES)
def test_a_crash_at_any_write_loses_nothing(
    tmp_path: Path,
    setup: Callable[[int], tuple[list[PhysicalDisk], LogicalDisk, bytes]],
    victim_col: int,
    offset: int,
    length: int,
) -> None:
    data = random.Random(offset).randbytes(length)
    crash_at = 0
    while True:
        work = tmp_path / f"crash{crash_at}"
        work.mkdir()
        pds, ld, fill = setup(victim_col)
        pds, ld, crashed = crash_and_restart(work, pds, ld, offset, data, crash_at, with_journal=True)
        assert lost_bytes(ld, fill, offset, data) == [], f"crash before in-place write {crash_at}"
        if not crashed:
            break  # every crash point of this write was tried
        crash_at += 1


def test_without_the_journal_the_hole_loses_data(
    tmp_path: Path, setup: Callable[[int], tuple[list[PhysicalDisk], LogicalDisk, bytes]]
) -> None:
    # Stripe 4: parity on column 1, data units 0 and 1 on columns 2 and 0.  Column 0 failed:
    # a write to data unit 0 (column 2) updates parity first, then the data; a crash between
    # the two leaves the missing unit an XOR mix.
    pds, ld, fill = setup(0)
    offset, data = STRIPE_DATA * 4, bytes(range(256)) * (1024 // 256)
    pds, ld, crashed = crash_and_restart(tmp_path, pds, ld, offset, data, crash_at=1, with_journal=False)
    assert crashed
    assert lost_bytes(ld, fill, offset, data) != []  # what the journal is for


def test_replay_skips_a_member_that_is_no_longer_failed(
    tmp_path: Path, setup: Callable[[int], tuple[list[PhysicalDisk], LogicalDisk, bytes]]
) -> None:
    pds, ld, _fill = setup(0)
    journal = StripeJournal(tmp_path / "raid5.journal")
    ld.journal = journal
    ld.write(STRIPE_DATA * 4, b"x" * 1024)  # stripe 4: parity on column 1, data on 2 and 0
    [record] = journal.pending()
    assert (record.row, record.col, record.coff, record.length) == (0, 0, 4 * STEP, 1024)
    pds[:] = reopen(pds, keep_failures=False)  # the failed member is back, healthy
    healthy = make_ld(pds, RaidLevel.RAID5, K, 1)
    assert healthy.replay(record) == 0
    journal.close()


# --- the journal file itself ---------------------------------------------------------------------


class Disk:
    """Something a record covers: counts its fsyncs."""

    def __init__(self) -> None:
        self.failed = False
        self.fsyncs = 0

    def fsync(self) -> None:
        self.fsyncs += 1


def logged(journal: StripeJournal, *args: object) -> None:
    """A record whose in-place writes are done at once (what a writer does: log, write, landed)."""
    journal.log(*args)  # type: ignore[arg-type]
    journal.landed()


def test_records_read_back_in_order_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "j"
    journal = StripeJournal(path)
    assert not path.exists()  # made on first use only
    logged(journal, 1, 0, 2, 4096, 3, [b"abc"], [])
    logged(journal, 1, 1, 0, 8192, 4096, None, [])
    logged(journal, 7, 3, 1, 0, 5, [b"ab", b"cde"], [])
    journal.close()
    again = StripeJournal(path)
    records = again.pending()
    assert [(r.seq, r.ld_id, r.row, r.col, r.coff, r.length, r.content()) for r in records] == [
        (0, 1, 0, 2, 4096, 3, b"abc"),
        (1, 1, 1, 0, 8192, 4096, bytes(4096)),
        (2, 7, 3, 1, 0, 5, b"abcde"),
    ]
    logged(again, 1, 0, 0, 0, 1, [b"z"], [])  # appends after them
    assert [r.seq for r in again.pending()] == [0, 1, 2, 3]
    again.close()


def test_a_torn_record_ends_the_journal_at_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "j"
    journal = StripeJournal(path, capacity=SMALL)
    logged(journal, 1, 0, 2, 0, 100, [b"a" * 100], [])
    second_at = DATA_START + journal_mod._REC.size + 100
    logged(journal, 1, 0, 2, 100, 100, [b"b" * 100], [])
    journal.close()
    intact = path.read_bytes()
    end = second_at + journal_mod._REC.size + 100
    for cut in range(second_at, end):
        # The second record written only up to ``cut``: the rest is what was there before (zeros).
        path.write_bytes(intact[:cut] + bytes(end - cut) + intact[end:])
        records = StripeJournal(path).pending()
        assert [r.content() for r in records] == [b"a" * 100], cut
    # And a flipped bit anywhere in the second record.
    for pos in range(second_at, end, 7):
        damaged = bytearray(intact)
        damaged[pos] ^= 0x10
        path.write_bytes(bytes(damaged))
        assert len(StripeJournal(path).pending()) == 1, pos


def test_retire_drops_records_only_when_none_came_after_the_mark(tmp_path: Path) -> None:
    journal = StripeJournal(tmp_path / "j")
    assert not journal.retire(journal.mark())  # nothing to drop, no file made
    logged(journal, 1, 0, 0, 0, 4, [b"abcd"], [])
    mark = journal.mark()
    logged(journal, 1, 0, 0, 4, 4, [b"efgh"], [])  # written while the flush's fsyncs ran
    assert not journal.retire(mark)
    assert len(journal.pending()) == 2
    assert journal.retire(journal.mark())
    assert journal.pending() == []
    journal.close()
    assert StripeJournal(tmp_path / "j").pending() == []  # the new epoch is durable


def test_retire_keeps_records_whose_writes_had_not_landed_at_the_mark(tmp_path: Path) -> None:
    """A degraded write runs in an I/O thread: its record may be durable while its in-place
    writes are still being made.  A flush whose mark was taken then fsyncs before they land, so
    it must not drop the record; a later flush, with nothing open at its mark, does."""
    journal = StripeJournal(tmp_path / "j")
    journal.log(1, 0, 0, 0, 4, [b"abcd"], [])  # in-place writes under way
    mark = journal.mark()
    journal.landed()  # they land while the flush's fsyncs run: maybe after them
    assert not journal.retire(mark)
    assert len(journal.pending()) == 1
    assert journal.retire(journal.mark())
    assert journal.pending() == []
    journal.close()


def test_a_full_journal_waits_for_open_records_before_it_starts_over(tmp_path: Path) -> None:
    """Making room fsyncs the PDs and drops every record: a record whose in-place writes another
    thread is still making would be dropped before they are durable.  So it waits for them."""
    disk = Disk()
    size = DATA_START + 2 * (journal_mod._REC.size + journal_mod.MAX_PAYLOAD)
    journal = StripeJournal(tmp_path / "j", capacity=size)
    big = bytes(journal_mod.MAX_PAYLOAD)
    logged(journal, 1, 0, 0, 0, len(big), [big], [disk])
    journal.log(1, 0, 0, 0, len(big), [big], [disk])  # open: its writer is still writing
    fsyncs_seen: list[int] = []

    def other_writer() -> None:
        journal.log(2, 0, 0, 0, 4, [b"last"], [disk])  # needs room
        fsyncs_seen.append(disk.fsyncs)
        journal.landed()

    thread = threading.Thread(target=other_writer)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and disk.fsyncs == 0, "the journal made room under an open record"
    journal.landed()  # the first writer is done
    thread.join(10)
    assert not thread.is_alive()
    assert fsyncs_seen == [1] and journal.full_resets == 1
    assert [r.content() for r in journal.pending()] == [b"last"]
    journal.close()


def test_a_damaged_header_slot_falls_back_to_the_other(tmp_path: Path) -> None:
    path = tmp_path / "j"
    journal = StripeJournal(path)
    logged(journal, 1, 0, 0, 0, 4, [b"old!"], [])
    journal.reset()  # epoch 2, header slot 1
    logged(journal, 1, 0, 0, 0, 4, [b"new!"], [])
    journal.close()
    assert [r.content() for r in StripeJournal(path).pending()] == [b"new!"]
    with open(path, "r+b") as f:  # the newer slot (0) torn: the older epoch's header is current
        f.seek(20)
        f.write(b"\xff")
    # Records of epoch 2 do not count under epoch 1's header, and epoch 1's were overwritten.
    assert StripeJournal(path).pending() == []


def test_a_full_journal_syncs_what_it_covers_then_starts_over(tmp_path: Path) -> None:
    disk = Disk()
    size = DATA_START + 3 * (journal_mod._REC.size + journal_mod.MAX_PAYLOAD)
    journal = StripeJournal(tmp_path / "j", capacity=size)
    big = bytes(journal_mod.MAX_PAYLOAD)
    for _ in range(3):
        logged(journal, 1, 0, 0, 0, len(big), [big], [disk])
    assert disk.fsyncs == 0
    logged(journal, 1, 0, 0, 0, 4, [b"last"], [disk])
    assert disk.fsyncs == 1 and journal.full_resets == 1
    assert [r.content() for r in journal.pending()] == [b"last"]
    journal.close()


def test_a_full_file_system_refuses_the_write_and_changes_nothing(
    tmp_path: Path,
    setup: Callable[[int], tuple[list[PhysicalDisk], LogicalDisk, bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _pds, ld, fill = setup(0)  # stripe 4: parity on column 1, data units on 2 and 0 (failed)
    journal = StripeJournal(tmp_path / "raid5.journal")
    ld.journal = journal

    def full(*_args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    # First the file cannot even be made; then (made) a record cannot be written.
    monkeypatch.setattr(journal_mod, "_fallocate", full)
    with pytest.raises(OutOfSpace, match="journal"):
        ld.write(STRIPE_DATA * 4, b"n" * 1024)
    assert not (tmp_path / "raid5.journal").exists()
    assert not (tmp_path / "raid5.journal.new").exists()
    monkeypatch.undo()
    ld.write(STRIPE_DATA * 4, b"n" * 1024)  # space came back
    fill = fill[: STRIPE_DATA * 4] + b"n" * 1024 + fill[STRIPE_DATA * 4 + 1024 :]
    monkeypatch.setattr(journal_mod, "_pwritev", full)
    with pytest.raises(OutOfSpace):
        ld.write(STRIPE_DATA * 9, b"m" * 1024)
    with pytest.raises(OutOfSpace):
        ld.zero(0, ld.size)  # whole stripes of a degraded row: journaled too
    monkeypatch.undo()
    assert bytes(ld.read(0, ld.size)) == fill
    journal.close()


def test_an_io_error_of_the_journal_is_a_medium_error(
    tmp_path: Path,
    setup: Callable[[int], tuple[list[PhysicalDisk], LogicalDisk, bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _pds, ld, fill = setup(1)  # stripe 5: parity on column 0, data units on 1 (failed) and 2
    ld.journal = StripeJournal(tmp_path / "raid5.journal")

    def broken(*_args: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal_mod, "_pwritev", broken)
    with pytest.raises(MediumError, match="journal"):
        ld.write(STRIPE_DATA * 5 + 100, b"q" * 5000)
    monkeypatch.undo()
    assert bytes(ld.read(0, ld.size)) == fill
    ld.journal.close()


def test_healthy_rows_write_no_records(
    tmp_path: Path, setup: Callable[[int], tuple[list[PhysicalDisk], LogicalDisk, bytes]]
) -> None:
    pds = make_pds(tmp_path, K, chunklets=1, first_id=10)
    ld = make_ld(pds, RaidLevel.RAID5, K, 1)
    ld.journal = StripeJournal(tmp_path / "raid5.journal")
    ld.write(100, b"h" * 9000)
    ld.zero(0, CHUNKLET)
    assert ld.journal.records_written == 0 and not (tmp_path / "raid5.journal").exists()
    ld.journal.close()
    close_all(pds)


# --- in the engine -------------------------------------------------------------------------------


async def test_the_engine_journals_degraded_writes_retires_at_flush_and_replays_at_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = await make_engine(tmp_path, pds=3)
    await engine.create_pool(
        "p", raid=5, set_size=3, region_size=E_REGION, growth_increment=2 * E_CHUNKLET, step=E_STEP
    )
    await engine.create_vv("v", pool="p", size=1 * MiB)
    vol = engine.volume("v")
    data = bytearray(pattern(1, 8 * E_REGION))
    await vol.write(0, bytes(data))
    await engine.flush_all()
    assert not (tmp_path / "raid5.journal").exists()  # healthy sets need no journal
    [ld] = engine.lds.values()
    await engine.fail_pd(ld.rows[0][0].pd.id)

    async def scattered_writes(seed: int) -> None:
        for i in range(10):  # inside the regions written above
            at = i * 3 * E_STEP + 512
            piece = pattern(seed + i, 1024)
            await vol.write(at, piece)
            data[at : at + 1024] = piece

    await scattered_writes(10)
    assert engine.journal.live_records > 0
    await engine.flush_all()
    assert engine.journal.live_records == 0  # the PDs are fsynced: the records are dropped
    await scattered_writes(30)
    assert engine.journal.live_records > 0
    engine._close_files()  # stopped without a flush, as by kill -9
    caplog.set_level(logging.WARNING, logger="thinblock.engine")
    engine = await Engine.open(tmp_path, EngineOptions(allow_tiny_chunklets=True, destage_delay=0.001))
    assert any("RAID 5 journal replayed" in r.getMessage() for r in caplog.records)
    assert engine.journal.pending() == []
    assert bytes(await engine.volume("v").read(0, len(data))) == bytes(data)
    await engine.close()


async def test_degraded_writes_wait_for_the_journal_in_the_io_threads_not_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write to a degraded RAID 5 set waits for a synchronous journal write (RWF_DSYNC, about
    0.3 ms on a virtual disk): made on the event loop, it stalled every other connection that
    long, whatever the write's size.  It goes to the I/O threads, the record still before any
    in-place write (``test_a_crash_at_any_write_loses_nothing``), and the data reads back."""
    options = EngineOptions(allow_tiny_chunklets=True, destage_delay=0.001)
    engine = await make_engine(tmp_path, pds=3, options=options)
    await engine.create_pool(
        "p", raid=5, set_size=3, region_size=E_REGION, growth_increment=2 * E_CHUNKLET, step=E_STEP
    )
    await engine.create_vv("v", pool="p", size=1 * MiB)
    vol = engine.volume("v")
    data = bytearray(pattern(1, 8 * E_REGION))
    await vol.write(0, bytes(data))
    await engine.flush_all()
    [ld] = engine.lds.values()
    await engine.fail_pd(ld.rows[0][0].pd.id)
    threads: list[str] = []
    real_pwritev = journal_mod._pwritev

    def pwritev(*args: object) -> int:
        threads.append(threading.current_thread().name)
        return real_pwritev(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(journal_mod, "_pwritev", pwritev)
    loop_thread = threading.current_thread().name
    for i in range(6):  # small writes, far below offload_min_bytes
        at = i * 3 * E_STEP + 512
        piece = pattern(40 + i, 1024)
        await asyncio.gather(vol.write(at, piece), asyncio.sleep(0))
        data[at : at + 1024] = piece
    assert threads, "the degraded writes logged nothing"
    assert loop_thread not in threads, f"journal writes made on the event loop thread: {threads}"
    assert bytes(await vol.read(0, len(data))) == bytes(data)
    await engine.close()
