"""Connection admission on the iSCSI listener (netlimits.py, as on NBD's): one initiator address
cannot take every slot, the listener has a cap, refusals are counted and logged in bounded
lines, and a closed connection gives its slot back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from tests.e2e.memvolume import MemProvider, SparseMemVolume
from thinblock.api.metrics import ISCSICollector
from thinblock.iscsi.server import ISCSIServer
from thinblock.netlimits import CLIENT_FULL, LISTENER_FULL, STOPPING
from thinblock.units import MiB

from .client import RawInitiator
from .test_hostile import closed_by_target


@pytest.fixture
async def server() -> AsyncIterator[ISCSIServer]:
    server = ISCSIServer(
        MemProvider(SparseMemVolume("vol0", 16 * MiB)),
        node_name="h",
        login_timeout=60.0,  # the idle holders below must not be closed for not logging in
        max_connections=5,
        max_connections_per_client=3,
        refusal_log_interval=60.0,
    )
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()


async def connect_from(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # The whole of 127.0.0.0/8 is loopback on Linux: each source address is another "host".
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def still_open(reader: asyncio.StreamReader) -> bool:
    """True when the target has neither closed nor answered the (silent) connection."""
    try:
        await asyncio.wait_for(reader.read(1), 0.3)
    except TimeoutError:
        return True
    return False


async def test_per_address_and_listener_limits(server: ISCSIServer) -> None:
    port = server.port or 0
    held = [await connect_from(port, "127.0.0.2") for _ in range(3)]
    await until(lambda: server.limits.of_client("127.0.0.2") == 3)
    # A fourth from the same address is refused; the address's three stay.
    r, w = await connect_from(port, "127.0.0.2")
    assert await closed_by_target(r)
    w.close()
    assert all([await still_open(reader) for reader, _ in held])

    # Another initiator is still served in full: login, a write and a read.
    good = await RawInitiator.connect(port, server.target_name("vol0"), "iqn.2026-12.test:good")
    assert (await good.write16(0, b"\x5a" * 4096)).status == 0
    assert server.limits.open == 4

    # The listener's cap: a fifth connection from a third address fits, a sixth does not.
    fifth = await connect_from(port, "127.0.0.3")
    await until(lambda: server.limits.open == 5)
    r, w = await connect_from(port, "127.0.0.4")
    assert await closed_by_target(r)
    w.close()
    assert server.refused == {CLIENT_FULL: 1, LISTENER_FULL: 1}
    assert server.connections_total == 5  # accepted ones only: the refused are counted apart
    refused = {
        s.labels["reason"]: s.value
        for family in ISCSICollector(server.sessions, server.counters).collect()
        for s in family.samples
        if s.name == "thinblock_iscsi_connections_refused_total"
    }
    assert refused == {CLIENT_FULL: 1, LISTENER_FULL: 1, STOPPING: 0}
    # Two refusals in one interval: the first line as it happened, the rest counted for the summary.
    assert server.refusals.lines == 1

    # A holder that goes away gives its slot back: its address may connect again.
    held[0][1].close()
    await until(lambda: server.limits.of_client("127.0.0.2") == 2)
    again = await connect_from(port, "127.0.0.2")
    await until(lambda: server.limits.of_client("127.0.0.2") == 3)
    assert await still_open(again[0])

    for _, writer in [*held[1:], fifth, again]:
        writer.close()
    good.writer.close()
    await until(lambda: server.limits.open == 0)
    await server.stop()
    assert server.refusals.lines == 2  # the summary of the suppressed refusal at stop
