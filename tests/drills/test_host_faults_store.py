"""Drill 8, host faults, case 2 (issue 10): the metadata store's file system fills up.

The data directory (the SQLite store, its WAL, the lock) lives on a 16 MiB tmpfs the test
mounts; the PDs live elsewhere.  While a writer keeps assigning fresh regions, a filler file
takes every free byte of the tmpfs.  Required, and checked:

* memory never runs ahead of the store: a fresh-region write whose assignment cannot be
  committed fails with ENOSPC and leaves no trace (its region reads zeros, no map entry in
  memory or in the store); every acknowledged write reads back;
* overwrites of assigned regions and reads go on while the store is full;
* the condition is reported as such: a ``metadata-store-full`` alert, a clear API error
  (HTTP 507 naming the full store) for ``POST /volumes``;
* a flush while full still bumps the store generation (case 6's detection of a store that
  lost its WAL), in the room of the store's reserve (``metadata/reserve.py``): no
  ``generation-not-bumped`` in the log;
* when space returns the node goes on by itself: fresh writes succeed, the alert clears, a
  clean stop is clean, ``thinblock check`` passes and a restart serves everything acknowledged.

Short variant: one fill, one recovery, a clean stop.  Long variant: six rounds (32 fresh regions
before each fill, eight fresh writes in flight together while full), ended in turn by a clean
stop, kill -9 after space came back, and kill -9 while still full (space returns while the
daemon is down); every acknowledged write checked after every restart, and the check run.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.drills.conftest import DRILL_SERVE_ARGS
from tests.drills.harness import (
    BLOCK,
    Figures,
    MiB,
    Standard,
    add_pds,
    run_data,
    setup_volume,
    thinblock_check,
)
from tests.drills.nbd_client import NBD_ENOSPC, NBDClient, NBDError
from tests.support.daemon import LOOPBACK, Daemon

REGION = 64 * 1024
PER_REGION = REGION // BLOCK
STORE_FS = 16 * MiB


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """A file that takes every free byte of the file system under ``directory``."""
    filler = directory / "filler"
    chunk = b"\xff" * (64 * 1024)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while True:
            try:
                os.write(fd, chunk[: 4096 if os.fstatvfs(fd).f_bavail < 16 else len(chunk)])
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    break
                raise
    finally:
        os.close(fd)
    return filler


class Volume:
    """Whole-region writes of one volume, and what each region must hold."""

    def __init__(self, tag: int) -> None:
        self.tag = tag
        self.image: dict[int, int] = {}  # region -> seq of its last acknowledged write
        self.seq = 0
        self.refused = 0
        self.acknowledged = 0
        self.reserve_bumps = 0  # flushes whose generation bump used the store's reserve
        self.regions_checked = 0  # region reads compared with what they must hold
        self.bytes_verified = 0

    def data(self, region: int, seq: int) -> bytes:
        return run_data(self.tag, region * PER_REGION, PER_REGION, seq)

    async def write(self, client: NBDClient, region: int) -> bool:
        self.seq += 1
        seq = self.seq  # writes may be in flight together
        try:
            await client.write(region * REGION, self.data(region, seq))
        except NBDError as exc:
            assert exc.errno == NBD_ENOSPC, f"region {region}: {exc} (a full store must say ENOSPC)"
            self.refused += 1
            return False
        self.image[region] = seq
        self.acknowledged += 1
        return True

    async def verify(self, client: NBDClient, regions: int) -> None:
        data = await client.read_all(0, regions * REGION)
        for region in range(regions):
            seq = self.image.get(region)
            want = bytes(REGION) if seq is None else self.data(region, seq)
            got = data[region * REGION : (region + 1) * REGION]
            assert got == want, f"region {region}: expected {'zeros' if seq is None else f'write {seq}'}"
        self.regions_checked += regions
        self.bytes_verified += regions * REGION


def alert_kinds(daemon: Daemon, *, open_only: bool = True) -> list[str]:
    return [a["kind"] for a in daemon.alerts() if not open_only or a["state"] != "cleared"]


@dataclass(frozen=True)
class Round:
    """One fill of the store's file system: ``before`` fresh regions written and flushed first,
    then, while full, fresh writes one at a time until three are refused and ``burst`` more all
    in flight together; ``ending``: "clean stop" or "kill" after space came back, or "kill while
    full" (the daemon killed before the space returns; it comes back on restart)."""

    before: int
    burst: int
    ending: str


ENDINGS = ("clean stop", "kill", "kill while full")


async def one_round(daemon: Daemon, vol: Volume, store_dir: Path, first: int, plan: Round) -> int:
    """Write new regions from ``first`` while the store fills up; check the full state; give the
    space back (or kill the daemon first, by ``plan.ending``); write more.  Returns the next unused
    region."""
    async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, "v") as client:
        region = first
        for _ in range(plan.before):
            assert await vol.write(client, region)
            region += 1
        await client.flush()
        filler = fill(store_dir)
        refused_before = vol.refused
        for _ in range(1000):
            await vol.write(client, region)  # acknowledged or ENOSPC, nothing else
            region += 1
            if vol.refused - refused_before >= 3:
                break
        assert vol.refused - refused_before >= 3, (
            "fresh writes were not refused with the store's file system full"
        )
        # Several fresh writes in flight together: each commit that fails undoes only its own
        # assignment; any acknowledged one must read back, any refused one reads zeros.
        await asyncio.gather(*(vol.write(client, region + i) for i in range(plan.burst)))
        region += plan.burst
        # Reads and overwrites of assigned regions go on.
        for r in list(vol.image)[: max(4, plan.before)]:
            assert await vol.write(client, r), (
                f"overwrite of assigned region {r} refused while the store is full"
            )
        await vol.verify(client, region)
        assert "metadata-store-full" in alert_kinds(daemon)
        status, body = daemon.api_request(
            "POST",
            "/volumes",
            {"name": f"w{first}", "pool": "p", "size": 16 * MiB, "cache_mode": "writethrough"},
        )
        assert status == 507 and "metadata store" in str(body) and "full" in str(body), (status, body)
        # A flush while full: the store generation's bump (what makes a store that later loses
        # its WAL detectable, case 6) takes the store's reserve rather than being skipped.
        await client.flush()
        assert not daemon.events("generation-not-bumped"), daemon.events("generation-not-bumped")
        vol.reserve_bumps += len(daemon.events("store-reserve-released"))
        if plan.ending == "kill while full":
            client.abort()
            daemon.kill()
            filler.unlink()
            return region
        # Space returns: the node goes on by itself.
        filler.unlink()
        for _ in range(4):
            assert await vol.write(client, region), "a fresh write refused after space returned"
            region += 1
        await client.flush()
        await vol.verify(client, region)
        assert "metadata-store-full" not in alert_kinds(daemon)
    if plan.ending == "kill":
        daemon.kill()
    else:
        assert daemon.stop() == 0, daemon.log_tail()
    return region


async def store_full_drill(tmp_path: Path, plans: list[Round]) -> None:
    figures = Figures("host-faults-store-full")
    started = time.monotonic()
    with small_tmpfs(tmp_path / "store", STORE_FS) as store_dir:
        daemon = Daemon(
            tmp_path / "work", data_dir=store_dir / "data", args=DRILL_SERVE_ARGS, log_format="json"
        )
        try:
            daemon.start()
            add_pds(daemon, Standard(count=2, size=1024 * MiB, chunklet=1 * MiB), tmp_path / "work")
            daemon.cli_subprocess_json(
                "pool", "create", "p", "--raid", "1", "--region-size", "64K", "--growth-increment", "8MiB"
            )
            setup_volume(daemon, "v", "p", 512 * MiB)
            vol = Volume(tag=7)
            region = 0
            for plan in plans:
                region = await one_round(daemon, vol, store_dir, region, plan)
                figures.faults += 1  # one store-full episode
                figures.notes[plan.ending] = figures.notes.get(plan.ending, 0) + 1
                rc, report = thinblock_check(store_dir / "data")
                assert rc == 0 and report["ok"], report
                daemon.start()
                async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, "v") as client:
                    await vol.verify(client, region)
                figures.rounds += 1
            assert daemon.stop() == 0
        finally:
            daemon.kill()
    # Every verify asserts: reaching here means every acknowledged write read back.
    figures.bytes_verified = vol.bytes_verified
    figures.notes.update(
        writes_acknowledged=vol.acknowledged,
        fresh_writes_refused_enospc=vol.refused,
        regions_checked=vol.regions_checked,
        regions_written=region,
        generation_bumps_with_the_reserve=vol.reserve_bumps,
        seconds=round(time.monotonic() - started, 1),
    )
    figures.report()


def test_store_file_system_full_short(tmp_path: Path) -> None:
    asyncio.run(store_full_drill(tmp_path, [Round(before=4, burst=0, ending="clean stop")]))


@pytest.mark.long
@pytest.mark.timeout(1800)
def test_store_file_system_full_long(tmp_path: Path) -> None:
    plans = [Round(before=32, burst=8, ending=ENDINGS[n % len(ENDINGS)]) for n in range(6)]
    asyncio.run(store_full_drill(tmp_path, plans))
