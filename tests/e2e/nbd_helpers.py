"""Fixtures and tools for the NBD end-to-end tests (tests/e2e/test_nbd_*.py).

The server runs in the test's event loop, on a free loopback port and a Unix socket in
a temporary directory; real clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio) run as
subprocesses started with asyncio, so the loop keeps serving while they run.

The volumes come from the ``nbd_provider`` fixture, parametrized over ``PROVIDERS``: a
factory that takes the standard volume specs and returns a VolumeProvider.  Two run:
``mem``, an in-memory toy that isolates the protocol, and ``engine``, the real thinblock
engine (sparse file PDs, a RAID 1 pool, SQLite metadata) -- every client test runs
against both.

Import the fixtures into a test module with ``from .nbd_helpers import nbd_provider, nbd_server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.wire import IHAVEOPT, info_payload, meta_payload, option, request
from thinblock.blockdev import Volume, VolumeProvider
from thinblock.nbd.server import NBDServer

from .memvolume import MemProvider, MemVolume, MiB, SparseMemVolume


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    size: int
    description: str = ""
    alloc_limit: int | None = None


STANDARD_VOLUMES = [
    VolumeSpec("vol0", 64 * MiB, "first volume"),
    VolumeSpec("vol1", 16 * MiB, "second volume"),
    VolumeSpec("limited", 16 * MiB, "4 MiB allocation limit", alloc_limit=4 * MiB),
]
DEFAULT_EXPORT = "vol0"

ProviderFactory = Callable[[list[VolumeSpec], Path], AbstractAsyncContextManager[VolumeProvider]]


@asynccontextmanager
async def mem_provider(specs: list[VolumeSpec], tmp_path: Path) -> AsyncIterator[VolumeProvider]:
    volumes: list[MemVolume] = []
    for i, spec in enumerate(specs):
        # Vary the implementation: the fast read path with holes, and volumes whose calls
        # sometimes suspend (so replies also go out from Task callbacks).
        cls = SparseMemVolume if i % 2 == 0 else MemVolume
        volumes.append(
            cls(
                spec.name,
                spec.size,
                description=spec.description,
                alloc_limit=spec.alloc_limit,
                suspend_every=0 if i % 2 == 0 else 3,
            )
        )
    yield MemProvider(*volumes)


@asynccontextmanager
async def engine_provider(specs: list[VolumeSpec], tmp_path: Path) -> AsyncIterator[VolumeProvider]:
    """The real engine: four 128 MiB sparse PDs, a RAID 1 pool with 64 KiB regions (so that
    client I/O crosses many region boundaries), one VV per spec; every other VV write-back.
    Write-through writes of 16 KiB or more into a region go to the I/O threads."""
    from thinblock.engine import Engine, EngineOptions
    from thinblock.model import CacheMode
    from thinblock.units import Limit

    engine = await Engine.open(
        tmp_path / "engine", EngineOptions(allow_tiny_chunklets=True, offload_min_bytes=16 * 1024)
    )
    try:
        for i in range(4):
            await engine.add_pd(tmp_path / "engine" / f"pd{i}.img", size=128 * MiB, chunklet_size=MiB)
        await engine.create_pool("p", raid=1, region_size=64 * 1024, growth_increment=8 * MiB, step=4096)
        for i, spec in enumerate(specs):
            await engine.create_vv(
                spec.name,
                pool="p",
                size=spec.size,
                alloc_limit=None if spec.alloc_limit is None else Limit(bytes=spec.alloc_limit),
                cache_mode=CacheMode.WRITEBACK if i % 2 else CacheMode.WRITETHROUGH,
            )
        yield engine
    finally:
        await engine.close()
    report = Engine.check(tmp_path / "engine")
    assert report.ok, report.problems


PROVIDERS: dict[str, ProviderFactory] = {"mem": mem_provider, "engine": engine_provider}


@pytest.fixture(params=sorted(PROVIDERS))
async def nbd_provider(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VolumeProvider]:
    async with PROVIDERS[request.param](STANDARD_VOLUMES, tmp_path) as provider:
        yield provider


@pytest.fixture
async def nbd_server(nbd_provider: VolumeProvider) -> AsyncIterator[NBDServer]:
    # A short directory: Unix socket paths are limited to about 100 bytes.
    sockdir = tempfile.mkdtemp(prefix="tbnbd")
    server = NBDServer(nbd_provider, default_export=DEFAULT_EXPORT)
    await server.start("127.0.0.1", 0, unix_path=f"{sockdir}/nbd.sock")
    try:
        yield server
    finally:
        await server.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def uri(server: NBDServer, export: str = "") -> str:
    return f"nbd://127.0.0.1:{server.port}/{export}"


def unix_uri(server: NBDServer, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={server.unix_path}"


async def read_volume(volume: Volume, offset: int = 0, length: int | None = None) -> bytes:
    """A volume's contents through its own interface (works for any provider)."""
    end = volume.size if length is None else offset + length
    step = min(volume.capabilities.maximum_block, 4 * MiB)
    out = bytearray()
    while offset < end:
        n = min(step, end - offset)
        out += await volume.read(offset, n)
        offset += n
    return bytes(out)


@dataclass
class Completed:
    argv: list[str]
    code: int
    out: str
    err: str

    def check(self) -> Completed:
        assert self.code == 0, f"{' '.join(self.argv)} exited {self.code}\n{self.out}\n{self.err}"
        return self


async def run(*argv: str, timeout: float = 60.0, cwd: str | Path | None = None) -> Completed:
    """Run a client without blocking the event loop the server runs on."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{' '.join(argv)} did not finish within {timeout} s") from None
    assert proc.returncode is not None
    return Completed(list(argv), proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


# --- a raw client, for what real clients never send ------------------------------------------------
# (its messages come from tests/support/wire.py, re-exported for the e2e tests)

NBDMAGIC = 0x4E42444D41474943
REPLY_MAGIC = 0x0003E889045565A9
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF


class RawClient:
    """A deliberately simple NBD client that sends whatever it is told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.size = 0
        self.flags = 0

    @classmethod
    async def connect(cls, server: NBDServer, unix: bool = False) -> RawClient:
        if unix:
            assert server.unix_path is not None
            reader, writer = await asyncio.open_unix_connection(server.unix_path)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        return cls(reader, writer)

    async def greeting(self) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", await self.recv(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        return flags

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, n: int, timeout: float = 10.0) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, reply, length = struct.unpack(">QIII", await self.recv(20))
        assert magic == REPLY_MAGIC
        return opt, reply, await self.recv(length)

    async def option_replies(self) -> list[tuple[int, int, bytes]]:
        """Replies up to the final one (ACK or an error)."""
        replies = []
        while True:
            reply = await self.option_reply()
            replies.append(reply)
            if reply[1] == 1 or reply[1] & 0x80000000:
                return replies

    async def go(self, export: str = "vol0", structured: bool = True, meta: bool = True) -> None:
        await self.greeting()
        self.send(struct.pack(">I", 3))
        if structured:
            self.send(option(8))
            assert (await self.option_replies())[-1][1] == 1
            if meta:
                self.send(option(10, meta_payload(export, ("base:allocation",))))
                assert (await self.option_replies())[-1][1] == 1
        self.send(option(7, info_payload(export)))
        replies = await self.option_replies()
        assert replies[-1][1] == 1, replies
        for _opt, reply, payload in replies:
            if reply == 3 and struct.unpack(">H", payload[:2])[0] == 0:
                _info, self.size, self.flags = struct.unpack(">HQH", payload)

    async def simple_reply(self) -> tuple[int, int]:
        magic, error, handle = struct.unpack(">IIQ", await self.recv(16))
        assert magic == SIMPLE_MAGIC, hex(magic)
        return error, handle

    async def reply(self) -> tuple[int, int, int, int, bytes]:
        """One reply message: (magic, flags or error, type, handle, payload)."""
        (magic,) = struct.unpack(">I", await self.recv(4))
        if magic == SIMPLE_MAGIC:
            error, handle = struct.unpack(">IQ", await self.recv(12))
            return magic, error, -1, handle, b""
        assert magic == STRUCTURED_MAGIC, hex(magic)
        flags, type_, handle, length = struct.unpack(">HHQI", await self.recv(16))
        return magic, flags, type_, handle, await self.recv(length)

    async def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True when the server closes the connection (whatever it sent before)."""
        try:
            while await asyncio.wait_for(self.reader.read(65536), timeout):
                pass
        except (ConnectionError, TimeoutError):
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def aclose(self) -> None:
        self.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def canary(server: NBDServer, export: str = "vol1", offset: int = 15 * MiB) -> None:
    """A well-behaved client: write, read back, flush, disconnect.  Proves the server serves."""
    client = await RawClient.connect(server)
    try:
        await client.go(export, structured=False)
        data = bytes(range(256)) * 16
        client.send(request(1, 11, offset, len(data)) + data)
        assert await client.simple_reply() == (0, 11)
        client.send(request(0, 12, offset, len(data)))
        assert await client.simple_reply() == (0, 12)
        assert await client.recv(len(data)) == data
        client.send(request(3, 13))
        assert await client.simple_reply() == (0, 13)
        client.send(request(2, 14))
        assert await client.closed_by_server()
    finally:
        await client.aclose()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


__all__ = [
    "DEFAULT_EXPORT",
    "PROVIDERS",
    "STANDARD_VOLUMES",
    "Completed",
    "RawClient",
    "VolumeSpec",
    "canary",
    "nbd_provider",
    "nbd_server",
    "read_volume",
    "run",
    "unix_uri",
    "uri",
]
