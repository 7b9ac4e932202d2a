"""Hostile NBD clients against a live server (issue 6, drill 4): each misbehaviour costs at
most its own connection -- an error reply or a disconnect as the spec says -- while a
bystander connection opened beforehand and fresh clients afterwards keep working, no data
changes, and memory stays bounded."""

from __future__ import annotations

import asyncio
import struct

import pytest

from thinblock.blockdev import VolumeProvider
from thinblock.nbd.server import NBDServer

from .memvolume import MiB
from .nbd_helpers import (
    RawClient,
    canary,
    info_payload,
    meta_payload,
    nbd_provider,
    nbd_server,
    option,
    read_volume,
    request,
    rss_bytes,
)

pytestmark = pytest.mark.e2e
__all__ = ["nbd_provider", "nbd_server"]

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
EINVAL, ENOSPC = 22, 28
ERR_INVALID, ERR_TOO_BIG = 0x80000003, 0x80000009


class Bystander:
    """A well-behaved client connected before the hostile one, checked after it."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.handle = 1000

    @classmethod
    async def open(cls, server: NBDServer) -> Bystander:
        client = await RawClient.connect(server)
        await client.go("vol0", structured=False)
        return cls(client)

    async def check(self) -> None:
        self.handle += 1
        data = self.handle.to_bytes(8, "big") * 512
        offset = 60 * MiB
        self.client.send(request(WRITE, self.handle, offset, len(data)) + data)
        assert await self.client.simple_reply() == (0, self.handle)
        self.client.send(request(READ, self.handle + 1, offset, len(data)))
        assert await self.client.simple_reply() == (0, self.handle + 1)
        assert await self.client.recv(len(data)) == data
        self.handle += 1

    async def close(self) -> None:
        self.client.send(request(DISC))
        await self.client.aclose()


@pytest.fixture
async def bystander(nbd_server: NBDServer):
    b = await Bystander.open(nbd_server)
    yield b
    await b.check()  # every test ends by proving the bystander never noticed
    await b.close()
    await canary(nbd_server)  # and that new clients are served


async def connected(
    server: NBDServer, structured: bool = False, meta: bool = False, export: str = "vol1"
) -> RawClient:
    client = await RawClient.connect(server)
    await client.go(export, structured=structured, meta=meta)
    return client


# --- transmission phase -------------------------------------------------------------------------


@pytest.mark.parametrize("magic", [0x25609514, 0x12560953, 0, 0xFFFFFFFF])
async def test_bad_request_magic_closes_only_that_connection(nbd_server, bystander, magic: int) -> None:
    client = await connected(nbd_server)
    client.send(struct.pack(">I", magic) + request(READ, 1, 0, 512)[4:])
    assert await client.closed_by_server()
    await bystander.check()


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (request(9, 1, 0, 512), EINVAL),  # unknown command
        (request(0xFFFF, 1), EINVAL),
        (request(READ, 1, 0, 512, 0x40), EINVAL),  # unknown flag
        (request(READ, 1, 0, 512, 2), EINVAL),  # NO_HOLE on a read
        (request(TRIM, 1, 0, 512, 8), EINVAL),  # REQ_ONE on a trim
        (request(READ, 1, 0, 4, 4), EINVAL),  # DF: not advertised
        (request(BLOCK_STATUS, 1, 0, 512), EINVAL),  # no negotiated context
        (request(READ, 1, 0, 0xFFFFFFFF), EINVAL),  # a "4 GiB" read
        (request(READ, 1, 16 * MiB, 1), EINVAL),  # past the end
        (request(READ, 1, 2**64 - 1, 2), EINVAL),  # offset + length overflows 64 bits
        (request(TRIM, 1, 16 * MiB - 1, 2), EINVAL),
        (request(WRITE_ZEROES, 1, 2**64 - 512, 1024), ENOSPC),
        (request(FLUSH, 1, 5, 5), EINVAL),
    ],
)
async def test_bad_requests_get_errors_and_the_connection_goes_on(
    nbd_server, bystander, wire: bytes, error: int
) -> None:
    client = await connected(nbd_server)
    client.send(wire)
    assert await client.simple_reply() == (error, 1)
    client.send(request(READ, 2, 0, 16))
    assert await client.simple_reply() == (0, 2)
    assert len(await client.recv(16)) == 16
    await client.aclose()
    await bystander.check()


async def test_zero_length_read_succeeds_without_data(nbd_server, bystander) -> None:
    client = await connected(nbd_server)
    client.send(request(READ, 1, 0, 0) + request(READ, 2, 0, 4))
    assert await client.simple_reply() == (0, 1)
    assert await client.simple_reply() == (0, 2)  # no stray payload in between
    assert len(await client.recv(4)) == 4
    await client.aclose()


async def test_structured_client_gets_error_chunks(nbd_server, bystander) -> None:
    client = await connected(nbd_server, structured=True, meta=False)
    client.send(request(READ, 7, 0, 0xFFFFFFFF))
    _magic, flags, type_, handle, payload = await client.reply()
    assert (type_, handle, flags) == (0x8001, 7, 1)
    assert struct.unpack(">I", payload[:4])[0] == EINVAL
    await client.aclose()


@pytest.mark.parametrize(
    ("offset", "error"),
    [(16 * MiB, ENOSPC), (16 * MiB - 100, ENOSPC), (2**64 - 256, ENOSPC)],
)
async def test_refused_write_payload_is_consumed_in_step(
    nbd_server, bystander, nbd_provider, offset, error
) -> None:
    before = await read_volume(nbd_provider.open_volume("vol1"))
    client = await connected(nbd_server)
    payload = b"\xee" * 4096  # looks nothing like a request header
    client.send(request(WRITE, 1, offset, len(payload)) + payload + request(READ, 2, 0, 8))
    assert await client.simple_reply() == (error, 1)
    assert await client.simple_reply() == (0, 2)
    await client.recv(8)
    await client.aclose()
    assert await read_volume(nbd_provider.open_volume("vol1")) == before


async def test_oversized_write_is_refused_and_skipped(nbd_server, bystander) -> None:
    client = await connected(nbd_server, export="vol0")  # 64 MiB: the length is the only fault
    length = 32 * MiB + 1  # over the maximum block size, still worth skipping
    client.send(request(WRITE, 1, 0, length))
    client.send(bytes(length))
    client.send(request(READ, 2, 0, 8))
    assert await client.simple_reply() == (EINVAL, 1)
    assert await client.simple_reply() == (0, 2)
    await client.aclose()


async def test_write_too_large_to_skip_closes(nbd_server, bystander) -> None:
    client = await connected(nbd_server)
    client.send(request(WRITE, 1, 0, 0xFFFFFFFF) + b"x" * 1000)
    assert await client.closed_by_server()


async def test_write_shorter_than_its_length_then_disconnect_changes_nothing(
    nbd_server, bystander, nbd_provider: VolumeProvider
) -> None:
    before = await read_volume(nbd_provider.open_volume("vol1"))
    client = await connected(nbd_server)
    client.send(request(WRITE, 1, 0, 1 * MiB) + b"\x99" * 1000)
    await client.writer.drain()
    await asyncio.sleep(0.05)
    await client.aclose()
    await bystander.check()
    assert await read_volume(nbd_provider.open_volume("vol1")) == before


async def test_option_after_go_closes(nbd_server, bystander) -> None:
    client = await connected(nbd_server)
    client.send(option(3))
    assert await client.closed_by_server()


async def test_half_a_header_then_stall_costs_nothing_else(nbd_server, bystander) -> None:
    client = await connected(nbd_server)
    client.send(request(READ, 1, 0, 512)[:13])
    await client.writer.drain()
    await bystander.check()
    await canary(nbd_server)
    # the staller finally completes its header and is served
    client.send(request(READ, 1, 0, 512)[13:])
    assert await client.simple_reply() == (0, 1)
    await client.aclose()


async def test_disconnect_with_requests_in_flight(nbd_server, bystander) -> None:
    client = await connected(nbd_server)
    data = b"z" * 65536
    for handle in range(40):
        client.send(
            request(WRITE, handle, handle * 65536, len(data)) + data + request(READ, 100 + handle, 0, 65536)
        )
    client.writer.transport.abort()
    await asyncio.sleep(0.05)
    await bystander.check()


# --- handshake phase ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [4, 0x80000000, 0xFFFFFFFF])
async def test_unknown_client_flags_close(nbd_server, bystander, flags: int) -> None:
    client = await RawClient.connect(nbd_server)
    await client.greeting()
    client.send(struct.pack(">I", flags))
    assert await client.closed_by_server()


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack(">I", 100) + b"vol1" + struct.pack(">H", 0),  # name length larger than the option
        struct.pack(">I", 0xFFFFFFFF) + b"vol1" + struct.pack(">H", 0),
        info_payload("v" * 4097),  # over 4,096 bytes
        info_payload("vol\x001"),  # NUL in the name
    ],
    ids=["past-option", "0xffffffff", "4097", "nul"],
)
async def test_bad_export_names_in_go_are_invalid(nbd_server, bystander, payload: bytes) -> None:
    client = await RawClient.connect(nbd_server)
    await client.greeting()
    client.send(struct.pack(">I", 1) + option(7, payload))
    (reply,) = await client.option_replies()
    assert reply[1] == ERR_INVALID
    # negotiation goes on: a good GO still works
    client.send(option(7, info_payload("vol1")))
    assert (await client.option_replies())[-1][1] == 1
    await client.aclose()


@pytest.mark.parametrize("name", [b"v" * 4097, b"vol\x001", b"nosuch", b"\xff"])
async def test_bad_export_names_in_export_name_close(nbd_server, bystander, name: bytes) -> None:
    client = await RawClient.connect(nbd_server)
    await client.greeting()
    client.send(struct.pack(">I", 1) + option(1, name))
    assert await client.closed_by_server()


async def test_meta_context_with_bad_lengths_is_invalid(nbd_server, bystander) -> None:
    client = await RawClient.connect(nbd_server)
    await client.greeting()
    client.send(struct.pack(">I", 1) + option(8))
    await client.option_replies()
    client.send(
        option(10, struct.pack(">I", 4) + b"vol1" + struct.pack(">II", 1, 0xFFFFFFFF) + b"base:allocation")
    )
    assert (await client.option_replies())[-1][1] == ERR_INVALID
    client.send(option(10, meta_payload("vol1", ("base:allocation",))))
    assert (await client.option_replies())[-1][1] == 1
    await client.aclose()


@pytest.mark.parametrize("length", [1 << 30, 0xFFFFFFFF, 65 * 1024])
async def test_huge_option_is_refused_and_closed(nbd_server, bystander, length: int) -> None:
    client = await RawClient.connect(nbd_server)
    await client.greeting()
    client.send(struct.pack(">I", 1) + option(7, length=length) + b"x" * 100)
    (reply,) = await client.option_replies()
    assert reply[1] == ERR_TOO_BIG
    assert await client.closed_by_server()


async def test_abort_and_vanish_during_negotiation(nbd_server, bystander) -> None:
    client = await RawClient.connect(nbd_server)
    await client.greeting()
    client.send(struct.pack(">I", 1) + option(2))
    assert (await client.option_reply())[1] == 1
    assert await client.closed_by_server()
    half = await RawClient.connect(nbd_server)
    await half.greeting()
    half.send(struct.pack(">I", 1) + option(7, info_payload("vol1"))[:10])
    await half.aclose()


async def test_negotiation_that_never_finishes_times_out(nbd_server, bystander) -> None:
    nbd_server.handshake_timeout = 0.2
    client = await RawClient.connect(nbd_server)
    await client.greeting()
    client.send(b"\x00\x00")  # half the client flags, then nothing
    assert await client.closed_by_server(timeout=10)


async def test_a_thousand_connections_opened_and_dropped(nbd_server, bystander) -> None:
    baseline_connections = nbd_server.connection_count
    rss_before = rss_bytes()

    async def one(i: int) -> None:
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", nbd_server.port)
        except OSError:
            return
        try:
            if i % 4 == 1:
                writer.write(struct.pack(">I", 1))  # flags, then gone
            elif i % 4 == 2:
                writer.write(struct.pack(">I", 1) + option(7, info_payload("vol1"))[:7])  # half an option
            elif i % 4 == 3:
                writer.write(
                    struct.pack(">I", 1) + option(7, info_payload("vol1")) + request(READ, 1, 0, 4096)[:20]
                )
            if i % 2:
                await writer.drain()
        finally:
            writer.transport.abort()

    for start in range(0, 1000, 100):
        await asyncio.gather(*(one(i) for i in range(start, start + 100)))
    for _ in range(200):
        if nbd_server.connection_count <= baseline_connections:
            break
        await asyncio.sleep(0.01)
    assert nbd_server.connection_count == baseline_connections
    assert nbd_server.connections_total >= 1000
    # Bounded memory: a thousand dropped connections leave nothing of note behind.
    assert rss_bytes() - rss_before < 64 * MiB
