"""The handshake phase of the sans-IO core against golden byte sequences from the spec.

Every sequence is fed whole, one byte at a time, through get_buffer/buffer_updated in
odd-sized chunks, and followed by trailing data; the events and the bytes sent back must
be the same each way."""

from __future__ import annotations

import pytest

from thinblock.nbd.constants import Option, OptionReply
from thinblock.nbd.protocol import (
    ConnectionClosed,
    ExportChosen,
    OptionRequest,
    ProtocolError,
)

from .wire import (
    FEEDERS,
    SIZE,
    drain,
    info_payload,
    meta_payload,
    new_connection,
    option,
    option_reply,
    u16,
    u32,
    u64,
)

feeders = pytest.mark.parametrize("feed", list(FEEDERS.values()), ids=list(FEEDERS))

ACK = 1
SERVER = 2
INFO = 3
META_CONTEXT = 4
ERR_UNSUP = 0x80000001
ERR_INVALID = 0x80000003
ERR_UNKNOWN = 0x80000006
ERR_TOO_BIG = 0x80000009

# NBD_INFO_EXPORT for vol0: type 0, size 1 MiB, transmission flags 0x0d6d.
INFO_EXPORT_VOL0 = u16(0) + u64(SIZE) + u16(0x0D6D)
# NBD_INFO_BLOCK_SIZE: type 3, minimum 1, preferred 4096, maximum 32 MiB.
INFO_BLOCK_SIZE = u16(3) + u32(1) + u32(4096) + u32(32 * 1024 * 1024)


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    # S: 'NBDMAGIC', 'IHAVEOPT', handshake flags FIXED_NEWSTYLE | NO_ZEROES
    conn = new_connection()
    assert conn.state == "waiting for client flags"
    assert conn.data_to_send() == b""  # the greeting was taken by new_connection


@feeders
@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_known_client_flags_are_accepted(feed, flags: int) -> None:
    conn = new_connection()
    assert feed(conn, u32(flags)) == []
    assert conn.state == "option haggling"
    assert int(conn.client_flags) == flags


@feeders
@pytest.mark.parametrize("flags", [4, 0x80000000, 0xFFFFFFFF, 7])
def test_unknown_client_flags_drop_the_connection(feed, flags: int) -> None:
    # "the server MUST drop the TCP connection if the client sets an unknown flag"
    conn = new_connection()
    events = feed(conn, u32(flags))
    assert len(events) == 1 and isinstance(events[0], ProtocolError)
    assert "unknown client flags" in events[0].reason
    assert conn.data_to_send() == b""


@feeders
def test_export_name_with_zeroes(feed) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(1, b"vol0"))
    assert len(events) == 1 and isinstance(events[0], ExportChosen)
    assert events[0].export.name == "vol0" and not events[0].structured_replies
    # S: 64-bit size, 16-bit transmission flags, 124 bytes of zeroes
    assert conn.data_to_send() == u64(SIZE) + u16(0x0D6D) + bytes(124)
    assert conn.in_transmission


@feeders
def test_export_name_without_zeroes(feed) -> None:
    conn = new_connection()
    events = feed(conn, u32(3) + option(1, b"vol0"))
    assert isinstance(events[0], ExportChosen)
    assert conn.data_to_send() == u64(SIZE) + u16(0x0D6D)


@feeders
def test_empty_export_name_selects_the_default(feed) -> None:
    conn = new_connection(default="small")
    events = feed(conn, u32(3) + option(1))
    assert isinstance(events[0], ExportChosen) and events[0].export.name == "small"
    assert conn.data_to_send() == u64(4096) + u16(1)


@feeders
@pytest.mark.parametrize(
    "name",
    [b"nosuch", b"", b"vol\x000", b"\xff\xfe", b"x" * 4097],
    ids=["unknown", "empty-without-default", "nul", "bad-utf8", "too-long"],
)
def test_export_name_that_cannot_be_served_terminates_the_session(feed, name: bytes) -> None:
    # "If the chosen export does not exist ... the server MUST terminate the session."
    conn = new_connection(default=None)
    events = feed(conn, u32(3) + option(1, name))
    assert len(events) == 1 and isinstance(events[0], ProtocolError)
    assert conn.data_to_send() == b""


@feeders
def test_abort_is_acknowledged_and_ends_the_session(feed) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(2))
    assert events == [ConnectionClosed("client sent NBD_OPT_ABORT", clean=True)]
    assert conn.data_to_send() == option_reply(2, ACK)


@feeders
def test_abort_with_data_is_still_acknowledged(feed) -> None:
    # "a server SHOULD ignore any data sent by the client rather than rejecting the request"
    conn = new_connection()
    events = feed(conn, u32(1) + option(2, b"junk"))
    assert isinstance(events[0], ConnectionClosed)
    assert conn.data_to_send() == option_reply(2, ACK)


@feeders
def test_list_returns_every_export_with_its_description(feed) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(3))
    assert events == [OptionRequest(Option.LIST, OptionReply.ACK, detail="2 exports")]
    assert conn.data_to_send() == (
        option_reply(3, SERVER, u32(4) + b"vol0" + b"first volume")
        + option_reply(3, SERVER, u32(5) + b"small")
        + option_reply(3, ACK)
    )


@feeders
def test_list_with_data_is_invalid_and_negotiation_goes_on(feed) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(3, b"xx") + option(1, b"vol0"))
    assert isinstance(events[0], OptionRequest) and events[0].reply == OptionReply.ERR_INVALID
    assert isinstance(events[1], ExportChosen)
    out = conn.data_to_send()
    assert out.startswith(option_reply(3, ERR_INVALID)[:16])
    assert out.endswith(u64(SIZE) + u16(0x0D6D) + bytes(124))


@feeders
@pytest.mark.parametrize("opt", [6, 7], ids=["INFO", "GO"])
def test_info_and_go_golden(feed, opt: int) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(opt, info_payload("vol0", (1, 2, 3))))
    expected = (
        option_reply(opt, INFO, INFO_EXPORT_VOL0)
        + option_reply(opt, INFO, u16(1) + b"vol0")
        + option_reply(opt, INFO, u16(2) + b"first volume")
        + option_reply(opt, INFO, INFO_BLOCK_SIZE)
        + option_reply(opt, ACK)
    )
    assert conn.data_to_send() == expected
    if opt == 6:
        assert events == [OptionRequest(Option.INFO, OptionReply.ACK, "vol0")]
        assert not conn.in_transmission
    else:
        assert len(events) == 1 and isinstance(events[0], ExportChosen)
        assert conn.in_transmission


@feeders
def test_go_without_information_requests_still_sends_export_and_block_size(feed) -> None:
    # "the server MUST send at least one NBD_REP_INFO, with an NBD_INFO_EXPORT information type"
    conn = new_connection()
    feed(conn, u32(1) + option(7, info_payload("vol0")))
    assert conn.data_to_send() == (
        option_reply(7, INFO, INFO_EXPORT_VOL0)
        + option_reply(7, INFO, INFO_BLOCK_SIZE)
        + option_reply(7, ACK)
    )


@feeders
def test_go_with_empty_name_selects_the_default(feed) -> None:
    conn = new_connection(default="vol0")
    events = feed(conn, u32(1) + option(7, info_payload("", (1,))))
    assert isinstance(events[0], ExportChosen) and events[0].export.name == "vol0"
    # NBD_INFO_NAME tells the client the canonical name.
    assert option_reply(7, INFO, u16(1) + b"vol0") in conn.data_to_send()


@feeders
@pytest.mark.parametrize("name", ["nosuch", ""], ids=["unknown", "no-default"])
def test_go_for_unknown_export_errors_and_negotiation_goes_on(feed, name: str) -> None:
    conn = new_connection(default=None)
    events = feed(conn, u32(1) + option(7, info_payload(name)) + option(7, info_payload("small")))
    assert isinstance(events[0], OptionRequest) and events[0].reply == OptionReply.ERR_UNKNOWN
    assert isinstance(events[1], ExportChosen) and events[1].export.name == "small"
    out = conn.data_to_send()
    # the error reply comes first, with no NBD_REP_INFO before it
    assert out[:16] == option_reply(7, ERR_UNKNOWN)[:16]


@feeders
@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x00\x00\x00",
        u32(10) + b"vol0" + u16(0),  # name length runs past the option
        u32(0xFFFFFFFF) + b"vol0" + u16(0),  # name length 0xFFFFFFFF
        u32(4) + b"vol0" + u16(2) + u16(1),  # fewer information requests than announced
        u32(4) + b"vol0" + u16(0) + b"x",  # stray byte
        info_payload(b"vol\x000"),  # NUL in the name
        info_payload(b"\xc3\x28"),  # not UTF-8
        info_payload(b"v" * 4097),  # over 4096 bytes
    ],
    ids=["empty", "short", "name-past-end", "name-0xffffffff", "count", "stray", "nul", "utf8", "4097"],
)
def test_malformed_go_is_invalid_and_negotiation_goes_on(feed, payload: bytes) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(7, payload) + option(7, info_payload("vol0")))
    assert isinstance(events[0], OptionRequest) and events[0].reply == OptionReply.ERR_INVALID
    assert isinstance(events[1], ExportChosen)
    assert conn.data_to_send()[:20] == option_reply(7, ERR_INVALID)[:16] + conn_error_length_prefix(events[0])


def conn_error_length_prefix(event: OptionRequest) -> bytes:
    # The error reply carries the reason as its message.
    return u32(len(event.detail.encode()))


@feeders
def test_structured_reply_is_acknowledged(feed) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(8))
    assert events == [OptionRequest(Option.STRUCTURED_REPLY, OptionReply.ACK)]
    assert conn.data_to_send() == option_reply(8, ACK)
    assert conn.structured_replies


@feeders
def test_structured_reply_with_data_is_invalid(feed) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(8, b"x"))
    assert isinstance(events[0], OptionRequest) and events[0].reply == OptionReply.ERR_INVALID
    assert not conn.structured_replies


@feeders
@pytest.mark.parametrize("queries", [(), ("base:",), ("base:allocation",), ("qemu:x", "base:allocation")])
def test_list_meta_context_offers_base_allocation(feed, queries: tuple[str, ...]) -> None:
    conn = new_connection()
    feed(conn, u32(1) + option(8) + option(9, meta_payload("vol0", queries)))
    assert conn.data_to_send() == (
        option_reply(8, ACK)
        # "The metadata context ID in these replies is reserved and SHOULD be set to zero"
        + option_reply(9, META_CONTEXT, u32(0) + b"base:allocation")
        + option_reply(9, ACK)
    )


@feeders
def test_list_meta_context_with_only_unknown_queries_is_just_acked(feed) -> None:
    conn = new_connection()
    feed(conn, u32(1) + option(8) + option(9, meta_payload("vol0", ("qemu:dirty-bitmap:b", "base:other"))))
    assert conn.data_to_send() == option_reply(8, ACK) + option_reply(9, ACK)


@feeders
def test_set_meta_context_selects_base_allocation_for_go(feed) -> None:
    conn = new_connection()
    events = feed(
        conn,
        u32(1)
        + option(8)
        + option(10, meta_payload("vol0", ("base:allocation",)))
        + option(7, info_payload("vol0")),
    )
    out = conn.data_to_send()
    assert out.startswith(
        option_reply(8, ACK)
        + option_reply(10, META_CONTEXT, u32(1) + b"base:allocation")
        + option_reply(10, ACK)
    )
    chosen = events[-1]
    assert isinstance(chosen, ExportChosen) and chosen.structured_replies and chosen.base_allocation


@feeders
@pytest.mark.parametrize(
    "setup",
    [
        option(10, meta_payload("small", ("base:allocation",))),  # selected for another export
        option(10, meta_payload("vol0", ("base:allocation",)))
        + option(10, meta_payload("vol0", ())),  # cleared
        option(10, meta_payload("vol0", ("base:",))),  # "base:" is ignored by SET
    ],
    ids=["other-export", "cleared", "wildcard"],
)
def test_block_status_context_only_for_the_export_it_was_set_for(feed, setup: bytes) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(8) + setup + option(7, info_payload("vol0")))
    chosen = events[-1]
    assert isinstance(chosen, ExportChosen) and not chosen.base_allocation


@feeders
@pytest.mark.parametrize("opt", [9, 10], ids=["LIST", "SET"])
def test_meta_context_needs_structured_replies(feed, opt: int) -> None:
    # "This option MUST NOT be requested unless structured replies have been negotiated first."
    conn = new_connection()
    events = feed(conn, u32(1) + option(opt, meta_payload("vol0", ("base:allocation",))))
    assert isinstance(events[0], OptionRequest) and events[0].reply == OptionReply.ERR_INVALID


@feeders
@pytest.mark.parametrize(
    "payload",
    [
        u32(0),  # no query count
        u32(4) + b"vol0" + u32(1),  # one query announced, none sent
        u32(4) + b"vol0" + u32(0xFFFFFFFF),  # absurd query count
        u32(4) + b"vol0" + u32(1) + u32(100) + b"base:allocation",  # query runs past the option
        u32(99) + b"vol0" + u32(0),  # name runs past
    ],
    ids=["short", "missing-query", "huge-count", "query-past-end", "name-past-end"],
)
def test_malformed_meta_context_is_invalid(feed, payload: bytes) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(8) + option(10, payload) + option(1, b"vol0"))
    assert isinstance(events[1], OptionRequest) and events[1].reply == OptionReply.ERR_INVALID
    assert isinstance(events[2], ExportChosen) and not events[2].base_allocation


@feeders
def test_meta_context_for_unknown_export(feed) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(8) + option(10, meta_payload("nosuch", ("base:allocation",))))
    assert isinstance(events[1], OptionRequest) and events[1].reply == OptionReply.ERR_UNKNOWN


@feeders
@pytest.mark.parametrize(
    "opt", [4, 5, 11, 12, 0x7FFFFFFF, 0], ids=["PEEK", "STARTTLS", "EXTENDED", "12", "big", "0"]
)
def test_unknown_or_unsupported_options_get_err_unsup(feed, opt: int) -> None:
    # "Servers that receive messages which they do not implement MUST reply to them with
    # NBD_REP_ERR_UNSUP, and MUST NOT fail to parse the next message received."
    conn = new_connection()
    events = feed(conn, u32(1) + option(opt, b"some data") + option(1, b"vol0"))
    assert isinstance(events[0], OptionRequest) and events[0].reply == OptionReply.ERR_UNSUP
    assert isinstance(events[1], ExportChosen)
    out = conn.data_to_send()
    assert out[:16] == option_reply(opt, ERR_UNSUP)[:16]


@feeders
@pytest.mark.parametrize("length", [64 * 1024 + 1, 1 << 30, 0xFFFFFFFF])
def test_option_larger_than_accepted_is_refused_without_waiting_for_it(feed, length: int) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(6, length=length))
    assert len(events) == 1 and isinstance(events[0], ProtocolError)
    assert conn.data_to_send()[:16] == option_reply(6, ERR_TOO_BIG)[:16]
    assert conn.buffered_bytes == 0


def test_option_at_the_limit_is_read() -> None:
    conn = new_connection(max_option_length=100)
    conn.receive_data(u32(1) + option(0x1234, b"x" * 100))
    events = drain(conn)
    assert isinstance(events[0], OptionRequest) and events[0].reply == OptionReply.ERR_UNSUP


@feeders
def test_bad_option_magic_drops_the_connection(feed) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + b"IHAVEOPX" + u32(1) + u32(0))
    assert len(events) == 1 and isinstance(events[0], ProtocolError)


def test_too_many_options_drop_the_connection() -> None:
    conn = new_connection(max_options=5)
    conn.receive_data(u32(1) + option(8) * 6)
    events = drain(conn)
    assert [type(e) for e in events] == [OptionRequest] * 5 + [ProtocolError]


@pytest.mark.parametrize("cut", [1, 2, 3, 4 + 8, 4 + 16, 4 + 16 + 3])
def test_eof_in_the_middle_of_negotiation(cut: int) -> None:
    data = u32(1) + option(7, info_payload("vol0"))
    conn = new_connection()
    conn.receive_data(data[:cut])
    conn.receive_data(b"")
    events = drain(conn)
    assert len(events) == 1 and isinstance(events[0], ConnectionClosed) and not events[0].clean


def test_eof_between_options_is_a_clean_close() -> None:
    conn = new_connection()
    conn.receive_data(u32(1) + option(8))
    conn.receive_data(b"")
    events = drain(conn)
    assert isinstance(events[-1], ConnectionClosed) and events[-1].clean


@feeders
def test_option_after_go_is_a_protocol_error(feed) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(7, info_payload("vol0")) + option(3))
    assert isinstance(events[0], ExportChosen)
    assert isinstance(events[1], ProtocolError) and "option after negotiation" in events[1].reason


def test_lookup_failure_is_err_unknown_not_a_crash() -> None:
    from thinblock.nbd.protocol import ServerConnection

    def broken(name: str) -> None:
        raise RuntimeError("engine exploded")

    conn = ServerConnection(list_exports=lambda: [], lookup_export=broken)  # type: ignore[arg-type]
    conn.data_to_send()
    conn.receive_data(u32(1) + option(7, info_payload("vol0")))
    events = drain(conn)
    assert isinstance(events[0], OptionRequest) and events[0].reply == OptionReply.ERR_UNKNOWN


def test_list_failure_is_an_error_reply_not_a_crash() -> None:
    from thinblock.nbd.protocol import ServerConnection

    def broken() -> list[tuple[str, str]]:
        raise RuntimeError("engine exploded")

    conn = ServerConnection(list_exports=broken, lookup_export=lambda n: None)
    conn.data_to_send()
    conn.receive_data(u32(1) + option(3))
    events = drain(conn)
    assert isinstance(events[0], OptionRequest) and events[0].reply == OptionReply.ERR_POLICY
