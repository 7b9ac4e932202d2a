"""``thinblock serve --iscsi``: the iSCSI target in the real daemon, off unless asked."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

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
