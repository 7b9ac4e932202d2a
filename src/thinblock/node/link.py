"""The mirror link's transport: asyncio over TCP, nothing else.

The protocol lives in ``mirror_protocol`` (sans-IO); the role in ``pair``.  A ``Link`` hands
every received chunk to ``on_data`` (``b""`` at end of stream) and reports the end of the
connection once to ``on_close``.  asyncio sets TCP_NODELAY on its TCP sockets, so a small
ACK is not held back by Nagle's algorithm.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast


class Link(asyncio.Protocol):
    def __init__(
        self,
        on_data: Callable[[bytes], None],
        on_close: Callable[[str], None],
        on_open: Callable[[Link], None] | None = None,
    ) -> None:
        self._on_data = on_data
        self._on_close = on_close
        self._on_open = on_open
        self._transport: asyncio.Transport | None = None
        self.peer = ""
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if self._on_open is not None:
            self._on_open(self)

    def data_received(self, data: bytes) -> None:
        if not self._closed:
            self._on_data(data)

    def eof_received(self) -> bool:
        if not self._closed:
            self._on_data(b"")
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self._closed:
            self._closed = True
            self._on_close(f"link closed: {exc}" if exc else "link closed")

    def write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    @property
    def buffered(self) -> int:
        """Bytes queued for the peer and not yet taken by the kernel."""
        transport = self._transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def close(self) -> None:
        """Close now; ``on_close`` is not called for a close we asked for."""
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.abort()


async def connect(
    host: str,
    port: int,
    on_data: Callable[[bytes], None],
    on_close: Callable[[str], None],
    on_open: Callable[[Link], None] | None = None,
) -> Link:
    """Connect; ``on_open`` runs before any data is delivered (data may arrive before this
    coroutine's caller resumes)."""
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(lambda: Link(on_data, on_close, on_open), host, port)
    return link


async def listen(host: str, port: int, accepted: Callable[[], Link]) -> asyncio.Server:
    """Serve the link on ``host:port`` (port 0: any free one, see ``server.sockets``)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(accepted, host, port, reuse_address=True)
