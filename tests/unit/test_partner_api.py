"""The partner's REST API as a node calls it (node/partner_api.py): every answer that is not
the API's own refusal is "the partner is unavailable"; its refusals keep their kind and message."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from thinblock.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, OutOfSpace
from thinblock.node.move import PartnerUnavailable
from thinblock.node.partner_api import PartnerAPI, read_token


def api(status: int, body: object = None, *, seen: list[httpx.Request] | None = None) -> PartnerAPI:
    def answer(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(status, json=body)

    return PartnerAPI("http://n2:8081", "secret", transport=httpx.MockTransport(answer))


@pytest.mark.parametrize(
    ("status", "message", "error"),
    [
        (400, "bad", InvalidArgument),
        (404, "no pool 'p'", NotFound),
        (409, "volume 'v' already exists on this node", AlreadyExists),
        (409, "move x is finished", Conflict),
        (507, "pool 'p' has room for 1 MiB", OutOfSpace),
        (500, "internal error", PartnerUnavailable),
        (503, "lease lost", PartnerUnavailable),
    ],
)
async def test_refusals_keep_their_kind_and_say_they_are_the_partners(
    status: int, message: str, error: type[Exception]
) -> None:
    partner = api(status, {"error": message})
    with pytest.raises(error, match=f"^partner: {message}"):
        await partner.abort("0123456789ab")
    await partner.aclose()


async def test_a_refused_token_names_the_setting() -> None:
    partner = api(401, {"error": "missing or wrong bearer token"})
    with pytest.raises(PartnerUnavailable, match="partner_api_token_file"):
        await partner.name()
    await partner.aclose()


async def test_an_unreachable_partner_is_unavailable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    partner = PartnerAPI("http://n2:8081", transport=httpx.MockTransport(refuse))
    with pytest.raises(PartnerUnavailable, match="cannot reach the partner's API at http://n2:8081"):
        await partner.name()
    await partner.aclose()


async def test_calls_carry_the_token_and_a_json_body() -> None:
    seen: list[httpx.Request] = []
    partner = api(204, seen=seen)
    await partner.write("0123456789ab", 4096, b"x" * 512)
    (request,) = seen
    assert request.headers["authorization"] == "Bearer secret"
    assert request.url.path == "/api/v1/moves/incoming/0123456789ab/data"
    assert request.headers["content-type"] == "application/json"
    await partner.aclose()


def test_the_token_file_must_hold_a_token(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("tok-1\n")
    assert read_token(tmp_path / "t") == "tok-1"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_token(tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot read"):
        read_token(tmp_path / "missing")
