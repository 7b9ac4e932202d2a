"""Token auth: configured as it must be off loopback, every endpoint refuses a request without
the bearer token (401) and changes nothing.

The daemon is bound on 127.0.0.1 (the team's rule: loopback only) with ``api.require_token``,
the same check the daemon applies when ``api.listen`` is not a loopback address; that it
demands a token off loopback (and refuses to start without one) is tested in test_daemon.py
and tests/unit/test_config.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import SMALL_CONFIG, Daemon, start_daemon

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
    d = start_daemon(tmp_path, config=config, token=TOKEN)
    try:
        yield d
    finally:
        assert d.stop() == 0


def test_every_endpoint_refuses_without_the_token(daemon: Daemon) -> None:
    with daemon.http() as authorised:
        schema = authorised.get("/api/v1/openapi.json").json()
        before = {
            path: authorised.get(f"/api/v1/{path}").json() for path in ("pds", "pools", "volumes", "lds")
        }
    operations = [
        (method.upper(), re.sub(r"\{[^}]+\}", "1", path))
        for path, item in schema["paths"].items()
        for method in item
    ]
    assert len(operations) >= 25  # the whole API, not a sample
    operations += [("GET", "/api/v1/openapi.json"), ("GET", "/docs"), ("GET", "/metrics"), ("GET", "/nope")]
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
        after = {
            path: authorised.get(f"/api/v1/{path}").json() for path in ("pds", "pools", "volumes", "lds")
        }
        assert after == before
        assert authorised.get("/metrics").status_code == 200
        assert authorised.get("/api/v1/status").json()["volumes"] == 1


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
