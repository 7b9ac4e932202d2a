"""Crash test: a child process writes and flushes through the engine and is killed with
SIGKILL at a random moment, round after round on the same data directory.

After each kill the test process checks the store (``Engine.check``), opens the engine
(which finds the unclean shutdown and scrubs the free regions), and checks, per volume:

* every byte that no operation after the last *recorded* flush touched holds exactly
  what the operations up to that flush left there (the child records a flush only
  after it completed, so all of those were acknowledged before it);
* every byte that a later operation touched holds either that value or what one of
  those later operations wrote there -- nothing else (no stale or foreign data);
* isolation after the crash: a new volume sized to the pool's free space gets every
  free LD region; one byte written into each region reads back followed by zeros.

Every fifth round the test fails a mirror PD (and adds a fresh PD); the next child
rebuilds in the background while it writes, so some kills land mid-rebuild.

The child's operations are a pure function of its seed (tests/crash_child.py), so the
test recomputes them.  What the volumes hold after a round (verified as above) is the
starting point of the next.  The volumes are on a RAID 1 pool: one write-through, one
write-back.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.crash_child import OPTIONS, REGION, VOLUMES, Op, operations
from tests.engine_helpers import CHUNKLET, STEP, make_engine
from thinblock.engine import Engine
from thinblock.metadata.check import check_store
from thinblock.units import MiB

ROOT = Path(__file__).resolve().parents[2]
# SIGKILL keeps what reached the page cache, on any file system; on a RAM file system the
# child's and the verifier's fsyncs cost nothing, which keeps the rounds fast.
FAST_TMP = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
READY_TIMEOUT = 60.0


async def create(data_dir: Path) -> None:
    engine = await Engine.open(data_dir, OPTIONS)
    for i in range(3):
        await engine.add_pd(data_dir / f"pd{i}.img", size=4 * MiB, chunklet_size=CHUNKLET)
    await engine.create_pool(
        "p", raid=1, set_size=2, region_size=REGION, growth_increment=CHUNKLET, step=STEP
    )
    for name, (size, mode) in VOLUMES.items():
        await engine.create_vv(name, pool="p", size=size, cache_mode=mode)
    await engine.close()


def last_recorded_flush(record: Path) -> int:
    """The sequence number of the last operation covered by a completed flush, or -1."""
    if not record.exists():
        return -1
    lines = record.read_bytes().split(b"\n")
    complete = [line for line in lines[:-1] if line]  # the last piece lacks its newline
    return int(complete[-1]) if complete else -1


def ops_until_next_flush(seed: int, last: int) -> tuple[list[Op], list[Op]]:
    """(operations up to and including ``last``, the operations after it that may have run:
    those up to the next flush point -- the child cannot start one past it before that
    flush completed and was recorded)."""
    done: list[Op] = []
    later: list[Op] = []
    for op in operations(seed):
        if op.seq <= last:
            done.append(op)
            continue
        later.append(op)
        if op.flush_after:
            break
    return done, later


def check_volume(name: str, got: bytes, start: bytearray, done: list[Op], later: list[Op]) -> None:
    flushed = bytearray(start)
    for op in done:
        if op.volume == name:
            flushed[op.offset : op.offset + op.length] = op.data()
    actual = np.frombuffer(got, np.uint8)
    ok = actual == np.frombuffer(bytes(flushed), np.uint8)
    for op in later:
        if op.volume == name:
            span = slice(op.offset, op.offset + op.length)
            ok[span] |= actual[span] == np.frombuffer(op.data(), np.uint8)
    if not ok.all():
        bad = int(np.argmin(ok))
        options = {
            op.seq: op.data()[bad - op.offset]
            for op in later
            if op.volume == name and op.offset <= bad < op.offset + op.length
        }
        raise AssertionError(
            f"volume {name}: byte {bad} (region {bad // REGION}) is {got[bad]:#x}; after the last"
            f" completed flush it held {flushed[bad]:#x}, and the later operations touching it"
            f" (seq: value) are {options}"
        )


async def verify_round(
    data_dir: Path, models: dict[str, bytearray], seed: int, last: int, *, fail_a_pd: bool
) -> None:
    report = Engine.check(data_dir)
    assert report.ok, f"store check after the kill: {report.problems}"
    engine = await Engine.open(data_dir, OPTIONS)
    try:
        done, later = ops_until_next_flush(seed, last)
        for name in VOLUMES:
            got = bytes(await engine.volume(name).read(0, len(models[name])))
            check_volume(name, got, models[name], done, later)
            models[name][:] = got  # the next round starts from what is there now
        await check_isolation(engine)
        if fail_a_pd:
            await fail_a_mirror(engine, data_dir)
    finally:
        await engine.close()


def diverged_mirrors(engine: Engine) -> list[int]:
    """LDs whose healthy RAID 1 mirrors differ (read straight from the PD files).

    A write or trim in flight when the process was killed can reach one mirror and not the
    other; the open after an unclean stop resynchronises them (LogicalDisk.resync, see
    test_reads_hold_when_a_member_fails_after_an_unclean_stop).  Reads come from the first healthy
    mirror, so a difference would show only once that mirror fails."""
    paths = {pd.id: pd.path for pd in engine.list_pds() if pd.health.value == "normal"}
    diverged = []
    for ld in engine.list_lds():
        copies = set()
        for ref in ld.chunklets:
            if ref.pd_id in paths:
                with open(paths[ref.pd_id], "rb") as f:
                    copies.add(os.pread(f.fileno(), CHUNKLET, ref.offset))
        if len(copies) > 1:
            diverged.append(ld.id)
    return diverged


async def fail_a_mirror(engine: Engine, data_dir: Path) -> bool:
    """Fail a PD under the volumes (only while no LD is degraded: one failed mirror per
    RAID 1 set at most) and add a fresh one, so that the pool can still grow and the
    next child's rebuild has somewhere to go.  The mirrors must agree first: the unclean
    start resynchronised them."""
    diverged = diverged_mirrors(engine)
    assert not diverged, f"LDs {diverged}: mirrors differ after the resync of an unclean start"
    if any(ld.health.value != "normal" for ld in engine.list_lds()):
        return False
    used = sorted({ref.pd_id for ld in engine.list_lds() for ref in ld.chunklets})
    if not used:
        return False
    await engine.add_pd(data_dir / f"pd{len(engine.list_pds())}.img", size=4 * MiB, chunklet_size=CHUNKLET)
    await engine.fail_pd(used[len(engine.list_pds()) % len(used)])
    assert any(ld.health.value == "degraded" for ld in engine.list_lds())
    return True


async def check_isolation(engine: Engine) -> None:
    """A new VV that takes every free LD region of the pool reads only zeros in them."""
    free = engine.get_pool("p").free
    lds_before = len(engine.list_lds())
    if free:
        await engine.create_vv("probe", pool="p", size=free)
        probe = engine.volume("probe")
        for offset in range(0, free, REGION):
            await probe.write(offset, b"\x5a")
        assert engine.get_vv("probe").regions_allocated == free // REGION
        assert len(engine.list_lds()) == lds_before, "the probe should fit in the free regions"
        expected = b"\x5a" + bytes(REGION - 1)
        for offset in range(0, free, REGION):
            got = bytes(await probe.read(offset, REGION))
            assert got == expected, f"a free region (probe offset {offset}) held stale data after the crash"
        await engine.delete_vv("probe")
        await engine.flush_all()


def spawn(data_dir: Path, seed: int, record: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.crash_child", str(data_dir), str(seed), str(record)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
    )


def wait_ready(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the child prints "ready" once the engine is open
    assert line == b"ready\n", f"the child did not start: {line!r}, exit code {proc.poll()}"


def crash_rounds(tmp_path: Path, rounds: int, master_seed: int) -> None:
    data_dir = tmp_path / "data"
    asyncio.run(create(data_dir))
    models = {name: bytearray(size) for name, (size, _) in VOLUMES.items()}
    rng = random.Random(master_seed)
    recorded = 0
    for round_no in range(rounds):
        seed = rng.randrange(2**32)
        record = tmp_path / f"flushed-{round_no}.txt"
        proc = spawn(data_dir, seed, record)
        try:
            if rng.random() < 0.15:
                time.sleep(rng.uniform(0.0, 0.5))  # now and then while it opens (and scrubs)
            else:
                wait_ready(proc)
                time.sleep(rng.uniform(0.0, 0.25))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, (
            f"round {round_no}: the child ended by itself ({proc.returncode})"
        )
        last = last_recorded_flush(record)
        recorded += last >= 0
        try:
            asyncio.run(verify_round(data_dir, models, seed, last, fail_a_pd=round_no % 5 == 2))
        except AssertionError as exc:
            raise AssertionError(
                f"round {round_no} (master seed {master_seed}, child seed {seed}): {exc}"
            ) from exc
    assert recorded >= rounds // 3, f"only {recorded} of {rounds} rounds got as far as a completed flush"


def test_flushed_writes_survive_sigkill() -> None:
    with tempfile.TemporaryDirectory(prefix="thinblock-crash-", dir=FAST_TMP) as tmp:
        crash_rounds(Path(tmp), rounds=20, master_seed=random.randrange(2**32))


@pytest.mark.long
@pytest.mark.timeout(3600)
def test_flushed_writes_survive_sigkill_long(tmp_path: Path) -> None:
    """On the real temp dir (a disk file system), and many more rounds."""
    for master_seed in itertools.islice(iter(lambda: random.randrange(2**32), None), 5):
        crash_rounds(tmp_path / str(master_seed), rounds=40, master_seed=master_seed)


@pytest.mark.parametrize(("raid", "set_size"), [(1, 2), (5, 3)], ids=["raid1", "raid5"])
async def test_reads_hold_when_a_member_fails_after_an_unclean_stop(
    tmp_path: Path, raid: int, set_size: int
) -> None:
    """Found by the crash test: a write reached one member of a set and the process died
    before the rest -- the second RAID 1 mirror, or the RAID 5 parity.  After the restart
    reads return the new bytes; when the PD under them then fails, the same reads must
    return the same bytes, not the other mirror's or a unit rebuilt from stale parity
    (Linux md resyncs after an unclean shutdown for exactly this; so does Engine.open,
    LogicalDisk.resync)."""
    engine = await Engine.open(tmp_path, OPTIONS)
    for i in range(set_size + 1):
        await engine.add_pd(tmp_path / f"pd{i}.img", size=4 * MiB, chunklet_size=CHUNKLET)
    await engine.create_pool(
        "p", raid=raid, set_size=set_size, region_size=REGION, growth_increment=CHUNKLET, step=STEP
    )
    await engine.create_vv("v", pool="p", size=MiB)
    await engine.volume("v").write(0, b"old" * 100)
    await engine.flush_all()
    # VV region 0 is LD offset 0: row 0, column 0 -- the mirror reads come from (RAID 1),
    # stripe 0's first data unit (RAID 5, whose parity is on the last column).
    first = engine.list_lds()[0].chunklets[0]
    with open(engine.get_pd(first.pd_id).path, "r+b") as f:
        os.pwrite(f.fileno(), b"new" * 100, first.offset)  # the in-flight write, one member only
    # The process dies: no destage, no flush, no clean mark.
    task = engine.cache._task
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    engine._close_files()
    engine = await Engine.open(tmp_path, OPTIONS)
    try:
        before = bytes(await engine.volume("v").read(0, 300))
        assert before == b"new" * 100
        await engine.fail_pd(first.pd_id)
        after = bytes(await engine.volume("v").read(0, 300))
        assert after == before, "a read changed when the PD under it failed"
    finally:
        await engine.close()


async def test_an_ld_is_recorded_and_released_in_one_transaction(tmp_path: Path) -> None:
    """An LD row and its chunklet rows go into the store together (and out of it together):
    a failure -- or a kill -- between the two statements must not leave an LD without
    chunklets, which the store check then refuses to open."""
    engine = await make_engine(tmp_path, pds=3)
    await engine.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
    await engine.create_vv("v", pool="p", size=MiB)
    vol = engine.volume("v")
    db = engine.store._db
    # Stand-in for a kill right after the LD row went in: its chunklet rows never arrive.
    db.execute(
        "CREATE TEMP TRIGGER crash BEFORE INSERT ON ld_chunklets BEGIN SELECT RAISE(ABORT, 'crash'); END"
    )
    with pytest.raises(sqlite3.DatabaseError):
        await vol.write(0, b"x")
    db.execute("DROP TRIGGER crash")
    assert check_store(engine.store) == []
    assert db.execute("SELECT COUNT(*) FROM lds").fetchone()[0] == 0
    # Releasing: the chunklet rows go, then the LD row cannot.
    await vol.write(0, b"x")
    await vol.trim(0, REGION)
    db.execute("CREATE TEMP TRIGGER crash BEFORE DELETE ON lds BEGIN SELECT RAISE(ABORT, 'crash'); END")
    with pytest.raises(sqlite3.DatabaseError):
        await engine.compact_pool("p")
    db.execute("DROP TRIGGER crash")
    assert check_store(engine.store) == []
    assert db.execute("SELECT COUNT(*) FROM ld_chunklets").fetchone()[0] == 2
    await engine.close()
