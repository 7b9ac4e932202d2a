"""Drill 1: crash consistency over NBD.

Volumes of a RAID 1 pool take writes over NBD while the server is killed with SIGKILL at a
random moment.  After each restart:

* the offline check (``thinblock check``) passes, the daemon starts (it runs the same check),
  and no LD region is assigned twice (a query of our own on the store, not the daemon's check);
* write-through volumes, written by fio with ``verify=crc32c`` and a flush every 16 writes: every
  write fio saw completed reads back as written.  That is more than NBD promises (only what a
  completed flush covers), and what write-through promises across a kill of the process: the data
  is in the PDs' page cache and the region's assignment in the store's WAL before the reply goes
  out.  Which writes completed comes from fio's completion-latency log (``--write_lat_log`` with
  ``--log_offset``: one line per write completed without error, with its offset and length); after
  the restart fio replays exactly those ranges as reads (``--read_iolog``) and checks them with its
  own crc32c verification.  (fio's ``verify_state_save`` is not usable here: fio 3.33 counts the
  writes in flight when the connection broke as completed -- shown against nbdkit's file plugin
  with a write delay, which cannot lose an acknowledged write.)  Each round starts by trimming
  these volumes, so that every round allocates its regions anew while the kill can come, and
  data of an earlier round can never pass for this round's;
* write-back volumes (the cache holds dirty data at the kill: its destage delay is long), written
  by our own client: every block a completed flush covers holds that write or a later one
  (``flushcheck.FlushChecker``); what no flush covered may be old or new, never anything else.

Short variant (CI): 5 rounds.  Long variant (``make drills``): 20 rounds, more volumes, longer runs.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.drills.flushcheck import FlushChecker
from tests.drills.harness import (
    BLOCK,
    Figures,
    MiB,
    Standard,
    add_pds,
    duplicate_ld_regions,
    fio_argv,
    run_fio,
    setup_pool,
    setup_volume,
    thinblock_check,
    wait_for_more_writes,
)
from tests.drills.nbd_client import NBDClient
from tests.support.daemon import LOOPBACK, Daemon

# The cache holds dirty data for seconds: a kill in the middle of a burst finds it there.
CONFIG = """
[engine]
destage_delay = 3.0
max_dirty_bytes = "64MiB"
"""

VOLUME_SIZE = 32 * MiB
FIO_OPTIONS = [
    "--rw=randwrite",
    f"--size={VOLUME_SIZE}",
    "--bssplit=4k/40:16k/30:64k/30",
    "--iodepth=8",
    "--fsync=16",
    "--verify=crc32c",
    "--verify_interval=4096",
    "--do_verify=0",
    "--log_offset=1",
]


def _completed_writes(lat_log: Path) -> list[tuple[int, int]]:
    """(offset, length) of every write fio completed without error: its clat log lines are
    ``time, latency, direction, length, offset[, priority]`` (direction 1 is a write)."""
    writes = []
    if lat_log.exists():
        for line in lat_log.read_text().splitlines():
            fields = [f.strip() for f in line.split(",")]
            if len(fields) >= 5 and fields[2] == "1":
                writes.append((int(fields[4]), int(fields[3])))
    return writes


def _fio_verify(daemon: Daemon, name: str, writes: list[tuple[int, int]], workdir: Path) -> tuple[int, str]:
    """fio reads back exactly ``writes`` and checks them (crc32c); returns (bytes verified, problem or "")."""
    if not writes:
        return 0, ""
    iolog = workdir / f"verify-{name}.iolog"
    lines = ["fio version 2 iolog", "nbd add", "nbd open"]
    lines += [f"nbd read {offset} {length}" for offset, length in writes]
    lines.append("nbd close")
    iolog.write_text("\n".join(lines) + "\n")
    out = workdir / f"verify-{name}.json"
    # --bs: fio sizes its buffers by it, and would cut longer replayed reads short.  --iodepth=1:
    # fio 3.33 replaying an iolog at a greater depth accounts fewer bytes than it was given.
    options = [
        "--verify=crc32c",
        "--verify_interval=4096",
        f"--read_iolog={iolog}",
        "--iodepth=1",
        f"--bs={max(n for _, n in writes)}",
    ]
    result = run_fio(fio_argv([(name, daemon.uri(name))], options, out), out, workdir)
    expected = sum(length for _, length in writes)
    if result.returncode != 0 or result.errors().get(name, 1) != 0 or result.bytes_read() != expected:
        return result.bytes_read(), (
            f"fio verify of {name} failed (rc {result.returncode}, errors {result.errors()},"
            f" read {result.bytes_read()} of {expected} bytes): {result.stderr[-3000:]}"
        )
    return expected, ""


async def crash_rounds(
    make_daemon: Callable[..., Daemon],
    fio: str,
    *,
    rounds: int,
    wt_volumes: int,
    wb_volumes: int,
    seed: int,
    max_run: float,
) -> Figures:
    rng = random.Random(seed)
    figures = Figures("1-crash-nbd")
    daemon = make_daemon("crash", config=CONFIG)
    daemon.start()
    add_pds(daemon, Standard(count=4, size=512 * MiB), daemon.workdir)
    setup_pool(daemon, "mirror", 1)
    wt_names = [f"wt{i}" for i in range(wt_volumes)]
    wb_names = [f"wb{i}" for i in range(wb_volumes)]
    for name in wt_names:
        setup_volume(daemon, name, "mirror", VOLUME_SIZE, "writethrough")
    for name in wb_names:
        setup_volume(daemon, name, "mirror", VOLUME_SIZE, "writeback")
    checkers = {
        name: FlushChecker(100 + i, VOLUME_SIZE // BLOCK, random.Random(rng.getrandbits(32)))
        for i, name in enumerate(wb_names)
    }
    dirty_at_kill: list[int] = []
    flushed_blocks = 0
    fio_writes = 0
    problems: list[str] = []

    for round_no in range(rounds):
        round_seed = rng.getrandbits(31) + 1
        workdir = daemon.workdir / f"round{round_no}"
        workdir.mkdir()
        # --- load: fio on the write-through volumes, our checker on the write-back ones ---
        # One fio process per volume: each job is job 0 of its process, so that the verify run
        # after the restart (also one job) finds its state file.
        for name in wt_names:
            async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, name) as client:
                await client.trim(0, VOLUME_SIZE)
                await client.flush()
        fio_procs = {
            name: subprocess.Popen(
                fio_argv(
                    [(name, daemon.uri(name))],
                    [*FIO_OPTIONS, f"--randseed={round_seed}", f"--write_lat_log={workdir / name}"],
                    workdir / f"write-{name}.json",
                ),
                cwd=workdir,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in wt_names
        }
        try:
            clients = {name: await NBDClient.connect(LOOPBACK, daemon.nbd_port, name) for name in wb_names}
            stop = asyncio.Event()
            writers = [asyncio.create_task(checkers[name].run(clients[name], stop)) for name in wb_names]
            # The kill comes at a random moment once every volume is really being written.
            await asyncio.to_thread(wait_for_more_writes, daemon, wt_names + wb_names)
            await asyncio.sleep(rng.uniform(0.05, max_run))
            status = await asyncio.to_thread(daemon.api_get, "/status")
            dirty_at_kill.append(int(status["dirty_bytes"]))
            # --- the crash ---
            daemon.kill()
            figures.faults += 1
            await asyncio.wait_for(asyncio.gather(*writers), 60)
            for client in clients.values():
                await client.close()
        finally:
            for proc in fio_procs.values():
                try:
                    await asyncio.to_thread(proc.wait, 60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        completed = {name: _completed_writes(workdir / f"{name}_clat.1.log") for name in wt_names}
        for name in wb_names:
            flushed_blocks += checkers[name].flushed_blocks_in_epoch
            assert not checkers[name].stats.errors, (
                f"round {round_no}: {name}: {checkers[name].stats.errors[:5]}"
            )

        # --- after the crash: the check, a clean start, no region assigned twice ---
        rc, report = thinblock_check(daemon.data_dir)
        assert rc == 0 and report["ok"], f"round {round_no}: thinblock check after the kill: {report}"
        daemon.start()
        assert duplicate_ld_regions(daemon.data_dir) == [], (
            f"round {round_no}: an LD region is assigned twice"
        )

        # --- every acknowledged write of the write-through volumes (fio's own verification) ---
        for name in wt_names:
            fio_writes += len(completed[name])
            verified, problem = await asyncio.to_thread(_fio_verify, daemon, name, completed[name], workdir)
            figures.bytes_verified += verified
            if problem:
                problems.append(f"round {round_no}: {problem}")

        # --- every flushed write of the write-back volumes (our checker) ---
        for name in wb_names:
            checker = checkers[name]
            async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, name) as client:
                mismatches, observed = await checker.verify(client)
                figures.bytes_verified += VOLUME_SIZE
                if mismatches:
                    figures.data_lost += len(mismatches)
                    problems.append(
                        f"round {round_no}: {name}: {len(mismatches)} blocks lost, first: "
                        + "; ".join(str(m) for m in mismatches[:5])
                    )
                await client.flush()  # what was read back is now the durable baseline
            checker.new_epoch(observed)
        figures.rounds += 1
        assert not problems, "\n".join(problems)

    assert daemon.stop() == 0
    rc, report = thinblock_check(daemon.data_dir)
    assert rc == 0 and report["ok"], report
    # The write-back cache held dirty data at some kill (the drill's second case really happened),
    # and flushes really covered writes (the checker checked something).
    assert wb_volumes == 0 or max(dirty_at_kill) > 0, f"no dirty data at any kill: {dirty_at_kill}"
    assert wb_volumes == 0 or flushed_blocks > 0
    assert wt_volumes == 0 or fio_writes > 0
    figures.notes.update(
        {
            "kills": figures.faults,
            "kills_with_dirty_cache": sum(1 for d in dirty_at_kill if d),
            "max_dirty_bytes_at_kill": max(dirty_at_kill),
            "flushed_block_writes_checked": flushed_blocks,
            "fio_writes_checked": fio_writes,
            "checker_writes_acked": sum(c.stats.writes_acked for c in checkers.values()),
            "checker_flushes": sum(c.stats.flushes_done for c in checkers.values()),
        }
    )
    figures.report()
    return figures


async def test_crash_consistency_short(make_daemon: Callable[..., Daemon], fio: str) -> None:
    figures = await crash_rounds(make_daemon, fio, rounds=5, wt_volumes=2, wb_volumes=2, seed=1, max_run=1.5)
    assert figures.rounds == 5 and figures.data_lost == 0


@pytest.mark.long
@pytest.mark.timeout(3600)
async def test_crash_consistency_long(make_daemon: Callable[..., Daemon], fio: str) -> None:
    figures = await crash_rounds(
        make_daemon, fio, rounds=20, wt_volumes=3, wb_volumes=3, seed=20, max_run=4.0
    )
    assert figures.rounds == 20 and figures.data_lost == 0
