"""A minimal NBD client for the drills, written from the protocol specification (doc/proto.md of
the NetworkBlockDevice/nbd repository), independently of the server under test.

Fixed newstyle handshake with ``NBD_OPT_GO``; simple replies only (no structured replies are
negotiated), so every request is answered by one reply header, followed by the data for a
successful READ.  Many requests may be in flight: a reader task matches replies to requests
by cookie, in whatever order the server sends them.

Errors come back as :class:`NBDError` carrying the NBD errno (``NBD_EIO``, ``NBD_ENOSPC``...);
a connection the server dropped (a killed server) fails every request in flight with
:class:`ConnectionLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from dataclasses import dataclass

# --- numbers from the specification -------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_ERROR_BIT = 1 << 31
INFO_EXPORT = 0

TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

ERRNO_NAMES = {
    NBD_EPERM: "EPERM",
    NBD_EIO: "EIO",
    NBD_ENOMEM: "ENOMEM",
    NBD_EINVAL: "EINVAL",
    NBD_ENOSPC: "ENOSPC",
    NBD_EOVERFLOW: "EOVERFLOW",
    NBD_ENOTSUP: "ENOTSUP",
    NBD_ESHUTDOWN: "ESHUTDOWN",
}

_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie


class NBDError(Exception):
    """The server answered a request with an error."""

    def __init__(self, errno: int, what: str) -> None:
        super().__init__(f"{what}: NBD error {ERRNO_NAMES.get(errno, errno)}")
        self.errno = errno


class ConnectionLost(Exception):
    """The connection closed (or broke) with the request unanswered."""


class HandshakeError(Exception):
    """Negotiation failed: the export does not exist, or the server broke the protocol."""


@dataclass
class _Pending:
    command: int
    length: int
    future: asyncio.Future[bytes]


class NBDClient:
    """One connection to one export.  Build it with ``await NBDClient.connect(host, port, name)``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, export: str) -> None:
        self._reader = reader
        self._writer = writer
        self.export = export
        self.size = 0
        self.transmission_flags = 0
        self._cookies = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self._lost: BaseException | None = None

    # --- connection --------------------------------------------------------------------------
    @classmethod
    async def connect(cls, host: str, port: int, export: str, timeout: float = 10.0) -> NBDClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        client = cls(reader, writer, export)
        try:
            await asyncio.wait_for(client._handshake(), timeout)
        except BaseException:
            writer.close()
            raise
        client._reader_task = asyncio.create_task(client._read_replies(), name=f"nbd-client-{export}")
        return client

    async def _handshake(self) -> None:
        r, w = self._reader, self._writer
        try:
            magic, opt_magic, hs_flags = struct.unpack(">QQH", await r.readexactly(18))
        except asyncio.IncompleteReadError as exc:
            raise HandshakeError("the server closed the connection during the greeting") from exc
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise HandshakeError(f"not a newstyle NBD server (magic {magic:#x} {opt_magic:#x})")
        if not hs_flags & FLAG_FIXED_NEWSTYLE:
            raise HandshakeError("the server does not speak fixed newstyle")
        client_flags = FLAG_FIXED_NEWSTYLE | (hs_flags & FLAG_NO_ZEROES)
        name = self.export.encode()
        # NBD_OPT_GO: name length, name, number of information requests (none).
        payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        w.write(
            struct.pack(">I", client_flags) + struct.pack(">QII", IHAVEOPT, OPT_GO, len(payload)) + payload
        )
        await w.drain()
        got_export = False
        while True:
            rep_magic, option, rep_type, length = struct.unpack(">QIII", await r.readexactly(20))
            data = await r.readexactly(length) if length else b""
            if rep_magic != OPTION_REPLY_MAGIC or option != OPT_GO:
                raise HandshakeError(f"bad option reply (magic {rep_magic:#x}, option {option})")
            if rep_type & REP_ERROR_BIT:
                raise HandshakeError(
                    f"export {self.export!r} refused: reply type {rep_type:#x} {data[4:].decode(errors='replace')!r}"
                )
            if rep_type == REP_INFO and len(data) >= 2:
                (info,) = struct.unpack(">H", data[:2])
                if info == INFO_EXPORT:
                    self.size, self.transmission_flags = struct.unpack(">QH", data[2:12])
                    got_export = True
            elif rep_type == REP_ACK:
                break
        if not got_export:
            raise HandshakeError("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")

    async def close(self) -> None:
        """NBD_CMD_DISC, then close; never raises."""
        with contextlib.suppress(Exception):
            if self._lost is None and not self._writer.is_closing():
                self._writer.write(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, next(self._cookies), 0, 0))
                await asyncio.wait_for(self._writer.drain(), 2)
        self.abort()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self._reader_task

    def abort(self) -> None:
        """Drop the connection at once (what a vanished host does)."""
        with contextlib.suppress(Exception):
            self._writer.transport.abort()
        self._fail_all(ConnectionLost("connection aborted by the client"))

    async def __aenter__(self) -> NBDClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- replies -----------------------------------------------------------------------------
    async def _read_replies(self) -> None:
        r = self._reader
        try:
            while True:
                header = await r.readexactly(_SIMPLE_REPLY.size)
                magic, error, cookie = _SIMPLE_REPLY.unpack(header)
                if magic != SIMPLE_REPLY_MAGIC:
                    raise ConnectionLost(f"bad reply magic {magic:#x}")
                pending = self._pending.pop(cookie, None)
                if pending is None:
                    raise ConnectionLost(f"reply for unknown cookie {cookie}")
                data = b""
                if pending.command == CMD_READ and error == 0:
                    data = await r.readexactly(pending.length)
                if pending.future.done():
                    continue
                if error:
                    pending.future.set_exception(NBDError(error, _describe(pending)))
                else:
                    pending.future.set_result(data)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self._fail_all(ConnectionLost(f"connection lost: {exc!r}"))
        except ConnectionLost as exc:
            self._fail_all(exc)
        except asyncio.CancelledError:
            self._fail_all(ConnectionLost("client closed"))
            raise

    def _fail_all(self, exc: BaseException) -> None:
        if self._lost is None:
            self._lost = exc
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(exc)
                p.future.exception()  # retrieved here: the caller may have given up on it

    # --- requests ----------------------------------------------------------------------------
    def _send(
        self, command: int, offset: int, length: int, flags: int = 0, data: bytes = b""
    ) -> asyncio.Future[bytes]:
        """Queue one request; the future resolves with its reply (READ data, or b"")."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if self._lost is not None:
            future.set_exception(ConnectionLost(str(self._lost)))
            return future
        cookie = next(self._cookies)
        self._pending[cookie] = _Pending(command, length, future)
        try:
            self._writer.write(_REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length))
            if data:
                self._writer.write(data)
        except (ConnectionError, OSError, RuntimeError) as exc:
            self._fail_all(ConnectionLost(f"send failed: {exc!r}"))
        return future

    async def _request(
        self, command: int, offset: int, length: int, flags: int = 0, data: bytes = b""
    ) -> bytes:
        future = self._send(command, offset, length, flags, data)
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._fail_all(ConnectionLost(f"send failed: {exc!r}"))
        return await future

    async def read(self, offset: int, length: int) -> bytes:
        return await self._request(CMD_READ, offset, length)

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        await self._request(CMD_WRITE, offset, len(data), CMD_FLAG_FUA if fua else 0, data)

    async def flush(self) -> None:
        await self._request(CMD_FLUSH, 0, 0)

    async def trim(self, offset: int, length: int) -> None:
        await self._request(CMD_TRIM, offset, length)

    async def write_zeroes(self, offset: int, length: int, *, no_hole: bool = False) -> None:
        await self._request(CMD_WRITE_ZEROES, offset, length, CMD_FLAG_NO_HOLE if no_hole else 0)

    async def read_all(self, offset: int, length: int, step: int = 1 << 20, depth: int = 8) -> bytearray:
        """Read ``length`` bytes from ``offset`` with ``depth`` requests in flight."""
        out = bytearray(length)
        pieces = [(pos, min(step, length - pos)) for pos in range(0, length, step)]
        sem = asyncio.Semaphore(depth)

        async def one(pos: int, n: int) -> None:
            async with sem:
                out[pos : pos + n] = await self.read(offset + pos, n)

        await asyncio.gather(*(one(pos, n) for pos, n in pieces))
        return out


def _describe(p: _Pending) -> str:
    names = {
        CMD_READ: "READ",
        CMD_WRITE: "WRITE",
        CMD_FLUSH: "FLUSH",
        CMD_TRIM: "TRIM",
        CMD_WRITE_ZEROES: "WRITE_ZEROES",
    }
    return f"{names.get(p.command, p.command)} of {p.length} bytes"
