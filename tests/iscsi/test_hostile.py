"""Bad input costs only its own connection: a login that never finishes, a malformed PDU, a
wrong digest, an oversized data segment; another session on the same target goes on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.e2e.memvolume import MemProvider, SparseMemVolume
from thinblock.iscsi.server import ISCSIServer
from thinblock.units import MiB

from .client import RawInitiator
from .initiator import login_request, nop_out


@pytest.fixture
async def server() -> AsyncIterator[ISCSIServer]:
    server = ISCSIServer(MemProvider(SparseMemVolume("vol0", 16 * MiB)), node_name="h", login_timeout=0.5)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()


async def closed_by_target(reader: asyncio.StreamReader, timeout: float = 10.0) -> bool:
    """True when the target closed the connection (EOF or reset), reading whatever it sent first."""
    try:
        while await asyncio.wait_for(reader.read(65536), timeout):
            pass
    except ConnectionError:
        pass
    return True


async def test_bad_connections_close_alone(server: ISCSIServer) -> None:
    port = server.port or 0
    target = server.target_name("vol0")
    good = await RawInitiator.connect(port, target, "iqn.2026-12.test:good")
    try:
        write = await good.write16(0, b"\x42" * 4096)
        assert write.status == 0

        # 1. a login that never finishes (half a header, then silence)
        r1, w1 = await asyncio.open_connection("127.0.0.1", port)
        w1.write(login_request([("InitiatorName", "iqn.x:slow")], csg=1, nsg=3)[:20])
        # 2. a malformed PDU: an opcode only targets send
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(bytes([0x21]) + bytes(47))
        # 3. an oversized data segment after login (16 MiB - 1 announced)
        bad = await RawInitiator.connect(port, target, "iqn.2026-12.test:big")
        header = bytearray(nop_out(itt=5, cmdsn=1))
        header[5:8] = (16 * MiB - 1).to_bytes(3, "big")
        bad.writer.write(bytes(header))
        # 4. garbage during login
        r4, w4 = await asyncio.open_connection("127.0.0.1", port)
        w4.write(b"\x03" + b"\xff" * 47)

        results = await asyncio.gather(
            closed_by_target(r1), closed_by_target(r2), closed_by_target(bad.reader), closed_by_target(r4)
        )
        assert all(results)
        for writer in (w1, w2, w4):
            writer.close()
        await bad.close()

        # the good session never noticed
        read = await good.read16(0, 8)
        assert read.status == 0 and read.data == b"\x42" * 4096
        assert len([s for s in server.sessions() if s["initiator"] == "iqn.2026-12.test:good"]) == 1
    finally:
        await good.close()
    await asyncio.sleep(0.1)
    assert server.sessions() == []
