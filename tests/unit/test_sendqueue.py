"""The socket queue both front ends send zero-copy reads through (thinblock.sendqueue): bytes
and FileSpans go out in order, a full socket waits for the loop, a span whose sendfile fails
is read the maker's way, and a span that cannot be read at all ends in ``on_error``."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from thinblock.blockdev import FileSpan
from thinblock.errors import MediumError
from thinblock.sendqueue import SendQueue


class _Span(FileSpan):
    """A span of a test file; ``fail`` makes ``read_part`` raise as a failed PD would."""

    __slots__ = ("fail", "reads", "source")

    def __init__(
        self, fd: int, offset: int, length: int, *, source: int | None = None, fail: bool = False
    ) -> None:
        super().__init__(fd, offset, length)
        self.source = fd if source is None else source  # what read_part reads
        self.fail = fail
        self.reads = 0

    def read_part(self, skip: int = 0) -> bytearray:
        self.reads += 1
        if self.fail:
            raise MediumError("the PD failed")
        return bytearray(os.pread(self.source, self.length - skip, self.offset + skip))


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    content = bytes(range(256)) * 4096  # 1 MiB
    path = tmp_path / "pd.img"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd, content
    finally:
        os.close(fd)


async def _receive(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        chunk = await loop.sock_recv(sock, n - len(got))
        if not chunk:
            break
        got += chunk
    return bytes(got)


async def test_bytes_and_spans_go_out_in_order_across_a_full_socket(data_file: tuple[int, bytes]) -> None:
    fd, content = data_file
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    # A small send buffer: the 1 MiB of spans cannot go in one call, the queue must wait.
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    drained: list[int] = []
    errors: list[BaseException] = []
    sent_by_sendfile: list[int] = []
    queue = SendQueue(
        ours,
        on_drained=lambda: drained.append(1),
        on_error=errors.append,
        on_sendfile=sent_by_sendfile.append,
    )
    try:
        items = [b"head", _Span(fd, 0, 512 * 1024), b"middle", _Span(fd, 512 * 1024, 512 * 1024), b"tail"]
        queue.push(items)
        assert queue, "a 1 MiB reply does not fit a 64 KiB socket buffer: the queue waits for the loop"
        expected = b"head" + content[: 512 * 1024] + b"middle" + content[512 * 1024 :] + b"tail"
        got = await asyncio.wait_for(_receive(theirs, len(expected)), 10)
        assert got == expected
        for _ in range(100):
            if drained:
                break
            await asyncio.sleep(0.01)
        assert drained == [1] and not errors and not queue and queue.bytes == 0
        assert sum(sent_by_sendfile) == 1024 * 1024
    finally:
        queue.close()
        theirs.close()


async def test_a_span_sendfile_cannot_send_is_read_the_makers_way(data_file: tuple[int, bytes]) -> None:
    fd, content = data_file
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    errors: list[BaseException] = []
    queue = SendQueue(ours, on_drained=lambda: None, on_error=errors.append)
    # The descriptor is not a file sendfile can read from (a directory): EINVAL, then read_part.
    directory = os.open(os.path.dirname(__file__), os.O_RDONLY)
    span = _Span(directory, 4096, 8192, source=fd)
    try:
        queue.push([b"h", span])
        got = await asyncio.wait_for(_receive(theirs, 1 + 8192), 10)
        assert got == b"h" + content[4096 : 4096 + 8192]
        assert span.reads == 1 and not errors
    finally:
        os.close(directory)
        queue.close()
        theirs.close()


async def test_a_span_that_cannot_be_read_ends_the_connection() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    errors: list[BaseException] = []
    drained: list[int] = []
    queue = SendQueue(ours, on_drained=lambda: drained.append(1), on_error=errors.append)
    bad = _Span(os.open(os.path.dirname(__file__), os.O_RDONLY), 0, 4096, fail=True)
    try:
        queue.push([b"header promising data", bad, b"next reply"])
        assert len(errors) == 1 and isinstance(errors[0], MediumError)
        assert not queue and queue.bytes == 0 and not drained
    finally:
        os.close(bad.fd)
        queue.close()
        theirs.close()
