"""The API of a node pair's planned moves and placement (issue 12, step 6; node/move.py):

* ``POST /volumes/{name}/move`` ``{"to": NODE}``: hand the volume to the partner (the source's
  verb; answers when the partner serves it, or the one-line reason it was refused or rolled back);
* ``/moves/incoming...``: the target's verbs, called by the partner's node (admin token): make
  the temporary volume, write a piece, checksums of pieces read back, finish (rename), abort;
* placement for ``POST /volumes`` with ``node`` (``vv create --node``) and the partner's row of
  ``GET /nodes``, through ``PairMoves``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidArgument
from ..node.move import (
    IncomingMoves,
    Mover,
    MoveRecord,
    PartnerUnavailable,
    VolumeSpec,
    decode_piece,
)
from ..node.partner_api import PartnerAPI
from .nametypes import VolumeName

log = logging.getLogger("thinblock.move")

MoveId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{12}$", description="the move's id")]
NodeName = Annotated[str, Field(min_length=1, max_length=255)]


class PairMoves:
    """What the API needs of the pair for moves and placement; built by the daemon."""

    def __init__(
        self,
        node_name: str,
        mover: Mover,
        incoming: IncomingMoves,
        partner: PartnerAPI | None,
    ) -> None:
        self.node_name = node_name
        self.mover = mover
        self.incoming = incoming
        self.partner = partner

    async def partner_row(self) -> dict[str, Any] | None:
        """The partner's own row of ``GET /nodes``; None when it cannot be reached."""
        if self.partner is None:
            return None
        try:
            return await self.partner.own_row()
        except PartnerUnavailable as exc:
            log.info("node list: the partner is unreachable: %s", exc, extra={"event": "partner-unreachable"})
            return None

    async def place(self, node: str | None, local_volumes: int) -> str | None:
        """Where ``vv create`` makes the volume: None for this node, else the partner's name.
        Without ``node``: balanced, the node with fewer volumes (this one on a tie, or when the
        partner cannot be reached: the volume is served at once, by the node that answered)."""
        if node is None or node == self.node_name:
            if node is None and self.partner is not None:
                row = await self.partner_row()
                if row is not None and int(row.get("volumes") or 0) < local_volumes:
                    return str(row["node"])
            return None
        if self.partner is None:
            raise InvalidArgument(f"no node {node!r}: this node is {self.node_name} and has no partner API")
        try:
            row = await self.partner.own_row()
        except PartnerUnavailable as exc:
            raise PartnerUnavailable(
                f"cannot create the volume on {node}: the partner is down ({exc})"
            ) from None
        if row["node"] != node:
            raise InvalidArgument(
                f"no node {node!r}: the pair's nodes are {self.node_name} and {row['node']}"
            )
        return node


# --- models --------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MoveRequest(_Request):
    to: NodeName = Field(description="the partner node's name")


class MoveOut(BaseModel):
    vv: str
    source: str
    target: str
    size: int
    copied_bytes: int = Field(description="bytes of assigned regions copied (unwritten space is not)")
    pieces: int
    seconds: float


class AccessIn(_Request):
    client: str
    mode: Literal["ro", "rw", "deny"]


class SpecIn(_Request):
    size: int = Field(ge=0)
    pool: str
    cache_mode: Literal["", "writeback", "writethrough"]
    alloc_warning: str | None = None
    alloc_limit: str | None = None
    access: list[AccessIn] = Field(default_factory=list, max_length=1024)
    snapshot_warning: str | None = None
    snapshot_limit: str | None = None
    snapshot_limit_policy: Literal["fail", "invalidate-oldest"] = "fail"

    def spec(self) -> VolumeSpec:
        return VolumeSpec(
            size=self.size,
            pool=self.pool,
            cache_mode=self.cache_mode,
            alloc_warning=self.alloc_warning,
            alloc_limit=self.alloc_limit,
            access=[(a.client, a.mode) for a in self.access],
            snapshot_warning=self.snapshot_warning,
            snapshot_limit=self.snapshot_limit,
            snapshot_limit_policy=self.snapshot_limit_policy,
        )


class IncomingIn(_Request):
    id: str = Field(pattern=r"^[0-9a-f]{12}$")
    vv: VolumeName
    temp: VolumeName
    spec: SpecIn
    needed: int = Field(ge=0, description="bytes of assigned regions the copy will write")


class PieceIn(_Request):
    offset: int = Field(ge=0)
    data: str = Field(description="base64")
    crc32c: int = Field(ge=0, lt=1 << 32)


class ChecksumsIn(_Request):
    pieces: list[tuple[int, int]] = Field(max_length=4096, description="[offset, length] pairs")


class ChecksumsOut(BaseModel):
    crc32c: list[int]


class FinishIn(_Request):
    spec: SpecIn


class MoveRecordOut(BaseModel):
    id: str
    vv: str
    temp: str
    state: str
    partner: str
    started: float
    created: float | None


def _record_out(record: MoveRecord) -> MoveRecordOut:
    d = asdict(record)
    d["state"] = str(record.state)
    return MoveRecordOut(**d)


def moves_router(moves: PairMoves) -> APIRouter:
    router = APIRouter(tags=["node pair"])

    @router.post("/volumes/{name}/move")
    async def move_volume(name: Annotated[VolumeName, PathParam()], body: MoveRequest) -> MoveOut:
        """Hand the volume over to the partner node: drained here (its clients disconnected, new
        ones answered "no such volume"), its assigned regions copied and verified there, then the
        partner serves it under its name and it is deleted here.  Refused (one line) with
        snapshots or clones, no partner or a partner down, the name used there, no room there."""
        return MoveOut(**asdict(await moves.mover.move(name, body.to)))

    @router.post("/moves/incoming", status_code=201)
    async def incoming_prepare(body: IncomingIn) -> MoveRecordOut:
        """(Partner node) make the temporary volume of an incoming move, hidden from hosts."""
        record = await moves.incoming.prepare(body.id, body.vv, body.temp, body.spec.spec(), body.needed)
        return _record_out(record)

    @router.get("/moves/incoming/{move_id}")
    async def incoming_state(move_id: MoveId) -> MoveRecordOut:
        return _record_out(moves.incoming.state(move_id))

    @router.post("/moves/incoming/{move_id}/data", status_code=204)
    async def incoming_data(move_id: MoveId, body: PieceIn) -> Response:
        """(Partner node) write one piece of the copy (checked against its crc32c)."""
        await moves.incoming.write(move_id, body.offset, decode_piece(body.data, body.crc32c))
        return Response(status_code=204)

    @router.post("/moves/incoming/{move_id}/checksums")
    async def incoming_checksums(move_id: MoveId, body: ChecksumsIn) -> ChecksumsOut:
        """(Partner node) crc32c of pieces read back from the PDs after a flush."""
        return ChecksumsOut(crc32c=await moves.incoming.checksums(move_id, body.pieces))

    @router.post("/moves/incoming/{move_id}/finish")
    async def incoming_finish(move_id: MoveId, body: FinishIn) -> MoveRecordOut:
        """(Partner node) give the volume its settings and its name: it is served from here on."""
        return _record_out(await moves.incoming.finish(move_id, body.spec.spec()))

    @router.delete("/moves/incoming/{move_id}", status_code=204)
    async def incoming_abort(move_id: MoveId) -> Response:
        """(Partner node) delete the temporary volume of a move rolled back."""
        await moves.incoming.abort(move_id)
        return Response(status_code=204)

    return router


__all__ = ["PairMoves", "moves_router"]
