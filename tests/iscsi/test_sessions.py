"""Sessions with several connections (MC/S, RFC 7143 4.2, 6.3), on the sans-IO core: a Login
with the session's TSIH adds a connection; commands run in CmdSN order across the session's
connections and are answered on the connection they came on (ERL 0: connection allegiance);
Logout closes one connection or the session; a connection failing ends the session (ERL 0:
session recovery).  Fed whole and byte by byte."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.e2e.memvolume import MemProvider, SparseMemVolume
from thinblock.iscsi.connection import (
    ConnectionClosed,
    LoginComplete,
    LoginPolicy,
    LogoutRequested,
    ScsiCommand,
    ScsiResult,
    TargetConnection,
)
from thinblock.iscsi.constants import LoginStatus, LogoutResponse, Opcode
from thinblock.iscsi.negotiation import TARGET_MAX_CONNECTIONS
from thinblock.iscsi.server import ISCSIServer
from thinblock.iscsi.session import SessionTable
from thinblock.sessions import SessionRegistry, describe_clients
from thinblock.units import MiB

from .client import LoginRefused, RawInitiator
from .initiator import Reply, login_request, logout_request, nop_out, parse_replies, scsi_command
from .test_core import INITIATOR, OPERATIONAL, TARGET, events

TEST_UNIT_READY = bytes(6)


def shared_policy() -> LoginPolicy:
    return LoginPolicy(
        target_names=lambda initiator: [TARGET],
        authorize=lambda target, initiator: (
            LoginStatus.SUCCESS if target == TARGET else LoginStatus.NOT_FOUND
        ),
        credentials=lambda target: None,
        portal="127.0.0.1:3260",
        sessions=SessionTable(),
    )


def feed(core: TargetConnection, wire: bytes, byte_by_byte: bool = False) -> None:
    if byte_by_byte:
        for i in range(len(wire)):
            core.receive_data(wire[i : i + 1])
    else:
        core.receive_data(wire)


def sent(core: TargetConnection) -> list[Reply]:
    return parse_replies(b"".join(bytes(b) for b in core.data_to_send()))


def login(
    policy: LoginPolicy,
    *,
    tsih: int = 0,
    cid: int = 0,
    max_connections: str = "4",
    byte_by_byte: bool = False,
    cmdsn: int = 1,
) -> tuple[TargetConnection, Reply]:
    core = TargetConnection(policy)
    pairs = [*OPERATIONAL, ("MaxConnections", max_connections)]
    feed(core, login_request(pairs, csg=1, nsg=3, tsih=tsih, cid=cid, cmdsn=cmdsn), byte_by_byte)
    [reply] = sent(core)
    return core, reply


def two_connections(byte_by_byte: bool = False) -> tuple[TargetConnection, TargetConnection, int]:
    policy = shared_policy()
    a, first = login(policy, cid=1, byte_by_byte=byte_by_byte)
    assert first.login_status == 0 and first.text["MaxConnections"] == "4"
    tsih = int.from_bytes(first.bhs[14:16], "big")
    [joined] = events(a)
    assert isinstance(joined, LoginComplete) and joined.leading
    b, second = login(policy, tsih=tsih, cid=2, byte_by_byte=byte_by_byte)
    assert second.login_status == 0 and second.flags & 3 == 3
    assert int.from_bytes(second.bhs[14:16], "big") == tsih
    # The leading connection's session-wide values stand: "leading only" keys are Irrelevant.
    assert second.text["MaxConnections"] == "Irrelevant" and second.text["MaxBurstLength"] == "Irrelevant"
    assert b.params.max_burst_length == a.params.max_burst_length == 16384
    [added] = events(b)
    assert isinstance(added, LoginComplete) and not added.leading and added.cid == 2 and added.tsih == tsih
    assert a.session is b.session and set(a.session.connections) == {1, 2}
    return a, b, tsih


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_a_login_with_the_tsih_adds_a_connection(byte_by_byte: bool) -> None:
    two_connections(byte_by_byte)


def test_max_connections_is_the_smaller_of_both() -> None:
    policy = shared_policy()
    _, reply = login(policy, max_connections="65535")
    assert reply.text["MaxConnections"] == str(TARGET_MAX_CONNECTIONS)
    _, reply = login(shared_policy(), max_connections="2")
    assert reply.text["MaxConnections"] == "2"


def test_unknown_tsih_and_too_many_connections_are_refused() -> None:
    policy = shared_policy()
    leading, first = login(policy, cid=1, max_connections="2")
    tsih = int.from_bytes(first.bhs[14:16], "big")
    nobody, reply = login(policy, tsih=tsih + 1, cid=2)
    assert reply.login_status == LoginStatus.SESSION_DOES_NOT_EXIST and nobody.closed
    _second, reply = login(policy, tsih=tsih, cid=2)
    assert reply.login_status == 0
    third, reply = login(policy, tsih=tsih, cid=3)
    assert reply.login_status == LoginStatus.TOO_MANY_CONNECTIONS and third.closed
    assert set(leading.session.connections) == {1, 2}


def test_another_initiator_cannot_join_a_session() -> None:
    policy = shared_policy()
    _, first = login(policy, cid=1)
    tsih = int.from_bytes(first.bhs[14:16], "big")
    core = TargetConnection(policy)
    other = [(k, "iqn.2026-12.test:other" if k == "InitiatorName" else v) for k, v in OPERATIONAL]
    core.receive_data(login_request(other, csg=1, nsg=3, tsih=tsih, cid=2))
    [reply] = sent(core)
    assert reply.login_status == LoginStatus.SESSION_DOES_NOT_EXIST and core.closed


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_cmdsn_orders_commands_across_connections_and_answers_on_their_own(byte_by_byte: bool) -> None:
    a, b, _ = two_connections()
    # CmdSN 2 arrives first, on b: it waits for 1, which comes on a.
    feed(b, scsi_command(TEST_UNIT_READY, itt=20, cmdsn=2, edtl=0), byte_by_byte)
    assert events(b) == [] and sent(b) == []
    feed(b, scsi_command(TEST_UNIT_READY, itt=30, cmdsn=3, edtl=0), byte_by_byte)
    feed(a, scsi_command(TEST_UNIT_READY, itt=10, cmdsn=1, edtl=0), byte_by_byte)
    [first] = events(a)
    assert isinstance(first, ScsiCommand) and first.itt == 10
    # b was given its two commands by a's input: the server is told to look at it.
    assert a.session.take_touched() == [b]
    got = events(b)
    assert [t.itt for t in got if isinstance(t, ScsiCommand)] == [20, 30]
    assert a.exp_cmd_sn == b.exp_cmd_sn == 4
    # Each answer goes out on its own connection, with that connection's StatSN.
    for task in got:
        assert isinstance(task, ScsiCommand)
        b.complete(task, ScsiResult())
    a.complete(first, ScsiResult())
    on_a, on_b = sent(a), sent(b)
    assert [r.u32(16) for r in on_a] == [10] and [r.u32(16) for r in on_b] == [20, 30]
    assert all(r.opcode == Opcode.SCSI_RESPONSE for r in on_a + on_b)
    assert on_b[1].u32(24) == on_b[0].u32(24) + 1  # b's StatSN
    # every answer carries the session's window
    assert {r.u32(28) for r in on_a + on_b} == {4}


def test_the_window_is_the_sessions() -> None:
    a, b, _ = two_connections()
    depth = a.queue_depth
    tasks = []
    for i in range(3):
        a.receive_data(scsi_command(TEST_UNIT_READY, itt=100 + i, cmdsn=1 + i, edtl=0))
        tasks += events(a)
    # a NOP on b reports the window that a's three running tasks took from the session
    b.receive_data(nop_out(itt=7, cmdsn=4))
    [nop] = sent(b)
    assert nop.u32(28) == 4  # ExpCmdSN
    assert nop.u32(32) == 1 + depth - 1  # MaxCmdSN: 3 places held by a's tasks
    for task in tasks:
        assert isinstance(task, ScsiCommand)
        a.complete(task, ScsiResult())
    b.receive_data(nop_out(itt=8, cmdsn=4))
    [nop] = sent(b)
    assert nop.u32(32) == 4 + depth - 1  # given back once they were answered


def test_logout_of_one_connection_leaves_the_session() -> None:
    a, b, _ = two_connections()
    # b asks to close connection 1 (a): answered on b, a ends cleanly, b goes on.
    b.receive_data(logout_request(itt=50, cmdsn=1, reason=1, cid=1))
    [request] = events(b)
    assert isinstance(request, LogoutRequested)
    response, ending = b.logout_target(request)
    assert response is LogoutResponse.OK and ending == [a]
    b.logout_done(request, response)
    [reply] = sent(b)
    assert reply.opcode == Opcode.LOGOUT_RESPONSE and reply.bhs[2] == 0
    assert a.closed and not b.closed and b.session.take_touched() == [a]
    [closed] = events(a)
    assert isinstance(closed, ConnectionClosed) and closed.clean
    assert set(b.session.connections) == {2}
    b.receive_data(scsi_command(TEST_UNIT_READY, itt=51, cmdsn=1, edtl=0))
    assert [e.itt for e in events(b) if isinstance(e, ScsiCommand)] == [51]


def test_logout_of_an_unknown_cid_and_for_recovery() -> None:
    a, _, _ = two_connections()
    a.receive_data(logout_request(itt=50, cmdsn=1, reason=1, cid=9))
    [request] = events(a)
    assert isinstance(request, LogoutRequested)
    response, _ = a.logout_target(request)
    assert response is LogoutResponse.CID_NOT_FOUND
    a.logout_done(request, response)
    a.receive_data(logout_request(itt=51, cmdsn=1, reason=2, cid=2))
    [request] = events(a)
    assert isinstance(request, LogoutRequested)
    response, _ = a.logout_target(request)
    assert response is LogoutResponse.RECOVERY_NOT_SUPPORTED  # ERL 0
    a.logout_done(request, response)
    assert [r.bhs[2] for r in sent(a)] == [1, 2] and not a.closed


def test_logout_of_the_session_closes_every_connection() -> None:
    a, b, tsih = two_connections()
    policy = a.policy
    a.receive_data(logout_request(itt=50, cmdsn=1, reason=0))
    [request] = events(a)
    assert isinstance(request, LogoutRequested)
    a.logout_done(request)
    assert a.closed and b.closed
    assert all(isinstance(e, ConnectionClosed) and e.clean for e in events(b))
    # the session is gone: its TSIH no longer adds connections
    _core, reply = login(policy, tsih=tsih, cid=3)
    assert reply.login_status == LoginStatus.SESSION_DOES_NOT_EXIST


def test_a_failed_connection_ends_the_session_at_erl_0() -> None:
    a, b, _ = two_connections()
    b.receive_data(scsi_command(TEST_UNIT_READY, itt=20, cmdsn=2, edtl=0))  # waits for CmdSN 1
    a.receive_data(scsi_command(TEST_UNIT_READY, itt=10, cmdsn=1, edtl=0))
    [task] = events(a)
    b.receive_data(bytes([0x21]) + bytes(47))  # an opcode only targets send: b fails
    assert b.closed and a.closed
    closed = [e for e in events(a) if isinstance(e, ConnectionClosed)]
    assert len(closed) == 1 and not closed[0].clean and "ERL 0" in closed[0].reason
    assert isinstance(task, ScsiCommand)
    a.complete(task, ScsiResult())
    assert sent(a) == []  # its tasks ended with it


def test_a_command_waiting_on_a_closed_connection_does_not_stall_the_session() -> None:
    a, b, _ = two_connections()
    # b's CmdSN 2 waits for 1; b logs out cleanly (reason 1, itself) before 1 arrives.
    b.receive_data(scsi_command(TEST_UNIT_READY, itt=20, cmdsn=2, edtl=0))
    b.receive_data(logout_request(itt=21, cmdsn=3, reason=1, cid=2))
    [request] = events(b)
    assert isinstance(request, LogoutRequested)
    b.logout_done(request)
    assert b.closed and not a.closed
    a.receive_data(scsi_command(TEST_UNIT_READY, itt=10, cmdsn=1, edtl=0))
    a.receive_data(scsi_command(TEST_UNIT_READY, itt=11, cmdsn=3, edtl=0))
    assert [e.itt for e in events(a) if isinstance(e, ScsiCommand)] == [10, 11]
    assert a.exp_cmd_sn == 4


def test_a_login_with_a_cid_in_use_reinstates_that_connection() -> None:
    a, b, tsih = two_connections()
    c, reply = login(a.policy, tsih=tsih, cid=2)
    assert reply.login_status == 0
    assert b.closed and not a.closed and a.session.connections[2] is c
    assert any(isinstance(e, ConnectionClosed) for e in events(b))
    assert c.initiator_name == INITIATOR


# --- through the asyncio server, with a test initiator on the project's PDU code ---------------


@pytest.fixture
async def server() -> AsyncIterator[ISCSIServer]:
    server = ISCSIServer(MemProvider(SparseMemVolume("vol0", 16 * MiB)), node_name="h")
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()


def read16(lba: int, blocks: int) -> bytes:
    return bytes([0x88, 0]) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + bytes(2)


def write16(lba: int, blocks: int) -> bytes:
    return bytes([0x8A, 0]) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + bytes(2)


async def test_two_connections_one_session_through_the_server(server: ISCSIServer) -> None:
    port, target = server.port or 0, server.target_name("vol0")
    a = await RawInitiator.connect(port, target, "iqn.2026-12.test:mcs", max_connections=4, cid=1)
    b = await a.add_connection(cid=2)
    try:
        [row] = server.sessions()
        assert row["connections"] == 2 and len(row["addresses"]) == 2 and row["tsih"] == a.session.tsih
        # written on one connection, read on the other
        assert (await a.write16(0, b"\x5a" * 4096)).status == 0
        read = await b.read16(0, 8)
        assert read.status == 0 and read.data == b"\x5a" * 4096
        # CmdSN order across connections: the read (CmdSN n+1, on b) is sent before the write
        # it must follow (CmdSN n, on a), and sees its data.
        counters = a.session
        write_sn, read_sn = counters.next_cmdsn(), counters.next_cmdsn()
        b.send_command(read16(8, 8), cmdsn=read_sn, itt=counters.next_itt(), read=4096)
        await asyncio.sleep(0.05)
        a.send_command(write16(8, 8), cmdsn=write_sn, itt=counters.next_itt(), data=b"\xa5" * 4096)
        (_, wrote), (_, after) = await asyncio.gather(a.outcome(), b.outcome())
        assert wrote.status == 0 and after.status == 0 and after.data == b"\xa5" * 4096
        # Logout of connection 2 from connection 1: b is closed, the session goes on over a.
        assert await a.logout(reason=1, cid=2) == 0
        assert await b.reader.read() == b""
        [row] = server.sessions()
        assert row["connections"] == 1
        assert (await a.read16(8, 8)).data == b"\xa5" * 4096
        # a third connection joins, then the session logs out: both connections end
        c = await a.add_connection(cid=3)
        assert server.sessions()[0]["connections"] == 2
        assert await c.logout(reason=0) == 0
        assert await a.reader.read() == b"" and await c.reader.read() == b""
        await asyncio.sleep(0.05)
        assert server.sessions() == []
        with pytest.raises(LoginRefused) as refused:
            await a.add_connection(cid=4)
        assert refused.value.status == LoginStatus.SESSION_DOES_NOT_EXIST
    finally:
        for conn in (a, b):
            await conn.close()


async def test_a_connection_failing_ends_its_session_not_others(server: ISCSIServer) -> None:
    port, target = server.port or 0, server.target_name("vol0")
    a = await RawInitiator.connect(port, target, "iqn.2026-12.test:one", max_connections=2, cid=1)
    b = await a.add_connection(cid=2)
    other = await RawInitiator.connect(port, target, "iqn.2026-12.test:two", isid=0x23D000000002)
    try:
        b.writer.write(bytes([0x21]) + bytes(47))  # a PDU only targets send: b fails
        assert await b.reader.read() == b""
        assert await a.reader.read() == b""  # ERL 0: session recovery, a ends too
        assert (await other.test_unit_ready()).status == 0
        assert [s["initiator"] for s in server.sessions()] == ["iqn.2026-12.test:two"]
    finally:
        for conn in (a, b, other):
            await conn.close()


# --- NOP-In: pinging an idle initiator ----------------------------------------------------------


def test_ping_is_a_nop_in_with_a_tag_answered_by_a_nop_out_with_it() -> None:
    a, _, _ = two_connections()
    a.receive_data(nop_out(itt=5, cmdsn=1))
    [echo] = sent(a)
    a.ping()
    [ping] = sent(a)
    assert ping.opcode == Opcode.NOP_IN and ping.u32(16) == 0xFFFFFFFF  # ITT reserved
    ttt = ping.u32(20)
    assert ttt != 0xFFFFFFFF and a.ping_ttt == ttt
    assert ping.u32(24) == echo.u32(24) + 1  # the next StatSN, not consumed
    a.ping()
    assert sent(a) == []  # one ping at a time
    a.receive_data(nop_out(itt=0xFFFFFFFF, cmdsn=1, ttt=ttt + 1))
    assert a.ping_ttt == ttt  # another tag answers nothing
    a.receive_data(nop_out(itt=0xFFFFFFFF, cmdsn=1, ttt=ttt))
    assert a.ping_ttt is None and sent(a) == []  # answered, and no reply to the answer
    a.receive_data(nop_out(itt=6, cmdsn=1))
    [after] = sent(a)
    assert after.u32(24) == ping.u32(24)  # the ping did not use a StatSN


def test_scsi_event_is_an_async_message_with_sense_data() -> None:
    a, _, _ = two_connections()
    a.receive_data(nop_out(itt=5, cmdsn=1))
    [echo] = sent(a)
    sense = bytes([0x70, 0, 0x06]) + bytes(4) + bytes([10]) + bytes(4) + bytes([0x3F, 0x0E]) + bytes(4)
    a.scsi_event(sense)
    [notice] = sent(a)
    assert notice.opcode == Opcode.ASYNC_MESSAGE and notice.u32(16) == 0xFFFFFFFF
    assert notice.bhs[36] == 0  # AsyncEvent: a SCSI asynchronous event
    assert notice.data == len(sense).to_bytes(2, "big") + sense
    assert notice.u32(24) == echo.u32(24) + 1  # it takes a StatSN


async def test_an_idle_initiator_that_answers_pings_stays_one_that_does_not_is_closed() -> None:
    server = ISCSIServer(
        MemProvider(SparseMemVolume("vol0", 16 * MiB)), node_name="h", nop_interval=0.1, nop_timeout=0.3
    )
    await server.start("127.0.0.1", 0)
    port, target = server.port or 0, server.target_name("vol0")
    live = await RawInitiator.connect(port, target, "iqn.2026-12.test:live")
    silent = await RawInitiator.connect(port, target, "iqn.2026-12.test:silent", isid=0x23D000000009)
    try:
        stop = asyncio.Event()
        answering = asyncio.ensure_future(live.answer_pings(stop))
        # the silent one gets a NOP-In ping, never answers it, and is closed
        ping = await asyncio.wait_for(silent.next_pdu(), 10)
        assert ping.opcode == Opcode.NOP_IN and ping.u32(20) != 0xFFFFFFFF
        assert await asyncio.wait_for(silent.reader.read(), 10) == b""
        await asyncio.sleep(0.5)  # several more intervals for the live one
        stop.set()
        assert await answering >= 2
        assert (await live.test_unit_ready()).status == 0
        assert [s["initiator"] for s in server.sessions()] == ["iqn.2026-12.test:live"]
    finally:
        await live.close()
        await silent.close()
        await server.stop()


# --- the engine's session registry -----------------------------------------------------------------


async def test_a_session_is_registered_once_and_forcing_it_off_leaves_the_lun_gone() -> None:
    registry = SessionRegistry()
    server = ISCSIServer(MemProvider(SparseMemVolume("vol0", 16 * MiB)), node_name="h", sessions=registry)
    await server.start("127.0.0.1", 0)
    port, target = server.port or 0, server.target_name("vol0")
    a = await RawInitiator.connect(port, target, "iqn.2026-12.test:held", max_connections=2, cid=1)
    b = await a.add_connection(cid=2)
    try:
        [registered] = registry.of("vol0")
        assert registered.protocol == "iSCSI" and registered.peer == server.sessions()[0]["address"]
        assert describe_clients(registry.of("vol0")) == f"1 iSCSI session from {registered.peer}"
        # What a forced `vv delete` does: mark the VV deleted, tell the sessions, then give its
        # regions back (the VV is still listed until then).
        volume = server.provider.open_volume("vol0")
        volume.deleted = True  # type: ignore[attr-defined]
        registered.disconnect()
        for conn in (a, b):
            notice = await asyncio.wait_for(conn.next_pdu(), 10)
            assert notice.opcode == Opcode.ASYNC_MESSAGE and notice.bhs[36] == 0
            sense = notice.data[2:]
            assert (sense[2] & 0x0F, sense[12], sense[13]) == (
                0x06,
                0x3F,
                0x0E,
            )  # REPORTED LUNS DATA HAS CHANGED
        assert registry.of("vol0") == []
        # the LUN answers as one the target does not have, on every connection
        for conn in (a, b):
            gone = await conn.read16(0, 8)
            assert (gone.status, gone.sense_key, gone.asc) == (0x02, 0x05, 0x2500)
        # an initiator logging in again (libiscsi does, when its connection ends) finds no target
        with pytest.raises(LoginRefused) as refused:
            await RawInitiator.connect(port, target, "iqn.2026-12.test:held", isid=0x23D000000004)
        assert refused.value.status == LoginStatus.NOT_FOUND
        assert await a.logout() == 0
        volume.deleted = False  # type: ignore[attr-defined]
        # a session that logs out leaves the registry too
        c = await RawInitiator.connect(port, target, "iqn.2026-12.test:other", isid=0x23D000000003)
        assert len(registry.of("vol0")) == 1
        assert await c.logout() == 0
        await asyncio.sleep(0.05)
        assert registry.of("vol0") == []
        await c.close()
    finally:
        await a.close()
        await b.close()
        await server.stop()


async def test_a_grown_volume_is_a_capacity_unit_attention_once(server: ISCSIServer) -> None:
    volume = server.provider.open_volume("vol0")
    assert isinstance(volume, SparseMemVolume)
    host = await RawInitiator.connect(server.port or 0, server.target_name("vol0"), "iqn.2026-12.test:g")
    try:
        assert (await host.test_unit_ready()).status == 0
        volume._size = 32 * MiB  # what `vv grow` does to the VV's size
        grown = await host.test_unit_ready()
        assert (grown.status, grown.sense_key, grown.asc) == (0x02, 0x06, 0x2A09)  # CAPACITY DATA HAS CHANGED
        assert (await host.test_unit_ready()).status == 0
        capacity = await host.command(
            bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + bytes(2), read=32
        )
        assert int.from_bytes(capacity.data[:8], "big") + 1 == 32 * MiB // 512
    finally:
        await host.close()
