"""Helpers for drills 4 (hostile NBD clients) and 7 (load).

The daemon itself is started by tests/support/daemon.py (with the figures a leak check needs:
RSS and open file descriptors from /proc).  Here:

* ``RawClient`` and ``Witness``: an NBD client over a raw socket that can send anything at all,
  written from the specification's layouts (doc/proto.md of NetworkBlockDevice/nbd), not from
  the server's code; and a well-behaved client that proves, after every hostile act, that the
  server still serves other connections and that their data is intact.
* The fuzz support for the sans-IO core: valid sessions as hypothesis strategies, mutations of
  them, a driver that feeds the bytes in any chunking through either input API, and a parser of
  everything the core sends back, so that the drill can check its invariants.

Loopback only.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from tests.support.wire import info_payload, meta_payload, option, request, u32, u64
from thinblock.nbd.constants import TransmissionFlags
from thinblock.nbd.protocol import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    ExportChosen,
    ExportInfo,
    OptionRequest,
    ProtocolError,
    Request,
    RequestRejected,
    ServerConnection,
)

HOST = "127.0.0.1"
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF

# --- the wire, from the specification ------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERR_BIT + 1
REP_ERR_POLICY = REP_ERR_BIT + 2
REP_ERR_INVALID = REP_ERR_BIT + 3
REP_ERR_UNKNOWN = REP_ERR_BIT + 6
REP_ERR_TOO_BIG = REP_ERR_BIT + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108
# "the allowed values for the error field have been restricted to set of possibilities"
WIRE_ERRORS = frozenset({EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN})

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"

REQUEST_HEADER = struct.Struct(">IHHQQI")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK_HEADER = struct.Struct(">IHHQI")


# --- a raw client ----------------------------------------------------------------------------------


class PeerClosed(Exception):
    """The server closed (or reset) the connection; ``partial`` is what arrived before."""

    def __init__(self, partial: bytes = b"") -> None:
        super().__init__(f"the server closed the connection ({len(partial)} bytes of a message arrived)")
        self.partial = partial


@dataclass
class OptReply:
    option: int
    type: int
    payload: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & REP_ERR_BIT)


@dataclass
class Reply:
    """One whole reply (a simple reply, or every chunk of a structured one up to DONE)."""

    handle: int
    error: int = 0
    data: bytes | None = None  # READ: the bytes read, holes filled with zeros
    message: str = ""
    extents: list[tuple[int, int]] = field(default_factory=list)  # BLOCK_STATUS descriptors
    structured: bool = False
    chunk_types: list[int] = field(default_factory=list)


@dataclass
class _Pending:
    command: int
    offset: int
    length: int
    buffer: bytearray | None = None
    reply: Reply | None = None


class RawClient:
    """An NBD client over a blocking socket that sends whatever it is told to.

    ``negotiate()`` is the well-behaved path (NBD_OPT_GO); everything else is a building block
    for hostile sessions.  Replies are matched to requests by handle; structured chunks of
    different requests may interleave."""

    def __init__(self, port: int, timeout: float = 20.0, source: str | None = None) -> None:
        self.port = port
        # ``source``: another loopback address (127.0.0.2, ...) for a client the server must tell
        # apart from the witness (per-address connection limits).
        self.sock = socket.create_connection(
            (HOST, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.structured = False
        self.size = 0
        self.transmission_flags = 0
        self.block_size: tuple[int, int, int] | None = None
        self._pending: dict[int, _Pending] = {}
        self._handles = iter(range(1, 1 << 62))

    # --- plumbing ---
    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def reset(self) -> None:
        """Vanish: close with SO_LINGER 0, so that the server gets a TCP RST."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def try_send(self, data: bytes) -> bool:
        """Send, or False when the server has already closed the connection."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except ConnectionResetError:
                raise PeerClosed(bytes(buf[:got])) from None
            if k == 0:
                raise PeerClosed(bytes(buf[:got]))
            got += k
        return bytes(buf)

    def expect_closed(self, timeout: float = 20.0) -> bytes:
        """Wait until the server closes the connection; return what it sent before.  Fails if
        the connection is still open after ``timeout`` seconds (a generous bound, not a timing)."""
        self.sock.settimeout(timeout)
        received = bytearray()
        try:
            while True:
                try:
                    chunk = self.sock.recv(65536)
                except ConnectionResetError:
                    return bytes(received)
                if not chunk:
                    return bytes(received)
                received += chunk
        except TimeoutError:
            raise AssertionError(
                f"the server kept the connection open for {timeout:.0f} s (sent {len(received)} bytes)"
            ) from None

    def is_open_after(self, wait: float) -> bool:
        """True when the server neither sent anything nor closed within ``wait`` seconds."""
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(1, socket.MSG_PEEK)
        except TimeoutError:
            return True
        except ConnectionResetError:
            return False
        finally:
            self.sock.settimeout(20.0)
        return bool(chunk)

    # --- handshake ---
    def greeting(self) -> int:
        data = self.recv_exact(18)
        magic, opt_magic, flags = struct.unpack(">QQH", data)
        assert magic == NBDMAGIC and opt_magic == IHAVEOPT, f"bad greeting {data.hex()}"
        return flags

    def handshake(self, client_flags: int = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) -> None:
        flags = self.greeting()
        assert flags & FLAG_FIXED_NEWSTYLE, "the server must offer fixed newstyle"
        self.send(u32(client_flags))

    def send_option(self, opt: int, payload: bytes = b"", length: int | None = None) -> None:
        self.send(option(opt, payload, length))

    def read_option_reply(self) -> OptReply:
        magic, opt, rtype, length = OPTION_REPLY_HEADER.unpack(self.recv_exact(OPTION_REPLY_HEADER.size))
        assert magic == OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        assert length <= 64 * MiB, f"option reply of {length} bytes"
        return OptReply(opt, rtype, self.recv_exact(length) if length else b"")

    def option_replies(self, expected_option: int) -> list[OptReply]:
        """Every reply to one option, up to its final one (ACK or an error)."""
        replies: list[OptReply] = []
        while True:
            reply = self.read_option_reply()
            assert reply.option == expected_option, f"reply for option {reply.option}, not {expected_option}"
            replies.append(reply)
            if reply.type == REP_ACK or reply.is_error:
                return replies
            assert reply.type in (REP_SERVER, REP_INFO, REP_META_CONTEXT), f"unknown reply {reply.type:#x}"

    def go(self, export: str, infos: tuple[int, ...] = (INFO_BLOCK_SIZE,)) -> list[OptReply]:
        self.send_option(OPT_GO, info_payload(export, infos))
        replies = self.option_replies(OPT_GO)
        if replies[-1].type == REP_ACK:
            for r in replies:
                if r.type == REP_INFO and struct.unpack_from(">H", r.payload)[0] == INFO_EXPORT:
                    _, self.size, self.transmission_flags = struct.unpack(">HQH", r.payload)
                if r.type == REP_INFO and struct.unpack_from(">H", r.payload)[0] == INFO_BLOCK_SIZE:
                    _, lo, pref, hi = struct.unpack(">HIII", r.payload)
                    self.block_size = (lo, pref, hi)
        return replies

    def negotiate(self, export: str, *, structured: bool = False, meta: bool = False) -> RawClient:
        """The well-behaved way into transmission: NBD_OPT_GO (and the options asked for)."""
        self.handshake()
        if structured:
            self.send_option(OPT_STRUCTURED_REPLY)
            assert [r.type for r in self.option_replies(OPT_STRUCTURED_REPLY)] == [REP_ACK]
            self.structured = True
            if meta:
                self.send_option(OPT_SET_META_CONTEXT, meta_payload(export, (BASE_ALLOCATION,)))
                types = [r.type for r in self.option_replies(OPT_SET_META_CONTEXT)]
                assert types == [REP_META_CONTEXT, REP_ACK], types
        replies = self.go(export)
        assert replies[-1].type == REP_ACK, f"NBD_OPT_GO {export!r} failed: {replies[-1]}"
        assert self.size > 0
        return self

    # --- transmission ---
    def next_handle(self) -> int:
        return next(self._handles)

    def track(self, handle: int, command: int, offset: int, length: int) -> None:
        """Expect a reply for a request sent by hand (``send(request(...))``)."""
        self._pending[handle] = _Pending(command, offset, length)

    def request(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        data: bytes = b"",
        handle: int | None = None,
        track: bool = True,
    ) -> int:
        """Send a request header (and ``data`` after it, whatever ``length`` says)."""
        handle = self.next_handle() if handle is None else handle
        if track:
            self.track(handle, command, offset, length)
        self.send(request(command, handle, offset, length, flags) + data)
        return handle

    def read_reply(self) -> Reply:
        """The next complete reply, whichever request it answers."""
        while True:
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            if magic == SIMPLE_REPLY_MAGIC:
                error, handle = struct.unpack(">IQ", self.recv_exact(12))
                pending = self._pending.pop(handle, None)
                assert pending is not None, f"simple reply for unknown handle {handle}"
                assert pending.reply is None, "simple reply after structured chunks"
                data = None
                if pending.command == CMD_READ and error == 0:
                    data = self.recv_exact(pending.length)
                return Reply(handle, error, data)
            assert magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
            assert self.structured, "structured reply chunk without NBD_OPT_STRUCTURED_REPLY"
            flags, rtype, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length) if length else b""
            pending = self._pending.get(handle)
            assert pending is not None, f"chunk for unknown handle {handle}"
            if pending.reply is None:
                pending.reply = Reply(handle, structured=True)
            reply = pending.reply
            reply.chunk_types.append(rtype)
            self._take_chunk(pending, reply, rtype, payload)
            if flags & REPLY_FLAG_DONE:
                del self._pending[handle]
                if pending.command == CMD_READ and reply.error == 0:
                    reply.data = bytes(pending.buffer) if pending.buffer is not None else b""
                return reply

    @staticmethod
    def _take_chunk(pending: _Pending, reply: Reply, rtype: int, payload: bytes) -> None:
        if rtype == REPLY_TYPE_NONE:
            assert not payload
        elif rtype in (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE):
            assert pending.command == CMD_READ, "content chunk for a request that is not a READ"
            if pending.buffer is None:
                pending.buffer = bytearray(pending.length)
            (offset,) = struct.unpack_from(">Q", payload)
            if rtype == REPLY_TYPE_OFFSET_DATA:
                data = payload[8:]
                assert data, "OFFSET_DATA chunk without data"
                length = len(data)
            else:
                assert len(payload) == 12, "OFFSET_HOLE payload is exactly 12 bytes"
                (length,) = struct.unpack_from(">I", payload, 8)
                assert length > 0, "a hole MUST be nonzero"
                data = bytes(length)
            start = offset - pending.offset
            assert start >= 0 and start + length <= pending.length, "content chunk outside the request"
            pending.buffer[start : start + length] = data
        elif rtype == REPLY_TYPE_BLOCK_STATUS:
            assert pending.command == CMD_BLOCK_STATUS
            assert len(payload) >= 12 and (len(payload) - 4) % 8 == 0
            for i in range(4, len(payload), 8):
                length, status = struct.unpack_from(">II", payload, i)
                assert length > 0, "a descriptor length MUST NOT be zero"
                reply.extents.append((length, status))
        elif rtype & (1 << 15):
            error, msg_len = struct.unpack_from(">IH", payload)
            assert error != 0, "an error chunk's error MUST be nonzero"
            assert 6 + msg_len <= len(payload)
            reply.error = reply.error or error
            reply.message = payload[6 : 6 + msg_len].decode("utf-8", "replace")
        else:
            raise AssertionError(f"unknown chunk type {rtype}")

    def call(
        self, command: int, offset: int = 0, length: int = 0, *, flags: int = 0, data: bytes = b""
    ) -> Reply:
        """One request, its reply."""
        handle = self.request(command, offset, length, flags=flags, data=data)
        reply = self.read_reply()
        assert reply.handle == handle, f"reply for handle {reply.handle}, expected {handle}"
        return reply

    def write(self, offset: int, data: bytes, flags: int = 0) -> Reply:
        return self.call(CMD_WRITE, offset, len(data), flags=flags, data=data)

    def read(self, offset: int, length: int) -> Reply:
        return self.call(CMD_READ, offset, length)

    def disconnect(self) -> None:
        with contextlib.suppress(OSError):
            self.send(request(CMD_DISC, self.next_handle()))
        self.close()


def pattern(seed: int, length: int) -> bytes:
    """Deterministic bytes that differ from every other seed's and are never all zero."""
    block = bytes(((seed * 131 + i * 7) % 251) + 1 for i in range(251))
    return (block * (length // 251 + 1))[:length]


# --- the well-behaved witness ----------------------------------------------------------------------


class Witness:
    """A well-behaved client on its own connection (structured replies, base:allocation).

    ``check()`` writes the next chunk of its area with a fresh one-byte pattern (qemu-io can
    verify those), flushes, reads the whole area back and compares it with what it wrote, and
    asks for block status: proof that the server still serves this connection and that
    nothing any other connection did reached this data."""

    CHUNK = 64 * KiB
    CHUNKS = 64  # a 4 MiB area from offset 0

    def __init__(self, port: int, export: str) -> None:
        self.export = export
        self.client = RawClient(port).negotiate(export, structured=True, meta=True)
        self.bytes_of: dict[int, int] = {}
        self.checks = 0

    @property
    def area(self) -> int:
        return self.CHUNK * self.CHUNKS

    def expected(self) -> bytes:
        out = bytearray(self.area)
        for index, value in self.bytes_of.items():
            out[index * self.CHUNK : (index + 1) * self.CHUNK] = bytes([value]) * self.CHUNK
        return bytes(out)

    def check(self) -> None:
        n = self.checks
        index = n % self.CHUNKS
        value = (n * 37 + 11) % 255 + 1
        client = self.client
        reply = client.write(index * self.CHUNK, bytes([value]) * self.CHUNK, CMD_FLAG_FUA if n % 2 else 0)
        assert reply.error == 0, f"witness write failed with {reply.error}: {reply.message}"
        self.bytes_of[index] = value
        assert client.call(CMD_FLUSH).error == 0, "witness flush failed"
        reply = client.read(0, self.area)
        assert reply.error == 0, f"witness read failed with {reply.error}: {reply.message}"
        assert reply.data == self.expected(), "the witness's data changed under it"
        reply = client.call(CMD_BLOCK_STATUS, 0, self.area)
        assert reply.error == 0 and reply.extents, "witness block status failed"
        self.checks += 1

    def qemu_io_commands(self) -> list[str]:
        """qemu-io commands that verify the whole area: read -P for written chunks, zeros elsewhere."""
        commands = []
        for index in range(self.CHUNKS):
            value = self.bytes_of.get(index, 0)
            commands.append(f"read -P {value:#04x} {index * self.CHUNK} {self.CHUNK}")
        return commands


def qemu_io_verify(uri: str, commands: list[str]) -> None:
    """Run qemu-io (read-only) with ``commands``; fail on any error or pattern mismatch."""
    argv = ["qemu-io", "-f", "raw", "-r"]
    for command in commands:
        argv += ["-c", command]
    argv.append(uri)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"qemu-io exited {proc.returncode}: {output[-2000:]}"
    assert "failed" not in output.lower() and "error" not in output.lower(), output[-2000:]
    assert output.count("read ") >= len(commands), output[-2000:]


# --- waiting ------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


# --- fuzzing the sans-IO core --------------------------------------------------------------------
#
# The core is driven exactly as the server drives it (receive_data, or get_buffer/buffer_updated,
# then next_event until NEED_DATA), every event is answered as an application would, and every
# byte it produces is attributed to the event it came with, so that each can be parsed and
# checked against the specification.


FUZZ_MAX_OPTION_LENGTH = 8 * KiB
FUZZ_MAX_OPTIONS = 64
FUZZ_MAX_DISCARD = 256 * KiB
FUZZ_MAX_BLOCK = 64 * KiB
_ALL_WRITABLE = (
    TF_HAS_FLAGS
    | TF_SEND_FLUSH
    | TF_SEND_FUA
    | TF_SEND_TRIM
    | TF_SEND_WRITE_ZEROES
    | TF_SEND_FAST_ZERO
    | TF_SEND_CACHE
    | TF_CAN_MULTI_CONN
)
FUZZ_EXPORTS: dict[str, ExportInfo] = {
    "vol0": ExportInfo(
        "vol0",
        1 * MiB,
        TransmissionFlags(_ALL_WRITABLE),
        "the fuzz volume",
        maximum_block=FUZZ_MAX_BLOCK,
    ),
    # Read-only, 512-byte minimum block, no TRIM/WRITE_ZEROES/FUA: every rule has something to refuse.
    "ro": ExportInfo(
        "ro",
        256 * KiB,
        TransmissionFlags(TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH | TF_SEND_CACHE),
        "",
        minimum_block=512,
        preferred_block=4096,
        maximum_block=FUZZ_MAX_BLOCK,
    ),
}
FUZZ_DEFAULT_EXPORT = "vol0"
# After the core has parsed all it can, what it holds is less than one message: an option
# (header + at most max_option_length) or a request (header + a WRITE payload of at most the
# maximum block; longer ones are refused and skipped, never buffered).
FUZZ_BUFFER_BOUND = max(OPTION_HEADER.size + FUZZ_MAX_OPTION_LENGTH, REQUEST_HEADER.size + FUZZ_MAX_BLOCK)

DOCUMENTED_EVENTS = (OptionRequest, ExportChosen, Request, RequestRejected, ConnectionClosed, ProtocolError)


def new_fuzz_core() -> ServerConnection:
    return ServerConnection(
        list_exports=lambda: [(e.name, e.description) for e in FUZZ_EXPORTS.values()],
        lookup_export=FUZZ_EXPORTS.get,
        default_export=FUZZ_DEFAULT_EXPORT,
        max_option_length=FUZZ_MAX_OPTION_LENGTH,
        max_options=FUZZ_MAX_OPTIONS,
        max_discard=FUZZ_MAX_DISCARD,
    )


@dataclass
class Step:
    """One event and every byte the core (and the application's reply to it) produced with it."""

    event: Event | None  # None for the greeting
    out: bytes


def _answer(core: ServerConnection, request: Request) -> bytes:
    """Answer as an application would; which kind of answer depends only on the handle, so
    that the same stream always gets the same answers."""
    handle = request.handle
    command = int(request.command)
    length = request.length
    if handle % 7 == 3:
        return core.reply_error(request, EIO, "fuzz: injected error")
    if command == CMD_READ:
        if handle % 2 and length >= 2:
            half = length // 2
            pieces = [
                (request.offset, half, pattern(handle, half)),
                (request.offset + half, length - half, None),
            ]
            return b"".join(bytes(b) for b in core.reply_read_extents(request, pieces))
        return b"".join(bytes(b) for b in core.reply_read(request, pattern(handle, length)))
    if command == CMD_BLOCK_STATUS:
        return core.reply_block_status(request, [(min(length, 4096), 0), (length, STATE_HOLE | STATE_ZERO)])
    return core.reply_ok(request)


def _drain(core: ServerConnection, steps: list[Step], check_bound: bool) -> bool:
    """next_event() until NEED_DATA or the end; True when the connection is over."""
    while True:
        event = core.next_event()
        out = core.data_to_send()
        if event is NEED_DATA:
            if out:  # bytes without an event of their own belong with the previous one
                steps[-1].out += out
            if check_bound:
                held = core.buffered_bytes
                assert held <= FUZZ_BUFFER_BOUND, f"the core holds {held} bytes (bound {FUZZ_BUFFER_BOUND})"
            return False
        assert isinstance(event, DOCUMENTED_EVENTS), f"undocumented event {event!r}"
        if isinstance(event, Request):
            out += _answer(core, event)
        steps.append(Step(event, out))
        if isinstance(event, ConnectionClosed | ProtocolError):
            return True


def run_core(data: bytes, chunks: list[int], mode: str, eof: bool, check_bound: bool = True) -> list[Step]:
    """Feed ``data`` to a fresh core in pieces of the sizes in ``chunks`` (cycled) through
    ``receive_data`` ("receive"), ``get_buffer``/``buffer_updated`` ("buffered") or both in turn
    ("mixed"), then end of stream if ``eof``; the steps it took."""
    core = new_fuzz_core()
    steps = [Step(None, core.data_to_send())]
    pos = 0
    turn = 0
    over = False
    while pos < len(data) and not over:
        size = chunks[turn % len(chunks)]
        piece = data[pos : pos + size]
        pos += len(piece)
        buffered = mode == "buffered" or (mode == "mixed" and turn % 2 == 1)
        turn += 1
        if not buffered:
            core.receive_data(piece)
            over = _drain(core, steps, check_bound)
            continue
        taken = 0
        while taken < len(piece) and not over:
            buf = core.get_buffer(-1)
            assert len(buf) > 0, "get_buffer returned an empty buffer"
            n = min(len(buf), len(piece) - taken)
            buf[:n] = piece[taken : taken + n]
            buf.release()
            core.buffer_updated(n)
            taken += n
            over = _drain(core, steps, check_bound)
    if eof and not over:
        core.receive_data(b"")
        _drain(core, steps, check_bound)
    return steps


def summarize(step: Step) -> tuple[Any, ...]:
    """What must not depend on how the bytes were cut (log texts may)."""
    event = step.event
    if event is None:
        return ("greeting",)
    if isinstance(event, OptionRequest):
        return ("option", int(event.option), int(event.reply), event.export_name)
    if isinstance(event, ExportChosen):
        return ("chosen", event.export.name, event.structured_replies, event.base_allocation)
    if isinstance(event, Request):
        data = bytes(event.data) if event.data is not None else None
        return (
            "request",
            event.handle,
            int(event.command),
            int(event.flags),
            event.offset,
            event.length,
            data,
        )
    if isinstance(event, RequestRejected):
        return (
            "rejected",
            event.handle,
            event.command,
            event.flags,
            event.offset,
            event.length,
            int(event.error),
        )
    if isinstance(event, ConnectionClosed):
        return ("closed", event.clean)
    return ("protocol-error",)


# --- checking what the core sent -------------------------------------------------------------------


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        assert self.pos + n <= len(self.data), (
            f"message cut short: wanted {n} bytes at {self.pos} of {len(self.data)}"
        )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def parse_option_replies(data: bytes) -> list[OptReply]:
    stream = _Bytes(data)
    replies = []
    while stream.left:
        magic, opt, rtype, length = OPTION_REPLY_HEADER.unpack(stream.take(OPTION_REPLY_HEADER.size))
        assert magic == OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        replies.append(OptReply(opt, rtype, stream.take(length)))
    return replies


def _check_string(raw: bytes, what: str) -> None:
    # Strings "MUST NOT contain NUL characters ... MUST be no longer than 4096 bytes" (and UTF-8).
    assert len(raw) <= 4096, f"{what} of {len(raw)} bytes"
    assert b"\0" not in raw, f"{what} contains NUL"
    raw.decode("utf-8")


def parse_replies(
    data: bytes, structured: bool, requests: dict[int, tuple[int, int, int]]
) -> dict[int, Reply]:
    """Parse transmission replies; ``requests`` maps handle -> (command, offset, length).
    Every reply must be complete, for a known handle, and well-formed."""
    stream = _Bytes(data)
    done: dict[int, Reply] = {}
    partial: dict[int, Reply] = {}
    while stream.left:
        (magic,) = struct.unpack(">I", stream.take(4))
        if magic == SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", stream.take(12))
            assert handle in requests and handle not in done and handle not in partial, f"handle {handle}"
            command, _offset, length = requests[handle]
            assert error == 0 or error in WIRE_ERRORS, f"error {error} is not a wire error"
            # "MUST NOT use a simple reply for NBD_CMD_READ (even for ... an early NBD_EINVAL)"
            assert not (structured and command == CMD_READ), "simple reply to a READ with structured replies"
            reply = Reply(handle, error)
            if command == CMD_READ and error == 0:
                reply.data = stream.take(length)
            done[handle] = reply
            continue
        assert magic == STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        assert structured, "structured chunk without NBD_OPT_STRUCTURED_REPLY"
        flags, rtype, handle, length = struct.unpack(">HHQI", stream.take(16))
        payload = stream.take(length)
        assert handle in requests and handle not in done, f"chunk for handle {handle}"
        command, offset, req_length = requests[handle]
        reply = partial.setdefault(handle, Reply(handle, structured=True))
        reply.chunk_types.append(rtype)
        pending = _Pending(command, offset, req_length)
        RawClient._take_chunk(pending, reply, rtype, payload)
        if rtype & (1 << 15):
            assert reply.error in WIRE_ERRORS, f"error {reply.error} is not a wire error"
            _check_string(payload[6:], "error message")
        if rtype == REPLY_TYPE_NONE:
            assert flags & REPLY_FLAG_DONE, "NBD_REPLY_TYPE_NONE MUST have NBD_REPLY_FLAG_DONE"
        if flags & REPLY_FLAG_DONE:
            done[handle] = partial.pop(handle)
    assert not partial, f"replies without their final chunk: {sorted(partial)}"
    return done


def check_request(request: Request, chosen: ExportChosen) -> None:
    """The core hands the application only requests the specification lets it serve."""
    export = chosen.export
    tflags = int(export.flags)
    command = int(request.command)
    assert command in (
        CMD_READ,
        CMD_WRITE,
        CMD_FLUSH,
        CMD_TRIM,
        CMD_CACHE,
        CMD_WRITE_ZEROES,
        CMD_BLOCK_STATUS,
    )
    allowed = CMD_FLAG_FUA if tflags & TF_SEND_FUA else 0
    if command == CMD_WRITE_ZEROES:
        allowed |= CMD_FLAG_NO_HOLE | (CMD_FLAG_FAST_ZERO if tflags & TF_SEND_FAST_ZERO else 0)
    if command == CMD_BLOCK_STATUS:
        allowed |= CMD_FLAG_REQ_ONE
    assert int(request.flags) & ~allowed == 0, f"flags {int(request.flags):#x} passed for command {command}"
    if command in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
        assert not tflags & TF_READ_ONLY, "a write reached the application on a read-only export"
    if command == CMD_TRIM:
        assert tflags & TF_SEND_TRIM
    if command == CMD_WRITE_ZEROES:
        assert tflags & TF_SEND_WRITE_ZEROES
    if command == CMD_CACHE:
        assert tflags & TF_SEND_CACHE
    if command == CMD_FLUSH:
        assert tflags & TF_SEND_FLUSH and request.offset == 0 and request.length == 0
    if command == CMD_BLOCK_STATUS:
        assert chosen.base_allocation and request.length > 0, "BLOCK_STATUS without a context"
    assert request.offset >= 0 and request.offset + request.length <= export.size, "request past the end"
    if export.minimum_block > 1:
        assert request.offset % export.minimum_block == 0 and request.length % export.minimum_block == 0
    if command in (CMD_READ, CMD_WRITE, CMD_CACHE):
        assert request.length <= export.maximum_block, "request longer than the maximum block"
    if command == CMD_WRITE:
        assert request.data is not None and len(request.data) == request.length
    else:
        assert request.data is None


def check_transcript(steps: list[Step], data: bytes) -> None:
    """Every byte the core sent for the client bytes ``data`` is a well-formed message,
    attributed to the right event."""
    greeting = steps[0].out
    assert len(greeting) == 18 and struct.unpack(">QQ", greeting[:16]) == (NBDMAGIC, IHAVEOPT)
    no_zeroes = len(data) >= 4 and bool(struct.unpack(">I", data[:4])[0] & FLAG_C_NO_ZEROES)
    structured = False
    chosen: ExportChosen | None = None
    for step in steps[1:]:
        event, out = step.event, step.out
        if isinstance(event, OptionRequest):
            assert chosen is None, "an option event after transmission started"
            replies = parse_option_replies(out)
            assert replies, f"option {event.option} got no reply"
            assert all(r.option == int(event.option) for r in replies), "reply for another option"
            assert replies[-1].type == int(event.reply), "the final reply is not the one reported"
            assert all(r.type in (REP_SERVER, REP_INFO, REP_META_CONTEXT) for r in replies[:-1])
            assert replies[-1].type == REP_ACK or replies[-1].is_error
            if replies[-1].is_error:
                _check_string(replies[-1].payload, "option error message")
            if int(event.option) == OPT_STRUCTURED_REPLY and int(event.reply) == REP_ACK:
                structured = True
        elif isinstance(event, ExportChosen):
            chosen = event
            export = event.export
            assert event.structured_replies == structured
            if out[:8] == u64(OPTION_REPLY_MAGIC):
                replies = parse_option_replies(out)
                assert replies[-1].type == REP_ACK and all(r.option == OPT_GO for r in replies)
                infos = [r.payload for r in replies if r.type == REP_INFO]
                exports = [p for p in infos if struct.unpack_from(">H", p)[0] == INFO_EXPORT]
                # "the server MUST send at least one NBD_REP_INFO, with an NBD_INFO_EXPORT"
                assert exports and struct.unpack(">HQH", exports[0])[1:] == (export.size, int(export.flags))
            else:
                assert out[:10] == struct.pack(">QH", export.size, int(export.flags))
                assert out[10:] == (b"" if no_zeroes else bytes(124)), "NBD_OPT_EXPORT_NAME reply padding"
        elif isinstance(event, Request):
            assert chosen is not None
            check_request(event, chosen)
            answered = parse_replies(
                out, structured, {event.handle: (int(event.command), event.offset, event.length)}
            )
            assert list(answered) == [event.handle], "an answered request got other replies"
        elif isinstance(event, RequestRejected):
            assert chosen is not None
            assert event.error in WIRE_ERRORS, f"rejected with {event.error}"
            answered = parse_replies(
                out, structured, {event.handle: (event.command, event.offset, event.length)}
            )
            assert list(answered) == [event.handle], "a rejected request did not get exactly one reply"
            assert answered[event.handle].error == int(event.error)
        elif isinstance(event, ConnectionClosed):
            if out:
                replies = parse_option_replies(out)
                assert [(r.option, r.type) for r in replies] == [(OPT_ABORT, REP_ACK)], replies
        elif isinstance(event, ProtocolError):
            assert "internal error" not in event.reason, f"the core hit a bug: {event.reason}"
            if out:
                assert chosen is None, "bytes sent with a protocol error in transmission"
                assert all(r.is_error for r in parse_option_replies(out))


# --- sessions to mutate ------------------------------------------------------------------------------

_FUZZ_NAMES = ("vol0", "vol0", "ro", "", "missing")


@st.composite
def valid_sessions(draw: st.DrawFn) -> tuple[bytes, int]:
    """What a well-behaved client could send: client flags, a few options, NBD_OPT_GO (or
    EXPORT_NAME, or ABORT), then requests valid for the export it chose, maybe NBD_CMD_DISC.
    Also where the transmission phase starts in it."""
    parts: list[bytes] = [u32(draw(st.sampled_from([3, 3, 1, 0])))]
    structured = False
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["structured", "list", "info", "list_meta", "set_meta", "unknown"]))
        name = draw(st.sampled_from(_FUZZ_NAMES))
        if kind == "structured":
            parts.append(option(OPT_STRUCTURED_REPLY))
            structured = True
        elif kind == "list":
            parts.append(option(OPT_LIST))
        elif kind == "info":
            infos = tuple(draw(st.lists(st.integers(0, 4), max_size=4, unique=True)))
            parts.append(option(OPT_INFO, info_payload(name, infos)))
        elif kind in ("list_meta", "set_meta"):
            queries = tuple(
                draw(st.lists(st.sampled_from(["base:allocation", "base:", "qemu:dirty"]), max_size=3))
            )
            opt = OPT_LIST_META_CONTEXT if kind == "list_meta" else OPT_SET_META_CONTEXT
            parts.append(option(opt, meta_payload(name, queries)))
        else:
            parts.append(option(draw(st.sampled_from([OPT_STARTTLS, 4, 11, 0x1234])), b"xyz"))
    name = draw(st.sampled_from(["vol0", "vol0", "ro", ""]))
    ending = draw(st.sampled_from(["go", "go", "go", "export_name", "abort"]))
    meta = structured and draw(st.booleans())
    if meta:
        parts.append(option(OPT_SET_META_CONTEXT, meta_payload(name, (BASE_ALLOCATION,))))
    if ending == "abort":
        parts.append(option(OPT_ABORT))
        data = b"".join(parts)
        return data, len(data)
    if ending == "go":
        parts.append(option(OPT_GO, info_payload(name, (INFO_BLOCK_SIZE,))))
    else:
        parts.append(option(OPT_EXPORT_NAME, name.encode()))
    transmission = sum(len(p) for p in parts)
    export = FUZZ_EXPORTS[name or FUZZ_DEFAULT_EXPORT]
    tflags = int(export.flags)
    commands = [CMD_READ]
    if tflags & TF_SEND_FLUSH:
        commands.append(CMD_FLUSH)
    if tflags & TF_SEND_CACHE:
        commands.append(CMD_CACHE)
    if not tflags & TF_READ_ONLY:
        commands += [CMD_WRITE, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES]
    if meta:
        commands.append(CMD_BLOCK_STATUS)
    align = export.minimum_block
    for handle in range(1, draw(st.integers(0, 10)) + 1):
        command = draw(st.sampled_from(commands))
        flags = 0
        if tflags & TF_SEND_FUA and draw(st.booleans()):
            flags |= CMD_FLAG_FUA
        offset = length = 0
        if command != CMD_FLUSH:
            length = draw(st.integers(0 if command != CMD_BLOCK_STATUS else 1, 8 * KiB // align)) * align
            offset = draw(st.integers(0, (export.size - length) // align)) * align
        if command == CMD_WRITE_ZEROES:
            flags |= draw(st.sampled_from([0, CMD_FLAG_NO_HOLE, CMD_FLAG_FAST_ZERO]))
        if command == CMD_BLOCK_STATUS and draw(st.booleans()):
            flags |= CMD_FLAG_REQ_ONE
        parts.append(request(command, handle, offset, length, flags))
        if command == CMD_WRITE:
            parts.append(pattern(handle, length))
    if draw(st.booleans()):
        parts.append(request(CMD_DISC, 0))
    return b"".join(parts), transmission


_BOUNDARY_U32 = [0, 1, 2, 511, 512, 4096, 65535, 65536, 65537, 1 << 20, 0x7FFFFFFF, 0x80000000, U32_MAX]
_BOUNDARY_U64 = [0, 1, 1 * MiB, 1 * MiB - 1, 1 << 32, 1 << 63, U64_MAX, U64_MAX - 511]


@st.composite
def mutated_sessions(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid session with 1-4 mutations (and how many): bit flips, truncation, insertion,
    deletion, duplication, and 32/64-bit fields overwritten with boundary values."""
    session, transmission = draw(valid_sessions())
    data = bytearray(session)
    rng = draw(st.randoms(use_true_random=False))
    mutations = draw(st.integers(1, 4))
    for _ in range(mutations):
        kind = draw(st.sampled_from(["flip", "flip", "truncate", "insert", "delete", "dup", "u32", "u64"]))
        # Positions: mostly uniform (hypothesis favours small numbers), often in the requests.
        low = transmission if transmission < len(data) and rng.random() < 0.6 else 0
        pos = rng.randrange(low, len(data)) if low < len(data) else 0
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=40))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 40))]
        elif kind == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
        elif kind == "u32":
            data[pos : pos + 4] = u32(draw(st.sampled_from(_BOUNDARY_U32)))
        elif kind == "u64":
            data[pos : pos + 8] = u64(draw(st.sampled_from(_BOUNDARY_U64)))
    return bytes(data), mutations


@st.composite
def negotiated_then_random(draw: st.DrawFn) -> bytes:
    """A valid way into transmission, then random bytes (often with a valid request magic)."""
    structured = draw(st.booleans())
    parts = [u32(3)]
    if structured:
        parts.append(option(OPT_STRUCTURED_REPLY))
        parts.append(option(OPT_SET_META_CONTEXT, meta_payload("vol0", (BASE_ALLOCATION,))))
    parts.append(option(OPT_GO, info_payload("vol0")))
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            parts.append(u32(REQUEST_MAGIC) + draw(st.binary(min_size=0, max_size=24)))
        else:
            parts.append(draw(st.binary(min_size=1, max_size=64)))
    return b"".join(parts)


@st.composite
def options_with_random_data(draw: st.DrawFn) -> bytes:
    """Options whose headers are right (known codes, honest lengths) and whose data is random,
    or a valid structure with one field gone wrong; then NBD_OPT_GO and a request."""
    parts = [u32(draw(st.sampled_from([3, 1])))]
    codes = [
        OPT_LIST,
        OPT_INFO,
        OPT_GO,
        OPT_STRUCTURED_REPLY,
        OPT_LIST_META_CONTEXT,
        OPT_SET_META_CONTEXT,
        OPT_ABORT,
    ]
    for _ in range(draw(st.integers(1, 5))):
        code = draw(st.sampled_from([*codes, OPT_EXPORT_NAME, OPT_STARTTLS]))
        if code in (OPT_INFO, OPT_GO) and draw(st.booleans()):
            name = draw(st.binary(max_size=12))
            payload = info_payload(name, name_length=draw(st.sampled_from([len(name), *_BOUNDARY_U32])))
            payload += draw(st.binary(max_size=6))
        elif code in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT) and draw(st.booleans()):
            queries = tuple(draw(st.lists(st.text(max_size=20), max_size=3)))
            payload = meta_payload(draw(st.sampled_from(_FUZZ_NAMES)), queries)
            if draw(st.booleans()):
                cut = draw(st.integers(0, len(payload)))
                payload = payload[:cut] + u32(draw(st.sampled_from(_BOUNDARY_U32))) + payload[cut + 4 :]
        else:
            payload = draw(st.binary(max_size=80))
        parts.append(option(code, payload))
    parts.append(option(OPT_GO, info_payload("vol0")))
    parts.append(request(CMD_READ, 1, 0, 512))
    return b"".join(parts)


chunkings = st.lists(
    st.one_of(st.integers(1, 8), st.integers(1, 300), st.just(65536)), min_size=1, max_size=12
)
feed_modes = st.sampled_from(["receive", "buffered", "mixed"])
