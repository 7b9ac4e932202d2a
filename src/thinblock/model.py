"""Plain read-only views of engine objects, as the engine API returns them.

The REST API serialises these (pydantic models mirror them), the CLI prints them.
All sizes are bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class PDHealth(enum.StrEnum):
    NORMAL = "normal"
    FAILED = "failed"


class LDHealth(enum.StrEnum):
    NORMAL = "normal"
    DEGRADED = "degraded"  # one failure in a redundant set; still serving
    REBUILDING = "rebuilding"
    FAILED = "failed"  # some regions lost (RAID 0 PD failed, two failures in a RAID 5 set)


@enum.unique
class PoolState(enum.IntEnum):
    """Ordered, as dm-thin's pool modes are: worse states compare greater."""

    HEALTHY = 0
    WARNING = 1  # growth warning crossed
    DEGRADED = 2  # an LD is degraded
    OUT_OF_SPACE = 3  # growth limit reached / no free chunklets, no free region
    FAILED = 4  # an LD has lost data

    def __str__(self) -> str:
        return self.name.lower().replace("_", "-")


class CacheMode(enum.StrEnum):
    WRITEBACK = "writeback"
    WRITETHROUGH = "writethrough"


class SnapshotLimitPolicy(enum.StrEnum):
    """What a write of a volume does when the copy on write it needs would take the volume's
    snapshot space past its limit (3PAR's choice between failing the base write and
    invalidating snapshots)."""

    FAIL = "fail"  # the snapshots stay; the write fails with ENOSPC
    INVALIDATE_OLDEST = "invalidate-oldest"  # the oldest snapshot is deleted; the write goes on


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class AlertState(enum.StrEnum):
    NEW = "new"
    ACKNOWLEDGED = "acknowledged"
    CLEARED = "cleared"


class AlertKind(enum.StrEnum):
    VV_ALLOCATION_WARNING = "vv-allocation-warning"
    VV_ALLOCATION_LIMIT = "vv-allocation-limit"
    POOL_GROWTH_WARNING = "pool-growth-warning"
    POOL_GROWTH_LIMIT = "pool-growth-limit"
    POOL_OUT_OF_CHUNKLETS = "pool-out-of-chunklets"
    POOL_LIMIT_FORECAST = "pool-limit-forecast"
    LD_CREATED = "ld-created"
    LD_RELEASED = "ld-released"
    PD_FAILED = "pd-failed"
    LD_DEGRADED = "ld-degraded"
    LD_FAILED = "ld-failed"
    REBUILD_DONE = "rebuild-done"
    PD_HOST_FULL = "pd-host-full"
    MIRROR_DEGRADED = "mirror-degraded"  # the partner is away: write-back volumes write through
    METADATA_STORE_FULL = "metadata-store-full"
    METADATA_UNAVAILABLE = "metadata-unavailable"
    METADATA_RECONNECTED = "metadata-reconnected"
    LEASE_LOST = "lease-lost"
    # Snapshot space (volume/snapspace.py): the regions only a volume's snapshots hold.
    VV_SNAPSHOT_SPACE_WARNING = "vv-snapshot-space-warning"
    VV_SNAPSHOT_SPACE_LIMIT = "vv-snapshot-space-limit"
    VV_SNAPSHOT_INVALIDATED = "vv-snapshot-invalidated"  # an event: the limit's policy deleted one


@dataclass(frozen=True, slots=True)
class Alert:
    id: int
    time: float  # unix seconds
    severity: Severity
    kind: AlertKind
    object: str  # e.g. "vv:vol0", "pool:default", "pd:3", "ld:7"
    message: str
    state: AlertState


@dataclass(frozen=True, slots=True)
class PDInfo:
    id: int
    path: str
    size: int
    chunklet_size: int
    chunklets: int
    chunklets_used: int
    chunklets_free: int
    health: PDHealth


@dataclass(frozen=True, slots=True)
class ChunkletRef:
    pd_id: int
    index: int  # chunklet number on the PD
    offset: int  # byte offset on the PD
    row: int  # RAID row within the LD
    column: int  # position within the row's set


@dataclass(frozen=True, slots=True)
class LDInfo:
    id: int
    pool: str
    raid: int
    set_size: int
    step: int
    size: int  # usable bytes
    region_size: int
    regions: int
    regions_used: int
    health: LDHealth
    chunklets: list[ChunkletRef] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PoolInfo:
    name: str
    raid: int
    set_size: int
    step: int
    region_size: int
    capacity: int  # usable bytes of all its LDs
    used: int  # bytes of assigned regions
    free: int  # capacity - used
    growth_increment: int
    growth_warning: int | None
    growth_limit: int | None
    lds: int
    volumes: int
    state: PoolState


@dataclass(frozen=True, slots=True)
class VVInfo:
    name: str
    pool: str
    size: int
    region_size: int
    allocated: int  # bytes of assigned regions
    regions_allocated: int
    alloc_warning: int | None  # resolved to bytes
    alloc_limit: int | None
    alloc_warning_spec: str | None  # as given: "80%" or "10 GiB"
    alloc_limit_spec: str | None
    cache_mode: CacheMode
    dirty_bytes: int
    created: float
    # Snapshots and clones (volume/snapshots.py): what it is (volume, snapshot, clone), the
    # volume it was made from (None: a volume, or its parent was deleted), those made from it,
    # and its space: bytes of regions it alone maps, and of regions it shares with others.
    kind: str = "volume"
    parent: str | None = None
    children: tuple[str, ...] = ()
    exclusive: int = 0
    shared: int = 0
    # Snapshot space (volume/snapspace.py): bytes of regions only this volume's snapshots hold
    # (what deleting all of them would free), its warning and limit (bytes, resolved; and as
    # given), and what a write that would pass the limit does.
    snapshot_space: int = 0
    snapshot_warning: int | None = None
    snapshot_limit: int | None = None
    snapshot_warning_spec: str | None = None
    snapshot_limit_spec: str | None = None
    snapshot_limit_policy: str = "fail"


@dataclass(frozen=True, slots=True)
class VVStats:
    """Per-volume I/O counters since the daemon started (for /metrics)."""

    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    trims: int = 0
    zeroes: int = 0
    flushes: int = 0
    errors: int = 0


@dataclass(frozen=True, slots=True)
class RebuildProgress:
    running: bool
    lds_total: int
    lds_done: int
    bytes_total: int
    bytes_done: int
    current_ld: int | None = None


@dataclass(frozen=True, slots=True)
class CheckReport:
    ok: bool
    problems: list[str]
    counts: dict[str, int]
