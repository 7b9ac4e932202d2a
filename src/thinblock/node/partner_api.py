"""The partner node's REST API as this node uses it (``node.partner_api``): the target side of a
move (node/move.Partner), volume creation forwarded by ``vv create --node``, and the partner's own
row of ``node list``.

Every failure to reach it, and every answer that is not the API's own refusal (5xx, 401/403: it
does not take this node's token), is ``PartnerUnavailable`` (503) with one line saying why; the
API's refusals (400, 404, 409, 507) come back as the same errors with the partner's message, so
that the administrator reads "volume 'v' already exists on this node" from the partner as it said it.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

import httpx

from thinblock import __version__
from thinblock.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, OutOfSpace, ThinblockError
from thinblock.node.move import PartnerUnavailable, VolumeSpec, encode_piece

API_PREFIX = "/api/v1"
TIMEOUT = 10.0  # seconds for one call (a piece of a copy is 512 KiB; a finish flushes)
STATUS_TIMEOUT = 5.0  # seconds for `node list` and placement calls (a loaded partner is slow)

_REFUSALS: dict[int, type[ThinblockError]] = {
    400: InvalidArgument,
    404: NotFound,
    409: Conflict,
    507: OutOfSpace,
}


def read_token(path: Path) -> str:
    """The token in ``path`` (first line); ValueError saying why it cannot be used."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read node.partner_api_token_file {path}: {exc.strerror or exc}") from None
    if not text:
        raise ValueError(f"node.partner_api_token_file {path} is empty")
    return text.splitlines()[0].strip()


class PartnerAPI:
    def __init__(
        self, url: str, token: str | None = None, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"user-agent": f"thinblock-node/{__version__}"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.client = httpx.AsyncClient(
            base_url=self.url + API_PREFIX, headers=headers, timeout=TIMEOUT, transport=transport
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def call(self, method: str, path: str, *, body: Any = None, timeout: float | None = None) -> Any:
        if body is None and method not in ("GET", "HEAD"):
            body = {}  # the API demands a JSON body of every state-changing request
        try:
            response = await self.client.request(
                method, path, json=body, timeout=timeout if timeout is not None else TIMEOUT
            )
        except httpx.TimeoutException:
            raise PartnerUnavailable(f"the partner's API at {self.url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise PartnerUnavailable(f"cannot reach the partner's API at {self.url}: {exc}") from None
        if response.status_code == 204:
            return None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.is_success:
            return answer
        message = answer.get("error") if isinstance(answer, dict) else None
        message = f"partner: {message or f'HTTP {response.status_code}'}"
        if response.status_code in (401, 403):
            raise PartnerUnavailable(
                f"{message} (node.partner_api_token_file: an admin token of the partner)"
            )
        if response.status_code == 409 and "already exists" in message:
            raise AlreadyExists(message)
        refusal = _REFUSALS.get(response.status_code)
        if refusal is not None:
            raise refusal(message)
        raise PartnerUnavailable(message)

    # --- node/move.Partner ---------------------------------------------------------------------
    async def name(self) -> str:
        (row,) = await self.call("GET", "/nodes?local=true", timeout=STATUS_TIMEOUT)
        return str(row["node"])

    async def prepare(self, move_id: str, vv: str, temp: str, spec: VolumeSpec, needed: int) -> None:
        body = {"id": move_id, "vv": vv, "temp": temp, "spec": _spec(spec), "needed": needed}
        await self.call("POST", "/moves/incoming", body=body)

    async def write(self, move_id: str, offset: int, data: bytes) -> None:
        from thinblock.node.move import crc32c

        body = {"offset": offset, "data": encode_piece(data), "crc32c": crc32c(data)}
        await self.call("POST", f"/moves/incoming/{_q(move_id)}/data", body=body)

    async def checksums(self, move_id: str, pieces: list[tuple[int, int]]) -> list[int]:
        out: list[int] = []
        for i in range(0, len(pieces), 4096):  # bounded request bodies
            answer = await self.call(
                "POST",
                f"/moves/incoming/{_q(move_id)}/checksums",
                body={"pieces": [list(p) for p in pieces[i : i + 4096]]},
                timeout=max(TIMEOUT, 60.0),
            )
            out += [int(c) for c in answer["crc32c"]]
        return out

    async def finish(self, move_id: str, spec: VolumeSpec) -> None:
        await self.call(
            "POST", f"/moves/incoming/{_q(move_id)}/finish", body={"spec": _spec(spec)}, timeout=60.0
        )

    async def abort(self, move_id: str) -> None:
        await self.call("DELETE", f"/moves/incoming/{_q(move_id)}")

    # --- placement and node list ----------------------------------------------------------------
    async def create_volume(self, body: dict[str, Any]) -> Any:
        return await self.call("POST", "/volumes", body=body)

    async def own_row(self) -> dict[str, Any]:
        (row,) = await self.call("GET", "/nodes?local=true", timeout=STATUS_TIMEOUT)
        return dict(row)


def _spec(spec: VolumeSpec) -> dict[str, Any]:
    return {
        "size": spec.size,
        "pool": spec.pool,
        "cache_mode": spec.cache_mode,
        "alloc_warning": spec.alloc_warning,
        "alloc_limit": spec.alloc_limit,
        "access": [{"client": c, "mode": m} for c, m in spec.access],
        "snapshot_warning": spec.snapshot_warning,
        "snapshot_limit": spec.snapshot_limit,
        "snapshot_limit_policy": spec.snapshot_limit_policy,
    }


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


__all__ = ["PartnerAPI", "read_token"]
