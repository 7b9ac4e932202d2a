"""Replies of requests that finish together leave together: the NBD server answers requests
that completed in tasks in the same loop turn with one transport write.

A mirrored write-back volume's writes all wait for the partner's acknowledgement; one batch of
ACKs wakes a dozen of them at once.  The server used to flush after each finished task, one send
(a loopback syscall, and a wakeup of the client) per reply; issue 12's profile of the mirrored
4 KiB path showed the reply sends as its largest line."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support.wire import request
from thinblock.blockdev import Buffer
from thinblock.nbd.constants import Command
from thinblock.nbd.server import NBDServer

from .memvolume import MemProvider, MiB, SparseMemVolume
from .nbd_helpers import RawClient

WRITES = 8


class GatedVolume(SparseMemVolume):
    """Every write waits for one shared gate (as mirrored writes wait for one batch of ACKs)."""

    def __init__(self) -> None:
        super().__init__("vol0", 4 * MiB)
        self.gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting = 0

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        self.waiting += 1
        await self.gate
        await super().write(offset, data, fua)


class CountingTransport:
    """The connection's transport, counting the writes the server makes to it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes = 0

    def write(self, data: Buffer) -> None:
        self.writes += 1
        self.inner.write(data)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.inner, attr)


async def test_replies_of_requests_finishing_together_go_out_in_one_write() -> None:
    volume = GatedVolume()
    server = NBDServer(MemProvider(volume), default_export="vol0")
    await server.start("127.0.0.1", 0)
    client = await RawClient.connect(server)
    try:
        await client.go("vol0", structured=False)
        for handle in range(1, WRITES + 1):
            client.send(
                request(Command.WRITE, handle, offset=handle * 4096, length=4096) + bytes([handle]) * 4096
            )
        for _ in range(200):
            if volume.waiting == WRITES:
                break
            await asyncio.sleep(0.01)
        assert volume.waiting == WRITES, "the writes did not all reach the volume"
        (connection,) = server._connections
        counting = CountingTransport(connection.transport)
        connection.transport = counting
        volume.gate.set_result(None)  # every write finishes in this loop turn
        handles = set()
        for _ in range(WRITES):
            error, handle = await client.simple_reply()
            assert error == 0
            handles.add(handle)
        assert handles == set(range(1, WRITES + 1))
        assert counting.writes == 1, f"{counting.writes} transport writes for {WRITES} replies"
        data = bytes(await volume.read(3 * 4096, 4096))
        assert data == bytes([3]) * 4096
    finally:
        await client.aclose()
        await server.stop()
