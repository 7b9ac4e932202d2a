"""Drill 8: host faults (issue 10 cases 1, 4, 5 and 6; case 2 is drill 8's store half in the
metadata suites, case 3 is ``test_host_faults_raid5.py``).

What the host around the daemon does to it, each reproduced with the real daemon and real
clients (qemu-io patterns and flushes), on small file systems the test mounts itself (tmpfs):

* **case 4, a PD file cut short or replaced while serving**: reads of the cut mirror are I/O
  errors of that PD (failed, alert), the other mirror answers, never zeros; the periodic check
  finds a cut or replaced file no one reads; a restart keeps the PD failed (its header).
* **case 5, the data directory's file system fills up** (tmpfs): ENOSPC, not a disk failure.
* **case 6, the WAL deleted after kill -9**: the daemon refuses to start, naming the store as
  older than the data.
* **case 1, a member failure the store cannot record**: nothing more is acknowledged until it
  is recorded; a restart (clean or kill -9) never serves or resyncs from the stale mirror.

Each case is a short test (the default run) and a long one (``-m long``).
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.drills.harness import Figures, MiB, Standard, add_pds, setup_pool, setup_volume, thinblock_check
from tests.e2e.client_tools import qemu_io
from tests.support.daemon import Daemon
from thinblock.physical.header import HEADER_AREA

# Quick PD checks, so that a test sees the periodic check act within a second.
CONFIG = """
[engine]
pd_check_interval = 0.3
"""
REGION = 64 * 1024


# --- helpers -------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: int, daemon: Daemon | None = None) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted on ``path`` for the block; unmounted after it (after
    killing ``daemon`` if it still runs there: a test that failed half-way)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root and mount(8) needed): {result.stderr.strip()}")
    try:
        yield path
    finally:
        if daemon is not None:
            daemon.kill()
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def first_mirror(daemon: Daemon, pool: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(PD of column 0, PD of column 1) of the pool's first LD: RAID 1 reads column 0 first."""
    [ld] = [ld for ld in daemon.cli_subprocess_json("ld", "list") if ld["pool"] == pool][:1]
    by_id = {pd["id"]: pd for pd in daemon.cli_subprocess_json("pd", "list")}
    cols = sorted((c for c in ld["chunklets"] if c["row"] == 0), key=lambda c: c["column"])
    return by_id[cols[0]["pd_id"]], by_id[cols[1]["pd_id"]]


def pd_health(daemon: Daemon) -> dict[int, str]:
    return {pd["id"]: pd["health"] for pd in daemon.cli_subprocess_json("pd", "list")}


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.1)


def wait_for_health(daemon: Daemon, pd_id: int, health: str, timeout: float = 20.0) -> None:
    wait_for(f"PD {pd_id} {health}", lambda: pd_health(daemon)[pd_id] == health, timeout)


def alert_objects(daemon: Daemon, kind: str) -> set[str]:
    return {a["object"] for a in daemon.alerts() if a["kind"] == kind}


def write_flush(daemon: Daemon, volume: str, value: int, offset: int, length: int) -> None:
    _qemu_io_or_log(daemon, volume, f"write -P {value:#04x} {offset} {length}", "flush")


def read_check(daemon: Daemon, volume: str, value: int, offset: int, length: int) -> None:
    _qemu_io_or_log(daemon, volume, f"read -P {value:#04x} {offset} {length}")


def _qemu_io_or_log(daemon: Daemon, volume: str, *commands: str) -> None:
    """qemu-io that must succeed; when it does not, the daemon's log tail goes with the failure
    (a refusal seen once under load could not be explained without it)."""
    try:
        qemu_io(daemon.uri(volume), *commands)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- daemon log ---\n{daemon.log_tail()}") from None


# --- case 4: a PD file cut short or replaced while serving ---------------------------------------


def truncated_pd_drill(make_daemon: Callable[..., Daemon], *, rounds: int, size: int, seed: int) -> Figures:
    """Each round: a RAID 1 volume written and flushed; the file of the mirror reads go to first is
    cut short (at a random place in its chunklets) or replaced by a blank file; reads return the
    data (from the other mirror), the PD is failed with a pd-failed alert naming the cause; a
    rebuild onto a new PD restores redundancy; a restart keeps the bad PD failed and serves the
    data."""
    rng = random.Random(seed)
    figures = Figures("8-host-faults-truncated-pd")
    daemon = make_daemon("truncated", config=CONFIG)
    work = daemon.workdir
    daemon.start()
    # Every round adds a volume and fails a PD: the survivors hold all volumes of all rounds.
    add_pds(daemon, Standard(count=2, size=(rounds + 2) * size), work)
    setup_pool(daemon, "r1", 1, region=REGION, increment=4 * MiB)
    spare = 2
    for n in range(rounds):
        volume = f"v{n}"
        value = 0x41 + n
        setup_volume(daemon, volume, "r1", size)
        write_flush(daemon, volume, value, 0, size)
        bad, good = first_mirror(daemon, "r1")
        how = ("truncate-read", "truncate-idle", "replace")[n % 3] if rounds > 1 else "truncate-read"
        path = Path(bad["path"])
        if how == "replace":
            blank = path.with_suffix(".new")
            with blank.open("wb") as f:
                f.truncate(path.stat().st_size)
            os.rename(blank, path)
        else:
            os.truncate(path, HEADER_AREA + rng.randrange(0, size // 2, 4096))
        figures.faults += 1
        if how == "truncate-read":
            # The read itself meets the end of the file: an I/O error of that PD, not zeros.
            read_check(daemon, volume, value, 0, size)
        # The periodic check finds it whether or not anything reads it.
        wait_for_health(daemon, int(bad["id"]), "failed")
        assert pd_health(daemon)[good["id"]] == "normal"
        read_check(daemon, volume, value, 0, size)
        figures.bytes_verified += size
        failed_alerts = [
            a for a in daemon.alerts() if a["kind"] == "pd-failed" and a["object"] == f"pd:{bad['id']}"
        ]
        assert failed_alerts, "no pd-failed alert for the cut PD"
        expected = "another file" if how == "replace" else "short"
        assert any(expected in a["message"] or "shorter" in a["message"] for a in failed_alerts), (
            failed_alerts
        )
        # A restart: the PD stays failed (its file is short or has no header) and the data reads.
        assert daemon.stop() == 0
        daemon.start()
        assert pd_health(daemon)[bad["id"]] == "failed"
        read_check(daemon, volume, value, 0, size)
        figures.bytes_verified += size
        # The administrator's way back: a new PD, a rebuild.
        add_pds(daemon, Standard(count=1, size=(rounds + 2) * size), work, first=spare)
        spare += 1
        result = daemon.cli_subprocess("rebuild")
        assert result.returncode == 0, result.stderr
        for ld in daemon.cli_subprocess_json("ld", "list"):
            assert ld["health"] == "normal", ld
        read_check(daemon, volume, value, 0, size)
        figures.bytes_verified += size
        figures.rounds += 1
    assert daemon.stop() == 0
    return figures


def test_truncated_pd_short(make_daemon: Callable[..., Daemon]) -> None:
    truncated_pd_drill(make_daemon, rounds=1, size=8 * MiB, seed=4).report()


@pytest.mark.long
def test_truncated_pd_long(make_daemon: Callable[..., Daemon]) -> None:
    truncated_pd_drill(make_daemon, rounds=6, size=32 * MiB, seed=44).report()


# --- case 6: the WAL deleted after kill -9 -------------------------------------------------------


def wal_deleted_drill(make_daemon: Callable[..., Daemon], *, rounds: int, size: int) -> Figures:
    """Each round: a new volume written and flushed, kill -9, the store's WAL deleted (and its
    shared-memory index): the daemon must refuse to start with one line naming the store as older
    than the data, and ``thinblock check`` must say the same; with the WAL put back it starts and
    every volume reads back."""
    figures = Figures("8-host-faults-wal-deleted")
    daemon = make_daemon("wal", config=CONFIG)
    data = daemon.data_dir
    daemon.start()
    add_pds(daemon, Standard(count=2, size=4 * size * rounds), daemon.workdir)
    setup_pool(daemon, "r1", 1, region=REGION, increment=4 * MiB)
    assert daemon.stop() == 0  # a clean stop checkpoints the WAL: the store file holds the pool
    daemon.start()
    for n in range(rounds):
        setup_volume(daemon, f"v{n}", "r1", size)
        write_flush(daemon, f"v{n}", 0x61 + n, 0, size)
        daemon.kill()
        wal = data / "thinblock.db-wal"
        saved = wal.read_bytes()
        wal.unlink()
        (data / "thinblock.db-shm").unlink(missing_ok=True)
        figures.faults += 1
        status, records = daemon.start_expecting_failure()
        refusals = [str(r.get("msg")) for r in records if r.get("event") == "startup-failed"]
        assert status == 1, f"the daemon started on a store without its WAL (exit {status}): {refusals}"
        assert len(refusals) == 1 and "older than the data" in refusals[0], refusals
        code, report = thinblock_check(data)
        assert code == 1 and any("older than the data" in p for p in report["problems"]), report
        # The WAL back: nothing was lost, every volume reads back.
        wal.write_bytes(saved)
        daemon.start()
        for m in range(n + 1):
            read_check(daemon, f"v{m}", 0x61 + m, 0, size)
            figures.bytes_verified += size
        figures.rounds += 1
    assert daemon.stop() == 0
    return figures


def test_wal_deleted_short(make_daemon: Callable[..., Daemon]) -> None:
    wal_deleted_drill(make_daemon, rounds=1, size=4 * MiB).report()


@pytest.mark.long
def test_wal_deleted_long(make_daemon: Callable[..., Daemon]) -> None:
    wal_deleted_drill(make_daemon, rounds=5, size=16 * MiB).report()


# --- case 1: a member failure the store cannot record --------------------------------------------


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte with a file; its path."""
    filler = directory / "filler"
    chunk = b"\xff" * MiB
    with filler.open("wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError:
                break
    for size in (65536, 4096, 512, 1):  # the last partial pages too
        with filler.open("ab", buffering=0) as f:
            while True:
                try:
                    f.write(b"\xff" * size)
                except OSError:
                    break
    return filler


def write_refused(daemon: Daemon, volume: str, value: int, offset: int, length: int) -> bool:
    result = qemu_io(daemon.uri(volume), f"write -P {value:#04x} {offset} {length}", check=False)
    return "write failed" in result.stdout + result.stderr


def write_until_accepted(daemon: Daemon, volume: str, value: int, offset: int, length: int) -> None:
    deadline = time.monotonic() + 30
    while write_refused(daemon, volume, value, offset, length):
        assert time.monotonic() < deadline, "writes still refused 30 s after space came back"
        time.sleep(0.2)
    qemu_io(daemon.uri(volume), "flush")


def unrecorded_failure_drill(
    make_daemon: Callable[..., Daemon], *, rounds: int, size: int, kill_while_full: bool
) -> Figures:
    """Mirror A's PD file and the store on a small tmpfs, mirror B on the disk.  Each round: pattern
    written and flushed; the tmpfs filled; PD A fails (``thinblock pd fail``) while the store cannot
    record it.  Writes to the volume must be refused (EIO), reads served.  Then either space comes
    back (writes accepted again once the failure is recorded; a new pattern written and flushed) or
    the daemon is killed while the store still cannot record (``kill_while_full``: the record in
    B's header is all that is left of the failure).  Then kill -9 and restart: A is failed, the
    newest flushed pattern reads back (the unclean-start resync did not copy A over B), a rebuild
    onto a new PD restores the mirror."""
    figures = Figures("8-host-faults-unrecorded-failure" + ("-killed-full" if kill_while_full else ""))
    daemon = make_daemon("unrecorded-kill" if kill_while_full else "unrecorded", config=CONFIG)
    work = daemon.workdir
    with tmpfs(daemon.data_dir, 24 * MiB + 4 * size * rounds, daemon):
        daemon.start()
        daemon.api_ok(
            "POST",
            "/pds",
            {"path": str(daemon.data_dir / "a.img"), "size": 2 * size * rounds, "chunklet_size": MiB},
        )
        daemon.api_ok(
            "POST", "/pds", {"path": str(work / "b.img"), "size": 2 * size * rounds, "chunklet_size": MiB}
        )
        setup_pool(daemon, "r1", 1, region=REGION, increment=size)
        for n in range(rounds):
            volume = f"v{n}"
            setup_volume(daemon, volume, "r1", size)
            write_flush(daemon, volume, 0x41 + n, 0, size)
            a, b = first_mirror(daemon, "r1")
            filler = fill(daemon.data_dir)
            result = daemon.cli_subprocess("pd", "fail", str(a["id"]))
            assert result.returncode == 0, result.stderr
            figures.faults += 1
            # Not recorded in the store: nothing more acknowledged, reads served from B.
            assert write_refused(daemon, volume, 0x61 + n, 0, size), (
                "a write was acknowledged while the failure was unrecorded"
            )
            read_check(daemon, volume, 0x41 + n, 0, size)
            assert any(r.get("event") == "pd-failure-unrecorded" for r in daemon.log_records()), (
                "no log line says the failure could not be recorded"
            )
            expected = 0x41 + n
            if not kill_while_full:
                filler.unlink()
                write_until_accepted(daemon, volume, 0x71 + n, 0, size)
                expected = 0x71 + n
                assert f"pd:{a['id']}" in alert_objects(daemon, "pd-failed")
            daemon.kill()
            if kill_while_full:
                filler.unlink()
            daemon.start()
            assert pd_health(daemon)[a["id"]] == "failed", "the failure was forgotten by the restart"
            assert pd_health(daemon)[b["id"]] == "normal"
            read_check(daemon, volume, expected, 0, size)
            figures.bytes_verified += size
            # After a clean stop too.
            assert daemon.stop() == 0
            daemon.start()
            assert pd_health(daemon)[a["id"]] == "failed"
            read_check(daemon, volume, expected, 0, size)
            figures.bytes_verified += size
            # The administrator's way back: a new PD (on the disk), a rebuild.
            daemon.api_ok(
                "POST",
                "/pds",
                {"path": str(work / f"spare{n}.img"), "size": 2 * size * rounds, "chunklet_size": MiB},
            )
            result = daemon.cli_subprocess("rebuild")
            assert result.returncode == 0, result.stderr
            read_check(daemon, volume, expected, 0, size)
            figures.rounds += 1
        assert daemon.stop() == 0
    return figures


def test_unrecorded_failure_short(make_daemon: Callable[..., Daemon]) -> None:
    unrecorded_failure_drill(make_daemon, rounds=1, size=4 * MiB, kill_while_full=False).report()


def test_unrecorded_failure_killed_while_full_short(make_daemon: Callable[..., Daemon]) -> None:
    unrecorded_failure_drill(make_daemon, rounds=1, size=4 * MiB, kill_while_full=True).report()


@pytest.mark.long
@pytest.mark.parametrize("kill_while_full", [False, True])
def test_unrecorded_failure_long(make_daemon: Callable[..., Daemon], kill_while_full: bool) -> None:
    unrecorded_failure_drill(make_daemon, rounds=3, size=8 * MiB, kill_while_full=kill_while_full).report()


# --- case 5: the data directory's file system fills up -------------------------------------------


def write_result(daemon: Daemon, volume: str, value: int, offset: int, length: int) -> str:
    result = qemu_io(daemon.uri(volume), f"write -P {value:#04x} {offset} {length}", "flush", check=False)
    return result.stdout + result.stderr


def host_full_drill(
    make_daemon: Callable[..., Daemon], *, rounds: int, size: int, stop_while_full: bool
) -> Figures:
    """The whole data directory (store and both PD files of a RAID 1 pool) on a small tmpfs.  Each
    round: a pattern written and flushed, the tmpfs filled.  Writes needing new space fail with
    ENOSPC (not EIO); writes to written regions and reads go on; no PD is failed; a pd-host-full
    alert is raised.  Space back: the alert clears, fresh writes succeed.  A clean stop (SIGTERM,
    while full when ``stop_while_full``) exits 0 and the next start is clean."""
    figures = Figures("8-host-faults-host-full" + ("-stopped-full" if stop_while_full else ""))
    daemon = make_daemon("full-stop" if stop_while_full else "full", config=CONFIG)
    # Each round leaves 2 size on each of the 2 mirrors (a pattern and a fresh write).
    with tmpfs(daemon.data_dir, 16 * MiB + 5 * size * rounds, daemon):
        daemon.start()
        add_pds(daemon, Standard(count=2, size=8 * size * rounds), daemon.data_dir)
        # One LD for the whole volume from the first write: the drill is about PD space; the store
        # needing room for a new LD is issue 10 case 2 (the metadata suites).
        setup_pool(daemon, "r1", 1, region=REGION, increment=8 * size * rounds)
        setup_volume(daemon, "v", "r1", 8 * size * rounds)
        for n in range(rounds):
            base = 2 * n * size
            write_flush(daemon, "v", 0x51 + n, base, size)
            filler = fill(daemon.data_dir)
            figures.faults += 1
            # A write needing new regions: ENOSPC, a space condition.
            out = write_result(daemon, "v", 0x71, base + size, size)
            assert "No space left on device" in out, out
            # Written regions take writes; everything written reads back; no PD failed.
            write_flush(daemon, "v", 0x61 + n, base, size)
            for m in range(n):
                read_check(daemon, "v", 0x61 + m, 2 * m * size, size)
            read_check(daemon, "v", 0x61 + n, base, size)
            figures.bytes_verified += (n + 1) * size
            assert set(pd_health(daemon).values()) == {"normal"}
            assert alert_objects(daemon, "pd-host-full") or any(
                r.get("event") == "pd-host-full" for r in daemon.log_records()
            ), "nothing said the host file system was full"
            if stop_while_full:
                # Every write flushed: exit 0.  The store, on the full file system too, may not take
                # the clean mark; then the next start re-checks redundancy (and the log says so).
                assert daemon.stop() == 0, daemon.log_tail()
                marked = not any(r.get("event") == "clean-mark-not-written" for r in daemon.log_records())
                filler.unlink()
                daemon.start()
                recovered = any(r.get("event") == "resync-done" for r in daemon.log_records())
                assert recovered != marked, (
                    f"clean mark written: {marked}, unclean-start recovery: {recovered}"
                )
                figures.notes["clean_mark_written"] = marked
            else:
                filler.unlink()
            # Room again: fresh writes succeed (the alert clears on the next PD check).
            write_flush(daemon, "v", 0x71, base + size, size)
            read_check(daemon, "v", 0x71, base + size, size)
            wait_for(
                "pd-host-full alerts cleared",
                lambda: (
                    not any(a["kind"] == "pd-host-full" and a["state"] != "cleared" for a in daemon.alerts())
                ),
            )
            figures.rounds += 1
        assert daemon.stop() == 0
    return figures


def test_host_full_short(make_daemon: Callable[..., Daemon]) -> None:
    host_full_drill(make_daemon, rounds=1, size=4 * MiB, stop_while_full=False).report()


def test_host_full_stop_while_full_short(make_daemon: Callable[..., Daemon]) -> None:
    host_full_drill(make_daemon, rounds=1, size=4 * MiB, stop_while_full=True).report()


@pytest.mark.long
@pytest.mark.parametrize("stop_while_full", [False, True])
def test_host_full_long(make_daemon: Callable[..., Daemon], stop_while_full: bool) -> None:
    host_full_drill(make_daemon, rounds=4, size=8 * MiB, stop_while_full=stop_while_full).report()
