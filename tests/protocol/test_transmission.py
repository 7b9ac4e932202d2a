"""The transmission phase of the sans-IO core: requests in, replies out, golden bytes from
the spec, and every malformed request the issues list."""

from __future__ import annotations

from functools import partial

import pytest

from thinblock.blockdev import Capabilities
from thinblock.nbd.constants import Command, CommandFlags, Errno, TransmissionFlags
from thinblock.nbd.protocol import (
    ConnectionClosed,
    ExportInfo,
    ProtocolError,
    ReplyError,
    Request,
    RequestRejected,
    ServerConnection,
    transmission_flags,
)

from .wire import (
    EXPORTS,
    FEEDERS,
    SIZE,
    drain,
    feed_buffered,
    info_payload,
    negotiate,
    new_connection,
    option,
    request,
    u16,
    u32,
    u64,
)

feeders = pytest.mark.parametrize("feed", list(FEEDERS.values()), ids=list(FEEDERS))

SIMPLE = bytes.fromhex("67446698")
STRUCTURED = bytes.fromhex("668e33ef")
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
EINVAL, ENOSPC, EPERM = 22, 28, 1
MAX_BLOCK = 32 * 1024 * 1024


def simple_reply(handle: int, error: int = 0) -> bytes:
    """S: 0x67446698, 32-bit error, 64-bit handle."""
    return SIMPLE + u32(error) + u64(handle)


def chunk(handle: int, type_: int, payload: bytes, flags: int = 1) -> bytes:
    """S: 0x668e33ef, 16-bit flags, 16-bit type, 64-bit handle, 32-bit length, payload."""
    return STRUCTURED + u16(flags) + u16(type_) + u64(handle) + u32(len(payload)) + payload


def connection(structured: bool = True, meta: bool = True, **kwargs: object) -> ServerConnection:
    conn = new_connection(**kwargs)
    negotiate(conn, structured=structured, meta=meta)
    return conn


# --- requests ------------------------------------------------------------------------------


@feeders
@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (request(READ, 7, 4096, 512), Request(7, Command.READ, CommandFlags(0), 4096, 512)),
        (request(READ, 7, 0, 0), Request(7, Command.READ, CommandFlags(0), 0, 0)),  # "SHOULD NOT disconnect"
        (request(FLUSH, 8), Request(8, Command.FLUSH, CommandFlags(0), 0, 0)),
        (request(TRIM, 9, 512, 1024, FUA), Request(9, Command.TRIM, CommandFlags.FUA, 512, 1024)),
        (request(CACHE, 10, 0, 65536), Request(10, Command.CACHE, CommandFlags(0), 0, 65536)),
        (
            request(WRITE_ZEROES, 11, 0, SIZE, NO_HOLE | FAST_ZERO | FUA),
            Request(11, Command.WRITE_ZEROES, CommandFlags(NO_HOLE | FAST_ZERO | FUA), 0, SIZE),
        ),
        (
            request(BLOCK_STATUS, 2**64 - 1, 0, SIZE, REQ_ONE),
            Request(2**64 - 1, Command.BLOCK_STATUS, CommandFlags.REQ_ONE, 0, SIZE),
        ),
        # "NBD_CMD_FLAG_FUA ... is valid for all commands, provided NBD_FLAG_SEND_FUA has been negotiated"
        (request(READ, 12, 0, 1, FUA), Request(12, Command.READ, CommandFlags.FUA, 0, 1)),
        (request(READ, 13, SIZE - 1, 1), Request(13, Command.READ, CommandFlags(0), SIZE - 1, 1)),
    ],
    ids=[
        "read",
        "read-0",
        "flush",
        "trim-fua",
        "cache",
        "zeroes-flags",
        "status-req-one",
        "read-fua",
        "read-last",
    ],
)
def test_requests_golden(feed, wire: bytes, expected: Request) -> None:
    conn = connection()
    assert feed(conn, wire) == [expected]
    assert conn.data_to_send() == b""


@feeders
def test_write_with_payload(feed) -> None:
    conn = connection()
    payload = bytes(range(256)) * 20
    events = feed(conn, request(WRITE, 5, 100, len(payload), FUA) + payload + request(FLUSH, 6))
    assert events == [
        Request(5, Command.WRITE, CommandFlags.FUA, 100, len(payload), memoryview(payload)),
        Request(6, Command.FLUSH, CommandFlags(0), 0, 0),
    ]
    assert isinstance(events[0], Request) and events[0].data is not None
    assert bytes(events[0].data) == payload


def test_write_payload_is_received_straight_into_its_own_buffer() -> None:
    conn = connection()
    header = request(WRITE, 5, 0, 100_000)
    conn.receive_data(header)
    assert drain(conn) == []
    buf = conn.get_buffer(-1)
    assert len(buf) == 100_000  # the payload buffer, not the header buffer
    buf[:] = b"\xab" * 100_000
    del buf
    conn.buffer_updated(100_000)
    (event,) = drain(conn)
    assert isinstance(event, Request) and event.data is not None and bytes(event.data) == b"\xab" * 100_000
    assert conn.buffered_bytes == 0


@feeders
def test_disc_ends_the_session_and_later_bytes_are_ignored(feed) -> None:
    conn = connection()
    events = feed(conn, request(READ, 1, 0, 1) + request(DISC, 2) + b"garbage after DISC")
    assert events[0] == Request(1, Command.READ, CommandFlags(0), 0, 1)
    assert events[1] == ConnectionClosed("client sent NBD_CMD_DISC", clean=True)
    assert len(events) == 2


# --- replies --------------------------------------------------------------------------------


def test_simple_replies_golden() -> None:
    conn = connection(structured=False)
    read = Request(7, Command.READ, CommandFlags(0), 0, 4)
    assert b"".join(conn.reply_read(read, b"abcd")) == simple_reply(7) + b"abcd"
    write = Request(8, Command.WRITE, CommandFlags(0), 0, 4)
    assert conn.reply_ok(write) == simple_reply(8)
    assert conn.reply_error(write, Errno.ENOSPC, "full") == simple_reply(8, ENOSPC)
    # "If it chooses not to [disconnect], it MUST NOT send any payload for this request."
    assert conn.reply_error(read, Errno.EIO) == simple_reply(7, 5)


def test_structured_replies_golden() -> None:
    conn = connection()
    read = Request(7, Command.READ, CommandFlags(0), 4096, 4)
    # NBD_REPLY_TYPE_OFFSET_DATA (1), DONE: 64-bit offset, data
    assert b"".join(conn.reply_read(read, b"abcd")) == chunk(7, 1, u64(4096) + b"abcd")
    # NBD_REPLY_TYPE_ERROR (2^15 + 1): error, 16-bit message length, message
    assert conn.reply_error(read, Errno.EIO, "bad disk") == chunk(7, 0x8001, u32(5) + u16(8) + b"bad disk")
    # Writes are answered with simple replies: allowed "for any request other than NBD_CMD_READ,
    # but only if the reply has no data payload".
    write = Request(8, Command.WRITE, CommandFlags(0), 0, 4)
    assert conn.reply_ok(write) == simple_reply(8)
    # A zero-length read: NBD_REPLY_TYPE_NONE (0) with DONE, no payload.
    empty = Request(9, Command.READ, CommandFlags(0), 0, 0)
    assert b"".join(conn.reply_read(empty, b"")) == chunk(9, 0, b"")


def test_structured_read_with_holes_sends_no_zeros() -> None:
    conn = connection()
    read = Request(3, Command.READ, CommandFlags(0), 1000, 3000)
    pieces = [(1000, 500, None), (1500, 500, None), (2000, 1000, b"x" * 1000), (3000, 1000, None)]
    out = b"".join(conn.reply_read_extents(read, pieces))
    assert out == (
        # adjacent holes merged; NBD_REPLY_TYPE_OFFSET_HOLE (2): 64-bit offset, 32-bit size
        chunk(3, 2, u64(1000) + u32(1000), flags=0)
        + chunk(3, 1, u64(2000) + b"x" * 1000, flags=0)
        + chunk(3, 2, u64(3000) + u32(1000), flags=1)  # the last chunk carries DONE
    )
    assert bytes(1000) not in out


def test_simple_read_with_holes_sends_zeros() -> None:
    conn = connection(structured=False)
    read = Request(3, Command.READ, CommandFlags(0), 0, 3 * 1024 * 1024)
    data = b"y" * 1024 * 1024
    pieces = [(0, 2 * 1024 * 1024, None), (2 * 1024 * 1024, 1024 * 1024, data)]
    out = b"".join(conn.reply_read_extents(read, pieces))
    assert out == simple_reply(3) + bytes(2 * 1024 * 1024) + data


@pytest.mark.parametrize(
    "pieces",
    [
        [(0, 100, None)],  # short
        [(0, 100, None), (150, 50, None)],  # gap
        [(0, 100, None), (50, 150, None)],  # overlap
        [(0, 200, b"x" * 199)],  # data length disagrees
        [(0, 0, None), (0, 200, None)],  # empty piece
        [(0, 300, None)],  # past the request
    ],
)
def test_read_pieces_must_cover_the_request(pieces: list) -> None:
    conn = connection()
    with pytest.raises(ReplyError):
        conn.reply_read_extents(Request(1, Command.READ, CommandFlags(0), 0, 200), pieces)


def test_read_reply_needs_exactly_the_requested_length() -> None:
    conn = connection()
    with pytest.raises(ReplyError):
        conn.reply_read(Request(1, Command.READ, CommandFlags(0), 0, 200), b"x")
    with pytest.raises(ReplyError):
        conn.reply_ok(Request(1, Command.READ, CommandFlags(0), 0, 200))
    with pytest.raises(ReplyError):
        conn.reply_error(Request(1, Command.READ, CommandFlags(0), 0, 200), 0)


def test_block_status_golden() -> None:
    conn = connection()
    status = Request(4, Command.BLOCK_STATUS, CommandFlags(0), 0, 8192)
    # NBD_REPLY_TYPE_BLOCK_STATUS (5): context id, then (length, flags); same flags merged
    out = conn.reply_block_status(status, [(1024, 3), (1024, 3), (2048, 0), (65536, 3)])
    assert out == chunk(4, 5, u32(1) + u32(2048) + u32(3) + u32(2048) + u32(0) + u32(4096) + u32(3))


def test_block_status_req_one_sends_one_descriptor_within_the_request() -> None:
    # "every reply chunk MUST contain exactly one descriptor, and that descriptor MUST NOT exceed
    # the length of the original request"
    conn = connection()
    status = Request(4, Command.BLOCK_STATUS, CommandFlags.REQ_ONE, 0, 1000)
    assert conn.reply_block_status(status, [(4096, 3), (4096, 0)]) == chunk(4, 5, u32(1) + u32(1000) + u32(3))
    assert conn.reply_block_status(status, [(10, 0), (4096, 3)]) == chunk(4, 5, u32(1) + u32(10) + u32(0))


def test_block_status_masks_reserved_bits_and_needs_an_extent() -> None:
    conn = connection()
    status = Request(4, Command.BLOCK_STATUS, CommandFlags(0), 0, 100)
    assert conn.reply_block_status(status, [(100, 0xFF)]) == chunk(4, 5, u32(1) + u32(100) + u32(3))
    with pytest.raises(ReplyError):
        conn.reply_block_status(status, [])
    with pytest.raises(ReplyError):
        conn.reply_block_status(status, [(0, 3)])


# --- malformed and refused requests ----------------------------------------------------------


@feeders
@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (request(9, 1), EINVAL),  # unknown command
        (request(8, 1), EINVAL),  # NBD_CMD_RESIZE: not supported
        (request(0xFFFF, 1, 5, 5), EINVAL),
        (request(READ, 1, 0, 1, 0x40), EINVAL),  # unknown flag
        (request(READ, 1, 0, 1, 0x8000), EINVAL),
        (request(READ, 1, 0, 1, NO_HOLE), EINVAL),  # flag not for this command
        (request(READ, 1, 0, 1, DF), EINVAL),  # NBD_FLAG_SEND_DF not advertised
        (request(READ, 1, 0, 1, REQ_ONE), EINVAL),
        (request(TRIM, 1, 0, 1, FAST_ZERO), EINVAL),
        (request(FLUSH, 1, 0, 1, NO_HOLE), EINVAL),
        (request(READ, 1, 0, 0xFFFFFFFF), EINVAL),  # "4 GiB": past the end and over the maximum
        (request(READ, 1, SIZE, 1), EINVAL),  # past the end
        (request(READ, 1, 2**64 - 1, 2), EINVAL),  # offset + length overflows 64 bits
        (
            request(TRIM, 1, SIZE - 1, 2),
            EINVAL,
        ),  # "NBD_EINVAL if it receives a read or trim request ... beyond"
        (
            request(WRITE_ZEROES, 1, SIZE, 1),
            ENOSPC,
        ),  # "NBD_ENOSPC if it receives a write zeroes request ... beyond"
        (request(WRITE_ZEROES, 1, 2**64 - 512, 1024), ENOSPC),
        (request(CACHE, 1, SIZE, 1), EINVAL),
        (request(BLOCK_STATUS, 1, SIZE - 1, 2), EINVAL),
        (request(BLOCK_STATUS, 1, 0, 0), EINVAL),
        (request(FLUSH, 1, 1, 0), EINVAL),  # "length and offset are reserved, and MUST be set to all-zero"
        (request(FLUSH, 1, 0, 1), EINVAL),
    ],
)
def test_refused_requests_get_an_error_reply_and_the_stream_goes_on(feed, wire: bytes, error: int) -> None:
    conn = connection(structured=False)
    events = feed(conn, wire + request(READ, 99, 0, 1))
    assert len(events) == 2
    assert isinstance(events[0], RequestRejected) and events[0].error == error and events[0].reason
    assert events[1] == Request(99, Command.READ, CommandFlags(0), 0, 1)
    # Without structured replies: a simple reply with the error and no data.
    assert conn.data_to_send() == simple_reply(1, error)


def test_refused_read_with_structured_replies_is_an_error_chunk() -> None:
    # "MUST NOT use a simple reply for NBD_CMD_READ (even for the case of an early NBD_EINVAL due to
    # bad flags)"
    conn = connection()
    conn.receive_data(request(READ, 5, 0, 1, DF))
    (event,) = drain(conn)
    assert isinstance(event, RequestRejected)
    message = event.reason.encode()
    assert conn.data_to_send() == chunk(5, 0x8001, u32(EINVAL) + u16(len(message)) + message)


@feeders
def test_block_status_without_a_negotiated_context(feed) -> None:
    # "Servers SHOULD reply with NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS without
    # selecting at least one metadata context."
    for conn in (connection(structured=True, meta=False), connection(structured=False)):
        events = feed(conn, request(BLOCK_STATUS, 3, 0, 512))
        assert len(events) == 1 and isinstance(events[0], RequestRejected) and events[0].error == EINVAL


@feeders
@pytest.mark.parametrize(
    ("offset", "length", "error"),
    [
        (SIZE, 512, ENOSPC),  # past the end: "NBD_ENOSPC if it receives a write request ... beyond"
        (SIZE - 511, 512, ENOSPC),
        (2**64 - 256, 512, ENOSPC),  # offset + length overflows 64 bits
    ],
)
def test_refused_write_payload_is_consumed(feed, offset: int, length: int, error: int) -> None:
    conn = connection(structured=False)
    payload = b"\x5a" * length
    events = feed(conn, request(WRITE, 1, offset, length) + payload + request(WRITE, 2, 0, 3) + b"abc")
    assert isinstance(events[0], RequestRejected) and events[0].error == error
    assert events[1] == Request(2, Command.WRITE, CommandFlags(0), 0, 3, memoryview(b"abc"))
    assert conn.data_to_send() == simple_reply(1, error)
    assert conn.buffered_bytes <= 2  # at most the trailing bytes of the "trailing" feeder


@pytest.mark.parametrize(
    "feed", [FEEDERS["whole"], partial(feed_buffered, chunk=100_003)], ids=["whole", "buffered"]
)
def test_write_over_the_maximum_block_is_refused_and_its_payload_consumed(feed) -> None:
    big = ExportInfo("big", 1 << 40, TransmissionFlags.HAS_FLAGS)
    conn = _connection_to(big)
    length = MAX_BLOCK + 1
    events = feed(conn, request(WRITE, 1, 0, length) + bytes(length) + request(WRITE, 2, 0, 3) + b"abc")
    assert isinstance(events[0], RequestRejected) and events[0].error == EINVAL
    assert events[1] == Request(2, Command.WRITE, CommandFlags(0), 0, 3, memoryview(b"abc"))
    assert conn.data_to_send() == simple_reply(1, EINVAL)


def test_write_with_bad_flags_is_consumed() -> None:
    conn = connection(structured=False)
    conn.receive_data(request(WRITE, 1, 0, 4, REQ_ONE) + b"abcd" + request(FLUSH, 2))
    events = drain(conn)
    assert isinstance(events[0], RequestRejected) and events[0].error == EINVAL
    assert events[1] == Request(2, Command.FLUSH, CommandFlags(0), 0, 0)


def test_write_too_large_to_skip_drops_the_connection() -> None:
    conn = connection(max_discard=1024 * 1024)
    conn.receive_data(request(WRITE, 1, 0, 0xFFFFFFFF))
    events = drain(conn)
    assert len(events) == 1 and isinstance(events[0], ProtocolError)
    assert conn.buffered_bytes == 0


@pytest.mark.parametrize("sent", [0, 1, 4095])
def test_write_payload_cut_short_by_eof(sent: int) -> None:
    # "a WRITE whose length field exceeds the bytes sent and then a disconnect"
    conn = connection()
    conn.receive_data(request(WRITE, 1, 0, 4096) + b"x" * sent)
    assert drain(conn) == []
    conn.receive_data(b"")
    (event,) = drain(conn)
    assert isinstance(event, ConnectionClosed) and not event.clean and f"{sent} of 4096" in event.reason


def test_refused_write_payload_cut_short_by_eof() -> None:
    conn = connection()
    conn.receive_data(request(WRITE, 1, SIZE, 4096) + b"x" * 10)
    assert isinstance(drain(conn)[0], RequestRejected)
    conn.receive_data(b"")
    (event,) = drain(conn)
    assert isinstance(event, ConnectionClosed) and not event.clean


@feeders
@pytest.mark.parametrize("magic", ["25609514", "12560953", "00000000", "67446698"])
def test_bad_request_magic_drops_the_connection(feed, magic: str) -> None:
    conn = connection()
    events = feed(conn, bytes.fromhex(magic) + request(READ, 1, 0, 1)[4:])
    assert len(events) == 1 and isinstance(events[0], ProtocolError) and "magic" in events[0].reason


def test_bad_magic_is_noticed_before_the_header_is_complete() -> None:
    conn = connection()
    conn.receive_data(b"\x00\x00\x00\x00")
    (event,) = drain(conn)
    assert isinstance(event, ProtocolError)


@pytest.mark.parametrize("cut", [1, 4, 27])
def test_half_a_header_waits_then_eof_is_unclean(cut: int) -> None:
    conn = connection()
    conn.receive_data(request(READ, 1, 0, 1)[:cut])
    assert drain(conn) == []
    conn.receive_data(b"")
    (event,) = drain(conn)
    assert isinstance(event, ConnectionClosed) and not event.clean


def test_eof_between_requests_is_clean() -> None:
    conn = connection()
    conn.receive_data(request(FLUSH, 1))
    conn.receive_data(b"")
    events = drain(conn)
    assert events[-1] == ConnectionClosed("client closed the connection", clean=True)


def _export(**kwargs: object) -> ExportInfo:
    base: dict[str, object] = {"name": "ro", "size": SIZE, "flags": TransmissionFlags.HAS_FLAGS}
    base.update(kwargs)
    return ExportInfo(**base)  # type: ignore[arg-type]


def _connection_to(export: ExportInfo) -> ServerConnection:
    conn = ServerConnection(list_exports=lambda: [], lookup_export=lambda name: export)
    conn.data_to_send()
    negotiate(conn, structured=False, export=export.name)
    return conn


@pytest.mark.parametrize("command", [WRITE, TRIM, WRITE_ZEROES])
def test_read_only_export_refuses_writes_with_eperm(command: int) -> None:
    conn = _connection_to(_export(flags=TransmissionFlags.HAS_FLAGS | TransmissionFlags.READ_ONLY))
    wire = request(command, 1, 0, 4) + (b"abcd" if command == WRITE else b"")
    conn.receive_data(wire + request(READ, 2, 0, 4))
    events = drain(conn)
    assert isinstance(events[0], RequestRejected) and events[0].error == EPERM
    assert isinstance(events[1], Request)


@pytest.mark.parametrize(
    ("command", "flags"),
    [(FLUSH, 0), (TRIM, 0), (WRITE_ZEROES, 0), (CACHE, 0), (WRITE, FUA), (WRITE_ZEROES, FAST_ZERO)],
)
def test_commands_and_flags_not_advertised_are_refused(command: int, flags: int) -> None:
    conn = _connection_to(_export(flags=TransmissionFlags.HAS_FLAGS))
    wire = request(command, 1, 0, 4, flags) + (b"abcd" if command == WRITE else b"")
    conn.receive_data(wire)
    events = drain(conn)
    assert isinstance(events[0], RequestRejected) and events[0].error == EINVAL


def test_minimum_block_size_alignment() -> None:
    conn = _connection_to(_export(minimum_block=512))
    conn.receive_data(request(READ, 1, 512, 1024) + request(READ, 2, 100, 512) + request(READ, 3, 512, 100))
    events = drain(conn)
    assert isinstance(events[0], Request)
    assert [getattr(e, "error", None) for e in events[1:]] == [EINVAL, EINVAL]


def test_trim_and_zero_may_exceed_the_maximum_block_but_read_write_cache_may_not() -> None:
    big = 256 * 1024 * 1024
    conn = _connection_to(
        _export(
            size=big,
            flags=TransmissionFlags.HAS_FLAGS
            | TransmissionFlags.SEND_TRIM
            | TransmissionFlags.SEND_WRITE_ZEROES
            | TransmissionFlags.SEND_CACHE,
        )
    )
    conn.receive_data(
        request(TRIM, 1, 0, big - 1)
        + request(WRITE_ZEROES, 2, 0, big - 1)
        + request(READ, 3, 0, MAX_BLOCK + 1)
        + request(CACHE, 4, 0, MAX_BLOCK + 1)
        + request(READ, 5, 0, MAX_BLOCK)
    )
    events = drain(conn)
    assert [type(e) for e in events] == [Request, Request, RequestRejected, RequestRejected, Request]


# --- export description -------------------------------------------------------------------------


def test_transmission_flags_from_capabilities_advertise_exactly_what_is_implemented() -> None:
    assert transmission_flags(Capabilities()) == (
        TransmissionFlags.HAS_FLAGS
        | TransmissionFlags.SEND_FLUSH
        | TransmissionFlags.SEND_FUA
        | TransmissionFlags.SEND_TRIM
        | TransmissionFlags.SEND_WRITE_ZEROES
        | TransmissionFlags.SEND_FAST_ZERO
        | TransmissionFlags.SEND_CACHE
        | TransmissionFlags.CAN_MULTI_CONN
    )
    assert transmission_flags(Capabilities(can_zero=False)) & TransmissionFlags.SEND_FAST_ZERO == 0
    readonly = transmission_flags(Capabilities(can_write=False))
    assert readonly & TransmissionFlags.READ_ONLY
    assert not readonly & (TransmissionFlags.SEND_TRIM | TransmissionFlags.SEND_WRITE_ZEROES)
    assert transmission_flags(Capabilities(can_multi_conn=False, can_cache=False, can_flush=False)) == (
        TransmissionFlags.HAS_FLAGS
        | TransmissionFlags.SEND_FUA
        | TransmissionFlags.SEND_TRIM
        | TransmissionFlags.SEND_WRITE_ZEROES
        | TransmissionFlags.SEND_FAST_ZERO
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"minimum_block": 3},
        {"minimum_block": 131072, "preferred_block": 131072, "maximum_block": 131072},
        {"preferred_block": 256},
        {"preferred_block": 3000},
        {"maximum_block": 1000, "minimum_block": 512},
        {"maximum_block": 2048},
        {"size": -1},
        {"size": 2**64},
        {"name": "a\0b"},
        {"flags": TransmissionFlags.HAS_FLAGS | TransmissionFlags.SEND_FAST_ZERO},
        {"flags": TransmissionFlags.HAS_FLAGS | TransmissionFlags.SEND_DF},
    ],
)
def test_export_info_refuses_what_the_spec_forbids(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        _export(**kwargs)


def test_export_info_always_has_flags() -> None:
    assert _export(flags=TransmissionFlags(0)).flags & TransmissionFlags.HAS_FLAGS
    assert EXPORTS["vol0"].flags == 0x0D6D


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_requests_pipelined_behind_the_last_option_survive_the_buffer_switch(chunk: int) -> None:
    """Negotiation runs in a small receive buffer and transmission in a large one; a client
    that sends its first requests right behind NBD_OPT_GO (in the same recv) must not lose
    or garble them when the core switches buffers.  Also: the small buffer is what an idle
    connection holds."""
    conn = new_connection()
    assert len(conn.get_buffer(-1)) <= 64 * 1024  # before negotiation: the small buffer
    payload = bytes(range(256)) * 64  # 16 KiB
    data = (
        u32(3)
        + option(8)
        + option(7, info_payload("vol0"))
        + request(Command.WRITE, 1, 0, len(payload))
        + payload
        + request(Command.READ, 2, 4096, 512)
        + request(Command.FLUSH, 3)
    )
    events = feed_buffered(conn, data, chunk=chunk)
    assert conn.in_transmission
    requests = [e for e in events if isinstance(e, Request)]
    assert [(r.handle, r.command) for r in requests] == [
        (1, Command.WRITE),
        (2, Command.READ),
        (3, Command.FLUSH),
    ]
    assert requests[0].data is not None and bytes(requests[0].data) == payload
    assert conn.buffered_bytes == 0
    assert len(conn.get_buffer(-1)) >= 128 * 1024  # transmission: room for a deep pipeline
