"""``thinblock serve --iscsi``: the iSCSI target in the real daemon, off unless asked."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.iscsi.client import LoginRefused, RawInitiator
from tests.support.daemon import SMALL_CONFIG, running_daemon
from thinblock.config import DEFAULT_ISCSI_PORT, ConfigError, apply_overrides, parse_config
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
    pinged = parse_config({"iscsi": {"nop_interval": 0, "nop_timeout": 5}}).iscsi
    assert (pinged.nop_interval, pinged.nop_timeout) == (0, 5)
    assert (cfg.iscsi.nop_interval, cfg.iscsi.nop_timeout) == (15.0, 30.0)
    with pytest.raises(ConfigError, match="nop_timeout"):
        parse_config({"iscsi": {"nop_timeout": 0}})


def test_sessions_in_cli_rest_metrics_and_a_deleted_volume(tmp_path: Path) -> None:
    """The admin side: a logged-in initiator shows in `thinblock iscsi sessions`, the REST API
    and the metrics, and in the engine's registry like an NBD client: `vv delete` of its volume
    is refused ("in use by 1 iSCSI session from ..."); --force answers the session the way a
    target whose LUN went away does: an Asynchronous Message with REPORTED LUNS DATA HAS
    CHANGED (3Fh/0Eh), then ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (05h/25h/00h) for
    every command, and a new login is answered "not found" (0203h)."""
    config = SMALL_CONFIG + '\n[iscsi]\nnode_name = "testnode"\n'
    with running_daemon(tmp_path, config=config, args=("--iscsi", "127.0.0.1:0")) as daemon:
        assert daemon.iscsi_portal
        port = int(daemon.iscsi_portal.rsplit(":", 1)[1])
        daemon.cli_json("vv", "create", "spare", "--pool", "default", "--size", "64M")
        spare = TARGET.replace(":vol0", ":spare")

        def metrics() -> str:
            with daemon.http() as client:
                return client.get("/metrics").text

        async def scenario() -> dict[str, Any]:
            client = await RawInitiator.connect(port, spare, "iqn.2026-12.test:admin")
            seen: dict[str, Any] = {"peer": f"127.0.0.1:{client.writer.get_extra_info('sockname')[1]}"}
            try:
                seen["first"] = await client.write16(0, b"\x3c" * 4096)
                seen["sessions"] = await asyncio.to_thread(daemon.cli_json, "iscsi", "sessions")
                seen["table"] = (await asyncio.to_thread(daemon.cli, "iscsi", "sessions")).out
                seen["scraped"] = await asyncio.to_thread(metrics)
                seen["refused"] = await asyncio.to_thread(daemon.cli, "vv", "delete", "spare", "-y")
                seen["shown"] = await asyncio.to_thread(daemon.cli_json, "vv", "show", "spare")
                seen["still"] = await client.read16(0, 8)
                seen["forced"] = await asyncio.to_thread(daemon.cli, "vv", "delete", "spare", "-y", "--force")
                seen["notice"] = await asyncio.wait_for(client.next_pdu(), 10)
                seen["gone"] = await client.test_unit_ready()
                try:
                    await RawInitiator.connect(port, spare, "iqn.2026-12.test:admin")
                except LoginRefused as exc:
                    seen["relogin"] = exc.status
                return seen
            finally:
                await client.close()

        seen = asyncio.run(scenario())
        assert seen["first"].status == 0
        sessions = seen["sessions"]
        assert sessions["portal"] == daemon.iscsi_portal
        [session] = sessions["sessions"]
        assert session["initiator"] == "iqn.2026-12.test:admin"
        assert (session["vv"], session["luns"], session["target"]) == ("spare", [0], spare)
        assert session["address"] == seen["peer"] and session["connections"] == 1
        assert "iqn.2026-12.test:admin" in seen["table"] and "spare" in seen["table"]
        assert 'thinblock_iscsi_sessions{vv="spare"} 1.0' in seen["scraped"], seen["scraped"]
        assert "thinblock_iscsi_connections_total" in seen["scraped"]
        refused = seen["refused"]
        assert refused.code == 1
        assert refused.err == (
            f"error: volume 'spare' is in use by 1 iSCSI session from {seen['peer']}; "
            "disconnect it or use --force\n"
        )
        assert [(c["protocol"], c["peer"]) for c in seen["shown"]["clients"]] == [("iSCSI", seen["peer"])]
        assert seen["still"].status == 0 and seen["still"].data == b"\x3c" * 4096  # still served
        assert seen["forced"].code == 0, seen["forced"].err
        notice = seen["notice"]
        assert notice.opcode == 0x32 and notice.bhs[36] == 0  # a SCSI asynchronous event
        assert (notice.data[2 + 2] & 0x0F, notice.data[2 + 12], notice.data[2 + 13]) == (0x06, 0x3F, 0x0E)
        gone = seen["gone"]
        assert (gone.status, gone.sense_key, gone.asc) == (0x02, 0x05, 0x2500)
        assert seen["relogin"] == 0x0203  # not found
        assert "spare" not in [v["name"] for v in daemon.cli_json("vv", "list")]
        assert daemon.events("iscsi-volume-gone") and daemon.events("vv-delete-disconnect")


def test_qemu_io_holding_a_volume_and_a_forced_delete(tmp_path: Path) -> None:
    """A real initiator (qemu-io over libiscsi, interactive) holds a volume: `vv delete` is
    refused naming its session; after --force qemu-io's next read fails at once (LOGICAL UNIT
    NOT SUPPORTED), it never reads zeros where data was nor waits."""
    config = SMALL_CONFIG + '\n[iscsi]\nnode_name = "testnode"\n'
    with running_daemon(tmp_path, config=config, args=("--iscsi", "127.0.0.1:0")) as daemon:
        daemon.cli_json("vv", "create", "held", "--pool", "default", "--size", "64M")
        uri = daemon.iscsi_uri(TARGET.replace(":vol0", ":held"))
        qemu = subprocess.Popen(
            ["qemu-io", "-f", "raw", uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert qemu.stdin is not None
            qemu.stdin.write("write -P 0x6b 0 64k\n")
            qemu.stdin.flush()
            deadline = time.monotonic() + 30
            while not daemon.cli_json("vv", "show", "held")["clients"] and time.monotonic() < deadline:
                time.sleep(0.1)
            [client] = daemon.cli_json("vv", "show", "held")["clients"]
            assert client["protocol"] == "iSCSI"
            refused = daemon.cli("vv", "delete", "held", "-y")
            assert refused.code == 1
            assert (
                f"is in use by 1 iSCSI session from {client['peer']}; disconnect it or use --force"
                in refused.err
            )
            assert daemon.cli("vv", "delete", "held", "-y", "--force").code == 0
            qemu.stdin.write("read -P 0x6b 0 64k\nquit\n")
            qemu.stdin.flush()
            out, _ = qemu.communicate(timeout=60)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.communicate()
        assert "wrote 65536/65536 bytes" in out, out
        assert "read failed" in out and "read 65536/65536" not in out, out
        assert "LOGICAL_UNIT_NOT_SUPPORTED" in out, out
        assert daemon.events("iscsi-volume-gone")
