"""The iSCSI target against real initiators no one here wrote: libiscsi's tools (iscsi-ls,
iscsi-inq, iscsi-readcapacity16) and qemu's libiscsi driver (qemu-img, qemu-io), on the
same providers as the NBD client tests (the in-memory toy and the real engine)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from thinblock.blockdev import VolumeProvider
from thinblock.iscsi.server import ISCSIServer

from .memvolume import MiB
from .nbd_helpers import nbd_provider, read_volume, run

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("iscsi-ls", "iscsi-inq", "iscsi-readcapacity16", "qemu-io")),
        reason="needs libiscsi-bin and qemu-utils (with qemu-block-extra)",
    ),
]
__all__ = ["nbd_provider"]
NODE = "node1"


@pytest.fixture
async def iscsi_server(nbd_provider: VolumeProvider) -> AsyncIterator[ISCSIServer]:
    server = ISCSIServer(nbd_provider, node_name=NODE)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()


def lun_uri(server: ISCSIServer, vv: str) -> str:
    return f"iscsi://127.0.0.1:{server.port}/{server.target_name(vv)}/0"


def qemu_io(target: str, *commands: str) -> list[str]:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    return [*argv, target]


def assert_all_ok(out: str) -> None:
    for bad in ("Pattern verification failed", "failed", "error"):
        assert bad not in out, out


async def test_iscsi_ls_discovers_one_target_per_volume(iscsi_server: ISCSIServer) -> None:
    result = (await run("iscsi-ls", "-s", f"iscsi://127.0.0.1:{iscsi_server.port}")).check()
    targets = re.findall(r"Target:(\S+) Portal:(\S+)", result.out)
    assert sorted(t for t, _ in targets) == sorted(
        f"iqn.2026-12.org.thinblock:{NODE}:{vv}" for vv in ("vol0", "vol1", "limited")
    ), result.out
    assert all(portal == f"127.0.0.1:{iscsi_server.port},1" for _, portal in targets)
    # one LUN each, a direct-access device
    assert result.out.count("Lun:0    Type:DIRECT_ACCESS") == 3, result.out


async def test_iscsi_inq_standard_and_vpd_pages(iscsi_server: ISCSIServer) -> None:
    target = lun_uri(iscsi_server, "vol0")
    standard = (await run("iscsi-inq", target)).check().out
    assert "Peripheral Device Type:DIRECT_ACCESS" in standard
    assert "Vendor:THINBLK" in standard and "CmdQue:1" in standard
    pages = (await run("iscsi-inq", "-e", "1", "-c", "0", target)).check().out
    for page in ("0x00", "0x80", "0x83", "0xb0", "0xb1", "0xb2"):
        assert f"Page:{page}" in pages, pages
    serial = (await run("iscsi-inq", "-e", "1", "-c", "128", target)).check().out
    assert re.search(r"Unit Serial Number:\[[0-9a-f]{16}\]", serial), serial
    ident = (await run("iscsi-inq", "-e", "1", "-c", "131", target)).check().out
    assert f"Designator:[iqn.2026-12.org.thinblock:{NODE}:vol0]" in ident, ident
    assert "Designator Type:(3) NAA" in ident
    limits = (await run("iscsi-inq", "-e", "1", "-c", "176", target)).check().out
    assert "maximum unmap lba count:1048576" in limits and "ugavalid:1" in limits, limits
    provisioning = (await run("iscsi-inq", "-e", "1", "-c", "178", target)).check().out
    for line in ("lbpu:1", "lbpws:1", "lbpws10:1", "lbprz:1", "provisioning type:2"):
        assert line in provisioning, provisioning
    characteristics = (await run("iscsi-inq", "-e", "1", "-c", "177", target)).check().out
    assert "Medium Rotation Rate:1" in characteristics  # 1: non-rotating medium


async def test_iscsi_readcapacity16_says_thin_and_reads_zeros(iscsi_server: ISCSIServer) -> None:
    out = (await run("iscsi-readcapacity16", lun_uri(iscsi_server, "vol1"))).check().out
    assert f"RETURNED LOGICAL BLOCK ADDRESS:{16 * MiB // 512 - 1}" in out, out
    assert "LOGICAL BLOCK LENGTH IN BYTES:512" in out
    assert "LBPME:1 LBPRZ:1" in out
    assert f"Total size:{16 * MiB}" in out


async def test_unknown_target_is_refused(iscsi_server: ISCSIServer) -> None:
    result = await run(
        "iscsi-inq", f"iscsi://127.0.0.1:{iscsi_server.port}/iqn.2026-12.org.thinblock:{NODE}:nosuch/0"
    )
    assert result.code != 0


async def test_qemu_io_patterns_over_iscsi(iscsi_server: ISCSIServer, nbd_provider: VolumeProvider) -> None:
    end = 64 * MiB
    target = lun_uri(iscsi_server, "vol0")
    result = (
        await run(
            *qemu_io(
                target,
                "write -P 0xab 0 1M",
                "read -P 0xab 0 1M",
                "write -P 0xcd 4095k 3M",  # across region boundaries, bigger than one burst
                "read -P 0xcd 4095k 3M",
                "write -f -P 0x11 8M 4k",  # FUA
                "read -P 0x11 8M 4k",
                f"write -P 0xee {end - 4096} 4096",  # the very end
                f"read -P 0xee {end - 4096} 4096",
                "aio_write -P 0x22 16M 64k",
                "aio_write -P 0x33 17M 64k",
                "aio_flush",
                "read -P 0x22 16M 64k",
                "read -P 0x33 17M 64k",
                "flush",
            )
        )
    ).check()
    assert_all_ok(result.out)
    volume = nbd_provider.open_volume("vol0")
    assert await read_volume(volume, 0, MiB) == b"\xab" * MiB
    assert await read_volume(volume, end - 4096, 4096) == b"\xee" * 4096
    # past the end: refused (LBA out of range), nothing written
    beyond = await run(*qemu_io(target, f"write -P 0x1 {end} 4096"))
    assert "Input/output error" in beyond.out + beyond.err or beyond.code != 0


async def test_qemu_io_discard_and_zero_write_give_space_back(
    iscsi_server: ISCSIServer, nbd_provider: VolumeProvider
) -> None:
    target = lun_uri(iscsi_server, "vol0")
    (await run(*qemu_io(target, "write -P 0x5a 0 8M"))).check()
    volume = nbd_provider.open_volume("vol0")
    before = await volume.block_status(0, 8 * MiB)
    assert all(int(e.flags) == 0 for e in before)
    # discard -> UNMAP; write -z -u -> WRITE SAME (16) with UNMAP
    out = (await run(*qemu_io(target, "discard 0 4M", "write -z -u 4M 4M", "read -P 0 0 8M"))).check().out
    assert_all_ok(out)
    after = await volume.block_status(0, 8 * MiB)
    assert sum(e.length for e in after if int(e.flags) & 1) == 8 * MiB, after


async def test_qemu_img_convert_in_and_out_and_the_map(iscsi_server: ISCSIServer, tmp_path: Path) -> None:
    image = tmp_path / "in.raw"
    with image.open("wb") as f:
        f.truncate(16 * MiB)
        f.seek(2 * MiB)
        f.write(os.urandom(MiB))
        f.seek(9 * MiB)
        f.write(os.urandom(512 * 1024))
    target = lun_uri(iscsi_server, "vol1")
    (await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), target)).check()
    back = tmp_path / "out.raw"
    (await run("qemu-img", "convert", "-f", "raw", "-O", "raw", target, str(back))).check()
    assert back.read_bytes() == image.read_bytes()
    # The allocation map through GET LBA STATUS: data where the image had data.
    extents = json.loads((await run("qemu-img", "map", "--output=json", "-f", "raw", target)).check().out)
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    covered = sum(n for _, n in data)
    assert covered < 16 * MiB  # holes stay holes
    for start, length in ((2 * MiB, MiB), (9 * MiB, 512 * 1024)):
        assert any(s <= start and start + length <= s + n for s, n in data), (start, data)


async def test_qemu_answers_nop_in_pings_and_stays_connected(nbd_provider: VolumeProvider) -> None:
    """Pinging an idle initiator must not cost a live one its session: qemu's libiscsi answers
    the target's NOP-In (pings every 0.2 s, 0.5 s to answer), so an idle qemu-io stays
    logged in on one connection for many intervals."""
    server = ISCSIServer(nbd_provider, node_name=NODE, nop_interval=0.2, nop_timeout=0.5)
    await server.start("127.0.0.1", 0)
    name = nbd_provider.export_names()[0]
    uri = f"iscsi://127.0.0.1:{server.port}/{server.target_name(name)}/0"
    qemu = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "raw", uri, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL
    )
    try:
        assert qemu.stdin is not None
        qemu.stdin.write(b"write -P 0x21 0 4k\n")
        await qemu.stdin.drain()
        deadline = asyncio.get_running_loop().time() + 30
        while not server.sessions() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        pinged = server.sessions()[0]["commands"]
        [connection] = server._connections
        pdus = connection.core.pdus_in
        await asyncio.sleep(3)  # 15 ping intervals, idle
        assert connection.core.pdus_in - pdus >= 3  # the answers (NOP-Out) did come
        [session] = server.sessions()
        assert session["connections"] == 1 and server.connections_total == 1
        assert session["commands"] == pinged  # nothing but pings and their answers
        assert server.logins_failed == 0
    finally:
        qemu.kill()
        await qemu.wait()
        await server.stop()
