"""The sans-IO iSCSI core: login (None, CHAP one-way and mutual), SendTargets, the data phase
(immediate data, R2T, Data-In), sequence numbers, digests, and bad input costing only the
connection.  Fed whole and byte by byte, with trailing data; fuzzed with hypothesis."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thinblock.blockdev import FileSpan
from thinblock.iscsi.connection import (
    NEED_DATA,
    ConnectionClosed,
    LoginComplete,
    LoginPolicy,
    ScsiCommand,
    ScsiResult,
    TargetConnection,
)
from thinblock.iscsi.constants import LoginStatus, Opcode
from thinblock.iscsi.negotiation import ChapCredentials, chap_response
from thinblock.iscsi.pdu import PduError, PduReader

from .initiator import (
    Reply,
    data_out,
    login_request,
    logout_request,
    nop_out,
    parse_replies,
    scsi_command,
    text_request,
)

TARGET = "iqn.2026-12.org.thinblock:node1:vol0"
INITIATOR = "iqn.1993-08.org.debian:01:test"


def policy(chap: ChapCredentials | None = None) -> LoginPolicy:
    return LoginPolicy(
        target_names=lambda initiator: [TARGET, "iqn.2026-12.org.thinblock:node1:vol1"],
        authorize=lambda target, initiator: (
            LoginStatus.SUCCESS if target == TARGET else LoginStatus.NOT_FOUND
        ),
        credentials=lambda target: chap,
        portal="127.0.0.1:3260",
        target_alias=lambda target: "vol0",
    )


def events(core: TargetConnection) -> list[object]:
    out = []
    while (event := core.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def replies(core: TargetConnection, **digests: bool) -> list[Reply]:
    return parse_replies(b"".join(bytes(b) for b in core.data_to_send()), **digests)


OPERATIONAL = [
    ("InitiatorName", INITIATOR),
    ("SessionType", "Normal"),
    ("TargetName", TARGET),
    ("HeaderDigest", "None"),
    ("DataDigest", "None"),
    ("MaxRecvDataSegmentLength", "4096"),
    ("FirstBurstLength", "8192"),
    ("MaxBurstLength", "16384"),
    ("ImmediateData", "Yes"),
    ("InitialR2T", "Yes"),
    ("ErrorRecoveryLevel", "0"),
    ("X-com.example.vendor", "1"),
]


def logged_in(pairs: list[tuple[str, str]] | None = None, **digests: bool) -> TargetConnection:
    core = TargetConnection(policy())
    core.receive_data(login_request(pairs or OPERATIONAL, csg=1, nsg=3))
    [reply] = replies(core)
    assert reply.login_status == 0 and reply.flags & 0x80
    [event] = events(core)
    assert isinstance(event, LoginComplete)
    return core


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_login_without_authentication_then_trailing_nop(byte_by_byte: bool) -> None:
    core = TargetConnection(policy())
    wire = login_request(OPERATIONAL, csg=1, nsg=3) + nop_out(itt=9, cmdsn=1, data=b"ping")
    if byte_by_byte:
        for i in range(len(wire)):
            core.receive_data(wire[i : i + 1])
    else:
        core.receive_data(wire)
    login, nop = replies(core)
    assert login.opcode == Opcode.LOGIN_RESPONSE and login.login_status == 0
    assert login.flags & 0x80 and login.flags & 3 == 3  # T, NSG full feature
    assert int.from_bytes(login.bhs[14:16], "big") != 0  # TSIH: the new session's handle
    keys = login.text
    assert keys["TargetAlias"] == "vol0" and keys["TargetPortalGroupTag"] == "1"
    assert keys["ImmediateData"] == "Yes" and keys["InitialR2T"] == "Yes"
    assert keys["MaxBurstLength"] == "16384" and keys["FirstBurstLength"] == "8192"
    assert keys["X-com.example.vendor"] == "NotUnderstood"
    assert "MaxRecvDataSegmentLength" in keys
    assert nop.opcode == Opcode.NOP_IN and nop.u32(16) == 9 and nop.data == b"ping"
    assert nop.u32(24) == login.u32(24) + 1  # StatSN advances
    [event] = events(core)
    assert (
        isinstance(event, LoginComplete) and event.initiator_name == INITIATOR and event.target_name == TARGET
    )


def test_unknown_target_fails_the_login_and_closes() -> None:
    core = TargetConnection(policy())
    pairs = [(k, "iqn.x:nosuch" if k == "TargetName" else v) for k, v in OPERATIONAL]
    core.receive_data(login_request(pairs, csg=1, nsg=3))
    [reply] = replies(core)
    assert reply.login_status == LoginStatus.NOT_FOUND
    [event] = events(core)
    assert isinstance(event, ConnectionClosed) and not event.clean


@pytest.mark.parametrize("mutual", [False, True])
def test_chap_one_way_and_mutual(mutual: bool) -> None:
    creds = ChapCredentials(
        "user1", "secret-secret1", "target1" if mutual else None, "tsecret-secret2" if mutual else None
    )
    core = TargetConnection(policy(creds))
    first = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "CHAP,None")]
    core.receive_data(login_request(first, csg=0, nsg=1, transit=False))
    [reply] = replies(core)
    assert reply.text["AuthMethod"] == "CHAP" and reply.login_status == 0
    core.receive_data(login_request([("CHAP_A", "5")], csg=0, nsg=1, transit=False))
    [reply] = replies(core)
    keys = reply.text
    assert keys["CHAP_A"] == "5"
    identifier = int(keys["CHAP_I"])
    challenge = bytes.fromhex(keys["CHAP_C"][2:])
    answer = [
        ("CHAP_N", "user1"),
        ("CHAP_R", "0x" + chap_response(identifier, b"secret-secret1", challenge).hex()),
    ]
    my_challenge = bytes(range(16))
    if mutual:
        answer += [("CHAP_I", "33"), ("CHAP_C", "0x" + my_challenge.hex())]
    core.receive_data(login_request(answer, csg=0, nsg=1, transit=True))
    [reply] = replies(core)
    assert reply.login_status == 0 and reply.flags & 0x80
    if mutual:
        assert reply.text["CHAP_N"] == "target1"
        assert reply.text["CHAP_R"] == "0x" + chap_response(33, b"tsecret-secret2", my_challenge).hex()
    core.receive_data(login_request(OPERATIONAL[3:], csg=1, nsg=3))
    [reply] = replies(core)
    assert reply.login_status == 0
    assert isinstance(events(core)[-1], LoginComplete)


def test_chap_wrong_secret_and_skipping_authentication_are_refused() -> None:
    creds = ChapCredentials("user1", "secret-secret1")
    core = TargetConnection(policy(creds))
    core.receive_data(login_request(OPERATIONAL, csg=1, nsg=3))  # straight to operational
    [reply] = replies(core)
    assert reply.login_status == LoginStatus.AUTHENTICATION_FAILED
    assert isinstance(events(core)[-1], ConnectionClosed)

    core = TargetConnection(policy(creds))
    first = [("InitiatorName", INITIATOR), ("TargetName", TARGET), ("AuthMethod", "CHAP"), ("CHAP_A", "5")]
    core.receive_data(login_request(first, csg=0, nsg=1, transit=False))
    keys = replies(core)[0].text
    bad = chap_response(int(keys["CHAP_I"]), b"wrong-secret!!", bytes.fromhex(keys["CHAP_C"][2:]))
    core.receive_data(login_request([("CHAP_N", "user1"), ("CHAP_R", "0x" + bad.hex())], csg=0, nsg=1))
    [reply] = replies(core)
    assert reply.login_status == LoginStatus.AUTHENTICATION_FAILED
    assert isinstance(events(core)[-1], ConnectionClosed)


def test_discovery_session_send_targets() -> None:
    core = TargetConnection(policy())
    core.receive_data(
        login_request([("InitiatorName", INITIATOR), ("SessionType", "Discovery")], csg=1, nsg=3)
    )
    assert replies(core)[0].login_status == 0
    core.receive_data(text_request([("SendTargets", "All")], itt=2, cmdsn=1))
    [reply] = replies(core)
    assert reply.opcode == Opcode.TEXT_RESPONSE and reply.flags & 0x80
    assert reply.data.split(b"\0")[:4] == [
        f"TargetName={TARGET}".encode(),
        b"TargetAddress=127.0.0.1:3260,1",
        b"TargetName=iqn.2026-12.org.thinblock:node1:vol1",
        b"TargetAddress=127.0.0.1:3260,1",
    ]
    # a discovery session carries no SCSI command
    core.receive_data(scsi_command(bytes(6), itt=3, cmdsn=2, edtl=0))
    assert isinstance(events(core)[-1], ConnectionClosed)


def test_write_with_immediate_data_then_r2t_then_read_split_into_data_in() -> None:
    core = logged_in()
    payload = bytes(range(256)) * 128  # 32 KiB
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 64, 0])
    core.receive_data(scsi_command(cdb, itt=5, cmdsn=1, edtl=len(payload), write=True, data=payload[:8192]))
    [r2t] = replies(core)
    assert r2t.opcode == Opcode.R2T
    ttt, offset, length = r2t.u32(20), r2t.u32(40), r2t.u32(44)
    assert (offset, length) == (8192, 16384)  # MaxBurstLength
    assert events(core) == []
    for i, pos in enumerate(range(offset, offset + length, 4096)):
        core.receive_data(
            data_out(
                payload[pos : pos + 4096],
                itt=5,
                ttt=ttt,
                datasn=i,
                offset=pos,
                final=pos + 4096 == offset + length,
            )
        )
    [r2t2] = replies(core)
    assert r2t2.opcode == Opcode.R2T and r2t2.u32(40) == 24576 and r2t2.u32(44) == 8192 and r2t2.u32(36) == 1
    core.receive_data(
        data_out(payload[24576:28672], itt=5, ttt=r2t2.u32(20), datasn=0, offset=24576, final=False)
    )
    core.receive_data(data_out(payload[28672:], itt=5, ttt=r2t2.u32(20), datasn=1, offset=28672, final=True))
    [task] = events(core)
    assert isinstance(task, ScsiCommand) and bytes(task.data or b"") == payload
    core.complete(task, ScsiResult(wanted=len(payload)))
    [response] = replies(core)
    assert (
        response.opcode == Opcode.SCSI_RESPONSE and response.bhs[3] == 0 and response.u32(36) == 2
    )  # ExpDataSN: 2 R2Ts

    # a read of 10000 bytes with EDTL 12000: Data-In of at most 4096 bytes (the initiator's
    # MaxRecvDataSegmentLength), status in the last one, underflow residual 2000
    core.receive_data(scsi_command(bytes([0x28] + [0] * 9), itt=6, cmdsn=2, edtl=12000, read=True))
    [task] = events(core)
    assert isinstance(task, ScsiCommand)
    core.complete(task, ScsiResult(data=bytes(10000)))
    data_in = replies(core)
    assert [len(r.data) for r in data_in] == [4096, 4096, 1808]
    assert [r.u32(36) for r in data_in] == [0, 1, 2] and [r.u32(40) for r in data_in] == [0, 4096, 8192]
    last = data_in[-1]
    assert last.flags & 0x01 and last.flags & 0x02 and last.u32(44) == 2000  # S, U, residual


def _deliver(core: TargetConnection, wire: bytes, mode: str) -> None:
    """Bytes to the core: whole, byte by byte, in uneven chunks, or the BufferedProtocol way
    (get_buffer / buffer_updated, a little less than the buffer offered each time)."""
    if mode == "whole":
        core.receive_data(wire)
    elif mode == "bytes":
        for i in range(len(wire)):
            core.receive_data(wire[i : i + 1])
    elif mode == "chunks":
        pos, step = 0, 1
        while pos < len(wire):
            core.receive_data(wire[pos : pos + step])
            pos += step
            step = step * 7 % 65521 + 13
    else:
        # "loopback": as much as the buffer offered takes, as a receive on loopback does (a
        # header and most of a 256 KiB data segment in one).
        limit = 40000 if mode == "buffered" else 1 << 30
        view = memoryview(wire)
        while view:
            target = core.get_buffer(-1)
            n = min(len(target), len(view), limit)
            target[:n] = view[:n]
            core.buffer_updated(n)
            view = view[n:]


LARGE = [
    *[
        (k, v)
        for k, v in OPERATIONAL
        if k not in ("FirstBurstLength", "MaxBurstLength", "MaxRecvDataSegmentLength")
    ],
    ("MaxRecvDataSegmentLength", "262144"),
    ("FirstBurstLength", "65536"),
    ("MaxBurstLength", "131072"),
]


@pytest.mark.parametrize("digests", [False, True])
@pytest.mark.parametrize("mode", ["whole", "bytes", "chunks", "buffered"])
def test_solicited_data_out_is_received_in_place_into_the_writes_buffer(mode: str, digests: bool) -> None:
    """A 160 KiB write: 16 KiB immediate, an R2T of 128 KiB answered by two 64 KiB Data-Out
    (long enough for the reader's sink: received straight into the write's buffer unless a
    PDU arrived whole), an R2T of the last 16 KiB (the copy path), a NOP-Out behind it."""
    pairs = [(k, "CRC32C" if digests and k in ("HeaderDigest", "DataDigest") else v) for k, v in LARGE]
    d = {"header_digest": digests, "data_digest": digests}
    core = logged_in(pairs)
    payload = bytes((i * 7 + i // 4096) & 0xFF for i in range(160 * 1024))
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 80, 0])
    _deliver(
        core,
        scsi_command(cdb, itt=5, cmdsn=1, edtl=len(payload), write=True, data=payload[:16384], **d),
        mode,
    )
    [r2t] = replies(core, **d)
    assert (r2t.opcode, r2t.u32(40), r2t.u32(44)) == (Opcode.R2T, 16384, 131072)
    wire = b"".join(
        data_out(payload[pos : pos + 65536], itt=5, ttt=r2t.u32(20), datasn=i, offset=pos, final=i == 1, **d)
        for i, pos in enumerate((16384, 81920))
    )
    _deliver(core, wire, mode)
    [r2t2] = replies(core, **d)
    assert (r2t2.opcode, r2t2.u32(40), r2t2.u32(44)) == (Opcode.R2T, 147456, 16384)
    last = data_out(payload[147456:], itt=5, ttt=r2t2.u32(20), datasn=0, offset=147456, final=True, **d)
    _deliver(core, last + nop_out(itt=9, cmdsn=2, data=b"ping", **d), mode)
    [task] = events(core)
    assert isinstance(task, ScsiCommand) and task.data == payload
    assert core.reader.in_place_bytes == (0 if mode == "whole" else 131072)
    [nop] = replies(core, **d)
    assert nop.opcode == Opcode.NOP_IN and nop.data == b"ping"
    assert core.reader.buffered == 0


@pytest.mark.parametrize("mode", ["bytes", "buffered"])
def test_a_wrong_data_digest_on_data_received_in_place_closes_the_connection(mode: str) -> None:
    pairs = [(k, "CRC32C" if k in ("HeaderDigest", "DataDigest") else v) for k, v in LARGE]
    d = {"header_digest": True, "data_digest": True}
    core = logged_in(pairs)
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 64, 0])
    core.receive_data(scsi_command(cdb, itt=5, cmdsn=1, edtl=65536, write=True, **d))
    [r2t] = replies(core, **d)
    wire = bytearray(data_out(bytes(65536), itt=5, ttt=r2t.u32(20), datasn=0, offset=0, final=True, **d))
    wire[-1] ^= 0xFF
    _deliver(core, bytes(wire), mode)
    [event] = events(core)
    assert isinstance(event, ConnectionClosed) and "data digest" in event.reason
    assert replies(core, **d)[0].opcode == Opcode.REJECT


def test_wrong_datasn_closes_the_connection() -> None:
    core = logged_in()
    core.receive_data(scsi_command(bytes([0x2A] + [0] * 9), itt=5, cmdsn=1, edtl=8192, write=True))
    [r2t] = replies(core)
    core.receive_data(data_out(bytes(4096), itt=5, ttt=r2t.u32(20), datasn=1, offset=0, final=False))
    [event] = events(core)
    assert isinstance(event, ConnectionClosed) and "DataSN" in event.reason
    assert replies(core)[0].opcode == Opcode.REJECT


def test_cmdsn_window_orders_and_ignores() -> None:
    core = logged_in()
    tur = bytes(6)
    core.receive_data(scsi_command(tur, itt=11, cmdsn=2, edtl=0))  # ahead: held
    assert events(core) == []
    core.receive_data(scsi_command(tur, itt=12, cmdsn=500, edtl=0))  # outside the window: ignored
    core.receive_data(scsi_command(tur, itt=10, cmdsn=1, edtl=0))
    assert [e.itt for e in events(core) if isinstance(e, ScsiCommand)] == [10, 11]
    core.receive_data(scsi_command(tur, itt=13, cmdsn=1, edtl=0))  # too old: ignored
    assert events(core) == []


def test_digests_when_negotiated() -> None:
    pairs = [(k, "CRC32C" if k in ("HeaderDigest", "DataDigest") else v) for k, v in OPERATIONAL]
    core = logged_in(pairs)
    core.receive_data(nop_out(itt=3, cmdsn=1, data=b"abc", header_digest=True, data_digest=True))
    [nop] = replies(core, header_digest=True, data_digest=True)
    assert nop.data == b"abc"
    good = bytearray(nop_out(itt=4, cmdsn=1, data=b"abcd", header_digest=True, data_digest=True))
    good[-1] ^= 0xFF  # the data digest
    core.receive_data(bytes(good))
    [event] = events(core)
    assert isinstance(event, ConnectionClosed) and "digest" in event.reason
    core = logged_in(pairs)
    bad = bytearray(nop_out(itt=4, cmdsn=1, header_digest=True))
    bad[48] ^= 1  # the header digest
    core.receive_data(bytes(bad))
    [event] = events(core)
    assert isinstance(event, ConnectionClosed) and "header digest" in event.reason


def test_oversized_data_segment_closes_before_buffering_it() -> None:
    core = logged_in()
    header = bytearray(nop_out(itt=3, cmdsn=1))
    header[5:8] = (16 * 1024 * 1024 - 1).to_bytes(3, "big")  # beyond MaxRecvDataSegmentLength
    core.receive_data(bytes(header))
    [event] = events(core)
    assert isinstance(event, ConnectionClosed) and "MaxRecvDataSegmentLength" in event.reason
    assert core.reader.buffered <= 48


def test_logout() -> None:
    core = logged_in()
    core.receive_data(logout_request(itt=8, cmdsn=1))
    [event] = events(core)
    core.logout_done(event)  # type: ignore[arg-type]
    [reply] = replies(core)
    assert reply.opcode == Opcode.LOGOUT_RESPONSE and reply.bhs[2] == 0
    assert isinstance(events(core)[-1], ConnectionClosed)


def test_reader_refuses_target_opcodes() -> None:
    reader = PduReader()
    reader.feed(bytes([0x21]) + bytes(47))
    with pytest.raises(PduError):
        reader.next_pdu()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(min_size=0, max_size=200), max_size=8), st.booleans())
def test_fuzz_random_bytes_after_login_never_raise(chunks: list[bytes], digests: bool) -> None:
    pairs = [(k, "CRC32C" if digests and k in ("HeaderDigest", "DataDigest") else v) for k, v in OPERATIONAL]
    core = logged_in(pairs)
    for chunk in chunks:
        core.receive_data(chunk)
        for event in events(core):
            if isinstance(event, ScsiCommand):
                core.complete(event, ScsiResult())
        replies(core, header_digest=digests, data_digest=digests)  # whatever goes out parses
    assert core.reader.buffered <= 48 + 1024 + 4 + 256 * 1024 + 8


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_pdus(data: st.DataObject) -> None:
    core = logged_in()
    wire = bytearray(
        scsi_command(
            bytes([0x2A] + [0] * 9), itt=5, cmdsn=1, edtl=1024, write=True, data=bytes(512), final=False
        )
        + data_out(bytes(512), itt=5, ttt=0xFFFFFFFF, datasn=0, offset=512, final=True)
        + nop_out(itt=6, cmdsn=2, data=b"x")
        + text_request([("SendTargets", "All")], itt=7, cmdsn=2)
    )
    for _ in range(data.draw(st.integers(0, 6))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    core.receive_data(bytes(wire[:cut]))
    core.receive_data(bytes(wire[cut:]))
    for event in events(core):
        if isinstance(event, ScsiCommand):
            core.complete(event, ScsiResult())
    out = replies(core)
    # Either the damage was caught (the connection closes) or the PDUs were valid after all
    # and each got its answer; never an exception, never a reply that does not parse.  An R2T
    # is a valid answer too: a mutated flags byte or DataSegmentLength can make a valid write
    # whose data did not all come unsolicited (hypothesis found flags 0xA0, segment 5).
    assert core.closed or {r.opcode for r in out} <= {
        Opcode.R2T,
        Opcode.SCSI_RESPONSE,
        Opcode.NOP_IN,
        Opcode.TEXT_RESPONSE,
        Opcode.REJECT,
    }


def test_r2t_budget_bounds_the_write_data_a_connection_is_asked_for() -> None:
    """Three 32 MiB writes: the first two get R2Ts (64 MiB, the budget), the third waits until
    one of them ends.  Write buffers are allocated whole when the budget takes them (the
    Data-Out is received into them), never for a write still waiting for its R2T."""
    core = logged_in()
    big = 32 * 1024 * 1024
    cdb = bytes([0x2A] + [0] * 9)
    for itt, cmdsn in ((21, 1), (22, 2), (23, 3)):
        core.receive_data(scsi_command(cdb, itt=itt, cmdsn=cmdsn, edtl=big, write=True))
    r2ts = replies(core)
    assert [(r.opcode, r.u32(16)) for r in r2ts] == [(Opcode.R2T, 21), (Opcode.R2T, 22)]
    assert [len(core.tasks[itt].data or b"") for itt in (21, 22, 23)] == [big, big, 0]
    core.abort(21)
    [r2t] = replies(core)
    assert (r2t.opcode, r2t.u32(16), r2t.u32(40)) == (Opcode.R2T, 23, 0)


@pytest.mark.parametrize("digests", [False, True])
def test_short_read_is_one_data_in_with_status_and_a_write_one_response(digests: bool) -> None:
    """The data path's answers (``complete``'s fast path): a read that fits one segment is a
    single Data-In carrying GOOD status (S bit), padded to 4 bytes, with the residual; a
    write's GOOD is one SCSI Response; StatSN advances by one each; digests when negotiated."""
    on = "CRC32C" if digests else "None"
    pairs = [(k, on if k in ("HeaderDigest", "DataDigest") else v) for k, v in OPERATIONAL]
    core = logged_in(pairs)
    wire = {"header_digest": digests, "data_digest": digests}
    core.receive_data(scsi_command(bytes([0x28] + [0] * 9), itt=6, cmdsn=1, edtl=4096, read=True, **wire))
    [task] = events(core)
    assert isinstance(task, ScsiCommand)
    core.complete(task, ScsiResult(data=b"\x07" * 4093))  # odd length: 3 bytes of padding
    [data_in] = replies(core, **wire)
    assert data_in.opcode == Opcode.SCSI_DATA_IN and data_in.data == b"\x07" * 4093
    assert data_in.flags == 0x80 | 0x02 | 0x01  # F, U (underflow), S
    assert data_in.u32(44) == 3 and data_in.u32(16) == 6 and data_in.u32(36) == 0  # residual, ITT, DataSN
    stat_sn = data_in.u32(24)
    core.receive_data(
        scsi_command(
            bytes([0x2A] + [0] * 7 + [8, 0]), itt=7, cmdsn=2, edtl=4096, write=True, data=bytes(4096), **wire
        )
    )
    [task] = events(core)
    assert isinstance(task, ScsiCommand)
    core.complete(task, ScsiResult(wanted=4096))
    [response] = replies(core, **wire)
    assert response.opcode == Opcode.SCSI_RESPONSE and response.bhs[3] == 0 and response.u32(16) == 7
    assert response.u32(24) == stat_sn + 1 and response.u32(28) == 3  # StatSN, ExpCmdSN


class _FileSpan(FileSpan):
    def read_part(self, skip: int = 0) -> bytearray:
        return bytearray(os.pread(self.fd, self.length - skip, self.offset + skip))


@pytest.mark.parametrize("header_digest", [False, True])
@pytest.mark.parametrize(("segment", "burst"), [("4096", "16384"), ("24576", "65536"), ("262144", "262144")])
@pytest.mark.parametrize("edtl_short", [False, True])
def test_data_in_from_file_spans_is_the_same_wire_as_from_bytes(
    tmp_path: Path, segment: str, burst: str, header_digest: bool, edtl_short: bool
) -> None:
    """A read answered with FileSpans (zero-copy Data-In): headers, DataSN, offsets, F and S
    bits, residuals as for the same bytes, each segment's spans split where it ends; the spans
    read back give the bytes the buffered path sends."""
    payload = bytes((i * 13 + i // 997) & 0xFF for i in range(160 * 1024))
    path = tmp_path / "pd.img"
    path.write_bytes(bytes(1000) + payload)
    pairs = [
        *(
            (k, "CRC32C" if header_digest and k == "HeaderDigest" else v)
            for k, v in OPERATIONAL
            if k not in ("MaxRecvDataSegmentLength", "MaxBurstLength")
        ),
        ("MaxRecvDataSegmentLength", segment),
        ("MaxBurstLength", burst),
    ]
    # Spans of uneven lengths, as RAID 0 stripe units at an unaligned read would give.
    cuts = [0, 5000, 70000, 70001, 131072, len(payload)]
    edtl = len(payload) - (4096 if edtl_short else 0)  # shorter than the CDB: overflow residual
    cdb = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 80, 0])
    wires = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for answer in ("bytes", "spans"):
            core = logged_in(pairs)
            core.receive_data(
                scsi_command(cdb, itt=7, cmdsn=1, edtl=edtl, read=True, header_digest=header_digest)
            )
            [task] = events(core)
            assert isinstance(task, ScsiCommand)
            if answer == "bytes":
                core.complete(task, ScsiResult(data=payload))
            else:
                spans: list[FileSpan] = [
                    _FileSpan(fd, 1000 + start, end - start) for start, end in itertools.pairwise(cuts)
                ]
                core.complete(task, ScsiResult(spans=spans, wanted=len(payload)))
            out = core.data_to_send()
            if answer == "spans":
                assert any(isinstance(item, FileSpan) for item in out)
            wires.append(
                b"".join(item.read_part() if isinstance(item, FileSpan) else bytes(item) for item in out)
            )
    finally:
        os.close(fd)
    assert wires[0] == wires[1]
    pdus = parse_replies(wires[1], header_digest=header_digest)
    assert b"".join(p.data for p in pdus) == payload[:edtl]
    assert pdus[-1].flags & 0x81 == 0x81  # F and S on the last
    if edtl_short:
        assert pdus[-1].flags & 0x04 and pdus[-1].u32(44) == 4096  # overflow, residual count


@pytest.mark.parametrize("digests", [False, True])
@pytest.mark.parametrize("mode", ["whole", "bytes", "chunks", "buffered", "loopback"])
def test_a_write_with_a_quarter_immediate_gets_its_whole_buffer_at_once(mode: str, digests: bool) -> None:
    """libiscsi's 1 MiB write: 256 KiB immediate data, then three R2Ts of 256 KiB
    (MaxBurstLength).  The immediate data is received into a buffer of the whole write
    (PREALLOCATE_FACTOR), the Data-Out after it into that same buffer: nothing is copied into
    a larger buffer later, and (unless the PDUs arrive whole) every byte is received in place."""
    # What libiscsi offers: FirstBurstLength and MaxBurstLength 256 KiB.
    burst_keys = {"FirstBurstLength": "262144", "MaxBurstLength": "262144"}
    pairs = [
        (k, "CRC32C" if digests and k in ("HeaderDigest", "DataDigest") else burst_keys.get(k, v))
        for k, v in LARGE
    ]
    d = {"header_digest": digests, "data_digest": digests}
    core = logged_in(pairs)
    assert core.params.max_burst_length == core.params.first_burst_length == 262144
    payload = bytes((i * 11 + i // 4093) & 0xFF for i in range(1024 * 1024))
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 8, 0, 0])  # 2048 blocks
    burst = 262144
    _deliver(
        core,
        scsi_command(cdb, itt=5, cmdsn=1, edtl=len(payload), write=True, data=payload[:burst], **d),
        mode,
    )
    buffers = {id(task.data) for task in core.tasks.values()}
    for n in range(1, 4):
        [r2t] = replies(core, **d)
        assert (r2t.opcode, r2t.u32(40), r2t.u32(44)) == (Opcode.R2T, n * burst, burst)
        piece = payload[n * burst : (n + 1) * burst]
        _deliver(
            core, data_out(piece, itt=5, ttt=r2t.u32(20), datasn=0, offset=n * burst, final=True, **d), mode
        )
        buffers |= {id(task.data) for task in core.tasks.values()}
    [task] = events(core)
    assert isinstance(task, ScsiCommand) and task.data == payload
    assert buffers == {id(task.data)}  # one buffer from the command on: never reallocated
    assert core.reader.in_place_bytes == (0 if mode == "whole" else len(payload))
    assert core.reader.buffered == 0


def test_immediate_data_of_a_much_larger_write_is_not_preallocated_whole() -> None:
    """A command whose immediate data is less than a quarter of its transfer pins only what
    it sent until the R2T budget takes it (memory bounded by what initiators send)."""
    core = logged_in(LARGE)
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0x10, 0, 0, 0])  # 8 MiB
    wire = scsi_command(cdb, itt=5, cmdsn=1, edtl=8 * 1024 * 1024, write=True, data=bytes(65536))
    reader = core.reader
    view = memoryview(wire)
    target = core.get_buffer(-1)
    target[: len(view) - 10] = view[:-10]
    core.buffer_updated(len(view) - 10)  # the data has not all arrived: the sink is asked
    assert reader._held is not None and len(reader._held[2].obj) == 65536  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["whole", "buffered"])
def test_max_outstanding_r2t_asks_the_next_bursts_before_the_current_one_is_in(mode: str) -> None:
    """An initiator offering MaxOutstandingR2T=8 gets 4 (the target's limit, Minimum): a
    1 MiB write with 128 KiB immediate data and 128 KiB bursts gets four R2Ts at once, and one
    more each time a burst is complete, in offset order with R2TSN counting up; the Data-Out
    answering them in order (DataSequenceInOrder=Yes) makes the whole write."""
    pairs = [
        *[(k, v) for k, v in LARGE if k not in ("MaxBurstLength", "FirstBurstLength")],
        ("FirstBurstLength", "131072"),
        ("MaxBurstLength", "131072"),
        ("MaxOutstandingR2T", "8"),
    ]
    core = TargetConnection(policy())
    core.receive_data(login_request(pairs, csg=1, nsg=3))
    [login] = replies(core)
    assert login.text["MaxOutstandingR2T"] == "4"
    events(core)
    payload = bytes((i * 5 + i // 3001) & 0xFF for i in range(1024 * 1024))
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 8, 0, 0])
    burst = first = 131072
    _deliver(
        core, scsi_command(cdb, itt=5, cmdsn=1, edtl=len(payload), write=True, data=payload[:first]), mode
    )
    asked = replies(core)
    assert [(r.opcode, r.u32(36), r.u32(40), r.u32(44)) for r in asked] == [
        (Opcode.R2T, sn, first + sn * burst, burst) for sn in range(4)
    ]
    outstanding = [(r.u32(20), r.u32(40)) for r in asked]
    sn = 4
    while outstanding:
        ttt, offset = outstanding.pop(0)
        _deliver(
            core,
            data_out(payload[offset : offset + burst], itt=5, ttt=ttt, datasn=0, offset=offset, final=True),
            mode,
        )
        more = replies(core)
        if first + sn * burst < len(payload):
            [r2t] = more
            assert (r2t.u32(36), r2t.u32(40), r2t.u32(44)) == (sn, first + sn * burst, burst)
            outstanding.append((r2t.u32(20), r2t.u32(40)))
            sn += 1
        else:
            assert more == []
    assert sn == 7  # 896 KiB in 128 KiB bursts
    [task] = events(core)
    assert isinstance(task, ScsiCommand) and task.data == payload


def test_data_out_for_an_r2t_ahead_of_the_current_one_is_refused() -> None:
    """DataSequenceInOrder=Yes: the bursts come in the order asked; data for the second
    outstanding R2T before the first's is a protocol error."""
    pairs = [
        *[(k, v) for k, v in LARGE if k not in ("MaxBurstLength", "FirstBurstLength")],
        ("FirstBurstLength", "65536"),
        ("MaxBurstLength", "65536"),
        ("MaxOutstandingR2T", "2"),
    ]
    core = logged_in(pairs)
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 1, 128, 0])  # 192 KiB
    core.receive_data(scsi_command(cdb, itt=5, cmdsn=1, edtl=196608, write=True, data=bytes(65536)))
    first, second = replies(core)
    assert (first.u32(40), second.u32(40)) == (65536, 131072)
    core.receive_data(data_out(bytes(65536), itt=5, ttt=second.u32(20), datasn=0, offset=131072, final=True))
    closed = [e for e in events(core) if isinstance(e, ConnectionClosed)]
    assert closed and not closed[0].clean
