"""Client-side NBD messages spelled out from the protocol specification (doc/proto.md), for
every suite that talks raw NBD: the sans-IO core's tests (tests/protocol), the in-process
server tests (tests/e2e) and the hostile-client drill (tests/drills).  Built by hand on
purpose -- not with thinblock's own encoders -- and able to lie (``length``,
``name_length``, ``magic``) where a test needs a malformed message."""

from __future__ import annotations

import struct

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513

_OPTION_HEADER = struct.Struct(">QII")
_REQUEST_HEADER = struct.Struct(">IHHQQI")


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def option(opt: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """C: IHAVEOPT, 32-bit option, 32-bit length (``length`` may lie), data."""
    return _OPTION_HEADER.pack(IHAVEOPT, opt, len(payload) if length is None else length) + payload


def info_payload(name: bytes | str, infos: tuple[int, ...] = (), name_length: int | None = None) -> bytes:
    """Data of NBD_OPT_INFO / NBD_OPT_GO: 32-bit name length (may lie), name, 16-bit count, requests."""
    raw = name.encode() if isinstance(name, str) else name
    length = len(raw) if name_length is None else name_length
    return u32(length) + raw + u16(len(infos)) + b"".join(u16(i) for i in infos)


def meta_payload(name: bytes | str, queries: tuple[str, ...], name_length: int | None = None) -> bytes:
    """Data of NBD_OPT_{LIST,SET}_META_CONTEXT: name length (may lie), name, query count, queries."""
    raw = name.encode() if isinstance(name, str) else name
    length = len(raw) if name_length is None else name_length
    body = b"".join(u32(len(q.encode())) + q.encode() for q in queries)
    return u32(length) + raw + u32(len(queries)) + body


def request(
    command: int,
    handle: int = 1,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
    magic: int = REQUEST_MAGIC,
) -> bytes:
    """C: magic, 16-bit flags, 16-bit type, 64-bit handle, 64-bit offset, 32-bit length."""
    return _REQUEST_HEADER.pack(magic, flags, command, handle, offset, length)
