"""The access-list policy (nbd/access.py): who may open which volume, and how."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest

from thinblock.api.app import NodeInfo, create_app
from thinblock.cli import main
from thinblock.config import ConfigError, parse_config
from thinblock.engine import Engine, EngineOptions
from thinblock.nbd.access import AccessList, AccessRule, ClientIdentity, parse_client

APP = ClientIdentity("10.1.2.3", "CN=app-1,O=example")
OTHER_CERT = ClientIdentity("10.1.2.3", "CN=app-2,O=example")
PLAIN = ClientIdentity("10.1.2.3")
FAR = ClientIdentity("192.0.2.9")
LOCAL = ClientIdentity(None)


def test_volumes_without_rules_are_open() -> None:
    acl = AccessList([AccessRule("db", "CN=app-1,O=example", "rw")])
    assert acl.mode_for("scratch", FAR) == "rw"
    assert AccessList().mode_for("db", FAR) == "rw"


def test_rules_restrict_and_the_most_permissive_match_wins() -> None:
    acl = AccessList(
        [
            AccessRule("db", "CN=app-1, O=example", "rw"),
            AccessRule("db", "10.0.0.0/8", "ro"),
            AccessRule("*", "unix", "rw"),
        ]
    )
    assert acl.mode_for("db", APP) == "rw"  # subject (spaces after commas do not matter)
    assert acl.mode_for("db", OTHER_CERT) == "ro"  # only the network matches
    assert acl.mode_for("db", PLAIN) == "ro"
    assert acl.mode_for("db", FAR) is None
    assert acl.mode_for("db", LOCAL) == "rw"
    # "*" names every volume: now scratch is restricted to the Unix socket.
    assert acl.mode_for("scratch", FAR) is None and acl.mode_for("scratch", LOCAL) == "rw"


def test_a_subject_never_matches_without_a_verified_certificate() -> None:
    acl = AccessList([AccessRule("db", "CN=app-1,O=example", "rw")])
    assert acl.mode_for("db", ClientIdentity("10.1.2.3", None)) is None
    assert acl.mode_for("db", ClientIdentity(None, None)) is None


@pytest.mark.parametrize("text", ["*", "unix", "CN=x", "10.0.0.0/8", "::1", "192.0.2.7"])
def test_client_forms(text: str) -> None:
    assert parse_client(text) == text


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="not a client"):
        parse_client("app-1")
    with pytest.raises(ValueError, match="ro or rw"):
        AccessRule("db", "*", "rwx")  # type: ignore[arg-type]


def test_config_tables() -> None:
    cfg = parse_config(
        {
            "nbd": {
                "access": [
                    {"volume": "db", "clients": ["CN=app-1,O=example", "10.0.0.0/8"], "mode": "rw"},
                    {"volume": "*", "clients": ["unix"], "mode": "ro"},
                ]
            }
        }
    )
    assert cfg.nbd_access == (
        AccessRule("db", "CN=app-1,O=example", "rw"),
        AccessRule("db", "10.0.0.0/8", "rw"),
        AccessRule("*", "unix", "ro"),
    )
    for bad, message in (
        ({"volume": "db", "clients": ["app-1"]}, "not a client"),
        ({"volume": "db", "clients": []}, "non-empty list"),
        ({"volume": "db", "clients": ["*"], "mode": "w"}, "mode: expected one of ro, rw"),
        ({"clients": ["*"]}, "give a volume name"),
        ({"volume": "db", "clients": ["*"], "who": 1}, "unknown key who"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config({"nbd": {"access": [bad]}})


async def test_api_and_cli_show_a_volumes_access(tmp_path: Path) -> None:
    engine = await Engine.open(tmp_path / "data", EngineOptions(destage_delay=0.0))
    try:
        await engine.add_pd(tmp_path / "data" / "pd0.img", 64 * 1024 * 1024, 4 * 1024 * 1024)
        await engine.add_pd(tmp_path / "data" / "pd1.img", 64 * 1024 * 1024, 4 * 1024 * 1024)
        await engine.create_pool("p", raid=1, growth_increment=8 * 1024 * 1024)
        for name in ("db", "scratch"):
            await engine.create_vv(name, pool="p", size=8 * 1024 * 1024)
        node = NodeInfo(nbd_access=(AccessRule("db", "CN=app-1", "rw"), AccessRule("db", "10.0.0.0/8", "ro")))
        app = create_app(engine, node)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            db = (await c.get("/api/v1/volumes/db/access")).json()
            scratch = (await c.get("/api/v1/volumes/scratch/access")).json()
            assert (await c.get("/api/v1/volumes/nope/access")).status_code == 404
        assert db == {
            "volume": "db",
            "restricted": True,
            "rules": [
                {"volume": "db", "client": "CN=app-1", "mode": "rw"},
                {"volume": "db", "client": "10.0.0.0/8", "mode": "ro"},
            ],
        }
        assert scratch == {"volume": "scratch", "restricted": False, "rules": []}
        out = io.StringIO()
        code = main(
            ["vv", "access", "db"],
            transport=httpx.MockTransport(lambda r: httpx.Response(200, json=db)),
            stdout=out,
        )
        assert code == 0 and "CN=app-1" in out.getvalue() and "10.0.0.0/8" in out.getvalue()
    finally:
        await engine.close()
