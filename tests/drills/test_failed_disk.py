"""Drill 2: a failed disk under load.

Three pools share five PDs: RAID 1, RAID 5 (sets of 4) and RAID 0.  PD 0 is the largest, so every
LD has a chunklet on it (asserted, so that the drill fails PD 0 where it matters).  While fio writes
the RAID 1 and RAID 5 volumes with ``verify=crc32c`` (and ``verify_backlog``, so reads check data
during the writes as well as after), PD 0 fails:

* ``thinblock pd fail`` (the administrator's drill command), or
* its file starts returning EIO: the PD is a FUSE file served by nbdkit's file plugin behind its
  error filter, switched on by a trigger file (``harness.ErrorInjectingFile``).

Then: fio finishes with zero verification errors; the PD is ``failed``; ``pd-failed`` and
``ld-degraded`` alerts are recorded (``ld-failed`` for the RAID 0 LDs); the RAID 0 volume answers
every block it wrote either with the right data or NBD_EIO (never anything else), answers both,
and still takes writes to new regions; ``thinblock rebuild``, run at a terminal, shows its progress
bar and restores every RAID 1 and RAID 5 LD to ``normal`` (``rebuild-done`` alerts, degraded alerts
cleared); then another PD fails during a full read-back of everything fio wrote, and nothing is lost.

Short variant (CI): one failure of each kind.  Long variant: bigger volumes, three failure and
rebuild cycles (a new PD replaces each failed one, as an administrator would), then a last failure.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.drills.harness import (
    BLOCK,
    ErrorInjectingFile,
    Figures,
    MiB,
    Standard,
    add_pds,
    decode_block,
    fio_argv,
    read_fio_output,
    run_data,
    run_in_terminal,
    setup_pool,
    setup_volume,
    wait_for_more_writes,
)
from tests.drills.nbd_client import NBD_EIO, NBDClient, NBDError
from tests.support.daemon import LOOPBACK, THINBLOCK_SCRIPT, Daemon
from thinblock.physical.header import HEADER_AREA

BIG_PD = 256 * MiB
SMALL_PD = 128 * MiB
RAID0_WRITTEN = 4 * MiB  # the RAID 0 volume's first 4 MiB are written before the failure


def _fio_options(size: int, seed: int, *, verify_only: bool = False) -> list[str]:
    options = [
        "--rw=randwrite",
        f"--size={size}",
        "--bssplit=4k/40:16k/30:64k/30",
        "--iodepth=8",
        "--verify=crc32c",
        "--verify_interval=4096",
        f"--randseed={seed}",
    ]
    # The rate cap makes the writes last long enough for a PD to fail in the middle of them, on a
    # fast machine as on a slow one.
    if verify_only:
        return [*options, "--verify_only=1"]
    return [*options, "--verify_backlog=128", "--fsync=32", "--rate=,6m"]


class Load:
    """fio on the RAID 1 and RAID 5 volumes, as one process with one job per volume."""

    def __init__(
        self, daemon: Daemon, volumes: list[str], size: int, seed: int, workdir: Path, verify_only: bool
    ):
        self.volumes = volumes
        self.output = workdir / f"fio-{seed}-{'verify' if verify_only else 'write'}.json"
        argv = fio_argv(
            [(v, daemon.uri(v)) for v in volumes],
            _fio_options(size, seed, verify_only=verify_only),
            self.output,
        )
        self.proc = subprocess.Popen(
            argv, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def running(self) -> bool:
        return self.proc.poll() is None

    async def finish(self, timeout: float = 600) -> tuple[int, str]:
        """Wait; (bytes fio read and verified, problem or "")."""
        try:
            await asyncio.to_thread(self.proc.wait, timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        stderr = self.proc.stderr.read() if self.proc.stderr else ""
        result = read_fio_output(self.proc.returncode, self.output, stderr)
        errors = result.errors()
        if self.proc.returncode != 0 or set(errors) != set(self.volumes) or any(errors.values()):
            return (
                result.bytes_read(),
                f"fio failed (rc {self.proc.returncode}, errors {errors}): {result.stderr[-3000:]}",
            )
        return result.bytes_read(), ""


def _lds(daemon: Daemon) -> list[dict[str, Any]]:
    return list(daemon.cli_subprocess_json("ld", "list"))


def _pds_of(ld: dict[str, Any]) -> set[int]:
    return {int(c["pd_id"]) for c in ld["chunklets"]}


def _alerts_of(daemon: Daemon, kind: str) -> list[dict[str, Any]]:
    return [a for a in daemon.alerts() if a["kind"] == kind]


def _objects(daemon: Daemon, kind: str) -> set[str]:
    """The objects that have (or had) an alert of ``kind``."""
    return {a["object"] for a in _alerts_of(daemon, kind)}


async def _raid0_check(daemon: Daemon, volume: str, tag: int) -> tuple[int, int, int]:
    """Every written block of the RAID 0 volume: right data or EIO.  (ok, eio, bytes verified)."""
    ok = eio = 0
    async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, volume) as client:
        for first in range(0, RAID0_WRITTEN // BLOCK, 16):  # 64 KiB reads: one region each
            try:
                data = await client.read(first * BLOCK, 16 * BLOCK)
            except NBDError as exc:
                assert exc.errno == NBD_EIO, f"RAID 0 read of blocks {first}+16: {exc}"
                eio += 1
                continue
            for i in range(16):
                found = decode_block(data[i * BLOCK : (i + 1) * BLOCK])
                assert (found.kind, found.tag, found.block, found.seq) == ("pattern", tag, first + i, 1), (
                    f"RAID 0 block {first + i} reads {found}"
                )
            ok += 1
        # The volume keeps serving: a write to a region it never had lands on a new LD of healthy PDs.
        fresh = RAID0_WRITTEN // BLOCK + 3
        await client.write(fresh * BLOCK, run_data(tag, fresh, 2, 2))
        await client.flush()
        assert await client.read(fresh * BLOCK, 2 * BLOCK) == run_data(tag, fresh, 2, 2)
    return ok, eio, ok * 16 * BLOCK


async def failed_disk_drill(
    make_daemon: Callable[..., Daemon], *, method: str, cycles: int, volume_size: int, seed: int
) -> Figures:
    rng = random.Random(seed)
    figures = Figures(f"2-failed-disk-{method}")
    daemon = make_daemon(f"disk-{method}")
    work = daemon.workdir
    fuse: ErrorInjectingFile | None = None
    try:
        daemon.start()
        if method == "io-error":
            fuse = ErrorInjectingFile(work, HEADER_AREA + BIG_PD)  # the PD header's area, then chunklets
            fuse.start()
            # A FUSE file reports no holes: it reads as "data", so it is taken with the typed path.
            body = {"path": str(fuse.path), "size": BIG_PD, "chunklet_size": MiB}
            daemon.api_ok("POST", "/pds", {**body, "force": True, "confirm": str(fuse.path)})
            add_pds(daemon, Standard(count=4, size=SMALL_PD), work, first=1)
        else:
            add_pds(daemon, Standard(sizes=[BIG_PD] + [SMALL_PD] * 4), work)
        setup_pool(daemon, "r1", 1, increment=4 * MiB)
        setup_pool(daemon, "r5", 5, increment=6 * MiB, set_size=4)
        setup_pool(daemon, "r0", 0, increment=4 * MiB)
        setup_volume(daemon, "v1", "r1", volume_size)
        setup_volume(daemon, "v5", "r5", volume_size)
        setup_volume(daemon, "v0", "r0", 2 * RAID0_WRITTEN)
        async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, "v0") as client:
            for first in range(0, RAID0_WRITTEN // BLOCK, 64):
                await client.write(first * BLOCK, run_data(7, first, 64, 1))
            await client.flush()
        redundant = ["v1", "v5"]
        target = 1  # PD 0, the largest: every LD has a chunklet on it
        for ld in _lds(daemon):
            assert target in _pds_of(ld), f"LD {ld['id']} ({ld['pool']}) has no chunklet on PD {target}"
        spare_no = 5

        for cycle in range(cycles):
            cycle_seed = rng.getrandbits(31) + 1
            load = Load(daemon, redundant, volume_size, cycle_seed, work, verify_only=False)
            await asyncio.to_thread(wait_for_more_writes, daemon, redundant)
            await asyncio.sleep(rng.uniform(0.1, 0.5))
            affected = [ld for ld in _lds(daemon) if target in _pds_of(ld)]
            # --- the failure, under load ---
            if method == "io-error" and cycle == 0:
                assert fuse is not None
                fuse.fail()
            else:
                daemon.cli_subprocess_json("pd", "fail", str(target))
            figures.faults += 1
            assert load.running(), "fio had finished before the PD failed: the drill needs a longer load"
            verified, problem = await load.finish()
            figures.bytes_verified += verified
            assert not problem, f"cycle {cycle}: {problem}"
            pd = daemon.cli_subprocess_json("pd", "show", str(target))
            assert pd["health"] == "failed", pd
            if method == "io-error" and cycle == 0:
                # It failed by itself, on an I/O error, not by an administrator's command.
                messages = [
                    a["message"] for a in _alerts_of(daemon, "pd-failed") if a["object"] == f"pd:{target}"
                ]
                assert any("Input/output error" in m for m in messages), messages

            # --- the alerts ---
            assert f"pd:{target}" in _objects(daemon, "pd-failed")
            for ld in affected:
                kind = "ld-failed" if ld["raid"] == 0 else "ld-degraded"
                assert f"ld:{ld['id']}" in _objects(daemon, kind), (
                    f"no {kind} alert for LD {ld['id']} ({ld['pool']})"
                )
            health = {ld["id"]: ld["health"] for ld in _lds(daemon)}
            for ld in affected:
                assert health[ld["id"]] == ("failed" if ld["raid"] == 0 else "degraded"), (ld["id"], health)

            # --- RAID 0: what it lost answers EIO, the rest reads right, and it keeps serving ---
            if cycle == 0:
                ok, eio, nbytes = await _raid0_check(daemon, "v0", 7)
                assert ok > 0 and eio > 0, f"RAID 0 regions readable {ok}, EIO {eio}: expected both"
                figures.bytes_verified += nbytes
                figures.notes["raid0_regions_eio"] = eio
                figures.notes["raid0_regions_ok"] = ok

            # --- rebuild (a replacement PD first, after the first failure) ---
            if cycle > 0:
                daemon.cli_subprocess_json(
                    "pd",
                    "add",
                    str(work / f"pd{spare_no}.img"),
                    "--size",
                    str(SMALL_PD),
                    "--chunklet-size",
                    "1MiB",
                )
                spare_no += 1
            rc, screen = await asyncio.to_thread(
                run_in_terminal, [THINBLOCK_SCRIPT, "--api", daemon.api_url, "rebuild"]
            )
            assert rc == 0, screen
            assert "rebuild" in screen and "100%" in screen, f"no progress shown:\n{screen}"
            lds = _lds(daemon)
            failed_pds = {
                int(p["id"]) for p in daemon.cli_subprocess_json("pd", "list") if p["health"] == "failed"
            }
            for ld in lds:
                if ld["raid"] != 0:
                    assert ld["health"] == "normal", ld
                    assert not _pds_of(ld) & failed_pds, f"LD {ld['id']} still uses a failed PD: {ld}"
            done = {a["object"] for a in _alerts_of(daemon, "rebuild-done")}
            for ld in affected:
                if ld["raid"] != 0:
                    assert f"ld:{ld['id']}" in done, f"no rebuild-done for LD {ld['id']}"
            open_degraded = [a for a in _alerts_of(daemon, "ld-degraded") if a["state"] != "cleared"]
            assert not open_degraded, open_degraded
            figures.rounds += 1
            target = _most_used_pd(lds, failed_pds)

        # --- another PD fails under a read load; then everything fio wrote reads back right ---
        stop = asyncio.Event()
        readers = [
            asyncio.create_task(_read_load(daemon, v, volume_size, stop, rng.getrandbits(32)))
            for v in redundant
        ]
        await asyncio.sleep(0.2)
        await asyncio.to_thread(daemon.cli_subprocess_json, "pd", "fail", str(target))
        figures.faults += 1
        await asyncio.sleep(0.2)
        stop.set()
        reads = await asyncio.gather(*readers)
        assert all(n > 0 for n in reads), f"the read load did not run: {reads}"
        load = Load(daemon, redundant, volume_size, cycle_seed, work, verify_only=True)
        verified, problem = await load.finish()
        figures.bytes_verified += verified
        assert not problem, f"after the second failure: {problem}"
        assert verified >= 2 * volume_size, f"fio read back {verified} bytes of {2 * volume_size}"
        degraded = {a["object"] for a in _alerts_of(daemon, "ld-degraded") if a["state"] != "cleared"}
        assert degraded, "the second failure raised no ld-degraded alert"
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        if fuse is not None:
            fuse.close()
    figures.report()
    return figures


async def _read_load(daemon: Daemon, volume: str, size: int, stop: asyncio.Event, seed: int) -> int:
    """Random 64 KiB reads, 4 in flight, until ``stop``; every one must succeed.  How many were done."""
    rng = random.Random(seed)
    done = 0
    async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, volume) as client:

        async def one() -> None:
            nonlocal done
            while not stop.is_set():
                await client.read(rng.randrange(0, size // (64 * 1024)) * 64 * 1024, 64 * 1024)
                done += 1

        await asyncio.gather(*(one() for _ in range(4)))
    return done


def _most_used_pd(lds: list[dict[str, Any]], failed: set[int]) -> int:
    counts: dict[int, int] = {}
    for ld in lds:
        if ld["raid"] != 0:
            for pd in _pds_of(ld) - failed:
                counts[pd] = counts.get(pd, 0) + 1
    return max(counts, key=lambda pd: (counts[pd], -pd))


async def test_pd_fail_under_load_short(make_daemon: Callable[..., Daemon], fio: str) -> None:
    figures = await failed_disk_drill(make_daemon, method="admin", cycles=1, volume_size=16 * MiB, seed=2)
    assert figures.faults == 2 and figures.data_lost == 0


async def test_io_errors_under_load_short(make_daemon: Callable[..., Daemon], fio: str) -> None:
    why = ErrorInjectingFile.unavailable()
    if why:
        pytest.skip(f"cannot make a file return I/O errors here: {why}")
    figures = await failed_disk_drill(make_daemon, method="io-error", cycles=1, volume_size=16 * MiB, seed=3)
    assert figures.faults == 2 and figures.data_lost == 0


@pytest.mark.long
@pytest.mark.timeout(3600)
async def test_pd_fail_under_load_long(make_daemon: Callable[..., Daemon], fio: str) -> None:
    figures = await failed_disk_drill(make_daemon, method="admin", cycles=3, volume_size=48 * MiB, seed=22)
    assert figures.faults == 4 and figures.data_lost == 0


@pytest.mark.long
@pytest.mark.timeout(3600)
async def test_io_errors_under_load_long(make_daemon: Callable[..., Daemon], fio: str) -> None:
    why = ErrorInjectingFile.unavailable()
    if why:
        pytest.skip(f"cannot make a file return I/O errors here: {why}")
    figures = await failed_disk_drill(make_daemon, method="io-error", cycles=3, volume_size=48 * MiB, seed=23)
    assert figures.faults == 4 and figures.data_lost == 0
