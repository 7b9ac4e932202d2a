"""Fuzzing the sans-IO core: random and mutated byte streams, split at random points and fed
through both input APIs.  The core never raises, emits only its documented events, always
ends in a terminal event at end of stream, and never holds more than one message's worth
of unparsed bytes."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thinblock.nbd.constants import Command
from thinblock.nbd.protocol import (
    NEED_DATA,
    OPTION_HEADER_SIZE,
    ConnectionClosed,
    ExportChosen,
    ExportInfo,
    OptionRequest,
    ProtocolError,
    ReplyError,
    Request,
    RequestRejected,
    ServerConnection,
)

from .wire import info_payload, meta_payload, option, request, u32

MAX_OPTION = 1024
MAX_BLOCK = 65536
EXPORT = ExportInfo("vol0", 1 << 20, 0x0D6D, "fuzzed", maximum_block=MAX_BLOCK)  # type: ignore[arg-type]
DOCUMENTED = (OptionRequest, ExportChosen, Request, RequestRejected, ConnectionClosed, ProtocolError)
# After draining, unparsed bytes are less than one message: an option header with the largest
# option we accept, plus a write payload being received.
BOUND = OPTION_HEADER_SIZE + MAX_OPTION + MAX_BLOCK

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def new() -> ServerConnection:
    return ServerConnection(
        list_exports=lambda: [("vol0", "fuzzed"), ("other", "")],
        lookup_export=lambda name: EXPORT if name == "vol0" else None,
        default_export="vol0",
        max_option_length=MAX_OPTION,
        max_discard=4 * MAX_BLOCK,
    )


def answer(conn: ServerConnection, event: Request) -> None:
    """Exercise the reply builders the way a server would."""
    try:
        if event.command is Command.READ:
            out = conn.reply_read(event, bytes(event.length))
            assert sum(len(b) for b in out) >= 16
        elif event.command is Command.BLOCK_STATUS:
            conn.reply_block_status(event, [(event.length, 3)])
        else:
            conn.reply_ok(event)
        conn.reply_error(event, 5, "fuzz")
    except ReplyError:
        raise AssertionError("a reply to a valid request was refused") from None


def run(data: bytes, cuts: list[int], buffer_api: bool) -> list[object]:
    conn = new()
    conn.data_to_send()
    events: list[object] = []
    points = sorted({min(c, len(data)) for c in cuts} | {len(data)})
    start = 0
    terminal = False
    for point in points:
        piece = data[start:point]
        start = point
        if buffer_api:
            while piece:
                buf = conn.get_buffer(-1)
                assert len(buf) > 0
                n = min(len(buf), len(piece))
                buf[:n] = piece[:n]
                del buf
                conn.buffer_updated(n)
                piece = piece[n:]
        elif piece:
            conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                break
            assert isinstance(event, DOCUMENTED), event
            events.append(event)
            if isinstance(event, Request):
                assert event.offset >= 0 and event.offset + event.length <= EXPORT.size
                if event.command is Command.WRITE:
                    assert event.data is not None and len(event.data) == event.length
                answer(conn, event)
            if isinstance(event, (ConnectionClosed, ProtocolError)):
                terminal = True
                break
        assert conn.buffered_bytes <= BOUND, conn.buffered_bytes
        conn.data_to_send()
        if terminal:
            break
    conn.receive_data(b"")
    final = conn.next_event()
    assert isinstance(final, (ConnectionClosed, ProtocolError)), final
    assert conn.next_event() is final  # terminal events repeat
    return events


# --- streams -----------------------------------------------------------------------------------

NEGOTIATED = (
    u32(1)
    + option(8)
    + option(10, meta_payload("vol0", ("base:allocation",)))
    + option(7, info_payload("vol0", (0, 1, 2, 3)))
)


def valid_options() -> st.SearchStrategy[bytes]:
    names = st.sampled_from(["vol0", "", "other", "nosuch"])
    return st.one_of(
        st.just(option(3)),
        st.just(option(8)),
        names.map(lambda n: option(6, info_payload(n, (1, 2, 3)))),
        names.map(lambda n: option(9, meta_payload(n, ("base:",)))),
        names.map(lambda n: option(10, meta_payload(n, ("base:allocation",)))),
        st.binary(max_size=40).map(lambda b: option(0x1234, b)),
    )


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    command = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xFFFF]))
    flags = draw(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 0x8000, 0xFFFF]))
    offset = draw(st.sampled_from([0, 512, EXPORT.size - 1, EXPORT.size, 2**63, 2**64 - 1]))
    length = draw(st.sampled_from([0, 1, 4096, MAX_BLOCK, MAX_BLOCK + 1, 0xFFFFFFFF]))
    handle = draw(st.integers(0, 2**64 - 1))
    header = request(command, handle, offset, length, flags)
    if command == 1 and length <= 2 * MAX_BLOCK:
        # the payload, sometimes cut short
        header += bytes(draw(st.integers(0, length)))
    return header


@st.composite
def sessions(draw: st.DrawFn) -> bytes:
    options = b"".join(draw(st.lists(valid_options(), max_size=4)))
    body = b"".join(draw(st.lists(requests(), max_size=8)))
    return NEGOTIATED[:4] + options + NEGOTIATED[4:] + body


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(sessions()))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "delete", "insert", "overwrite32", "truncate"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "overwrite32":
            data[at : at + 4] = struct.pack(">I", draw(st.sampled_from([0, 1, 0xFFFFFFFF, 0x80000000, 4097])))
        else:
            del data[at:]
    return bytes(data)


cut_points = st.lists(st.integers(0, 2000), max_size=12)


@FUZZ
@given(st.binary(max_size=300), cut_points, st.booleans())
def test_random_bytes_from_the_start(data: bytes, cuts: list[int], buffer_api: bool) -> None:
    run(data, cuts, buffer_api)


@FUZZ
@given(st.binary(max_size=300), cut_points, st.booleans())
def test_random_bytes_after_negotiation(data: bytes, cuts: list[int], buffer_api: bool) -> None:
    events = run(NEGOTIATED + data, cuts, buffer_api)
    assert any(isinstance(e, ExportChosen) for e in events)


@FUZZ
@given(sessions(), cut_points, st.booleans())
def test_generated_sessions(data: bytes, cuts: list[int], buffer_api: bool) -> None:
    events = run(data, cuts, buffer_api)
    assert any(isinstance(e, ExportChosen) for e in events)


@FUZZ
@given(mutated(), cut_points, st.booleans())
def test_mutated_sessions(data: bytes, cuts: list[int], buffer_api: bool) -> None:
    run(data, cuts, buffer_api)


@FUZZ
@given(sessions(), st.booleans())
def test_split_points_do_not_change_the_events(data: bytes, buffer_api: bool) -> None:
    whole = run(data, [], buffer_api=False)
    bytewise = run(data, list(range(len(data))), buffer_api)
    assert [type(e) for e in whole] == [type(e) for e in bytewise]
    assert [getattr(e, "handle", None) for e in whole] == [getattr(e, "handle", None) for e in bytewise]
