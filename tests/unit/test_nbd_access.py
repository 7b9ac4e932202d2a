"""The access-list policy (nbd/access.py): who may open which volume, and how."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from thinblock.api.app import NodeInfo, create_app
from thinblock.cli import main
from thinblock.config import ConfigError, parse_config
from thinblock.engine import Engine, EngineOptions
from thinblock.nbd.access import (
    ACCESS_FILE,
    AccessList,
    AccessRule,
    AccessStore,
    ClientIdentity,
    parse_client,
)

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


def test_a_deny_beats_every_allow_and_restricts_nobody_else() -> None:
    acl = AccessList([AccessRule("db", "10.0.0.0/8", "rw"), AccessRule("db", "10.1.2.3", "deny")])
    assert acl.mode_for("db", PLAIN) is None  # allowed by the network, denied by its address
    assert acl.mode_for("db", ClientIdentity("10.9.9.9")) == "rw"
    assert acl.mode_for("db", FAR) is None  # not allowed: the volume is restricted
    only_deny = AccessList([AccessRule("db", "192.0.2.0/24", "deny")])
    assert only_deny.mode_for("db", FAR) is None
    assert only_deny.mode_for("db", PLAIN) == "rw"  # a deny alone leaves everyone else in
    everyone_but = AccessList([AccessRule("*", "*", "rw"), AccessRule("db", "unix", "deny")])
    assert everyone_but.mode_for("db", LOCAL) is None and everyone_but.mode_for("other", LOCAL) == "rw"


def test_psk_identities_match_only_what_the_client_proved() -> None:
    acl = AccessList([AccessRule("db", "psk:backup", "ro")])
    assert acl.mode_for("db", ClientIdentity("10.1.2.3", psk_identity="backup")) == "ro"
    assert acl.mode_for("db", ClientIdentity("10.1.2.3", psk_identity="other")) is None
    # A certificate whose subject reads like the rule proves nothing about a PSK identity.
    assert acl.mode_for("db", ClientIdentity("10.1.2.3", tls_subject="psk:backup")) is None
    with pytest.raises(ValueError, match="needs an identity"):
        parse_client("psk:")


def test_the_store_keeps_api_rules_beside_the_configs(tmp_path: Path) -> None:
    path = tmp_path / ACCESS_FILE
    fixed = [AccessRule("db", "CN=app-1,O=example", "rw")]
    store = AccessStore(path, fixed=fixed)
    assert store.mode_for("db", PLAIN) is None
    first = store.put("db", " 10.0.0.0/8 ", "ro")
    assert first.client == "10.0.0.0/8" and store.mode_for("db", PLAIN) == "ro"
    second = store.put("db", "10.0.0.0/8", "rw")  # the same client: replaced, a new id
    assert second.id > first.id and [r.id for r in store.stored()] == [second.id]
    store.put("db", "10.1.2.3", "deny")
    store.put("scratch", "unix", "rw")
    assert path.stat().st_mode & 0o777 == 0o600
    again = AccessStore(path, fixed=fixed)  # what a restart reads
    assert [(r.volume, r.client, r.mode) for r in again.stored()] == [
        ("db", "10.0.0.0/8", "rw"),
        ("db", "10.1.2.3", "deny"),
        ("scratch", "unix", "rw"),
    ]
    assert again.mode_for("db", PLAIN) is None and again.mode_for("db", ClientIdentity("10.2.0.1")) == "rw"
    assert [(r.client, s is None) for r, s in again.applying_to("db")] == [
        ("CN=app-1,O=example", True),
        ("10.0.0.0/8", False),
        ("10.1.2.3", False),
    ]
    assert again.remove("scratch", second.id) is None  # the id of another volume's rule
    assert again.remove("db", second.id) is not None
    assert again.mode_for("db", ClientIdentity("10.2.0.1")) is None
    assert again.forget_volume("db") == 1 and again.forget_volume("db") == 0
    third = AccessStore(path)
    assert [r.volume for r in third.stored()] == ["scratch"]
    assert third.put("x", "unix", "rw").id > second.id  # ids are never given twice


def test_a_rule_that_cannot_be_saved_is_not_in_force(tmp_path: Path) -> None:
    store = AccessStore(tmp_path / "gone" / ACCESS_FILE)  # its directory does not exist
    with pytest.raises(OSError):
        store.put("db", "10.0.0.0/8", "deny")
    assert store.stored() == [] and store.mode_for("db", PLAIN) == "rw"


def test_an_unreadable_rule_file_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / ACCESS_FILE
    path.write_text('{"rules": [{"id": 1, "volume": "db", "client": "app-1", "mode": "rw", "created": 0}]}')
    with pytest.raises(RuntimeError, match="cannot read the NBD access rules"):
        AccessStore(path)
    path.write_text("{not json")
    with pytest.raises(RuntimeError, match="cannot read the NBD access rules"):
        AccessStore(path)


def test_a_subject_never_matches_without_a_verified_certificate() -> None:
    acl = AccessList([AccessRule("db", "CN=app-1,O=example", "rw")])
    assert acl.mode_for("db", ClientIdentity("10.1.2.3", None)) is None
    assert acl.mode_for("db", ClientIdentity(None, None)) is None


@pytest.mark.parametrize(
    "text", ["*", "unix", "CN=x", "10.0.0.0/8", "::1", "192.0.2.7", "psk:backup", "psk:a=b"]
)
def test_client_forms(text: str) -> None:
    assert parse_client(text) == text


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="not a client"):
        parse_client("app-1")
    with pytest.raises(ValueError, match="ro, rw or deny"):
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


async def test_api_and_cli_show_and_change_a_volumes_access(tmp_path: Path) -> None:
    engine = await Engine.open(tmp_path / "data", EngineOptions(destage_delay=0.0))
    try:
        await engine.add_pd(tmp_path / "data" / "pd0.img", 64 * 1024 * 1024, 4 * 1024 * 1024)
        await engine.add_pd(tmp_path / "data" / "pd1.img", 64 * 1024 * 1024, 4 * 1024 * 1024)
        await engine.create_pool("p", raid=1, growth_increment=8 * 1024 * 1024)
        for name in ("db", "scratch"):
            await engine.create_vv(name, pool="p", size=8 * 1024 * 1024)
        store = AccessStore(
            tmp_path / ACCESS_FILE,
            fixed=(AccessRule("db", "CN=app-1", "rw"), AccessRule("db", "10.0.0.0/8", "ro")),
        )
        app = create_app(engine, NodeInfo(nbd_access=store))
        json_headers = {"content-type": "application/json"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            db = (await c.get("/api/v1/volumes/db/access")).json()
            scratch = (await c.get("/api/v1/volumes/scratch/access")).json()
            assert (await c.get("/api/v1/volumes/nope/access")).status_code == 404
            assert db == {
                "volume": "db",
                "restricted": True,
                "rules": [
                    {"volume": "db", "client": "CN=app-1", "mode": "rw", "source": "config", "id": None},
                    {"volume": "db", "client": "10.0.0.0/8", "mode": "ro", "source": "config", "id": None},
                ],
            }
            assert scratch == {"volume": "scratch", "restricted": False, "rules": []}

            r = await c.post("/api/v1/volumes/scratch/access", json={"client": "psk:backup", "mode": "ro"})
            assert r.status_code == 201, r.text
            assert r.json()["restricted"] and r.json()["rules"][0]["source"] == "api"
            rule_id = r.json()["rules"][0]["id"]
            shown = (await c.get("/api/v1/volumes/scratch")).json()["access"]  # vv show --json
            assert shown == r.json()
            assert store.mode_for("scratch", ClientIdentity("10.1.2.3", psk_identity="backup")) == "ro"
            assert store.mode_for("scratch", PLAIN) is None
            bad = await c.post("/api/v1/volumes/scratch/access", json={"client": "app-1", "mode": "ro"})
            assert bad.status_code == 400 and "not a client" in bad.json()["error"]
            bad = await c.post("/api/v1/volumes/scratch/access", json={"client": "unix", "mode": "rwx"})
            assert bad.status_code in (400, 422)
            assert (await c.post("/api/v1/volumes/nope/access", json={"client": "unix"})).status_code == 404
            assert (
                await c.delete(f"/api/v1/volumes/db/access/{rule_id}", headers=json_headers)
            ).status_code == 404
            assert (
                await c.delete(f"/api/v1/volumes/scratch/access/{rule_id}", headers=json_headers)
            ).status_code == 204
            assert store.mode_for("scratch", PLAIN) == "rw"

            # A deleted volume's rules go with it: a new volume of that name inherits no grant.
            await c.post("/api/v1/volumes/scratch/access", json={"client": "10.1.2.3", "mode": "rw"})
            assert (await c.delete("/api/v1/volumes/scratch", headers=json_headers)).status_code == 204
            assert store.stored("scratch") == []

            # The CLI (synchronous, in a thread), against the same app through this loop.
            loop = asyncio.get_running_loop()

            def forward(request: httpx.Request) -> httpx.Response:
                async def call() -> httpx.Response:
                    answer = await c.request(
                        request.method,
                        request.url.raw_path.decode(),
                        headers=request.headers,
                        content=request.content,
                    )
                    return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

                return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=30)

            def cli(*argv: str) -> tuple[int, str]:
                out, err = io.StringIO(), io.StringIO()
                code = main(list(argv), transport=httpx.MockTransport(forward), stdout=out, stderr=err)
                return code, out.getvalue() + err.getvalue()

            await _cli_checks(cli, store)
    finally:
        await engine.close()


async def _cli_checks(cli: Callable[..., tuple[int, str]], store: AccessStore) -> None:
    async def run(*argv: str) -> tuple[int, str]:
        return await asyncio.to_thread(cli, *argv)

    code, text = await run("vv", "access", "db")
    assert code == 0 and "CN=app-1" in text and "config" in text, text
    code, text = await run("vv", "access", "db", "allow", "192.0.2.0/24", "--read-only")
    assert code == 0 and "192.0.2.0/24" in text and "api #" in text, text
    assert store.mode_for("db", FAR) == "ro"
    code, text = await run("vv", "access", "db", "deny", "192.0.2.9")
    assert code == 0 and store.mode_for("db", FAR) is None
    code, text = await run("--json", "vv", "show", "db")
    assert code == 0 and '"192.0.2.9"' in text and '"deny"' in text, text
    code, text = await run("vv", "show", "db")
    assert code == 0 and "192.0.2.9 deny" in text, text
    code, text = await run("vv", "access", "db", "remove", "192.0.2.9")
    assert code == 0 and store.mode_for("db", FAR) == "ro"
    code, text = await run("vv", "access", "db", "remove", "CN=app-1")
    assert code == 1 and "configuration file" in text, text
    code, text = await run("vv", "access", "db", "allow")
    assert code == 2 and "needs a client" in text, text


async def test_api_rules_follow_a_renamed_volume(tmp_path: Path) -> None:
    """A rename moves the volume's API rules to its new name: the volume is never unrestricted
    under either name, and a new volume taking the old name inherits nothing."""
    engine = await Engine.open(tmp_path / "data", EngineOptions(destage_delay=0.0))
    try:
        await engine.add_pd(tmp_path / "data" / "pd0.img", 64 * 1024 * 1024, 4 * 1024 * 1024)
        await engine.add_pd(tmp_path / "data" / "pd1.img", 64 * 1024 * 1024, 4 * 1024 * 1024)
        await engine.create_pool("p", raid=1, growth_increment=8 * 1024 * 1024)
        await engine.create_vv("a", pool="p", size=8 * 1024 * 1024)
        store = AccessStore(tmp_path / ACCESS_FILE)
        app = create_app(engine, NodeInfo(nbd_access=store))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/api/v1/volumes/a/access", json={"client": "10.0.0.0/8", "mode": "ro"})
            assert r.status_code == 201, r.text
            r = await c.post("/api/v1/volumes/a/rename", json={"name": "b"})
            assert r.status_code == 200, r.text
            assert [(x["client"], x["mode"]) for x in r.json()["access"]["rules"]] == [("10.0.0.0/8", "ro")]
            assert store.stored("a") == [] and store.mode_for("b", FAR) is None
            assert store.mode_for("b", PLAIN) == "ro"
            await c.post("/api/v1/volumes", json={"name": "a", "pool": "p", "size": 8 * 1024 * 1024})
            assert (await c.get("/api/v1/volumes/a/access")).json()["rules"] == []
            # A rename that fails leaves the rules where they were.
            r = await c.post("/api/v1/volumes/b/rename", json={"name": "a"})
            assert r.status_code == 409, r.text
            assert store.stored("a") == [] and [x.client for x in store.stored("b")] == ["10.0.0.0/8"]
    finally:
        await engine.close()
