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

import pytest

from thinblock.nbd.access import AccessList, AccessRule
from thinblock.nbd.server import NBDServer

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
