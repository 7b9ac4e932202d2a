"""NBD_OPT_STARTTLS in the sans-IO core: the spec's NOTLS, FORCEDTLS (``required``) and
SELECTIVETLS (``allowed``) rules, golden bytes fed every way, and a hypothesis-generated option
sequence checked against a model of the rules (options before and after TLS, TLS required,
STARTTLS twice, data with STARTTLS, plaintext during the handshake)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thinblock.nbd.constants import Option
from thinblock.nbd.protocol import (
    ConnectionClosed,
    ExportChosen,
    OptionRequest,
    ProtocolError,
    StartTLS,
    TLSMode,
)

from .wire import FEEDERS, drain, info_payload, new_connection, option, option_reply, u32

feeders = pytest.mark.parametrize("feed", list(FEEDERS.values()), ids=list(FEEDERS))
# Sequences that go on after their last message (STARTTLS must be the last thing the client
# sends before its reply, and later messages must follow the earlier ones exactly): no trailing
# bytes; trailing data after STARTTLS is its own test below.
CONTINUING = {k: v for k, v in FEEDERS.items() if k != "trailing"}
continuing = pytest.mark.parametrize("feed", list(CONTINUING.values()), ids=list(CONTINUING))

ACK = 1
ERR_UNSUP = 0x80000001
ERR_INVALID = 0x80000003
ERR_TLS_REQD = 0x80000005
STARTTLS = 5
FLAGS = u32(3)


def _replies(data: bytes) -> list[tuple[int, int]]:
    """(option, reply type) of every option reply in ``data``."""
    out = []
    pos = 0
    while pos < len(data):
        assert data[pos : pos + 8] == bytes.fromhex("0003e889045565a9"), data[pos:]
        opt = int.from_bytes(data[pos + 8 : pos + 12], "big")
        reply = int.from_bytes(data[pos + 12 : pos + 16], "big")
        length = int.from_bytes(data[pos + 16 : pos + 20], "big")
        out.append((opt, reply))
        pos += 20 + length
    return out


@feeders
def test_off_mode_answers_starttls_unsupported(feed) -> None:
    conn = new_connection()
    events = feed(conn, FLAGS + option(STARTTLS))
    assert [type(e) for e in events] == [OptionRequest]
    assert _replies(conn.data_to_send()) == [(STARTTLS, ERR_UNSUP)]
    assert not conn.tls_active


@continuing
def test_required_mode_refuses_every_option_but_starttls_and_abort(feed) -> None:
    conn = new_connection(tls=TLSMode.REQUIRED)
    data = (
        FLAGS
        + option(Option.LIST)
        + option(Option.STRUCTURED_REPLY)
        + option(Option.GO, info_payload("vol0"))
    )
    data += option(Option.INFO, info_payload("vol0")) + option(42)
    events = feed(conn, data)
    assert all(isinstance(e, OptionRequest) and e.reply == ERR_TLS_REQD for e in events), events
    assert _replies(conn.data_to_send()) == [
        (Option.LIST, ERR_TLS_REQD),
        (Option.STRUCTURED_REPLY, ERR_TLS_REQD),
        (Option.GO, ERR_TLS_REQD),
        (Option.INFO, ERR_TLS_REQD),
        (42, ERR_TLS_REQD),
    ]
    assert not conn.in_transmission and not conn.structured_replies
    # ABORT is still answered and ends the session.
    conn.receive_data(option(Option.ABORT))
    assert isinstance(drain(conn)[-1], ConnectionClosed)
    assert _replies(conn.data_to_send()) == [(Option.ABORT, ACK)]


def test_required_mode_export_name_without_tls_ends_the_session() -> None:
    # "as this request cannot error, it MUST terminate the session"
    conn = new_connection(tls=TLSMode.REQUIRED)
    conn.receive_data(FLAGS + option(Option.EXPORT_NAME, b"vol0"))
    events = drain(conn)
    assert isinstance(events[-1], ProtocolError) and "TLS" in events[-1].reason
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("mode", [TLSMode.ALLOWED, TLSMode.REQUIRED])
@continuing
def test_starttls_then_negotiation_starts_afresh(feed, mode: TLSMode) -> None:
    conn = new_connection(tls=mode)
    before = option(Option.STRUCTURED_REPLY) if mode is TLSMode.ALLOWED else b""
    events = feed(conn, FLAGS + before + option(STARTTLS))
    assert isinstance(events[-1], StartTLS)
    sent = conn.data_to_send()
    assert sent.endswith(option_reply(STARTTLS, ACK))
    assert conn.state == "TLS handshake" and not conn.tls_active
    conn.tls_started()
    assert conn.tls_active and conn.state == "option haggling"
    # "the server MUST NOT preserve any negotiation state (such as a request for
    # NBD_OPT_STRUCTURED_REPLY ...) issued before this command"
    assert not conn.structured_replies
    events = feed(conn, option(STARTTLS) + option(Option.GO, info_payload("vol0")))
    assert [e.reply for e in events if isinstance(e, OptionRequest)] == [ERR_INVALID]  # STARTTLS twice
    assert isinstance(events[-1], ExportChosen) and not events[-1].structured_replies
    assert conn.in_transmission


def test_starttls_with_data_is_invalid() -> None:
    conn = new_connection(tls=TLSMode.REQUIRED)
    conn.receive_data(FLAGS + option(STARTTLS, b"x"))
    assert [e.reply for e in drain(conn)] == [ERR_INVALID]  # type: ignore[union-attr]
    assert not conn.tls_active and conn.state == "option haggling"


def test_data_after_starttls_before_its_reply_ends_the_connection() -> None:
    conn = new_connection(tls=TLSMode.REQUIRED)
    conn.receive_data(FLAGS + option(STARTTLS) + b"\x16\x03\x01garbage")
    events = drain(conn)
    assert isinstance(events[-1], ProtocolError) and "after NBD_OPT_STARTTLS" in events[-1].reason


def test_plaintext_during_the_handshake_is_never_taken_as_options() -> None:
    conn = new_connection(tls=TLSMode.REQUIRED)
    conn.receive_data(FLAGS + option(STARTTLS))
    assert isinstance(drain(conn)[-1], StartTLS)
    conn.data_to_send()
    # An attacker's plaintext NBD_OPT_GO slipped in before the TLS layer took over.
    conn.receive_data(option(Option.GO, info_payload("vol0")))
    events = drain(conn)
    assert isinstance(events[-1], ProtocolError) and "plaintext" in events[-1].reason
    assert not conn.in_transmission and conn.data_to_send() == b""


# --- a model of the rules, against generated option sequences -------------------------------------

OPTIONS = st.sampled_from(
    [
        "starttls",
        "starttls-data",
        "list",
        "structured",
        "info",
        "go",
        "export-name",
        "unknown",
        "abort",
        "tls-done",
    ]
)


def _message(kind: str) -> bytes:
    return {
        "starttls": option(STARTTLS),
        "starttls-data": option(STARTTLS, b"\x00"),
        "list": option(Option.LIST),
        "structured": option(Option.STRUCTURED_REPLY),
        "info": option(Option.INFO, info_payload("vol0")),
        "go": option(Option.GO, info_payload("vol0")),
        "export-name": option(Option.EXPORT_NAME, b"vol0"),
        "unknown": option(77),
        "abort": option(Option.ABORT),
    }[kind]


@settings(max_examples=300, deadline=None)
@given(mode=st.sampled_from(list(TLSMode)), steps=st.lists(OPTIONS, max_size=12))
def test_generated_negotiations_follow_the_spec(mode: TLSMode, steps: list[str]) -> None:
    conn = new_connection(tls=mode)
    conn.receive_data(FLAGS)
    assert drain(conn) == []
    tls = False
    handshake = False
    for kind in steps:
        if kind == "tls-done":
            if handshake:
                conn.tls_started()
                tls, handshake = True, False
                assert conn.tls_active
            continue
        if handshake:
            # The client sends before the handshake is done: plaintext is refused.
            conn.receive_data(_message(kind))
            events = drain(conn)
            assert isinstance(events[-1], ProtocolError)
            return
        conn.receive_data(_message(kind))
        events = drain(conn)
        sent = conn.data_to_send()
        if kind == "export-name" and events and isinstance(events[-1], ExportChosen):
            assert mode is not TLSMode.REQUIRED or tls
            assert conn.in_transmission and conn.tls_active == tls
            return  # its reply is the export's size and flags, not an option reply
        replies = _replies(sent)
        # "The server MUST NOT send NBD_REP_ERR_TLS_REQD in reply to any option if TLS has
        # already been initiated", and in NOTLS mode never.
        if tls or mode is not TLSMode.REQUIRED:
            assert all(reply != ERR_TLS_REQD for _, reply in replies)
        if kind == "abort":
            assert isinstance(events[-1], ConnectionClosed) and replies == [(Option.ABORT, ACK)]
            return
        if kind in ("starttls", "starttls-data"):
            if mode is TLSMode.OFF:
                assert replies == [(STARTTLS, ERR_UNSUP)]
            elif tls or kind == "starttls-data":
                assert replies == [(STARTTLS, ERR_INVALID)]  # twice, or with data
            else:
                assert replies == [(STARTTLS, ACK)] and isinstance(events[-1], StartTLS)
                handshake = True
            continue
        if mode is TLSMode.REQUIRED and not tls:
            if kind == "export-name":
                assert isinstance(events[-1], ProtocolError) and replies == []
            else:
                assert replies == [(int.from_bytes(_message(kind)[8:12], "big"), ERR_TLS_REQD)]
                assert not conn.in_transmission
            if kind == "export-name":
                return
            continue
        if kind in ("go", "export-name"):
            assert isinstance(events[-1], ExportChosen) and conn.in_transmission
            assert conn.tls_active == tls
            return
        assert all(reply != ERR_TLS_REQD for _, reply in replies)
