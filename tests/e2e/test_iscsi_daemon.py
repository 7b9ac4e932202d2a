"""``thinblock serve --iscsi``: the iSCSI target in the real daemon, off unless asked."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.iscsi.client import Outcome, RawInitiator
from tests.support.daemon import SMALL_CONFIG, running_daemon
from thinblock.config import DEFAULT_ISCSI_PORT, apply_overrides, parse_config
from thinblock.units import MiB

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("iscsi-ls", "qemu-io")), reason="needs libiscsi-bin and qemu-utils"
    ),
]
TARGET = "iqn.2026-12.org.thinblock:testnode:vol0"


def tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_iscsi_is_off_unless_asked(tmp_path: Path) -> None:
    with running_daemon(tmp_path, config=SMALL_CONFIG) as daemon:
        assert daemon.iscsi_portal is None
        assert not daemon.events("iscsi-listening")


def test_serve_iscsi_flag_exports_every_volume(tmp_path: Path) -> None:
    config = SMALL_CONFIG + '\n[iscsi]\nnode_name = "TestNode"\n'
    with running_daemon(tmp_path, config=config, args=("--iscsi", "127.0.0.1:0")) as daemon:
        assert daemon.iscsi_portal
        listing = tool("iscsi-ls", "-s", f"iscsi://{daemon.iscsi_portal}")
        assert listing.returncode == 0, listing.stderr
        assert f"Target:{TARGET} Portal:{daemon.iscsi_portal},1" in listing.stdout, listing.stdout
        uri = daemon.iscsi_uri(TARGET)
        io = tool("qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 2M", "-c", "read -P 0x3c 0 2M", uri)
        assert io.returncode == 0 and "verification failed" not in io.stdout, io.stdout + io.stderr
        # the same volume through NBD sees the data: one engine behind both protocols
        nbd = tool("qemu-io", "-f", "raw", "-c", "read -P 0x3c 0 2M", daemon.uri("vol0"))
        assert nbd.returncode == 0 and "verification failed" not in nbd.stdout, nbd.stdout
        assert daemon.cli_json("vv", "show", "vol0")["allocated"] == 2 * MiB


def test_iscsi_listen_config_key_and_default_port() -> None:
    cfg = parse_config({"iscsi": {"listen": "127.0.0.1"}})
    assert cfg.iscsi.listen is not None and cfg.iscsi.listen.port == DEFAULT_ISCSI_PORT
    assert parse_config({}).iscsi.listen is None
    flagged = apply_overrides(parse_config({}), iscsi="0.0.0.0")
    assert flagged.iscsi.listen is not None and flagged.iscsi.listen.port == DEFAULT_ISCSI_PORT
    off = apply_overrides(cfg, iscsi="")
    assert off.iscsi.listen is None


def test_sessions_in_cli_rest_metrics_and_a_deleted_volume(tmp_path: Path) -> None:
    """The admin side: a logged-in initiator shows in `thinblock iscsi sessions`, the REST API
    and the metrics; deleting its volume under it answers ILLEGAL REQUEST, LOGICAL UNIT NOT
    SUPPORTED (05h/25h/00h), as a target whose LUN went away does."""
    config = SMALL_CONFIG + '\n[iscsi]\nnode_name = "testnode"\n'
    with running_daemon(tmp_path, config=config, args=("--iscsi", "127.0.0.1:0")) as daemon:
        assert daemon.iscsi_portal
        port = int(daemon.iscsi_portal.rsplit(":", 1)[1])
        daemon.cli_json("vv", "create", "spare", "--pool", "default", "--size", "64M")
        spare = TARGET.replace(":vol0", ":spare")

        def metrics() -> str:
            with daemon.http() as client:
                return client.get("/metrics").text

        async def scenario() -> tuple[Outcome, Any, str, str, Outcome]:
            client = await RawInitiator.connect(port, spare, "iqn.2026-12.test:admin")
            try:
                first = await client.test_unit_ready()
                sessions = await asyncio.to_thread(daemon.cli_json, "iscsi", "sessions")
                table = (await asyncio.to_thread(daemon.cli, "iscsi", "sessions")).out
                scraped = await asyncio.to_thread(metrics)
                await asyncio.to_thread(daemon.cli_json, "vv", "delete", "spare")
                gone = await client.test_unit_ready()
                return first, sessions, table, scraped, gone
            finally:
                await client.close()

        first, sessions, table, scraped, gone = asyncio.run(scenario())
        assert first.status == 0
        assert sessions["portal"] == daemon.iscsi_portal
        [session] = sessions["sessions"]
        assert session["initiator"] == "iqn.2026-12.test:admin"
        assert (session["vv"], session["luns"], session["target"]) == ("spare", [0], spare)
        assert session["address"].startswith("127.0.0.1:")
        assert "iqn.2026-12.test:admin" in table and "spare" in table
        assert 'thinblock_iscsi_sessions{vv="spare"} 1.0' in scraped, scraped
        assert "thinblock_iscsi_connections_total" in scraped
        assert (gone.status, gone.sense_key, gone.asc) == (0x02, 0x05, 0x2500)
