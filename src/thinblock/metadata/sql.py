"""What the SQL backends share: the store methods whose statements both run unchanged.

SQLite and PostgreSQL hold the same tables (``sqlite.py``, ``postgres.py``), so most methods
are the same statement on either: written once here, with ``?`` placeholders.  A backend
supplies four primitives -- ``_exec`` and ``_insert`` (one write transaction each),
``_exec_all`` (several statements in one write transaction) and ``_query_all`` (several
queries in one read transaction) -- and translates the placeholders to its driver's style in
them.  What differs stays in the backend: schema and migrations, connections and error
mapping, the lease statements (each store's own clock), the bulk map statements (SQLite's
``executemany`` against PostgreSQL's ``unnest``), and reading the whole map.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import Conflict, MetadataCorrupt
from . import mapcheck
from .store import AlertRow, LDRow, Lease, MetadataStore, PDRow, PoolRow, StoreImage, VVRow

#: the tables ``counts`` reports (every table that holds the node's objects)
TABLES = ("pds", "pools", "lds", "ld_chunklets", "vvs", "vv_map", "alerts")

Statement = tuple[str, tuple[Any, ...]]

#: The index on vv_map(ld_id, ld_region) that stores before this version kept.  It began as the
#: UNIQUE constraint "one LD region, one map row", which snapshots ended (schema 3: a shared
#: region is mapped by each volume of its tree); since then it enforced nothing and no statement
#: reads the map by LD region (the check and the open read the whole map).  Kept up to date it
#: was most of a snapshot's cost: every copied row one insert at a random place of a second
#: B-tree (bench/README.md, the snapshot section).  Each backend drops it on open when a store
#: still has it (no schema version of its own: an older thinblock reads a store without it).
UNUSED_MAP_INDEX = "vv_map_ld"


class SQLStore(MetadataStore):
    _lease: Lease | None
    _map_cache: np.ndarray | None

    # --- the primitives a backend supplies ---
    @abc.abstractmethod
    def _exec(self, statement: str, args: tuple[Any, ...]) -> None:
        """One statement in one write transaction (fenced by the bound lease)."""

    @abc.abstractmethod
    def _insert(self, statement: str, args: tuple[Any, ...]) -> int:
        """One INSERT in one write transaction; the new row's id."""

    @abc.abstractmethod
    def _exec_all(self, statements: Sequence[Statement]) -> None:
        """Several statements in one write transaction: all or none."""

    @abc.abstractmethod
    def _exec_counted(self, statements: Sequence[Statement]) -> list[int]:
        """Several statements in one write transaction; how many rows each changed."""

    @abc.abstractmethod
    def _insert_and_exec(self, statement: str, args: tuple[Any, ...], then: Sequence[str]) -> int:
        """One INSERT, then each statement of ``then`` with the new row's id as its only
        parameter (every ``?`` of it), in one write transaction; the new id."""

    @abc.abstractmethod
    def _query_all(self, queries: Sequence[Statement]) -> list[list[tuple[Any, ...]]]:
        """Several queries in one read transaction (one consistent view); their rows."""

    def _query(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._query_all([(statement, args)])[0]

    # --- meta and counters ---
    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key=?", (key,))
        return None if not rows else str(rows[0][0])

    def load_meta(self) -> dict[str, str]:
        return {
            str(k): str(v)
            for k, v in self._query("SELECT key, value FROM meta WHERE key != 'schema_version' ORDER BY key")
        }

    def set_meta(self, key: str, value: str) -> None:
        self._exec(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    def counts(self) -> dict[str, int]:
        # The table names are this module's constants, never input.
        results = self._query_all([(f"SELECT COUNT(*) FROM {table}", ()) for table in TABLES])
        return {table: int(rows[0][0]) for table, rows in zip(TABLES, results, strict=True)}

    def is_empty(self) -> bool:
        return not any(self.counts().values())

    def region_counters(self) -> tuple[dict[int, int], dict[int, int]]:
        vvs, lds = self._query_all(
            [("SELECT id, regions FROM vvs", ()), ("SELECT id, regions_used FROM lds", ())]
        )
        return {int(k): int(n) for k, n in vvs}, {int(k): int(n) for k, n in lds}

    def map_checks(self) -> dict[int, int]:
        return {int(k): int(c) for k, c in self._query("SELECT id, map_check FROM vvs")}

    # --- PDs ---
    def add_pd(self, path: str, size: int, chunklet_size: int) -> int:
        return self._insert(
            "INSERT INTO pds(path, size, chunklet_size, health) VALUES(?, ?, ?, 'normal')",
            (path, size, chunklet_size),
        )

    def set_pd_health(self, pd_id: int, health: str) -> None:
        self._exec("UPDATE pds SET health=? WHERE id=?", (health, pd_id))

    def remove_pd(self, pd_id: int) -> None:
        self._exec("DELETE FROM pds WHERE id=?", (pd_id,))

    def load_pds(self) -> list[PDRow]:
        return [
            PDRow(*r)
            for r in self._query("SELECT id, path, size, chunklet_size, health FROM pds ORDER BY id")
        ]

    # --- pools ---
    def add_pool(self, row: PoolRow) -> int:
        return self._insert(
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

    def update_pool(self, row: PoolRow) -> None:
        self._exec(
            "UPDATE pools SET growth_increment=?, growth_warning=?, growth_limit=? WHERE id=?",
            (row.growth_increment, row.growth_warning, row.growth_limit, row.id),
        )

    def delete_pool(self, pool_id: int) -> None:
        self._exec("DELETE FROM pools WHERE id=?", (pool_id,))

    def load_pools(self) -> list[PoolRow]:
        return [
            PoolRow(*r)
            for r in self._query(
                "SELECT id, name, raid, set_size, step, region_size, growth_increment, growth_warning,"
                " growth_limit FROM pools ORDER BY id"
            )
        ]

    # --- LDs (add_ld is the backend's: how it learns the new id inside the transaction differs) ---
    def replace_chunklet(self, ld_id: int, row: int, column: int, pd_id: int, index: int) -> None:
        self._exec(
            "UPDATE ld_chunklets SET pd_id=?, chunklet=? WHERE ld_id=? AND row=? AND col=?",
            (pd_id, index, ld_id, row, column),
        )

    def delete_ld(self, ld_id: int) -> None:
        self._exec_all(
            [("DELETE FROM ld_chunklets WHERE ld_id=?", (ld_id,)), ("DELETE FROM lds WHERE id=?", (ld_id,))]
        )

    def load_lds(self) -> list[LDRow]:
        ld_rows, chunklet_rows = self._query_all(
            [
                ("SELECT id, pool_id, raid, set_size, step, region_size, regions FROM lds ORDER BY id", ()),
                ("SELECT ld_id, row, col, pd_id, chunklet FROM ld_chunklets", ()),
            ]
        )
        lds = {int(r[0]): LDRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], {}) for r in ld_rows}
        for ld_id, row, col, pd_id, chunklet in chunklet_rows:
            if ld_id in lds:
                lds[ld_id].chunklets[(row, col)] = (pd_id, chunklet)
        return list(lds.values())

    # --- VVs ---
    def add_vv(self, row: VVRow) -> int:
        return self._insert(*_vv_insert(row))

    def add_vv_sharing(self, row: VVRow, source_id: int, ld_counts: Mapping[int, int] | None = None) -> int:
        epoch = None if self._lease is None else self._lease.epoch
        # source_id, epoch and the counts are ints of ours, never input: written into the
        # statements, so that each follow-up statement takes the new id as its one parameter.
        assert isinstance(source_id, int) and (epoch is None or isinstance(epoch, int))
        epoch_sql = "NULL" if epoch is None else str(epoch)
        copy_rows = (
            "INSERT INTO vv_map(vv_id, vv_region, ld_id, ld_region, epoch)"
            f" SELECT ?, vv_region, ld_id, ld_region, {epoch_sql} FROM vv_map WHERE vv_id={source_id}"
        )
        # The copy's map check is its source's (metadata/mapcheck.py: the VV id is not in it).
        same_check = (
            f"UPDATE vvs SET map_check = (SELECT s.map_check FROM vvs AS s WHERE s.id={source_id}) WHERE id=?"
        )
        if ld_counts is None:
            counters = [
                "UPDATE vvs SET regions = (SELECT COUNT(*) FROM vv_map WHERE vv_id=vvs.id) WHERE id=?",
                "UPDATE lds SET regions_used = regions_used + d.n FROM (SELECT ld_id, COUNT(*) AS n"
                " FROM vv_map WHERE vv_id=? GROUP BY ld_id) AS d WHERE lds.id = d.ld_id",
            ]
        else:
            # The caller's counts of the rows copied (the engine's map is the store's: every
            # change to it was queued before this call, and the writer keeps the order): two
            # scans of the new rows fewer.  The check holds the counters to the rows
            # (metadata/check.py: regions == map rows per VV, regions_used == map rows per LD).
            counts = {int(ld): int(n) for ld, n in ld_counts.items() if n}
            assert all(n > 0 for n in counts.values()), counts
            counters = [f"UPDATE vvs SET regions = {sum(counts.values())} WHERE id=?"]
            if counts:
                cases = " ".join(f"WHEN {ld} THEN {n}" for ld, n in sorted(counts.items()))
                ids = ", ".join(str(ld) for ld in sorted(counts))
                counters.append(
                    f"UPDATE lds SET regions_used = regions_used + CASE id {cases} END WHERE id IN ({ids})"
                )
        return self._insert_and_exec(*_vv_insert(row), [copy_rows, *counters, same_check])

    def replace_map(self, vv_id: int, source_id: int) -> None:
        epoch = None if self._lease is None else self._lease.epoch
        per_ld = "FROM (SELECT ld_id, COUNT(*) AS n FROM vv_map WHERE vv_id=? GROUP BY ld_id) AS d WHERE lds.id = d.ld_id"
        self._exec_all(
            [
                (f"UPDATE lds SET regions_used = regions_used - d.n {per_ld}", (vv_id,)),
                ("DELETE FROM vv_map WHERE vv_id=?", (vv_id,)),
                (
                    # The epoch is an int of ours (or NULL), written in: a NULL parameter in a
                    # select list has no type for PostgreSQL.
                    "INSERT INTO vv_map(vv_id, vv_region, ld_id, ld_region, epoch)"
                    f" SELECT ?, vv_region, ld_id, ld_region, {'NULL' if epoch is None else int(epoch)}"
                    " FROM vv_map WHERE vv_id=?",
                    (vv_id, source_id),
                ),
                (f"UPDATE lds SET regions_used = regions_used + d.n {per_ld}", (vv_id,)),
                (
                    "UPDATE vvs SET regions = (SELECT COUNT(*) FROM vv_map WHERE vv_id=vvs.id) WHERE id=?",
                    (vv_id,),
                ),
                # The same rows as the snapshot's under another VV id: the same map check.
                (
                    "UPDATE vvs SET map_check = (SELECT s.map_check FROM vvs AS s WHERE s.id=?) WHERE id=?",
                    (source_id, vv_id),
                ),
            ]
        )
        self._map_cache = None

    def reserve_region(self, reservation: tuple[int, int, int, int]) -> None:
        self._exec(
            "INSERT INTO cow_reservations(vv_id, vv_region, ld_id, ld_region) VALUES(?, ?, ?, ?)", reservation
        )

    def switch_region(self, vv_id: int, vv_region: int, old: tuple[int, int], new: tuple[int, int]) -> bool:
        epoch = None if self._lease is None else self._lease.epoch
        moved = "EXISTS (SELECT 1 FROM vv_map WHERE vv_id=? AND vv_region=? AND ld_id=? AND ld_region=?)"
        here = (vv_id, vv_region, *new)
        moved_by = mapcheck.term(vv_region, *new) - mapcheck.term(vv_region, *old)
        counts = self._exec_counted(
            [
                (
                    "UPDATE vv_map SET ld_id=?, ld_region=?, epoch=? WHERE vv_id=? AND vv_region=?"
                    " AND ld_id=? AND ld_region=?",
                    (*new, epoch, vv_id, vv_region, *old),
                ),
                (f"UPDATE lds SET regions_used = regions_used + 1 WHERE id=? AND {moved}", (new[0], *here)),
                (f"UPDATE lds SET regions_used = regions_used - 1 WHERE id=? AND {moved}", (old[0], *here)),
                (
                    f"UPDATE vvs SET map_check = map_check + ? WHERE id=? AND {moved}",
                    (moved_by, vv_id, *here),
                ),
                ("DELETE FROM cow_reservations WHERE ld_id=? AND ld_region=?", new),
            ]
        )
        return counts[0] == 1

    def load_reservations(self) -> list[tuple[int, int, int, int]]:
        return [
            (int(a), int(b), int(c), int(d))
            for a, b, c, d in self._query(
                "SELECT vv_id, vv_region, ld_id, ld_region FROM cow_reservations ORDER BY ld_id, ld_region"
            )
        ]

    def drop_reservations(self, reservations: list[tuple[int, int, int, int]]) -> None:
        self._exec_all(
            [
                ("DELETE FROM cow_reservations WHERE ld_id=? AND ld_region=?", (r[2], r[3]))
                for r in reservations
            ]
        )

    def rename_vv(self, vv_id: int, name: str) -> None:
        self._exec("UPDATE vvs SET name=? WHERE id=?", (name, vv_id))

    def update_vv(self, row: VVRow) -> None:
        self._exec(
            "UPDATE vvs SET size=?, alloc_warning_bytes=?, alloc_warning_pct=?, alloc_limit_bytes=?,"
            " alloc_limit_pct=?, cache_mode=?, snap_warning_bytes=?, snap_warning_pct=?, snap_limit_bytes=?,"
            " snap_limit_pct=?, snap_limit_policy=? WHERE id=?",
            (
                row.size,
                row.alloc_warning_bytes,
                row.alloc_warning_pct,
                row.alloc_limit_bytes,
                row.alloc_limit_pct,
                row.cache_mode,
                *_snap_values(row),
                row.id,
            ),
        )

    def set_vv_owner(self, vv_id: int, node: str | None) -> None:
        self._exec("UPDATE vvs SET owner=? WHERE id=?", (node, vv_id))

    def delete_vv(self, vv_id: int) -> None:
        # Its snapshots and clones stay; they name no parent from now on (their tree, family_id,
        # is kept: they may still share regions with each other).
        self._exec_all(
            [
                ("UPDATE vvs SET parent_id=NULL WHERE parent_id=?", (vv_id,)),
                ("DELETE FROM vvs WHERE id=?", (vv_id,)),
            ]
        )

    def load_vvs(self) -> list[VVRow]:
        return [
            VVRow(*r)
            for r in self._query(
                "SELECT id, name, pool_id, size, alloc_warning_bytes, alloc_warning_pct, alloc_limit_bytes,"
                " alloc_limit_pct, cache_mode, created, owner, kind, parent_id, family_id, snap_warning_bytes,"
                " snap_warning_pct, snap_limit_bytes, snap_limit_pct, snap_limit_policy FROM vvs ORDER BY id"
            )
        ]

    # --- the map (assign_many, unassign and map_array are the backend's) ---
    def forget_map_array(self) -> None:
        self._map_cache = None

    def map_rows_by_epoch(self) -> dict[int | None, int]:
        return {
            None if e is None else int(e): int(n)
            for e, n in self._query("SELECT epoch, COUNT(*) FROM vv_map GROUP BY epoch")
        }

    def _map_from_text(self, text: str | bytes, rows: int, mismatch: str) -> np.ndarray:
        """The (N, 4) int64 map array from the map's numbers as text, separated by white space
        (numpy parses it in C: no Python object per row); MetadataCorrupt saying ``mismatch``
        when the text does not hold exactly ``rows`` rows of integers."""
        if not text:
            flat = np.zeros(0, dtype=np.int64)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # raised when it stops early
                flat = np.fromstring(text, dtype=np.int64, sep=" ")
        if flat.size != 4 * rows:
            raise MetadataCorrupt(mismatch)
        return flat.reshape(-1, 4)

    # --- alerts ---
    def add_alert(
        self,
        time: float,
        severity: str,
        kind: str,
        obj: str,
        message: str,
        state: str,
        alert_id: int | None = None,
    ) -> int:
        if alert_id is None:
            return self._insert(
                "INSERT INTO alerts(time, severity, kind, object, message, state) VALUES(?, ?, ?, ?, ?, ?)",
                (time, severity, kind, obj, message, state),
            )
        self._exec_all(
            [
                (
                    "INSERT INTO alerts(id, time, severity, kind, object, message, state)"
                    " VALUES(?, ?, ?, ?, ?, ?, ?)",
                    (alert_id, time, severity, kind, obj, message, state),
                ),
                *self._explicit_ids_taken("alerts"),
            ]
        )
        return alert_id

    def _explicit_ids_taken(self, table: str) -> list[Statement]:
        """Statements that move ``table``'s id generator past rows inserted with explicit ids
        (SQLite's INTEGER PRIMARY KEY does by itself: its next id is the largest plus one)."""
        return []

    def set_alert_state(self, alert_id: int, state: str) -> None:
        self._exec("UPDATE alerts SET state=? WHERE id=?", (state, alert_id))

    def load_alerts(self) -> list[AlertRow]:
        return [
            AlertRow(*r)
            for r in self._query(
                "SELECT id, time, severity, kind, object, message, state FROM alerts ORDER BY id"
            )
        ]

    # --- the image (write_image is the backend's: one transaction on its connection) ---
    @staticmethod
    def _image_statements(image: StoreImage) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """The INSERTs (``?`` placeholders) and their rows that put an image's tables, map
        excepted, into an empty store with every id kept, in the order the references need."""
        return [
            (
                "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                [(k, v) for k, v in image.meta.items() if k != "schema_version"],
            ),
            (
                "INSERT INTO pds(id, path, size, chunklet_size, health) VALUES(?, ?, ?, ?, ?)",
                [(p.id, p.path, p.size, p.chunklet_size, p.health) for p in image.pds],
            ),
            (
                "INSERT INTO pools(id, name, raid, set_size, step, region_size, growth_increment,"
                " growth_warning, growth_limit) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        p.id,
                        p.name,
                        p.raid,
                        p.set_size,
                        p.step,
                        p.region_size,
                        p.growth_increment,
                        p.growth_warning,
                        p.growth_limit,
                    )
                    for p in image.pools
                ],
            ),
            (
                "INSERT INTO lds(id, pool_id, raid, set_size, step, region_size, regions, regions_used)"
                " VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        ld.id,
                        ld.pool_id,
                        ld.raid,
                        ld.set_size,
                        ld.step,
                        ld.region_size,
                        ld.regions,
                        image.ld_regions_used.get(ld.id, 0),
                    )
                    for ld in image.lds
                ],
            ),
            (
                "INSERT INTO ld_chunklets(ld_id, row, col, pd_id, chunklet) VALUES(?, ?, ?, ?, ?)",
                [(ld.id, r, c, pd, idx) for ld in image.lds for (r, c), (pd, idx) in ld.chunklets.items()],
            ),
            (
                "INSERT INTO vvs(id, name, pool_id, size, alloc_warning_bytes, alloc_warning_pct,"
                " alloc_limit_bytes, alloc_limit_pct, cache_mode, created, owner, regions, kind, parent_id,"
                " family_id, snap_warning_bytes, snap_warning_pct, snap_limit_bytes, snap_limit_pct,"
                " snap_limit_policy, map_check) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        v.id,
                        v.name,
                        v.pool_id,
                        v.size,
                        v.alloc_warning_bytes,
                        v.alloc_warning_pct,
                        v.alloc_limit_bytes,
                        v.alloc_limit_pct,
                        v.cache_mode,
                        v.created,
                        v.owner,
                        image.vv_regions.get(v.id, 0),
                        v.kind,
                        v.parent_id,
                        v.family_id,
                        *_snap_values(v),
                        image.vv_map_checks.get(v.id, 0),
                    )
                    for v in image.vvs
                ],
            ),
            (
                "INSERT INTO alerts(id, time, severity, kind, object, message, state) VALUES(?, ?, ?, ?, ?, ?, ?)",
                [(a.id, a.time, a.severity, a.kind, a.object, a.message, a.state) for a in image.alerts],
            ),
        ]

    @staticmethod
    def _not_empty(counts: dict[str, int], url: str) -> Conflict:
        held = ", ".join(f"{n} {table}" for table, n in counts.items() if n)
        return Conflict(f"metadata store {url} is not empty ({held}): refusing to copy into it")

    # --- leases (the statements are the backend's: each store's own clock decides) ---
    def bind_lease(self, lease: Lease | None) -> None:
        self._lease = lease


def _vv_insert(row: VVRow) -> Statement:
    return (
        "INSERT INTO vvs(name, pool_id, size, alloc_warning_bytes, alloc_warning_pct, alloc_limit_bytes,"
        " alloc_limit_pct, cache_mode, created, owner, kind, parent_id, family_id, snap_warning_bytes,"
        " snap_warning_pct, snap_limit_bytes, snap_limit_pct, snap_limit_policy)"
        " VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            row.owner,
            row.kind,
            row.parent_id,
            row.family_id,
            *_snap_values(row),
        ),
    )


def _snap_values(row: VVRow) -> tuple[int | None, float | None, int | None, float | None, str]:
    """The snapshot space columns of a row (schema 4), in the order every statement names them."""
    return (
        row.snap_warning_bytes,
        row.snap_warning_pct,
        row.snap_limit_bytes,
        row.snap_limit_pct,
        row.snap_limit_policy,
    )
