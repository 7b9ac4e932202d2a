"""Denial of service at the NBD server (issue 17, item 5): connection limits per listener and per
client address, the idle timeout in transmission, refused connections counted and logged once per
interval, and the server-wide bound on request bytes in flight.  In process, over loopback; a
second client address is 127.0.0.2 (all of 127/8 is loopback on Linux)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import struct
import time
from pathlib import Path

import pytest

from tests.support.certs import make_pki
from thinblock.api.metrics import NBDCollector
from thinblock.nbd.protocol import TLSMode
from thinblock.nbd.server import NBDServer
from thinblock.nbd.tls import TLSSettings, server_context
from thinblock.netlimits import CLIENT_FULL, LISTENER_FULL

from .memvolume import MemProvider, MemVolume, MiB
from .nbd_helpers import RawClient, request
from .test_nbd_server import GatedVolume, open_client, wait_for

pytestmark = pytest.mark.e2e

READ, WRITE, DISC, FLUSH = 0, 1, 2, 3
OTHER_HOST = "127.0.0.2"


async def connect_from(server: NBDServer, source: str) -> RawClient:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, local_addr=(source, 0))
    return RawClient(reader, writer)


async def served(client: RawClient, handle: int = 7) -> bool:
    client.send(request(FLUSH, handle))
    return await client.simple_reply() == (0, handle)


async def test_one_address_cannot_take_every_slot() -> None:
    """Past its own limit a client address is refused; another address is still served, and the
    refusals are counted by reason."""
    srv = NBDServer(MemProvider(MemVolume("v", 1 * MiB)), max_connections=10, max_connections_per_client=3)
    await srv.start("127.0.0.1", 0)
    clients: list[RawClient] = []
    try:
        for _ in range(3):
            c = await connect_from(srv, OTHER_HOST)
            await c.greeting()  # accepted: it got the greeting
            clients.append(c)
        extra = [await connect_from(srv, OTHER_HOST) for _ in range(5)]
        for c in extra:
            assert await c.closed_by_server(), "a connection past the per-client limit was kept"
        assert srv.refused == {CLIENT_FULL: 5}
        witness = await open_client(srv, "v")  # 127.0.0.1: a client of its own
        assert await served(witness)
        await witness.aclose()
        for c in clients:
            await c.aclose()
        await wait_for(lambda: srv.connection_count == 0)
        again = await connect_from(srv, OTHER_HOST)  # its slots came back
        await again.greeting()
        await again.aclose()
    finally:
        await srv.stop()


async def test_the_listener_limit_counts_every_address() -> None:
    srv = NBDServer(MemProvider(MemVolume("v", 1 * MiB)), max_connections=2, max_connections_per_client=0)
    await srv.start("127.0.0.1", 0)
    try:
        first = await open_client(srv, "v")
        second = await connect_from(srv, OTHER_HOST)
        await second.greeting()
        third = await connect_from(srv, "127.0.0.3")
        assert await third.closed_by_server()
        assert srv.refused == {LISTENER_FULL: 1}
        assert await served(first)
        await first.aclose()
        await second.aclose()
    finally:
        await srv.stop()


async def test_each_listener_has_its_own_slots(tmp_path) -> None:
    """TCP full does not refuse the Unix socket (a local administrator still gets in)."""
    srv = NBDServer(MemProvider(MemVolume("v", 1 * MiB)), max_connections=1)
    await srv.start("127.0.0.1", 0, unix_path=str(tmp_path / "nbd.sock"))
    try:
        tcp = await open_client(srv, "v")
        refused = await RawClient.connect(srv)
        assert await refused.closed_by_server()
        local = await RawClient.connect(srv, unix=True)
        await local.go("v", structured=False)
        assert await served(local)
        for c in (tcp, local):
            await c.aclose()
    finally:
        await srv.stop()


async def test_refusals_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """300 refused connections: one line as the first happens, one summary when the interval
    ends, not 300; every one counted."""
    srv = NBDServer(MemProvider(MemVolume("v", 1 * MiB)), max_connections=1, refusal_log_interval=0.5)
    await srv.start("127.0.0.1", 0)
    caplog.set_level(logging.INFO, logger="thinblock.nbd")
    try:
        holder = await open_client(srv, "v")
        started = time.monotonic()
        for _ in range(300):
            c = await RawClient.connect(srv)
            assert await c.closed_by_server()
        elapsed = time.monotonic() - started
        assert srv.refused == {LISTENER_FULL: 300}
        await wait_for(lambda: srv.refusals.needs_flush_at is None, timeout=5)
        lines = [r for r in caplog.records if getattr(r, "event", None) == "nbd-refused"]
        # The first refusal, then at most one summary per interval the refusals lasted (plus the
        # last one): on a loaded machine the 300 connections may span several intervals, but
        # never anywhere near one line per refusal.
        most = 3 + math.ceil(elapsed / 0.5)
        assert 2 <= len(lines) <= min(most, 30), (elapsed, [r.getMessage() for r in lines])
        summary = lines[-1].getMessage()
        assert "refused" in summary and "listener-limit" in summary, summary
        assert sum(getattr(r, "refused", 1) for r in lines) == 300
        await holder.aclose()
    finally:
        await srv.stop()


async def test_idle_client_in_transmission_is_closed() -> None:
    srv = NBDServer(MemProvider(MemVolume("v", 1 * MiB)), idle_timeout=0.3)
    await srv.start("127.0.0.1", 0)
    try:
        busy = await open_client(srv, "v")
        idle = await open_client(srv, "v")
        for _ in range(8):  # busy talks every 0.1 s for longer than the timeout
            assert await served(busy)
            await asyncio.sleep(0.1)
        assert await idle.closed_by_server(timeout=5), "an idle client was not closed"
        assert srv.idle_closed == 1
        assert await served(busy), "an active client was closed as idle"
        await busy.aclose()
    finally:
        await srv.stop()


async def test_a_request_in_flight_is_not_idle() -> None:
    """A client waiting on a slow request is not idle: closing it would drop its reply."""
    gated = GatedVolume("gated", 8 * MiB)
    srv = NBDServer(MemProvider(gated), idle_timeout=0.2)
    await srv.start("127.0.0.1", 0)
    try:
        c = await open_client(srv, "gated")
        c.send(request(WRITE, 1, 0, 4) + b"abcd")
        await wait_for(lambda: gated.started == 1)
        await asyncio.sleep(0.6)  # three timeouts with the write in flight
        assert srv.idle_closed == 0
        gated.gate.set()
        assert await c.simple_reply() == (0, 1)
        assert await c.closed_by_server(timeout=5)  # and idle afterwards: closed
        assert srv.idle_closed == 1
    finally:
        gated.gate.set()
        await srv.stop()


async def test_exempt_clients_are_never_closed_as_idle() -> None:
    """``idle_exempt``: a host that keeps a quiet connection on purpose (here 127.0.0.2) stays;
    another idle one (127.0.0.1) is closed."""
    srv = NBDServer(MemProvider(MemVolume("v", 1 * MiB)), idle_timeout=0.2, idle_exempt=("127.0.0.2/32",))
    await srv.start("127.0.0.1", 0)
    try:
        exempt = await connect_from(srv, OTHER_HOST)
        await exempt.go("v", structured=False)
        idle = await open_client(srv, "v")
        assert await idle.closed_by_server(timeout=5)
        await asyncio.sleep(0.5)
        assert await served(exempt), "an exempt client was closed as idle"
        assert srv.idle_closed == 1
        await exempt.aclose()
    finally:
        await srv.stop()


async def test_idle_timeout_zero_is_off() -> None:
    srv = NBDServer(MemProvider(MemVolume("v", 1 * MiB)), idle_timeout=0)
    await srv.start("127.0.0.1", 0)
    try:
        c = await open_client(srv, "v")
        await asyncio.sleep(0.5)
        assert await served(c)
        assert srv.idle_closed == 0
        await c.aclose()
    finally:
        await srv.stop()


async def test_bytes_in_flight_are_bounded_across_connections() -> None:
    """With a server-wide budget of 1 MiB, a second connection's 1 MiB WRITE is not started (nor
    its payload buffered past one request) until the first one's finishes."""
    gated = GatedVolume("gated", 8 * MiB)
    srv = NBDServer(MemProvider(gated), max_bytes_in_flight=1 * MiB)
    await srv.start("127.0.0.1", 0)
    try:
        a = await open_client(srv, "gated")
        b = await open_client(srv, "gated")
        a.send(request(WRITE, 1, 0, MiB) + b"a" * MiB)
        await wait_for(lambda: gated.started == 1)
        b.send(request(WRITE, 2, MiB, MiB) + b"b" * MiB)
        await asyncio.sleep(0.3)
        assert gated.started == 1, "a request past the server-wide budget was started"
        assert srv.stats()["bytes_in_flight"] == MiB
        gated.gate.set()
        assert await a.simple_reply() == (0, 1)
        assert await b.simple_reply() == (0, 2)
        assert gated.started == 2 and srv.stats()["bytes_in_flight"] == 0
        for c in (a, b):
            await c.aclose()
    finally:
        gated.gate.set()
        await srv.stop()


async def test_metrics_show_refusals_by_reason() -> None:
    srv = NBDServer(MemProvider(MemVolume("v", 1 * MiB)), max_connections=1)
    await srv.start("127.0.0.1", 0)
    try:
        holder = await open_client(srv, "v")
        for _ in range(3):
            assert await (await RawClient.connect(srv)).closed_by_server()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in NBDCollector(srv.stats).collect()
            for s in family.samples
        }
        assert samples[("thinblock_nbd_connections_refused_total", (("reason", "listener-limit"),))] == 3
        assert samples[("thinblock_nbd_connections_refused_total", (("reason", "client-limit"),))] == 0
        assert samples[("thinblock_nbd_connections", ())] == 1
        assert samples[("thinblock_nbd_connections_accepted_total", ())] == 1
        await holder.aclose()
    finally:
        await srv.stop()


def _client_hello() -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


async def test_stalled_tls_handshakes_give_their_slots_back(tmp_path: Path) -> None:
    """A handshake that stalls is closed at the handshake timeout, and its connection leaves the
    server's count and its slot (they stayed for ever: the TCP transport belonged to the TLS
    layer, whose close never reached the connection, and stalled handshakes filled the listener)."""
    pki = make_pki(tmp_path / "pki")
    context = server_context(TLSSettings(TLSMode.ALLOWED, pki.server_cert, pki.server_key, pki.ca_cert))
    srv = NBDServer(
        MemProvider(MemVolume("v", 1 * MiB)),
        tls_mode=TLSMode.ALLOWED,
        tls_context=context,
        handshake_timeout=0.5,
        max_connections=8,
    )
    await srv.start("127.0.0.1", 0)
    hello = _client_hello()
    try:
        for _round in range(3):  # 24 stalled handshakes through 8 slots
            clients = []
            for i in range(8):
                c = await RawClient.connect(srv)
                await c.greeting()
                c.send(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 5, 0))
                assert (await c.option_reply())[:2] == (5, 1)  # STARTTLS acknowledged
                if i % 2:
                    c.send(hello[: len(hello) // 2])
                clients.append(c)
            for c in clients:
                assert await c.closed_by_server(timeout=10)
            await wait_for(lambda: srv.connection_count == 0)
        assert srv.refused == {}
        plain = await open_client(srv, "v")
        assert await served(plain)
        await plain.aclose()
    finally:
        await srv.stop()
