"""The asyncio server around the protocol core: error mapping, replies from Tasks, the
read_extents path (holes as holes), back-pressure, connection limits and a clean stop."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import tempfile
from typing import Any

import pytest

from thinblock.blockdev import Buffer, ReadPiece
from thinblock.errors import InvalidArgument, MediumError, OutOfSpace, ReadOnlyDevice, SlowZero
from thinblock.nbd.constants import CommandFlags, Errno
from thinblock.nbd.server import NBDServer, errno_for

from .memvolume import KiB, MemProvider, MemVolume, MiB, SparseMemVolume
from .nbd_helpers import RawClient, request

pytestmark = pytest.mark.e2e

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)


class GatedVolume(MemVolume):
    """Calls wait at a gate the test opens; counts calls started."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.started = 0
        self.fail_with: BaseException | None = None
        self.bad_read = False

    async def _pass(self) -> None:
        self.started += 1
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with

    async def read(self, offset: int, length: int) -> bytes:
        await self._pass()
        data = await super().read(offset, length)
        return data[:-1] if self.bad_read else data

    async def write(self, offset: int, data: Buffer, fua: bool = False) -> None:
        await self._pass()
        await super().write(offset, data, fua)


@pytest.fixture
async def gated() -> GatedVolume:
    return GatedVolume("gated", 8 * MiB, description="gated")


@pytest.fixture
async def server(gated: GatedVolume):
    provider = MemProvider(gated, SparseMemVolume("sparse", 8 * MiB), MemVolume("plain", 8 * MiB))
    srv = NBDServer(provider, default_export="gated", max_requests_per_connection=4)
    await srv.start("127.0.0.1", 0)
    yield srv
    gated.gate.set()
    await srv.stop()


async def open_client(server: NBDServer, export: str, structured: bool = False) -> RawClient:
    client = await RawClient.connect(server)
    await client.go(export, structured=structured, meta=structured)
    return client


async def wait_for(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_errno_mapping() -> None:
    assert errno_for(OutOfSpace("x")) == Errno.ENOSPC
    assert errno_for(MediumError("x")) == Errno.EIO
    assert errno_for(InvalidArgument("x")) == Errno.EINVAL
    assert errno_for(SlowZero("x"), CommandFlags.FAST_ZERO) == Errno.ENOTSUP
    assert errno_for(ReadOnlyDevice("x")) == Errno.EPERM
    assert errno_for(asyncio.CancelledError()) == Errno.ESHUTDOWN
    assert errno_for(KeyError("x")) == Errno.EIO


async def test_replies_come_from_tasks_as_requests_complete(server: NBDServer, gated: GatedVolume) -> None:
    client = await open_client(server, "gated")
    client.send(request(WRITE, 1, 0, 4) + b"abcd" + request(READ, 2, 0, 4) + request(FLUSH, 3))
    await wait_for(lambda: gated.started == 2)
    # FLUSH is not gated: it is answered while the others wait.
    assert await client.simple_reply() == (0, 3)
    gated.gate.set()
    replies = {}
    for _ in range(2):
        error, handle = await client.simple_reply()
        replies[handle] = error
        if handle == 2:
            data = await client.recv(4)
    assert replies == {1: 0, 2: 0}
    assert data in (b"abcd", bytes(4))  # the read may run before or after the write
    await client.aclose()


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (OutOfSpace("limit"), 28),
        (MediumError("disk gone"), 5),
        (InvalidArgument("bad"), 22),
        (ReadOnlyDevice("ro"), 1),
        (RuntimeError("bug"), 5),
    ],
)
async def test_volume_exceptions_become_errors_and_the_connection_goes_on(
    server: NBDServer, gated: GatedVolume, exc: BaseException, error: int, caplog: pytest.LogCaptureFixture
) -> None:
    client = await open_client(server, "gated", structured=True)
    gated.fail_with = exc
    gated.gate.set()
    with caplog.at_level(logging.DEBUG, logger="thinblock.nbd"):
        client.send(request(READ, 1, 0, 512))
        _magic, flags, type_, handle, payload = await client.reply()
    assert (type_, handle) == (0x8001, 1) and flags & 1
    assert struct.unpack(">I", payload[:4])[0] == error
    if isinstance(exc, RuntimeError):
        assert any("failed unexpectedly" in r.getMessage() for r in caplog.records)
    gated.fail_with = None
    client.send(request(READ, 2, 0, 512))
    _magic, flags, type_, handle, payload = await client.reply()
    assert (type_, handle) == (1, 2) and len(payload) == 8 + 512
    await client.aclose()


async def test_read_of_the_wrong_length_is_an_error_not_garbage(
    server: NBDServer, gated: GatedVolume
) -> None:
    client = await open_client(server, "gated")
    gated.bad_read = True
    gated.gate.set()
    client.send(request(READ, 1, 0, 512) + request(READ, 2, 0, 0))
    assert await client.simple_reply() == (5, 1)  # and no payload: the next reply follows at once
    assert await client.simple_reply() == (0, 2)
    await client.aclose()


async def test_holes_are_not_sent_as_zeros(server: NBDServer) -> None:
    client = await open_client(server, "sparse", structured=True)
    client.send(request(WRITE, 1, 64 * KiB, 4096) + b"\x42" * 4096)
    assert (await client.reply())[3] == 1
    client.send(request(READ, 2, 0, 1 * MiB))
    chunks = []
    while True:
        _magic, flags, type_, _handle, payload = await client.reply()
        chunks.append((type_, payload))
        if flags & 1:
            break
    # OFFSET_HOLE (2): offset + size; OFFSET_DATA (1): offset + the data
    assert [t for t, _p in chunks] == [2, 1, 2]
    assert struct.unpack(">QI", chunks[0][1]) == (0, 64 * KiB)
    assert chunks[1][1] == struct.pack(">Q", 64 * KiB) + b"\x42" * 4096 + bytes(60 * KiB)
    assert struct.unpack(">QI", chunks[2][1]) == (128 * KiB, 1 * MiB - 128 * KiB)
    assert sum(len(p) for _t, p in chunks) < 80 * KiB  # not a megabyte of zeros
    await client.aclose()


async def test_async_read_extents_is_awaited() -> None:
    class AsyncExtents(SparseMemVolume):
        async def read_extents(self, offset: int, length: int) -> list[ReadPiece]:
            await asyncio.sleep(0)  # suspends: the server's Task path
            return await super().read_extents(offset, length)

    srv = NBDServer(MemProvider(AsyncExtents("v", 1 * MiB)))
    await srv.start("127.0.0.1", 0)
    try:
        client = await open_client(srv, "v", structured=True)
        client.send(request(READ, 9, 0, 4096))
        _magic, flags, type_, handle, payload = await client.reply()
        assert (type_, handle, flags & 1) == (2, 9, 1) and struct.unpack(">QI", payload) == (0, 4096)
        await client.aclose()
    finally:
        await srv.stop()


async def test_back_pressure_limits_requests_in_flight(server: NBDServer, gated: GatedVolume) -> None:
    client = await open_client(server, "gated")
    for handle in range(12):
        client.send(request(READ, handle, handle * 4096, 4096))
    await wait_for(lambda: gated.started == 4)
    await asyncio.sleep(0.1)
    assert gated.started == 4  # max_requests_per_connection: the rest wait in the buffers
    gated.gate.set()
    seen = set()
    for _ in range(12):
        error, handle = await client.simple_reply()
        assert error == 0
        await client.recv(4096)
        seen.add(handle)
    assert seen == set(range(12))
    await client.aclose()


async def test_connection_limit() -> None:
    srv = NBDServer(MemProvider(MemVolume("v", 1 * MiB)), max_connections=2)
    await srv.start("127.0.0.1", 0)
    try:
        first = await open_client(srv, "v")
        second = await open_client(srv, "v")
        third = await RawClient.connect(srv)
        assert await third.closed_by_server()
        for client in (first, second):
            client.send(request(FLUSH, 5))
            assert await client.simple_reply() == (0, 5)
            await client.aclose()
        await wait_for(lambda: srv.connection_count == 0)
        fourth = await open_client(srv, "v")  # room again
        await fourth.aclose()
    finally:
        await srv.stop()


async def test_client_vanishing_mid_request_costs_only_its_connection(
    server: NBDServer, gated: GatedVolume
) -> None:
    client = await open_client(server, "gated")
    client.send(request(WRITE, 1, 0, 4) + b"abcd")
    await wait_for(lambda: gated.started == 1)
    client.writer.transport.abort()
    await asyncio.sleep(0.05)
    gated.gate.set()  # the write completes; its reply has nowhere to go
    other = await open_client(server, "gated")
    other.send(request(READ, 2, 0, 4))
    assert await other.simple_reply() == (0, 2)
    assert await other.recv(4) == b"abcd"
    await other.aclose()


async def test_stop_finishes_requests_in_flight_flushes_and_closes(
    server: NBDServer, gated: GatedVolume
) -> None:
    client = await open_client(server, "gated")
    busy = await open_client(server, "plain")
    negotiating = await RawClient.connect(server)
    await negotiating.greeting()
    client.send(request(WRITE, 1, 0, 4) + b"wxyz")
    await wait_for(lambda: gated.started == 1)
    flushes = gated.flushes
    stopping = asyncio.ensure_future(server.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()  # waiting for the write in flight
    assert await negotiating.closed_by_server()
    gated.gate.set()
    assert await client.simple_reply() == (0, 1)  # the write in flight finished and was answered
    await asyncio.wait_for(stopping, 10)
    await asyncio.wait_for(server.serve_forever(), 1)  # returns once stopped
    assert gated.flushes > flushes  # every opened volume was flushed
    assert await client.closed_by_server()
    assert await busy.closed_by_server()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port or 1)
    assert await gated.read(0, 4) == b"wxyz"


async def test_requests_received_during_stop_get_eshutdown(gated: GatedVolume) -> None:
    srv = NBDServer(MemProvider(gated), max_requests_per_connection=1)
    await srv.start("127.0.0.1", 0)
    client = await open_client(srv, "gated")
    client.send(request(READ, 1, 0, 4) + request(READ, 2, 0, 4))
    await wait_for(lambda: gated.started == 1)
    await asyncio.sleep(0.05)  # the second read waits in the buffer (one request in flight at most)
    stopping = asyncio.ensure_future(srv.stop())
    await asyncio.sleep(0.05)
    gated.gate.set()
    replies = {}
    for _ in range(2):
        error, handle = await client.simple_reply()
        replies[handle] = error
        if error == 0:
            await client.recv(4)
    assert replies == {1: 0, 2: 108}  # NBD_ESHUTDOWN for the one not started
    await asyncio.wait_for(stopping, 10)


async def test_unix_socket_replaces_a_stale_socket_and_is_removed_on_stop() -> None:
    directory = tempfile.mkdtemp(prefix="tbnbd")
    path = os.path.join(directory, "s")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # a socket file left behind by a crashed server
    stale.close()
    assert os.path.exists(path)
    second = NBDServer(MemProvider(MemVolume("v", 1 * MiB)))
    await second.start(None, None, unix_path=path)
    try:
        assert second.port is None and second.unix_path == path
        client = await RawClient.connect(second, unix=True)
        await client.go("v")
        client.send(request(FLUSH, 1))
        assert await client.simple_reply() == (0, 1)
        await client.aclose()
    finally:
        await second.stop()
    assert not os.path.exists(path)
    # Anything else at that path is left alone.
    with open(path, "w") as f:
        f.write("not a socket")
    with pytest.raises(OSError):
        await NBDServer(MemProvider()).start(None, None, unix_path=path)
    with open(path) as f:
        assert f.read() == "not a socket"
    os.unlink(path)
    os.rmdir(directory)


async def test_start_needs_somewhere_to_listen() -> None:
    with pytest.raises(ValueError):
        await NBDServer(MemProvider()).start(None, None, None)
