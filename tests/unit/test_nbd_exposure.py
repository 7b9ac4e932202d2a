"""NBD beyond loopback without required TLS is called out: a warning at start (the daemon's
rule, checked here on its configuration) and in ``status`` (API and CLI)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from thinblock.api.app import NodeInfo, create_app
from thinblock.cli import render_status
from thinblock.config import parse_config
from thinblock.daemon import Daemon
from thinblock.engine import Engine, EngineOptions


@pytest.mark.parametrize(
    ("nbd", "exposed"),
    [
        ({"listen": "127.0.0.1:10809"}, False),
        ({"listen": "[::1]:10809"}, False),
        ({"listen": ""}, False),
        ({"listen": "192.0.2.10:10809"}, True),
        ({"listen": "0.0.0.0:10809", "tls": "allowed", "tls_cert": "c", "tls_key": "k"}, True),
        ({"listen": "0.0.0.0:10809", "tls": "required", "tls_cert": "c", "tls_key": "k"}, False),
    ],
)
def test_exposure_rule(nbd: dict[str, str], exposed: bool) -> None:
    doc: dict[str, object] = {"nbd": {**nbd, "unix_socket": "/tmp/x.sock"}}
    assert Daemon(parse_config(doc))._nbd_exposed_without_tls() is exposed


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    eng = await Engine.open(tmp_path / "data", EngineOptions(destage_delay=0.0))
    yield eng
    await eng.close()


async def test_status_shows_it(engine: Engine) -> None:
    node = NodeInfo(nbd_uri="nbd://192.0.2.10:10809", nbd_tls="off", nbd_exposed_without_tls=True)
    app = create_app(engine, node)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        status = (await c.get("/api/v1/status")).json()
    assert status["nbd"]["tls"] == "off" and status["nbd"]["exposed_without_tls"] is True
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_status(status))
    assert "beyond loopback without TLS" in console.export_text()
