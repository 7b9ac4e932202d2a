"""SQLite backend of the metadata store: one file, WAL mode, the embedded default.

Durability: ``synchronous=NORMAL`` in WAL mode means a commit is written to the WAL
(it survives ``kill -9`` of the server) but not fsynced; ``sync()`` fsyncs the WAL
and the database file, which the engine calls on every flush, so everything committed
before a completed flush also survives a power cut.

Redundancy for the check: each VV row counts its assigned regions and each LD row
counts its used regions, updated in the same transaction as the map.  A map row lost
or added behind the engine's back shows up as a count that does not match.
"""

from __future__ import annotations

import os
import sqlite3
import warnings
from pathlib import Path

import numpy as np

from ..errors import MetadataCorrupt
from ..model import AlertKind, AlertState, PDHealth, Severity
from .store import AlertRow, LDRow, MetadataStore, PDRow, PoolRow, VVRow

SCHEMA_VERSION = "1"

# Values the engine interprets; anything else in the store is damage (see ``check``).
_RAID_LEVELS = (0, 1, 5)
_PD_HEALTH = {h.value for h in PDHealth}
_SEVERITIES = {s.value for s in Severity}
_ALERT_KINDS = {k.value for k in AlertKind}
_ALERT_STATES = {s.value for s in AlertState}


def _is_power_of_two(n: object) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


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
    regions INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS vv_map (
    vv_id INTEGER NOT NULL, vv_region INTEGER NOT NULL, ld_id INTEGER NOT NULL, ld_region INTEGER NOT NULL,
    PRIMARY KEY (vv_id, vv_region), UNIQUE (ld_id, ld_region)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, severity TEXT NOT NULL, kind TEXT NOT NULL,
    object TEXT NOT NULL, message TEXT NOT NULL, state TEXT NOT NULL);
"""


class SQLiteStore(MetadataStore):
    FILENAME = "thinblock.db"

    def __init__(self, data_dir: str | Path, *, create: bool = True) -> None:
        self.path = Path(data_dir) / self.FILENAME
        self._vv_delta: dict[int, int] = {}
        self._ld_delta: dict[int, int] = {}
        self.pending_assignments = 0
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
            self._db.executescript(_SCHEMA)
            version = self.get_meta("schema_version")
            if version is None:
                self.set_meta("schema_version", SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise MetadataCorrupt(
                    f"{self.path}: schema version {version}, this thinblock reads {SCHEMA_VERSION}"
                )
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            # UnicodeDecodeError: SQLite's message quotes damaged schema text that is not UTF-8.
            raise MetadataCorrupt(f"{self.path}: cannot read the metadata store: {exc}") from exc

    # --- helpers ---
    def _holds_a_store(self) -> bool:
        """Does the open file hold a store (its ``meta`` table with a schema version)?  Reads only."""
        row = self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        return row is not None and self.get_meta("schema_version") is not None

    def _tx(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        self.commit()  # pending assignments first: a failing statement must not roll them back
        try:
            with self._db:  # commit on success, roll back on error
                return self._db.execute(sql, args)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.IntegrityError):
                raise
            raise MetadataCorrupt(f"{self.path}: {exc}") from exc

    # --- life cycle ---
    def close(self) -> None:
        self.commit()
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

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._tx(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    def counts(self) -> dict[str, int]:
        return {
            table: self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("pds", "pools", "lds", "ld_chunklets", "vvs", "vv_map", "alerts")
        }

    def check(self) -> list[str]:
        """Every rule of the brief's store check, each as a query; problems named plainly."""
        q = self._db.execute
        problems: list[str] = []
        try:
            # integrity_check, not quick_check: it also verifies that every index agrees with its
            # table and that keys are in order.  quick_check let a flipped bit in a vv_map row
            # through (drill 6): the row then pointed at another LD region -- wrong data served --
            # or at one the unique index still gave to another row.  It costs about 0.5 s for a
            # million mapped regions.
            for (msg,) in q("PRAGMA integrity_check").fetchall():
                if msg != "ok":
                    problems.append(f"sqlite: {msg}")
            if problems:
                return problems
            problems += self._check_map()
            for pd, chunklet, n in q(
                "SELECT pd_id, chunklet, COUNT(*) FROM ld_chunklets GROUP BY pd_id, chunklet HAVING COUNT(*) > 1"
            ):
                problems.append(f"chunklet {chunklet} of PD {pd} is used {n} times")
            for ld, pd, chunklet in q(
                "SELECT c.ld_id, c.pd_id, c.chunklet FROM ld_chunklets c LEFT JOIN pds p ON p.id = c.pd_id"
                " WHERE p.id IS NULL OR c.chunklet < 0 OR c.chunklet >= p.size / p.chunklet_size LIMIT 20"
            ):
                problems.append(f"LD {ld} uses chunklet {chunklet} of PD {pd}, which does not exist")
            for ld, row, n in q(
                "SELECT ld_id, row, COUNT(DISTINCT pd_id) FROM ld_chunklets GROUP BY ld_id, row"
            ):
                (cnt,) = q("SELECT COUNT(*) FROM ld_chunklets WHERE ld_id=? AND row=?", (ld, row)).fetchone()
                if cnt != n:
                    problems.append(f"LD {ld} row {row} has two chunklets on one PD")
            for ld, pool in q(
                "SELECT l.id, l.pool_id FROM lds l LEFT JOIN pools p ON p.id = l.pool_id WHERE p.id IS NULL"
            ):
                problems.append(f"LD {ld} belongs to pool {pool}, which does not exist")
            for (ld,) in q(
                "SELECT l.id FROM lds l WHERE NOT EXISTS (SELECT 1 FROM ld_chunklets c WHERE c.ld_id = l.id)"
            ):
                problems.append(f"LD {ld} has no chunklets")
            for name, pool in q(
                "SELECT v.name, v.pool_id FROM vvs v LEFT JOIN pools p ON p.id = v.pool_id WHERE p.id IS NULL"
            ):
                problems.append(f"VV '{name}' belongs to pool {pool}, which does not exist")
            # An LD is made with its pool's policy, which never changes: a difference is damage (read
            # with the wrong RAID level or step, the LD would return another place's bytes).
            for ld, pool in q(
                "SELECT l.id, p.name FROM lds l JOIN pools p ON p.id = l.pool_id WHERE l.raid != p.raid"
                " OR l.set_size != p.set_size OR l.step != p.step OR l.region_size != p.region_size"
            ):
                problems.append(
                    f"LD {ld} has a RAID level, set size, step or region size other than its pool '{pool}'"
                )
            problems += self._check_values()
        except (sqlite3.DatabaseError, UnicodeDecodeError) as exc:
            problems.append(f"sqlite: {exc}")
        return problems

    def map_array(self) -> np.ndarray:
        """Every map row as an (N, 4) int64 array: vv_id, vv_region, ld_id, ld_region.

        One query whose text SQLite builds in C and numpy parses: about 1 s for a million rows,
        half of what fetching a million tuples costs.  Kept until the next change of the map,
        so the check on open and the engine's load read the map once between them."""
        if self._map_cache is None:
            self.commit()
            (text,) = self._db.execute(
                "SELECT group_concat(vv_id || ' ' || vv_region || ' ' || ld_id || ' ' || ld_region, ' ')"
                " FROM vv_map"
            ).fetchone()
            (rows,) = self._db.execute("SELECT COUNT(*) FROM vv_map").fetchone()
            if not text:
                flat = np.zeros(0, dtype=np.int64)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # raised when it stops early
                    flat = np.fromstring(text, dtype=np.int64, sep=" ")
            if flat.size != 4 * rows:
                raise sqlite3.DatabaseError("the region map holds a value that is not an integer")
            self._map_cache = flat.reshape(-1, 4)
        return self._map_cache

    def forget_map_array(self) -> None:
        self._map_cache = None

    def _check_map(self) -> list[str]:
        """The map rules, on the whole map at once (numpy), independent of SQLite's indexes
        (a damaged index must not hide a region assigned twice)."""
        problems: list[str] = []
        (bad,) = self._db.execute(
            "SELECT COUNT(*) FROM vv_map WHERE typeof(vv_id) != 'integer' OR typeof(vv_region) != 'integer'"
            " OR typeof(ld_id) != 'integer' OR typeof(ld_region) != 'integer'"
        ).fetchone()
        if bad:
            return [f"{bad} region map row(s) hold values that are not integers"]
        m = self.map_array()
        vv_id, vv_region, ld_id, ld_region = m[:, 0], m[:, 1], m[:, 2], m[:, 3]
        lds = {
            r[0]: r[1:]
            for r in self._db.execute("SELECT id, pool_id, regions, region_size, regions_used FROM lds")
        }
        vvs = {r[0]: r[1:] for r in self._db.execute("SELECT id, name, pool_id, size, regions FROM vvs")}

        def dupes(a: np.ndarray, b: np.ndarray) -> list[tuple[int, int]]:
            if len(a) < 2:
                return []
            order = np.lexsort((b, a))
            a2, b2 = a[order], b[order]
            same = (a2[1:] == a2[:-1]) & (b2[1:] == b2[:-1])
            return [(int(x), int(y)) for x, y in zip(a2[1:][same][:20], b2[1:][same][:20], strict=True)]

        for vv, region in dupes(vv_id, vv_region):
            problems.append(f"VV {vv} region {region} is mapped more than once")
        for ld, region in dupes(ld_id, ld_region):
            problems.append(f"LD {ld} region {region} is assigned more than once")
        # Per-row bounds, vectorised through lookup tables indexed by id.
        known_ld = np.isin(ld_id, np.fromiter(lds, dtype=np.int64, count=len(lds)))
        for row in m[~known_ld][:20]:
            problems.append(f"VV {row[0]} region {row[1]} points at LD {row[2]}, which does not exist")
        known_vv = np.isin(vv_id, np.fromiter(vvs, dtype=np.int64, count=len(vvs)))
        for row in m[~known_vv][:20]:
            problems.append(f"map entry for region {row[1]} of VV {row[0]}, which does not exist")
        ok = known_ld & known_vv
        if ok.any():
            mm = m[ok]
            # Build lookups with searchsorted over the sorted ids (handful of LDs and VVs).
            ld_keys = np.array(sorted(lds), dtype=np.int64)
            ld_pool = np.array([lds[k][0] for k in ld_keys], dtype=np.int64)
            ld_nreg = np.array([lds[k][1] for k in ld_keys], dtype=np.int64)
            ld_rsize = np.array([lds[k][2] for k in ld_keys], dtype=np.int64)
            vv_keys = np.array(sorted(vvs), dtype=np.int64)
            vv_pool = np.array([vvs[k][1] for k in vv_keys], dtype=np.int64)
            vv_size = np.array([vvs[k][2] for k in vv_keys], dtype=np.int64)
            li = np.searchsorted(ld_keys, mm[:, 2])
            vi = np.searchsorted(vv_keys, mm[:, 0])
            outside = (mm[:, 3] < 0) | (mm[:, 3] >= ld_nreg[li])
            for row in mm[outside][:20]:
                problems.append(f"VV {row[0]} region {row[1]} points at region {row[3]} outside LD {row[2]}")
            for row in mm[ld_pool[li] != vv_pool[vi]][:20]:
                problems.append(f"VV {row[0]} region {row[1]} points at LD {row[2]} of another pool")
            past = (mm[:, 1] < 0) | (mm[:, 1] * ld_rsize[li] >= vv_size[vi])
            for row, size in zip(mm[past][:20], vv_size[vi][past][:20], strict=True):
                problems.append(f"VV {row[0]} maps region {row[1]}, past its size {size}")
        vv_counts = dict(zip(*np.unique(vv_id, return_counts=True), strict=True)) if len(m) else {}
        for k, (name, _pool, _size, counted) in vvs.items():
            actual = int(vv_counts.get(k, 0))
            if counted != actual:
                problems.append(
                    f"VV '{name}' records {counted} assigned regions but its map holds {actual}"
                    " (region map rows lost or added)"
                )
        ld_counts = dict(zip(*np.unique(ld_id, return_counts=True), strict=True)) if len(m) else {}
        for k, (_pool, _n, _rs, counted) in lds.items():
            actual = int(ld_counts.get(k, 0))
            if counted != actual:
                problems.append(f"LD {k} records {counted} used regions but the maps assign {actual}")
        return problems

    def _check_values(self) -> list[str]:
        """Every row reads back through the queries the engine loads with (text that is not UTF-8,
        a damaged schema, would otherwise stop the engine only half-way through loading), and
        every value the engine interprets is one it can use."""
        problems: list[str] = []
        pds = self.load_pds()
        pools = self.load_pools()
        lds = self.load_lds()
        self.load_vvs()
        alerts = self.load_alerts()
        for key in ("schema_version", "clean"):
            self.get_meta(key)
        chunklet_of = {}
        for pd in pds:
            chunklet_of[pd.id] = pd.chunklet_size
            if not _is_power_of_two(pd.chunklet_size) or pd.chunklet_size < 4096:
                problems.append(f"PD {pd.id} has a chunklet size of {pd.chunklet_size} bytes")
            elif pd.size < pd.chunklet_size:
                problems.append(f"PD {pd.id} is {pd.size} bytes, smaller than one chunklet")
            if pd.health not in _PD_HEALTH:
                problems.append(f"PD {pd.id} has health {pd.health!r}")
        for pool in pools:
            if pool.raid not in _RAID_LEVELS or not _is_power_of_two(pool.region_size):
                problems.append(f"pool '{pool.name}' has RAID {pool.raid} and region size {pool.region_size}")
        for ld in lds:
            if ld.raid not in _RAID_LEVELS or not _is_power_of_two(ld.region_size) or ld.set_size < 1:
                problems.append(
                    f"LD {ld.id} has RAID {ld.raid}, set size {ld.set_size}, region size {ld.region_size}"
                )
                continue
            rows = 1 + max((r for r, _ in ld.chunklets), default=-1)
            if set(ld.chunklets) != {(r, c) for r in range(rows) for c in range(ld.set_size)}:
                problems.append(
                    f"LD {ld.id} does not have {ld.set_size} chunklets in each of its {rows} rows"
                )
            sizes = {chunklet_of.get(pd_id) for pd_id, _ in ld.chunklets.values()}
            if len(sizes) > 1:
                problems.append(f"LD {ld.id} has chunklets of different sizes")
        for alert in alerts:
            if (
                alert.severity not in _SEVERITIES
                or alert.kind not in _ALERT_KINDS
                or alert.state not in _ALERT_STATES
            ):
                problems.append(
                    f"alert {alert.id} has severity {alert.severity!r}, kind {alert.kind!r}, state {alert.state!r}"
                )
        return problems

    # --- PDs ---
    def add_pd(self, path: str, size: int, chunklet_size: int) -> int:
        cur = self._tx(
            "INSERT INTO pds(path, size, chunklet_size, health) VALUES(?, ?, ?, 'normal')",
            (path, size, chunklet_size),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def set_pd_health(self, pd_id: int, health: str) -> None:
        self._tx("UPDATE pds SET health=? WHERE id=?", (health, pd_id))

    def remove_pd(self, pd_id: int) -> None:
        self._tx("DELETE FROM pds WHERE id=?", (pd_id,))

    def load_pds(self) -> list[PDRow]:
        return [
            PDRow(*r)
            for r in self._db.execute("SELECT id, path, size, chunklet_size, health FROM pds ORDER BY id")
        ]

    # --- pools ---
    def add_pool(self, row: PoolRow) -> int:
        cur = self._tx(
            "INSERT INTO pools(name, raid, set_size, step, region_size, growth_increment, growth_warning,"
            " growth_limit) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.name,
                row.raid,
                row.set_size,
                row.step,
                row.region_size,
                row.growth_increment,
                row.growth_warning,
                row.growth_limit,
            ),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def update_pool(self, row: PoolRow) -> None:
        self._tx(
            "UPDATE pools SET growth_increment=?, growth_warning=?, growth_limit=? WHERE id=?",
            (row.growth_increment, row.growth_warning, row.growth_limit, row.id),
        )

    def delete_pool(self, pool_id: int) -> None:
        self._tx("DELETE FROM pools WHERE id=?", (pool_id,))

    def load_pools(self) -> list[PoolRow]:
        return [
            PoolRow(*r)
            for r in self._db.execute(
                "SELECT id, name, raid, set_size, step, region_size, growth_increment, growth_warning, growth_limit"
                " FROM pools ORDER BY id"
            )
        ]

    # --- LDs ---
    def add_ld(self, row: LDRow) -> int:
        # One explicit transaction: in autocommit mode (isolation_level=None) ``with self._db``
        # opens none, and a kill between the two inserts left an LD without chunklets, which
        # the check then refuses to open.
        self.commit()
        db = self._db
        try:
            db.execute("BEGIN")
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
            db.execute("COMMIT")
            return ld_id
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.IntegrityError):
                raise MetadataCorrupt(f"{self.path}: {exc}") from exc
            raise

    def replace_chunklet(self, ld_id: int, row: int, column: int, pd_id: int, index: int) -> None:
        self._tx(
            "UPDATE ld_chunklets SET pd_id=?, chunklet=? WHERE ld_id=? AND row=? AND col=?",
            (pd_id, index, ld_id, row, column),
        )

    def delete_ld(self, ld_id: int) -> None:
        self.commit()
        db = self._db
        try:
            db.execute("BEGIN")  # one transaction, as in add_ld
            db.execute("DELETE FROM ld_chunklets WHERE ld_id=?", (ld_id,))
            db.execute("DELETE FROM lds WHERE id=?", (ld_id,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def load_lds(self) -> list[LDRow]:
        lds = {
            r[0]: LDRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], {})
            for r in self._db.execute(
                "SELECT id, pool_id, raid, set_size, step, region_size, regions FROM lds ORDER BY id"
            )
        }
        for ld_id, row, col, pd_id, chunklet in self._db.execute(
            "SELECT ld_id, row, col, pd_id, chunklet FROM ld_chunklets"
        ):
            if ld_id in lds:
                lds[ld_id].chunklets[(row, col)] = (pd_id, chunklet)
        return list(lds.values())

    # --- VVs and maps ---
    def add_vv(self, row: VVRow) -> int:
        cur = self._tx(
            "INSERT INTO vvs(name, pool_id, size, alloc_warning_bytes, alloc_warning_pct, alloc_limit_bytes,"
            " alloc_limit_pct, cache_mode, created) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.name,
                row.pool_id,
                row.size,
                row.alloc_warning_bytes,
                row.alloc_warning_pct,
                row.alloc_limit_bytes,
                row.alloc_limit_pct,
                row.cache_mode,
                row.created,
            ),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def update_vv(self, row: VVRow) -> None:
        self._tx(
            "UPDATE vvs SET size=?, alloc_warning_bytes=?, alloc_warning_pct=?, alloc_limit_bytes=?,"
            " alloc_limit_pct=?, cache_mode=? WHERE id=?",
            (
                row.size,
                row.alloc_warning_bytes,
                row.alloc_warning_pct,
                row.alloc_limit_bytes,
                row.alloc_limit_pct,
                row.cache_mode,
                row.id,
            ),
        )

    def delete_vv(self, vv_id: int) -> None:
        self._tx("DELETE FROM vvs WHERE id=?", (vv_id,))

    def load_vvs(self) -> list[VVRow]:
        return [
            VVRow(*r)
            for r in self._db.execute(
                "SELECT id, name, pool_id, size, alloc_warning_bytes, alloc_warning_pct, alloc_limit_bytes,"
                " alloc_limit_pct, cache_mode, created FROM vvs ORDER BY id"
            )
        ]

    def assign(self, vv_id: int, vv_region: int, ld_id: int, ld_region: int) -> None:
        """Insert the map row in the open transaction (begun if needed); ``commit`` ends it.
        The VV and LD region counters are kept in memory and written by ``commit``, in the
        same transaction as the rows they count, so they always agree once committed."""
        db = self._db
        self._map_cache = None
        if not db.in_transaction:
            db.execute("BEGIN")
        db.execute(
            "INSERT INTO vv_map(vv_id, vv_region, ld_id, ld_region) VALUES(?, ?, ?, ?)",
            (vv_id, vv_region, ld_id, ld_region),
        )
        self._vv_delta[vv_id] = self._vv_delta.get(vv_id, 0) + 1
        self._ld_delta[ld_id] = self._ld_delta.get(ld_id, 0) + 1
        self.pending_assignments += 1

    def commit(self) -> None:
        db = self._db
        if not db.in_transaction:
            return
        try:
            db.executemany(
                "UPDATE vvs SET regions = regions + ? WHERE id=?", [(n, k) for k, n in self._vv_delta.items()]
            )
            db.executemany(
                "UPDATE lds SET regions_used = regions_used + ? WHERE id=?",
                [(n, k) for k, n in self._ld_delta.items()],
            )
            db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise MetadataCorrupt(f"{self.path}: cannot commit region assignments: {exc}") from exc
        self._vv_delta.clear()
        self._ld_delta.clear()
        self.pending_assignments = 0

    def unassign(self, vv_id: int, vv_regions: list[int]) -> None:
        self.commit()
        self._map_cache = None
        db = self._db
        try:
            db.execute("BEGIN")
            for vr in vv_regions:
                row = db.execute(
                    "DELETE FROM vv_map WHERE vv_id=? AND vv_region=? RETURNING ld_id", (vv_id, vr)
                ).fetchone()
                if row is not None:
                    db.execute("UPDATE vvs SET regions = regions - 1 WHERE id=?", (vv_id,))
                    db.execute("UPDATE lds SET regions_used = regions_used - 1 WHERE id=?", (row[0],))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # --- alerts ---
    def add_alert(self, time: float, severity: str, kind: str, obj: str, message: str, state: str) -> int:
        cur = self._tx(
            "INSERT INTO alerts(time, severity, kind, object, message, state) VALUES(?, ?, ?, ?, ?, ?)",
            (time, severity, kind, obj, message, state),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def set_alert_state(self, alert_id: int, state: str) -> None:
        self._tx("UPDATE alerts SET state=? WHERE id=?", (state, alert_id))

    def load_alerts(self) -> list[AlertRow]:
        return [
            AlertRow(*r)
            for r in self._db.execute(
                "SELECT id, time, severity, kind, object, message, state FROM alerts ORDER BY id"
            )
        ]
