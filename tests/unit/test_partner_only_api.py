"""The API of a node rejoined as partner only (api/partner_only.py): status, nodes, health and
metrics answer; every other API request gets 503 with the reason; the gate still demands a token
once one is required."""

from __future__ import annotations

import httpx

from thinblock.api.auth import ApiSecurity
from thinblock.api.partner_only import PartnerOnlyInfo, create_partner_only_app
from thinblock.node.pair import PairStatus

HOLDER = "takeover by n2 (vm:/srv/n2)"


def rejoined_status() -> PairStatus:
    return PairStatus(
        node="n1", partner="127.0.0.1:10811", partner_node="n2", listen="127.0.0.1:10810", epoch=0,
        mirror="partner-only", in_flight_bytes=0, last_latency_s=0.0, sessions_lost=0,
        holding_for="n2", held_bytes=8192, held_writes=2, taken_over=False, flush_covered=False,
        own_held_bytes=4096, own_held_writes=1,
    )  # fmt: skip


def client(security: ApiSecurity | None = None) -> httpx.AsyncClient:
    info = PartnerOnlyInfo("n1", rejoined_status, lambda: (HOLDER, 3))
    app = create_partner_only_app(info, security or ApiSecurity.for_data_dir(None))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://thinblock")


async def test_status_nodes_and_health_answer() -> None:
    async with client() as c:
        status = (await c.get("/api/v1/status")).json()
        assert status["role"] == "partner-only" and status["served_by"] == HOLDER
        assert status["pair"]["own_held_writes"] == 1 and status["pair"]["lease_epoch"] == 3
        (row,) = (await c.get("/api/v1/nodes")).json()
        assert (row["node"], row["holding_for"], row["held_writes"], row["volumes"]) == ("n1", "n2", 2, 0)
        health = (await c.get("/api/v1/health")).json()
        assert health == {"node": "n1", "state": "partner-only", "mirror": "partner-only"}
        assert (await c.get("/metrics")).status_code == 200


async def test_everything_else_is_unavailable_with_the_reason() -> None:
    async with client() as c:
        for method, path in (
            ("GET", "/api/v1/volumes"),
            ("POST", "/api/v1/volumes"),
            ("GET", "/api/v1/pds/1"),
        ):
            response = await c.request(method, path, json={} if method == "POST" else None)
            assert response.status_code == 503, (method, path, response.text)
            assert (
                "rejoined as partner only" in response.json()["error"] and HOLDER in response.json()["error"]
            )


async def test_the_gate_still_demands_the_token() -> None:
    security = ApiSecurity.for_data_dir(None, config_token="s3cret")
    async with client(security) as c:
        assert (await c.get("/api/v1/status")).status_code == 401
        ok = await c.get("/api/v1/status", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["node"] == "n1"
