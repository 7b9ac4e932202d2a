"""Per-volume access lists (nbd/access.py) with real clients against the asyncio server: a volume
a client may not open is neither listed nor opened; a read-only one advertises
NBD_FLAG_READ_ONLY and answers writes with EPERM; the Unix socket and TCP addresses are told
apart.  Certificate subjects are matched after STARTTLS (the identity is read when the option is
answered): the policy for them is tested in tests/unit/test_nbd_access.py."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.drills.hostile_helpers import RawClient
from tests.support.daemon import SMALL_CONFIG, start_daemon
from thinblock.nbd.access import AccessList, AccessRule
from thinblock.nbd.server import NBDServer

from .client_tools import qemu_io, run_tool
from .memvolume import MemProvider, MemVolume, MiB
from .nbd_helpers import run

pytestmark = pytest.mark.e2e


@pytest.fixture
async def server() -> AsyncIterator[NBDServer]:
    provider = MemProvider(
        MemVolume("open", 4 * MiB), MemVolume("ro-here", 4 * MiB), MemVolume("unix-only", 4 * MiB)
    )
    access = AccessList(
        [
            AccessRule("ro-here", "127.0.0.0/8", "ro"),
            AccessRule("ro-here", "unix", "rw"),
            AccessRule("unix-only", "unix", "rw"),
        ]
    )
    sockdir = tempfile.mkdtemp(prefix="tbacl")
    srv = NBDServer(provider, access=access)
    await srv.start("127.0.0.1", 0, unix_path=f"{sockdir}/nbd.sock")
    try:
        yield srv
    finally:
        await srv.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


async def test_tcp_client_sees_and_opens_only_what_it_may(server: NBDServer) -> None:
    tcp = f"nbd://127.0.0.1:{server.port}"
    listed = json.loads((await run("nbdinfo", "--list", "--json", tcp + "/")).check().out)
    assert sorted(e["export-name"] for e in listed["exports"]) == ["open", "ro-here"]
    refused = await run("nbdinfo", "--size", tcp + "/unix-only")
    assert refused.code != 0 and "unix-only" in refused.err
    info = json.loads((await run("nbdinfo", "--json", tcp + "/ro-here")).check().out)
    assert info["exports"][0]["is_read_only"] is True
    write = await run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", tcp + "/ro-here")
    assert "Operation not permitted" in write.err + write.out or write.code != 0, write
    assert "wrote" not in write.out
    read = (await run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 4k", tcp + "/ro-here")).check()
    assert "read 4096/4096" in read.out
    (await run("qemu-io", "-f", "raw", "-c", "write -P 2 0 4k", tcp + "/open")).check()


async def test_unix_socket_client_has_its_own_rights(server: NBDServer) -> None:
    unix = f"nbd+unix:///{{}}?socket={server.unix_path}"
    listed = json.loads((await run("nbdinfo", "--list", "--json", unix.format(""))).check().out)
    assert sorted(e["export-name"] for e in listed["exports"]) == ["open", "ro-here", "unix-only"]
    (await run("qemu-io", "-f", "raw", "-c", "write -P 3 0 4k", unix.format("ro-here"))).check()
    read = (await run("qemu-io", "-f", "raw", "-r", "-c", "read -P 3 0 4k", unix.format("ro-here"))).check()
    assert "read 4096/4096" in read.out
    (await run("qemu-io", "-f", "raw", "-c", "write -P 4 0 4k", unix.format("unix-only"))).check()


def test_rules_changed_from_the_cli_apply_to_new_connections_and_persist(tmp_path: Path) -> None:
    """``thinblock vv access`` on the real daemon: a denied client no longer lists nor opens the
    volume, a read-only grant makes qemu-io's write fail with EPERM, a connection opened before
    the change keeps what it opened, and the rules survive a restart (DATA_DIR/nbd-access.json)."""
    for tool in ("nbdinfo", "qemu-io"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Makefile APT_PKGS: libnbd-bin, qemu-utils)")
    daemon = start_daemon(tmp_path, config=SMALL_CONFIG)
    try:
        uri = daemon.uri("vol0")
        before = RawClient(daemon.nbd_port).negotiate("vol0")  # in transmission before any rule
        assert daemon.cli("vv", "access", "vol0", "deny", "127.0.0.1").code == 0
        listed = json.loads(
            run_tool("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{daemon.nbd_port}").stdout
        )
        assert "vol0" not in [e["export-name"] for e in listed["exports"]]
        assert run_tool("nbdinfo", uri, check=False).returncode != 0
        assert before.write(0, b"\x11" * 4096).error == 0  # the open connection is untouched
        before.disconnect()

        assert daemon.cli("vv", "access", "vol0", "remove", "127.0.0.1").code == 0
        assert daemon.cli("vv", "access", "vol0", "allow", "127.0.0.0/8", "--read-only").code == 0
        info = json.loads(run_tool("nbdinfo", "--json", uri).stdout)
        assert info["exports"][0]["is_read_only"] is True
        refused = qemu_io(uri, "write -P 0x22 0 4k", check=False)  # qemu refuses to open it read-write
        assert refused.returncode != 0 and "wrote" not in refused.stdout, refused
        read = run_tool("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x11 0 4k", uri)
        assert "read 4096/4096" in read.stdout, read
        shown = daemon.cli_json("vv", "show", "vol0")["access"]
        assert shown["restricted"] and [(r["client"], r["mode"], r["source"]) for r in shown["rules"]] == [
            ("127.0.0.0/8", "ro", "api")
        ]
        assert daemon.stop() == 0, daemon.log_tail()
        daemon.start()
        uri = daemon.uri("vol0")
        info = json.loads(run_tool("nbdinfo", "--json", uri).stdout)
        assert info["exports"][0]["is_read_only"] is True, "the rule did not survive a restart"
        audit = (daemon.data_dir / "audit.log").read_text()
        assert audit.count("/volumes/vol0/access") >= 3
    finally:
        if daemon.running:
            assert daemon.stop() == 0, daemon.log_tail()
