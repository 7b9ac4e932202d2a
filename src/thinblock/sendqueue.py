"""A connection's socket queue: replies written to a plain socket in order, buffers with
``send`` and ``FileSpan``s (``thinblock.blockdev``) with ``sendfile(2)``, page cache to
socket, never through Python.  The zero-copy read path of both front ends: the NBD server
(nbd/server.py) queues a READ's reply header and its spans, the iSCSI target
(iscsi/server.py) each Data-In PDU's header and the spans of its data segment.

How a front end uses it: while the queue holds anything it owns the socket, so every byte
the connection sends goes through it (``push``), in order, instead of the asyncio transport;
the transport is used again once the queue drained (``on_drained``).  A front end starts a
queue only when its transport has nothing buffered (``get_write_buffer_size() == 0``),
otherwise bytes would overtake each other.  The queue sends until the socket is full, then
asks the loop to wake it when the socket is writable (``add_writer``).  A span whose
``sendfile`` fails (a read error, a file shorter than the span) is read the maker's way
(``read_part``: the PD's own error handling); if that fails too, or the socket breaks, the
queue is cleared and ``on_error`` is called: headers promising data went out already, so
nothing more can be said on that connection and the front end closes it.

The descriptor given is a duplicate of the transport's socket (``dup_socket``): the queue
writes to it directly while the transport is idle, and the loop's reader of the original is
untouched.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import socket
from collections.abc import Callable, Iterable

from thinblock.blockdev import Buffer, FileSpan
from thinblock.errors import MediumError

QueueItem = Buffer | FileSpan
# Reads of this many bytes or more go through read_spans and sendfile when they can.  Smaller
# ones gain nothing from it (the syscalls cost more than the copy) and lose the batching of
# small replies into one send.
SENDFILE_MIN = 64 * 1024


def dup_socket(transport: asyncio.BaseTransport) -> socket.socket | None:
    """A non-blocking duplicate of a plain TCP or Unix transport's socket, for a ``SendQueue``
    (None when it has none, e.g. a TLS transport)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        return None
    with contextlib.suppress(OSError):
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        dup.setblocking(False)
        return dup
    return None


class SendQueue:
    """One connection's socket queue (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        on_drained: Callable[[], None],
        on_error: Callable[[BaseException], None],
        on_sendfile: Callable[[int], None] | None = None,
    ) -> None:
        self.sock: socket.socket | None = sock
        self.bytes = 0  # queued bytes: what the front end counts as its write buffer
        self._items: collections.deque[QueueItem] = collections.deque()
        self._writer = False
        self._on_drained = on_drained
        self._on_error = on_error
        self._on_sendfile = on_sendfile

    def __bool__(self) -> bool:
        return bool(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def push(self, items: Iterable[QueueItem]) -> None:
        """Queue bytes and spans after what is queued; send at once when the queue was empty
        (otherwise the loop's writer callback is already waiting to send them)."""
        queue = self._items
        idle = not queue
        for item in items:
            queue.append(item)
            self.bytes += item.length if isinstance(item, FileSpan) else len(item)
        if idle and queue:
            self.drain()

    def drain(self) -> None:
        """Send in order (buffers with send, MSG_MORE while more follows; spans with sendfile)
        until empty or the socket is full; then wait until it is writable."""
        sock, queue = self.sock, self._items
        if sock is None:
            queue.clear()
            self.bytes = 0
            return
        fd = sock.fileno()
        try:
            while queue:
                item = queue[0]
                if isinstance(item, FileSpan):
                    try:
                        n = os.sendfile(fd, item.fd, item.offset, item.length)
                        if not n:
                            raise OSError(errno.EIO, "the file ends before the span")
                    except BlockingIOError:
                        raise
                    except OSError:
                        # A read error or a broken connection: read the rest the maker's way (a
                        # read error fails the PD: MediumError); the send says which it was.
                        queue[0] = item.read_part()
                        continue
                    if self._on_sendfile is not None:
                        self._on_sendfile(n)
                    if n < item.length:
                        item.offset += n
                        item.length -= n
                    else:
                        queue.popleft()
                else:
                    n = sock.send(item, socket.MSG_MORE if len(queue) > 1 else 0)
                    if n < len(item):
                        queue[0] = memoryview(item)[n:]
                    else:
                        queue.popleft()
                self.bytes -= n
        except BlockingIOError:
            if not self._writer:
                asyncio.get_running_loop().add_writer(fd, self.drain)
                self._writer = True
            return
        except (OSError, MediumError) as exc:
            self.clear()
            self._on_error(exc)
            return
        self._stop_writer()
        self._on_drained()

    def clear(self) -> None:
        """Drop what is queued (the connection is going away) and stop waiting to send."""
        self._stop_writer()
        self._items.clear()
        self.bytes = 0

    def close(self) -> None:
        """``clear`` and close the duplicate descriptor; the queue sends nothing more."""
        self.clear()
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def _stop_writer(self) -> None:
        if self._writer and self.sock is not None:
            asyncio.get_running_loop().remove_writer(self.sock.fileno())
        self._writer = False


__all__ = ["SENDFILE_MIN", "QueueItem", "SendQueue", "dup_socket"]
