"""The metadata store contract.

Everything the engine must find again after a restart lives here: PDs, pools, LDs and
their chunklets, VVs, region maps, alerts, leases.  The engine talks only to this
interface; ``sqlite.py`` is the embedded single-node backend (the default, in the data
directory) and ``postgres.py`` the shared one for node pairs.  ``open_store(url)``
(``metadata/__init__.py``) picks one from a URL.  The checks that do not depend on the
backend live above both, in ``check.py``; the contract suite (tests/contract/
test_metadata_store.py) runs every method against every backend.

Transaction rule: every mutating method is one transaction, committed when it returns
(visible to a new process after ``kill -9``) or not at all (it raises and changed
nothing).  There is no open transaction between calls: region assignments are batched by
the caller (``writer.MetadataWriter``) into one ``assign_many``.  ``sync()`` (every flush)
makes every committed transaction durable against a crash of the machine or of the database
server, or raises: SQLite commits with ``synchronous=NORMAL`` and fsyncs its WAL there;
PostgreSQL commits ``assign_many`` and ``unassign`` asynchronously (no WAL flush per group)
and everything else synchronously, and its ``sync()`` is a synchronous commit on the same
session, after re-applying, on a new session, whatever a crash of the server may have lost
(``pgsession.py``).  So an assignment is durable before a flush that covers its data is
acknowledged, on either backend, and not before each write.

Errors: a backend raises ``MetadataStoreFull`` when it has no room for a transaction,
``MetadataUnavailable`` when it cannot be reached, ``LeaseLost`` when a bound lease no
longer holds, ``MetadataCorrupt`` for anything it cannot read.  Constraint violations
(``IntegrityError`` of the driver) are programming errors and pass through.

Leases: ``acquire_lease`` / ``renew_lease`` / ``release_lease`` / ``read_lease`` keep a row
per name with a holder, an epoch that only grows (it goes up when a new holder takes the
lease) and an expiry set by the store's own clock.  After ``bind_lease``, every later write
transaction of the store checks, inside that same transaction, that the lease is still
held with that epoch and unexpired, and raises ``LeaseLost`` otherwise: a paused or cut-off
node writes nothing once another took over (the fencing-token rule).  Map rows record the
epoch they were written under.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..units import Limit


@dataclass(slots=True)
class PDRow:
    id: int
    path: str
    size: int
    chunklet_size: int
    health: str


@dataclass(slots=True)
class PoolRow:
    id: int
    name: str
    raid: int
    set_size: int
    step: int
    region_size: int
    growth_increment: int
    growth_warning: int | None
    growth_limit: int | None


@dataclass(slots=True)
class LDRow:
    id: int
    pool_id: int
    raid: int
    set_size: int
    step: int
    region_size: int
    regions: int
    # (row, column) -> (pd_id, chunklet index)
    chunklets: dict[tuple[int, int], tuple[int, int]]


@dataclass(slots=True)
class VVRow:
    id: int
    name: str
    pool_id: int
    size: int
    alloc_warning_bytes: int | None
    alloc_warning_pct: float | None
    alloc_limit_bytes: int | None
    alloc_limit_pct: float | None
    cache_mode: str
    created: float
    owner: str | None = None  # the node that serves it (node pairs); None: whoever opens the store
    # Snapshots and clones (volume/snapshots.py): what the row is (VVKind), the volume it was
    # made from (None for a volume, or once that one is deleted), and the id of the volume its
    # tree started from (None: its own).  Only volumes of one tree may share LD regions.
    kind: str = "volume"
    parent_id: int | None = None
    family_id: int | None = None
    # Snapshot space warning and limit (bytes or percent of ``size``, as the allocation ones) and
    # the limit's policy (volume/snapspace.py): schema 4.
    snap_warning_bytes: int | None = None
    snap_warning_pct: float | None = None
    snap_limit_bytes: int | None = None
    snap_limit_pct: float | None = None
    snap_limit_policy: str = "fail"

    @property
    def family(self) -> int:
        return self.id if self.family_id is None else self.family_id

    def limit(self, field: str) -> Limit | None:
        """The warning or limit stored as ``FIELD_bytes`` / ``FIELD_pct`` (``alloc_warning``,
        ``alloc_limit``, ``snap_warning``, ``snap_limit``); None when neither is set."""
        nbytes, pct = getattr(self, f"{field}_bytes"), getattr(self, f"{field}_pct")
        return None if nbytes is None and pct is None else Limit(nbytes, pct)


@dataclass(slots=True)
class AlertRow:
    id: int
    time: float
    severity: str
    kind: str
    object: str
    message: str
    state: str


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease as the store last granted it.  ``expires_at`` is in the store's clock (unix
    seconds); only the store compares it with "now"."""

    name: str
    holder: str
    epoch: int
    expires_at: float


#: one region assignment: (vv_id, vv_region, ld_id, ld_region)
Assignment = tuple[int, int, int, int]

#: a region reserved for a copy on write and not yet switched into its map:
#: (vv_id, vv_region, ld_id, ld_region)
Reservation = tuple[int, int, int, int]


@dataclass
class StoreImage:
    """Everything a store holds for a node, ids included (``thinblock metadata copy``): what
    ``load_image`` reads from a stopped node's store and ``write_image`` puts into an empty one.
    Leases are not part of it: they belong to the store a daemon runs on, and the first daemon
    on the target takes its own."""

    meta: dict[str, str]  # every key but schema_version (each store keeps its own)
    pds: list[PDRow]
    pools: list[PoolRow]
    lds: list[LDRow]
    vvs: list[VVRow]
    vv_regions: dict[int, int]  # the redundant counters, as the source holds them
    ld_regions_used: dict[int, int]
    map: np.ndarray  # (N, 4) int64: vv_id, vv_region, ld_id, ld_region
    alerts: list[AlertRow]
    vv_map_checks: dict[int, int]  # each VV's map check (metadata/mapcheck.py), as the source holds it


class MetadataStore(abc.ABC):
    #: how the store is named in messages (a URL without its password)
    url: str = ""
    #: True when each call is a network round trip: the engine's ``MetadataWriter`` then runs
    #: the data path's transactions on its own thread instead of on the event loop
    remote: bool = False

    # --- life cycle ---
    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def sync(self) -> None:
        """Make every committed transaction durable (blocking: call it off the loop); the
        store's error (``MetadataUnavailable``...) when it cannot, and then a flush waiting
        for it must fail."""

    @abc.abstractmethod
    def backend_problems(self) -> list[str]:
        """What only this backend can check (SQLite's integrity_check, values of the wrong type);
        ``check.check_store`` runs it first and the backend-independent rules after it."""

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """How many records of each kind the store holds (``thinblock check`` prints them):
        keys pds, pools, lds, ld_chunklets, vvs, vv_map, alerts."""

    @abc.abstractmethod
    def region_counters(self) -> tuple[dict[int, int], dict[int, int]]:
        """The redundant counters kept with the map, for the check: (regions per VV id,
        regions used per LD id), as the store holds them."""

    @abc.abstractmethod
    def map_checks(self) -> dict[int, int]:
        """Each VV id's map check (metadata/mapcheck.py: a sum over its map rows kept with
        them), as the store holds it, for the check."""

    @abc.abstractmethod
    def is_empty(self) -> bool:
        """No PD, pool, LD, VV, map row or alert (``metadata copy`` refuses any other target)."""

    def change_count(self) -> int:
        """A number that moves whenever a committed transaction changed the store, or -1 when
        the backend cannot tell cheaply.  The engine bumps the store generation (pdheaders.py)
        at a flush only when this moved since the last bump (-1: at every flush)."""
        return -1

    @abc.abstractmethod
    def get_meta(self, key: str) -> str | None: ...

    @abc.abstractmethod
    def load_meta(self) -> dict[str, str]:
        """Every ``meta`` key and value but ``schema_version`` (the data directory's id, the
        store generation, the clean mark, the pair's marks)."""

    def load_image(self) -> StoreImage:
        """The whole store, ids included.  Not one transaction: call it on a store nobody
        changes (``metadata copy`` holds the data directory's lock, so no daemon runs on it)."""
        vv_regions, ld_regions_used = self.region_counters()
        return StoreImage(
            meta=self.load_meta(),
            pds=self.load_pds(),
            pools=self.load_pools(),
            lds=self.load_lds(),
            vvs=self.load_vvs(),
            vv_regions=vv_regions,
            ld_regions_used=ld_regions_used,
            map=self.map_array().copy(),
            alerts=self.load_alerts(),
            vv_map_checks=self.map_checks(),
        )

    @abc.abstractmethod
    def write_image(self, image: StoreImage) -> None:
        """Put ``image`` into this store, every id kept, in one transaction; later inserts get ids
        above the image's.  Conflict (and nothing written) unless the store is empty.  Map rows
        are written with no epoch: no lease of this store wrote them."""

    @abc.abstractmethod
    def set_meta(self, key: str, value: str) -> None: ...

    # --- PDs ---
    @abc.abstractmethod
    def add_pd(self, path: str, size: int, chunklet_size: int) -> int: ...

    @abc.abstractmethod
    def set_pd_health(self, pd_id: int, health: str) -> None: ...

    @abc.abstractmethod
    def remove_pd(self, pd_id: int) -> None: ...

    @abc.abstractmethod
    def load_pds(self) -> list[PDRow]: ...

    # --- pools ---
    @abc.abstractmethod
    def add_pool(self, row: PoolRow) -> int:
        """Insert (row.id ignored); returns the new id."""

    @abc.abstractmethod
    def update_pool(self, row: PoolRow) -> None:
        """Growth increment, warning and limit (the policy never changes)."""

    @abc.abstractmethod
    def delete_pool(self, pool_id: int) -> None: ...

    @abc.abstractmethod
    def load_pools(self) -> list[PoolRow]: ...

    # --- LDs ---
    @abc.abstractmethod
    def add_ld(self, row: LDRow) -> int:
        """Insert the LD and its chunklets in one transaction; returns the new id."""

    @abc.abstractmethod
    def replace_chunklet(self, ld_id: int, row: int, column: int, pd_id: int, index: int) -> None:
        """After a rebuild: the member at (row, column) now lives on (pd_id, index)."""

    @abc.abstractmethod
    def delete_ld(self, ld_id: int) -> None:
        """Only an LD with no assigned region; its chunklets become free."""

    @abc.abstractmethod
    def load_lds(self) -> list[LDRow]: ...

    # --- VVs and region maps ---
    @abc.abstractmethod
    def add_vv(self, row: VVRow) -> int: ...

    @abc.abstractmethod
    def update_vv(self, row: VVRow) -> None:
        """Size, limits and cache mode."""

    @abc.abstractmethod
    def rename_vv(self, vv_id: int, name: str) -> None:
        """A new name (the caller checked it is free and valid); nothing else changes."""

    @abc.abstractmethod
    def set_vv_owner(self, vv_id: int, node: str | None) -> None:
        """Which node serves the VV (node pairs); None: no owner recorded."""

    @abc.abstractmethod
    def delete_vv(self, vv_id: int) -> None:
        """Only once its map is empty."""

    @abc.abstractmethod
    def load_vvs(self) -> list[VVRow]: ...

    @abc.abstractmethod
    def assign_many(self, rows: list[Assignment]) -> None:
        """Record region assignments (before any data is written into them) in one transaction,
        with the VV and LD counters that count them; each row records the bound lease's epoch."""

    @abc.abstractmethod
    def unassign(self, vv_id: int, vv_regions: list[int]) -> int:
        """Return regions to the zero LD in one transaction; returns how many rows went."""

    @abc.abstractmethod
    def add_vv_sharing(self, row: VVRow, source_id: int, ld_counts: Mapping[int, int] | None = None) -> int:
        """Insert a VV (a snapshot or clone) whose map is a copy of VV ``source_id``'s, in one
        transaction, with the counters (each copied row is one more reference to its LD region);
        returns the new id.  ``ld_counts``: how many of the source's map rows each LD holds, when
        the caller knows (the engine: its map, which is the store's); the store counts them
        itself when None."""

    @abc.abstractmethod
    def replace_map(self, vv_id: int, source_id: int) -> None:
        """Revert: VV ``vv_id``'s map becomes a copy of VV ``source_id``'s (a snapshot), in one
        transaction, with the counters."""

    @abc.abstractmethod
    def reserve_region(self, reservation: Reservation) -> None:
        """Copy on write, step 1: record that LD region (ld_id, ld_region) is being filled as the
        new home of (vv_id, vv_region), before any data is written into it."""

    @abc.abstractmethod
    def switch_region(self, vv_id: int, vv_region: int, old: tuple[int, int], new: tuple[int, int]) -> bool:
        """Copy on write, last step, one transaction: the map row of (vv_id, vv_region) moves from
        LD region ``old`` to ``new`` (the counters follow) and ``new``'s reservation goes.  False,
        with only the reservation gone, when the row no longer points at ``old`` (trimmed
        meanwhile)."""

    @abc.abstractmethod
    def load_reservations(self) -> list[Reservation]:
        """Reservations left by a copy on write that never switched (a crash)."""

    @abc.abstractmethod
    def drop_reservations(self, reservations: list[Reservation]) -> None:
        """Forget reservations (their regions are free again)."""

    @abc.abstractmethod
    def map_array(self) -> np.ndarray:
        """Every map row as an (N, 4) int64 array: vv_id, vv_region, ld_id, ld_region.  May be
        kept between calls (the check on open and the engine's load share one read)."""

    @abc.abstractmethod
    def forget_map_array(self) -> None:
        """Drop a kept map array (tens of MiB for millions of regions) once it is loaded."""

    @abc.abstractmethod
    def map_rows_by_epoch(self) -> dict[int | None, int]:
        """How many map rows each lease epoch wrote (None: written with no lease bound)."""

    # --- alerts ---
    @abc.abstractmethod
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
        """The new alert's id: ``alert_id`` when given (the engine's alert bus numbers its
        alerts itself, so that raising one never waits for the store), else the store's next.
        Either way a later call without an id gets one past every id stored."""

    @abc.abstractmethod
    def set_alert_state(self, alert_id: int, state: str) -> None: ...

    @abc.abstractmethod
    def load_alerts(self) -> list[AlertRow]: ...

    # --- leases ---
    @abc.abstractmethod
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Take the lease if it is free, expired, or already ``holder``'s; a new holder gets
        epoch + 1 (the first one epoch 1), the same holder keeps its epoch.  None when another
        holder has it unexpired.  Expiry is the store's clock plus ``ttl_s``."""

    @abc.abstractmethod
    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease | None:
        """Extend a lease still held (same holder and epoch, unexpired); None otherwise."""

    @abc.abstractmethod
    def release_lease(self, lease: Lease) -> None:
        """Give it up (it expires now) if still held with that epoch; the holder stays recorded,
        so the next holder's epoch is higher."""

    @abc.abstractmethod
    def read_lease(self, name: str) -> Lease | None: ...

    @abc.abstractmethod
    def bind_lease(self, lease: Lease | None) -> None:
        """Every later write transaction checks this lease inside itself (``LeaseLost``);
        None unbinds.  The check reads the lease row (holder, epoch, expiry), so a renewal
        needs no new bind."""
