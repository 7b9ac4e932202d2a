"""SQLite backend of the metadata store: one file, WAL mode, the embedded default.

Durability: ``synchronous=NORMAL`` in WAL mode means a commit is written to the WAL
(it survives ``kill -9`` of the server) but not fsynced; ``sync()`` fsyncs the WAL
and the database file, which the engine calls on every flush, so everything committed
before a completed flush also survives a power cut.

Redundancy for the check: each VV row counts its assigned regions and each LD row
counts its used regions, updated in the same transaction as the map.  A map row lost
or added behind the engine's back shows up as a count that does not match.

Threads: one connection, every method under one lock (the engine's metadata writer may run
the data path's transactions on its own thread while the loop runs management calls).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LeaseLost, MetadataCorrupt, MetadataStoreFull
from . import mapcheck
from .sql import TABLES, UNUSED_MAP_INDEX, SQLStore, Statement
from .store import Assignment, LDRow, Lease, StoreImage

#: the schema this code writes; it opens older ones by migrating them (``_MIGRATIONS``) and
#: refuses newer ones
SCHEMA_VERSION = 5
_SQLITE_FULL = 13
_SQLITE_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"  # unix seconds, with fractions

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pds (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
    chunklet_size INTEGER NOT NULL, health TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pools (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, raid INTEGER NOT NULL, set_size INTEGER NOT NULL,
    step INTEGER NOT NULL, region_size INTEGER NOT NULL, growth_increment INTEGER NOT NULL,
    growth_warning INTEGER, growth_limit INTEGER);
CREATE TABLE IF NOT EXISTS lds (
    id INTEGER PRIMARY KEY, pool_id INTEGER NOT NULL REFERENCES pools(id), raid INTEGER NOT NULL,
    set_size INTEGER NOT NULL, step INTEGER NOT NULL, region_size INTEGER NOT NULL,
    regions INTEGER NOT NULL, regions_used INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS ld_chunklets (
    ld_id INTEGER NOT NULL REFERENCES lds(id), row INTEGER NOT NULL, col INTEGER NOT NULL,
    pd_id INTEGER NOT NULL REFERENCES pds(id), chunklet INTEGER NOT NULL,
    PRIMARY KEY (ld_id, row, col), UNIQUE (pd_id, chunklet)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vvs (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, pool_id INTEGER NOT NULL REFERENCES pools(id),
    size INTEGER NOT NULL, alloc_warning_bytes INTEGER, alloc_warning_pct REAL,
    alloc_limit_bytes INTEGER, alloc_limit_pct REAL, cache_mode TEXT NOT NULL, created REAL NOT NULL,
    regions INTEGER NOT NULL DEFAULT 0, owner TEXT, kind TEXT NOT NULL DEFAULT 'volume', parent_id INTEGER,
    family_id INTEGER, snap_warning_bytes INTEGER, snap_warning_pct REAL, snap_limit_bytes INTEGER,
    snap_limit_pct REAL, snap_limit_policy TEXT NOT NULL DEFAULT 'fail', map_check INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS vv_map (
    vv_id INTEGER NOT NULL, vv_region INTEGER NOT NULL, ld_id INTEGER NOT NULL, ld_region INTEGER NOT NULL,
    epoch INTEGER,
    PRIMARY KEY (vv_id, vv_region)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cow_reservations (
    ld_id INTEGER NOT NULL, ld_region INTEGER NOT NULL, vv_id INTEGER NOT NULL, vv_region INTEGER NOT NULL,
    PRIMARY KEY (ld_id, ld_region)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, severity TEXT NOT NULL, kind TEXT NOT NULL,
    object TEXT NOT NULL, message TEXT NOT NULL, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, epoch INTEGER NOT NULL, expires_at REAL NOT NULL);
"""

# version -> statements that bring a store of that version to the next one
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        "ALTER TABLE vvs ADD COLUMN owner TEXT",
        "ALTER TABLE vv_map ADD COLUMN epoch INTEGER",
        "CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL,"
        " epoch INTEGER NOT NULL, expires_at REAL NOT NULL)",
    ],
    # Shared regions (snapshots and clones): an LD region may be mapped by several volumes of
    # one tree, so (ld_id, ld_region) is no longer unique (SQLite drops a constraint only by
    # building the table again); the volumes' tree; copy-on-write reservations.
    2: [
        "CREATE TABLE vv_map_v3 (vv_id INTEGER NOT NULL, vv_region INTEGER NOT NULL, ld_id INTEGER NOT NULL,"
        " ld_region INTEGER NOT NULL, epoch INTEGER, PRIMARY KEY (vv_id, vv_region)) WITHOUT ROWID",
        "INSERT INTO vv_map_v3(vv_id, vv_region, ld_id, ld_region, epoch)"
        " SELECT vv_id, vv_region, ld_id, ld_region, epoch FROM vv_map",
        "DROP TABLE vv_map",
        "ALTER TABLE vv_map_v3 RENAME TO vv_map",
        "CREATE INDEX vv_map_ld ON vv_map(ld_id, ld_region)",
        "ALTER TABLE vvs ADD COLUMN kind TEXT NOT NULL DEFAULT 'volume'",
        "ALTER TABLE vvs ADD COLUMN parent_id INTEGER",
        "ALTER TABLE vvs ADD COLUMN family_id INTEGER",
        "CREATE TABLE cow_reservations (ld_id INTEGER NOT NULL, ld_region INTEGER NOT NULL,"
        " vv_id INTEGER NOT NULL, vv_region INTEGER NOT NULL, PRIMARY KEY (ld_id, ld_region)) WITHOUT ROWID",
    ],
    # Snapshot space warning, limit and policy per volume (volume/snapspace.py).
    3: [
        "ALTER TABLE vvs ADD COLUMN snap_warning_bytes INTEGER",
        "ALTER TABLE vvs ADD COLUMN snap_warning_pct REAL",
        "ALTER TABLE vvs ADD COLUMN snap_limit_bytes INTEGER",
        "ALTER TABLE vvs ADD COLUMN snap_limit_pct REAL",
        "ALTER TABLE vvs ADD COLUMN snap_limit_policy TEXT NOT NULL DEFAULT 'fail'",
    ],
    # Each VV's map check (metadata/mapcheck.py), computed from its rows, replaces the second
    # index over the map rows (vv_map_check, schema 4 stores made it on open) that held each
    # row's LD address a second time for integrity_check: it doubled the cost of a snapshot.
    4: [
        "ALTER TABLE vvs ADD COLUMN map_check INTEGER NOT NULL DEFAULT 0",
        f"UPDATE vvs SET map_check = COALESCE((SELECT SUM({mapcheck.term_sql()}) FROM vv_map"
        " WHERE vv_map.vv_id = vvs.id), 0)",
        "DROP INDEX IF EXISTS vv_map_check",
    ],
}


class SQLiteStore(SQLStore):
    FILENAME = "thinblock.db"

    def __init__(self, data_dir: str | Path, *, create: bool = True) -> None:
        self.path = Path(data_dir) / self.FILENAME
        self.url = f"sqlite:{Path(data_dir)}"
        self._lock = threading.RLock()
        self._lease: Lease | None = None
        self._map_cache: np.ndarray | None = None
        existed = self.path.exists()
        if not existed and not create:
            raise MetadataCorrupt(f"no metadata store at {self.path}")
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per method.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            if existed and not self._holds_a_store():
                # A store file that is there but empty (truncated to nothing, say) must not be taken
                # for a new store: that would drop every volume silently.  "A failed check refuses
                # to start with a clear message, never silently repairs."  Nothing is written to it.
                size = self.path.stat().st_size
                self._db.close()
                raise MetadataCorrupt(
                    f"{self.path} exists but holds no thinblock metadata ({size} bytes; truncated or"
                    " emptied?): refusing to use it as a new store"
                )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._open_schema(existed)
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            # UnicodeDecodeError: SQLite's message quotes damaged schema text that is not UTF-8.
            self._db.close()
            raise self._error(exc, "cannot open the metadata store") from exc

    def _open_schema(self, existed: bool) -> None:
        version_text = self._get_meta(self._db, "schema_version") if existed else None
        if version_text is None:
            with self._write() as db:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                self._put_meta(db, "schema_version", str(SCHEMA_VERSION))
            return
        try:
            version = int(version_text)
        except ValueError:
            raise MetadataCorrupt(f"{self.path}: schema version {version_text!r} is not a number") from None
        if version > SCHEMA_VERSION:
            raise MetadataCorrupt(
                f"{self.path}: schema version {version} was written by a newer thinblock; this one"
                f" reads versions up to {SCHEMA_VERSION} (upgrade thinblock, or restore the old store)"
            )
        if version < SCHEMA_VERSION:
            with self._write() as db:
                for step in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step]:
                        db.execute(statement)
                self._put_meta(db, "schema_version", str(SCHEMA_VERSION))
        if self._db.execute(
            f"SELECT 1 FROM sqlite_master WHERE type='index' AND name='{UNUSED_MAP_INDEX}'"
        ).fetchone():
            with self._write() as db:
                db.execute(f"DROP INDEX IF EXISTS {UNUSED_MAP_INDEX}")

    # --- helpers ---
    def _holds_a_store(self) -> bool:
        """Does the open file hold a store (its ``meta`` table with a schema version)?  Reads only."""
        row = self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        return row is not None and self._get_meta(self._db, "schema_version") is not None

    def _error(self, exc: BaseException, doing: str) -> Exception:
        if (
            isinstance(exc, sqlite3.DatabaseError)
            and getattr(exc, "sqlite_errorcode", 0) & 0xFF == _SQLITE_FULL
        ):
            return MetadataStoreFull(f"metadata store {self.path} is full ({doing}: {exc})")
        return MetadataCorrupt(f"{self.path}: {doing}: {exc}")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
                raise self._error(exc, "cannot read the metadata store") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed when the block ends, rolled back (and the error turned
        into a thinblock one) when it raises.  With a lease bound, the lease is checked first,
        inside the transaction (BEGIN IMMEDIATE: no other writer can come between)."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                lease = self._lease
                if lease is not None:
                    held = db.execute(
                        f"SELECT 1 FROM leases WHERE name=? AND holder=? AND epoch=? AND expires_at > {_NOW}",
                        (lease.name, lease.holder, lease.epoch),
                    ).fetchone()
                    if held is None:
                        raise LeaseLost(
                            f"lease lost: '{lease.name}' is no longer held by {lease.holder} with epoch"
                            f" {lease.epoch}; the metadata write was refused"
                        )
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.DatabaseError:
                        pass
                if isinstance(exc, sqlite3.IntegrityError) or not isinstance(
                    exc, (sqlite3.DatabaseError, UnicodeDecodeError)
                ):
                    raise
                raise self._error(exc, "cannot write the metadata store") from exc

    @staticmethod
    def _get_meta(db: sqlite3.Connection, key: str) -> str | None:
        row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @staticmethod
    def _put_meta(db: sqlite3.Connection, key: str, value: str) -> None:
        db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    def _insert(self, sql: str, args: tuple[Any, ...]) -> int:
        with self._write() as db:
            cur = db.execute(sql, args)
        assert cur.lastrowid is not None
        return cur.lastrowid

    def _exec(self, sql: str, args: tuple[Any, ...]) -> None:
        with self._write() as db:
            db.execute(sql, args)

    def _exec_all(self, statements: Sequence[Statement]) -> None:
        with self._write() as db:
            for sql, args in statements:
                db.execute(sql, args)

    def _exec_counted(self, statements: Sequence[Statement]) -> list[int]:
        with self._write() as db:
            self._map_cache = None
            return [db.execute(sql, args).rowcount for sql, args in statements]

    def _insert_and_exec(self, sql: str, args: tuple[Any, ...], then: Sequence[str]) -> int:
        with self._write() as db:
            self._map_cache = None
            new_id = db.execute(sql, args).lastrowid
            assert new_id is not None
            for statement in then:
                db.execute(statement, (new_id,) * statement.count("?"))
        return new_id

    def _query_all(self, queries: Sequence[Statement]) -> list[list[tuple[Any, ...]]]:
        with self._read() as db:
            return [db.execute(sql, args).fetchall() for sql, args in queries]

    # --- life cycle ---
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def sync(self) -> None:
        for p in (self.path, Path(str(self.path) + "-wal")):
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def change_count(self) -> int:
        # Rows changed by this connection since it opened (the only writer): moves with every
        # committed change (and with assignments still open, which the flush commits first).
        return int(self._db.total_changes)

    def backend_problems(self) -> list[str]:
        problems: list[str] = []
        try:
            with self._lock:
                # SQLite writes whole pages: a file that ends inside one was truncated (the cut
                # page reads as zeros past the end, which integrity_check can miss, e.g. when it
                # belongs to an empty table).
                (page_size,) = self._db.execute("PRAGMA page_size").fetchone()
                size = self.path.stat().st_size
                if size % page_size:
                    return [
                        f"{self.path} is {size} bytes, not a whole number of {page_size}-byte pages (truncated?)"
                    ]
                # integrity_check, not quick_check: it also verifies that every index agrees with its
                # table and that keys are in order.  A flipped bit in a vv_map row's LD address
                # (drill 6) is the map check's to find (metadata/mapcheck.py, check.py): no index
                # holds the address a second time since schema 5.
                for (msg,) in self._db.execute("PRAGMA integrity_check").fetchall():
                    if msg != "ok":
                        problems.append(f"sqlite: {msg}")
                if problems:
                    return problems
                (bad,) = self._db.execute(
                    "SELECT COUNT(*) FROM vv_map WHERE typeof(vv_id) != 'integer' OR typeof(vv_region) != 'integer'"
                    " OR typeof(ld_id) != 'integer' OR typeof(ld_region) != 'integer'"
                ).fetchone()
                if bad:
                    problems.append(f"{bad} region map row(s) hold values that are not integers")
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            problems.append(f"sqlite: {exc}")
        return problems

    # --- LDs ---
    def add_ld(self, row: LDRow) -> int:
        # One transaction: a kill between the two inserts must not leave an LD without chunklets,
        # which the check then refuses to open.
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO lds(pool_id, raid, set_size, step, region_size, regions) VALUES(?, ?, ?, ?, ?, ?)",
                (row.pool_id, row.raid, row.set_size, row.step, row.region_size, row.regions),
            )
            ld_id = cur.lastrowid
            assert ld_id is not None
            db.executemany(
                "INSERT INTO ld_chunklets(ld_id, row, col, pd_id, chunklet) VALUES(?, ?, ?, ?, ?)",
                [(ld_id, r, c, pd, idx) for (r, c), (pd, idx) in row.chunklets.items()],
            )
        return ld_id

    # --- the image ---
    def write_image(self, image: StoreImage) -> None:
        with self._write() as db:
            counts = {t: int(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in TABLES}
            if any(counts.values()):
                raise self._not_empty(counts, self.url)
            self._map_cache = None
            for statement, rows in self._image_statements(image):
                db.executemany(statement, rows)
            db.executemany(
                "INSERT INTO vv_map(vv_id, vv_region, ld_id, ld_region) VALUES(?, ?, ?, ?)",
                image.map.tolist(),
            )

    # --- the map ---
    def assign_many(self, rows: list[Assignment]) -> None:
        if not rows:
            return
        vv_delta: dict[int, int] = {}
        ld_delta: dict[int, int] = {}
        for vv_id, _vr, ld_id, _lr in rows:
            vv_delta[vv_id] = vv_delta.get(vv_id, 0) + 1
            ld_delta[ld_id] = ld_delta.get(ld_id, 0) + 1
        check_delta = mapcheck.added_by_vv(rows)
        epoch = None if self._lease is None else self._lease.epoch
        with self._write() as db:
            self._map_cache = None
            db.executemany(
                "INSERT INTO vv_map(vv_id, vv_region, ld_id, ld_region, epoch) VALUES(?, ?, ?, ?, ?)",
                [(*row, epoch) for row in rows],
            )
            db.executemany(
                "UPDATE vvs SET regions = regions + ?, map_check = map_check + ? WHERE id=?",
                [(n, check_delta[k], k) for k, n in vv_delta.items()],
            )
            db.executemany(
                "UPDATE lds SET regions_used = regions_used + ? WHERE id=?",
                [(n, k) for k, n in ld_delta.items()],
            )

    def unassign(self, vv_id: int, vv_regions: list[int]) -> int:
        gone = 0
        taken = 0  # what the VV's map check loses
        per_ld: dict[int, int] = {}  # rows gone per LD: one counter update each, not one per row
        with self._write() as db:
            self._map_cache = None
            for vr in vv_regions:
                row = db.execute(
                    "DELETE FROM vv_map WHERE vv_id=? AND vv_region=? RETURNING ld_id, ld_region", (vv_id, vr)
                ).fetchone()
                if row is not None:
                    gone += 1
                    taken += mapcheck.term(vr, row[0], row[1])
                    per_ld[row[0]] = per_ld.get(row[0], 0) + 1
            db.executemany(
                "UPDATE lds SET regions_used = regions_used - ? WHERE id=?",
                [(n, ld) for ld, n in per_ld.items()],
            )
            if gone:
                db.execute(
                    "UPDATE vvs SET regions = regions - ?, map_check = map_check - ? WHERE id=?",
                    (gone, taken, vv_id),
                )
        return gone

    def map_array(self) -> np.ndarray:
        """Every map row as an (N, 4) int64 array: vv_id, vv_region, ld_id, ld_region.

        One query whose text SQLite builds in C and numpy parses: about 1 s for a million rows,
        half of what fetching a million tuples costs.  Kept until the next change of the map,
        so the check on open and the engine's load read the map once between them."""
        with self._read() as db:
            if self._map_cache is None:
                (text,) = db.execute(
                    "SELECT group_concat(vv_id || ' ' || vv_region || ' ' || ld_id || ' ' || ld_region, ' ')"
                    " FROM vv_map"
                ).fetchone()
                (rows,) = db.execute("SELECT COUNT(*) FROM vv_map").fetchone()
                self._map_cache = self._map_from_text(
                    text or "", rows, f"{self.path}: the region map holds a value that is not an integer"
                )
            return self._map_cache

    # --- leases (the local clock is the store's clock) ---
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        with self._lease_tx() as db:
            row = db.execute(
                f"SELECT holder, epoch, expires_at > {_NOW} FROM leases WHERE name=?", (name,)
            ).fetchone()
            if row is None:
                epoch = 1
            elif row[0] == holder:
                epoch = int(row[1])
            elif row[2]:
                return None
            else:
                epoch = int(row[1]) + 1
            db.execute(
                f"INSERT INTO leases(name, holder, epoch, expires_at) VALUES(?, ?, ?, {_NOW} + ?)"
                " ON CONFLICT(name) DO UPDATE SET holder=excluded.holder, epoch=excluded.epoch,"
                " expires_at=excluded.expires_at",
                (name, holder, epoch, ttl_s),
            )
            (expires,) = db.execute("SELECT expires_at FROM leases WHERE name=?", (name,)).fetchone()
        return Lease(name, holder, epoch, float(expires))

    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease | None:
        with self._lease_tx() as db:
            row = db.execute(
                f"UPDATE leases SET expires_at = {_NOW} + ? WHERE name=? AND holder=? AND epoch=?"
                f" AND expires_at > {_NOW} RETURNING expires_at",
                (ttl_s, lease.name, lease.holder, lease.epoch),
            ).fetchone()
        return None if row is None else Lease(lease.name, lease.holder, lease.epoch, float(row[0]))

    def release_lease(self, lease: Lease) -> None:
        with self._lease_tx() as db:
            db.execute(
                f"UPDATE leases SET expires_at = {_NOW} WHERE name=? AND holder=? AND epoch=?",
                (lease.name, lease.holder, lease.epoch),
            )

    def read_lease(self, name: str) -> Lease | None:
        with self._read() as db:
            row = db.execute("SELECT holder, epoch, expires_at FROM leases WHERE name=?", (name,)).fetchone()
        return None if row is None else Lease(name, str(row[0]), int(row[1]), float(row[2]))

    @contextmanager
    def _lease_tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on the lease table itself: not fenced by the bound lease (a node
        must be able to renew, or take a lease back, whatever its binding)."""
        with self._lock:
            bound, self._lease = self._lease, None
            try:
                with self._write() as db:
                    yield db
            finally:
                self._lease = bound
