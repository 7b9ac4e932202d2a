"""The REST API in process, over the real engine in a temporary data directory.

The app runs in the test's event loop (httpx's ASGI transport), as it runs in the daemon's:
engine calls on the loop thread.  What the daemon adds around it (uvicorn, signals, NBD) is
tested end to end in tests/e2e.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from thinblock.api.app import NodeInfo, create_app
from thinblock.engine import Engine, EngineOptions
from thinblock.errors import InvalidArgument, OutOfSpace
from thinblock.units import GiB, MiB

CHUNKLET = 4 * MiB
# State-changing requests must say JSON (the cross-site guard), also deletes and body-less actions.
JSON = {"content-type": "application/json"}
PD_SIZE = 64 * MiB


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    eng = await Engine.open(tmp_path / "data", EngineOptions(destage_delay=0.0))
    yield eng
    await eng.close()


def _node(tmp_path: Path) -> NodeInfo:
    return NodeInfo(
        name="node-a",
        nbd_uri="nbd://127.0.0.1:10809",
        default_export="vol0",
        data_dir=tmp_path / "data",
        default_chunklet_size=CHUNKLET,
    )


@pytest.fixture
async def client(engine: Engine, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(engine, _node(tmp_path))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://thinblock/api/v1"
    ) as c:
        yield c


async def _setup(client: httpx.AsyncClient, *, pds: int = 4, raid: int = 1, **pool: Any) -> None:
    for i in range(pds):
        r = await client.post("/pds", json={"path": f"pd{i}.img", "size": "64MiB"})
        assert r.status_code == 201, r.text
    body = {"name": "default", "raid": raid, "growth_increment": "8MiB", **pool}
    r = await client.post("/pools", json=body)
    assert r.status_code == 201, r.text


def _ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return r.json() if r.content else None


def _err(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"], str) and body["error"]
    return str(body["error"])


# --- physical disks ------------------------------------------------------------------------------


async def test_pds_add_list_show_fail_remove(client: httpx.AsyncClient, tmp_path: Path) -> None:
    pd = _ok(await client.post("/pds", json={"path": "pd0.img", "size": "64MiB"}), 201)
    # Relative paths are inside the data directory; the node's default chunklet size applies.
    assert pd["path"] == str(tmp_path / "data" / "pd0.img")
    assert (pd["size"], pd["chunklet_size"], pd["chunklets"]) == (PD_SIZE, CHUNKLET, 16)
    assert (pd["chunklets_used"], pd["chunklets_free"], pd["health"]) == (0, 16, "normal")
    other = _ok(
        await client.post(
            "/pds", json={"path": str(tmp_path / "x.img"), "size": 32 * MiB, "chunklet_size": "8MiB"}
        ),
        201,
    )
    assert (other["chunklet_size"], other["chunklets"]) == (8 * MiB, 4)

    assert _ok(await client.get("/pds")) == [pd, other]
    assert _ok(await client.get(f"/pds/{pd['id']}")) == pd
    assert "not found" in _err(await client.get("/pds/999"), 404)
    assert "already" in _err(await client.post("/pds", json={"path": "pd0.img", "size": "64MiB"}), 409)

    failed = _ok(await client.post(f"/pds/{other['id']}/fail", json={}))
    assert failed["health"] == "failed"
    assert _ok(await client.delete(f"/pds/{other['id']}", headers=JSON), 204) is None
    assert [p["id"] for p in _ok(await client.get("/pds"))] == [pd["id"]]


async def test_pd_in_use_cannot_be_removed(client: httpx.AsyncClient, engine: Engine) -> None:
    await _setup(client)
    _ok(await client.post("/volumes", json={"name": "v", "pool": "default", "size": "1GiB"}), 201)
    await engine.volume("v").write(0, b"\x01" * 4096)
    used = [p for p in _ok(await client.get("/pds")) if p["chunklets_used"]]
    assert used
    assert "chunklet" in _err(await client.delete(f"/pds/{used[0]['id']}", headers=JSON), 409)
    assert len(_ok(await client.get("/pds"))) == 4


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"path": ""},
        {"path": "x.img", "size": "lots"},
        {"path": "x.img", "size": -1},
        {"path": "x.img", "size": True},
        {"path": "x.img", "size": 4096.5},
        {"path": "x.img", "size": 2**64},
        {"path": "x.img", "size": "9999999999PiB"},
        {"path": "x.img", "size": "64MiB", "colour": "red"},
        {"path": "/nonexistent-dir/sub/x.img", "size": "64MiB"},
        {"path": "pd\x00.img", "size": "64MiB"},
        {"path": "/dev/null"},
        {"path": "/"},
    ],
)
async def test_pd_bad_input_is_400_and_changes_nothing(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    _err(await client.post("/pds", json=body), 400)
    assert _ok(await client.get("/pds")) == []


async def test_pd_add_never_fails_with_a_server_error(engine: Engine, tmp_path: Path) -> None:
    """The schemathesis fuzz (tests/e2e) leaves POST /pds out, lest it create files anywhere:
    here every combination of awkward paths and sizes, inside the test's directory."""
    data = tmp_path / "data"
    (data / "a-directory").mkdir()
    (data / "empty.img").touch()
    (data / "odd.img").write_bytes(b"x" * 1000)
    paths = [
        "a-directory",
        "empty.img",
        "odd.img",
        "new-{}.img",
        "missing/dir/x.img",
        "/dev/null",
        "/proc/self",
    ]
    sizes = [None, 0, 1, 512, MiB + 1, 64 * MiB, 2**62, "1.5K"]
    chunklets = [None, 0, 3 * MiB, MiB, 64 * MiB, 2**40]
    app = create_app(engine, _node(tmp_path))
    statuses: dict[int, int] = {}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://thinblock/api/v1"
    ) as c:
        for n, (path, size, chunklet) in enumerate(itertools.product(paths, sizes, chunklets)):
            body: dict[str, Any] = {"path": path.format(n)}
            if size is not None:
                body["size"] = size
            if chunklet is not None:
                body["chunklet_size"] = chunklet
            r = await c.post("/pds", json=body)
            assert r.status_code in (201, 400, 409), (body, r.status_code, r.text)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert statuses.get(201) and statuses.get(400)  # both outcomes were met
        assert len(_ok(await c.get("/pds"))) == statuses[201]


# --- pools ---------------------------------------------------------------------------------------


async def test_pool_lifecycle(client: httpx.AsyncClient, engine: Engine) -> None:
    await _setup(client, pds=4, growth_warning="16MiB")
    pool = _ok(await client.get("/pools/default"))
    expected_keys = {
        "name", "raid", "set_size", "region_size", "capacity", "used", "free",
        "growth_increment", "growth_warning", "growth_limit", "lds",
    }  # fmt: skip
    assert expected_keys <= set(pool)
    assert (pool["raid"], pool["set_size"], pool["region_size"]) == (1, 2, MiB)
    assert (pool["growth_increment"], pool["growth_warning"], pool["growth_limit"]) == (
        8 * MiB,
        16 * MiB,
        None,
    )
    assert (pool["capacity"], pool["used"], pool["lds"], pool["state"]) == (0, 0, 0, "healthy")
    assert _ok(await client.get("/pools")) == [pool]

    # PATCH: only the fields given change; null removes.
    changed = _ok(await client.patch("/pools/default", json={"growth_limit": "64MiB"}))
    assert (changed["growth_limit"], changed["growth_warning"]) == (64 * MiB, 16 * MiB)
    changed = _ok(await client.patch("/pools/default", json={"growth_warning": None}))
    assert (changed["growth_limit"], changed["growth_warning"]) == (64 * MiB, None)
    assert "growth_increment" in _err(
        await client.patch("/pools/default", json={"growth_increment": None}), 400
    )

    # The pool grows when a volume writes, and compaction gives back what is wholly free.
    _ok(await client.post("/volumes", json={"name": "v", "pool": "default", "size": "1GiB"}), 201)
    await engine.volume("v").write(0, b"\x01" * 4096)
    grown = _ok(await client.get("/pools/default"))
    assert (grown["capacity"], grown["used"], grown["lds"], grown["volumes"]) == (8 * MiB, MiB, 1, 1)
    assert "volume" in _err(await client.delete("/pools/default", headers=JSON), 409)
    _ok(await client.delete("/volumes/v", headers=JSON), 204)
    compacted = _ok(await client.post("/pools/default/compact", json={}))
    assert compacted["released_lds"] == 1
    assert (compacted["pool"]["capacity"], compacted["pool"]["lds"]) == (0, 0)
    _ok(await client.delete("/pools/default", headers=JSON), 204)
    assert "not found" in _err(await client.get("/pools/default"), 404)


@pytest.mark.parametrize(
    "body",
    [
        {"name": "p", "raid": 3},
        {"name": "p", "raid": "1"},
        {"name": "p"},
        {"raid": 1},
        {"name": "", "raid": 1},
        {"name": "p", "raid": 1, "region_size": "3MiB"},  # not a power of two: the engine says so
        {"name": "p", "raid": 1, "set_size": 0},
        {"name": "p", "raid": 1, "set_size": 9},  # more PDs than there are
        {"name": "p", "raid": 1, "growth_limt": "1G"},
        {"name": "p q", "raid": 1},
    ],
)
async def test_pool_bad_input_is_400(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    await _setup(client)
    before = _ok(await client.get("/pools"))
    _err(await client.post("/pools", json=body), 400)
    assert _ok(await client.get("/pools")) == before


async def test_duplicate_pool_is_409(client: httpx.AsyncClient) -> None:
    await _setup(client)
    assert "already exists" in _err(await client.post("/pools", json={"name": "default", "raid": 0}), 409)


# --- volumes -------------------------------------------------------------------------------------


async def test_volume_lifecycle(client: httpx.AsyncClient, engine: Engine) -> None:
    await _setup(client)
    body = {
        "name": "vol1",
        "pool": "default",
        "size": "1GiB",
        "alloc_warning": "50%",
        "alloc_limit": "768MiB",
    }
    vv = _ok(await client.post("/volumes", json=body), 201)
    assert (vv["name"], vv["pool"], vv["size"], vv["region_size"]) == ("vol1", "default", GiB, MiB)
    assert (vv["allocated"], vv["regions_allocated"], vv["cache_mode"]) == (0, 0, "writethrough")
    assert (vv["alloc_warning"], vv["alloc_warning_spec"]) == (GiB // 2, "50%")
    assert (vv["alloc_limit"], vv["alloc_limit_spec"]) == (768 * MiB, "768 MiB")
    assert vv["export_uri"] == "nbd://127.0.0.1:10809/vol1"
    assert _ok(await client.get("/volumes")) == [vv]
    assert _ok(await client.get("/volumes/vol1")) == vv

    await engine.volume("vol1").write(0, b"\xab" * (2 * MiB + 1))  # three regions
    shown = _ok(await client.get("/volumes/vol1"))
    assert (shown["allocated"], shown["regions_allocated"]) == (3 * MiB, 3)
    stats = _ok(await client.get("/volumes/vol1/stats"))
    assert (stats["writes"], stats["write_bytes"]) == (1, 2 * MiB + 1)

    grown = _ok(
        await client.post("/volumes/vol1/grow", json={"size": float(2 * GiB)})
    )  # JSON has one number type
    assert grown["size"] == 2 * GiB and grown["alloc_warning"] == GiB  # the percentage follows
    assert "shrink" in _err(await client.post("/volumes/vol1/grow", json={"size": "1GiB"}), 400)

    changed = _ok(await client.patch("/volumes/vol1", json={"cache_mode": "writeback", "alloc_limit": None}))
    assert (changed["cache_mode"], changed["alloc_limit"], changed["alloc_warning_spec"]) == (
        "writeback",
        None,
        "50%",
    )
    assert "cache_mode" in _err(await client.patch("/volumes/vol1", json={"cache_mode": None}), 400)

    _ok(await client.delete("/volumes/vol1", headers=JSON), 204)
    assert "not found" in _err(await client.get("/volumes/vol1"), 404)
    assert _ok(await client.get("/pools/default"))["used"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"name": "v", "pool": "default"},
        {"name": "v", "pool": "default", "size": 0},
        {"name": "v", "pool": "default", "size": 1000},  # not a multiple of 512
        {"name": "v", "pool": "default", "size": "1GiB", "alloc_limit": "120%"},
        {"name": "v", "pool": "default", "size": "1GiB", "alloc_limit": "0"},
        {"name": "v", "pool": "default", "size": "1GiB", "alloc_warning": "lots"},
        {"name": "v", "pool": "default", "size": "1GiB", "cache_mode": "fast"},
        {"name": "v", "pool": "default", "size": 2**70},
        {"name": "bad/name", "pool": "default", "size": "1GiB"},
    ],
)
async def test_volume_bad_input_is_400_and_changes_nothing(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    await _setup(client)
    _err(await client.post("/volumes", json=body), 400)
    assert _ok(await client.get("/volumes")) == []


async def test_volume_unknown_pool_and_duplicate(client: httpx.AsyncClient) -> None:
    await _setup(client)
    assert _err(await client.post("/volumes", json={"name": "v", "pool": "gold", "size": "1G"}), 404) == (
        "pool 'gold' not found"
    )
    _ok(await client.post("/volumes", json={"name": "v", "pool": "default", "size": "1G"}), 201)
    _err(await client.post("/volumes", json={"name": "v", "pool": "default", "size": "1G"}), 409)
    _err(await client.post("/volumes/nope/grow", json={"size": "2G"}), 404)
    _err(await client.patch("/volumes/nope", json={"cache_mode": "writeback"}), 404)


async def test_out_of_space_is_507(
    client: httpx.AsyncClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _setup(client)
    _ok(await client.post("/volumes", json={"name": "v", "pool": "default", "size": "1G"}), 201)

    async def no_space(name: str, size: int) -> None:
        raise OutOfSpace("pool 'default' reached its growth limit", "pool-growth-limit")

    monkeypatch.setattr(engine, "grow_vv", no_space)
    assert "growth limit" in _err(await client.post("/volumes/v/grow", json={"size": "2G"}), 507)


# --- alerts, LDs, rebuild --------------------------------------------------------------------------


async def test_alerts_list_show_ack(client: httpx.AsyncClient, engine: Engine) -> None:
    await _setup(client)
    _ok(
        await client.post(
            "/volumes", json={"name": "v", "pool": "default", "size": "4MiB", "alloc_warning": "50%"}
        ),
        201,
    )
    await engine.volume("v").write(0, b"\x01" * (3 * MiB))
    alerts = _ok(await client.get("/alerts"))
    assert alerts and all(
        set(a) == {"id", "time", "severity", "kind", "object", "message", "state"} for a in alerts
    )
    warning = next(a for a in alerts if a["kind"] == "vv-allocation-warning")
    assert (warning["object"], warning["state"], warning["severity"]) == ("vv:v", "new", "warning")
    assert _ok(await client.get(f"/alerts/{warning['id']}")) == warning
    acked = _ok(await client.post(f"/alerts/{warning['id']}/ack", json={}))
    assert acked["state"] == "acknowledged"
    assert (
        next(a for a in _ok(await client.get("/alerts")) if a["id"] == warning["id"])["state"]
        == "acknowledged"
    )
    _err(await client.post("/alerts/99999/ack", json={}), 404)
    _err(await client.get("/alerts/99999"), 404)
    assert _ok(await client.get("/status"))["open_alerts"] == len(alerts)

    # Trimming below the warning clears it: gone from the open list, still there with ?all=true.
    await engine.volume("v").trim(0, 4 * MiB)
    assert warning["id"] not in [a["id"] for a in _ok(await client.get("/alerts"))]
    cleared = [
        a for a in _ok(await client.get("/alerts", params={"all": "true"})) if a["id"] == warning["id"]
    ]
    assert cleared and cleared[0]["state"] == "cleared"


async def test_lds_and_rebuild(client: httpx.AsyncClient, engine: Engine) -> None:
    await _setup(client, pds=4)
    _ok(await client.post("/volumes", json={"name": "v", "pool": "default", "size": "64MiB"}), 201)
    data = bytes(range(256)) * 4096  # 1 MiB
    await engine.volume("v").write(0, data)
    lds = _ok(await client.get("/lds"))
    assert len(lds) == 1
    ld = lds[0]
    assert (ld["pool"], ld["raid"], ld["set_size"], ld["regions_used"], ld["health"]) == (
        "default",
        1,
        2,
        1,
        "normal",
    )
    assert ld["regions_free"] == ld["regions"] - 1
    assert {c["pd_id"] for c in ld["chunklets"]} <= {1, 2, 3, 4}
    assert _ok(await client.get(f"/lds/{ld['id']}")) == ld
    assert _ok(await client.get("/lds", params={"pool": "default"})) == lds
    _err(await client.get("/lds", params={"pool": "gold"}), 404)
    _err(await client.get("/lds/42"), 404)

    nothing = _ok(await client.post("/rebuild", json={}), 202)
    while nothing["running"]:
        await asyncio.sleep(0.01)
        nothing = _ok(await client.get("/rebuild"))
    assert nothing["lds_total"] == 0 and nothing["error"] is None

    victim = ld["chunklets"][0]["pd_id"]
    _ok(await client.post(f"/pds/{victim}/fail", json={}))
    assert _ok(await client.get(f"/lds/{ld['id']}"))["health"] == "degraded"
    assert "ld-degraded" in {a["kind"] for a in _ok(await client.get("/alerts"))}
    assert _ok(await client.get("/status"))["lds_degraded"] == 1

    progress = _ok(await client.post("/rebuild", json={}), 202)
    assert progress["running"] is True
    for _ in range(1000):
        if not progress["running"]:
            break
        await asyncio.sleep(0.01)
        progress = _ok(await client.get("/rebuild"))
    assert progress["running"] is False and progress["error"] is None
    assert progress["lds_done"] == progress["lds_total"] == 1
    assert progress["bytes_done"] == progress["bytes_total"] > 0
    rebuilt = _ok(await client.get(f"/lds/{ld['id']}"))
    assert rebuilt["health"] == "normal"
    assert victim not in {c["pd_id"] for c in rebuilt["chunklets"]}
    assert "rebuild-done" in {a["kind"] for a in _ok(await client.get("/alerts", params={"all": "true"}))}
    assert bytes(await engine.volume("v").read(0, len(data))) == data


# --- status, validation, errors, OpenAPI -----------------------------------------------------------


async def test_status(client: httpx.AsyncClient, engine: Engine) -> None:
    await _setup(client)
    _ok(await client.post("/volumes", json={"name": "v", "pool": "default", "size": "1GiB"}), 201)
    await engine.volume("v").write(0, b"\x01" * 4096)
    status = _ok(await client.get("/status"))
    assert (status["node"], status["pds"], status["pools"], status["volumes"], status["lds"]) == (
        "node-a",
        4,
        1,
        1,
        1,
    )
    assert (status["capacity"], status["used"], status["virtual"], status["allocated"]) == (
        8 * MiB,
        MiB,
        GiB,
        MiB,
    )
    assert status["uptime"] >= 0 and status["version"]
    assert status["nbd"] == {
        "uri": "nbd://127.0.0.1:10809",
        "unix_socket": None,
        "default_export": "vol0",
        "tls": "off",
        "exposed_without_tls": False,
    }


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("post", "/pools", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("post", "/pools", {"json": []}),
        ("post", "/pools", {"json": "pool"}),
        ("get", "/pds/abc", {}),
        ("get", "/pds/-1", {}),
        ("get", "/alerts", {"params": {"all": "maybe"}}),
        ("post", "/volumes/v/grow", {"json": {"size": None}}),
    ],
)
async def test_validation_errors_are_400_not_422(
    client: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    message = _err(await getattr(client, method)(path, **kwargs), 400)
    assert message.startswith("invalid request")


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    _err(await client.get("/nothing"), 404)
    _err(await client.put("/pools", headers=JSON), 405)


async def test_openapi_describes_what_the_app_does(client: httpx.AsyncClient) -> None:
    schema = _ok(await client.get("/openapi.json"))
    assert schema["info"]["title"] == "thinblock"
    paths = schema["paths"]
    for expected in (
        "/api/v1/status",
        "/api/v1/pds",
        "/api/v1/pools/{name}",
        "/api/v1/volumes/{name}/grow",
        "/api/v1/lds/{ld_id}",
        "/api/v1/rebuild",
        "/api/v1/alerts/{alert_id}/ack",
        "/metrics",
    ):
        assert expected in paths
    for path_item in paths.values():
        for operation in path_item.values():
            assert "422" not in operation["responses"]
            assert "400" in operation["responses"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]


# --- metrics -------------------------------------------------------------------------------------


async def test_metrics_read_engine_state(client: httpx.AsyncClient, engine: Engine) -> None:
    await _setup(client)
    _ok(
        await client.post(
            "/volumes",
            json={
                "name": "v",
                "pool": "default",
                "size": "1GiB",
                "alloc_limit": "80%",
                "snapshot_warning": "2MiB",
                "snapshot_limit": "3MiB",
            },
        ),
        201,
    )
    await engine.volume("v").write(0, b"\x01" * (MiB + 1))
    await engine.volume("v").read(0, 4096)
    await engine.snapshot_vv("v", "s")
    await engine.volume("v").write(0, b"\x02")  # copy on write: the old region is the snapshot's alone
    r = await client.get("http://thinblock/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("thinblock_vv_virtual_bytes", vv="v", pool="default") == GiB
    assert value("thinblock_vv_allocated_bytes", vv="v", pool="default") == 2 * MiB
    assert value("thinblock_vv_alloc_limit_bytes", vv="v", pool="default") == int(GiB * 0.8)
    assert value("thinblock_vv_snapshot_space_bytes", vv="v", pool="default") == MiB
    assert value("thinblock_vv_snapshot_space_bytes", vv="s", pool="default") == 0
    assert value("thinblock_vv_snapshot_warning_bytes", vv="v", pool="default") == 2 * MiB
    assert value("thinblock_vv_snapshot_limit_bytes", vv="v", pool="default") == 3 * MiB
    assert value("thinblock_vv_requests_total", vv="v", op="write") == 2
    assert value("thinblock_vv_requests_total", vv="v", op="read") == 1
    assert value("thinblock_vv_bytes_total", vv="v", op="write") == MiB + 2
    assert value("thinblock_pool_capacity_bytes", pool="default") == 8 * MiB
    assert value("thinblock_pool_used_bytes", pool="default") == 3 * MiB  # two regions + the copy
    assert value("thinblock_pool_free_bytes", pool="default") == 5 * MiB
    assert value("thinblock_pool_lds", pool="default") == 1
    assert value("thinblock_pool_state", pool="default", state="healthy") == 1
    pd_path = str(Path(engine.list_pds()[0].path))
    assert value("thinblock_pd_health", pd="1", path=pd_path, health="normal") == 1
    assert value("thinblock_pd_health", pd="1", path=pd_path, health="failed") == 0
    assert value("thinblock_cache_dirty_bytes") == engine.cache_dirty_bytes()
    assert value("thinblock_alerts", kind="ld-created", state="new") == 1
    assert value("thinblock_alerts", kind="pd-failed", state="new") == 0


# --- authentication --------------------------------------------------------------------------------


async def test_token_is_required_everywhere(engine: Engine, tmp_path: Path) -> None:
    app = create_app(engine, _node(tmp_path), token="s3cret")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://thinblock") as c:
        for path in (
            "/api/v1/status",
            "/api/v1/pools",
            "/metrics",
            "/api/v1/history",
            "/nothing",
        ):
            r = await c.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
            assert "missing bearer token" in r.json()["error"]
            wrong = await c.get(path, headers={"authorization": "Bearer nope"})
            assert wrong.status_code == 401 and "wrong" in wrong.json()["error"]
        assert (await c.post("/api/v1/pools", json={"name": "p", "raid": 1})).status_code == 401
        # The pages a browser opens before it can log in, and the API's description: no data.
        for public in ("/", "/docs", "/static/dashboard.js", "/api/v1/openapi.json"):
            assert (await c.get(public)).status_code == 200, public
        assert (await c.post("/", json={})).status_code in (401, 405)
        assert engine.list_pools() == []
        auth = {"authorization": "Bearer s3cret"}
        assert (await c.get("/api/v1/status", headers=auth)).status_code == 200
        assert (await c.get("/metrics", headers=auth)).status_code == 200
        schema = (await c.get("/api/v1/openapi.json", headers=auth)).json()
        assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_nodes_of_a_single_daemon(client: httpx.AsyncClient) -> None:
    """Without a partner the node list has this node alone, role single (a pair: the drills)."""
    r = await client.get("/nodes")
    assert r.status_code == 200
    (node,) = r.json()
    assert (node["role"], node["mirror"], node["partner"], node["taken_over"]) == (
        "single",
        "single",
        None,
        False,
    )


# --- names ---------------------------------------------------------------------------------------

VOLUME_RULE = (
    "volume names are 1-63 characters of letters, digits and . _ : + -, starting with a letter or digit"
)
POOL_RULE = VOLUME_RULE.replace("volume", "pool")


async def test_a_bad_name_is_refused_in_one_sentence_wherever_it_is(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    """Bodies, paths and queries, volumes and pools: the engine's sentence, not pydantic's."""
    await _setup(client)
    long = "v" * 64
    cases = [
        (client.post("/pools", json={"name": "a b", "raid": 1}), f"invalid pool name 'a b': {POOL_RULE}"),
        (client.post("/volumes", json={"name": "", "pool": "default", "size": "1G"}),
         f"invalid volume name '': {VOLUME_RULE}"),
        (client.post("/volumes", json={"name": long, "pool": "default", "size": "1G"}),
         f"invalid volume name '{long}': {VOLUME_RULE}"),
        (client.post("/volumes", json={"name": 7, "pool": "default", "size": "1G"}),
         f"invalid volume name 7: {VOLUME_RULE}"),
        (client.post("/volumes", json={"name": "v", "pool": "-gold", "size": "1G"}),
         f"invalid pool name '-gold': {POOL_RULE}"),
        (client.get("/volumes/-v"), f"invalid volume name '-v': {VOLUME_RULE}"),
        (client.post(f"/volumes/{long}/grow", json={"size": "2G"}), f"invalid volume name '{long}': {VOLUME_RULE}"),
        (client.get("/pools/a{b}"), f"invalid pool name 'a{{b}}': {POOL_RULE}"),
        (client.get("/lds", params={"pool": "a b"}), f"invalid pool name 'a b': {POOL_RULE}"),
    ]  # fmt: skip
    for request, message in cases:
        assert _err(await request, 400) == message
    assert _ok(await client.get("/volumes")) == []
    # The engine says the same for callers that are not the API.
    with pytest.raises(InvalidArgument) as refused:
        await engine.create_vv("a b", pool="default", size=MiB)
    assert str(refused.value) == f"invalid volume name 'a b': {VOLUME_RULE}"
    # A bad name with another mistake: both are said, the name in its own words.
    mixed = _err(await client.post("/volumes", json={"name": "a b", "pool": "default"}), 400)
    assert mixed.startswith("invalid request: ") and f"invalid volume name 'a b': {VOLUME_RULE}" in mixed
    assert "size: Field required" in mixed
    # 63 characters is a name.
    _ok(await client.post("/volumes", json={"name": "v" * 63, "pool": "default", "size": "1G"}), 201)


async def test_rename_moves_everything_the_volume_has(client: httpx.AsyncClient, engine: Engine) -> None:
    await _setup(client)
    body = {"name": "v1", "pool": "default", "size": "64MiB", "alloc_warning": "4MiB"}
    _ok(await client.post("/volumes", json=body), 201)
    await engine.volume("v1").write(0, b"\x7f" * (8 * MiB))  # past the warning: an alert
    assert [a.object for a in engine.list_alerts() if a.kind.value == "vv-allocation-warning"] == ["vv:v1"]
    renamed = _ok(await client.post("/volumes/v1/rename", json={"name": "v2"}))
    assert (renamed["name"], renamed["allocated"], renamed["alloc_warning"]) == ("v2", 8 * MiB, 4 * MiB)
    assert bytes(await engine.volume("v2").read(0, 4096)) == b"\x7f" * 4096
    _err(await client.get("/volumes/v1"), 404)
    open_warnings = [a.object for a in engine.list_alerts() if a.kind.value == "vv-allocation-warning"]
    assert open_warnings == ["vv:v2"]  # the old name's alert cleared, raised again under the new one
    assert _err(await client.post("/volumes/v2/rename", json={"name": "a b"}), 400).startswith(
        "invalid volume name 'a b'"
    )
    _ok(await client.post("/volumes", json={"name": "v3", "pool": "default", "size": "64MiB"}), 201)
    assert (
        _err(await client.post("/volumes/v2/rename", json={"name": "v3"}), 409)
        == "volume 'v3' already exists"
    )
    assert (
        _err(await client.post("/volumes/nope/rename", json={"name": "v4"}), 404) == "volume 'nope' not found"
    )
    # The store has it (what a restart loads).
    assert sorted(v.name for v in engine.list_vvs()) == ["v2", "v3"]
    rows = {row.name for row in engine.store.load_vvs()}
    assert rows == {"v2", "v3"}
