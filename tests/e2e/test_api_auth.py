"""Token auth: configured as it must be off loopback, every endpoint refuses a request without
the bearer token (401) and changes nothing.

The daemon is bound on 127.0.0.1 (the team's rule: loopback only) with ``api.require_token``,
the same check the daemon applies when ``api.listen`` is not a loopback address; that it
demands a token off loopback (and refuses to start without one) is tested in test_daemon.py
and tests/unit/test_config.py.
"""

from __future__ import annotations

import json
import re
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.certs import make_pki
from tests.support.daemon import SMALL_CONFIG, Daemon, running_daemon, start_daemon

from .client_tools import qemu_io

pytestmark = pytest.mark.e2e

TOKEN = "correct-horse-battery-staple"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    # (Also the daemon without latency histograms: NBD volumes straight from the engine.)
    config = (
        f'[api]\nrequire_token = true\ntoken = "{TOKEN}"\n[metrics]\nlatency_histograms = false\n'
        + SMALL_CONFIG
    )
    with running_daemon(tmp_path, config=config, token=TOKEN, clean_stop=True) as d:
        yield d


def _state(client: httpx.Client) -> dict[str, Any]:
    """What the refused requests must leave unchanged: every object, less its forecast (the
    forecast's measuring window moves with the clock, so two reads seconds apart differ)."""

    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "forecast"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return {path: strip(client.get(f"/api/v1/{path}").json()) for path in ("pds", "pools", "volumes", "lds")}


def test_every_endpoint_refuses_without_the_token(daemon: Daemon) -> None:
    with daemon.http() as authorised:
        schema = authorised.get("/api/v1/openapi.json").json()
        before = _state(authorised)
    operations = [
        (method.upper(), re.sub(r"\{[^}]+\}", "1", path))
        for path, item in schema["paths"].items()
        for method in item
    ]
    assert len(operations) >= 25  # the whole API, not a sample
    operations += [("GET", "/metrics"), ("GET", "/nope"), ("POST", "/"), ("DELETE", "/static/dashboard.js")]
    bodies = {"POST": {"name": "x", "pool": "default", "size": "1G", "raid": 1, "path": "x.img"}, "PATCH": {}}
    with daemon.http(token="") as anonymous, daemon.http(token="wrong") as wrong:
        for method, path in operations:
            for client, reason in ((anonymous, "missing"), (wrong, "wrong")):
                r = client.request(method, path, json=bodies.get(method))
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json() == {"error": f"unauthorized: {reason} bearer token"}
        # Named objects too, not just id 1: deleting the default volume is refused.
        assert anonymous.delete("/api/v1/volumes/vol0").status_code == 401
        assert anonymous.delete("/api/v1/pools/default").status_code == 401
    with daemon.http() as authorised:
        after = _state(authorised)
        assert after == before
        assert authorised.get("/metrics").status_code == 200
        assert authorised.get("/api/v1/status").json()["volumes"] == 1
    # Public: the dashboard page and /docs with their assets, and the OpenAPI document (a browser
    # cannot send a bearer token when it opens a page; they hold no data: the page logs in).
    with daemon.http(token="") as anonymous:
        for path in (
            "/",
            "/static/dashboard.js",
            "/docs",
            "/docs/assets/swagger-ui-bundle.js",
            "/api/v1/openapi.json",
        ):
            assert anonymous.get(path).status_code == 200, path
        assert "vol0" not in anonymous.get("/").text


def test_cli_with_and_without_the_token(daemon: Daemon) -> None:
    refused = daemon.cli("vv", "list", token="")
    assert refused.code == 1
    assert refused.err == "error: unauthorized: missing bearer token (give --token or set THINBLOCK_TOKEN)\n"
    assert [v["name"] for v in daemon.cli_json("vv", "list")] == ["vol0"]
    # NBD is not the API: hosts reach volumes without the token.
    qemu_io(daemon.uri("vol0"), "write -P 7 0 4k", "read -P 7 0 4k")
    with daemon.http() as client:
        metrics = client.get("/metrics").text
    assert 'thinblock_vv_allocated_bytes{pool="default",vv="vol0"} 1.048576e+06' in metrics
    assert "thinblock_vv_request_seconds" not in metrics


def test_https_api_tokens_with_roles_from_the_cli(tmp_path: Path) -> None:
    """TLS on the API (certificate and key from the config), tokens created and revoked with the
    CLI, the CLI reading a token file, roles enforced, every change in the audit log."""
    pki = make_pki(tmp_path / "pki")
    config = (
        f'[api]\ntoken = "{TOKEN}"\ntls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n'
        + SMALL_CONFIG
    )
    d = start_daemon(tmp_path, config=config, token=TOKEN)
    try:
        assert d.api_url.startswith("https://127.0.0.1:")
        tls = ("--cacert", str(pki.ca_cert))
        # Without the CA the certificate is not trusted: refused, no token sent in clear.
        untrusted = d.cli("vv", "list")
        assert untrusted.code == 3 and "certificate" in untrusted.err.lower(), untrusted.err
        viewer_file = tmp_path / "viewer.token"
        created = d.cli(
            *tls, "token", "create", "viewer", "--role", "read-only", "--output", str(viewer_file)
        )
        assert created.code == 0, created.err
        assert stat.S_IMODE(viewer_file.stat().st_mode) == 0o600
        operator = d.cli(*tls, "--json", "token", "create", "ops", "--role", "operator").json()
        assert operator["role"] == "operator" and operator["token"].startswith("tb_")

        as_viewer = (*tls, "--token-file", str(viewer_file))
        assert [v["name"] for v in d.cli(*as_viewer, "--json", "vv", "list", token="").json()] == ["vol0"]
        refused = d.cli(*as_viewer, "vv", "delete", "vol0", "--yes", token="")
        assert refused.code == 1 and "needs the admin role" in refused.err, refused.err
        refused = d.cli(*as_viewer, "vv", "create", "v2", "--pool", "default", "--size", "8MiB", token="")
        assert refused.code == 1 and "needs the operator role" in refused.err
        made = d.cli(
            *tls, "vv", "create", "v2", "--pool", "default", "--size", "8MiB", token=operator["token"]
        )
        assert made.code == 0, made.err
        listed = d.cli(*tls, "--json", "token", "list").json()
        assert [(t["name"], t["role"]) for t in listed] == [("viewer", "read-only"), ("ops", "operator")]
        assert d.cli(*tls, "token", "revoke", str(operator["id"])).code == 0
        gone = d.cli(*tls, "vv", "list", token=operator["token"])
        assert gone.code == 1 and "wrong bearer token" in gone.err

        with httpx.Client(
            base_url=d.api_url, verify=ssl.create_default_context(cafile=pki.ca_cert), timeout=30
        ) as client:
            form = client.post(
                "/api/v1/pds/1/fail",
                content=b"x=1",
                headers={
                    "authorization": f"Bearer {TOKEN}",
                    "content-type": "application/x-www-form-urlencoded",
                },
            )
            assert form.status_code == 415
            evil = client.post(
                "/api/v1/pds/1/fail",
                json={},
                headers={"authorization": f"Bearer {TOKEN}", "origin": "http://evil"},
            )
            assert evil.status_code == 403
            wrong_host = client.get(
                "/api/v1/status", headers={"authorization": f"Bearer {TOKEN}", "host": "evil:1"}
            )
            assert wrong_host.status_code == 400
    finally:
        assert d.stop() == 0, d.log_tail()
    audit = [json.loads(line) for line in (d.data_dir / "audit.log").read_text().splitlines()]
    summary = [(e["who"], e["method"], e["route"], e["result"]) for e in audit]
    assert summary == [
        ("config-token", "POST", "/api/v1/tokens", "ok"),
        ("config-token", "POST", "/api/v1/tokens", "ok"),
        ("viewer", "DELETE", "/api/v1/volumes/{name}", "refused"),
        ("viewer", "POST", "/api/v1/volumes", "refused"),
        ("ops", "POST", "/api/v1/volumes", "ok"),
        ("config-token", "DELETE", "/api/v1/tokens/{token_id}", "ok"),
        ("config-token", "POST", "/api/v1/pds/{pd_id}/fail", "refused"),
        ("config-token", "POST", "/api/v1/pds/{pd_id}/fail", "refused"),
    ]
    tokens_file = (d.data_dir / "api-tokens.json").read_text()
    assert operator["token"] not in tokens_file and viewer_file.read_text().strip() not in tokens_file
