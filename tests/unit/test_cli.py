"""The CLI against a fake HTTP transport: argument parsing, what it sends, how it renders,
and its one-line errors.  (It is driven against the real daemon in tests/e2e.)"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from thinblock.cli import EXIT_ERROR, EXIT_UNREACHABLE, EXIT_USAGE, main
from thinblock.units import GiB, MiB

VV = {
    "name": "vol0",
    "pool": "default",
    "size": 100 * GiB,
    "region_size": MiB,
    "allocated": 3 * MiB,
    "regions_allocated": 3,
    "alloc_warning": 80 * GiB,
    "alloc_limit": None,
    "alloc_warning_spec": "80%",
    "alloc_limit_spec": None,
    "cache_mode": "writethrough",
    "dirty_bytes": 0,
    "created": 1_700_000_000.0,
    "export_uri": "nbd://127.0.0.1:10809/vol0",
}
POOL = {
    "name": "default",
    "raid": 1,
    "set_size": 2,
    "step": 128 * 1024,
    "region_size": MiB,
    "capacity": GiB,
    "used": 3 * MiB,
    "free": GiB - 3 * MiB,
    "growth_increment": GiB,
    "growth_warning": None,
    "growth_limit": 10 * GiB,
    "lds": 1,
    "volumes": 1,
    "state": "healthy",
}


class FakeApi:
    """Answers requests from a table of (method, path) -> (status, body); records them."""

    def __init__(
        self, routes: dict[tuple[str, str], tuple[int, Any] | Callable[[httpx.Request], httpx.Response]]
    ):
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        route = self.routes.get((request.method, request.url.path))
        if route is None:
            return httpx.Response(404, json={"error": "Not Found"})
        if callable(route):
            return route(request)
        status, body = route
        if body is None:
            return httpx.Response(status)
        return httpx.Response(status, json=body)

    def body(self, i: int = -1) -> Any:
        return json.loads(self.requests[i].content)


def run(
    argv: list[str], api: FakeApi | None = None, transport: httpx.BaseTransport | None = None
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    if api is not None:
        transport = httpx.MockTransport(api)
    code = main(argv, transport=transport, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "THINBLOCK_API",
        "THINBLOCK_TOKEN",
        "THINBLOCK_TOKEN_FILE",
        "THINBLOCK_CACERT",
        "THINBLOCK_DEBUG",
    ):
        monkeypatch.delenv(var, raising=False)


# --- what is sent --------------------------------------------------------------------------------


def test_vv_create_sends_sizes_in_bytes_and_limits_as_given() -> None:
    api = FakeApi({("POST", "/api/v1/volumes"): (201, VV)})
    code, out, err = run(
        ["vv", "create", "vol0", "--pool", "default", "--size", "100G", "--alloc-warning", "80%",
         "--alloc-limit", "90GiB", "--cache", "writeback"],
        api,
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert api.body() == {
        "name": "vol0",
        "pool": "default",
        "size": 100 * GiB,
        "alloc_warning": "80%",
        "alloc_limit": 90 * GiB,
        "cache_mode": "writeback",
    }
    assert "volume vol0" in out and "100 GiB" in out and "80% (80 GiB)" in out


def test_pool_create_and_set() -> None:
    api = FakeApi({("POST", "/api/v1/pools"): (201, POOL), ("PATCH", "/api/v1/pools/default"): (200, POOL)})
    assert run(["pool", "create", "default", "--raid", "5", "--set-size", "4", "--region-size", "4M",
                "--growth-increment", "2G", "--growth-limit", "10T"], api)[0] == 0  # fmt: skip
    assert api.body() == {
        "name": "default",
        "raid": 5,
        "set_size": 4,
        "region_size": 4 * MiB,
        "growth_increment": 2 * GiB,
        "growth_limit": 10 * 1024 * GiB,
    }
    assert run(["pool", "set", "default", "--growth-warning", "none", "--growth-limit", "20G"], api)[0] == 0
    assert api.body() == {"growth_warning": None, "growth_limit": 20 * GiB}
    code, _, err = run(["pool", "set", "default"], api)
    assert code == EXIT_USAGE and err.startswith("error: nothing to change")


def test_vv_set_grow_delete_and_names_are_quoted() -> None:
    api = FakeApi(
        {
            ("PATCH", "/api/v1/volumes/a b"): (200, VV),
            ("POST", "/api/v1/volumes/vol0/grow"): (200, VV),
            ("DELETE", "/api/v1/volumes/vol0"): (204, None),
        }
    )
    assert run(["vv", "set", "a b", "--alloc-limit", "none", "--cache", "writethrough"], api)[0] == 0
    assert api.requests[-1].url.raw_path == b"/api/v1/volumes/a%20b"
    assert api.body() == {"alloc_limit": None, "cache_mode": "writethrough"}
    assert run(["vv", "grow", "vol0", "2T"], api)[0] == 0
    assert api.body() == {"size": 2 * 1024 * GiB}
    code, out, _ = run(["vv", "delete", "vol0", "--json"], api)
    assert code == 0 and json.loads(out) == {"deleted": "volume", "name": "vol0"}


def test_pd_add_makes_relative_paths_absolute_for_a_local_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    pd = {"id": 5, "path": str(tmp_path / "pd5.img"), "size": 64 * GiB, "chunklet_size": 256 * MiB,
          "chunklets": 256, "chunklets_used": 0, "chunklets_free": 256, "health": "normal"}  # fmt: skip
    api = FakeApi({("POST", "/api/v1/pds"): (201, pd)})
    code, out, _ = run(["pd", "add", "pd5.img", "--size", "64GiB"], api)
    assert code == 0
    assert api.body() == {"path": os.path.join(str(tmp_path), "pd5.img"), "size": 64 * GiB}
    assert "PD 5" in out and "64 GiB" in out


def test_alerts_and_ack() -> None:
    alert = {"id": 3, "time": 1_700_000_000.0, "severity": "warning", "kind": "vv-allocation-warning",
             "object": "vv:vol0", "message": "volume vol0 passed 80%", "state": "new"}  # fmt: skip
    api = FakeApi({("GET", "/api/v1/alerts"): (200, [alert]), ("POST", "/api/v1/alerts/3/ack"): (200, alert)})
    code, out, _ = run(["alerts", "--all"], api)
    assert code == 0 and "vv-allocation-warning" in out and "volume vol0 passed 80%" in out
    assert api.requests[-1].url.params["all"] == "true"
    code, out, _ = run(["alerts", "--json"], api)
    assert json.loads(out) == [alert] and api.requests[-1].url.params["all"] == "false"
    code, out, _ = run(["alerts", "ack", "3"], api)
    assert code == 0 and "alert 3" in out and "acknowledged" in out


def test_rebuild_follows_progress_until_done() -> None:
    states = iter(
        [
            {"running": True, "lds_total": 2, "lds_done": 1, "bytes_total": 8 * MiB, "bytes_done": 4 * MiB,
             "current_ld": 2, "error": None},
            {"running": False, "lds_total": 2, "lds_done": 2, "bytes_total": 8 * MiB, "bytes_done": 8 * MiB,
             "current_ld": None, "error": None},
        ]
    )  # fmt: skip
    started = {"running": True, "lds_total": 2, "lds_done": 0, "bytes_total": 8 * MiB, "bytes_done": 0,
               "current_ld": 1, "error": None}  # fmt: skip
    api = FakeApi(
        {
            ("POST", "/api/v1/rebuild"): (202, started),
            ("GET", "/api/v1/rebuild"): lambda request: httpx.Response(200, json=next(states)),
        }
    )
    code, out, _ = run(["rebuild"], api)
    assert code == 0 and "rebuilt 2 of 2 LDs (8 MiB)" in out
    assert [r.method for r in api.requests] == ["POST", "GET", "GET"]


def test_rebuild_failure_is_an_error() -> None:
    failed = {"running": False, "lds_total": 1, "lds_done": 0, "bytes_total": 0, "bytes_done": 0,
              "current_ld": None, "error": "no spare chunklet"}  # fmt: skip
    api = FakeApi({("POST", "/api/v1/rebuild"): (202, failed)})
    code, _, err = run(["rebuild"], api)
    assert code == EXIT_ERROR and err == "error: rebuild failed: no spare chunklet\n"


# --- how it renders ------------------------------------------------------------------------------


def test_json_lists_are_what_the_api_returns_wherever_json_is_given() -> None:
    api = FakeApi({("GET", "/api/v1/volumes"): (200, [VV]), ("GET", "/api/v1/pools"): (200, [POOL])})
    for argv in (["vv", "list", "--json"], ["--json", "vv", "list"]):
        code, out, _ = run(argv, api)
        assert code == 0 and json.loads(out) == [VV]
    code, out, _ = run(["pool", "list", "--json"], api)
    assert json.loads(out) == [POOL]


def test_tables_show_sizes_with_units() -> None:
    api = FakeApi({("GET", "/api/v1/volumes"): (200, [VV]), ("GET", "/api/v1/pools"): (200, [POOL])})
    code, out, _ = run(["vv", "list"], api)
    assert code == 0
    row = next(line for line in out.splitlines() if "vol0" in line)
    assert row.split()[:5] == ["vol0", "default", "100", "GiB", "3"]
    assert "80%" in row and "through" in row  # the limit as given; WRITE through (cache mode)
    code, out, _ = run(["pool", "list"], api)
    row = next(line for line in out.splitlines() if line.strip().startswith("default"))
    assert "1 GiB" in row and "10 GiB" in row and "healthy" in row


def test_vv_list_filters_by_pool() -> None:
    other = dict(VV, name="vol1", pool="gold")
    api = FakeApi(
        {
            ("GET", "/api/v1/volumes"): (200, [VV, other]),
            ("GET", "/api/v1/pools/gold"): (200, dict(POOL, name="gold")),
        }
    )
    code, out, _ = run(["vv", "list", "--pool", "gold", "--json"], api)
    assert code == 0 and [v["name"] for v in json.loads(out)] == ["vol1"]


def test_status_renders() -> None:
    status = {"node": "node-a", "version": "0.1.0", "started": 0.0, "uptime": 3725.0, "pds": 4, "pds_failed": 1,
              "pools": 1, "lds": 2, "lds_degraded": 1, "volumes": 3, "capacity": GiB, "used": 512 * MiB,
              "virtual": 300 * GiB, "allocated": 512 * MiB, "dirty_bytes": 0, "open_alerts": 2,
              "rebuild_running": False,
              "nbd": {"uri": "nbd://127.0.0.1:10809", "unix_socket": None, "default_export": "vol0"}}  # fmt: skip
    code, out, _ = run(["status"], FakeApi({("GET", "/api/v1/status"): (200, status)}))
    assert code == 0
    assert "node-a" in out and "1h 2m 5s" in out and "1 failed" in out and "512 MiB used of 1 GiB" in out
    assert "nbd://127.0.0.1:10809, default export vol0" in out


# --- errors --------------------------------------------------------------------------------------


def test_daemon_errors_are_one_line() -> None:
    api = FakeApi({("GET", "/api/v1/pools/gold"): (404, {"error": "pool 'gold' not found"})})
    assert run(["pool", "show", "gold"], api) == (EXIT_ERROR, "", "error: pool 'gold' not found\n")


def test_unreachable_daemon() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    code, out, err = run(["status"], transport=httpx.MockTransport(refuse))
    assert code == EXIT_UNREACHABLE and out == ""
    assert err.startswith(
        "error: cannot reach thinblock at http://127.0.0.1:8080: is `thinblock serve` running?"
    )
    assert err.count("\n") == 1


def test_unauthorized_suggests_the_token() -> None:
    api = FakeApi({("GET", "/api/v1/status"): (401, {"error": "unauthorized: missing bearer token"})})
    code, _, err = run(["status"], api)
    assert code == EXIT_ERROR and "give --token or set THINBLOCK_TOKEN" in err


def test_not_json_error() -> None:
    api = FakeApi(
        {("GET", "/api/v1/status"): lambda request: httpx.Response(502, text="<html>bad gateway</html>")}
    )
    code, _, err = run(["status"], api)
    assert code == EXIT_ERROR and err == "error: HTTP 502 from http://127.0.0.1:8080 for GET /status\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["vv", "create", "v", "--pool", "p", "--size", "10q"], "argument --size: not a size"),
        (["vv", "create", "v", "--pool", "p"], "required: --size"),
        (["vv", "create", "v", "--pool", "p", "--size", "1G", "--alloc-limit", "150%"], "percentage"),
        (["pool", "create", "p", "--raid", "3"], "argument --raid: invalid choice"),
        (["pd", "show", "x"], "not an id"),
        (["vv", "frobnicate"], "invalid choice"),
        ([], "required: COMMAND"),
    ],
)
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(argv, FakeApi({}))
    assert code == EXIT_USAGE
    err = capsys.readouterr().err  # argparse writes to the real stderr
    assert message in err
    # One line, the program's name, where to look; no usage block, no "error:" twice.
    assert err.count("\n") == 1 and err.startswith("error: thinblock") and err.count("error:") == 1
    assert err.rstrip().endswith("--help)")


def test_usage_error_names_the_command_and_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["vv", "create", "v", "--pool", "p"], FakeApi({}))[0] == EXIT_USAGE
    assert capsys.readouterr().err == (
        "error: thinblock vv create: the following arguments are required: --size "
        "(see thinblock vv create --help)\n"
    )


def test_sizes_negative_si_and_relative_growth() -> None:
    code, _, err = run(["vv", "grow", "vol0", "-5G"], FakeApi({}))
    assert (code, err) == (EXIT_USAGE, "error: a size cannot be negative: -5G (see thinblock --help)\n")
    code, _, err = run(["vv", "create", "v", "--pool", "p", "--size", "-1G"], FakeApi({}))
    assert code == EXIT_USAGE and "cannot be negative" in err
    api = FakeApi(
        {("GET", "/api/v1/volumes/vol0"): (200, VV), ("POST", "/api/v1/volumes/vol0/grow"): (200, VV)}
    )
    assert run(["vv", "grow", "vol0", "+5G", "--json"], api)[0] == 0
    assert api.body() == {"size": 105 * GiB}  # 100 GiB + 5 GiB
    assert run(["vv", "grow", "vol0", "1E", "--json"], api)[0] == 0
    assert api.body() == {"size": 1 << 60}


def test_every_command_has_a_description() -> None:
    import argparse

    from thinblock.cli import build_parser

    def walk(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        found = [parser]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found += walk(sub)
        return found

    parsers = walk(build_parser())
    assert len(parsers) > 30
    assert [p.prog for p in parsers if not p.description] == []


def test_a_tools_own_error_prefix_is_not_repeated() -> None:
    api = FakeApi({("GET", "/api/v1/status"): (409, {"error": "error: something failed"})})
    code, _, err = run(["status"], api)
    assert (code, err) == (EXIT_ERROR, "error: something failed\n")


def test_piped_tables_have_no_trailing_padding() -> None:
    api = FakeApi({("GET", "/api/v1/volumes"): (200, [VV, {**VV, "name": "a-much-longer-volume-name"}])})
    code, out, _ = run(["vv", "list"], api)
    assert code == 0 and "a-much-longer-volume-name" in out
    assert [line for line in out.splitlines() if line != line.rstrip()] == []


def test_environment_gives_api_and_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THINBLOCK_API", "http://127.0.0.1:9999/")
    monkeypatch.setenv("THINBLOCK_TOKEN", "s3cret")
    api = FakeApi({("GET", "/api/v1/pools"): (200, [])})
    assert run(["pool", "list"], api)[0] == 0
    request = api.requests[-1]
    assert str(request.url) == "http://127.0.0.1:9999/api/v1/pools"
    assert request.headers["authorization"] == "Bearer s3cret"
    # Flags win over the environment.
    assert run(["pool", "list", "--api", "http://127.0.0.1:7777", "--token", "other"], api)[0] == 0
    assert api.requests[-1].url.port == 7777 and api.requests[-1].headers["authorization"] == "Bearer other"


def test_check_without_a_data_directory(tmp_path: Path) -> None:
    code, _, err = run(["check", "--data", str(tmp_path / "missing")])
    assert code == EXIT_ERROR and err.startswith("error: no data directory at")


def test_unexpected_failure_is_one_line_not_a_traceback() -> None:
    api = FakeApi({("GET", "/api/v1/volumes"): (200, [{"name": "broken"}])})  # a body the renderer cannot use
    code, _, err = run(["vv", "list"], api)
    assert code == EXIT_ERROR and err.startswith("error: unexpected KeyError") and err.count("\n") == 1


# --- security: JSON bodies, token files ------------------------------------------------------------


def test_every_state_changing_command_sends_json(tmp_path: Path) -> None:
    """The API refuses state-changing requests that are not application/json (its cross-site
    guard): the body-less actions send ``{}``."""
    ok: dict[tuple[str, str], Any] = {
        ("POST", "/api/v1/pds/3/fail"): (200, {"id": 3}),
        ("DELETE", "/api/v1/pds/3"): (204, None),
        ("POST", "/api/v1/pools/default/compact"): (200, {"released_lds": 0, "pool": POOL}),
        ("DELETE", "/api/v1/pools/default"): (204, None),
        ("DELETE", "/api/v1/volumes/vol0"): (204, None),
        ("POST", "/api/v1/alerts/7/ack"): (200, {"id": 7, "kind": "k", "object": "o"}),
        ("POST", "/api/v1/rebuild"): (202, {"running": False, "lds_total": 0, "lds_done": 0,
                                            "bytes_total": 0, "bytes_done": 0, "current_ld": None}),
        ("DELETE", "/api/v1/tokens/2"): (204, None),
    }  # fmt: skip
    api = FakeApi(ok)
    for argv in (
        ["pd", "fail", "3", "--json"],
        ["pd", "remove", "3", "--json"],
        ["pool", "compact", "default", "--json"],
        ["pool", "delete", "default", "--json"],
        ["vv", "delete", "vol0", "--json"],
        ["alerts", "ack", "7", "--json"],
        ["rebuild", "--no-wait", "--json"],
        ["token", "revoke", "2", "--json"],
    ):
        code, _, err = run(argv, api)
        assert code == 0, (argv, err)
    sent = [r for r in api.requests if r.method != "GET"]
    assert {(r.method, r.url.path) for r in sent} == set(ok)
    for request in sent:
        assert request.headers["content-type"] == "application/json", request
        assert json.loads(request.content) == {}


def test_token_file_and_its_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeApi({("GET", "/api/v1/volumes"): (200, [VV])})
    token_file = tmp_path / "token"
    token_file.write_text("tb_secret\n")
    assert run(["vv", "list", "--token-file", str(token_file)], api)[0] == 0
    assert api.requests[-1].headers["authorization"] == "Bearer tb_secret"
    monkeypatch.setenv("THINBLOCK_TOKEN_FILE", str(token_file))
    assert run(["vv", "list"], api)[0] == 0
    assert api.requests[-1].headers["authorization"] == "Bearer tb_secret"
    assert run(["vv", "list", "--token", "other"], api)[0] == 0  # --token wins
    assert api.requests[-1].headers["authorization"] == "Bearer other"
    code, _, err = run(["vv", "list", "--token-file", str(tmp_path / "missing")], api)
    assert code == EXIT_ERROR and "cannot read the token file" in err
    token_file.write_text("\n")
    code, _, err = run(["vv", "list"], api)
    assert code == EXIT_ERROR and "is empty" in err


def test_token_create_writes_the_secret_to_a_private_file(tmp_path: Path) -> None:
    created = {"id": 4, "name": "ci", "role": "operator", "created": 1_700_000_000.0, "token": "tb_s3"}
    api = FakeApi({("POST", "/api/v1/tokens"): (201, created), ("DELETE", "/api/v1/tokens/4"): (204, None)})
    out_file = tmp_path / "ci.token"
    code, out, _ = run(["token", "create", "ci", "--role", "operator", "--output", str(out_file)], api)
    assert code == 0 and "tb_s3" not in out
    assert api.body(0) == {"name": "ci", "role": "operator"}
    assert out_file.read_text() == "tb_s3\n" and (out_file.stat().st_mode & 0o777) == 0o600
    # An existing file is never overwritten; the token whose secret could not be kept is revoked.
    code, _, err = run(["token", "create", "ci", "--role", "operator", "--output", str(out_file)], api)
    assert code == EXIT_ERROR and "the token was revoked" in err
    assert api.requests[-1].method == "DELETE"


def test_tables_fit_80_columns_without_breaking_words() -> None:
    from rich.console import Console

    from thinblock import cli

    long_vv = {**VV, "name": "database-volume-01", "alloc_warning_spec": "80%", "alloc_limit_spec": "90%"}
    pool = {
        **POOL,
        "virtual": 3 * GiB,
        "overcommit": 12.5,
        "forecast": {"rate": 1.0, "window": 60, "to_warning": None, "to_limit": 7200},
    }
    alert = {"id": 12, "time": 1.7e9, "severity": "warning", "kind": "vv-allocation-warning", "object": "vv:db",
             "message": "VV 'database-volume-01' has 81 GiB allocated, at or past its allocation warning of 80%", "state": "new"}  # fmt: skip
    console = Console(width=80, force_terminal=True, color_system=None, record=True)
    for table in (cli.render_vvs([VV, long_vv]), cli.render_pools([pool]), cli.render_alerts([alert])):
        console.print(table)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for word in ("database-volume-01", "vv-allocation-warning", "healthy", "100 GiB", "12.5x", "2h 0m 0s",
                 "OVERCOMMIT", "CLIENTS", "'database-volume-01'", "allocation"):  # fmt: skip
        assert word in text, word
    assert "…" not in text


def test_pd_add_force_sends_the_typed_confirmation(tmp_path: Path) -> None:
    pd = {"id": 1, "path": "/dev/loop7", "size": GiB, "chunklet_size": 256 * MiB,
          "chunklets": 4, "chunklets_used": 0, "chunklets_free": 4, "health": "normal"}  # fmt: skip
    api = FakeApi({("POST", "/api/v1/pds"): (201, pd)})
    assert run(["pd", "add", "/dev/loop7", "--force", "--confirm", "/dev/loop7"], api)[0] == 0
    assert api.body() == {"path": "/dev/loop7", "force": True, "confirm": "/dev/loop7"}
    assert run(["pd", "add", "/dev/loop7"], api)[0] == 0
    assert api.body() == {"path": "/dev/loop7"}
