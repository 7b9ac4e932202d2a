"""The REST API of a node rejoined as partner only (issue 12: the old owner started again while
its partner's takeover serves its volumes).

Such a node has no engine: its data directory and store are the takeover's until its lease is
free again (daemon.py, ``_rejoin_while_taken_over``).  It holds its partner's mirror, may take
the partner over, and holds the copies of its own volumes the partner mirrors to it.  The
administrator sees that here, on the node's own API address, behind the same gate as the full
API (tokens, roles, cross-site refusals, audit: api/auth.py):

* ``GET /api/v1/status``: the node, its role (``partner-only``), who serves its volumes (the
  holder of its lease) and its side of the pair;
* ``GET /api/v1/nodes``: its row of ``thinblock node list``;
* ``GET /api/v1/health``: ``partner-only``, and the mirror state;
* ``GET /metrics``: the mirror metrics (copies held);

every other ``/api/v1`` request is answered 503 with the reason, until the node's lease comes
back and the daemon replaces this app with the full one on the same socket.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from .. import __version__
from .app import API_PREFIX, HealthOut, NodeOut
from .auth import ApiGuard, ApiSecurity

PARTNER_ONLY: Literal["partner-only"] = "partner-only"


@dataclass
class PartnerOnlyInfo:
    """What the daemon hands in while rejoined."""

    name: str
    pair_status: Callable[[], Any]  # () -> node.pair.PairStatus
    lease: Callable[[], tuple[str | None, int | None]]  # (holder, epoch) of node:NAME, last read
    metrics: Any = None  # a prometheus collector (node.pair.PairMetrics)
    started: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)

    def node_row(self) -> NodeOut:
        _holder, epoch = self.lease()
        return NodeOut(role="pair", lease_epoch=epoch, volumes=0, **asdict(self.pair_status()))


class PartnerOnlyStatusOut(BaseModel):
    node: str
    version: str
    started: float
    uptime: float
    role: Literal["partner-only"] = Field(
        description="rejoined as partner: this node serves no volumes until its lease is free again"
    )
    served_by: str | None = Field(description="the holder of this node's lease: its partner's takeover")
    pair: NodeOut


def create_partner_only_app(info: PartnerOnlyInfo, security: ApiSecurity) -> FastAPI:
    app = FastAPI(
        title="thinblock (partner only)",
        version=__version__,
        description="A node rejoined as partner: status, node list and health only.",
        docs_url=None,
        redoc_url=None,
    )

    def unavailable() -> str:
        holder, _epoch = info.lease()
        return (
            f"node {info.name} is rejoined as partner only: its volumes are served by"
            f" {holder or 'its partner'}; only status, nodes and health answer until its lease is"
            " free again (then it serves them and its full API)"
        )

    @app.get(f"{API_PREFIX}/status")
    async def status() -> PartnerOnlyStatusOut:
        holder, _epoch = info.lease()
        return PartnerOnlyStatusOut(
            node=info.name,
            version=__version__,
            started=info.started,
            uptime=time.monotonic() - info.started_monotonic,
            role=PARTNER_ONLY,
            served_by=holder,
            pair=info.node_row(),
        )

    @app.get(f"{API_PREFIX}/nodes")
    async def nodes() -> list[NodeOut]:
        return [info.node_row()]

    @app.get(f"{API_PREFIX}/health")
    async def health() -> HealthOut:
        return HealthOut(node=info.name, state=PARTNER_ONLY, mirror=info.pair_status().mirror)

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        registry = CollectorRegistry(auto_describe=False)
        if info.metrics is not None:
            registry.register(info.metrics)
        return Response(content=generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.api_route(
        f"{API_PREFIX}/{{rest:path}}",
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        include_in_schema=False,
    )
    async def everything_else(request: Request, rest: str) -> JSONResponse:
        return JSONResponse({"error": unavailable()}, status_code=503)

    app.add_middleware(ApiGuard, security=security, openapi=app.openapi)
    return app
