"""The REST API: JSON over HTTP under ``/api/v1``, an OpenAPI description, ``/metrics``.

A front end of the engine like the NBD server: every endpoint is a coroutine run on the
daemon's one event loop (the engine is called from the loop thread only, as its API requires),
turns JSON into engine calls and engine views (``thinblock.model``) into JSON.

Errors (the issue's rule: "errors as JSON with a message and the right status code"):
``{"error": "pool 'gold' not found"}`` with the status each ``thinblock.errors`` class carries
(400 bad input, 404 unknown, 409 conflict, 507 out of space).  Request validation errors are
400, not FastAPI's 422, and an unexpected exception is a logged 500 that names no internals.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StringConstraints, WithJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine import UNSET, Engine
from ..errors import Conflict, InvalidArgument, NotFound, ThinblockError
from ..history import Forecast, History
from ..limits import overcommit_ratio
from ..model import (
    AlertKind,
    AlertState,
    CacheMode,
    LDHealth,
    PDHealth,
    Severity,
    SnapshotLimitPolicy,
)
from ..model import (
    RebuildProgress as RebuildProgressInfo,
)
from ..nbd.access import AccessStore
from ..units import Limit, parse_size
from . import dashboard
from .auth import NO_PARAMETERS, SAFE_METHODS, ApiGuard, ApiSecurity, token_router
from .metrics import ForecastCollector, build_registry, render_metrics
from .nametypes import NAME_ERROR, PoolName, VolumeName

log = logging.getLogger("thinblock.api")

API_PREFIX = "/api/v1"
OPENAPI_URL = f"{API_PREFIX}/openapi.json"
# Sizes and ids stay within what the metadata store (SQLite INTEGER, 64-bit signed) can hold, so
# an absurd number is a 400 here rather than an overflow deep inside.
MAX_INT = 2**63 - 1

# --- request value types -------------------------------------------------------------------------

_SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([KMGTPEkmgtpe]([iI][bB])?|[bB])?\s*$"
_LIMIT_PATTERN = r"^\s*(\d+(\.\d+)?\s*%|\d+(\.\d+)?\s*([KMGTPEkmgtpe]([iI][bB])?|[bB])?)\s*$"


def _whole(value: Any) -> Any:
    """JSON has one number type: 4096.0 is the integer 4096 (as JSON Schema counts it)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _size_to_bytes(value: Any) -> int:
    """Bytes as an integer, or a string with units; within what the store can hold."""
    value = _whole(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected a size: bytes as an integer, or a string like '16MiB'")
    n = parse_size(value)  # InvalidArgument is a ValueError: pydantic turns it into a 400
    if n > MAX_INT:
        raise ValueError(f"size out of range: {value}")
    return n


def _limit(value: Any) -> Limit:
    """Bytes, a size string, or a percentage of the volume's size."""
    value = _whole(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected a limit: bytes, a size like '10GiB', or a percentage like '80%'")
    limit = Limit.parse(value)
    if limit.bytes is not None and limit.bytes > MAX_INT:
        raise ValueError(f"limit out of range: {value}")
    return limit


# A size: bytes as an integer, or a string with units as administrators type them ("16MiB").
Size = Annotated[
    int,
    PlainValidator(_size_to_bytes),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": MAX_INT},
                {"type": "string", "pattern": _SIZE_PATTERN},
            ],
            "description": "bytes, or a string with units: 512K, 16MiB, 1G, 2TiB",
        }
    ),
]
# A VV allocation warning or limit: bytes, a size string, or a percentage of the virtual size.
LimitSpec = Annotated[
    Limit,
    PlainValidator(_limit),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_INT},
                {"type": "string", "pattern": _LIMIT_PATTERN},
            ],
            "description": "bytes, a size with units (10GiB), or a percentage of the volume size (80%)",
        }
    ),
]
IdPath = Annotated[int, PathParam(ge=0, le=MAX_INT, examples=[1])]
PoolPath = Annotated[PoolName, PathParam(examples=["default"])]
VolumePath = Annotated[VolumeName, PathParam(examples=["vol0"])]


class _Request(BaseModel):
    # Unknown fields are refused: a typo ("growth_limt") must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


# --- response models (mirror thinblock.model) ----------------------------------------------------


class ErrorBody(BaseModel):
    error: str


class PDOut(BaseModel):
    id: int
    path: str
    size: int
    chunklet_size: int
    chunklets: int
    chunklets_used: int
    chunklets_free: int
    health: PDHealth


class PDReplace(_Request):
    new: int = Field(ge=0, le=MAX_INT, description="the PD (added with POST /pds) that takes its place")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"new": 5}]})


class PDCreate(_Request):
    path: Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")] = Field(
        description="a file (created sparse when missing) or a block device; relative to the data directory"
    )
    size: Size | None = Field(default=None, description="required when the file does not exist")
    chunklet_size: Size | None = Field(default=None, description="default: the daemon's engine.chunklet_size")
    force: bool = Field(
        default=False, description="take a block device that holds a partition table or file system"
    )
    confirm: Annotated[str, StringConstraints(max_length=4096)] | None = Field(
        default=None, description="with force: the device path, typed again"
    )

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"path": "/srv/thinblock/pd4.img", "size": "64GiB"}]}
    )


class ChunkletOut(BaseModel):
    pd_id: int
    index: int
    offset: int
    row: int
    column: int


class LDOut(BaseModel):
    id: int
    pool: str
    raid: int
    set_size: int
    step: int
    size: int
    region_size: int
    regions: int
    regions_used: int
    regions_free: int
    health: LDHealth
    chunklets: list[ChunkletOut]


class ForecastOut(BaseModel):
    """From the daemon's history: the allocation rate over the last hour (or what history it
    has), and the estimated seconds until the warning and the limit are reached at that rate."""

    rate: float | None = Field(description="bytes per second; null before there is a history")
    window: float = Field(description="seconds the rate was measured over")
    to_warning: float | None = Field(description="seconds; 0 when reached, null when not growing or none set")
    to_limit: float | None = Field(description="seconds; 0 when reached, null when not growing or none set")


class PoolOut(BaseModel):
    name: str
    raid: int
    set_size: int
    step: int
    region_size: int
    capacity: int
    used: int
    free: int
    growth_increment: int
    growth_warning: int | None
    growth_limit: int | None
    lds: int
    volumes: int
    state: str
    virtual: int = Field(description="sum of its volumes' virtual sizes")
    overcommit: float | None = Field(
        description="virtual over the most the pool can hold (its growth limit, else its capacity); "
        "null when both are 0"
    )
    forecast: ForecastOut = Field(description="toward the growth warning and the growth limit")


class PoolCreate(_Request):
    name: PoolName
    raid: Literal[0, 1, 5]
    set_size: Annotated[int, Field(ge=1, le=64)] | None = None
    step: Size | None = None
    region_size: Size | None = None
    growth_increment: Size | None = None
    growth_warning: Size | None = None
    growth_limit: Size | None = None

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"name": "gold", "raid": 5, "set_size": 4, "growth_increment": "1GiB", "growth_limit": "1TiB"}
            ]
        },
    )


class PoolUpdate(_Request):
    """Only the fields given change; ``null`` removes a warning or limit."""

    growth_increment: Size | None = None
    growth_warning: Size | None = None
    growth_limit: Size | None = None

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"growth_warning": "800GiB", "growth_limit": "1TiB"}]}
    )


class CompactOut(BaseModel):
    released_lds: int
    pool: PoolOut


class ClientOut(BaseModel):
    protocol: str = Field(description="NBD or iSCSI")
    peer: str = Field(description="the client's address (host:port), or unix")
    opened: float


class AccessRuleOut(BaseModel):
    volume: str = Field(description="the volume, or * for every volume")
    client: str = Field(description="certificate subject, psk:NAME, address or network, unix, or *")
    mode: Literal["ro", "rw", "deny"]
    source: Literal["config", "api"] = Field(
        default="config", description="the configuration file (fixed), or made through the API"
    )
    id: int | None = Field(default=None, description="API rules: what DELETE .../access/{id} takes")


class AccessRuleIn(_Request):
    """An access rule for one client on this volume; it replaces the API rule the client had."""

    client: str = Field(
        min_length=1,
        max_length=1024,
        description="certificate subject (CN=...), psk:NAME, address or network, unix, or *",
    )
    mode: Literal["ro", "rw", "deny"] = "rw"

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"client": "10.1.0.0/16", "mode": "ro"}]}
    )


class VolumeAccessOut(BaseModel):
    volume: str
    restricted: bool = Field(description="false: no rule names it, every NBD client may open it read-write")
    rules: list[AccessRuleOut]


class VolumeOut(BaseModel):
    name: str
    pool: str
    size: int
    region_size: int
    allocated: int
    regions_allocated: int
    alloc_warning: int | None
    alloc_limit: int | None
    alloc_warning_spec: str | None
    alloc_limit_spec: str | None
    cache_mode: CacheMode
    dirty_bytes: int
    created: float
    kind: str = Field(description="volume, snapshot (read-only) or clone")
    parent: str | None = Field(description="the volume it was made from (none once that is deleted)")
    children: list[str] = Field(description="snapshots and clones made from it")
    exclusive: int = Field(description="bytes of regions only it maps")
    shared: int = Field(description="bytes of regions it shares with its snapshots, clones or parent")
    snapshot_space: int = Field(
        description="bytes of regions only its snapshots hold: what deleting all of them would free"
    )
    snapshot_warning: int | None = Field(description="snapshot space warning, in bytes (when set)")
    snapshot_limit: int | None = Field(description="snapshot space limit, in bytes (when set)")
    snapshot_warning_spec: str | None
    snapshot_limit_spec: str | None
    snapshot_limit_policy: SnapshotLimitPolicy = Field(
        description="at the limit, a write needing a copy on write: fail (ENOSPC) or invalidate-oldest"
    )
    export_uri: str | None = Field(description="where NBD clients (qemu-img, nbdinfo, nbdcopy) reach it")
    clients: list[ClientOut] = Field(default=[], description="connected clients doing I/O on it")
    forecast: ForecastOut = Field(description="toward the allocation warning and limit")
    access: VolumeAccessOut | None = Field(default=None, description="which NBD clients may open it, and how")


class VolumeCreate(_Request):
    name: VolumeName
    pool: PoolName
    size: Size
    alloc_warning: LimitSpec | None = None
    alloc_limit: LimitSpec | None = None
    cache_mode: CacheMode | None = None
    node: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = Field(
        default=None,
        description="the node of a pair to create it on (default: the one with fewer volumes)",
    )
    snapshot_warning: LimitSpec | None = None
    snapshot_limit: LimitSpec | None = None
    snapshot_limit_policy: SnapshotLimitPolicy | None = None

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "vol1",
                    "pool": "default",
                    "size": "100GiB",
                    "alloc_warning": "80%",
                    "alloc_limit": "90%",
                }
            ]
        },
    )


class VolumeUpdate(_Request):
    """Only the fields given change; ``null`` removes a warning or limit."""

    alloc_warning: LimitSpec | None = None
    alloc_limit: LimitSpec | None = None
    cache_mode: CacheMode | None = None
    snapshot_warning: LimitSpec | None = None
    snapshot_limit: LimitSpec | None = None
    snapshot_limit_policy: SnapshotLimitPolicy | None = None

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"alloc_limit": None, "cache_mode": "writeback"}]}
    )


class VolumeRename(_Request):
    name: VolumeName = Field(description="the new name")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "db1-old"}]})


class VolumeGrow(_Request):
    size: Size = Field(description="the new virtual size (grow only)")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"size": "200GiB"}]})


class VolumeRevert(_Request):
    snapshot: VolumeName = Field(description="the snapshot (of the volume's tree) it becomes")
    force: bool = Field(default=False, description="revert even with clients connected")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"snapshot": "db-monday"}]})


class DiffExtent(BaseModel):
    offset: int
    length: int


class VolumeDiffOut(BaseModel):
    base: str = Field(description="the older image (a snapshot)")
    target: str = Field(description="the newer one (a snapshot, or the volume)")
    region_size: int
    bytes: int = Field(description="how much an incremental backup copies")
    extents: list[DiffExtent] = Field(description="byte ranges that may differ, whole regions, merged")


class VolumeCopy(_Request):
    name: VolumeName = Field(description="the new snapshot's or clone's name")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "db-monday"}]})


class VolumeStatsOut(BaseModel):
    reads: int
    writes: int
    read_bytes: int
    write_bytes: int
    trims: int
    zeroes: int
    flushes: int
    errors: int


class AlertOut(BaseModel):
    id: int
    time: float
    severity: Severity
    kind: AlertKind
    object: str
    message: str
    state: AlertState


class RebuildOut(BaseModel):
    running: bool
    lds_total: int
    lds_done: int
    bytes_total: int
    bytes_done: int
    current_ld: int | None
    error: str | None = Field(default=None, description="why the last rebuild stopped, if it failed")


class NBDOut(BaseModel):
    uri: str | None = Field(description="nbd://HOST:PORT, or null when TCP is off")
    unix_socket: str | None
    default_export: str | None
    tls: str = Field(default="off", description="NBD TLS mode: off, allowed or required")
    exposed_without_tls: bool = Field(
        default=False,
        description="NBD listens beyond loopback and does not require TLS: anyone who reaches it",
    )


class ISCSISessionOut(BaseModel):
    """One logged-in iSCSI session (with all of its connections: MC/S)."""

    initiator: str = Field(description="the initiator's iSCSI name")
    initiator_alias: str
    address: str = Field(description="HOST:PORT of the session's first connection")
    addresses: list[str] = Field(description="HOST:PORT of every connection of the session")
    connections: int = Field(description="TCP connections of the session (MaxConnections allows several)")
    session_type: str = Field(description="normal or discovery")
    target: str | None
    vv: str | None = Field(description="the volume behind the target (LUN 0)")
    luns: list[int]
    tsih: int
    isid: str
    header_digest: bool
    data_digest: bool
    since: float = Field(description="login time, unix seconds")
    commands: int = Field(description="SCSI commands received")


class ISCSIOut(BaseModel):
    portal: str | None = Field(description="HOST:PORT of the iSCSI target, or null when it is off")
    sessions: list[ISCSISessionOut]


class NodeOut(BaseModel):
    """A node of the pair as this node sees it (``GET /nodes``)."""

    node: str
    role: str = Field(description="single (no partner), or pair")
    partner: str | None = Field(description="the partner's mirror listener, host:port")
    partner_node: str | None = Field(description="the partner's name, once its link said HELLO")
    listen: str | None = Field(description="this node's mirror listener")
    epoch: int = Field(description="epoch of this node's current mirror session")
    mirror: str = Field(
        description="in-sync, syncing, degraded (write-back volumes write through), or single"
    )
    in_flight_bytes: int = Field(description="mirrored bytes not yet acknowledged by the partner")
    last_latency_s: float = Field(description="round trip of the last mirrored write")
    sessions_lost: int
    holding_for: str | None = Field(description="the node whose write copies this node holds")
    held_bytes: int
    held_writes: int
    taken_over: bool = Field(description="this node took its partner's volumes over")
    flush_covered: bool = Field(
        default=False,
        description="FLUSH and FUA of write-back volumes are answered on the two copies now (in sync,"
        " the partner takes over, node.flush_on_two_copies)",
    )
    own_held_bytes: int = Field(
        default=0,
        description="rejoined as partner: bytes of this node's own volumes the partner serving them mirrored here",
    )
    own_held_writes: int = 0
    taken_over_mirror: str | None = Field(
        default=None,
        description="the mirror of the volumes this node took over, to their rejoined old owner: in-sync"
        " (written back again), syncing or degraded (written through); null when it took nothing over",
    )
    lease_epoch: int | None = Field(
        default=None, description="epoch of this node's lease node:NAME in its metadata store"
    )
    volumes: int | None = Field(default=None, description="volumes the node serves (null: unreachable)")
    reachable: bool = Field(default=True, description="false: the partner's API did not answer")


class HealthOut(BaseModel):
    node: str
    state: str = Field(description="serving, or partner-only (rejoined as partner: no volumes served here)")
    mirror: str | None = Field(description="this node's mirror state (null without a partner)")


class FailbackOut(BaseModel):
    volumes: list[str] = Field(description="the volumes handed back to their owner")


class StatusOut(BaseModel):
    node: str
    version: str
    started: float
    uptime: float
    pds: int
    pds_failed: int
    pools: int
    lds: int
    lds_degraded: int
    volumes: int
    capacity: int = Field(description="usable bytes of every pool's LDs")
    used: int = Field(description="bytes of assigned regions")
    virtual: int = Field(description="sum of the volumes' virtual sizes")
    allocated: int = Field(description="sum of the volumes' allocated bytes")
    overcommit: float | None = Field(
        description="virtual over what the pools can hold at most (growth limits, else capacity)"
    )
    forecasts: dict[str, ForecastOut] = Field(description="per pool, toward its growth warning and limit")
    dirty_bytes: int
    open_alerts: int
    rebuild_running: bool
    nbd: NBDOut
    pair: NodeOut | None = Field(default=None, description="this node's side of its pair (null: no partner)")


class HistoryOut(BaseModel):
    interval: float = Field(description="seconds between samples")
    times: list[float]
    pools: dict[str, dict[str, list[int | None]]] = Field(description="per pool: used, capacity")
    volumes: dict[str, dict[str, list[int | None]]] = Field(
        description="per volume: allocated, read_bytes, write_bytes, reads, writes (counters)"
    )


# --- node information the daemon hands in ----------------------------------------------------------


@dataclass
class NodeInfo:
    """What the API reports about the node beside the engine's state (the daemon keeps uptime)."""

    name: str = field(default_factory=socket.gethostname)
    version: str = __version__
    started: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    nbd_uri: str | None = None  # nbd://127.0.0.1:10809
    nbd_unix_socket: str | None = None
    nbd_tls: str = "off"
    nbd_exposed_without_tls: bool = False  # TCP beyond loopback without required TLS
    # the NBD access rules: the configuration's and the API's (thinblock.nbd.access)
    nbd_access: AccessStore = field(default_factory=lambda: AccessStore(None))
    default_export: str | None = None
    iscsi_acl_volumes: tuple[str, ...] = ()  # the volumes [iscsi.acl] names
    data_dir: Path | None = None
    default_chunklet_size: int | None = None
    iscsi_portal: str | None = None  # 127.0.0.1:3260 when the iSCSI target runs
    # the iSCSI target's logged-in sessions (ISCSIServer.sessions), when it runs
    iscsi_sessions: Callable[[], list[dict[str, Any]]] | None = None
    pair_status: Any = None  # () -> node.pair.PairStatus, in a node pair
    moves: Any = None  # api.moves.PairMoves: vv move, vv create --node, the partner's row (node.partner_api)
    # () -> names of the volumes handed back to their rejoined owner (the daemon's failback)
    failback: Callable[[], Awaitable[list[str]]] | None = None

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_monotonic

    def export_uri(self, volume: str) -> str | None:
        quoted = urllib.parse.quote(volume, safe="")
        if self.nbd_uri:
            return f"{self.nbd_uri}/{quoted}"
        if self.nbd_unix_socket:
            return f"nbd+unix:///{quoted}?socket={urllib.parse.quote(self.nbd_unix_socket, safe='/')}"
        return None


class ApiContext:
    """The state of one API instance: engine, node info, the rebuild it started, the history
    (sampled by a task the daemon starts with ``history.start()``)."""

    def __init__(
        self,
        engine: Engine,
        node: NodeInfo,
        extra_metrics: list[Any] | None = None,
        history: History | None = None,
    ) -> None:
        self.engine = engine
        self.node = node
        self.rebuild_task: asyncio.Task[RebuildProgressInfo | None] | None = None
        self.rebuild_error: str | None = None
        self.history = history or History(engine)
        extra = [*(extra_metrics or []), ForecastCollector(self.history)]
        self.registry = build_registry(engine, node, extra=extra)

    def rebuild_running(self) -> bool:
        return self.rebuild_task is not None and not self.rebuild_task.done()

    async def aclose(self) -> None:
        """Stop background work the API started (the daemon calls this before engine.close())."""
        await self.history.aclose()
        task = self.rebuild_task
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


# --- conversions ---------------------------------------------------------------------------------


def _forecast_out(f: Forecast) -> ForecastOut:
    return ForecastOut(**asdict(f))


def _pool_out(info: Any, ctx: ApiContext) -> PoolOut:
    d = asdict(info)
    d["state"] = str(info.state)
    virtual = sum(v.size for v in ctx.engine.list_vvs() if v.pool == info.name)
    ratio = overcommit_ratio(virtual, info.capacity, info.growth_limit)
    forecast = ctx.history.pool_forecast(info.name, info.used, info.growth_warning, info.growth_limit)
    return PoolOut(**d, virtual=virtual, overcommit=ratio, forecast=_forecast_out(forecast))


def _ld_out(info: Any) -> LDOut:
    d = asdict(info)
    d["regions_free"] = info.regions - info.regions_used
    return LDOut(**d)


def _volume_out(info: Any, ctx: ApiContext) -> VolumeOut:
    sessions = ctx.engine.sessions.of(info.name)
    clients = [ClientOut(protocol=s.protocol, peer=s.peer, opened=s.opened) for s in sessions]
    forecast = ctx.history.volume_forecast(info.name, info.allocated, info.alloc_warning, info.alloc_limit)
    return VolumeOut(
        **asdict(info),
        export_uri=ctx.node.export_uri(info.name),
        clients=clients,
        forecast=_forecast_out(forecast),
        access=_access_out(ctx.node.nbd_access, info.name),
    )


def _access_out(store: AccessStore, volume: str) -> VolumeAccessOut:
    rules = [
        AccessRuleOut(
            volume=rule.volume,
            client=rule.client,
            mode=rule.mode,
            source="config" if stored is None else "api",
            id=None if stored is None else stored.id,
        )
        for rule, stored in store.applying_to(volume)
    ]
    # Restricted: some rule allows only certain clients (deny rules alone restrict nobody else).
    return VolumeAccessOut(volume=volume, restricted=any(r.mode != "deny" for r in rules), rules=rules)


def _rebuild_out(ctx: ApiContext) -> RebuildOut:
    progress = ctx.engine.rebuild_status()
    d = asdict(progress)
    # The task covers the moment between "started" and the engine reporting it runs.
    d["running"] = progress.running or ctx.rebuild_running()
    return RebuildOut(**d, error=ctx.rebuild_error)


def _unset_unless_given(model: BaseModel, name: str) -> Any:
    """PATCH semantics: a field absent from the body stays as it is; ``null`` removes it."""
    if name not in model.model_fields_set:
        return UNSET
    return getattr(model, name)


# --- errors --------------------------------------------------------------------------------------


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if errors and all(err.get("type") == NAME_ERROR for err in errors):
        # A bad name is said as the engine says it, whatever field or path carried it.
        return "; ".join(dict.fromkeys(str(err["msg"]) for err in errors))
    parts = []
    for err in errors[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        where = ".".join(loc) or "body"
        msg = str(err.get("msg", "invalid"))
        # pydantic prefixes messages of ValueErrors raised in validators.
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    more = len(exc.errors()) - 3
    return "invalid request: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ThinblockError)
    async def _thinblock_error(request: Request, exc: ThinblockError) -> JSONResponse:
        status = exc.http_status
        if status >= 500:
            log.error(
                "%s %s failed: %s",
                request.method,
                request.url.path,
                exc,
                extra={"event": "api-error", "status": status},
            )
        return _error(status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code)
        return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception(
            "%s %s: unexpected error", request.method, request.url.path, extra={"event": "api-internal-error"}
        )
        return _error(500, f"internal error ({type(exc).__name__}); see the daemon log")


def _config_rules_naming(node: NodeInfo, volumes: tuple[str, ...]) -> str:
    """Which of the configuration's per-volume access rules name one of ``volumes`` ("" if none)."""
    found = []
    if any(rule.volume in volumes for rule in node.nbd_access.fixed):
        found.append("[[nbd.access]] rules")
    if any(volume in volumes for volume in node.iscsi_acl_volumes):
        found.append("[iscsi.acl] entries")
    return " and ".join(found)


# --- the app -------------------------------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "bad input"},
    404: {"model": ErrorBody, "description": "unknown object"},
    409: {"model": ErrorBody, "description": "conflict with the object's state, or a duplicate name"},
    507: {"model": ErrorBody, "description": "out of space"},
}


def create_app(
    engine: Engine,
    node: NodeInfo | None = None,
    *,
    token: str | None = None,
    security: ApiSecurity | None = None,
    extra_metrics: list[Any] | None = None,
    history: History | None = None,
) -> FastAPI:
    """The FastAPI app for ``engine``, behind the gate of ``thinblock.api.auth`` (tokens, roles,
    cross-site refusals, audit), which lets the dashboard page, /docs and their assets through
    (``dashboard.is_public``).  ``security`` says what it enforces; without it, the data
    directory's token store and audit log with ``token`` (if given) as the admin token.
    ``extra_metrics``: more prometheus collectors (the daemon's webhook and NBD latencies).
    ``history``: the allocation and I/O history (the daemon's, with its settings and sampler)."""
    node = node or NodeInfo()
    if security is None:
        security = ApiSecurity.for_data_dir(node.data_dir, config_token=token)
    ctx = ApiContext(engine, node, extra_metrics, history)
    app = FastAPI(
        title="thinblock",
        version=__version__,
        description="Thin-provisioning block storage (3PAR-style zero logical disk): management API.",
        openapi_url=OPENAPI_URL,
        docs_url=None,  # dashboard.install serves /docs from the packaged Swagger UI
        redoc_url=None,
    )
    app.state.ctx = ctx
    _install_error_handlers(app)
    app.include_router(_router(ctx), prefix=API_PREFIX)
    if node.moves is not None:
        from .moves import moves_router

        app.include_router(moves_router(node.moves), prefix=API_PREFIX, responses=_ERRORS)
    app.include_router(token_router(security), prefix=API_PREFIX, responses=_ERRORS)
    dashboard.install(app, openapi_url=OPENAPI_URL)

    @app.get("/metrics", include_in_schema=True, tags=["metrics"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format: per-volume, pool, PD, LD, cache and alert state, read at scrape time."""
        body, content_type = render_metrics(ctx.registry)
        return Response(content=body, media_type=content_type)

    _customise_openapi(app)
    app.add_middleware(
        ApiGuard,
        security=security,
        openapi=app.openapi,
        public=lambda method, path: dashboard.is_public(method, path, OPENAPI_URL),
    )
    return app


def _customise_openapi(app: FastAPI) -> None:
    """Describe what the app really does: 400 (not 422) for invalid requests, 401 and 403 from
    the gate (a token becomes required once one exists), and for state-changing operations the
    JSON body the gate demands (``{}`` for actions without parameters) and its 413/415."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        for path_item in schema.get("paths", {}).values():
            for method, operation in path_item.items():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                responses.setdefault("400", {"description": "bad input", "content": error_ref})
                responses["401"] = {"description": "missing or wrong bearer token", "content": error_ref}
                responses["403"] = {
                    "description": "the token's role does not allow this, or a cross-site request",
                    "content": error_ref,
                }
                if method.upper() in SAFE_METHODS:
                    continue
                if "requestBody" not in operation:
                    operation[NO_PARAMETERS] = True
                responses["413"] = {"description": "request body too large", "content": error_ref}
                responses["415"] = {"description": "not Content-Type: application/json", "content": error_ref}
                operation.setdefault(
                    "requestBody",
                    {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"type": "object", "properties": {}, "additionalProperties": False}
                            }
                        },
                    },
                )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        schemas.setdefault("ErrorBody", ErrorBody.model_json_schema())
        # Declared always, so that Swagger UI shows Authorize.
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}, {}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _router(ctx: ApiContext) -> APIRouter:
    engine = ctx.engine
    node = ctx.node
    router = APIRouter(responses=_ERRORS)

    # --- status -------------------------------------------------------------------------------
    @router.get("/nodes", tags=["status"])
    async def nodes(
        local: Annotated[bool, Query(description="this node's row only (what its partner asks)")] = False,
    ) -> list[NodeOut]:
        """This node and its mirror link: partner, epoch, mirror state and lag, volumes; with
        ``node.partner_api``, the partner's own row after it (``reachable`` false when its API
        does not answer)."""
        if node.pair_status is None:
            return [
                NodeOut(
                    node=node.name, role="single", partner=None, partner_node=None, listen=None, epoch=0,
                    mirror="single", in_flight_bytes=0, last_latency_s=0.0, sessions_lost=0,
                    holding_for=None, held_bytes=0, held_writes=0, taken_over=False,
                    volumes=len(engine.list_vvs()),
                )
            ]  # fmt: skip
        rows = [_pair_out()]
        if not local and node.moves is not None and node.moves.partner is not None:
            row = await node.moves.partner_row()
            if row is not None:
                rows.append(NodeOut(**{**row, "reachable": True}))
            else:
                mine = rows[0]
                rows.append(
                    NodeOut(
                        node=mine.partner_node or "?", role="pair", partner=mine.listen,
                        partner_node=mine.node, listen=mine.partner, epoch=0, mirror="unknown",
                        in_flight_bytes=0, last_latency_s=0.0, sessions_lost=0, holding_for=None,
                        held_bytes=0, held_writes=0, taken_over=False, volumes=None, reachable=False,
                    )
                )  # fmt: skip
        return rows

    @router.get("/health", tags=["status"])
    async def health() -> HealthOut:
        """Whether this node serves its volumes (a node rejoined as partner only answers
        ``partner-only`` on its reduced API, api/partner_only.py), and its mirror state."""
        mirror = node.pair_status().mirror if node.pair_status is not None else None
        return HealthOut(node=node.name, state="serving", mirror=mirror)

    @router.post("/nodes/failback", tags=["status"])
    async def failback() -> FailbackOut:
        """Hand the volumes this node took over back to their owner, which rejoined as partner and
        is in sync: no copy (the pair shares the PDs and the store); their clients reconnect to
        the owner's service address.  409 when this node took nothing over or the owner is not in
        sync."""
        if node.failback is None:
            raise Conflict("this node has no partner")
        return FailbackOut(volumes=await node.failback())

    def _pair_out() -> NodeOut:
        lease = engine.lease.lease.epoch if engine.lease is not None else None
        return NodeOut(
            role="pair", lease_epoch=lease, volumes=len(engine.list_vvs()), **asdict(node.pair_status())
        )

    @router.get("/status", tags=["status"])
    async def status() -> StatusOut:
        """The node at a glance: uptime, counts, capacity, open alerts, where NBD listens."""
        pds = engine.list_pds()
        pools = engine.list_pools()
        lds = engine.list_lds()
        vvs = engine.list_vvs()
        return StatusOut(
            node=node.name,
            version=node.version,
            started=node.started,
            uptime=node.uptime,
            pds=len(pds),
            pds_failed=sum(1 for pd in pds if pd.health == PDHealth.FAILED),
            pools=len(pools),
            lds=len(lds),
            lds_degraded=sum(1 for ld in lds if ld.health != LDHealth.NORMAL),
            volumes=len(vvs),
            capacity=sum(p.capacity for p in pools),
            used=sum(p.used for p in pools),
            virtual=sum(v.size for v in vvs),
            allocated=sum(v.allocated for v in vvs),
            overcommit=overcommit_ratio(
                sum(v.size for v in vvs),
                sum(p.growth_limit if p.growth_limit is not None else p.capacity for p in pools),
                None,
            ),
            forecasts={name: _forecast_out(f) for name, f in ctx.history.pool_forecasts()},
            dirty_bytes=engine.cache_dirty_bytes(),
            open_alerts=len(engine.list_alerts()),
            rebuild_running=_rebuild_out(ctx).running,
            nbd=NBDOut(
                uri=node.nbd_uri,
                unix_socket=node.nbd_unix_socket,
                default_export=node.default_export,
                tls=node.nbd_tls,
                exposed_without_tls=node.nbd_exposed_without_tls,
            ),
            pair=_pair_out() if node.pair_status is not None else None,
        )

    # --- iSCSI -----------------------------------------------------------------------------------
    @router.get("/iscsi/sessions", tags=["status"])
    async def iscsi_sessions() -> ISCSIOut:
        """Logged-in iSCSI sessions: initiator name and address, target, volume and LUNs."""
        sessions = node.iscsi_sessions() if node.iscsi_sessions is not None else []
        return ISCSIOut(portal=node.iscsi_portal, sessions=[ISCSISessionOut(**s) for s in sessions])

    # --- physical disks -----------------------------------------------------------------------
    @router.get("/pds", tags=["pds"])
    async def list_pds() -> list[PDOut]:
        return [PDOut(**asdict(pd)) for pd in engine.list_pds()]

    @router.post("/pds", status_code=201, tags=["pds"])
    async def add_pd(body: PDCreate) -> PDOut:
        """Add a PD: a file (created sparse at ``size`` when it does not exist) or a block device."""
        path = Path(body.path).expanduser()
        if not path.is_absolute() and node.data_dir is not None:
            path = node.data_dir / path
        chunklet = body.chunklet_size or node.default_chunklet_size
        add = engine.add_pd(
            path,
            body.size,
            *([chunklet] if chunklet is not None else []),
            force=body.force,
            confirm=body.confirm,
        )
        pd = await _os_errors_are_bad_input(add, path)
        return PDOut(**asdict(pd))

    @router.get("/pds/{pd_id}", tags=["pds"])
    async def show_pd(pd_id: IdPath) -> PDOut:
        return PDOut(**asdict(engine.get_pd(pd_id)))

    @router.post("/pds/{pd_id}/fail", tags=["pds"])
    async def fail_pd(pd_id: IdPath) -> PDOut:
        """Mark a PD failed (for drills): its LDs go degraded or failed, alerts fire."""
        return PDOut(**asdict(await engine.fail_pd(pd_id)))

    @router.post("/pds/{pd_id}/restore", tags=["pds"])
    async def restore_pd(pd_id: IdPath) -> PDOut:
        """A failed PD that turned out healthy back in service: its LD members are first
        resynchronised from the others (it missed the writes made while it was failed).  409 when
        it is not failed, its file or header is not the PD's, or an LD has no other copy."""
        return PDOut(**asdict(await engine.restore_pd(pd_id)))

    @router.post("/pds/{pd_id}/replace", tags=["pds"])
    async def replace_pd(pd_id: IdPath, body: PDReplace) -> PDOut:
        """Rebuild every LD member of the failed PD onto the new one, then remove the failed PD;
        answers the new PD."""
        return PDOut(**asdict(await engine.replace_pd(pd_id, body.new)))

    @router.delete("/pds/{pd_id}", status_code=204, tags=["pds"])
    async def remove_pd(pd_id: IdPath) -> Response:
        """Only when none of its chunklets is used (409 otherwise)."""
        await engine.remove_pd(pd_id)
        return Response(status_code=204)

    # --- pools --------------------------------------------------------------------------------
    @router.get("/pools", tags=["pools"])
    async def list_pools() -> list[PoolOut]:
        return [_pool_out(p, ctx) for p in engine.list_pools()]

    @router.post("/pools", status_code=201, tags=["pools"])
    async def create_pool(body: PoolCreate) -> PoolOut:
        kwargs: dict[str, Any] = {"raid": body.raid, "set_size": body.set_size}
        for key in ("step", "region_size", "growth_increment", "growth_warning", "growth_limit"):
            value = getattr(body, key)
            if value is not None:
                kwargs[key] = value
        return _pool_out(await engine.create_pool(body.name, **kwargs), ctx)

    @router.get("/pools/{name}", tags=["pools"])
    async def show_pool(name: PoolPath) -> PoolOut:
        return _pool_out(engine.get_pool(name), ctx)

    @router.patch("/pools/{name}", tags=["pools"])
    async def set_pool(name: PoolPath, body: PoolUpdate) -> PoolOut:
        if "growth_increment" in body.model_fields_set and body.growth_increment is None:
            raise InvalidArgument("growth_increment cannot be removed, only changed")
        return _pool_out(
            await engine.set_pool(
                name,
                growth_increment=_unset_unless_given(body, "growth_increment"),
                growth_warning=_unset_unless_given(body, "growth_warning"),
                growth_limit=_unset_unless_given(body, "growth_limit"),
            ),
            ctx,
        )

    @router.post("/pools/{name}/compact", tags=["pools"])
    async def compact_pool(name: PoolPath) -> CompactOut:
        """Release the pool's LDs whose regions are all free back to free chunklets."""
        released = await engine.compact_pool(name)
        return CompactOut(released_lds=released, pool=_pool_out(engine.get_pool(name), ctx))

    @router.delete("/pools/{name}", status_code=204, tags=["pools"])
    async def delete_pool(name: PoolPath) -> Response:
        """Only when it has no volumes (409 otherwise); its LDs are released."""
        await engine.delete_pool(name)
        return Response(status_code=204)

    # --- logical disks ------------------------------------------------------------------------
    @router.get("/lds", tags=["lds"])
    async def list_lds(
        pool: Annotated[PoolName | None, Query()] = None,
    ) -> list[LDOut]:
        if pool is not None:
            engine.get_pool(pool)  # NotFound for an unknown pool rather than an empty list
        return [_ld_out(ld) for ld in engine.list_lds(pool)]

    @router.get("/lds/{ld_id}", tags=["lds"])
    async def show_ld(ld_id: IdPath) -> LDOut:
        return _ld_out(engine.get_ld(ld_id))

    @router.post("/rebuild", status_code=202, tags=["lds"])
    async def start_rebuild() -> RebuildOut:
        """Rebuild every degraded LD onto spare chunklets, in the background; poll GET /rebuild."""
        if not ctx.rebuild_running():
            ctx.rebuild_error = None
            ctx.rebuild_task = asyncio.create_task(_run_rebuild(ctx), name="thinblock-rebuild")
            await asyncio.sleep(0)  # let it start, so that the status below reflects it
        return _rebuild_out(ctx)

    @router.get("/rebuild", tags=["lds"])
    async def rebuild_status() -> RebuildOut:
        return _rebuild_out(ctx)

    # --- volumes ------------------------------------------------------------------------------
    @router.get("/volumes", tags=["volumes"])
    async def list_volumes() -> list[VolumeOut]:
        return [_volume_out(v, ctx) for v in engine.list_vvs()]

    @router.post("/volumes", status_code=201, tags=["volumes"])
    async def create_volume(body: VolumeCreate) -> VolumeOut:
        """Create a thin volume; in a node pair (``node.partner_api``), on ``node`` (forwarded
        to the partner's API) or, without it, on the node with fewer volumes."""
        if node.moves is not None:
            where = await node.moves.place(body.node, len(engine.list_vvs()))
            if where is not None:
                forwarded = body.model_dump(mode="json", exclude_none=True)
                for key in ("alloc_warning", "alloc_limit", "snapshot_warning", "snapshot_limit"):
                    if getattr(body, key) is not None:
                        forwarded[key] = str(getattr(body, key))
                forwarded["node"] = where
                return VolumeOut(**await node.moves.partner.create_volume(forwarded))
        elif body.node is not None and body.node != node.name:
            raise InvalidArgument(f"no node {body.node!r}: this node is {node.name} and has no partner API")
        info = await engine.create_vv(
            body.name,
            pool=body.pool,
            size=body.size,
            alloc_warning=body.alloc_warning,
            alloc_limit=body.alloc_limit,
            cache_mode=body.cache_mode,
            snapshot_warning=body.snapshot_warning,
            snapshot_limit=body.snapshot_limit,
            snapshot_limit_policy=body.snapshot_limit_policy,
        )
        return _volume_out(info, ctx)

    @router.get("/volumes/{name}", tags=["volumes"])
    async def show_volume(name: VolumePath) -> VolumeOut:
        return _volume_out(engine.get_vv(name), ctx)

    @router.patch("/volumes/{name}", tags=["volumes"])
    async def set_volume(name: VolumePath, body: VolumeUpdate) -> VolumeOut:
        if "cache_mode" in body.model_fields_set and body.cache_mode is None:
            raise InvalidArgument("cache_mode cannot be removed, only changed (writeback or writethrough)")
        if "snapshot_limit_policy" in body.model_fields_set and body.snapshot_limit_policy is None:
            raise InvalidArgument(
                "snapshot_limit_policy cannot be removed, only changed (fail or invalidate-oldest)"
            )
        info = await engine.set_vv(
            name,
            alloc_warning=_unset_unless_given(body, "alloc_warning"),
            alloc_limit=_unset_unless_given(body, "alloc_limit"),
            cache_mode=_unset_unless_given(body, "cache_mode"),
            snapshot_warning=_unset_unless_given(body, "snapshot_warning"),
            snapshot_limit=_unset_unless_given(body, "snapshot_limit"),
            snapshot_limit_policy=_unset_unless_given(body, "snapshot_limit_policy"),
        )
        return _volume_out(info, ctx)

    @router.post("/volumes/{name}/grow", tags=["volumes"])
    async def grow_volume(name: VolumePath, body: VolumeGrow) -> VolumeOut:
        """Grow the virtual size (shrinking is refused); NBD clients see it on their next connection."""
        return _volume_out(await engine.grow_vv(name, body.size), ctx)

    @router.post("/volumes/{name}/rename", tags=["volumes"])
    async def rename_volume(name: VolumePath, body: VolumeRename) -> VolumeOut:
        """A new name; data, limits and cache mode stay.  Connected clients go on with the volume
        under its new name; new connections use the new name; the old name is free.  Refused (409)
        while the configuration's access rules name either name: they would stop applying to
        this volume, or start to."""
        engine.get_vv(name)  # NotFound first
        rules = _config_rules_naming(node, (name, body.name))
        if rules:
            raise Conflict(
                f"volume '{name}' cannot be renamed to '{body.name}' while {rules} in the configuration"
                " name it: change them first (a rename would take the volume out of its rules)"
            )
        # The rules made through the API follow the volume: copied to the new name first (for a
        # moment both names are restricted, never neither), the old name's dropped after.
        copied = node.nbd_access.copy_rules(name, body.name)
        try:
            info = await engine.rename_vv(name, body.name)
        except BaseException:
            if copied:
                node.nbd_access.forget_volume(body.name)
            raise
        node.nbd_access.forget_volume(name)
        return _volume_out(info, ctx)

    @router.post("/volumes/{name}/snapshots", status_code=201, tags=["volumes"])
    async def snapshot_volume(name: VolumePath, body: VolumeCopy) -> VolumeOut:
        """A read-only snapshot of the volume, instant: its content as of now (every write
        acknowledged before it), exported read-only over NBD for backups."""
        return _volume_out(await engine.snapshot_vv(name, body.name), ctx)

    @router.post("/volumes/{name}/revert", tags=["volumes"])
    async def revert_volume(name: VolumePath, body: VolumeRevert) -> VolumeOut:
        """The volume becomes the snapshot's content, atomically; its other snapshots and clones
        stay as they are.  409 with clients connected unless ``force``."""
        return _volume_out(await engine.revert_vv(name, body.snapshot, force=body.force), ctx)

    @router.get("/volumes/{name}/diff", tags=["volumes"])
    async def diff_volume(
        name: VolumePath,
        base: Annotated[VolumeName, Query(description="the older snapshot of the same tree")],
    ) -> VolumeDiffOut:
        """The byte ranges where ``name`` may differ from ``base``: what an incremental backup
        from ``base`` to ``name`` copies."""
        extents = engine.diff_vv(base, name)
        return VolumeDiffOut(
            base=base,
            target=name,
            region_size=engine.get_vv(name).region_size,
            bytes=sum(n for _, n in extents),
            extents=[DiffExtent(offset=o, length=n) for o, n in extents],
        )

    @router.post("/volumes/{name}/clones", status_code=201, tags=["volumes"])
    async def clone_volume(name: VolumePath, body: VolumeCopy) -> VolumeOut:
        """A writable clone of the snapshot ``name``, instant (400 when it is not a snapshot)."""
        return _volume_out(await engine.clone_vv(name, body.name), ctx)

    @router.delete("/volumes/{name}", status_code=204, tags=["volumes"])
    async def delete_volume(
        name: VolumePath,
        force: Annotated[
            bool, Query(description="delete it even with clients connected: they are disconnected")
        ] = False,
    ) -> Response:
        """Every region it holds goes back to its pool, zeroed.  With connected clients: 409,
        unless ``force`` (they are disconnected, and any request they still send fails)."""
        await engine.delete_vv(name, force=force)
        node.nbd_access.forget_volume(name)  # a new volume of this name inherits no grant
        return Response(status_code=204)

    @router.get("/volumes/{name}/access", tags=["volumes"])
    async def volume_access(name: VolumePath) -> VolumeAccessOut:
        """Which NBD clients may open the volume, and how: the configuration's rules
        (``[[nbd.access]]``) and those made through the API."""
        engine.get_vv(name)
        return _access_out(node.nbd_access, name)

    @router.post("/volumes/{name}/access", status_code=201, tags=["volumes"])
    async def add_volume_access(name: VolumePath, body: AccessRuleIn) -> VolumeAccessOut:
        """Allow (``ro``, ``rw``) or deny a client; kept in the data directory, in force for every
        new connection (connections already open keep what they opened).  Admin only."""
        engine.get_vv(name)
        try:
            node.nbd_access.put(name, body.client, body.mode)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return _access_out(node.nbd_access, name)

    @router.delete("/volumes/{name}/access/{rule_id}", tags=["volumes"])
    async def remove_volume_access(name: VolumePath, rule_id: int) -> Response:
        """Remove a rule made through the API (those of the configuration file stay).  Admin only."""
        engine.get_vv(name)
        if node.nbd_access.remove(name, rule_id) is None:
            raise NotFound(f"volume {name} has no access rule {rule_id} made through the API")
        return Response(status_code=204)

    @router.get("/volumes/{name}/stats", tags=["volumes"])
    async def volume_stats(name: VolumePath) -> VolumeStatsOut:
        """I/O counters since the daemon started."""
        engine.get_vv(name)
        return VolumeStatsOut(**asdict(engine.vv_stats(name)))

    # --- history ------------------------------------------------------------------------------
    @router.get("/history", tags=["status"])
    async def history(
        seconds: Annotated[
            float, Query(gt=0, le=7 * 86400, description="how far back (the daemon keeps a few hours)")
        ] = 3600,
    ) -> HistoryOut:
        """Samples of allocation and I/O counters, column-wise for charts: ``times`` (unix
        seconds) and, per pool and per volume, one list per quantity (null where it did not exist)."""
        return HistoryOut(**ctx.history.series(seconds))

    # --- alerts -------------------------------------------------------------------------------
    @router.get("/alerts", tags=["alerts"])
    async def list_alerts(
        all: Annotated[bool, Query(description="include cleared alerts")] = False,
    ) -> list[AlertOut]:
        """Open alerts (new, acknowledged), newest last; with ``all``, cleared ones too."""
        return [AlertOut(**asdict(a)) for a in engine.list_alerts(include_cleared=all)]

    @router.get("/alerts/{alert_id}", tags=["alerts"])
    async def show_alert(alert_id: IdPath) -> AlertOut:
        for alert in engine.list_alerts(include_cleared=True):
            if alert.id == alert_id:
                return AlertOut(**asdict(alert))
        raise NotFound(f"alert {alert_id} not found")

    @router.post("/alerts/{alert_id}/ack", tags=["alerts"])
    async def ack_alert(alert_id: IdPath) -> AlertOut:
        return AlertOut(**asdict(engine.ack_alert(alert_id)))

    return router


async def _os_errors_are_bad_input(coro: Awaitable[Any], path: Path) -> Any:
    """A path the daemon cannot create or open is the caller's mistake (400), not a server fault."""
    try:
        return await coro
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InvalidArgument(f"cannot use {path} as a PD: {reason}") from None


async def _run_rebuild(ctx: ApiContext) -> RebuildProgressInfo | None:
    """The background rebuild; its failure is kept for GET /rebuild (and logged), not raised."""
    started = time.monotonic()
    log.info("rebuild started", extra={"event": "rebuild-start"})
    try:
        result = await ctx.engine.rebuild()
    except asyncio.CancelledError:
        log.warning("rebuild cancelled", extra={"event": "rebuild-cancelled"})
        raise
    except ThinblockError as exc:
        ctx.rebuild_error = str(exc)
        log.error("rebuild failed: %s", exc, extra={"event": "rebuild-failed"})
        return None
    except Exception as exc:
        ctx.rebuild_error = f"internal error ({type(exc).__name__}); see the daemon log"
        log.exception("rebuild failed", extra={"event": "rebuild-failed"})
        return None
    log.info(
        "rebuild finished",
        extra={
            "event": "rebuild-done",
            "lds": result.lds_done,
            "bytes": result.bytes_done,
            "seconds": round(time.monotonic() - started, 3),
        },
    )
    return result


__all__ = ["API_PREFIX", "ApiContext", "NodeInfo", "create_app"]
