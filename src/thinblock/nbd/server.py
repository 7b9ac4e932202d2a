"""The NBD server: a thin asyncio layer around the sans-IO core in ``protocol.py``.

One ``asyncio.BufferedProtocol`` per connection (the protocol family of callbacks, not
streams): the event loop receives straight into the core's buffers -- a WRITE payload
lands in a buffer of its own that goes to the volume as a memoryview, never copied
again.  Each request runs the volume's coroutine with ``thinblock.aio.start_eager``:
when it completes without suspending (the common case: a map lookup and a pread or
pwrite) the reply goes out at once, with no Task; otherwise a done callback on the
Task sends it.  Many requests are in flight per connection and replies go out as they
complete, in any order (the protocol allows it).

Reads go through ``Volume.read_extents(offset, length)`` (``thinblock.blockdev``): pieces
``(absolute offset, length, data)`` covering the request in order, ``None`` for a run that
reads as zeros (the zero LD); with structured replies the holes go out as
NBD_REPLY_TYPE_OFFSET_HOLE chunks: no zeros on the wire.  Buffers a volume returns go to the
transport as they are: they must not change afterwards.

Zero-copy reads.  On a plain (not TLS) connection, a READ of at least ``SENDFILE_MIN`` bytes
to a volume with ``capabilities.file_spans`` goes through ``read_spans``: where the data lies
in PD files as it is (one region, no write-back data over it, RAID 0 or 1), the volume answers
with FileSpans and the server writes the reply header to the socket itself (MSG_MORE) and the
data with ``sendfile(2)``, page cache to socket, never through Python (the socket queue of
``thinblock.sendqueue``, which the iSCSI target's Data-In uses too).  Only when the transport
has nothing queued (replies stay in order); otherwise, when the socket takes less than all, on
TLS (the bytes must be encrypted) and on any sendfile error, the rest goes the copy path: the
span is read (the PD's own error handling) and written to the transport.  Once the header has
gone, a read error cannot be reported any more: the connection is closed (the client retries).

Block status.  ``base:allocation`` alone is answered by ``Volume.block_status``; a volume with
``capabilities.dirty_bitmaps`` also offers ``qemu:dirty-bitmap:NAME`` for each name of its
``dirty_bitmaps()`` (volume/bitmaps.py: the regions that differ from snapshot NAME), each bound
once when the client enters transmission (``dirty_bitmap(NAME)``); with such contexts every
BLOCK_STATUS asks each selected context in turn and sends one chunk per context.

Errors.  ``OutOfSpace`` -> NBD_ENOSPC, ``MediumError`` -> NBD_EIO, ``InvalidArgument`` ->
NBD_EINVAL, ``SlowZero`` -> NBD_ENOTSUP, ``ReadOnlyDevice`` -> NBD_EPERM; any other
exception -> NBD_EIO and one log line.  A request never crashes the server; a client
that breaks the protocol or vanishes costs only its own connection.

Limits the volume can rely on (``thinblock.blockdev``): every range is inside the volume,
``length > 0``, and no call is longer than ``capabilities.maximum_block`` -- TRIM and
WRITE_ZEROES longer than that (allowed on the wire) are split into steps -- except BLOCK_STATUS,
which goes to the volume whole (up to 4 GiB): describing a span costs a volume per extent, not
per byte, and the volume may describe less than was asked.

Back-pressure.  A connection stops reading while too many requests or bytes are in
flight (its own, or all connections' together past ``max_bytes_in_flight``), or while the
transport's write buffer is above its high-water mark, and starts again when they drain.

Denial of service (``thinblock.netlimits``).  Each listener holds at most ``max_connections``
connections, of which at most ``max_connections_per_client`` from one client address; a
connection past either is closed at once, counted in ``refused`` (by reason; the metrics) and
logged through a ``RefusalLog``: at most two lines per interval, whatever the rate.  A client
that does not reach transmission within ``handshake_timeout`` is closed; one in transmission
that sends nothing and has nothing in flight for ``idle_timeout`` seconds is closed too (0: never;
clients matching ``idle_exempt`` never).
Memory: a connection holds its receive buffer (32 KiB negotiating, 256 KiB in transmission), at
most one request payload being received (the 32 MiB maximum block), its requests in flight
(``max_bytes_per_connection``) and its write buffer (8 MiB high water, plus one reply); all
connections together never have more than ``max_bytes_in_flight`` of requests in flight.

Shutdown (``stop()``): stop accepting, stop reading, answer requests already received
but not started with NBD_ESHUTDOWN, let those in flight finish, flush every volume a
client opened, close the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import ssl
import stat
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator
from functools import partial
from typing import Any, cast

from thinblock.aio import start_eager
from thinblock.blockdev import (
    BitmapVolume,
    DirtyBitmap,
    DirtyRun,
    FileSpan,
    SpanPiece,
    Volume,
    VolumeProvider,
)
from thinblock.errors import (
    InvalidArgument,
    MediumError,
    NotFound,
    OutOfSpace,
    ReadOnlyDevice,
    SlowZero,
    VolumeGone,
)
from thinblock.netlimits import STOPPING, ConnectionLimits, RefusalLog
from thinblock.sendqueue import SENDFILE_MIN, SendQueue, dup_socket
from thinblock.sessions import Session, SessionRegistry

from .access import ANY, AccessList, AccessPolicy, AccessRule, ClientIdentity, parse_client
from .constants import Command, CommandFlags, DirtyBitmapFlags, Errno, TransmissionFlags
from .protocol import (
    NEED_DATA,
    Buffer,
    ConnectionClosed,
    ExportChosen,
    ExportInfo,
    MetaContext,
    OptionRequest,
    ProtocolError,
    ReplyError,
    Request,
    RequestRejected,
    ServerConnection,
    StartTLS,
    TLSMode,
)
from .psk import PSKServerSession
from .psk_transport import PSKHandshakeFailed, start_psk
from .tls import peer_subject

log = logging.getLogger("thinblock.nbd")

DEFAULT_PORT = 10809
DEFAULT_MAX_CONNECTIONS = 256  # per listener
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 128  # per client address and listener: one host cannot take all
DEFAULT_MAX_BYTES_IN_FLIGHT = 1024 * 1024 * 1024  # request payload bytes in flight, all connections
DEFAULT_IDLE_TIMEOUT = 300.0  # seconds a connection in transmission may send nothing (0: no limit)
DEFAULT_MAX_REQUESTS = 128  # in flight per connection
DEFAULT_MAX_BYTES = 128 * 1024 * 1024  # payload bytes in flight per connection
DEFAULT_HANDSHAKE_TIMEOUT = 30.0  # seconds a client may take to reach transmission
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds stop() waits for requests in flight
_WRITE_HIGH_WATER = 8 * 1024 * 1024
_WRITE_LOW_WATER = 2 * 1024 * 1024
_CLOSE_GRACE = 5.0  # seconds a closing transport may take to drain before it is aborted
_LOG_BURST = 10
_OUT_BATCH = 256 * 1024  # queued reply bytes that are written without waiting for the batch to end
_JOIN_LIMIT = (
    16 * 1024
)  # reply buffers up to this size are joined; larger ones go out as they are  # log lines of one kind per connection before they are suppressed

_FUA = int(CommandFlags.FUA)
_KIND_VALUE = 0  # the coroutine's result is the reply's content
_KIND_READ = 1  # bytes-like (a zero-length read)
_KIND_EXTENTS = 2  # pieces from read_extents
_KIND_SPANS = 3  # pieces from read_spans (FileSpans to sendfile)
_KIND_CONTEXTS = 4  # (context id, extents) for each metadata context (reply_block_status contexts=)
_DIRTY = int(DirtyBitmapFlags.DIRTY)


def errno_for(exc: BaseException, flags: int = 0) -> Errno:
    """The NBD error for an exception a volume raised."""
    if isinstance(exc, OutOfSpace):
        return Errno.ENOSPC
    if isinstance(exc, MediumError | VolumeGone):
        return Errno.EIO
    if isinstance(exc, InvalidArgument):
        return Errno.EINVAL
    if isinstance(exc, SlowZero):
        # "The server SHOULD NOT return NBD_ENOTSUP except as documented in response to
        # NBD_CMD_WRITE_ZEROES when NBD_CMD_FLAG_FAST_ZERO is supported."
        return Errno.ENOTSUP if flags & CommandFlags.FAST_ZERO else Errno.EIO
    if isinstance(exc, ReadOnlyDevice):
        return Errno.EPERM
    if isinstance(exc, asyncio.CancelledError):
        return Errno.ESHUTDOWN
    return Errno.EIO


class _MissingBitmap:
    """A dirty bitmap selected during negotiation whose snapshot was gone by NBD_OPT_GO: every
    status of it fails (EIO, with the reason), as for a snapshot deleted later."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self._reason = reason

    async def status(self, offset: int, length: int) -> list[DirtyRun]:
        raise VolumeGone(self._reason)


# Per metadata context of a connection, what answers it: None for base:allocation (the volume's
# block_status), else the dirty bitmap.
_StatusPlan = list[tuple[int, DirtyBitmap | None]]


async def _status_of_contexts(
    volume: Volume, plan: _StatusPlan, offset: int, length: int
) -> list[tuple[int, list[tuple[int, int]]]]:
    """NBD_CMD_BLOCK_STATUS with several contexts (or a dirty bitmap): one answer per context."""
    answers: list[tuple[int, list[tuple[int, int]]]] = []
    for context_id, bitmap in plan:
        if bitmap is None:
            extents = await volume.block_status(offset, length)
            answers.append((context_id, [(e.length, int(e.flags)) for e in extents]))
        else:
            runs = await bitmap.status(offset, length)
            answers.append((context_id, [(n, _DIRTY if dirty else 0) for n, dirty in runs]))
    return answers


async def _in_steps(
    operation: Callable[..., Coroutine[Any, Any, None]], offset: int, length: int, step: int, **kwargs: Any
) -> None:
    """Run a TRIM or WRITE_ZEROES longer than the volume's maximum block in steps."""
    end = offset + length
    while offset < end:
        n = min(step, end - offset)
        await operation(offset, n, **kwargs)
        offset += n


class NBDServer:
    """Serves the volumes of ``provider`` over NBD (TCP and/or a Unix socket)."""

    def __init__(
        self,
        provider: VolumeProvider,
        *,
        default_export: str | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        max_requests_per_connection: int = DEFAULT_MAX_REQUESTS,
        max_bytes_per_connection: int = DEFAULT_MAX_BYTES,
        max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        idle_exempt: tuple[str, ...] = (),
        refusal_log_interval: float = 10.0,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        sessions: SessionRegistry | None = None,
        tls_mode: TLSMode = TLSMode.OFF,
        tls_context: ssl.SSLContext | None = None,
        psk_keys: dict[str, bytes] | None = None,
        access: AccessPolicy | None = None,
    ) -> None:
        if tls_mode is not TLSMode.OFF and tls_context is None and not psk_keys:
            raise ValueError(f"TLS mode {tls_mode.value} needs an ssl context or PSK keys")
        if tls_context is not None and psk_keys:
            raise ValueError("TLS with X.509 or with PSK, not both")
        self.tls_mode = tls_mode
        self.tls_context = tls_context
        self.psk_keys = psk_keys  # identity -> key: STARTTLS runs TLS-PSK (nbd/psk.py)
        # Asked at every LIST, INFO and GO: a policy that changes applies from the next option on.
        self.access: AccessPolicy = access if access is not None else AccessList()
        self.provider = provider
        # Where each connection that chose an export is registered (the engine's, so that a
        # volume delete knows its clients); a registry of its own when none is given.
        self.sessions = sessions if sessions is not None else SessionRegistry()
        self.default_export = default_export or None
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        self.max_requests_per_connection = max_requests_per_connection
        self.max_bytes_per_connection = max_bytes_per_connection
        self.max_bytes_in_flight = max_bytes_in_flight
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        # Clients the idle timeout never closes (forms of access rules: CN=..., psk:NAME, networks,
        # unix, *): hosts that keep a quiet connection open on purpose and cannot reconnect.
        self.idle_exempt = tuple(AccessRule(ANY, parse_client(c), "rw") for c in idle_exempt)
        self._limits: list[ConnectionLimits] = []  # one per listener
        self.refusals = RefusalLog(log, "nbd-refused", interval=refusal_log_interval)
        self._refusal_flush: asyncio.TimerHandle | None = None
        self.refused: dict[str, int] = {}  # refused connections by reason (netlimits)
        self.idle_closed = 0  # connections closed by the idle timeout
        self._bytes_in_flight = 0  # all connections' request payloads in flight
        self._starved: set[_Connection] = set()  # paused for the server-wide budget
        self.shutdown_timeout = shutdown_timeout
        self._servers: list[asyncio.Server] = []
        self._unix_path: str | None = None
        self._connections: set[_Connection] = set()
        self._opened: dict[str, Volume] = {}  # volumes that entered transmission, flushed on stop
        self._ids = itertools.count(1)
        self._stopping = False
        self._stopped = asyncio.Event()
        self.connections_total = 0
        self.sendfile_bytes = 0  # READ data sent with sendfile(2) (zero-copy), for tests and figures

    # --- listening ---------------------------------------------------------------------------
    async def start(
        self, host: str | None = "127.0.0.1", port: int | None = DEFAULT_PORT, unix_path: str | None = None
    ) -> None:
        """Listen on ``host:port`` (when both are given; port 0 picks a free one) and/or on
        the Unix socket ``unix_path`` (a stale socket file there is replaced)."""
        if (host is None or port is None) and unix_path is None:
            raise ValueError("nothing to listen on: give host and port, or unix_path")
        loop = asyncio.get_running_loop()
        try:
            if host is not None and port is not None:
                factory = self._protocol_factory(self._new_limits())
                self._servers.append(await loop.create_server(factory, host, port, reuse_address=True))
            if unix_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.stat(unix_path).st_mode):
                        os.unlink(unix_path)
                factory = self._protocol_factory(self._new_limits())
                self._servers.append(await loop.create_unix_server(factory, unix_path))
                self._unix_path = unix_path
        except BaseException:
            for server in self._servers:
                server.close()
            self._servers.clear()
            raise
        log.info(
            "NBD server listening on %s",
            ", ".join(self._describe(a) for a in self.addresses),
            extra={"event": "nbd-listening"},
        )

    @staticmethod
    def _describe(address: Any) -> str:
        if isinstance(address, tuple):
            host, port = address[0], address[1]
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"unix:{address}"

    @property
    def addresses(self) -> list[Any]:
        """Bound socket addresses: ``(host, port, ...)`` tuples for TCP, paths for Unix sockets."""
        return [sock.getsockname() for server in self._servers for sock in server.sockets]

    @property
    def port(self) -> int | None:
        """The bound TCP port (the real one when port 0 was asked for), or None."""
        for address in self.addresses:
            if isinstance(address, tuple):
                return int(address[1])
        return None

    @property
    def unix_path(self) -> str | None:
        return self._unix_path

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def _new_limits(self) -> ConnectionLimits:
        limits = ConnectionLimits(self.max_connections, self.max_connections_per_client)
        self._limits.append(limits)
        return limits

    def _protocol_factory(self, limits: ConnectionLimits) -> Callable[[], _Connection]:
        return lambda: _Connection(self, next(self._ids), limits)

    def _refuse(self, connection: _Connection, reason: str) -> None:
        """Count and (rate-limited) log a refused connection."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if reason == STOPPING:
            detail = "the server is stopping"
        elif (
            connection.limits.max_per_client
            and connection.peer_host is not None
            and (connection.limits.of_client(connection.peer_host) >= connection.limits.max_per_client)
        ):
            detail = f"{connection.limits.max_per_client} connections from {connection.peer_host} already"
        else:
            detail = f"{connection.limits.max_connections} connections on this listener already"
        self.refusals.refused(connection.peer, connection.peer_host, reason, detail)
        due = self.refusals.needs_flush_at
        if due is not None and self._refusal_flush is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, due - self.refusals.clock())
            self._refusal_flush = loop.call_later(delay, self._flush_refusals)

    def _flush_refusals(self) -> None:
        self._refusal_flush = None
        self.refusals.flush()

    def stats(self) -> dict[str, Any]:
        """Counters for the metrics: connections open and accepted, refused by reason, closed idle."""
        return {
            "connections": len(self._connections),
            "connections_total": self.connections_total,
            "refused": dict(self.refused),
            "idle_closed": self.idle_closed,
            "bytes_in_flight": self._bytes_in_flight,
        }

    def _budget_left(self) -> bool:
        return self._bytes_in_flight < self.max_bytes_in_flight

    def _budget_returned(self) -> None:
        """Requests finished: connections paused for the server-wide budget may read again."""
        if self._starved and self._budget_left():
            starved = list(self._starved)
            self._starved.clear()
            for connection in starved:
                connection._resume()

    async def serve_forever(self) -> None:
        """Return once ``stop()`` has finished."""
        await self._stopped.wait()

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to ``shutdown_timeout``), flush
        every opened volume, close every connection."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        for server in self._servers:
            server.close()
        if self._refusal_flush is not None:
            self._refusal_flush.cancel()
            self._refusal_flush = None
        self.refusals.flush()
        connections = list(self._connections)
        for connection in connections:
            connection.begin_shutdown()
        waits = [connection.idle() for connection in connections]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=self.shutdown_timeout)
            if pending:
                log.warning(
                    "%d connections still had requests in flight after %.0f s",
                    len(pending),
                    self.shutdown_timeout,
                    extra={"event": "nbd-shutdown-timeout"},
                )
                for waiter in pending:
                    waiter.cancel()
        for name, volume in list(self._opened.items()):
            try:
                await volume.flush()
            except VolumeGone:
                continue  # deleted meanwhile: nothing of it is left to flush
            except Exception as exc:
                log.error(
                    "flushing volume %s on shutdown failed: %r",
                    name,
                    exc,
                    extra={"event": "nbd-flush-failed"},
                )
        for connection in list(self._connections):
            connection.close_transport(abort=False)
        closing = [connection.lost() for connection in list(self._connections)]
        if closing:
            _done, pending = await asyncio.wait(closing, timeout=_CLOSE_GRACE)
            for connection in list(self._connections):
                connection.close_transport(abort=True)
            for waiter in pending:
                waiter.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=_CLOSE_GRACE)
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
        self._servers.clear()
        log.info("NBD server stopped", extra={"event": "nbd-stopped"})
        self._stopped.set()

    # --- policy the protocol core asks for -----------------------------------------------------
    def _list_exports(self, who: ClientIdentity) -> Iterator[tuple[str, str]]:
        for name in self.provider.export_names():
            if self.access.mode_for(name, who) is None:
                continue  # "MAY omit exports that are TLS-only" -- and those it may not open
            try:
                description = self.provider.open_volume(name).description
            except NotFound:
                continue  # deleted meanwhile
            except Exception as exc:
                log.error(
                    "cannot open volume %s to list it: %r", name, exc, extra={"event": "nbd-list-failed"}
                )
                continue
            yield name, description

    def _lookup_export(self, who: ClientIdentity, name: str) -> ExportInfo | None:
        mode = self.access.mode_for(name, who)
        if mode is None:
            # Answered as an unknown export: a client learns nothing of volumes it may not open.
            log.info(
                "client %s may not open volume %s", who.describe(), name, extra={"event": "nbd-access-denied"}
            )
            return None
        try:
            volume = self.provider.open_volume(name)
        except NotFound:
            return None
        except Exception as exc:
            log.error("cannot open volume %s: %r", name, exc, extra={"event": "nbd-open-failed"})
            return None
        info = ExportInfo.from_capabilities(
            volume.name, volume.size, volume.capabilities, description=volume.description, backend=volume
        )
        if mode == "ro":
            # The core refuses WRITE, TRIM and WRITE_ZEROES with NBD_EPERM for a read-only export.
            info = dataclasses.replace(info, flags=info.flags | TransmissionFlags.READ_ONLY)
        if volume.capabilities.dirty_bitmaps:
            # The qemu:dirty-bitmap:NAME contexts the export offers (volume/bitmaps.py): NAME is a
            # snapshot, whose regions a bitmap describes, so only those this client may open too.
            bitmaps = cast(BitmapVolume, volume).dirty_bitmaps()
            allowed = tuple(b for b in bitmaps if self.access.mode_for(b, who) is not None)
            info = dataclasses.replace(info, dirty_bitmaps=allowed)
        return info

    def _new_core(self, connection: _Connection) -> ServerConnection:
        # The core holds the connection only weakly: a strong reference would make a cycle
        # (connection -> core -> callback -> connection) that only the cyclic GC frees, so a
        # closed connection's buffers (256 KiB in transmission) would linger until a full
        # collection: RSS grew by a round's connections per round of the DoS drill.
        ref = weakref.ref(connection)

        def list_exports() -> Iterator[tuple[str, str]]:
            alive = ref()
            return self._list_exports(alive.identity) if alive is not None else iter(())

        def lookup_export(name: str) -> ExportInfo | None:
            alive = ref()
            return self._lookup_export(alive.identity, name) if alive is not None else None

        return ServerConnection(
            list_exports=list_exports,
            lookup_export=lookup_export,
            default_export=self.default_export,
            tls=self.tls_mode,
        )


class _Connection(asyncio.BufferedProtocol):
    """One client connection: feeds the core, runs requests, writes replies."""

    def __init__(self, server: NBDServer, number: int, limits: ConnectionLimits) -> None:
        self.server = server
        self.number = number
        self.limits = limits  # the listener's slots
        self._admitted = False  # holds one of them
        self.peer = f"#{number}"
        self.address = "unix"  # the peer's host:port, for the session registry
        self.session: Session | None = None
        self.transport: asyncio.Transport | None = None
        self.core = server._new_core(self)
        self.tls_subject: str | None = None  # the verified client certificate's subject
        self.psk_identity: str | None = None  # the PSK identity the client proved
        self.peer_host: str | None = None  # the client's IP address (None on the Unix socket)
        self._tls_task: asyncio.Task[None] | None = None
        # STARTTLS acknowledged, start_tls not returned yet; the core told the handshake is done.
        self._tls_upgrading = False
        self._tls_core_started = False
        self.volume: Volume | None = None
        # BLOCK_STATUS with anything but base:allocation alone: what answers each context.
        self._status_plan: _StatusPlan | None = None
        # What the connection moved (bytes the client asked to read and to write), for its close line.
        self._bytes_read = 0
        self._bytes_written = 0
        self._requests = 0
        self._opened_at = 0.0  # monotonic, when the export was chosen
        self._max_block = 0
        self._in_flight = 0
        self._bytes_in_flight = 0
        self._processing = False
        self._reading_paused = False
        self._write_paused = False
        self._closing = False  # no more requests are started
        self._shutting_down = False
        self._lost = False
        self._idle_waiter: asyncio.Future[None] | None = None
        self._lost_waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()  # the factory runs in the server's loop
        self._last_active = 0.0  # loop time of the last bytes received or request finished
        self._abort_timer: asyncio.TimerHandle | None = None  # a closing transport's deadline
        self._log_counts: dict[str, int] = {}
        self._out: list[Buffer] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        # The socket queue (thinblock.sendqueue) on a duplicate of the plain socket's
        # descriptor (None: no zero-copy reads, e.g. once TLS started): while it holds
        # anything, every reply goes through it (in order) instead of the transport.  Whether
        # the chosen volume can give FileSpans.
        self._sockq: SendQueue | None = None
        self._file_spans = False
        self._close_when_drained = False

    # --- asyncio callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(
            asyncio.Transport, transport
        )  # uvloop transports are not asyncio.Transport subclasses
        self.transport = transport
        server = self.server
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_host = str(peer[0])
            self.address = NBDServer._describe(peer)
            self.peer = f"{self.address}#{self.number}"
        else:
            self.peer = f"unix#{self.number}"
        refusal = STOPPING if server._stopping else self.limits.admit(self.peer_host)
        if refusal is not None:
            server._refuse(self, refusal)
            self._closing = True
            self._lost = True  # nothing of it is kept: connection_lost has nothing to undo
            transport.abort()
            return
        self._admitted = True
        server._connections.add(self)
        server.connections_total += 1
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER, low=_WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # "both the client and server SHOULD disable Nagle's algorithm" (asyncio usually has)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dup = dup_socket(transport)
        if dup is not None:
            self._sockq = SendQueue(
                dup,
                on_drained=self._socket_drained,
                on_error=self._socket_failed,
                on_sendfile=self._count_sendfile,
            )
        self._timer = asyncio.get_running_loop().call_later(server.handshake_timeout, self._handshake_timeout)
        self._flush_core()  # the greeting
        self._flush_out()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._tls_upgrading and not self._tls_core_started:
            # Bytes arriving while start_tls is pending come through the TLS layer: the handshake
            # has completed (the client may send its next option at once, before _start_tls
            # resumes).  Tell the core now, before they land in its buffer: plaintext received
            # before the handshake is still refused (it is in the buffer already).
            self._tls_core_started = True
            self.core.tls_started()
        return self.core.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.core.buffer_updated(nbytes)
        if self._idle_timer is not None:
            self._last_active = self._loop.time()
        if self._tls_upgrading:
            return  # replies must wait for the TLS transport: _start_tls processes them
        self._process()

    def eof_received(self) -> bool:
        self.core.receive_eof()
        self._process()
        # Keep the transport open to send the replies of requests still in flight; we close it.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return  # (a failed TLS handshake may report it twice)
        self._lost = True
        self._closing = True
        self.server._connections.discard(self)
        self.server._starved.discard(self)
        if self._admitted:
            self._admitted = False
            self.limits.release(self.peer_host)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.session is not None:
            self.server.sessions.close(self.session)
            self.session = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._abort_timer is not None:
            # The deadline's handle would keep this connection (and its buffers) alive for seconds.
            self._abort_timer.cancel()
            self._abort_timer = None
        if self.volume is not None:
            log.info(
                "client closed",
                extra={
                    "event": "nbd-closed",
                    "peer": self.peer,
                    "vv": self.volume.name,
                    "bytes_read": self._bytes_read,
                    "bytes_written": self._bytes_written,
                    "requests": self._requests,
                    "seconds": round(time.monotonic() - self._opened_at, 3),
                },
            )
        if not self.core.in_transmission and self.core.state != "closed":
            log.debug("client %s went away during negotiation", self.peer, extra={"event": "nbd-gone"})
        elif self._in_flight:
            log.info(
                "client %s went away with %d requests in flight",
                self.peer,
                self._in_flight,
                extra={"event": "nbd-gone"},
            )
        if self._lost_waiter is not None and not self._lost_waiter.done():
            self._lost_waiter.set_result(None)
        self._drop_sendfile()
        self._notify_idle()

    def _drop_sendfile(self) -> None:
        queue, self._sockq = self._sockq, None
        if queue is not None:
            queue.close()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume()

    # --- the event loop of one connection ------------------------------------------------------
    def _process(self) -> None:
        if self._processing or self._closing:
            return
        self._processing = True
        try:
            core = self.core
            server = self.server
            while True:
                if (
                    self._write_paused
                    or (self._sockq is not None and self._sockq.bytes >= _WRITE_HIGH_WATER)
                    or self._in_flight >= server.max_requests_per_connection
                    or self._bytes_in_flight >= server.max_bytes_per_connection
                ):
                    self._pause_reading()
                    break
                if server._bytes_in_flight >= server.max_bytes_in_flight:
                    server._starved.add(self)  # resumed by _budget_returned
                    self._pause_reading()
                    break
                event = core.next_event()
                if event is NEED_DATA:
                    break
                kind = type(event)
                if kind is Request:
                    self._dispatch(event)  # type: ignore[arg-type]
                elif kind is RequestRejected:
                    self._flush_core()  # its error reply, before replies to later requests
                    self._log_rejected(event)  # type: ignore[arg-type]
                elif kind is OptionRequest:
                    log.debug("client %s: %s", self.peer, event, extra={"event": "nbd-option"})
                elif kind is ExportChosen:
                    self._export_chosen(event)  # type: ignore[arg-type]
                elif kind is StartTLS:
                    self._begin_tls()
                    break
                elif kind is ConnectionClosed:
                    self._client_closed(event)  # type: ignore[arg-type]
                    break
                else:
                    assert kind is ProtocolError
                    self._protocol_error(event)  # type: ignore[arg-type]
                    break
        except Exception as exc:  # a bug here costs this connection, not the server
            log.exception(
                "client %s: internal error: %r", self.peer, exc, extra={"event": "nbd-internal-error"}
            )
            self._flush_core()
            self._closing = True
            self.close_transport(abort=True)
        finally:
            self._processing = False
        self._flush_core()
        if not self._flush_scheduled:
            # Otherwise replies of requests that finished in a task are queued for the flush at
            # the end of this loop turn: the other tasks finishing in this turn (a mirrored
            # write-back volume's writes, woken together by one batch of the partner's ACKs)
            # add theirs, and one send carries them all.  Flushing here sent one per request.
            self._flush_out()

    def _begin_tls(self) -> None:
        """STARTTLS acknowledged: send the ACK, stop reading plaintext, hand the socket to TLS."""
        self._flush_core()
        self._flush_out()
        self._pause_reading()
        assert not self._sockq, "STARTTLS comes before any READ"
        self._drop_sendfile()  # from now on every byte is encrypted: no sendfile
        self._tls_upgrading = True
        self._tls_task = asyncio.ensure_future(self._start_tls())

    @property
    def identity(self) -> ClientIdentity:
        return ClientIdentity(self.peer_host, self.tls_subject, self.psk_identity)

    async def _start_tls(self) -> None:
        transport = self.transport
        server = self.server
        assert transport is not None and (server.tls_context is not None or server.psk_keys)
        try:
            if server.psk_keys:
                session = PSKServerSession(server.psk_keys, on_unknown=self._unknown_psk_identity)
                tls_transport: Any = await start_psk(transport, self, session, server.handshake_timeout)
            else:
                assert server.tls_context is not None
                tls_transport = await asyncio.get_running_loop().start_tls(
                    transport,
                    self,
                    server.tls_context,
                    server_side=True,
                    ssl_handshake_timeout=server.handshake_timeout,
                )
        except (
            TimeoutError,
            OSError,
            ssl.SSLError,
            ConnectionError,
            RuntimeError,
            PSKHandshakeFailed,
        ) as exc:
            self._log_once(
                "tls-failed",
                logging.WARNING,
                "client %s: TLS handshake failed: %s",
                self.peer,
                exc or type(exc).__name__,
            )
            self._closing = True
            self._tls_upgrading = False
            if not transport.is_closing():
                transport.abort()
            asyncio.get_running_loop().call_soon(self.connection_lost, None)
            return
        self._tls_upgrading = False
        if self._lost or tls_transport is None:
            if tls_transport is not None:
                tls_transport.abort()
            return
        self.transport = cast(asyncio.Transport, tls_transport)
        self._reading_paused = False  # start_tls resumed reading, now through TLS
        self.tls_subject = peer_subject(tls_transport.get_extra_info("ssl_object"))
        self.psk_identity = tls_transport.get_extra_info("psk_identity")
        if self.psk_identity is not None:
            who = f"with PSK identity {self.psk_identity} ({tls_transport.get_extra_info('tls_version')})"
        else:
            who = self.tls_subject or "without a client certificate"
        log.debug("client %s: TLS %s", self.peer, who, extra={"event": "nbd-tls"})
        if not self._tls_core_started:
            self._tls_core_started = True
            self.core.tls_started()
        if self.psk_identity is not None:
            # The PSK transport held what came with the client's Finished until now.
            tls_transport.resume_reading()
        self._process()

    def _unknown_psk_identity(self, identity: str) -> None:
        self._log_once(
            "psk-unknown",
            logging.WARNING,
            "client %s: unknown PSK identity %r",
            self.peer,
            identity[:64],
        )

    def _flush_core(self) -> None:
        out = self.core.data_to_send()
        if out:
            self._write(out)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._lost:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        """Requests or write buffer drained: carry on with what is buffered, then read again."""
        if self._closing or self._lost:
            return
        self._process()
        server = self.server
        if (
            self._reading_paused
            and not self._closing
            and not self._write_paused
            and (self._sockq is None or self._sockq.bytes < _WRITE_HIGH_WATER)
            and self._in_flight < server.max_requests_per_connection
            and self._bytes_in_flight < server.max_bytes_per_connection
            and server._budget_left()
            and self.transport is not None
        ):
            self._reading_paused = False
            self.transport.resume_reading()

    def _write(self, data: Buffer) -> None:
        """Queue reply bytes; they go out together at the end of this loop iteration."""
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= _OUT_BATCH:
            self._flush_out()
        elif not self._flush_scheduled and not self._processing:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_out)

    def _write_all(self, buffers: list[Buffer]) -> None:
        for data in buffers:
            self._write(data)

    def _flush_out(self) -> None:
        """Write the queued replies: small ones joined into one buffer (one syscall for a burst
        of 4 KiB replies), large ones as they are (never copied)."""
        self._flush_scheduled = False
        out = self._out
        if not out:
            return
        self._out = []
        self._out_bytes = 0
        transport = self.transport
        if transport is None or self._lost or transport.is_closing():
            return
        if self._sockq:  # the socket queue owns the socket until it drains: keep the order
            self._sockq.push(out)
            return
        if len(out) == 1:
            transport.write(out[0])
            return
        run: list[Buffer] = []
        for data in out:
            if len(data) > _JOIN_LIMIT:
                if run:
                    transport.write(b"".join(run))
                    run = []
                transport.write(data)
            else:
                run.append(data)
        if run:
            transport.write(b"".join(run) if len(run) > 1 else run[0])

    # --- negotiation outcome and the end of a connection ---------------------------------------
    def _handshake_timeout(self) -> None:
        self._timer = None
        if not self.core.in_transmission and not self._lost:
            log.warning(
                "client %s did not finish negotiating within %.0f s; closing",
                self.peer,
                self.server.handshake_timeout,
                extra={"event": "nbd-handshake-timeout"},
            )
            self._closing = True
            self.close_transport(abort=True)
            task = self._tls_task
            if task is not None and not task.done():
                # The TCP transport belongs to the TLS layer while the handshake runs: its close
                # never reached this protocol, so the connection (and its slot) stayed counted
                # for ever -- stalled TLS handshakes filled the listener.  End it here.
                task.cancel()
                asyncio.get_running_loop().call_soon(self.connection_lost, None)

    def _export_chosen(self, event: ExportChosen) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        export = event.export
        volume = export.backend
        self.volume = volume
        self._opened_at = time.monotonic()
        self._max_block = export.maximum_block
        self._file_spans = self._sockq is not None and volume.capabilities.file_spans
        if any(context.bitmap is not None for context in event.contexts):
            self._status_plan = [self._bind_context(volume, context) for context in event.contexts]
        self.server._opened.setdefault(export.name, volume)
        self.session = self.server.sessions.open("NBD", export.name, self.address, self._disconnect)
        if self.server.idle_timeout > 0 and not any(
            r.matches(self.identity) for r in self.server.idle_exempt
        ):
            loop = asyncio.get_running_loop()
            self._last_active = loop.time()
            self._idle_timer = loop.call_later(self.server.idle_timeout, self._idle_check)
        log.info(
            "client %s opened %s (%s replies%s)",
            self.peer,
            export.name,
            "structured" if event.structured_replies else "simple",
            "".join(f", {context.name}" for context in event.contexts),
            extra={"event": "nbd-open", "vv": export.name},
        )

    @staticmethod
    def _bind_context(volume: Volume, context: MetaContext) -> tuple[int, DirtyBitmap | None]:
        """A context's answer, bound once: a dirty bitmap names its snapshot from now on."""
        if context.bitmap is None:
            return context.id, None
        try:
            return context.id, cast(BitmapVolume, volume).dirty_bitmap(context.bitmap)
        except NotFound as exc:
            return context.id, _MissingBitmap(context.bitmap, str(exc))

    def _idle_check(self) -> None:
        """The idle timer: close a connection that sent nothing and had nothing in flight for
        ``idle_timeout`` seconds; otherwise look again when it could be.  (One timer per
        connection, re-armed lazily: a request costs a float store, not a timer.)"""
        self._idle_timer = None
        if self._lost or self._closing:
            return
        loop = asyncio.get_running_loop()
        timeout = self.server.idle_timeout
        if self._in_flight:
            self._idle_timer = loop.call_later(timeout, self._idle_check)
            return
        quiet = loop.time() - self._last_active
        if quiet < timeout:
            self._idle_timer = loop.call_later(timeout - quiet, self._idle_check)
            return
        # Nothing in flight, nothing received: no request can be lost by closing.  The spec
        # leaves the server free to close ("the server MAY ... close the connection").
        self.server.idle_closed += 1
        log.info(
            "client %s idle for %.0f s; closing",
            self.peer,
            quiet,
            extra={"event": "nbd-idle-timeout", "vv": self._volume_name()},
        )
        self._closing = True
        self._pause_reading()
        self._flush_core()
        self.close_transport(abort=False)

    def _disconnect(self) -> None:
        """The volume was deleted under this client (forced): no more requests, close now."""
        self._closing = True
        self._pause_reading()
        self.close_transport(abort=True)

    def _client_closed(self, event: ConnectionClosed) -> None:
        self._closing = True
        self._pause_reading()
        if event.clean:
            log.debug("client %s: %s", self.peer, event.reason, extra={"event": "nbd-close"})
        else:
            log.warning("client %s: %s", self.peer, event.reason, extra={"event": "nbd-close"})
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._in_flight:
            self._flush_core()
            self.close_transport(abort=False)

    def _protocol_error(self, event: ProtocolError) -> None:
        log.warning(
            "client %s broke the protocol: %s; disconnecting",
            self.peer,
            event.reason,
            extra={"event": "nbd-protocol"},
        )
        self._closing = True
        self._flush_core()
        # A hard disconnect: requests in flight run to completion but their replies are dropped.
        self.close_transport(abort=False)

    def close_transport(self, abort: bool) -> None:
        transport = self.transport
        if transport is None or self._lost:
            return
        if not abort:
            self._flush_out()
            if self._sockq:
                # Replies still in the socket queue: close once it has drained (or at the deadline).
                if not self._close_when_drained:
                    self._close_when_drained = True
                    self._abort_timer = asyncio.get_running_loop().call_later(
                        _CLOSE_GRACE, self.close_transport, True
                    )
                return
        if abort:
            self._drop_sendfile()
            transport.abort()
            return
        if not transport.is_closing():
            transport.close()
            # A client that stops reading must not keep a closing connection alive forever.
            self._abort_timer = asyncio.get_running_loop().call_later(
                _CLOSE_GRACE, self.close_transport, True
            )

    def begin_shutdown(self) -> None:
        """Server stop: no new requests; answer those already received with ESHUTDOWN."""
        self._shutting_down = True
        self._pause_reading()
        if self._lost:
            return
        if not self.core.in_transmission:
            self._closing = True
            self.close_transport(abort=True)
            return
        if self._closing:
            return
        core = self.core
        # "The error value issued in respect of these requests and any subsequently received
        # requests SHOULD be NBD_ESHUTDOWN."
        while True:
            event = core.next_event()
            if event is NEED_DATA or isinstance(event, (ConnectionClosed, ProtocolError)):
                break
            if isinstance(event, Request):
                self._write(core.reply_error(event, Errno.ESHUTDOWN, "the server is shutting down"))
        self._flush_core()
        self._closing = True

    def idle(self) -> asyncio.Future[None]:
        """Done when no request of this connection is in flight."""
        loop = asyncio.get_running_loop()
        if self._idle_waiter is None or self._idle_waiter.done():
            self._idle_waiter = loop.create_future()
        if not self._in_flight or self._lost:
            self._idle_waiter.set_result(None)
        return self._idle_waiter

    def lost(self) -> asyncio.Future[None]:
        """Done when the connection is closed."""
        if self._lost_waiter is None:
            self._lost_waiter = asyncio.get_running_loop().create_future()
            if self._lost:
                self._lost_waiter.set_result(None)
        return self._lost_waiter

    def _notify_idle(self) -> None:
        waiter = self._idle_waiter
        if waiter is not None and not waiter.done() and (not self._in_flight or self._lost):
            waiter.set_result(None)

    # --- requests ----------------------------------------------------------------------------
    def _dispatch(self, request: Request) -> None:
        if self._shutting_down:
            self._write(self.core.reply_error(request, Errno.ESHUTDOWN, "the server is shutting down"))
            return
        volume = self.volume
        assert volume is not None
        command = request.command
        offset = request.offset
        length = request.length
        kind = _KIND_VALUE
        self._requests += 1
        if command is Command.READ:
            self._bytes_read += length
        elif command is Command.WRITE:
            self._bytes_written += length
        try:
            if not length and command is not Command.FLUSH:
                # Zero-length requests: "the behavior of a server on such a request is unspecified
                # although the server SHOULD NOT disconnect".  Nothing to do, success.
                self._complete(request, _KIND_READ, b"")
                return
            coro: Coroutine[Any, Any, Any]
            if command is Command.READ:
                if length >= SENDFILE_MIN and self._file_spans and self._sockq is not None:
                    kind = _KIND_SPANS
                    coro = cast(Any, volume).read_spans(offset, length)
                else:
                    kind = _KIND_EXTENTS
                    coro = volume.read_extents(offset, length)
            elif command is Command.WRITE:
                assert request.data is not None
                coro = volume.write(offset, request.data, fua=bool(int(request.flags) & _FUA))
            elif command is Command.FLUSH:
                coro = volume.flush()
            elif command is Command.TRIM:
                fua = bool(int(request.flags) & _FUA)
                if length > self._max_block:
                    coro = _in_steps(volume.trim, offset, length, self._max_block, fua=fua)
                else:
                    coro = volume.trim(offset, length, fua=fua)
            elif command is Command.WRITE_ZEROES:
                flags = int(request.flags)
                options = {
                    "may_trim": not flags & CommandFlags.NO_HOLE,
                    "fast": bool(flags & CommandFlags.FAST_ZERO),
                    "fua": bool(flags & _FUA),
                }
                if length > self._max_block:
                    coro = _in_steps(volume.write_zeroes, offset, length, self._max_block, **options)
                else:
                    coro = volume.write_zeroes(offset, length, **options)
            elif command is Command.BLOCK_STATUS:
                # The whole span asked (a u32: up to 4 GiB): the volume answers from its map, so a
                # request over unwritten space costs one extent whatever its length.  Clipped to
                # the 32 MiB maximum block, mapping a 1 PiB volume took 33 million requests.
                if self._status_plan is None:  # base:allocation alone
                    coro = volume.block_status(offset, length)
                else:
                    kind = _KIND_CONTEXTS
                    coro = _status_of_contexts(volume, self._status_plan, offset, length)
            else:
                assert command is Command.CACHE
                coro = volume.cache(offset, length)
            finished, result = start_eager(coro)
        except Exception as exc:
            self._fail(request, exc)
            return
        if finished:
            self._complete(request, kind, result)
            return
        self._in_flight += 1
        if command in (Command.READ, Command.WRITE):
            self._bytes_in_flight += length
            self.server._bytes_in_flight += length
        result.add_done_callback(partial(self._task_done, request, kind))

    def _task_done(self, request: Request, kind: int, task: asyncio.Task[Any]) -> None:
        self._in_flight -= 1
        if self._idle_timer is not None:
            self._last_active = self._loop.time()
        if request.command in (Command.READ, Command.WRITE):
            self._bytes_in_flight -= request.length
            self.server._bytes_in_flight -= request.length
            self.server._budget_returned()
        try:
            if task.cancelled():
                self._fail(request, asyncio.CancelledError())
            else:
                exc = task.exception()
                if exc is not None:
                    self._fail(request, exc)
                else:
                    self._complete(request, kind, task.result())
        except Exception as exc:  # never let a callback take the loop down
            log.exception(
                "client %s: internal error: %r", self.peer, exc, extra={"event": "nbd-internal-error"}
            )
        self._notify_idle()
        if self._closing:
            if not self._in_flight and not self._shutting_down:
                self._flush_core()
                self.close_transport(abort=False)
        else:
            self._resume()

    def _complete(self, request: Request, kind: int, result: Any) -> None:
        core = self.core
        command = request.command
        try:
            if command is Command.READ:
                if kind == _KIND_SPANS:
                    if any(isinstance(piece[2], FileSpan) for piece in result):
                        self._send_spans(request, result)
                    else:
                        self._write_all(core.reply_read_extents(request, result))
                elif kind == _KIND_EXTENTS:
                    self._write_all(core.reply_read_extents(request, result))
                else:
                    self._write_all(core.reply_read(request, result))
            elif command is Command.BLOCK_STATUS:
                if kind == _KIND_CONTEXTS:
                    self._write(core.reply_block_status(request, contexts=result))
                else:
                    self._write(core.reply_block_status(request, [(e.length, int(e.flags)) for e in result]))
            else:
                self._write(core.reply_ok(request))
        except (ReplyError, TypeError, AttributeError) as exc:
            self._log_once(
                "bad-result",
                logging.ERROR,
                "volume %s returned an unusable result for %s: %s",
                self._volume_name(),
                command.name,
                exc,
            )
            self._write(core.reply_error(request, Errno.EIO, "internal error"))

    def _send_spans(self, request: Request, pieces: list[SpanPiece]) -> None:
        """A READ answered with FileSpans: sent zero-copy through the socket queue when the
        transport has nothing queued (or the queue already owns the socket), else read and
        written to the transport (see the module docstring)."""
        spans: list[FileSpan] = []
        position = request.offset
        for offset, length, data in pieces:
            if offset != position or not isinstance(data, FileSpan) or data.length != length:
                raise ReplyError(f"read spans do not cover the request at {position}")
            spans.append(data)
            position += length
        if position != request.offset + request.length:
            raise ReplyError(f"read spans end at {position}")
        header = self.core.reply_read_header(request)
        self._flush_out()  # earlier replies go first
        transport = self.transport
        queue = self._sockq
        if (
            queue is not None
            and transport is not None
            and not self._lost
            and not transport.is_closing()
            and (queue or not transport.get_write_buffer_size())
        ):
            queue.push([header, *spans])
            return
        try:
            copies: list[Buffer] = [span.read_part() for span in spans]
        except MediumError as exc:
            self._fail(request, exc)  # nothing of this reply went out yet: an error reply
            return
        self._write(header)
        self._write_all(copies)

    def _count_sendfile(self, n: int) -> None:
        self.server.sendfile_bytes += n

    def _socket_drained(self) -> None:
        if self._close_when_drained:
            self.close_transport(abort=False)
        else:
            self._resume()

    def _socket_failed(self, exc: BaseException) -> None:
        # Reply headers went out promising data: nothing more can be said on this connection.
        self._log_once(
            "sendfile",
            logging.WARNING,
            "client %s: sending read data failed (%s); disconnecting",
            self.peer,
            exc,
        )
        self._closing = True
        self.close_transport(abort=True)

    def _fail(self, request: Request, exc: BaseException) -> None:
        error = errno_for(exc, request.flags)
        if error == Errno.EIO and not isinstance(exc, MediumError | VolumeGone):
            # Anything the volume did not raise on purpose: one line, no traceback flood.
            self._log_once(
                "unexpected",
                logging.ERROR,
                "client %s: %s at offset %d length %d failed unexpectedly: %r",
                self.peer,
                request.command.name,
                request.offset,
                request.length,
                exc,
            )
            message = "internal error"
        else:
            message = str(exc) or error.name
            level = (
                logging.DEBUG if error in (Errno.ENOSPC, Errno.ENOTSUP, Errno.ESHUTDOWN) else logging.WARNING
            )
            self._log_once(
                error.name,
                level,
                "client %s: %s at offset %d length %d: %s: %s",
                self.peer,
                request.command.name,
                request.offset,
                request.length,
                error.name,
                message,
            )
        self._write(self.core.reply_error(request, error, message))

    def _volume_name(self) -> str:
        return getattr(self.volume, "name", "?")

    def _log_rejected(self, event: RequestRejected) -> None:
        self._log_once(
            "rejected",
            logging.WARNING,
            "client %s: request refused with %s: %s",
            self.peer,
            event.error.name,
            event.reason,
        )

    def _log_once(self, kind: str, level: int, message: str, *args: Any) -> None:
        """Log the first few messages of a kind per connection, then say they are suppressed."""
        if not log.isEnabledFor(level):
            return
        count = self._log_counts.get(kind, 0) + 1
        self._log_counts[kind] = count
        if count <= _LOG_BURST:
            log.log(level, message, *args, extra={"event": "nbd-request"})
        elif count == _LOG_BURST + 1:
            log.log(
                level,
                "client %s: further %s messages suppressed",
                self.peer,
                kind,
                extra={"event": "nbd-request"},
            )


__all__ = ["DEFAULT_PORT", "SENDFILE_MIN", "NBDServer", "errno_for"]
