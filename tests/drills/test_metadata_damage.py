"""Drill 6: metadata damage.

A data directory is built and stopped cleanly (volumes with known data).  Then, each time from
that same state, its metadata store (``thinblock.db``, SQLite) is damaged -- truncated (to nothing,
to half, its last pages), bytes flipped at random, a region-map row deleted, a map entry pointed at
an LD that does not exist, an LD deleted, one map row's value changed in the table's page but not
in its unique index (a bit flipped on the disk) -- and:

* ``thinblock check --data DIR`` (the documented check command, docs/reliability.md) reports it;
* ``thinblock serve`` refuses to start, exits non-zero, and its log names the same damage the
  check reported;
* and never serves wrong data: when a damage is harmless (a flipped byte in free space, say), the
  check passes, the daemon starts, and every block of every volume reads back exactly as written.

A check that passes while the daemon refuses, or the reverse, fails the drill; so does any block
read back wrong from a daemon that started.  One difference is by design: when the damage makes
the store name a PD file that does not exist, the check reports the missing file and the daemon
serves with that PD failed (a pd-failed alert; every block must still read back right).

Short variant (CI): each targeted damage once, and 6 random damages.  Long variant: 200 random
damages (flips of 1 to 64 bytes anywhere in the file, truncations at random lengths).
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.drills.harness import (
    Figures,
    MiB,
    Standard,
    add_pds,
    run_data,
    setup_pool,
    setup_volume,
    thinblock_check,
)
from tests.drills.nbd_client import HandshakeError, NBDClient, NBDError
from tests.support.daemon import LOOPBACK, Daemon

REGION = 64 * 1024
VOLUMES = {"alpha": (1, 4 * MiB), "beta": (2, 4 * MiB), "gamma": (3, 2 * MiB)}


@dataclass
class Outcome:
    damage: str
    check_ok: bool
    check_problems: list[str]
    started: bool
    refusal: str


def _copy_tree(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    # cp keeps the sparse PD files sparse
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst)], check=True)


def _db(data_dir: Path) -> Path:
    return data_dir / "thinblock.db"


# --- damages -------------------------------------------------------------------------------------


def truncate_to(fraction: float) -> Callable[[Path, random.Random], str]:
    def damage(data_dir: Path, rng: random.Random) -> str:
        path = _db(data_dir)
        size = path.stat().st_size
        new = int(size * fraction)
        with path.open("r+b") as f:
            f.truncate(new)
        return f"truncated from {size} to {new} bytes"

    return damage


def flip_bytes(count: int) -> Callable[[Path, random.Random], str]:
    def damage(data_dir: Path, rng: random.Random) -> str:
        path = _db(data_dir)
        data = bytearray(path.read_bytes())
        where = sorted(rng.randrange(len(data)) for _ in range(count))
        for i in where:
            data[i] ^= rng.randrange(1, 256)
        path.write_bytes(data)
        return f"{count} byte(s) flipped at {where[:8]}{'...' if count > 8 else ''}"

    return damage


def _sql(data_dir: Path, *statements: str) -> None:
    db = sqlite3.connect(_db(data_dir), isolation_level=None)
    try:
        for statement in statements:
            db.execute(statement)
    finally:
        db.close()


def delete_map_row(data_dir: Path, rng: random.Random) -> str:
    """A region-map row lost behind the engine's back (the counters are left as they were)."""
    db = sqlite3.connect(_db(data_dir))
    rows = db.execute("SELECT vv_id, vv_region FROM vv_map ORDER BY vv_id, vv_region").fetchall()
    db.close()
    vv_id, region = rng.choice(rows)
    _sql(data_dir, f"DELETE FROM vv_map WHERE vv_id={vv_id} AND vv_region={region}")
    return f"map row of VV {vv_id} region {region} deleted"


def map_to_missing_ld(data_dir: Path, rng: random.Random) -> str:
    db = sqlite3.connect(_db(data_dir))
    vv_id, region = rng.choice(db.execute("SELECT vv_id, vv_region FROM vv_map").fetchall())
    db.close()
    _sql(data_dir, f"UPDATE vv_map SET ld_id=4242 WHERE vv_id={vv_id} AND vv_region={region}")
    return f"map entry of VV {vv_id} region {region} pointed at LD 4242"


def flip_map_value_in_table_only(data_dir: Path, rng: random.Random) -> str:
    """The bytes of one region-map row changed in the table's page only, its unique index left as it
    was: what a flipped bit on the disk does.  The row then points at a free region of its LD.
    (Found by editing a copy through SQL, diffing the table's page, and writing just those bytes.)"""
    path = _db(data_dir)
    original = path.read_bytes()
    db = sqlite3.connect(path)
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name='vv_map'").fetchone()
    used = {(ld, r) for ld, r in db.execute("SELECT ld_id, ld_region FROM vv_map")}
    free = {
        ld: [r for r in range(2, min(regions, 128)) if (ld, r) not in used]
        for ld, regions in db.execute("SELECT id, regions FROM lds")
    }
    rows = [
        row
        for row in db.execute(
            "SELECT vv_id, vv_region, ld_id, ld_region FROM vv_map WHERE ld_region BETWEEN 2 AND 127"
        )
        if free.get(row[2])
    ]
    db.close()
    assert rows, "no LD with a free region to point a row at"
    vv_id, region, ld_id, ld_region = rng.choice(rows)
    target = rng.choice(free[ld_id])
    scratch = data_dir.parent / "scratch.db"
    scratch.write_bytes(original)
    edit = sqlite3.connect(scratch, isolation_level=None)
    edit.execute("PRAGMA journal_mode=DELETE")
    edit.execute(f"UPDATE vv_map SET ld_region={target} WHERE vv_id={vv_id} AND vv_region={region}")
    edit.close()
    edited = scratch.read_bytes()
    scratch.unlink()
    start = (root - 1) * page_size
    changed = [i for i in range(start, start + page_size) if original[i] != edited[i]]
    assert 0 < len(changed) <= 2, f"the edit changed {len(changed)} bytes of the table page"
    damaged = bytearray(original)
    for i in changed:
        damaged[i] = edited[i]
    path.write_bytes(damaged)
    return f"VV {vv_id} region {region}: LD {ld_id} region {ld_region} -> {target} in the table's page only"


def delete_ld_row(data_dir: Path, rng: random.Random) -> str:
    db = sqlite3.connect(_db(data_dir))
    (ld,) = rng.choice(db.execute("SELECT id FROM lds").fetchall())
    db.close()
    _sql(
        data_dir,
        "PRAGMA foreign_keys=OFF",
        f"DELETE FROM ld_chunklets WHERE ld_id={ld}",
        f"DELETE FROM lds WHERE id={ld}",
    )
    return f"LD {ld} deleted with its chunklets"


# --- the drill -----------------------------------------------------------------------------------


async def _build(make_daemon: Callable[..., Daemon]) -> tuple[Daemon, dict[str, dict[int, int]]]:
    """Volumes with data in known regions; stopped cleanly.  Returns the images (region -> seq)."""
    daemon = make_daemon("pristine")
    daemon.start()
    (daemon.workdir / "pds").mkdir()
    add_pds(daemon, Standard(count=4, size=32 * MiB), daemon.workdir / "pds")
    setup_pool(daemon, "p", 1, region=REGION, increment=2 * MiB)
    rng = random.Random(6)
    images: dict[str, dict[int, int]] = {}
    for name, (tag, size) in VOLUMES.items():
        setup_volume(daemon, name, "p", size, "writeback" if tag == 2 else "writethrough")
        image: dict[int, int] = {}
        async with await NBDClient.connect(LOOPBACK, daemon.nbd_port, name) as client:
            for region in rng.sample(range(size // REGION), size // REGION * 2 // 3):
                await client.write(region * REGION, run_data(tag, region * 16, 16, region + 1))
                image[region] = region + 1
            await client.flush()
        images[name] = image
    assert daemon.stop() == 0
    # Every trial's store names these PD files; a daemon that starts on a damaged store may write to
    # them, so they are put back after such a trial.
    _copy_tree(daemon.workdir / "pds", daemon.workdir / "pds.pristine")
    return daemon, images


async def _read_back(daemon: Daemon, images: dict[str, dict[int, int]]) -> tuple[int, list[str]]:
    """Every byte of every volume against its image: (bytes checked, wrong regions)."""
    wrong: list[str] = []
    checked = 0
    for name, (tag, size) in VOLUMES.items():
        try:
            client = await NBDClient.connect(LOOPBACK, daemon.nbd_port, name)
        except HandshakeError as exc:
            wrong.append(f"volume {name} is gone ({exc})")
            continue
        async with client:
            try:
                data = await client.read_all(0, size)
            except NBDError as exc:
                wrong.append(f"volume {name} does not read ({exc})")
                continue
        checked += len(data)
        for region in range(size // REGION):
            seq = images[name].get(region)
            expected = bytes(REGION) if seq is None else run_data(tag, region * 16, 16, seq)
            if data[region * REGION : (region + 1) * REGION] != expected:
                wrong.append(f"{name} region {region}")
    return checked, wrong


def _refusal(events: list[dict[str, Any]]) -> str:
    return " | ".join(str(e.get("msg")) for e in events if e.get("event") == "startup-failed")


async def trial(
    make_daemon: Callable[..., Daemon],
    pristine: Path,
    images: dict[str, dict[int, int]],
    name: str,
    damage: Callable[[Path, random.Random], str],
    rng: random.Random,
    figures: Figures,
) -> Outcome:
    daemon = make_daemon(f"trial-{name}")
    _copy_tree(pristine, daemon.data_dir)
    what = damage(daemon.data_dir, rng)
    figures.faults += 1
    rc, report = thinblock_check(daemon.data_dir)
    check_ok = rc == 0 and bool(report.get("ok"))
    problems = [str(p) for p in report.get("problems", [])]
    assert check_ok or problems, f"{name} ({what}): check failed without naming a problem: {report}"
    status, events = daemon.start_expecting_failure()
    refusal = _refusal(events)
    outcome = Outcome(f"{name}: {what}", check_ok, problems, status == 0, refusal)
    try:
        if status == 0:
            # It serves: then the damage must have been harmless, and everything reads back right.
            checked, wrong = await _read_back(daemon, images)
            figures.bytes_verified += checked
            figures.data_lost += len(wrong)
            assert not wrong, f"{name} ({what}): the daemon started and served wrong data: {wrong[:8]}"
            if not check_ok:
                # The one difference by design: a PD file the store names is missing.  The check
                # reports it; the daemon serves with that PD failed (a vanished disk is a failed disk,
                # not damage), and says so with a pd-failed alert.
                assert all(p.startswith("PD ") and p.endswith(" is missing") for p in problems), (
                    f"{name} ({what}): the daemon started, but the check reported {problems}"
                )
                assert any(a["kind"] == "pd-failed" for a in daemon.alerts()), "no pd-failed alert"
                figures.notes["missing_pd_served_degraded"] = (
                    figures.notes.get("missing_pd_served_degraded", 0) + 1
                )
            assert daemon.stop() == 0
        else:
            assert status != 0 and refusal, f"{name} ({what}): exited {status} without a startup-failed line"
            assert not check_ok, f"{name} ({what}): the daemon refused ({refusal}) but the check passed"
            # the refusal names the damage the check found
            assert "refusing to start" in refusal or "cannot" in refusal, refusal
            assert any(p in refusal for p in problems), (
                f"{name} ({what}): the refusal does not name the check's problems\n"
                f"  refusal: {refusal}\n  check: {problems}"
            )
    finally:
        daemon.kill()
        if status == 0:
            _copy_tree(pristine.parent / "pds.pristine", pristine.parent / "pds")
    figures.rounds += 1
    return outcome


TARGETED: list[tuple[str, Callable[[Path, random.Random], str], bool]] = [
    # (name, damage, must the daemon refuse?)
    ("truncate-empty", truncate_to(0.0), True),
    ("truncate-half", truncate_to(0.5), True),
    ("truncate-tail", truncate_to(0.97), True),
    ("delete-map-row", delete_map_row, True),
    ("map-missing-ld", map_to_missing_ld, True),
    ("delete-ld", delete_ld_row, True),
    ("map-value-flip", flip_map_value_in_table_only, True),
]


async def damage_drill(make_daemon: Callable[..., Daemon], *, random_trials: int, seed: int) -> Figures:
    rng = random.Random(seed)
    figures = Figures("6-metadata-damage")
    built, images = await _build(make_daemon)
    pristine = built.data_dir
    # the undamaged store passes the check: the baseline the trials start from
    rc, report = thinblock_check(pristine)
    assert rc == 0 and report["ok"], report
    outcomes: list[Outcome] = []
    for name, damage, must_refuse in TARGETED:
        outcome = await trial(make_daemon, pristine, images, name, damage, rng, figures)
        assert not must_refuse or not outcome.started, f"{outcome.damage}: the daemon started"
        outcomes.append(outcome)
    for i in range(random_trials):
        if rng.random() < 0.8:
            damage = flip_bytes(rng.choice((1, 1, 2, 4, 16, 64)))
        else:
            damage = truncate_to(rng.random())
        outcomes.append(await trial(make_daemon, pristine, images, f"random{i}", damage, rng, figures))
    refused = sum(1 for o in outcomes if not o.started)
    figures.notes.update(
        {
            "damages": len(outcomes),
            "refused_to_start": refused,
            "harmless_served_correctly": len(outcomes) - refused,
        }
    )
    figures.report()
    return figures


async def test_metadata_damage_short(make_daemon: Callable[..., Daemon]) -> None:
    figures = await damage_drill(make_daemon, random_trials=6, seed=6)
    assert figures.data_lost == 0


@pytest.mark.long
@pytest.mark.timeout(7200)
async def test_metadata_damage_long(make_daemon: Callable[..., Daemon]) -> None:
    figures = await damage_drill(make_daemon, random_trials=200, seed=66)
    assert figures.data_lost == 0


def test_check_command_without_a_store(tmp_path: Path) -> None:
    """``thinblock check`` on a directory that holds no store fails, and says why."""
    rc, report = thinblock_check(tmp_path)
    assert rc != 0 and not report["ok"], report
    assert any("no metadata store" in p for p in report["problems"]), report
