"""Helpers for driving the sans-IO NBD core in tests: a test export, the ways of feeding
bytes (whole, one byte at a time, through get_buffer/buffer_updated, with trailing data),
and client-side byte builders written from the specification's layouts."""

from __future__ import annotations

from collections.abc import Callable

from tests.support.wire import info_payload, meta_payload, option, request, u16, u32, u64
from thinblock.nbd.protocol import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    ExportInfo,
    ProtocolError,
    ServerConnection,
)

MiB = 1024 * 1024
SIZE = 1 * MiB
# HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN | SEND_CACHE | SEND_FAST_ZERO
ALL_FLAGS = 0x0D6D

EXPORTS = {
    "vol0": ExportInfo("vol0", SIZE, ALL_FLAGS, "first volume"),  # type: ignore[arg-type]
    "small": ExportInfo("small", 4096, 0x0001, ""),  # type: ignore[arg-type]
}

GREETING = bytes.fromhex("4e42444d4147494349484156454f50540003")
REPLY_MAGIC = bytes.fromhex("0003e889045565a9")


def new_connection(default: str | None = "vol0", **kwargs: object) -> ServerConnection:
    conn = ServerConnection(
        list_exports=lambda: [(e.name, e.description) for e in EXPORTS.values()],
        lookup_export=EXPORTS.get,
        default_export=default,
        **kwargs,  # type: ignore[arg-type]
    )
    assert conn.data_to_send() == GREETING
    return conn


# --- client-side messages: tests/support/wire.py (re-exported here for the protocol tests) ---------
__all__ = ["info_payload", "meta_payload", "option", "request", "u16", "u32", "u64"]


def option_reply(opt: int, reply: int, payload: bytes = b"") -> bytes:
    """S: 0x3e889045565a9, option, reply type, length, data."""
    return REPLY_MAGIC + u32(opt) + u32(reply) + u32(len(payload)) + payload


# --- feeding ---------------------------------------------------------------------------------------
def drain(conn: ServerConnection) -> list[Event]:
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, (ConnectionClosed, ProtocolError)):
            return events


def _feed_whole(conn: ServerConnection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    return drain(conn)


def _feed_bytewise(conn: ServerConnection, data: bytes) -> list[Event]:
    events: list[Event] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        events += drain(conn)
        if events and isinstance(events[-1], (ConnectionClosed, ProtocolError)):
            break
    return events


def feed_buffered(conn: ServerConnection, data: bytes, chunk: int = 7) -> list[Event]:
    """Through get_buffer/buffer_updated, as asyncio.BufferedProtocol does (small, odd chunks)."""
    events: list[Event] = []
    pos = 0
    while pos < len(data):
        buf = conn.get_buffer(-1)
        n = min(len(buf), chunk, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        del buf
        conn.buffer_updated(n)
        pos += n
        events += drain(conn)
        if events and isinstance(events[-1], (ConnectionClosed, ProtocolError)):
            break
    return events


def _feed_trailing(conn: ServerConnection, data: bytes) -> list[Event]:
    # The sequence followed by the first bytes of a further message: same events, the extra
    # bytes stay buffered.
    conn.receive_data(data + b"\x25\x60")
    return drain(conn)


FEEDERS: dict[str, Callable[[ServerConnection, bytes], list[Event]]] = {
    "whole": _feed_whole,
    "bytewise": _feed_bytewise,
    "buffered": feed_buffered,
    "trailing": _feed_trailing,
}


def negotiate(
    conn: ServerConnection,
    *,
    structured: bool = True,
    meta: bool = True,
    export: str = "vol0",
    no_zeroes: bool = True,
) -> None:
    """Take a connection to transmission with NBD_OPT_GO; discard the option replies."""
    data = u32(3 if no_zeroes else 1)
    if structured:
        data += option(8)
        if meta:
            data += option(10, meta_payload(export, ("base:allocation",)))
    data += option(7, info_payload(export))
    conn.receive_data(data)
    events = drain(conn)
    assert conn.in_transmission, events
    conn.data_to_send()
