"""The metadata store interface.

Everything the engine must find again after a restart lives here: PDs, pools, LDs and
their chunklets, VVs, region maps, alerts.  The engine talks only to this interface;
SQLite (``sqlite.py``) is the embedded single-node backend, and a PostgreSQL backend
for paired nodes is an addition behind the same methods, not a rewrite.

Transaction rule: every mutating method is one transaction, committed when it
returns (visible to a new process after ``kill -9``) -- except ``assign``, the one
call on the write path: it records the assignment in an open transaction that
``commit`` ends (the engine commits on every flush and within half a second).
``sync()`` makes every committed transaction durable against power loss; the engine
calls it on flush, after ``commit``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


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


@dataclass(slots=True)
class AlertRow:
    id: int
    time: float
    severity: str
    kind: str
    object: str
    message: str
    state: str


class MetadataStore(abc.ABC):
    #: assignments recorded by ``assign`` and not yet committed
    pending_assignments: int = 0

    # --- life cycle ---
    @abc.abstractmethod
    def check(self) -> list[str]:
        """Problems found (empty when sound).  Never repairs."""

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """How many records of each kind the store holds (``thinblock check`` prints them):
        keys pds, pools, lds, ld_chunklets, vvs, vv_map, alerts."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def sync(self) -> None:
        """Make every committed transaction durable (blocking: call it off the loop)."""

    def change_count(self) -> int:
        """A number that moves whenever a committed transaction changed the store, or -1 when
        the backend cannot tell cheaply.  The engine bumps the store generation (pdheaders.py)
        at a flush only when this moved since the last bump (-1: at every flush)."""
        return -1

    @abc.abstractmethod
    def get_meta(self, key: str) -> str | None: ...

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
    def update_pool(self, row: PoolRow) -> None: ...

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
    def update_vv(self, row: VVRow) -> None: ...

    @abc.abstractmethod
    def delete_vv(self, vv_id: int) -> None:
        """Only once its map is empty."""

    @abc.abstractmethod
    def load_vvs(self) -> list[VVRow]: ...

    @abc.abstractmethod
    def assign(self, vv_id: int, vv_region: int, ld_id: int, ld_region: int) -> None:
        """Record a region assignment (before any data is written into it), in the open
        transaction that ``commit`` ends."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Commit the assignments recorded since the last commit (no-op when none)."""

    @abc.abstractmethod
    def unassign(self, vv_id: int, vv_regions: list[int]) -> None:
        """Return regions to the zero LD (after their LD regions were zeroed)."""

    @abc.abstractmethod
    def map_array(self) -> np.ndarray:
        """Every map row as an (N, 4) int64 array: vv_id, vv_region, ld_id, ld_region.  May be
        kept between calls (the check on open and the engine's load share one read)."""

    @abc.abstractmethod
    def forget_map_array(self) -> None:
        """Drop a kept map array (tens of MiB for millions of regions) once it is loaded."""

    # --- alerts ---
    @abc.abstractmethod
    def add_alert(self, time: float, severity: str, kind: str, obj: str, message: str, state: str) -> int: ...

    @abc.abstractmethod
    def set_alert_state(self, alert_id: int, state: str) -> None: ...

    @abc.abstractmethod
    def load_alerts(self) -> list[AlertRow]: ...
