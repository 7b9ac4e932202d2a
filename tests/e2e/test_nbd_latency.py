"""The NBD request latency metric (``thinblock_vv_request_seconds``, api/metrics.py): every
request the NBD server hands to a volume is timed, reads included.

The server reads through ``Volume.read_extents`` (holes go out as holes); the metrics wrapper
used to pass that through untimed, so no NBD read was ever counted (issue 15).  The second
test sends every command of the protocol's command set (``nbd.constants.Command``: what the
server's dispatch can meet) to a volume behind a spy and checks that every call the server made
into the volume went through a timed method and was counted once: a new operation cannot be
forgotten."""

from __future__ import annotations

import shutil
import struct
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.wire import request
from thinblock.api.metrics import InstrumentedProvider, InstrumentedVolume, LatencyRecorder
from thinblock.blockdev import Capabilities, SpanPiece
from thinblock.nbd.constants import Command
from thinblock.nbd.server import NBDServer

from .memvolume import MemProvider, MiB, SparseMemVolume
from .nbd_helpers import STRUCTURED_MAGIC, RawClient

SIZE = 4 * MiB


class Spy:
    """A volume that records every method of the inner volume called through it."""

    def __init__(self, inner: SparseMemVolume) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self.inner, attr)
        if not callable(value):
            return value

        def called(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(attr)
            return value(*args, **kwargs)

        return called


class SpyProvider(MemProvider):
    def __init__(self, spy: Spy) -> None:
        super().__init__(spy.inner)
        self.spy = spy

    def open_volume(self, name: str) -> Any:
        assert name == self.spy.inner.name
        return self.spy


def counts(recorder: LatencyRecorder) -> dict[str, int]:
    """Requests counted per operation (the histogram's ``_count`` samples)."""
    out: dict[str, int] = {}
    for family in recorder.collect():
        for sample in family.samples:
            if sample.name.endswith("_count"):
                out[sample.labels["op"]] = int(sample.value)
    return out


@pytest.fixture
async def served() -> AsyncIterator[tuple[NBDServer, Spy, LatencyRecorder]]:
    spy = Spy(SparseMemVolume("vol0", SIZE))
    recorder = LatencyRecorder(lambda: ["vol0"])
    server = NBDServer(InstrumentedProvider(SpyProvider(spy), recorder), default_export="vol0")
    sockdir = tempfile.mkdtemp(prefix="tblat")
    await server.start("127.0.0.1", 0, unix_path=f"{sockdir}/nbd.sock")
    try:
        yield server, spy, recorder
    finally:
        await server.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


async def whole_reply(client: RawClient, handle: int, read_length: int = 0) -> int:
    """Read the reply to request ``handle`` to its end (``read_length``: the data a simple reply
    to a READ carries); its error (0: success)."""
    error = 0
    while True:
        magic, flags, type_, got, payload = await client.reply()
        assert got == handle, (got, handle)
        if magic != STRUCTURED_MAGIC:
            if flags == 0 and read_length:
                await client.recv(read_length)
            return flags  # a simple reply: the error field
        if type_ & 0x8000:
            error = struct.unpack(">I", payload[:4])[0]
        if flags & 1:  # NBD_REPLY_FLAG_DONE
            return error


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
async def test_nbd_reads_are_timed(served: tuple[NBDServer, Spy, LatencyRecorder], structured: bool) -> None:
    server, spy, recorder = served
    client = await RawClient.connect(server)
    try:
        await client.go("vol0", structured=structured)
        for handle in range(1, 4):
            client.send(request(Command.READ, handle, offset=handle * 4096, length=4096))
            assert await whole_reply(client, handle, 4096) == 0
    finally:
        await client.aclose()
    assert counts(recorder).get("read") == 3, (counts(recorder), spy.calls)


class SpanningVolume(SparseMemVolume):
    """A volume with ``read_spans`` (``capabilities.file_spans``), as VirtualVolume has: the NBD
    server's zero-copy read path for READs of SENDFILE_MIN bytes or more."""

    async def read_spans(self, offset: int, length: int) -> list[SpanPiece]:
        return list(await self.read_extents(offset, length))


async def test_zero_copy_reads_are_timed() -> None:
    spy = Spy(SpanningVolume("vol0", SIZE, capabilities=Capabilities(file_spans=True)))
    recorder = LatencyRecorder(lambda: ["vol0"])
    server = NBDServer(InstrumentedProvider(SpyProvider(spy), recorder), default_export="vol0")
    await server.start("127.0.0.1", 0)
    client = await RawClient.connect(server)
    try:
        await client.go("vol0", structured=False)
        client.send(request(Command.WRITE, 1, offset=0, length=4096) + b"x" * 4096)
        assert await whole_reply(client, 1) == 0
        client.send(request(Command.READ, 2, offset=0, length=1 * MiB))
        assert await whole_reply(client, 2, 1 * MiB) == 0
    finally:
        await client.aclose()
        await server.stop()
    assert "read_spans" in spy.calls, spy.calls  # the zero-copy path was the one taken
    assert counts(recorder).get("read") == 1, (counts(recorder), spy.calls)


# What each command needs to be a valid request of the size below.
_PAYLOAD = {Command.WRITE: b"w" * 4096}


async def test_every_operation_the_server_can_issue_is_counted(
    served: tuple[NBDServer, Spy, LatencyRecorder],
) -> None:
    server, spy, recorder = served
    client = await RawClient.connect(server)
    timed = {name for name, member in vars(InstrumentedVolume).items() if callable(member)}
    reached: dict[Command, list[str]] = {}
    errors: dict[str, int] = {}
    try:
        await client.go("vol0", structured=True, meta=True)
        for handle, command in enumerate(Command, start=1):
            if command is Command.DISC:
                continue  # ends the session; no volume call
            before = sum(counts(recorder).values())
            spy.calls.clear()
            # FLUSH: "length and offset ... MUST be zero"; the others a 4 KiB range.
            offset, length = (0, 0) if command is Command.FLUSH else (8192, 4096)
            client.send(request(command, handle, offset=offset, length=length))
            if command in _PAYLOAD:
                client.send(_PAYLOAD[command])
            error = await whole_reply(client, handle)
            calls = list(spy.calls)
            reached[command] = calls
            errors[command.name] = error
            untimed = [c for c in calls if c not in timed]
            assert not untimed, f"{command.name}: the server called {untimed} past the latency wrapper"
            if calls:
                assert sum(counts(recorder).values()) == before + 1, f"{command.name} was not counted once"
    finally:
        await client.aclose()
    # The commands a volume serves all reached it (RESIZE is refused by the server itself).
    served_commands = {c for c, calls in reached.items() if calls}
    assert served_commands >= {
        Command.READ,
        Command.WRITE,
        Command.FLUSH,
        Command.TRIM,
        Command.CACHE,
        Command.WRITE_ZEROES,
        Command.BLOCK_STATUS,
    }, (reached, errors)
