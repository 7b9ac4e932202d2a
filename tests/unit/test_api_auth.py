"""The API's gate (thinblock.api.auth) in process: cross-site refusals, roles, tokens, audit.

The route lists are generated from the app's own route table, so a route added later is covered
without touching this file; and a state-changing route missing from ``ROUTE_ROLES`` fails here
(at run time it would need admin: the gate fails closed).
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from thinblock.api.app import NodeInfo, create_app
from thinblock.api.auth import (
    AUDIT_FILE,
    ROUTE_ROLES,
    SAFE_METHODS,
    TOKENS_FILE,
    ApiSecurity,
    Role,
    TokenStore,
    loopback_hosts,
    operations_of,
    required_role,
)
from thinblock.engine import Engine, EngineOptions
from thinblock.units import MiB

JSON = {"content-type": "application/json"}
BASE = "http://thinblock"
# What a browser can send to any site without a CORS preflight, and a JSON post from elsewhere.
CSRF_ATTEMPTS: list[tuple[str, dict[str, str], bytes]] = [
    ("form", {"content-type": "application/x-www-form-urlencoded"}, b"name=x&raid=1"),
    ("multipart", {"content-type": "multipart/form-data; boundary=b"}, b"--b\r\n\r\nx\r\n--b--\r\n"),
    ("text/plain", {"content-type": "text/plain"}, b'{"name": "x", "raid": 1}'),
    ("no content type", {}, b""),
    ("foreign origin", {**JSON, "origin": "http://evil.example"}, b"{}"),
    ("null origin", {**JSON, "origin": "null"}, b"{}"),
    ("sec-fetch-site", {**JSON, "sec-fetch-site": "cross-site"}, b"{}"),
]
STATE = ("/pds", "/pools", "/lds", "/volumes", "/alerts?all=true", "/tokens")


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    eng = await Engine.open(tmp_path / "data", EngineOptions(destage_delay=0.0))
    for i in range(2):
        await eng.add_pd(tmp_path / "data" / f"pd{i}.img", 64 * MiB, 4 * MiB)
    await eng.create_pool("default", raid=1, growth_increment=8 * MiB)
    await eng.create_vv("vol0", pool="default", size=64 * MiB)
    yield eng
    await eng.close()


def _node(tmp_path: Path) -> NodeInfo:
    return NodeInfo(name="node-a", data_dir=tmp_path / "data", default_chunklet_size=4 * MiB)


def _client(app: FastAPI, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE, headers=headers)


def _operations(app: FastAPI) -> list[tuple[str, str, str]]:
    """(method, route template, a concrete path) for every operation of the app, from its
    OpenAPI document (generated from the route table); checked against the routes themselves."""
    ops = []
    for op in operations_of(app.openapi()):
        concrete = re.sub(r"\{(\w+)\}", lambda m: "default" if m.group(1) == "name" else "1", op.template)
        ops.append((op.method, op.template, concrete))
    assert len(ops) >= 28
    return ops


def _state_changing(app: FastAPI) -> list[tuple[str, str, str]]:
    return [op for op in _operations(app) if op[0] not in SAFE_METHODS]


async def _snapshot(client: httpx.AsyncClient, auth: dict[str, str] | None = None) -> list[Any]:
    return [(await client.get(f"/api/v1{p}", headers=auth)).json() for p in STATE]


def _audit(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "data" / AUDIT_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- cross-site requests -------------------------------------------------------------------------


async def test_every_state_changing_route_is_listed_with_a_role(engine: Engine, tmp_path: Path) -> None:
    app = create_app(engine, _node(tmp_path))
    unsafe = {(method, template) for method, template, _ in _state_changing(app)}
    assert len(unsafe) >= 15
    assert unsafe - set(ROUTE_ROLES) == set(), "state-changing routes without a role in ROUTE_ROLES"
    assert set(ROUTE_ROLES) - unsafe == set(), "ROUTE_ROLES names routes that do not exist"


@pytest.mark.parametrize("with_token", [False, True], ids=["open-loopback", "admin-token"])
async def test_csrf_attempts_are_refused_on_every_state_changing_route(
    engine: Engine, tmp_path: Path, with_token: bool
) -> None:
    app = create_app(engine, _node(tmp_path), token="s3cret" if with_token else None)
    auth = {"authorization": "Bearer s3cret"} if with_token else {}
    async with _client(app, **auth) as c:
        before = await _snapshot(c)
        tried = 0
        for method, _, path in _state_changing(app):
            for what, headers, body in CSRF_ATTEMPTS:
                r = await c.request(method, path, headers=headers, content=body)
                expected = 403 if ("origin" in headers or "sec-fetch-site" in headers) else 415
                assert r.status_code == expected, (method, path, what, r.status_code, r.text)
                assert "access-control-allow-origin" not in r.headers
                tried += 1
        assert await _snapshot(c) == before, "a refused cross-site request changed state"
    assert tried == len(_state_changing(app)) * len(CSRF_ATTEMPTS)
    refused = [e for e in _audit(tmp_path) if e["result"] == "refused"]
    assert len(refused) == tried
    assert {e["who"] for e in refused} == {"config-token" if with_token else "anonymous"}


async def test_same_origin_json_is_accepted(engine: Engine, tmp_path: Path) -> None:
    app = create_app(engine, _node(tmp_path))
    async with _client(app) as c:
        r = await c.post(
            "/api/v1/pools/default/compact",
            json={},
            headers={"origin": BASE, "sec-fetch-site": "same-origin"},
        )
        assert r.status_code == 200, r.text
        # application/json with a charset is JSON too; an empty body is "no parameters".
        r = await c.post(
            "/api/v1/rebuild", content=b"", headers={"content-type": "application/json; charset=utf-8"}
        )
        assert r.status_code == 202, r.text


async def test_body_less_actions_take_no_parameters(engine: Engine, tmp_path: Path) -> None:
    app = create_app(engine, _node(tmp_path))
    async with _client(app) as c:
        for body in (b"[]", b'{"force": true}', b"not json", b"null"):
            r = await c.post("/api/v1/pds/1/fail", content=body, headers=JSON)
            assert r.status_code == 400, (body, r.text)
        assert all(pd.health == "normal" for pd in engine.list_pds())
        r = await c.post("/api/v1/pools", content=b"x" * (1024 * 1024 + 1), headers=JSON)
        assert r.status_code == 413


async def test_no_cors_preflight_is_answered(engine: Engine, tmp_path: Path) -> None:
    app = create_app(engine, _node(tmp_path))
    preflight = {
        "origin": "http://evil.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
    }
    async with _client(app) as c:
        for _, _, path in _operations(app):
            r = await c.options(path, headers=preflight)
            assert r.status_code >= 400, (path, r.status_code)
            assert not any(h.startswith("access-control-") for h in r.headers), (path, r.headers)


async def test_host_header_must_be_the_apis_own(engine: Engine, tmp_path: Path) -> None:
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends
    ``Host: evil.example:8080``; refused for reads too."""
    security = ApiSecurity.for_data_dir(tmp_path / "data", allowed_hosts=loopback_hosts(8080))
    app = create_app(engine, _node(tmp_path), security=security)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080"
    ) as c:
        assert (await c.get("/api/v1/volumes")).status_code == 200
        assert (await c.get("/api/v1/volumes", headers={"host": "localhost:8080"})).status_code == 200
        for host in ("evil.example:8080", "127.0.0.1:9999", "evil.example"):
            r = await c.get("/api/v1/volumes", headers={"host": host})
            assert r.status_code == 400 and "Host" in r.json()["error"], host
            r = await c.request("DELETE", "/api/v1/volumes/vol0", headers={"host": host, **JSON})
            assert r.status_code == 400
        assert [v.name for v in engine.list_vvs()] == ["vol0"]
        # The Origin must match the Host it was sent to.
        r = await c.post("/api/v1/rebuild", json={}, headers={"origin": "http://localhost:8080"})
        assert r.status_code == 403


# --- roles ---------------------------------------------------------------------------------------


async def test_roles_are_enforced_on_every_route(engine: Engine, tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "data" / TOKENS_FILE)
    secrets = {role: store.create(f"t-{role}", role)[1] for role in Role}
    app = create_app(engine, _node(tmp_path), security=ApiSecurity(tokens=store))
    checked = 0
    async with _client(app) as c:
        # Destructive routes last, so that what they remove does not make earlier ones 404.
        ops = sorted(_operations(app), key=lambda op: (op[0] == "DELETE", "fail" in op[1]))
        for method, template, path in ops:
            needed = required_role(method, template)
            for role in (Role.READ_ONLY, Role.OPERATOR, Role.ADMIN):
                headers = {"authorization": f"Bearer {secrets[role]}"}
                if method not in SAFE_METHODS:
                    headers.update(JSON)
                if role.allows(needed) and method == "DELETE" and template == "/api/v1/tokens/{token_id}":
                    continue  # revoking token 1 would lock the next checks out; revoke is tested below
                r = await c.request(method, path, headers=headers, content=b"{}" if method != "GET" else None)
                if role.allows(needed):
                    assert r.status_code not in (401, 403), (method, path, role, r.status_code, r.text)
                else:
                    assert r.status_code == 403, (method, path, role, r.status_code, r.text)
                    assert f"needs the {needed} role" in r.json()["error"]
                checked += 1
        assert checked >= 3 * 25
        # Reads need a token once tokens exist; /metrics and the history too.  (The OpenAPI
        # document is public, like the pages a browser opens before it can log in: Swagger UI
        # loads it before Authorize can give a token; api/dashboard.py.)
        for path in ("/api/v1/status", "/metrics", "/api/v1/history"):
            assert (await c.get(path)).status_code == 401
            assert (
                await c.get(path, headers={"authorization": f"Bearer {secrets[Role.READ_ONLY]}"})
            ).status_code == 200
    assert required_role("GET", "/api/v1/tokens") == Role.ADMIN
    assert required_role("POST", "/api/v1/some-new-route") == Role.ADMIN  # fails closed


# --- tokens --------------------------------------------------------------------------------------


async def test_tokens_are_stored_hashed_and_revocable(engine: Engine, tmp_path: Path) -> None:
    app = create_app(engine, _node(tmp_path))  # no token configured: open on loopback, as today
    async with _client(app) as c:
        assert (await c.get("/api/v1/status")).status_code == 200
        r = await c.post("/api/v1/tokens", json={"name": "ops", "role": "operator"})
        assert r.status_code == 201, r.text
        ops = r.json()
        assert ops["token"].startswith("tb_") and len(ops["token"]) > 40
        # The first token turns the token requirement on.
        assert (await c.get("/api/v1/status")).status_code == 401
        op_auth = {"authorization": f"Bearer {ops['token']}"}
        assert (await c.get("/api/v1/status", headers=op_auth)).status_code == 200
        # An operator cannot make tokens (or it could make itself an admin).
        r = await c.post("/api/v1/tokens", json={"name": "me", "role": "admin"}, headers=op_auth)
        assert r.status_code == 403

    path = tmp_path / "data" / TOKENS_FILE
    text = path.read_text()
    assert ops["token"] not in text and ops["token"][3:] not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    reloaded = TokenStore(path)
    record = reloaded.find(ops["token"])
    assert record is not None and (record.name, record.role) == ("ops", Role.OPERATOR)
    assert reloaded.find(ops["token"] + "x") is None

    # A new app on the same data directory (a restart) knows the token; an admin revokes it.
    admin = reloaded.create("root", Role.ADMIN)[1]
    app = create_app(engine, _node(tmp_path))
    async with _client(app) as c:
        admin_auth = {"authorization": f"Bearer {admin}", **JSON}
        listed = (await c.get("/api/v1/tokens", headers=admin_auth)).json()
        assert [(t["name"], t["role"]) for t in listed] == [("ops", "operator"), ("root", "admin")]
        assert all("token" not in t and "sha256" not in t for t in listed)
        assert (
            await c.request("DELETE", f"/api/v1/tokens/{ops['id']}", headers=admin_auth)
        ).status_code == 204
        r = await c.get("/api/v1/status", headers={"authorization": f"Bearer {ops['token']}"})
        assert r.status_code == 401 and "wrong bearer token" in r.json()["error"]
        assert (
            await c.request("DELETE", f"/api/v1/tokens/{ops['id']}", headers=admin_auth)
        ).status_code == 404
    assert TokenStore(path).find(ops["token"]) is None


async def test_the_configured_token_is_an_admin(engine: Engine, tmp_path: Path) -> None:
    app = create_app(engine, _node(tmp_path), token="s3cret")
    async with _client(app, authorization="Bearer s3cret") as c:
        r = await c.post("/api/v1/tokens", json={"name": "viewer", "role": "read-only"})
        assert r.status_code == 201
        viewer = {"authorization": f"Bearer {r.json()['token']}", **JSON}
        assert (await c.get("/api/v1/volumes", headers=viewer)).status_code == 200
        r = await c.request("DELETE", "/api/v1/volumes/vol0", headers=viewer)
        assert r.status_code == 403
        assert (await c.request("DELETE", "/api/v1/volumes/vol0", headers=JSON)).status_code == 204


# --- audit ---------------------------------------------------------------------------------------


async def test_every_state_changing_call_is_audited(engine: Engine, tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "data" / TOKENS_FILE)
    op = store.create("ci", Role.OPERATOR)
    app = create_app(engine, _node(tmp_path))
    auth = {"authorization": f"Bearer {op[1]}"}
    async with _client(app, **auth) as c:
        assert (await c.get("/api/v1/volumes")).status_code == 200  # reads are not audited
        assert (
            await c.post("/api/v1/volumes", json={"name": "v1", "pool": "default", "size": "8MiB"})
        ).status_code == 201
        assert (
            await c.post("/api/v1/volumes", json={"name": "v1", "pool": "default", "size": "8MiB"})
        ).status_code == 409
        assert (await c.request("DELETE", "/api/v1/volumes/v1", headers=JSON)).status_code == 403
        assert (await c.post("/api/v1/volumes/v1/grow", data={"size": "1G"})).status_code == 415
        assert (
            await c.post("/api/v1/rebuild", json={}, headers={"authorization": "Bearer nope"})
        ).status_code == 401
    entries = _audit(tmp_path)
    assert [(e["method"], e["path"], e["status"], e["result"], e["who"]) for e in entries] == [
        ("POST", "/api/v1/volumes", 201, "ok", "ci"),
        ("POST", "/api/v1/volumes", 409, "failed", "ci"),
        ("DELETE", "/api/v1/volumes/v1", 403, "refused", "ci"),
        ("POST", "/api/v1/volumes/v1/grow", 415, "refused", "ci"),
        ("POST", "/api/v1/rebuild", 401, "refused", "unauthenticated"),
    ]
    assert all(e["time"] > 0 and e["peer"] for e in entries)
    assert entries[0]["role"] == "operator" and entries[0]["token_id"] == op[0].id
    assert entries[2]["reason"].startswith("forbidden")
    assert stat.S_IMODE((tmp_path / "data" / AUDIT_FILE).stat().st_mode) == 0o600


async def test_a_bad_token_name_is_refused_in_one_sentence(engine: Engine, tmp_path: Path) -> None:
    app = create_app(engine, _node(tmp_path))
    async with _client(app, **JSON) as c:
        r = await c.post("/api/v1/tokens", json={"name": "ci bot", "role": "operator"})
        assert (r.status_code, r.json()) == (
            400,
            {
                "error": "invalid token name 'ci bot': token names are 1-64 characters of letters, digits"
                " and . _ @ -, starting with a letter or digit"
            },
        )
        assert (
            await c.post("/api/v1/tokens", json={"name": "ci@host-1", "role": "operator"})
        ).status_code == 201
