"""The metadata store contract, written once and run against every backend (SQLite in a
directory, PostgreSQL in a throwaway cluster): every method, one transaction per call (all or
nothing), the backend-independent check, leases and their fencing, kill -9 in the middle of a
group of assignments, reopen."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.postgres import fresh_database
from tests.support.stores import StoreBackend
from thinblock.errors import Conflict, LeaseLost, MetadataCorrupt
from thinblock.metadata import mapcheck
from thinblock.metadata.check import check_store
from thinblock.metadata.store import LDRow, MetadataStore, PoolRow, VVRow

MiB = 1 << 20


def _pool(name: str = "p") -> PoolRow:
    return PoolRow(0, name, 1, 2, 4096, MiB, 64 * MiB, None, None)


def _vv(pool_id: int, name: str = "v", size: int = 64 * MiB) -> VVRow:
    return VVRow(0, name, pool_id, size, None, None, 32 * MiB, None, "writethrough", 1.5)


def _populate(store: MetadataStore) -> tuple[int, int, int]:
    """Two PDs, a RAID 1 pool, one LD of 2 rows, one VV: (pool, LD, VV) ids."""
    pd_a = store.add_pd("/dev/a", 64 * MiB, 16 * MiB)
    pd_b = store.add_pd("/dev/b", 64 * MiB, 16 * MiB)
    pool = store.add_pool(_pool())
    chunklets = {(0, 0): (pd_a, 0), (0, 1): (pd_b, 0), (1, 0): (pd_a, 1), (1, 1): (pd_b, 1)}
    ld = store.add_ld(LDRow(0, pool, 1, 2, 4096, MiB, 32, chunklets))
    vv = store.add_vv(_vv(pool))
    return pool, ld, vv


@pytest.fixture
def store(backend: StoreBackend) -> MetadataStore:
    s = backend.open()
    yield s
    s.close()


def test_a_new_store_is_empty_and_checks_clean(store: MetadataStore) -> None:
    assert store.is_empty()
    assert check_store(store) == []
    assert store.get_meta("schema_version") == "5"
    assert store.counts() == dict.fromkeys(
        ("pds", "pools", "lds", "ld_chunklets", "vvs", "vv_map", "alerts"), 0
    )


def test_every_record_reads_back_after_reopen(backend: StoreBackend, store: MetadataStore) -> None:
    pool, ld, vv = _populate(store)
    store.set_meta("clean", "0")
    store.assign_many([(vv, 0, ld, 3), (vv, 5, ld, 4)])
    alert = store.add_alert(2.5, "warning", "pd-failed", "pd:1", "it failed", "new")
    store.set_alert_state(alert, "acknowledged")
    store.set_pd_health(1, "failed")
    store.set_vv_owner(vv, "node-a")
    store.close()
    again = backend.open(create=False)
    try:
        assert [(p.path, p.health) for p in again.load_pds()] == [("/dev/a", "failed"), ("/dev/b", "normal")]
        assert [p.name for p in again.load_pools()] == ["p"] and again.load_pools()[0].id == pool
        (ld_row,) = again.load_lds()
        assert ld_row.id == ld and ld_row.regions == 32 and len(ld_row.chunklets) == 4
        (vv_row,) = again.load_vvs()
        assert (vv_row.name, vv_row.alloc_limit_bytes, vv_row.created, vv_row.owner) == (
            "v",
            32 * MiB,
            1.5,
            "node-a",
        )
        assert sorted(map(tuple, again.map_array().tolist())) == [(vv, 0, ld, 3), (vv, 5, ld, 4)]
        assert again.region_counters() == ({vv: 2}, {ld: 2})
        (a,) = again.load_alerts()
        assert (a.id, a.kind, a.state, a.time) == (alert, "pd-failed", "acknowledged", 2.5)
        assert again.get_meta("clean") == "0"
        assert check_store(again) == []
        assert again.counts()["vv_map"] == 2 and not again.is_empty()
    finally:
        again.close()


def test_alerts_with_ids_given_and_ids_left_to_the_store(store: MetadataStore) -> None:
    """The alert bus numbers its alerts itself; an id the store picks later comes past them."""
    assert store.add_alert(1.0, "info", "ld-created", "ld:1", "one", "new", alert_id=7) == 7
    assert store.add_alert(2.0, "info", "ld-created", "ld:2", "two", "new", alert_id=3) == 3
    picked = store.add_alert(3.0, "info", "ld-created", "ld:3", "three", "new")
    assert picked > 7
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):  # the driver's IntegrityError
        store.add_alert(4.0, "info", "ld-created", "ld:4", "four", "new", alert_id=3)
    assert [(a.id, a.message) for a in store.load_alerts()] == [(3, "two"), (7, "one"), (picked, "three")]


def test_updates_and_deletes(store: MetadataStore) -> None:
    pool, ld, vv = _populate(store)
    row = store.load_pools()[0]
    row.growth_limit = 128 * MiB
    store.update_pool(row)
    assert store.load_pools()[0].growth_limit == 128 * MiB
    vrow = store.load_vvs()[0]
    vrow.size = 128 * MiB
    vrow.cache_mode = "writeback"
    store.update_vv(vrow)
    assert (store.load_vvs()[0].size, store.load_vvs()[0].cache_mode) == (128 * MiB, "writeback")
    pd_c = store.add_pd("/dev/c", 64 * MiB, 16 * MiB)
    store.replace_chunklet(ld, 1, 1, pd_c, 2)
    assert store.load_lds()[0].chunklets[(1, 1)] == (pd_c, 2)
    store.assign_many([(vv, r, ld, r) for r in range(10)])
    assert store.unassign(vv, [0, 1, 2, 99]) == 3
    assert store.region_counters() == ({vv: 7}, {ld: 7})
    assert store.unassign(vv, list(range(10))) == 7
    store.delete_vv(vv)
    store.delete_ld(ld)
    store.delete_pool(pool)
    store.remove_pd(pd_c)
    assert (store.load_vvs(), store.load_lds(), store.load_pools()) == ([], [], [])
    assert check_store(store) == []


def test_a_group_of_assignments_is_all_or_nothing(store: MetadataStore) -> None:
    _pool_id, ld, vv = _populate(store)
    store.assign_many([(vv, 0, ld, 0)])
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):  # the driver's IntegrityError
        store.assign_many([(vv, 1, ld, 1), (vv, 2, ld, 2), (vv, 0, ld, 3)])  # VV region 0 twice
    assert store.map_array().tolist() == [[vv, 0, ld, 0]]
    assert store.region_counters() == ({vv: 1}, {ld: 1})
    assert check_store(store) == []


def test_a_big_map_reads_back_row_for_row(store: MetadataStore) -> None:
    """Enough rows that PostgreSQL's binary COPY arrives in many blocks (metadata/pgcopy.py
    parses 256 KiB at a time), and values past 32 bits."""
    _pool_id, ld, vv = _populate(store)
    rows = [(vv, r, ld, r) for r in range(12_000)] + [(vv, 2**40 + 3, ld, 2**33 + 1)]
    store.assign_many(rows)
    store.forget_map_array()
    got = store.map_array()
    assert got.dtype == np.int64 and got.shape == (len(rows), 4)
    assert sorted(map(tuple, got.tolist())) == rows


@pytest.fixture
def postgresql_store(postgresql_backend: StoreBackend) -> Iterator[MetadataStore]:
    s = postgresql_backend.open()
    yield s
    s.close()


def test_a_map_read_that_fails_leaves_the_store_usable(
    postgresql_store: MetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A COPY refused half-way (PostgreSQL's binary COPY: the reader raises inside it) is
    MetadataCorrupt naming the store, and the connection goes back to the pool in working order."""
    store = postgresql_store
    from thinblock.metadata import pgcopy, postgres

    _pool_id, ld, vv = _populate(store)
    store.assign_many([(vv, r, ld, r) for r in range(6000)])
    store.forget_map_array()

    class Refusing(pgcopy.Int8CopyReader):
        def feed(self, data: bytes | bytearray | memoryview) -> None:
            raise pgcopy.BadCopy("refused by the test")

    monkeypatch.setattr(postgres, "Int8CopyReader", Refusing)
    with pytest.raises(MetadataCorrupt, match="region map cannot be read: refused by the test"):
        store.map_array()
    monkeypatch.undo()
    for _ in range(4):  # every pooled connection, whichever served the failed read
        store.assign_many([(vv, 6000 + _, ld, 6000 + _)])
        assert len(store.map_array()) == 6001 + _


def test_an_ld_goes_in_with_its_chunklets_or_not_at_all(store: MetadataStore) -> None:
    pd_a = store.add_pd("/dev/a", 64 * MiB, 16 * MiB)
    pool = store.add_pool(_pool())
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        store.add_ld(LDRow(0, pool, 1, 2, 4096, MiB, 16, {(0, 0): (pd_a, 0), (0, 1): (pd_a, 0)}))
    assert store.load_lds() == [] and store.counts()["ld_chunklets"] == 0


def test_the_check_names_damage_done_behind_the_stores_back(
    backend: StoreBackend, store: MetadataStore
) -> None:
    _pool_id, ld, vv = _populate(store)
    store.assign_many([(vv, r, ld, r) for r in range(4)])
    assert check_store(store) == []
    backend.sql("DELETE FROM vv_map WHERE vv_region = 2")  # a lost map row
    backend.sql("UPDATE vv_map SET vv_region = 999 WHERE vv_region = 3")  # past the VV's 64 regions
    store.forget_map_array()
    problems = check_store(store)
    assert "VV 'v' records 4 assigned regions but its map holds 3 (region map rows lost or added)" in problems
    assert f"LD {ld} records 4 used regions but the maps assign 3" in problems
    assert f"VV {vv} maps region 999, past its size {64 * MiB}" in problems
    backend.sql("UPDATE pds SET health = 'weird'")
    assert "PD 1 has health 'weird'" in check_store(store)


def _snapshot_row(pool_id: int, name: str, parent: int) -> VVRow:
    row = _vv(pool_id, name)
    row.kind, row.parent_id, row.family_id = "snapshot", parent, parent
    return row


def test_a_snapshot_shares_the_map_and_counts_each_reference(store: MetadataStore) -> None:
    pool, ld, vv = _populate(store)
    store.assign_many([(vv, r, ld, r) for r in range(3)])
    snap = store.add_vv_sharing(_snapshot_row(pool, "s", vv), vv)
    rows = sorted(map(tuple, store.map_array().tolist()))
    assert rows == sorted([(vv, r, ld, r) for r in range(3)] + [(snap, r, ld, r) for r in range(3)])
    assert store.region_counters() == ({vv: 3, snap: 3}, {ld: 6})
    [_, row] = store.load_vvs()
    assert (row.name, row.kind, row.parent_id, row.family) == ("s", "snapshot", vv, vv)
    assert check_store(store) == []
    # Copy on write of region 1 of the volume: reserve, switch.
    store.reserve_region((vv, 1, ld, 9))
    assert store.load_reservations() == [(vv, 1, ld, 9)]
    assert check_store(store) == []
    assert store.switch_region(vv, 1, (ld, 1), (ld, 9))
    assert store.load_reservations() == []
    assert (vv, 1, ld, 9) in map(tuple, store.map_array().tolist())
    assert store.region_counters() == ({vv: 3, snap: 3}, {ld: 6})
    assert check_store(store) == []
    # A switch whose row moved meanwhile (trimmed) changes nothing but the reservation.
    store.reserve_region((vv, 2, ld, 10))
    assert store.unassign(vv, [2]) == 1
    assert not store.switch_region(vv, 2, (ld, 2), (ld, 10))
    assert store.load_reservations() == []
    assert store.region_counters() == ({vv: 2, snap: 3}, {ld: 5})
    assert check_store(store) == []
    # Deleting the volume leaves the snapshot and its rows; it names no parent any more.
    assert store.unassign(vv, [0, 1]) == 2
    store.delete_vv(vv)
    [row] = store.load_vvs()
    assert (row.parent_id, row.family) == (None, vv)
    assert check_store(store) == []


def test_replace_map_reverts_a_volume_to_its_snapshot(store: MetadataStore) -> None:
    pool, ld, vv = _populate(store)
    store.assign_many([(vv, r, ld, r) for r in range(3)])
    snap = store.add_vv_sharing(_snapshot_row(pool, "s", vv), vv)
    store.reserve_region((vv, 1, ld, 9))
    assert store.switch_region(vv, 1, (ld, 1), (ld, 9))  # the volume changed region 1 after it
    store.assign_many([(vv, 5, ld, 5)])  # and wrote a new one
    store.replace_map(vv, snap)
    rows = sorted(map(tuple, store.map_array().tolist()))
    assert rows == sorted([(vv, r, ld, r) for r in range(3)] + [(snap, r, ld, r) for r in range(3)])
    assert store.region_counters() == ({vv: 3, snap: 3}, {ld: 6})
    assert check_store(store) == []


def test_the_check_tells_sharing_from_damage(backend: StoreBackend, store: MetadataStore) -> None:
    pool, ld, vv = _populate(store)
    other = store.add_vv(_vv(pool, "w"))
    store.assign_many([(vv, 0, ld, 0), (vv, 1, ld, 1), (other, 0, ld, 2)])
    snap = store.add_vv_sharing(_snapshot_row(pool, "s", vv), vv)
    assert check_store(store) == []
    # A row of another volume pointed at a region the tree holds: another volume's data.
    backend.sql("UPDATE vv_map SET ld_region = 0 WHERE vv_id = ?", (other,))
    store.forget_map_array()
    assert any(
        f"LD {ld} region 0 is assigned more than once" in p and f"VV {other} region 0" in p
        for p in check_store(store)
    )
    backend.sql("UPDATE vv_map SET ld_region = 2 WHERE vv_id = ?", (other,))
    store.forget_map_array()
    assert check_store(store) == []
    # A snapshot row pointing at a region of its tree, but at another offset.
    backend.sql("UPDATE vv_map SET ld_region = 0 WHERE vv_id = ? AND vv_region = 1", (snap,))
    store.forget_map_array()
    assert any("which do not share a snapshot tree at that offset" in p for p in check_store(store))
    backend.sql("UPDATE vv_map SET ld_region = 1 WHERE vv_id = ? AND vv_region = 1", (snap,))
    store.reserve_region((vv, 0, ld, 1))  # a reserved region that is also mapped
    store.forget_map_array()
    assert f"LD {ld} region 1 is reserved for a copy on write and also mapped" in check_store(store)


def test_the_check_holds_every_reservation_and_the_tree_to_the_space_map(
    backend: StoreBackend, store: MetadataStore
) -> None:
    """Damage the space map is built from (a reservation is a reference, like a map row), none of
    which the check named before: a reservation past the first 20 that names a mapped region
    (the next open would zero that volume's data), a reservation outside every LD (the open
    would fail on it), a kind the engine does not know, a parent of another tree."""
    pool, ld, vv = _populate(store)
    store.assign_many([(vv, r, ld, 28 + r) for r in range(4)])  # LD regions 28..31
    snap = store.add_vv_sharing(_snapshot_row(pool, "s", vv), vv)
    for r in range(21):  # crash leftovers: reservations of free regions, which the open frees
        store.reserve_region((vv, r, ld, r))
    assert check_store(store) == []
    backend.sql("UPDATE cow_reservations SET ld_region = 31 WHERE ld_region = 20")  # the 21st
    assert f"LD {ld} region 31 is reserved for a copy on write and also mapped" in check_store(store)
    backend.sql("UPDATE cow_reservations SET ld_region = 99 WHERE ld_region = 31")  # LD has 32
    problems = check_store(store)
    assert (
        f"LD {ld} region 99 is reserved for a copy on write but is not a region of an existing LD" in problems
    )
    backend.sql("DELETE FROM cow_reservations")
    assert check_store(store) == []
    backend.sql("UPDATE vvs SET kind = 'snapshoot' WHERE id = ?", (snap,))
    assert "VV 's' is of kind 'snapshoot'" in check_store(store)
    other = store.add_vv(_vv(pool, "w"))
    backend.sql("UPDATE vvs SET kind = 'snapshot', parent_id = ? WHERE id = ?", (other, snap))
    assert f"VV 's' names VV {other} as its parent, which is not of its tree" in check_store(store)


def test_a_schema_2_store_is_migrated_with_its_map(backend: StoreBackend, store: MetadataStore) -> None:
    """Version 2 (one owner per LD region) opens as version 3: rows kept, regions sharable."""
    pool, ld, vv = _populate(store)
    store.assign_many([(vv, r, ld, r) for r in range(3)])
    store.close()
    if backend.kind == "sqlite":
        statements = [
            "DROP TABLE cow_reservations",
            "CREATE TABLE vv_map_v2 (vv_id INTEGER NOT NULL, vv_region INTEGER NOT NULL, ld_id INTEGER NOT NULL,"
            " ld_region INTEGER NOT NULL, epoch INTEGER, PRIMARY KEY (vv_id, vv_region),"
            " UNIQUE (ld_id, ld_region)) WITHOUT ROWID",
            "INSERT INTO vv_map_v2 SELECT vv_id, vv_region, ld_id, ld_region, epoch FROM vv_map",
            "DROP TABLE vv_map",
            "ALTER TABLE vv_map_v2 RENAME TO vv_map",
        ]
    else:
        statements = [
            "DROP TABLE cow_reservations",
            "DROP INDEX IF EXISTS vv_map_ld",
            "ALTER TABLE vv_map ADD CONSTRAINT vv_map_ld_id_ld_region_key UNIQUE (ld_id, ld_region)",
        ]
    statements += [
        "ALTER TABLE vvs DROP COLUMN kind",
        "ALTER TABLE vvs DROP COLUMN parent_id",
        "ALTER TABLE vvs DROP COLUMN family_id",
        *_DROP_SNAPSHOT_SPACE,
        _DROP_MAP_CHECK,
        "UPDATE meta SET value = '2' WHERE key = 'schema_version'",
    ]
    for statement in statements:
        backend.sql(statement)
    migrated = backend.open()
    try:
        assert migrated.get_meta("schema_version") == "5"
        assert not _has_map_index(backend)  # the migration made it; the open drops it
        assert sorted(map(tuple, migrated.map_array().tolist())) == [(vv, r, ld, r) for r in range(3)]
        snap = migrated.add_vv_sharing(_snapshot_row(pool, "s", vv), vv)
        assert migrated.region_counters() == ({vv: 3, snap: 3}, {ld: 6})
        assert check_store(migrated) == []
    finally:
        migrated.close()


_DROP_MAP_CHECK = "ALTER TABLE vvs DROP COLUMN map_check"  # schema 5
_DROP_SNAPSHOT_SPACE = [
    f"ALTER TABLE vvs DROP COLUMN {column}"
    for column in (
        "snap_warning_bytes",
        "snap_warning_pct",
        "snap_limit_bytes",
        "snap_limit_pct",
        "snap_limit_policy",
    )
]


def test_a_schema_3_store_is_migrated_to_snapshot_space_limits(
    backend: StoreBackend, store: MetadataStore
) -> None:
    """Version 3 (no snapshot space settings) opens as version 4: every volume without a snapshot
    space warning or limit, policy ``fail``; the settings then go in and read back."""
    _pool_id, ld, vv = _populate(store)
    store.assign_many([(vv, 0, ld, 0)])
    store.close()
    for statement in [
        *_DROP_SNAPSHOT_SPACE,
        _DROP_MAP_CHECK,
        "UPDATE meta SET value = '3' WHERE key = 'schema_version'",
    ]:
        backend.sql(statement)
    migrated = backend.open()
    try:
        assert migrated.get_meta("schema_version") == "5"
        [row] = migrated.load_vvs()
        assert (row.alloc_limit_bytes, row.snap_warning_bytes, row.snap_limit_pct, row.snap_limit_policy) == (
            32 * MiB,
            None,
            None,
            "fail",
        )
        row.snap_warning_pct, row.snap_limit_bytes, row.snap_limit_policy = 10.0, 8 * MiB, "invalidate-oldest"
        migrated.update_vv(row)
        assert check_store(migrated) == []
    finally:
        migrated.close()
    again = backend.open(create=False)
    try:
        [row] = again.load_vvs()
        assert (row.snap_warning_pct, row.snap_limit_bytes, row.snap_limit_policy) == (
            10.0,
            8 * MiB,
            "invalidate-oldest",
        )
    finally:
        again.close()


def test_a_schema_4_store_is_migrated_to_map_checks(backend: StoreBackend, store: MetadataStore) -> None:
    """Version 4 (SQLite: a second index over the map rows for integrity_check) opens as version 5:
    each volume's map check computed from its rows, the index gone, the check clean; the checks
    then follow every change of the map."""
    pool, ld, vv = _populate(store)
    store.assign_many([(vv, r, ld, 3 * r + 1) for r in range(5)])
    snap = store.add_vv_sharing(_snapshot_row(pool, "s", vv), vv)
    expected = store.map_checks()
    assert expected[vv] == expected[snap] == sum(mapcheck.term(r, ld, 3 * r + 1) for r in range(5))
    store.close()
    statements = [_DROP_MAP_CHECK, "UPDATE meta SET value = '4' WHERE key = 'schema_version'"]
    if backend.kind == "sqlite":
        statements.append("CREATE INDEX vv_map_check ON vv_map(vv_id, vv_region, ld_id, ld_region)")
    for statement in statements:
        backend.sql(statement)
    migrated = backend.open()
    try:
        assert migrated.get_meta("schema_version") == "5"
        assert migrated.map_checks() == expected
        if backend.kind == "sqlite":
            assert not backend.sql("SELECT 1 FROM sqlite_master WHERE name = 'vv_map_check'")
        assert check_store(migrated) == []
        migrated.unassign(vv, [0])
        migrated.reserve_region((vv, 1, ld, 30))
        assert migrated.switch_region(vv, 1, (ld, 4), (ld, 30))
        migrated.assign_many([(vv, 7, ld, 31)])
        assert check_store(migrated) == []
        migrated.replace_map(vv, snap)
        assert migrated.map_checks() == expected
        assert check_store(migrated) == []
    finally:
        migrated.close()


def test_the_map_check_finds_a_row_pointed_at_another_region(
    backend: StoreBackend, store: MetadataStore
) -> None:
    """A map row's LD address changed behind the store's back (drill 6 flips the bit in SQLite's
    page; here an UPDATE, which keeps every index and counter right) to a free region of the same
    LD: the counters and the sharing rules cannot see it, the map check does."""
    pool, ld, vv = _populate(store)
    store.assign_many([(vv, r, ld, r) for r in range(4)])
    snap = store.add_vv_sharing(_snapshot_row(pool, "s", vv), vv)
    assert check_store(store) == []
    backend.sql("UPDATE vv_map SET ld_region = 20 WHERE vv_id = ? AND vv_region = 2", (snap,))
    store.forget_map_array()
    problems = check_store(store)
    assert any(p.startswith("VV 's' has map check") and "a flipped bit?" in p for p in problems), problems
    assert not any("VV 'v'" in p for p in problems), problems
    backend.sql("UPDATE vv_map SET ld_region = 2 WHERE vv_id = ? AND vv_region = 2", (snap,))
    store.forget_map_array()
    assert check_store(store) == []
    backend.sql("UPDATE vv_map SET vv_region = 9 WHERE vv_id = ? AND vv_region = 3", (vv,))  # another offset
    store.forget_map_array()
    assert any(p.startswith("VV 'v' has map check") for p in check_store(store))


def _has_map_index(backend: StoreBackend) -> bool:
    """Does the store hold the index on vv_map(ld_id, ld_region) (metadata/sql.py UNUSED_MAP_INDEX)?"""
    if backend.kind == "sqlite":
        return bool(backend.sql("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'vv_map_ld'"))
    return bool(backend.sql("SELECT to_regclass('vv_map_ld') IS NOT NULL")[0][0])


def test_the_unused_map_index_is_dropped_on_open_and_snapshots_still_count(
    backend: StoreBackend, store: MetadataStore
) -> None:
    """A store of this version written by an older thinblock keeps vv_map(ld_id, ld_region)
    indexed: nothing reads it, and it made a snapshot's row copy cost a random B-tree insert a
    row.  The next open drops it; the rows and the counters are the same either way."""
    pool, ld, vv = _populate(store)
    store.assign_many([(vv, r, ld, 5 - r) for r in range(4)])
    assert not _has_map_index(backend)  # a new store never has it
    store.close()
    backend.sql("CREATE INDEX vv_map_ld ON vv_map(ld_id, ld_region)")
    reopened = backend.open()
    try:
        assert not _has_map_index(backend)
        snap = reopened.add_vv_sharing(_snapshot_row(pool, "s", vv), vv)
        assert reopened.region_counters() == ({vv: 4, snap: 4}, {ld: 8})
        assert check_store(reopened) == []
    finally:
        reopened.close()


def test_a_snapshot_told_its_counts_records_them_with_the_rows(store: MetadataStore) -> None:
    """The engine passes how many rows each LD gets (its map); the store records those counters
    with the copied rows in the one transaction, and the check finds them equal to the rows."""
    pool, ld, vv = _populate(store)
    chunklets = {(0, 0): (1, 2), (0, 1): (2, 2)}
    ld2 = store.add_ld(LDRow(0, pool, 1, 2, 4096, MiB, 16, chunklets))
    store.assign_many([(vv, 0, ld, 0), (vv, 1, ld2, 0), (vv, 2, ld2, 1), (vv, 7, ld, 3)])
    snap = store.add_vv_sharing(_snapshot_row(pool, "s", vv), vv, {ld: 2, ld2: 2})
    clone_row = _snapshot_row(pool, "c", snap)
    clone_row.kind, clone_row.family_id = "clone", vv
    clone = store.add_vv_sharing(clone_row, snap, {ld: 2, ld2: 2})
    assert store.region_counters() == ({vv: 4, snap: 4, clone: 4}, {ld: 6, ld2: 6})
    rows = sorted(map(tuple, store.map_array().tolist()))
    assert [r[1:] for r in rows if r[0] == clone] == [(0, ld, 0), (1, ld2, 0), (2, ld2, 1), (7, ld, 3)]
    assert check_store(store) == []
    # A volume with no regions: no LD counter moves.
    empty = store.add_vv(_vv(pool, "e"))
    empty_snap = store.add_vv_sharing(_snapshot_row(pool, "es", empty), empty, {})
    assert store.region_counters() == ({vv: 4, snap: 4, clone: 4, empty: 0, empty_snap: 0}, {ld: 6, ld2: 6})
    assert check_store(store) == []


def test_a_newer_schema_is_refused_with_a_clear_message(backend: StoreBackend, store: MetadataStore) -> None:
    store.set_meta("schema_version", "99")
    store.close()
    with pytest.raises(MetadataCorrupt, match="schema version 99 was written by a newer thinblock"):
        backend.open()


def test_a_missing_store_is_not_created_when_asked_not_to(backend: StoreBackend) -> None:
    with pytest.raises(MetadataCorrupt, match="no metadata store"):
        backend.open(create=False)


# --- leases -------------------------------------------------------------------------------------


def test_lease_epochs_grow_with_each_new_holder(store: MetadataStore) -> None:
    a = store.acquire_lease("node:x", "a", 30)
    assert a is not None and (a.holder, a.epoch) == ("a", 1)
    assert store.acquire_lease("node:x", "b", 30) is None, "taken while held"
    again = store.acquire_lease("node:x", "a", 30)
    assert again is not None and again.epoch == 1, "the same holder keeps its epoch"
    renewed = store.renew_lease(a, 60)
    assert renewed is not None and renewed.expires_at > a.expires_at
    store.release_lease(a)
    b = store.acquire_lease("node:x", "b", 30)
    assert b is not None and b.epoch == 2
    assert store.renew_lease(a, 30) is None, "a lease another holder took cannot be renewed"
    assert store.read_lease("node:x") == b
    assert store.read_lease("nothing") is None


def test_an_expired_lease_goes_to_the_next_holder(store: MetadataStore) -> None:
    a = store.acquire_lease("node:x", "a", 0.2)
    assert a is not None
    time.sleep(0.4)
    assert store.renew_lease(a, 30) is None, "expired"
    b = store.acquire_lease("node:x", "b", 30)
    assert b is not None and b.epoch == a.epoch + 1


def test_a_bound_lease_fences_every_write(backend: StoreBackend, store: MetadataStore) -> None:
    _pool_id, ld, vv = _populate(store)
    mine = store.acquire_lease("node:x", "a", 30)
    assert mine is not None
    store.bind_lease(mine)
    store.assign_many([(vv, 0, ld, 0)])
    other = backend.open()
    try:
        store.release_lease(mine)  # as if it expired
        theirs = other.acquire_lease("node:x", "b", 30)
        assert theirs is not None and theirs.epoch == mine.epoch + 1
        for write in (
            lambda: store.assign_many([(vv, 1, ld, 1)]),
            lambda: store.unassign(vv, [0]),
            lambda: store.add_alert(1.0, "info", "ld-created", "ld:1", "x", "new"),
            lambda: store.set_meta("clean", "1"),
        ):
            with pytest.raises(LeaseLost, match="lease lost"):
                write()
        assert store.map_rows_by_epoch() == {mine.epoch: 1}
        assert store.load_alerts() == []
        other.bind_lease(theirs)
        other.assign_many([(vv, 1, ld, 1)])
        assert other.map_rows_by_epoch() == {mine.epoch: 1, theirs.epoch: 1}
    finally:
        other.close()


# --- kill -9 in the middle of a group, reopen ---------------------------------------------------

_CHILD = """
import sys
from thinblock.metadata import open_store
store = open_store(sys.argv[1])
vv, ld = int(sys.argv[2]), int(sys.argv[3])
region = 0
print("ready", flush=True)
while True:
    store.assign_many([(vv, region + i, ld, region + i) for i in range(500)])
    region += 500
"""


def test_kill_9_in_the_middle_of_a_group_leaves_whole_groups(backend: StoreBackend) -> None:
    store = backend.open()
    pool = store.add_pool(_pool())
    pd_a = store.add_pd("/dev/a", 1 << 40, 1 << 30)
    pd_b = store.add_pd("/dev/b", 1 << 40, 1 << 30)
    ld = store.add_ld(LDRow(0, pool, 1, 2, 4096, MiB, 1 << 22, {(0, 0): (pd_a, 0), (0, 1): (pd_b, 0)}))
    vv = store.add_vv(_vv(pool, size=1 << 42))
    store.close()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, backend.url, str(vv), str(ld)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(0.8)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    again = backend.open(create=False)
    try:
        assert check_store(again) == []
        rows = again.map_array()
        assert len(rows) > 0 and len(rows) % 500 == 0, len(rows)
        assert np.array_equal(np.sort(rows[:, 1]), np.arange(len(rows)))
        assert again.region_counters() == ({vv: len(rows)}, {ld: len(rows)})
    finally:
        again.close()


@pytest.fixture
def empty_store(
    backend: StoreBackend, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[MetadataStore]:
    """A second empty store of the same backend (the target of an image)."""
    if backend.kind == "sqlite":
        (tmp_path / "target").mkdir()
        target = StoreBackend("sqlite", f"sqlite:{tmp_path / 'target'}").open()
        yield target
        target.close()
        return
    with fresh_database(request.getfixturevalue("postgres_cluster")) as url:
        target = StoreBackend("postgresql", url).open()
        yield target
        target.close()


def test_an_image_goes_into_an_empty_store_with_every_id_kept(
    store: MetadataStore, empty_store: MetadataStore
) -> None:
    _populate(store)
    pd_gap = store.add_pd("/dev/gone", 64 * MiB, 16 * MiB)
    store.remove_pd(pd_gap)  # ids with a hole: the copy must keep ids, not renumber
    pool2 = store.add_pool(_pool("q"))
    pd_c = store.add_pd("/dev/c", 64 * MiB, 16 * MiB)
    pd_d = store.add_pd("/dev/d", 64 * MiB, 16 * MiB)
    ld2 = store.add_ld(LDRow(0, pool2, 1, 2, 4096, MiB, 16, {(0, 0): (pd_c, 0), (0, 1): (pd_d, 0)}))
    vv2 = store.add_vv(_vv(pool2, "w"))
    store.set_vv_owner(vv2, "node-b")
    lease = store.acquire_lease("node:n", "h", 30.0)
    store.bind_lease(lease)
    store.assign_many([(vv2, r, ld2, 15 - r) for r in range(5)])
    snap = store.add_vv_sharing(_snapshot_row(pool2, "w-snap", vv2), vv2)  # shares the 5 regions
    store.set_meta("data_dir_id", "abc")
    store.set_meta("generation", "7")
    alert = store.add_alert(3.0, "critical", "pd-failed", "pd:2", "gone", "new")
    image = store.load_image()
    assert "schema_version" not in image.meta and image.meta["generation"] == "7"

    empty_store.write_image(image)

    assert check_store(empty_store) == []
    assert empty_store.counts() == store.counts()
    copied = empty_store.load_image()
    assert (copied.pds, copied.pools, copied.lds, copied.vvs, copied.alerts) == (
        image.pds,
        image.pools,
        image.lds,
        image.vvs,
        image.alerts,
    )
    assert (copied.meta, copied.vv_regions, copied.ld_regions_used) == (
        image.meta,
        image.vv_regions,
        image.ld_regions_used,
    )
    assert sorted(map(tuple, copied.map.tolist())) == sorted(map(tuple, image.map.tolist()))
    assert [v.kind for v in copied.vvs if v.id == snap] == ["snapshot"]
    assert empty_store.map_rows_by_epoch() == {None: 10}  # no lease of the target wrote them
    assert empty_store.read_lease("node:n") is None  # leases are not part of an image
    # New rows get ids past the copied ones.
    assert empty_store.add_pd("/dev/e", 64 * MiB, 16 * MiB) > pd_d
    assert empty_store.add_alert(4.0, "info", "ld-created", "ld:9", "x", "new") > alert
    assert empty_store.add_vv(_vv(pool2, "x")) > snap


def test_an_image_is_refused_by_a_store_that_is_not_empty(
    store: MetadataStore, empty_store: MetadataStore
) -> None:
    _populate(store)
    image = store.load_image()
    empty_store.add_alert(1.0, "info", "ld-created", "ld:1", "one alert is enough", "new")
    before = empty_store.counts()
    with pytest.raises(Conflict, match="not empty"):
        empty_store.write_image(image)
    assert empty_store.counts() == before
